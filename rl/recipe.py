"""Recipes: YAML files read with omegaconf and checked against the config dataclasses.

A recipe states only what differs from the defaults in the config dataclasses; the
command line may change any value with dotted `key=value` overrides
(`trainer.learning_rate=1e-4 rewards[0].weight=2`). Every mistake a user can make in a
recipe is reported as a `RecipeError` that names the file, the full dotted key, what is
wrong and what to write instead.

omegaconf does the merging and the type conversion. Before it does, the recipe is walked
alongside the dataclass types, because omegaconf reports a key inside a list element
relative to that element (`wieght` rather than `rewards[0].wieght`) and does not check
the elements of a `list[str]` at all.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.resources
import re
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf, ValidationError
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

T = TypeVar("T")

REDACTED = "<redacted>"


class RecipeError(ValueError):
    """A recipe (its YAML or a command-line override) does not fit the config schema."""


class _Invalid(Exception):
    """A problem found while reading a recipe; becomes a RecipeError naming its source."""


# --- loading -------------------------------------------------------------------------


def load_recipe(path_or_name: str | Path, overrides: Sequence[str], schema: type[T]) -> T:
    """Read a recipe, apply `key=value` overrides and return it as a `schema` instance.

    `path_or_name` is a path to a YAML file or the name of a packaged recipe (`demo`).
    """
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        raise TypeError(f"load_recipe needs a dataclass type as schema, got {schema!r}")
    path = resolve_recipe_path(path_or_name)
    source = str(path)
    with _reported_as(source):
        data = _read_yaml(path)
        _check(schema, data, "")
        config = OmegaConf.merge(OmegaConf.structured(schema), data)
    for override in overrides:
        with _reported_as(f"{source}, override '{override}'"):
            _apply_override(config, schema, override)
    with _reported_as(source):
        _require_no_missing(config)
        return typing.cast(T, OmegaConf.to_object(config))


def check_section(schema: type, section: str, value: Any, key: str) -> None:
    """Check `value` against the type of `schema`'s field `section`; a RecipeError names `key`
    (a staged recipe's `stages[1].rl` keys are checked as the `rl` section's)."""
    try:
        _check(_field_types(schema)[section], value, key)
    except _Invalid as problem:
        raise RecipeError(str(problem)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as error:
        raise _Invalid(f"not valid YAML: {_yaml_problem(error)}") from None
    except OSError as error:
        raise _Invalid(f"cannot be read: {error.strerror}") from None
    if not isinstance(loaded, DictConfig):
        raise _Invalid(
            "a recipe must be a mapping of keys (`key: value` lines) at its top level, "
            "not a list"
        )
    return typing.cast(dict[str, Any], OmegaConf.to_container(loaded, resolve=False))


def _yaml_problem(error: yaml.YAMLError) -> str:
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        return f"{error.problem} (line {error.problem_mark.line + 1})"
    return " ".join(str(error).split())


def _apply_override(config: DictConfig, schema: type, override: str) -> None:
    key, has_equals, raw_value = override.partition("=")
    key = key.strip()
    if not has_equals or not key:
        raise _Invalid(
            "an override is written key=value with a dotted key, "
            "e.g. trainer.learning_rate=1e-4 or rewards[0].weight=2"
        )
    try:
        # Parse the value exactly as omegaconf parses a dotlist entry (YAML syntax).
        parsed = OmegaConf.from_dotlist([f"value={raw_value}"])
    except yaml.YAMLError as error:
        raise _Invalid(f"the value is not valid YAML: {_yaml_problem(error)}") from None
    value = OmegaConf.to_container(parsed, resolve=False)["value"]  # type: ignore[index]
    value_type, full_key = _type_at(schema, config, key)
    _check(value_type, value, full_key)
    OmegaConf.update(config, full_key, value, merge=True)


def _require_no_missing(config: DictConfig) -> None:
    missing = sorted(OmegaConf.missing_keys(config))
    if len(missing) == 1:
        raise _Invalid(
            f"recipe key '{missing[0]}' is required but has no value; set it in the "
            f"recipe or add the override {missing[0]}=VALUE"
        )
    if missing:
        names = ", ".join(f"'{key}'" for key in missing)
        raise _Invalid(
            f"recipe keys {names} are required but have no value; set them in the "
            f"recipe or as overrides such as {missing[0]}=VALUE"
        )


@contextmanager
def _reported_as(source: str) -> Iterator[None]:
    """Turn problems found inside the block into RecipeErrors naming `source`."""
    try:
        yield
    except _Invalid as problem:
        raise RecipeError(f"{source}: {problem}") from None
    except MissingMandatoryValue as error:
        raise RecipeError(
            f"{source}: recipe key '{error.full_key}' is required but has no value"
        ) from None
    except OmegaConfBaseException as error:
        # Checks above catch what a user normally gets wrong; this covers the rest
        # (interpolations that point nowhere, for example) without omegaconf's traceback.
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        key = getattr(error, "full_key", None)
        where = f"recipe key '{key}': " if key else ""
        raise RecipeError(f"{source}: {where}{reason}") from None


# --- checking values against the dataclass types --------------------------------------


def _check(expected: Any, value: Any, key: str) -> None:
    """Raise _Invalid for the first part of `value` that does not fit type `expected`."""
    if isinstance(value, str) and (value == MISSING or "${" in value):
        return  # a required value left open, or an interpolation: checked once merged
    inner, optional = _without_none(expected)
    if value is None:
        if optional or inner is Any:
            return
        raise _wrong_type(key, expected, value)
    if inner is Any:
        return
    origin = typing.get_origin(inner) or inner
    if dataclasses.is_dataclass(inner):
        if not isinstance(value, Mapping):
            raise _wrong_type(key, expected, value)
        field_types = _field_types(typing.cast(type, inner))
        for name, item in value.items():
            if name not in field_types:
                raise _Invalid(_unknown_key(key, str(name), list(field_types)))
            _check(field_types[name], item, _join(key, name))
    elif origin in (list, tuple):
        if not isinstance(value, list):
            raise _wrong_type(key, expected, value)
        item_types = _item_types(inner, len(value))
        if item_types is None:
            raise _wrong_type(key, expected, value)
        for index, (item_type, item) in enumerate(zip(item_types, value)):
            _check(item_type, item, f"{key}[{index}]")
    elif origin is dict:
        if not isinstance(value, Mapping):
            raise _wrong_type(key, expected, value)
        args = typing.get_args(inner)
        value_type = args[1] if args else Any
        for name, item in value.items():
            _check(value_type, item, _join(key, str(name)))
    else:
        _check_single_value(expected, value, key)


def _check_single_value(expected: Any, value: Any, key: str) -> None:
    # omegaconf's own node for this type decides, so the check agrees with the merge.
    holder = OmegaConf.structured(_value_holder(expected))
    try:
        OmegaConf.merge(holder, {"value": value})
    except ValidationError:
        raise _wrong_type(key, expected, value) from None


@functools.lru_cache(maxsize=None)
def _value_holder(expected: Any) -> type:
    return dataclasses.make_dataclass(
        "RecipeValue", [("value", expected, dataclasses.field(default=MISSING))]
    )


def _type_at(schema: type, config: DictConfig, key: str) -> tuple[Any, str]:
    """The declared type at dotted `key` (`a.b`, `a[0].b` or `a.0.b`) and its canonical name."""
    current: Any = schema
    full_key = ""
    for part in re.findall(r"[^.\[\]]+", key):
        inner, _ = _without_none(current)
        origin = typing.get_origin(inner) or inner
        if dataclasses.is_dataclass(inner):
            field_types = _field_types(typing.cast(type, inner))
            if part not in field_types:
                raise _Invalid(_unknown_key(full_key, part, list(field_types)))
            current, full_key = field_types[part], _join(full_key, part)
        elif origin in (list, tuple):
            if not part.isdigit():
                raise _Invalid(
                    f"recipe key '{full_key}' is a list; address an entry by its "
                    f"index, e.g. {full_key}[0]"
                )
            index = int(part)
            entries = OmegaConf.select(config, full_key)
            length = len(entries) if entries is not None else 0
            if index >= length:
                entries_text = "1 entry" if length == 1 else f"{length} entries"
                raise _Invalid(
                    f"recipe key '{full_key}[{index}]' is out of range: '{full_key}' "
                    f"has {entries_text}; to replace the whole list write "
                    f"{full_key}=[...]"
                )
            item_types = _item_types(inner, length) or [Any] * length
            current, full_key = item_types[index], f"{full_key}[{index}]"
        elif origin is dict or inner is Any:
            args = typing.get_args(inner)
            current, full_key = (args[1] if args else Any), _join(full_key, part)
        else:
            raise _Invalid(
                f"recipe key '{full_key}' holds a single value "
                f"({_type_name(current)}); it has no key '{part}'"
            )
    return current, full_key


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls)}


def _item_types(sequence_type: Any, length: int) -> list[Any] | None:
    """The type of each of `length` items, or None where a fixed-size tuple differs."""
    args = typing.get_args(sequence_type)
    if typing.get_origin(sequence_type) is tuple and args and args[-1] is not Ellipsis:
        return list(args) if len(args) == length else None
    return [args[0] if args else Any] * length


def _without_none(expected: Any) -> tuple[Any, bool]:
    """(`expected` without None, whether None was allowed)."""
    if typing.get_origin(expected) in (Union, types.UnionType):
        args = typing.get_args(expected)
        rest = tuple(arg for arg in args if arg is not type(None))
        inner = rest[0] if len(rest) == 1 else Union[rest]
        return inner, len(rest) < len(args)
    return expected, False


# --- messages -------------------------------------------------------------------------


def _join(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


def _unknown_key(section: str, name: str, valid: list[str]) -> str:
    full_key = _join(section, name)
    close = _close_keys(name, valid)
    if close:
        options = " or ".join(f"'{_join(section, key)}'" for key in close)
        return f"recipe key '{full_key}' is not known; did you mean {options}?"
    where = f"'{section}'" if section else "the top level"
    return f"recipe key '{full_key}' is not known; the keys in {where} are: {', '.join(valid)}"


def _close_keys(name: str, valid: list[str]) -> list[str]:
    """Likely intended keys: near spellings, initials (`lr`) and parts (`steps`)."""
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    wanted = name.lower()
    for key in valid:
        initials = "".join(word[0] for word in key.split("_") if word)
        if key not in close and (wanted == initials or (len(wanted) >= 3 and wanted in key)):
            close.append(key)
    return close[:3]


def _wrong_type(key: str, expected: Any, value: Any) -> _Invalid:
    where = f"recipe key '{key}'" if key else "the recipe"
    return _Invalid(f"{where} expects {_type_name(expected)}, got {_show(value)}")


def _type_name(expected: Any) -> str:
    inner, optional = _without_none(expected)
    name = _inner_type_name(inner)
    return f"{name} or null" if optional else name


def _inner_type_name(expected: Any) -> str:
    origin = typing.get_origin(expected) or expected
    args = typing.get_args(expected)
    if expected is Any:
        return "any value"
    if dataclasses.is_dataclass(expected):
        return f"a {expected.__name__} section"  # type: ignore[union-attr]
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if isinstance(expected, type) and issubclass(expected, Enum):
        return "one of " + ", ".join(member.name for member in expected)
    if origin in (list, tuple):
        items = [arg for arg in args if arg is not Ellipsis]
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(items)} values ({', '.join(map(_type_name, items))})"
        if items and dataclasses.is_dataclass(items[0]):
            return f"a list of {items[0].__name__} sections"
        return f"a list of {_type_name(items[0])}" if items else "a list"
    if origin is dict:
        return f"a mapping of {_type_name(args[1])}" if args else "a mapping"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in args)
    return getattr(expected, "__name__", str(expected))


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value)


# --- writing --------------------------------------------------------------------------

# Fields named like these hold credentials. `token` counts only as the last whole word
# (`token`, `hf_token`, `access_token`), so `max_new_tokens`, `tokenizer` and
# `audio_token_weight` stay, and tokenizer special tokens are not secrets.
_SECRET_PARTS = ("api_key", "apikey", "password", "passwd", "secret")
_SPECIAL_TOKENS = {"bos", "eos", "pad", "unk", "sep", "cls", "mask"}


def is_secret_key(name: str) -> bool:
    """Whether a config field of this name holds a credential (and must not be written)."""
    lowered = name.lower()
    if any(part in lowered for part in _SECRET_PARTS):
        return True
    words = [word for word in re.split(r"[^a-z0-9]+", lowered) if word]
    return bool(words) and words[-1] == "token" and not (len(words) == 2 and words[0] in _SPECIAL_TOKENS)


def redact_secrets(data: Any, strings_only: bool = False) -> Any:
    """A copy of nested dicts/lists with every set value under a secret-looking key hidden.

    `strings_only` hides only strings: logged metrics keep their numbers (a metric such as
    `reward/<name>` is never a credential, and must stay a number)."""
    if isinstance(data, Mapping):
        return {
            key: REDACTED
            if is_secret_key(str(key)) and value not in (None, "") and (isinstance(value, str) or not strings_only)
            else redact_secrets(value, strings_only)
            for key, value in data.items()
        }
    if isinstance(data, list | tuple):
        return [redact_secrets(item, strings_only) for item in data]
    return data


def to_dict(recipe: Any) -> dict[str, Any]:
    """A recipe (dataclass instance or mapping) as plain, resolved data, secrets redacted."""
    plain = OmegaConf.to_container(OmegaConf.create(recipe), resolve=True, enum_to_str=True)
    return typing.cast(dict[str, Any], redact_secrets(plain))


def to_yaml(recipe: Any) -> str:
    """The resolved recipe as YAML, secrets redacted: what a run folder's config.yaml holds."""
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(recipe)))


# --- finding recipes -----------------------------------------------------------------


def packaged_recipes_dir() -> Path:
    """The folder of the recipes shipped with vocalign (`vocalign.recipes`)."""
    return Path(str(importlib.resources.files("vocalign.recipes")))


def resolve_recipe_path(name_or_path: str | Path, *, recipes_dir: Path | None = None) -> Path:
    """A path to an existing recipe file, or the packaged recipe of that name (`demo`)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    folder = recipes_dir if recipes_dir is not None else packaged_recipes_dir()
    text = str(name_or_path)
    is_bare_name = "/" not in text and "\\" not in text
    if is_bare_name:
        named = folder / f"{text.removesuffix('.yaml')}.yaml"
        if named.is_file():
            return named
    available = ", ".join(name for name, _ in list_recipes(recipes_dir=folder)) or "none"
    if path.is_dir():
        problem = f"'{path}' is a folder"
    elif is_bare_name:
        problem = f"no file '{path}' and no recipe named '{text}' in {folder}"
    else:
        problem = f"no file '{path}'"
    raise RecipeError(
        f"recipe '{text}' not found: {problem}; recipes available by name: {available}; "
        "or pass the path of a .yaml file"
    )


def list_recipes(*, recipes_dir: Path | None = None) -> list[tuple[str, str]]:
    """(name, one-line description) of every recipe in the packaged (or given) folder."""
    folder = recipes_dir if recipes_dir is not None else packaged_recipes_dir()
    return [(path.stem, describe(path)) for path in sorted(folder.glob("*.yaml"))]


def describe(path: str | Path) -> str:
    """A recipe's one-line description: its `description` value, else its first comment."""
    path = Path(path)
    with _reported_as(str(path)):
        description = _read_yaml(path).get("description")
    if isinstance(description, str) and description.strip():
        return description.strip().splitlines()[0]
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break  # only the comment block at the head of the file describes it
        if text := stripped.lstrip("#").strip():
            return text
    return ""
