"""Tool-use rewards: did the response call the tool the prompt needs, with the right arguments?

The reference is in the prompt's meta: `expected_tool` (a tool name) and
`expected_args` (a dict), as the `tool_use` task writes them. The calls are read from
`Rollout.tool_calls` (every call the response wrote, run or not; a multi-turn rollout
records each one's parsed name and arguments, a single-turn one only its raw text,
parsed here). The final answer is scored by `correctness`, which reads `Rollout.text`:
for a multi-turn rollout that is the text of the last turn, after the tool results.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from vocalign.data.types import Rollout
from vocalign.rewards.registry import reward
from vocalign.tools import ToolCallError, format_tool_call, parse_tool_call, run_tool_call

COMPARE_MODES = ("exact", "normalized", "result")


def calls_of(rollout: Rollout) -> list[tuple[str | None, dict[str, Any] | None]]:
    """(name, arguments) of every call in the rollout; None where it could not be read."""
    out = []
    for call in rollout.tool_calls:
        if "name" in call or "arguments" in call:
            out.append((call.get("name"), call.get("arguments")))
            continue
        try:
            out.append(parse_tool_call(call.get("raw", "")))
        except ToolCallError as error:
            out.append((error.name or None, None))
    return out


def normalized(value: Any) -> Any:
    """An argument value compared loosely: strings without case or whitespace, numbers by value."""
    if isinstance(value, str):
        return "".join(value.casefold().split())
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [normalized(v) for v in value]
    if isinstance(value, dict):
        return {str(k): normalized(v) for k, v in value.items()}
    return value


def same_arguments(
    name: str, given: dict[str, Any] | None, expected: dict[str, Any], compare: str,
    tool_options: dict[str, dict[str, Any]] | None = None,
) -> bool:
    """Whether the arguments match: `exact` (equal as JSON values), `normalized` (see
    `normalized`), or `result` (normalized, or running both calls gives the same text, so
    "29 * 347" matches "347 * 29")."""
    if given is None:
        return False
    if compare == "exact":
        return given == expected
    if normalized(given) == normalized(expected):
        return True
    if compare != "result":
        return False
    mine = run_tool_call(format_tool_call(name, given), [name], tool_options)
    reference = run_tool_call(format_tool_call(name, expected), [name], tool_options)
    return mine.ok and reference.ok and mine.text == reference.text


@reward("tool_call")
def tool_call(
    rollouts: list[Rollout], *, name_credit: float = 0.5, compare: str = "normalized", extra_call_penalty: float = 0.0,
    tool_options: dict[str, dict[str, Any]] | None = None,
) -> list[float | None]:
    """1.0 when the response called meta's expected_tool with its expected_args; None without expected_tool.

    A call of the right tool with other arguments earns `name_credit` (0 for all or
    nothing); the best call counts. `compare` says how arguments match: exact,
    normalized (case and spaces ignored, numbers by value) or result (the calls give the
    same result; `tool_options` configure the tools for that). Each call beyond the first
    costs `extra_call_penalty` (the score stays >= 0). When meta's expected_tool is
    None or "", no call is expected: 1.0 without calls, else 0.0.
    """
    if compare not in COMPARE_MODES:
        raise ValueError(f"tool_call reward: compare={compare!r} is not known; use one of {', '.join(COMPARE_MODES)}")
    if not 0.0 <= name_credit <= 1.0:
        raise ValueError(f"tool_call reward: name_credit={name_credit} must be in [0, 1]")
    scores: list[float | None] = []
    for rollout in rollouts:
        if "expected_tool" not in rollout.meta:
            scores.append(None)
            continue
        expected_tool = rollout.meta["expected_tool"]
        calls = calls_of(rollout)
        if not expected_tool:
            scores.append(0.0 if calls else 1.0)
            continue
        expected_args = rollout.meta.get("expected_args") or {}
        best = 0.0
        for name, arguments in calls:
            if name != expected_tool:
                continue
            right = same_arguments(name, arguments, expected_args, compare, tool_options)
            best = max(best, 1.0 if right else name_credit)
        scores.append(max(0.0, best - extra_call_penalty * max(0, len(calls) - 1)))
    return scores

