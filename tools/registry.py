"""The tool registry: `@tool` registers a function the policy may call; `run_tool_call` runs
a call the policy wrote and never raises on what the model wrote (see the package docstring)."""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vocalign.common.registry import Registry, import_function

ToolFn = Callable[..., Any]  # (**arguments, **options) -> str | ToolOutput

# A tool's result is cut to this many characters: it is inserted into the model's context.
MAX_RESULT_CHARS = 1000

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
}
_PY_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}
_NAME = re.compile(r"[A-Za-z_][\w.\-]*")


@dataclass(frozen=True)
class ToolOutput:
    """What a tool may return instead of a plain string: the text the model reads, plus
    `data` for the rollout (e.g. audio_search's chosen voice), never shown to the model."""

    text: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ToolResult:
    """The outcome of one tool call: `text` goes back to the model as an `input` turn.

    `ok` is False when the call could not run (the text then says why); `name` and
    `arguments` are what the model asked for, as far as they could be read.
    """

    text: str
    ok: bool
    name: str
    arguments: dict[str, Any] | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Tool:
    """A registered tool: its function, what the model is told about it, and the keyword
    arguments only the operator sets (`options`)."""

    name: str
    fn: ToolFn
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments: {"type": "object", "properties": ..., "required": [...]}
    options: tuple[str, ...] = ()

    def schema(self) -> dict[str, Any]:
        """The tool as the model is told about it (OpenAI-style function schema)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


class ToolCallError(ValueError):
    """A tool call the model wrote cannot be run; the message is shown to the model.

    `name` is the tool the call named, when it could be read."""

    def __init__(self, message: str, name: str = "") -> None:
        super().__init__(message)
        self.name = name


_REGISTRY: Registry[Tool] = Registry("tool", "Add one with @tool(name) or name it as 'package.module:function'")


# --- registering and finding tools ---------------------------------------------------------


def tool(
    name: str, *, description: str = "", parameters: dict[str, Any] | None = None, options: Sequence[str] = (),
) -> Callable[[ToolFn], ToolFn]:
    """Register the decorated function as the tool `name`; the function is returned unchanged.

    `parameters` is a JSON schema of the arguments, either whole (`{"type": "object",
    "properties": {...}, "required": [...]}`) or as just its properties (`{"city":
    {"type": "string"}}` or `{"city": "string"}`; then every property is required).
    Omitted, it is read from the function's annotated signature. `options` names keyword
    arguments the operator sets through `tool_options` and the model can never pass.
    """
    if not _NAME.fullmatch(name):
        raise ValueError(f"tool name {name!r} must be letters, digits, '_', '.' or '-', starting with a letter or '_'")

    def register(fn: ToolFn) -> ToolFn:
        _REGISTRY.add(name, _make_tool(name, fn, description, parameters, tuple(options)), fn)
        fn.__vocalign_tool__ = name  # lets `module:function` find the registered tool
        return fn

    return register


def _make_tool(name: str, fn: ToolFn, description: str, parameters: dict[str, Any] | None, options: tuple[str, ...]) -> Tool:
    schema = _normalise_schema(name, parameters) if parameters is not None else _schema_from_signature(fn, options)
    clash = sorted(set(options) & set(schema["properties"]))
    if clash:
        raise ValueError(f"tool {name!r}: {clash} are both options (operator settings) and parameters (model arguments)")
    doc = (inspect.getdoc(fn) or "").strip().splitlines()
    return Tool(name, fn, description or (doc[0] if doc else ""), schema, options)


def _normalise_schema(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    if "properties" in parameters:
        properties = dict(parameters["properties"])
        required = list(parameters.get("required", []))
    else:
        properties, required = dict(parameters), list(parameters)
    properties = {k: ({"type": v} if isinstance(v, str) else dict(v)) for k, v in properties.items()}
    for key, spec in properties.items():
        if spec.get("type") not in _JSON_TYPES:
            raise ValueError(
                f"tool {name!r}: parameter {key!r} has type {spec.get('type')!r}; use one of {', '.join(_JSON_TYPES)}"
            )
    unknown = [r for r in required if r not in properties]
    if unknown:
        raise ValueError(f"tool {name!r}: required parameters {unknown} are not among its properties {list(properties)}")
    return {"type": "object", "properties": properties, "required": required}


def _schema_from_signature(fn: ToolFn, options: tuple[str, ...]) -> dict[str, Any]:
    """A JSON schema from `fn`'s parameters: annotated str/int/float/bool/list/dict; no default = required."""
    properties: dict[str, Any] = {}
    required: list[str] = []
    hints = _annotations(fn)
    for p in inspect.signature(fn).parameters.values():
        if p.name in options or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        kind = _PY_TYPES.get(hints.get(p.name), "string")
        properties[p.name] = {"type": kind}
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
    return {"type": "object", "properties": properties, "required": required}


def _annotations(fn: ToolFn) -> dict[str, Any]:
    """`fn`'s annotations as types, `X | None` read as X; unresolvable ones are left out (then "string")."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        return {}
    out = {}
    for name, hint in hints.items():
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        out[name] = members[0] if is_union and len(members) == 1 else hint
    return out


def get_tool(name: str) -> Tool:
    """The tool called `name`: a registered name, or `package.module:function`."""
    if ":" not in name:
        return _REGISTRY.get(name)
    fn = import_function(name, "tool")
    registered = getattr(fn, "__vocalign_tool__", None)
    if registered is not None:
        return _REGISTRY.get(registered)
    function_name = name.partition(":")[2]
    if not _NAME.fullmatch(function_name):
        raise ValueError(f"tool {name!r}: {function_name!r} cannot be a tool name")
    return _make_tool(function_name, fn, "", None, ())


def list_tools() -> list[Tool]:
    """Every registered tool, sorted by name."""
    return [entry for _, entry in _REGISTRY.items()]


def resolve_tools(enabled: Sequence[str]) -> dict[str, Tool]:
    """The enabled tools by the name the model calls them; raises on an unknown or repeated tool.

    Call it before generation starts, so that a recipe's typo fails at once.
    """
    tools: dict[str, Tool] = {}
    for reference in enabled:
        t = get_tool(reference)
        if t.name in tools:
            raise ValueError(f"tool {t.name!r} is enabled twice (as {reference!r}); name each tool once")
        tools[t.name] = t
    return tools


def tool_schemas(enabled: Sequence[str]) -> list[dict[str, Any]]:
    """The schemas of the enabled tools, for a prompt's `tool_json_schemas` turn."""
    return [t.schema() for t in resolve_tools(enabled).values()]


# --- running a call ------------------------------------------------------------------------


def format_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """A call as the model writes it: `<tool_call>function\n{name}\n{json}</tool_call>`."""
    return f"<tool_call>function\n{name}\n{json.dumps(arguments, ensure_ascii=False)}</tool_call>"


def parse_tool_call(raw: str) -> tuple[str, dict[str, Any]]:
    """(name, arguments) of a call written as `function\\n{name}\\n{json}` (tags optional).

    Raises ToolCallError, whose message says what is wrong, for anything else.
    """
    body = raw.strip()
    body = body.removeprefix("<tool_call>").removesuffix("</tool_call>").strip()
    lines = body.split("\n", 2)
    if len(lines) < 2 or lines[0].strip() != "function":
        raise ToolCallError(
            "a tool call must read 'function', then the tool name, then a JSON object of arguments, one per line"
        )
    name = lines[1].strip()
    if not _NAME.fullmatch(name):
        raise ToolCallError(f"{name[:40]!r} is not a tool name")
    text = lines[2].strip() if len(lines) > 2 else "{}"
    try:
        arguments = json.loads(text or "{}")
    except json.JSONDecodeError as error:
        raise ToolCallError(f"the arguments of {name} are not valid JSON ({error.msg} at character {error.pos})", name) from None
    if not isinstance(arguments, dict):
        raise ToolCallError(f"the arguments of {name} must be a JSON object, not a {type(arguments).__name__}", name)
    return name, arguments


def run_tool_call(
    raw: str, enabled: Sequence[str] | dict[str, Tool], options: dict[str, dict[str, Any]] | None = None,
    max_chars: int = MAX_RESULT_CHARS,
) -> ToolResult:
    """Run the call the model wrote (`raw`: `function\\n{name}\\n{json}`) with one of the
    `enabled` tools (names, or `resolve_tools`'s result); `options[name]` are that tool's
    operator settings. Never raises on anything the model wrote: errors come back as
    `ToolResult(text="error: ...", ok=False)`. The text is cut to `max_chars`.
    """
    tools = enabled if isinstance(enabled, dict) else resolve_tools(enabled)
    name, arguments = "", None
    try:
        name, arguments = parse_tool_call(raw)
        if name not in tools:
            known = ", ".join(sorted(tools)) or "none"
            raise ToolCallError(f"there is no tool {name!r}; the tools are: {known}")
        t = tools[name]
        _check_arguments(t, arguments)
        settings = (options or {}).get(name, {})
        unknown = [k for k in settings if k not in t.options]
        if unknown:  # an operator mistake, but reported like the others: generation must go on
            raise ToolCallError(f"tool {name} is configured with unknown options {unknown}; it takes {list(t.options)}")
        output = t.fn(**arguments, **settings)
    except ToolCallError as error:
        return ToolResult(_cut(f"error: {error}", max_chars), False, name or error.name, arguments)
    except Exception as error:  # the tool itself failed: the model reads why
        return ToolResult(_cut(f"error: tool {name} failed: {type(error).__name__}: {error}", max_chars), False, name, arguments)
    if isinstance(output, ToolOutput):
        return ToolResult(_cut(output.text, max_chars), True, name, arguments, dict(output.data))
    return ToolResult(_cut(str(output), max_chars), True, name, arguments)


def _cut(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


def _check_arguments(t: Tool, arguments: dict[str, Any]) -> None:
    properties = t.parameters["properties"]
    unknown = [k for k in arguments if k not in properties]
    if unknown:
        raise ToolCallError(f"tool {t.name} has no argument {unknown[0]!r}; its arguments: {', '.join(properties) or 'none'}")
    missing = [k for k in t.parameters.get("required", []) if k not in arguments]
    if missing:
        raise ToolCallError(f"tool {t.name} needs the argument {missing[0]!r}")
    for key, value in arguments.items():
        spec = properties[key]
        kind = spec.get("type")
        ok = isinstance(value, _JSON_TYPES[kind]) and not (kind in ("integer", "number") and isinstance(value, bool))
        if not ok:
            raise ToolCallError(f"argument {key!r} of {t.name} must be a {kind}, not {json.dumps(value)[:40]}")
        if "enum" in spec and value not in spec["enum"]:
            raise ToolCallError(f"argument {key!r} of {t.name} must be one of {spec['enum']}")
