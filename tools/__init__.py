"""Tools a policy can call during a rollout, and the registry that finds them.

The bottom layer: `data` (tool-use tasks), `rollouts` (multi-turn generation) and
`rewards` (tool-call rewards) all import it; it imports nothing of vocalign but `common`.

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

from .registry import (
    MAX_RESULT_CHARS,
    Tool,
    ToolCallError,
    ToolOutput,
    ToolResult,
    format_tool_call,
    get_tool,
    list_tools,
    parse_tool_call,
    resolve_tools,
    run_tool_call,
    tool,
    tool_schemas,
)
from .calculator import calculate, format_number  # noqa: E402  (registers `calculator`)
from .clock import parse_utc_offset  # noqa: E402  (registers `datetime`)
from .retrieval import retrieve  # noqa: E402  (registers `retrieval`)
from .voice_library import DEFAULT_VOICE_LIBRARY, load_voice_library, search_voice  # noqa: E402  (registers `audio_search`)

__all__ = [
    "DEFAULT_VOICE_LIBRARY", "MAX_RESULT_CHARS", "Tool", "ToolCallError", "ToolOutput", "ToolResult", "calculate",
    "format_number", "format_tool_call", "get_tool", "list_tools", "load_voice_library", "parse_tool_call",
    "parse_utc_offset", "resolve_tools", "retrieve", "run_tool_call", "search_voice", "tool", "tool_schemas",
]
