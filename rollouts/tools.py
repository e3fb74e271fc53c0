"""Tools a policy can call during a rollout, and the registry that finds them.

Step-Audio 2 writes a tool call as

    <tool_call>function\\n{name}\\n{json object of arguments}</tool_call>

and reads the result back as a turn of role `input`. A tool is a plain synchronous
function `fn(**arguments) -> str` registered by name:

    @tool("weather", description="today's weather in a city",
          parameters={"city": {"type": "string", "description": "the city"}})
    def weather(city: str) -> str:
        return f"sunny in {city}"

A recipe enables tools by name (`rollouts.tools: [calculator, weather]`) or as
`package.module:function` (a decorated function, or any plain function: its name,
docstring and annotated parameters describe it). Some tools also take settings the
operator gives and the model never sees nor sets (`options`, e.g. the retrieval root);
they come from `rollouts.tool_options: {retrieval: {root: docs/}}`.

`run_tool_call` turns a call the model wrote into a `ToolResult`. Whatever the model
wrote (an unknown tool, bad JSON, a wrong argument, a tool that raises) becomes an
error message the model reads in the next turn (`ok=False`): a rollout never crashes on
a tool call. Only the operator's own mistakes (enabling a tool that does not exist)
raise, and they raise before generation starts (`resolve_tools`).

Built-in tools: `calculator` (arithmetic, by walking the expression's syntax tree, never
eval), `datetime` (the current date and time, for a UTC offset or time zone),
`retrieval` (BM25 over the paragraphs of a local folder of text files, confined to that
folder) and `audio_search` (picks a voice from a voice library by its description; the
rollout then renders its speech in that voice).
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import json
import math
import operator
import os
import re
import types
import typing
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from datetime import timezone as tz
from pathlib import Path
from typing import Any

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


_REGISTRY: dict[str, Tool] = {}


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
        if name in _REGISTRY:
            existing = _REGISTRY[name].fn
            raise ValueError(
                f"tool name {name!r} is already registered (by {existing.__module__}.{existing.__qualname__}); "
                f"choose another name for {fn.__module__}.{fn.__qualname__}"
            )
        _REGISTRY[name] = _make_tool(name, fn, description, parameters, tuple(options))
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
    if ":" in name:
        return _import_tool(name)
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(name, _REGISTRY, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(
        f"tool {name!r} is not registered; {hint}registered tools: {', '.join(sorted(_REGISTRY)) or 'none'}; "
        "add one with @tool(name) or name it as 'package.module:function'"
    )


def _import_tool(reference: str) -> Tool:
    module_name, _, function_name = reference.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"tool {reference!r} is not of the form 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"tool {reference!r}: module {module_name!r} cannot be imported ({error})") from error
    fn = getattr(module, function_name, None)
    if not callable(fn):
        raise ValueError(f"tool {reference!r}: module {module_name!r} has no function {function_name!r}")
    registered = getattr(fn, "__vocalign_tool__", None)
    if registered is not None:
        return _REGISTRY[registered]
    if not _NAME.fullmatch(function_name):
        raise ValueError(f"tool {reference!r}: {function_name!r} cannot be a tool name")
    return _make_tool(function_name, fn, "", None, ())


def list_tools() -> list[Tool]:
    """Every registered tool, sorted by name."""
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


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


# === built-in tools ===========================================================================

# --- calculator ------------------------------------------------------------------------------

CALCULATOR_MAX_CHARS = 200
CALCULATOR_MAX_EXPONENT = 100
CALCULATOR_MAX_DIGITS = 300  # integers beyond this many digits are refused (no runaway big-int work)

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression: numbers, + - * / // % **, unary minus, parentheses.

    The expression is parsed into a Python syntax tree and only those nodes are
    evaluated; anything else (names, calls, attributes, strings) is refused, so nothing
    the expression says can run code. `^` means power, `×` and a spaced ` x ` multiply,
    `÷` divides.
    Exponents are limited to CALCULATOR_MAX_EXPONENT and integers to
    CALCULATOR_MAX_DIGITS digits. Raises ToolCallError with the reason.
    """
    if len(expression) > CALCULATOR_MAX_CHARS:
        raise ToolCallError(f"the expression is {len(expression)} characters long; the limit is {CALCULATOR_MAX_CHARS}")
    text = expression.replace("^", "**").replace("×", "*").replace("÷", "/")
    text = re.sub(r"\s[xX]\s", " * ", text).strip()  # "3 x 4"
    try:
        with warnings.catch_warnings():  # "invalid decimal literal" and the like: the model's text, not our bug
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ToolCallError(f"{expression!r} is not an arithmetic expression") from None
    return _evaluate(tree.body)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise ToolCallError(f"only numbers are allowed, not {node.value!r}")
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolCallError("division by zero") from None
        except OverflowError:
            raise ToolCallError("the result is too large") from None
        if isinstance(value, complex):
            raise ToolCallError("the result is not a real number")
        if isinstance(value, int) and value.bit_length() > CALCULATOR_MAX_DIGITS * 3.33:
            raise ToolCallError(f"the result has more than {CALCULATOR_MAX_DIGITS} digits")
        if isinstance(value, float) and not math.isfinite(value):
            raise ToolCallError("the result is too large")
        return value
    what = {ast.Name: "a name", ast.Call: "a function call", ast.Attribute: "an attribute",
            ast.Subscript: "indexing", ast.Compare: "a comparison", ast.BoolOp: "a logical operator"}
    found = next((v for k, v in what.items() if isinstance(node, k)), type(node).__name__)
    raise ToolCallError(f"only numbers, + - * / // % ** and parentheses are allowed; found {found}")


def _check_power(base: int | float, exponent: int | float) -> None:
    if abs(exponent) > CALCULATOR_MAX_EXPONENT:
        raise ToolCallError(f"the exponent {exponent} is too large; the limit is {CALCULATOR_MAX_EXPONENT}")
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        if base.bit_length() * exponent > CALCULATOR_MAX_DIGITS * 3.33:
            raise ToolCallError(f"the result has more than {CALCULATOR_MAX_DIGITS} digits")


def format_number(value: int | float) -> str:
    """A calculator result as text: integers as they are, floats without a trailing .0 and rounded to 10 places."""
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{round(value, 10):.10g}" if abs(value) < 1e15 else repr(value)
    return str(value)


@tool(
    "calculator",
    description="Evaluate an arithmetic expression (numbers, + - * / // % **, parentheses) and return its value.",
    parameters={"expression": {"type": "string", "description": "e.g. \"347 * 29\""}},
)
def calculator_tool(expression: str) -> str:
    return format_number(calculate(expression))


# --- datetime --------------------------------------------------------------------------------


def _utc_now() -> datetime:
    return datetime.now(tz.utc)


# The clock the datetime tool reads. Tests (or a deterministic evaluation) replace it:
#   monkeypatch.setattr(vocalign.rollouts.tools, "clock", lambda: datetime(2025, 1, 2, tzinfo=tz.utc))
clock: Callable[[], datetime] = _utc_now

_OFFSET = re.compile(r"(?:UTC|GMT)?\s*([+-])\s*(\d{1,2})(?::?(\d{2}))?")


def parse_utc_offset(text: str) -> timedelta:
    """'+05:30', '-3', 'UTC+2', '+0930' -> a timedelta within +-14 h; ToolCallError otherwise."""
    text = str(text).strip()
    if text.upper() in ("Z", "UTC", "GMT", "0", "+0", "-0"):
        return timedelta(0)
    match = _OFFSET.fullmatch(text.upper())
    if not match:
        raise ToolCallError(f"utc_offset {text!r} is not an offset like '+05:30' or '-3'")
    sign, hours, minutes = match.group(1), int(match.group(2)), int(match.group(3) or 0)
    delta = timedelta(hours=hours, minutes=minutes) * (-1 if sign == "-" else 1)
    if minutes >= 60 or abs(delta) > timedelta(hours=14):
        raise ToolCallError(f"utc_offset {text!r} is out of range (-14:00 to +14:00)")
    return delta


@tool(
    "datetime",
    description="The current date, time and weekday, in UTC or at a UTC offset or time zone.",
    parameters={"type": "object", "properties": {
        "utc_offset": {"type": "string", "description": "e.g. \"+05:30\" or \"-3\""},
        "timezone": {"type": "string", "description": "an IANA time zone, e.g. \"Europe/Paris\""},
    }, "required": []},
)
def datetime_tool(utc_offset: str | None = None, timezone: str | None = None) -> str:
    now = clock()
    if now.tzinfo is None:
        now = now.replace(tzinfo=tz.utc)
    if timezone is not None and utc_offset is not None:
        raise ToolCallError("give utc_offset or timezone, not both")
    if timezone is not None:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            local = now.astimezone(ZoneInfo(timezone))
        except (ZoneInfoNotFoundError, ValueError):
            raise ToolCallError(f"time zone {timezone!r} is not known; use a name like 'Europe/Paris' or a utc_offset") from None
    else:
        local = now.astimezone(tz(parse_utc_offset(utc_offset or "0")))
    offset = local.utcoffset() or timedelta(0)
    minutes = int(offset.total_seconds() // 60)
    sign = "-" if minutes < 0 else "+"
    label = f"UTC{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    return f"{local:%Y-%m-%d %H:%M:%S} ({local:%A}), {label}"


# --- text search (shared by retrieval and audio_search) -----------------------------------------

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-case word tokens, as the search tools compare them."""
    return _WORD.findall(text.lower())


def bm25_scores(query: str, documents: Sequence[list[str]], k1: float = 1.5, b: float = 0.75) -> list[float]:
    """Okapi BM25 of `query` against tokenised `documents` (a word absent from every document adds nothing)."""
    n = len(documents)
    if n == 0:
        return []
    frequency = Counter(w for doc in documents for w in set(doc))
    average = sum(len(d) for d in documents) / n or 1.0
    scores = []
    terms = set(words(query))
    for doc in documents:
        counts = Counter(doc)
        score = 0.0
        for term in terms:
            tf = counts.get(term, 0)
            if tf:
                idf = math.log(1.0 + (n - frequency[term] + 0.5) / (frequency[term] + 0.5))
                score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(doc) / average))
        scores.append(score)
    return scores


# --- retrieval -----------------------------------------------------------------------------

RETRIEVAL_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
RETRIEVAL_MAX_FILES = 2000
RETRIEVAL_MAX_FILE_BYTES = 1_000_000
RETRIEVAL_PASSAGE_CHARS = 600  # longer paragraphs are split at sentence ends


@dataclass(frozen=True)
class Passage:
    file: str  # path relative to the root, with '/'
    text: str


def inside(path: Path, root: Path) -> bool:
    """Whether `path`, with every symlink resolved, lies inside the resolved `root`."""
    try:
        path.resolve(strict=True).relative_to(root.resolve(strict=True))
    except (ValueError, OSError):
        return False
    return True


def document_files(root: Path) -> list[Path]:
    """The text files under `root` that retrieval reads: symlinked folders are not entered,
    and a symlinked file counts only when it resolves to a file inside `root`."""
    root = root.resolve(strict=True)
    found: list[Path] = []
    for folder, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(folder) / name
            if name.startswith(".") or path.suffix.lower() not in RETRIEVAL_SUFFIXES:
                continue
            if inside(path, root) and path.resolve().is_file():
                found.append(path)
            if len(found) >= RETRIEVAL_MAX_FILES:
                return found
    return found


def passages(root: Path, files: Sequence[Path]) -> list[Passage]:
    """The paragraphs of `files` (split at blank lines, long ones at sentence ends)."""
    out: list[Passage] = []
    for path in files:
        if path.stat().st_size > RETRIEVAL_MAX_FILE_BYTES:
            continue
        relative = path.relative_to(root).as_posix()
        text = path.read_text(encoding="utf-8", errors="replace")
        for paragraph in re.split(r"\n\s*\n", text):
            paragraph = " ".join(paragraph.split())
            while paragraph:
                piece = paragraph
                if len(piece) > RETRIEVAL_PASSAGE_CHARS:
                    cut = piece.rfind(". ", 0, RETRIEVAL_PASSAGE_CHARS)
                    piece = piece[: cut + 1] if cut > 0 else piece[:RETRIEVAL_PASSAGE_CHARS]
                out.append(Passage(relative, piece.strip()))
                paragraph = paragraph[len(piece) :].strip()
    return out


_INDEX_CACHE: dict[tuple, tuple[list[Passage], list[list[str]]]] = {}


def _index(root: Path, files: list[Path]) -> tuple[list[Passage], list[list[str]]]:
    """Passages and their words, cached until a file under the root changes."""
    key = (str(root), tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files))
    if key not in _INDEX_CACHE:
        if len(_INDEX_CACHE) > 8:
            _INDEX_CACHE.clear()
        found = passages(root, files)
        _INDEX_CACHE[key] = (found, [words(p.text) for p in found])
    return _INDEX_CACHE[key]


def _confined_file(root: Path, file: str) -> Path:
    """`file` (relative to root) as a path inside root, or ToolCallError: absolute paths,
    '..' and symlinks that lead out of root are refused."""
    relative = Path(file)
    if relative.is_absolute() or file.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", file):
        raise ToolCallError(f"file {file!r} must be a path relative to the document folder")
    if ".." in relative.parts or "\\.." in file or "../" in file.replace("\\", "/"):
        raise ToolCallError(f"file {file!r} may not contain '..'")
    path = root / relative
    if not path.exists():
        raise ToolCallError(f"there is no document {file!r}")
    if not inside(path, root):
        raise ToolCallError(f"file {file!r} leads outside the document folder")
    if not path.resolve().is_file() or path.suffix.lower() not in RETRIEVAL_SUFFIXES:
        raise ToolCallError(f"{file!r} is not a text document ({', '.join(RETRIEVAL_SUFFIXES)})")
    return path


def retrieve(query: str, root: str | Path, top_k: int = 3, file: str | None = None) -> list[tuple[Passage, float]]:
    """The `top_k` passages under `root` (or in `file` only) that best match `query`, by BM25."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise ToolCallError(f"the document folder {str(root)!r} does not exist")
    base = base.resolve()
    files = [_confined_file(base, file)] if file else document_files(base)
    found, tokens = _index(base, files)
    scores = bm25_scores(query, tokens)
    ranked = sorted(range(len(found)), key=lambda i: (-scores[i], i))
    return [(found[i], scores[i]) for i in ranked[:top_k] if scores[i] > 0]


@tool(
    "retrieval",
    description="Search the local documents for passages about a query; returns the best passages with their file names.",
    parameters={"type": "object", "properties": {
        "query": {"type": "string", "description": "what to look for"},
        "top_k": {"type": "integer", "description": "how many passages (1-10, default 3)"},
        "file": {"type": "string", "description": "search only this document (a path relative to the document folder)"},
    }, "required": ["query"]},
    options=("root",),
)
def retrieval_tool(query: str, top_k: int = 3, file: str | None = None, root: str | None = None) -> str:
    if root is None:
        raise ToolCallError("retrieval has no document folder; set rollouts.tool_options.retrieval.root")
    if not 1 <= top_k <= 10:
        raise ToolCallError(f"top_k={top_k} must be between 1 and 10")
    hits = retrieve(query, root, top_k, file)
    if not hits:
        return f"no passage matches {query!r}"
    return "\n".join(f"[{k}] {p.file}: {p.text}" for k, (p, _) in enumerate(hits, start=1))


# --- audio_search: a voice library --------------------------------------------------------------

# Voice id -> its description and the espeak-ng voice the detokenizer renders it with. The
# pitch words follow measured mean F0 on one English sentence: Storm 84 Hz, m1 92 Hz,
# m3 103 Hz, m7 104 Hz (wide range), grandpa 104 Hz, f1 178 Hz, f3 208 Hz, f5 204 Hz,
# grandma 196 Hz; whisper and croak are unvoiced / rough variants.
DEFAULT_VOICE_LIBRARY: dict[str, dict[str, str]] = {
    "deep_male": {"description": "a deep low male voice, very low pitch", "voice": "en-us+Storm"},
    "low_male": {"description": "a low calm male voice", "voice": "en-us+m1"},
    "neutral_male": {"description": "a neutral clear male voice, medium pitch", "voice": "en-us+m3"},
    "lively_male": {"description": "a lively bright expressive male voice", "voice": "en-us+m7"},
    "old_male": {"description": "an old man, an elderly grandfather's voice", "voice": "en-us+grandpa"},
    "warm_female": {"description": "a warm low female voice", "voice": "en-us+f1"},
    "high_female": {"description": "a high clear female voice, high pitch", "voice": "en-us+f3"},
    "bright_female": {"description": "a bright cheerful young female voice", "voice": "en-us+f5"},
    "old_female": {"description": "an old woman, an elderly grandmother's voice", "voice": "en-us+grandma"},
    "whisper": {"description": "a quiet whispering voice, a whisper", "voice": "en-us+whisper"},
    "croaky": {"description": "a rough croaky hoarse voice", "voice": "en-us+croak"},
}


def load_voice_library(library: str | Path | dict[str, dict[str, str]] | None = None) -> dict[str, dict[str, str]]:
    """A voice library: the default, a dict, or a JSON/YAML file mapping voice ids to
    `{description: ..., voice: <espeak voice, e.g. en-us+m3>}`."""
    if library is None:
        return DEFAULT_VOICE_LIBRARY
    if not isinstance(library, dict):
        path = Path(library)
        if not path.is_file():
            raise ToolCallError(f"the voice library {str(library)!r} does not exist")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            library = yaml.safe_load(text)
        else:
            library = json.loads(text)
    if not isinstance(library, dict) or not library:
        raise ToolCallError("the voice library must map voice ids to {description, voice}")
    for voice_id, entry in library.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("description"), str) or not isinstance(entry.get("voice"), str):
            raise ToolCallError(f"voice library entry {voice_id!r} needs a 'description' and a 'voice' (strings)")
    return library


def search_voice(query: str, library: dict[str, dict[str, str]]) -> tuple[str, float]:
    """The voice id whose description (and id) best matches `query` by BM25, and its score."""
    ids = list(library)
    scores = bm25_scores(query, [words(f"{v} {library[v]['description']}") for v in ids])
    best = max(range(len(ids)), key=lambda i: (scores[i], -i))
    return ids[best], scores[best]


@tool(
    "audio_search",
    description="Find a voice by its description (e.g. \"a low calm male voice\"); the rest of the answer is spoken in it.",
    parameters={"query": {"type": "string", "description": "how the voice should sound"}},
    options=("library",),
)
def audio_search_tool(query: str, library: str | dict | None = None) -> ToolOutput:
    voices = load_voice_library(library)
    voice_id, score = search_voice(query, voices)
    if score <= 0:
        raise ToolCallError(
            f"no voice matches {query!r}; the voices: " + "; ".join(v["description"] for v in voices.values())
        )
    entry = voices[voice_id]
    return ToolOutput(f"voice {voice_id}: {entry['description']}", {"voice": entry["voice"], "voice_id": voice_id})
