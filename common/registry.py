"""A registry of named functions, and the `package.module:function` references that name
a function outside it. Rewards and tools are both found this way."""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
F = TypeVar("F", bound=Callable)


class Registry(Generic[T]):
    """Entries of one `kind` ("reward", "tool") by name; errors name the closest match."""

    def __init__(self, kind: str, advice: str, plural: str | None = None) -> None:
        self.kind, self.plural = kind, plural or f"{kind}s"
        self.advice = advice  # how to add or reference an entry, said when a name is unknown
        self._entries: dict[str, T] = {}
        self._owners: dict[str, Callable] = {}

    def add(self, name: str, entry: T, fn: Callable) -> None:
        """Register `entry` (made from the function `fn`) as `name`; a name is registered once."""
        if name in self._entries:
            existing = self._owners[name]
            raise ValueError(
                f"{self.kind} name {name!r} is already registered (by {existing.__module__}.{existing.__qualname__}); "
                f"choose another name for {fn.__module__}.{fn.__qualname__}"
            )
        self._entries[name], self._owners[name] = entry, fn

    def get(self, name: str) -> T:
        if name in self._entries:
            return self._entries[name]
        close = difflib.get_close_matches(name, self._entries, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        if "." in name:
            module, _, function = name.rpartition(".")
            hint += f"to import a function, write 'package.module:function' (e.g. '{module}:{function}'); "
        raise ValueError(
            f"{self.kind} {name!r} is not registered; {hint}registered {self.plural}: "
            f"{', '.join(sorted(self._entries)) or 'none'}. {self.advice}"
        )

    def register(self, name: str) -> Callable[[F], F]:
        """A decorator that registers the decorated function (or class) as `name` and returns it unchanged."""

        def add(fn: F) -> F:
            self.add(name, fn, fn)  # type: ignore[arg-type]
            return fn

        return add

    def remove(self, name: str) -> None:
        self._entries.pop(name, None)
        self._owners.pop(name, None)

    def copy(self) -> Registry[T]:
        """A registry with the same entries (tests register into a copy and leave this one alone)."""
        other: Registry[T] = Registry(self.kind, self.advice, self.plural)
        other._entries, other._owners = dict(self._entries), dict(self._owners)
        return other

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))


def import_function(reference: str, kind: str) -> Callable:
    """The function `package.module:function` names; a ValueError says what is wrong with the reference."""
    module_name, _, function_name = reference.partition(":")
    if not module_name or not function_name or ":" in function_name:
        raise ValueError(f"{kind} {reference!r} is not of the form 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        # A module missing inside the imported module is its own problem, not a wrong path.
        missing_self = error.name is not None and (module_name + ".").startswith(error.name + ".")
        what = "cannot be found" if missing_self else f"cannot be imported ({error})"
        raise ValueError(
            f"{kind} {reference!r}: module {module_name!r} {what}; check the module path and that its "
            "package is installed or on PYTHONPATH"
        ) from error
    except ImportError as error:
        raise ValueError(f"{kind} {reference!r}: module {module_name!r} cannot be imported ({error})") from error
    fn = getattr(module, function_name, None)
    if fn is None:
        functions = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
        close = difflib.get_close_matches(function_name, functions, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(
            f"{kind} {reference!r}: module {module_name!r} has no function {function_name!r}; {hint}"
            f"its functions: {', '.join(functions) or 'none'}"
        )
    if not callable(fn):
        raise ValueError(f"{kind} {reference!r}: {module_name}.{function_name} is a {type(fn).__name__}, not a function")
    return fn
