"""Multi-turn rollouts with tool calls: generate, run the tool, insert its result, go on.

One sample's response grows turn by turn:

    turn 0 (policy)   ... <tool_call>function\\ncalculator\\n{"expression": "347 * 29"}</tool_call>
    inserted          <|EOT|><|BOT|>input\\n10063<|EOT|><|BOT|>assistant\\n
    turn 1 (policy)   10063<|EOT|>

A turn ends at the first `</tool_call>` (the call is then run) or at `<|EOT|>` (the
response is done). The inserted tokens close the assistant turn and render the result
as an `input` turn with the tokenizer's chat template, exactly as `render_prompt` would
render that conversation, so an SFT example of the same exchange and the rollout are
the same token sequence. `Rollout.response_ids` is every turn and every insertion, in
order; `loss_mask` is 1 on the policy's tokens and 0 on inserted ones (their logprob
is 0.0), so the trainer learns only from what the policy wrote while each later turn
is still scored in the context it was generated in.

At most `max_turns` tool calls are run per sample; a call after that ends the response
without running. Each turn may generate up to `sampling.max_new_tokens` tokens. A
tool that fails, or a call the model wrote badly, returns an error text that the model
reads as the `input` turn: generation never stops on a tool error.

Sampling is seeded per (seed, prompt id, sample, turn): turn 0 is exactly what
`Policy.generate` (and so `RolloutWorker.generate`) samples for the same seed, and a
later turn draws from a generator of its own, whatever else is in the batch.

The tool `audio_search` picks a voice: speech in the turns after it is rendered in that
voice (`Rollout.voice`), the turns before it in the detokenizer's default.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from vocalign.data.types import Message, Prompt, Rollout
from vocalign.model import chat
from vocalign.model.policy import Generation, Policy, PromptBatch, Sampling
from vocalign.model.tokenizer import ChatTokenizer

from vocalign.tools import Tool, ToolCallError, ToolResult, parse_tool_call, resolve_tools, run_tool_call


@dataclass
class ToolTrace:
    """One sample's response as it grows: its tokens, which of them the policy wrote,
    the calls it made and the results it was given."""

    prompt_index: int
    sample_index: int
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    turns: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each generated turn
    turn_voices: list[str | None] = field(default_factory=list)  # the voice each turn's speech is rendered in
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    tool_results: list[dict[str, Any]] = field(default_factory=list)
    voice: str | None = None  # the voice chosen by the latest audio_search, None = the default
    pending: str | None = None  # the call that ended the last turn, not run yet
    finished: bool = False  # the last turn was not cut by max_new_tokens

    @property
    def calls_run(self) -> int:
        return len(self.tool_results)

    def add_turn(self, ids: Sequence[int], logprobs: Sequence[float], tokenizer: ChatTokenizer, finished: bool) -> None:
        """Append a turn the policy generated (loss_mask 1), cut just after its first `</tool_call>`.

        `finished` is whether generation stopped on its own (end of turn or a stop token)
        rather than at max_new_tokens. A turn that ends with a tool call leaves it `pending`.
        """
        ids, logprobs = list(ids), list(logprobs)
        if len(ids) != len(logprobs):
            raise ValueError(f"a turn has {len(ids)} tokens but {len(logprobs)} logprobs; give one logprob per token")
        end_id = tokenizer.special[chat.TOOL_CALL_END]
        called = end_id in ids
        if called:
            cut = ids.index(end_id) + 1
            ids, logprobs = ids[:cut], logprobs[:cut]
        start = len(self.response_ids)
        self.response_ids += ids
        self.logprobs += [float(x) for x in logprobs]
        self.loss_mask += [1] * len(ids)
        self.turns.append((start, len(self.response_ids)))
        self.turn_voices.append(self.voice)
        self.finished = finished or called
        self.pending = None
        if called:
            calls = tokenizer.parse_response(ids).tool_calls
            self.pending = calls[-1] if calls else ""  # a </tool_call> with no <tool_call>: an empty call

    def add_tool_result(self, result: ToolResult, tokenizer: ChatTokenizer) -> None:
        """Close the assistant turn and insert `result` as an `input` turn (loss_mask 0, logprob 0)."""
        if self.pending is None:
            raise ValueError("add_tool_result: the last turn did not end with a tool call")
        turn = len(self.turns) - 1
        self.tool_calls.append(_call_record(self.pending, result, turn, executed=True))
        self.tool_results.append({"name": result.name, "ok": result.ok, "text": result.text, "turn": turn, "data": dict(result.data)})
        if result.ok and result.data.get("voice"):
            self.voice = str(result.data["voice"])
        inserted = tool_result_ids(tokenizer, result.text)
        self.response_ids += inserted
        self.logprobs += [0.0] * len(inserted)
        self.loss_mask += [0] * len(inserted)
        self.pending = None

    def end_unrun(self, reason: str) -> None:
        """The last turn's call will not be run (max_turns reached, or it cannot be continued)."""
        if self.pending is not None:
            self.tool_calls.append({**_call_record(self.pending, None, len(self.turns) - 1, executed=False), "reason": reason})
            self.pending = None


def _call_record(raw: str, result: ToolResult | None, turn: int, executed: bool) -> dict[str, Any]:
    name, arguments = (result.name, result.arguments) if result is not None else _parsed_or_none(raw)
    return {"raw": raw, "name": name or None, "arguments": arguments, "turn": turn, "executed": executed}


def _parsed_or_none(raw: str) -> tuple[str | None, dict[str, Any] | None]:
    try:
        return parse_tool_call(raw)
    except ToolCallError as error:
        return error.name or None, None


def tool_result_ids(tokenizer: ChatTokenizer, text: str) -> list[int]:
    """The tokens inserted after a tool call: end the assistant turn, the result as an
    `input` turn, and the start of the next assistant turn (the chat template's rendering)."""
    return [tokenizer.eot_id] + tokenizer.render_prompt([Message("input", text)], [])


def continuation_id(prompt_id: str, sample: int, turn: int) -> str:
    """The id that seeds turn `turn` (>= 1) of sample `sample`: its own random stream."""
    return f"{prompt_id}/sample{sample}/turn{turn}"


def run_pending_tools(
    traces: Sequence[ToolTrace], tokenizer: ChatTokenizer, tools: dict[str, Tool],
    options: dict[str, dict[str, Any]] | None, max_turns: int,
) -> list[ToolTrace]:
    """After a turn: run each pending call (up to `max_turns` per sample), insert its result,
    and return the traces that go on to another turn. Never raises on a call's content."""
    going_on = []
    placeholder = tokenizer.special[chat.AUDIO_PATCH]
    for trace in traces:
        if trace.pending is None:
            continue
        if trace.calls_run >= max_turns:
            trace.end_unrun(f"max_turns={max_turns} tool calls were run already")
            continue
        if placeholder in trace.response_ids:
            # The audio placeholder belongs to prompts: a continuation would look for a clip in it.
            trace.end_unrun("the response contains the audio placeholder token; it cannot be continued")
            continue
        trace.add_tool_result(run_tool_call(trace.pending, tools, options), tokenizer)
        going_on.append(trace)
    return going_on


def continuation_batch(batch: PromptBatch, traces: Sequence[ToolTrace]) -> PromptBatch:
    """The next turn's prompts: each trace's prompt + response so far, one row per trace,
    keeping its prompt's encoded audio; ids that seed it per (prompt, sample, turn)."""
    prompts, ids, encoded = [], [], []
    for t in traces:
        prompt = batch.prompts[t.prompt_index]
        prompts.append(replace(prompt, id=continuation_id(prompt.id, t.sample_index, len(t.turns))))
        ids.append(batch.ids[t.prompt_index] + t.response_ids)
        encoded.append(batch.encoded[t.prompt_index])
    return PromptBatch(prompts, ids, encoded)


def generate_turn(policy: Policy, batch: PromptBatch, n: int, sampling: Sampling, seed: int) -> list[Generation]:
    """One turn for every row, stopping at `</tool_call>` as well as at the end of turn.

    Uses `Policy.generate(..., stop_ids=...)` when the policy has it; otherwise the turn
    runs to its end of turn and `ToolTrace.add_turn` cuts it after the first
    `</tool_call>` (the same tokens, with some generation wasted after the cut).
    """
    stop = policy.tokenizer.special[chat.TOOL_CALL_END]
    if "stop_ids" in inspect.signature(policy.generate).parameters:
        return policy.generate(batch, n, sampling, seed=seed, stop_ids=[stop])
    return policy.generate(batch, n, sampling, seed=seed)


def continue_traces(
    policy: Policy, batch: PromptBatch, traces: Sequence[ToolTrace], sampling: Sampling, seed: int,
    tools: dict[str, Tool], options: dict[str, dict[str, Any]] | None, max_turns: int,
) -> None:
    """Run pending calls and generate further turns until no trace has a call left to run."""
    while True:
        going_on = run_pending_tools(traces, policy.tokenizer, tools, options, max_turns)
        if not going_on:
            return
        gens = generate_turn(policy, continuation_batch(batch, going_on), 1, sampling, seed)
        for trace, gen in zip(going_on, gens):
            trace.add_turn(gen.response_ids, gen.logprobs, policy.tokenizer, gen.finished)


def generate_with_tools(
    policy: Policy, prompts: list[Prompt], n: int, sampling: Sampling, seed: int, tools: Sequence[str],
    max_turns: int, render_speech: bool = True, tool_options: dict[str, dict[str, Any]] | None = None,
    weight_version: int = 0,
) -> list[Rollout]:
    """`n` multi-turn rollouts per prompt, grouped by prompt (rollout i*n+j is sample j of prompt i).

    `tools` are the enabled tools (names or `package.module:function`), checked before
    anything is generated; `tool_options[name]` are a tool's operator settings (e.g.
    `{"retrieval": {"root": "docs/"}}`). At most `max_turns` calls run per sample.
    """
    if max_turns < 0:
        raise ValueError(f"max_turns={max_turns} must be >= 0 (the most tool calls run per response)")
    enabled = resolve_tools(tools)
    unknown = sorted(set(tool_options or {}) - set(enabled))
    if unknown:
        raise ValueError(f"tool_options name tools that are not enabled: {unknown}; enabled: {sorted(enabled)}")
    batch = policy.encode_prompts(prompts)
    traces = [ToolTrace(i, j) for i in range(len(prompts)) for j in range(n)]
    for trace, gen in zip(traces, generate_turn(policy, batch, n, sampling, seed)):
        trace.add_turn(gen.response_ids, gen.logprobs, policy.tokenizer, gen.finished)
    continue_traces(policy, batch, traces, sampling, seed, enabled, tool_options, max_turns)
    return [to_rollout(policy, batch, t, render_speech, weight_version) for t in traces]


def to_rollout(policy: Policy, batch: PromptBatch, trace: ToolTrace, render_speech: bool, weight_version: int = 0) -> Rollout:
    """The finished trace as a Rollout: the answer is the last turn's text; speech, thinking
    and audio tokens are gathered from every turn, each turn's speech in its own voice."""
    tok = policy.tokenizer
    parsed = [tok.parse_response(trace.response_ids[a:b]) for a, b in trace.turns]
    last = parsed[-1]
    audio = [u for p in parsed for u in p.audio_ids]
    waveform, rate = None, 0
    if render_speech and audio and policy.detokenizer is not None:
        pieces = []
        for p, voice in zip(parsed, trace.turn_voices):
            if p.audio_ids:
                clip = policy.detokenizer.render(p.audio_ids, voice=voice)
                pieces.append(clip.waveform)
                rate = clip.sample_rate
        waveform = np.concatenate(pieces).astype(np.float32, copy=False)
    calls = list(trace.tool_calls)
    if trace.pending is not None:  # a call in the last turn that was never run
        calls.append(_call_record(trace.pending, None, len(trace.turns) - 1, executed=False))
    return Rollout(
        prompt=batch.prompts[trace.prompt_index], text=last.text,
        think="\n".join(p.think for p in parsed if p.think), spoken_text=" ".join(p.spoken_text for p in parsed if p.spoken_text),
        audio_tokens=audio, waveform=waveform, sample_rate=rate, prompt_ids=batch.ids[trace.prompt_index],
        response_ids=list(trace.response_ids), logprobs=list(trace.logprobs), weight_version=weight_version,
        group=trace.prompt_index, finished=trace.finished, tool_calls=calls, raw_text=tok.decode_raw(trace.response_ids),
        think_tokens=sum(p.think_tokens for p in parsed), loss_mask=list(trace.loss_mask),
        tool_results=list(trace.tool_results), voice=trace.voice,
    )
