"""A synthetic tool-use task: questions that need a tool, with the call and answer to learn.

`tool_use(n, seed, ...)` (registered in `vocalign.data.tasks.TASKS` as "tool_use")
draws `n` questions of the kinds asked for:
- `calculator`: "347 times 29 is how much?" (plus, minus, times, divided by; exact
  division; spoken: "what is three hundred forty seven times twenty nine"). meta: `answer` (int), `expected_tool` "calculator", `expected_args`
  {"expression": "347 * 29"}.
- `audio_search`: 'say "the red cup is on the table" in a deep male voice'. meta:
  `expected_tool` "audio_search", `expected_args` {"query": "a deep male voice"},
  `text` (what to say), `voice` (the espeak voice the default library picks for the
  query) and `voice_id`; no `answer`.

A prompt's turns: an optional `tool_json_schemas` turn describing the tools, then the
human question, as text or spoken (`spoken=True`, espeak-ng as in the other synthetic
tasks). Which rows a question gives is `rows`:
- "call" (the default, for RL): the question; its `target` is the first assistant turn,
  the tool call;
- "answer": the turn after the call: the conversation so far (the question, the
  assistant's call, the tool's result as an `input` turn) with the answer as target;
- "both": the two, call row first.
The call and answer rows together teach, by plain SFT, the whole exchange a multi-turn
rollout produces (`vocalign.rollouts.multiturn` renders it token for token the same
way). Answer targets are short (a number) next to a call's ~33 tokens, so a recipe may
add "answer" rows to give the answer turn more weight in the SFT loss.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from vocalign.data.espeak import Voice
from vocalign.data.render import MAX_CLIP_SECONDS, attach_audio, draw_clip
from vocalign.data.speakers import Conditions, resolve_voices
from vocalign.data.synthetic import number_to_words, sentence
from vocalign.data.tasks import check_count, task
from vocalign.data.types import Message, Prompt, Response
from vocalign.tools import (
    DEFAULT_VOICE_LIBRARY,
    format_tool_call,
    get_tool,
    run_tool_call,
    search_voice,
)

TOOL_TASK_KINDS = ("calculator", "audio_search")
CALCULATOR_OPS = {"plus": "+", "minus": "-", "times": "*", "divided by": "/"}

# How a voice is asked for, per voice id of the default library (each is checked to find
# its own voice with audio_search in the tests).
VOICE_REQUESTS: dict[str, tuple[str, ...]] = {
    "deep_male": ("a deep male voice", "a very deep voice"),
    "low_male": ("a low calm male voice", "a calm male voice"),
    "neutral_male": ("a neutral male voice", "a clear neutral voice"),
    "lively_male": ("a lively male voice", "an expressive male voice"),
    "old_male": ("an old man's voice", "a grandfather's voice"),
    "warm_female": ("a warm female voice", "a warm low female voice"),
    "high_female": ("a high female voice", "a high pitched female voice"),
    "bright_female": ("a cheerful female voice", "a bright young female voice"),
    "old_female": ("an old woman's voice", "a grandmother's voice"),
    "whisper": ("a whisper", "a whispering voice"),
    "croaky": ("a croaky voice", "a hoarse voice"),
}
DESCRIBE_TOOLS = ("json", "names", "none")
ROWS = ("call", "answer", "both")


def tools_message(tools: Sequence[str], describe: str) -> Message | None:
    """The `tool_json_schemas` turn that tells the model its tools: full JSON schemas
    ("json"), just each name with its argument names ("names", far fewer tokens), or none."""
    if describe not in DESCRIBE_TOOLS:
        raise ValueError(f"describe_tools={describe!r} is not known; use one of {', '.join(DESCRIBE_TOOLS)}")
    if describe == "none" or not tools:
        return None
    found = [get_tool(t) for t in tools]
    if describe == "json":
        return Message("tool_json_schemas", json.dumps([t.schema() for t in found]))
    return Message("tool_json_schemas", json.dumps([{"name": t.name, "arguments": list(t.parameters["properties"])} for t in found]))


@task("tool_use")
def tool_use(
    n: int,
    seed: int,
    *,
    kinds: Sequence[str] = ("calculator",),
    max_operand: int = 999,
    ops: Sequence[str] = tuple(CALCULATOR_OPS),
    spoken: bool = False,
    describe_tools: str = "names",
    rows: str = "call",
    speak_answer: bool = False,
    voices: str | Sequence[str | Voice] = "train",
    prosody: str = "train",
    warp: str = "train",
    noise: str = "train",
    sample_rate: int = 16000,
    max_seconds: float = MAX_CLIP_SECONDS,
) -> list[Prompt]:
    """`n` questions that need a tool (kinds drawn uniformly from `kinds`); see the module doc.

    `max_operand` bounds the calculator's operands (the second factor of a product stays
    below 100 and a divisor below 20, so the questions stay short); `ops` picks among
    plus, minus, times, divided by. `spoken` speaks the question (numbers in words)
    instead of writing it; long questions may exceed `max_seconds`, which is an error
    (use a smaller max_operand). `describe_tools` is how the prompt lists the tools (see
    `tools_message`). `speak_answer` makes the answer turn also say the result in speech.
    `rows` is "call", "answer" or "both" (see the module doc); with "both" the call gives
    2n prompts.
    """
    _check_tool_use(n, kinds, ops, rows, max_operand)
    speakers = resolve_voices(voices) if spoken else []
    conditions = Conditions(prosody, warp, noise)
    header = tools_message(sorted(set(kinds)), describe_tools)
    rng = np.random.default_rng(seed)
    questions, clips = [], []
    for i in range(n):
        kind = kinds[int(rng.integers(len(kinds)))]
        if kind == "calculator":
            q = _calculator_question(rng, max_operand, ops)
        else:
            q = _voice_question(rng)
        questions.append(q)
        if spoken:
            clips.append(draw_clip(rng, q["spoken"], speakers, conditions=conditions))
    prompts = [
        Prompt(
            id=f"tool_use-{seed}-{i}",
            messages=([header] if header else []) + [Message("human", "" if spoken else q["written"])],
            task="tool_use", meta=q["meta"],
            target=Response(text=format_tool_call(q["meta"]["expected_tool"], q["meta"]["expected_args"])),
        )
        for i, q in enumerate(questions)
    ]
    if spoken:
        prompts = attach_audio(prompts, clips, sample_rate, max_seconds, seed)
    if rows == "call":
        return prompts
    out = []
    for prompt, q in zip(prompts, questions):
        answer_row = _answer_row(prompt, q, speak_answer)
        out += [prompt, answer_row] if rows == "both" else [answer_row]
    return out


def _check_tool_use(n: int, kinds: Sequence[str], ops: Sequence[str], rows: str, max_operand: int) -> None:
    check_count(n, "tool_use")
    if rows not in ROWS:
        raise ValueError(f"tool_use: rows={rows!r} is not known; use one of {', '.join(ROWS)}")
    bad = [k for k in kinds if k not in TOOL_TASK_KINDS] or ([] if kinds else ["(none)"])
    if bad:
        raise ValueError(f"tool_use: kinds={list(kinds)!r}: use one or more of {', '.join(TOOL_TASK_KINDS)}")
    bad_ops = [o for o in ops if o not in CALCULATOR_OPS] or ([] if ops else ["(none)"])
    if bad_ops:
        raise ValueError(f"tool_use: ops={list(ops)!r}: use one or more of {', '.join(CALCULATOR_OPS)}")
    if max_operand < 2:
        raise ValueError(f"tool_use: max_operand={max_operand} must be at least 2")


def _answer_row(prompt: Prompt, question: dict, speak_answer: bool) -> Prompt:
    """The row after the tool call: the call and its result in the context, the answer as target."""
    meta, call = prompt.meta, prompt.target.text
    result = run_tool_call(call, [meta["expected_tool"]])
    if not result.ok:  # the task drew a question its own tool cannot answer: a bug here
        raise RuntimeError(f"tool_use: the reference call {call!r} failed: {result.text}")
    return Prompt(
        id=f"{prompt.id}-answer",
        messages=[*prompt.messages, Message("assistant", call), Message("input", result.text)],
        task="tool_use", meta={**meta, "tool_result": result.text}, target=_answer(question, speak_answer),
    )


def _calculator_question(rng: np.random.Generator, max_operand: int, ops: Sequence[str]) -> dict:
    op = ops[int(rng.integers(len(ops)))]
    if op == "times":
        a, b = int(rng.integers(2, max_operand + 1)), int(rng.integers(2, min(99, max_operand) + 1))
        answer = a * b
    elif op == "divided by":
        b = int(rng.integers(2, min(19, max_operand) + 1))
        answer = int(rng.integers(2, max(3, max_operand // b + 1)))
        a = answer * b
    else:
        a, b = (int(x) for x in rng.integers(0, max_operand + 1, size=2))
        if op == "minus" and b > a:
            a, b = b, a
        answer = a + b if op == "plus" else a - b
    return {
        # The operands lead the written question, as they lead the call's expression: with
        # a byte-level BPE, "347" after a space and after a quote are different tokens, so
        # "what is 347 ..." would make a small model translate the number, not copy it.
        "written": f"{a} {op} {b} is how much?",
        "spoken": f"what is {number_to_words(a)} {op} {number_to_words(b)}",
        "answer_text": str(answer), "answer_words": number_to_words(answer),
        "meta": {"answer": answer, "operands": [a, b], "op": op, "expected_tool": "calculator",
                 "expected_args": {"expression": f"{a} {CALCULATOR_OPS[op]} {b}"}},
    }


def _voice_question(rng: np.random.Generator) -> dict:
    ids = list(VOICE_REQUESTS)
    voice_id = ids[int(rng.integers(len(ids)))]
    request = VOICE_REQUESTS[voice_id][int(rng.integers(len(VOICE_REQUESTS[voice_id])))]
    text = sentence(rng)
    found, _ = search_voice(request, DEFAULT_VOICE_LIBRARY)
    return {
        "written": f'say "{text}" in {request}',
        "spoken": f"say {text} in {request}",
        "text": text,
        "meta": {"expected_tool": "audio_search", "expected_args": {"query": request}, "text": text,
                 "voice_id": found, "voice": DEFAULT_VOICE_LIBRARY[found]["voice"]},
    }


def _answer(question: dict, speak: bool) -> Response:
    if question["meta"]["expected_tool"] == "audio_search":
        return Response(text="", speech=question["text"])
    return Response(text=question["answer_text"], speech=question["answer_words"] if speak else None)
