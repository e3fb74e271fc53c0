"""Response format: are the required parts present, in order, and every tag well formed?

The reward reads `Rollout.raw_text`, the response as the model wrote it, tags included
(Step-Audio 2's chat format, see `vocalign.model.chat`):

    <think>three plus four</think>7<tts_start>seven<audio_12>…<tts_end><|EOT|>

A response is made of blocks and free text. The parts a recipe can require:
- `think`: a `<think>…</think>` block;
- `text`: visible free text, outside every block (an `<answer>` block is not free text);
- `answer`: an `<answer>…</answer>` block (plain-text tags, lower case, as the model writes them);
- `speech`: a `<tts_start>…<tts_end>` block;
- `tool_call`: a `<tool_call>function\\n{name}\\n{json}</tool_call>` block.

Each response gets seven checks (`FORMAT_CHECKS`), all judged on the text before the first
`<|EOT|>`:
- `finished`: the response ends with `<|EOT|>` (it was not cut by max_new_tokens);
- `well_formed`: every block is closed, no block opens inside another (blocks never nest),
  no closing tag without its opening one, and no tag out of place (audio tokens or
  `<tts_pad>` outside speech; `<|BOT|>`, `<audio_start>`, `<audio_patch>`, `<audio_end>`,
  `<|pad|>` anywhere, since they belong to prompts);
- `single_blocks`: at most one think, one answer and one speech block (tool calls may repeat);
- `non_empty`: every block has content: think and answer some non-space text, speech at
  least one audio token, tool calls a body;
- `tool_calls_parse`: every tool call reads `function`, a name (letters, digits, `_ . -`)
  and a JSON object of arguments, one per line;
- `required_present`: every required part occurs at least once;
- `required_order`: the required parts that occur start in the required order (by their
  first occurrence), and when `think` is required first, only whitespace comes before it.

Parts that are not required may occur anywhere, but must be well formed too. The score
is 1.0 when all checks hold, else 0.0; with `partial=True` it is the fraction of the
seven checks that hold (checks with nothing to judge, such as `tool_calls_parse` on a
response without tool calls, hold).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields

from vocalign.data.types import Rollout
from vocalign.rewards.registry import reward

PARTS = ("think", "text", "answer", "speech", "tool_call")
FORMAT_CHECKS = (
    "finished", "well_formed", "single_blocks", "non_empty", "tool_calls_parse", "required_present", "required_order",
)

# Block kind -> (opening tag, closing tag).
_BLOCKS = {
    "think": ("<think>", "</think>"),
    "answer": ("<answer>", "</answer>"),
    "speech": ("<tts_start>", "<tts_end>"),
    "tool_call": ("<tool_call>", "</tool_call>"),
}
_OPENS = {open_tag: kind for kind, (open_tag, _) in _BLOCKS.items()}
_CLOSES = {close_tag: kind for kind, (_, close_tag) in _BLOCKS.items()}
_SINGLE = ("think", "answer", "speech")
_EOT = "<|EOT|>"
_AUDIO = re.compile(r"<audio_\d+>")
_SPEECH_ONLY = re.compile(r"<audio_\d+>|<tts_pad>")
_PROMPT_ONLY = ("<|BOT|>", "<audio_start>", "<audio_patch>", "<audio_end>", "<|pad|>")
_TAG = re.compile("|".join(re.escape(t) for t in [*_OPENS, *_CLOSES, *_PROMPT_ONLY, "<tts_pad>"]) + r"|<audio_\d+>")
_TOOL_NAME = re.compile(r"[A-Za-z_][\w.\-]*")


@dataclass(frozen=True)
class Block:
    """One tagged block of a response: its kind, where it starts and its content."""

    kind: str
    start: int
    content: str
    closed: bool


@dataclass(frozen=True)
class FormatReport:
    """Which format checks one response passes (see the module doc for each)."""

    finished: bool
    well_formed: bool
    single_blocks: bool
    non_empty: bool
    tool_calls_parse: bool
    required_present: bool
    required_order: bool

    @property
    def passed(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    @property
    def failed(self) -> list[str]:
        return [f.name for f in fields(self) if not getattr(self, f.name)]


def check_format(raw_text: str, require: Sequence[str] = (), finished: bool = True) -> FormatReport:
    """The format checks of one response, `raw_text` as the model wrote it, tags included.

    `finished` is False when generation was cut (`Rollout.finished`); the response then
    fails `finished` even if `<|EOT|>` happens to be in it.
    """
    require = _check_require(require)
    body, eot, after = raw_text.partition(_EOT)
    blocks, free_text, well_formed = _parse(body)
    positions = _first_positions(blocks, free_text)
    present = [part for part in require if part in positions]
    starts = [positions[part] for part in present]
    think_late = bool(require) and require[0] == "think" and bool(body[: positions.get("think", 0)].strip())
    return FormatReport(
        finished=finished and bool(eot) and not after.replace("<|pad|>", "").strip(),
        well_formed=well_formed,
        single_blocks=all(sum(b.kind == kind for b in blocks) <= 1 for kind in _SINGLE),
        non_empty=all(_has_content(b) for b in blocks),
        tool_calls_parse=all(_parses_as_tool_call(b.content) for b in blocks if b.kind == "tool_call"),
        required_present=len(present) == len(require),
        required_order=starts == sorted(set(starts)) and not think_late,
    )


@reward("format")
def format_reward(
    rollouts: list[Rollout], *, require: Sequence[str] = ("think", "text", "speech"), partial: bool = False
) -> list[float | None]:
    """1.0 when the required parts are present, in order, and every tag is well formed, else 0.0.

    `require` lists the parts in their order: think, text, answer, speech, tool_call
    (default: think, then visible text, then speech, as Step-Audio 2 answers). With
    `partial`, the score is the fraction of the seven checks passed. Reads
    `Rollout.raw_text`; see `vocalign.rewards.format` for every check.
    """
    require = _check_require(require)
    scores: list[float | None] = []
    for rollout in rollouts:
        if not rollout.raw_text:
            raise ValueError(
                f"rollout of prompt {rollout.prompt.id!r} has an empty raw_text; the format reward needs the "
                "response as written, tags included: set Rollout.raw_text in the rollout worker "
                "(tokenizer.decode_raw(response_ids))"
            )
        report = check_format(rollout.raw_text, require, rollout.finished)
        passed = report.passed / len(FORMAT_CHECKS)
        scores.append(passed if partial else float(passed == 1.0))
    return scores


def _check_require(require: Sequence[str] | str) -> tuple[str, ...]:
    """`require` as a tuple of known part names; a single name may be given as a string."""
    parts = (require,) if isinstance(require, str) else tuple(require)
    for part in parts:
        if part not in PARTS:
            close = difflib.get_close_matches(str(part), PARTS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(
                f"format reward: require={list(parts)!r} names the unknown part {part!r}; {hint}"
                f"known parts: {', '.join(PARTS)}"
            )
    repeated = sorted({p for p in parts if parts.count(p) > 1})
    if repeated:
        raise ValueError(
            f"format reward: require={list(parts)!r} names {', '.join(repeated)} more than once; "
            "name each part once, in the order it must come"
        )
    return parts


def _parse(body: str) -> tuple[list[Block], list[tuple[int, str]], bool]:
    """The blocks of `body`, its stretches of free text (start, text), and whether its tags are well formed.

    Blocks never nest: a tag that opens a block inside another is kept as content of the
    outer block (and makes the response not well formed), so later checks still see the
    blocks the model meant.
    """
    blocks: list[Block] = []
    free: list[tuple[int, str]] = []
    well_formed = True
    open_kind, open_at, content_from, cursor = None, 0, 0, 0
    for match in _TAG.finditer(body):
        tag = match.group()
        if open_kind is None:
            free.append((cursor, body[cursor : match.start()]))
            cursor = match.end()
            if tag in _OPENS:
                open_kind, open_at, content_from = _OPENS[tag], match.start(), match.end()
            else:  # a closing tag with nothing open, or a tag that belongs inside speech or prompts
                well_formed = False
        elif tag == _BLOCKS[open_kind][1]:
            blocks.append(Block(open_kind, open_at, body[content_from : match.start()], closed=True))
            open_kind, cursor = None, match.end()
        elif tag in _OPENS or tag in _CLOSES or tag in _PROMPT_ONLY or (
            open_kind != "speech" and _SPEECH_ONLY.fullmatch(tag)
        ):
            well_formed = False
    if open_kind is not None:
        blocks.append(Block(open_kind, open_at, body[content_from:], closed=False))
        well_formed = False
    else:
        free.append((cursor, body[cursor:]))
    return blocks, free, well_formed


def _first_positions(blocks: list[Block], free_text: list[tuple[int, str]]) -> dict[str, int]:
    """Where each part first occurs: a block's opening tag, free text's first non-space character."""
    positions: dict[str, int] = {}
    for block in blocks:
        positions.setdefault(block.kind, block.start)
    for start, text in free_text:
        if text.strip():
            positions.setdefault("text", start + len(text) - len(text.lstrip()))
            break
    return positions


def _has_content(block: Block) -> bool:
    if block.kind == "speech":
        return bool(_AUDIO.search(block.content))
    return bool(block.content.strip())


def _parses_as_tool_call(content: str) -> bool:
    """`function\\n{name}\\n{json object}`, as Step-Audio 2 writes a tool call."""
    lines = content.strip().split("\n", 2)
    if len(lines) != 3 or lines[0].strip() != "function" or not _TOOL_NAME.fullmatch(lines[1].strip()):
        return False
    try:
        arguments = json.loads(lines[2])
    except json.JSONDecodeError:
        return False
    return isinstance(arguments, dict)
