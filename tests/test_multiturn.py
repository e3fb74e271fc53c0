"""Multi-turn rollouts with tools, on the embedded policy.

An untrained model almost never writes a tool call, so the calls here are given: either
a prepared first turn fed through the same continuation code a rollout uses, or a
`ScriptedPolicy` whose turns come from a script when it has one for that turn and from
the real model otherwise. Every later turn the script leaves open is sampled by the real
model, in the context the continuation built.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vocalign.data.tool_tasks import tool_use
from vocalign.data.types import Message, Prompt, Response
from vocalign.model import chat
from vocalign.model.loading import embedded_policy
from vocalign.model.policy import Generation, Policy, Sampling
from vocalign.rewards import RewardSpec, score
from vocalign.rollouts.multiturn import (
    ToolTrace,
    continue_traces,
    generate_turn,
    generate_with_tools,
    run_pending_tools,
    to_rollout,
    tool_result_ids,
)
from vocalign.tools import format_tool_call, resolve_tools
from vocalign.rollouts.worker import RolloutWorker

SAMPLING = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=8)
CALC = resolve_tools(["calculator"])


@pytest.fixture(scope="module")
def policy() -> Policy:
    return embedded_policy(seed=0)


def ids(policy: Policy, text: str, end: bool = True) -> list[int]:
    """Ids of a turn written as text, tags included, ending with <|EOT|> when `end`."""
    return policy.tokenizer.text_ids(text) + ([policy.tokenizer.eot_id] if end else [])


class ScriptedPolicy(Policy):
    """The embedded policy, except that a row whose prompt id is in `script` generates
    the script's text or ids (logprob -0.5 per token); the others sample from the model."""

    def __init__(self, base: Policy, script: dict[str, str | list[int]]) -> None:
        super().__init__(base.model, base.tokenizer, base.detokenizer)
        self.script = script
        self.seen: list[str] = []

    def generate(self, batch, n, sampling, seed=0):
        gens = super().generate(batch, n, sampling, seed)
        out = []
        for g in gens:
            row_id = batch.prompts[g.prompt_index].id + ("" if n == 1 else f"#{g.sample_index}")
            self.seen.append(row_id)
            if row_id in self.script:
                turn = self.script[row_id]
                scripted = turn if isinstance(turn, list) else ids(self, turn, end=not turn.endswith("</tool_call>"))
                g = Generation(g.prompt_index, g.sample_index, scripted, [-0.5] * len(scripted), True)
            out.append(g)
        return out


def question(pid: str = "q") -> Prompt:
    return Prompt(pid, [Message("human", "what is 347 times 29?")], task="tool_use",
                  meta={"answer": 10063, "expected_tool": "calculator", "expected_args": {"expression": "347 * 29"}})


CALL = format_tool_call("calculator", {"expression": "347 * 29"})


# --- the continuation step, with given ids --------------------------------------------------


def test_inserted_result_renders_like_the_chat_template_and_like_the_sft_rows(policy):
    """Prompt + (call, inserted result) is token for token what the SFT answer row renders."""
    call_row, answer_row = tool_use(1, seed=5, rows="both")
    tok = policy.tokenizer
    batch = policy.encode_prompts([call_row])
    trace = ToolTrace(0, 0)
    trace.add_turn(ids(policy, call_row.target.text), [0.0] * len(ids(policy, call_row.target.text)), tok, True)
    # the call ends the turn: the <|EOT|> after </tool_call> was cut, the call waits to run
    assert trace.response_ids == ids(policy, call_row.target.text, end=False)
    assert trace.pending == call_row.target.text.removeprefix("<tool_call>").removesuffix("</tool_call>")
    assert run_pending_tools([trace], tok, CALC, None, max_turns=2) == [trace]
    rendered = policy.encode_prompts([answer_row]).ids[0]
    assert batch.ids[0] + trace.response_ids == rendered
    inserted = tool_result_ids(tok, answer_row.meta["tool_result"])
    assert tok.decode_raw(inserted) == f"<|EOT|><|BOT|>input\n{answer_row.meta['answer']}<|EOT|><|BOT|>assistant\n"
    assert trace.loss_mask == [1] * (len(trace.response_ids) - len(inserted)) + [0] * len(inserted)
    assert trace.tool_results == [{"name": "calculator", "ok": True, "text": str(answer_row.meta["answer"]), "turn": 0, "data": {}}]


def test_next_turn_is_sampled_in_the_built_context_and_masked_right(policy):
    tok = policy.tokenizer
    prompt = question()
    batch = policy.encode_prompts([prompt])
    trace = ToolTrace(0, 0)
    first = ids(policy, CALL, end=False)
    trace.add_turn(first, [-1.0] * len(first), tok, True)
    continue_traces(policy, batch, [trace], SAMPLING, seed=3, tools=CALC, options=None, max_turns=1)
    rollout = to_rollout(policy, batch, trace, render_speech=False)
    inserted = tool_result_ids(tok, "10063")
    n1, n2 = len(first), len(inserted)
    second = rollout.response_ids[n1 + n2 :]
    assert rollout.response_ids[:n1] == first and rollout.response_ids[n1 : n1 + n2] == inserted and second
    assert rollout.loss_mask == [1] * n1 + [0] * n2 + [1] * len(second)
    assert rollout.logprobs[n1 : n1 + n2] == [0.0] * n2
    # the sampled turn's logprobs are those of the training forward over the whole response
    seq = policy.sequences([rollout.prompt_ids], [rollout.response_ids], batch.encoded)
    with torch.no_grad():
        trained = policy.logprobs(seq)[0, n1 + n2 :]
    assert torch.allclose(trained, torch.tensor(rollout.logprobs[n1 + n2 :]), atol=1e-4)
    assert rollout.tool_calls == [{"raw": CALL[11:-12], "name": "calculator", "arguments": {"expression": "347 * 29"},
                                   "turn": 0, "executed": True}]
    assert rollout.raw_text.startswith(CALL + "<|EOT|><|BOT|>input\n10063<|EOT|><|BOT|>assistant\n")


# --- whole rollouts, scripted calls ---------------------------------------------------------


def test_final_answer_is_the_last_turn_and_rewards_read_it(policy):
    scripted = ScriptedPolicy(policy, {
        "right": CALL, "right/sample0/turn1": "10063",
        "early": "10063 " + CALL, "early/sample0/turn1": "5",
        "none": "10063",
    })
    prompts = [question("right"), question("early"), question("none")]
    rollouts = generate_with_tools(scripted, prompts, 1, SAMPLING, 0, ["calculator"], max_turns=2, render_speech=False)
    assert [r.text for r in rollouts] == ["10063", "5", "10063"]
    scores = score(rollouts, [RewardSpec("correctness"), RewardSpec("tool_call")])
    assert scores.components["correctness"] == [1.0, 0.0, 1.0]  # the answer before the call does not count
    assert scores.components["tool_call"] == [1.0, 1.0, 0.0]
    assert rollouts[2].loss_mask == [1] * len(rollouts[2].response_ids) and rollouts[2].tool_results == []
    assert all(r.finished for r in rollouts)


def test_max_turns_is_respected_and_the_extra_call_is_not_run(policy):
    again = format_tool_call("calculator", {"expression": "1 + 1"})
    script = {"q": again, "q/sample0/turn1": again, "q/sample0/turn2": again, "q/sample0/turn3": "2"}
    for max_turns in (0, 1, 2):
        rollout, = generate_with_tools(ScriptedPolicy(policy, script), [question()], 1, SAMPLING, 0, ["calculator"],
                                       max_turns=max_turns, render_speech=False)
        assert len(rollout.tool_results) == max_turns
        assert [c["executed"] for c in rollout.tool_calls] == [True] * max_turns + [False]
        assert rollout.response_ids[-1] == policy.tokenizer.special[chat.TOOL_CALL_END]  # ends on the unrun call
        assert rollout.loss_mask.count(0) == max_turns * len(tool_result_ids(policy.tokenizer, "2"))


def test_a_tool_error_is_the_input_turn_and_generation_goes_on(policy):
    bad = format_tool_call("calculator", {"expression": "__import__('os').system('ls')"})
    script = {"q": bad, "q/sample0/turn1": "sorry"}
    unknown = {"q": format_tool_call("shell", {"cmd": "ls"}), "q/sample0/turn1": "sorry"}
    for s, text in [(script, "error: only numbers, + - * / // % ** and parentheses are allowed; found a function call"),
                    (unknown, "error: there is no tool 'shell'; the tools are: calculator")]:
        rollout, = generate_with_tools(ScriptedPolicy(policy, s), [question()], 1, SAMPLING, 0, ["calculator"], 2, False)
        assert rollout.tool_results[0]["ok"] is False and rollout.tool_results[0]["text"] == text
        assert f"<|BOT|>input\n{text}<|EOT|><|BOT|>assistant\nsorry<|EOT|>" in rollout.raw_text
        assert rollout.text == "sorry"


def test_scripted_call_then_sampled_turns_are_deterministic_and_batch_independent(policy):
    script = {f"{p}#{j}": CALL for p in ("a", "b") for j in range(2)}
    run = lambda prompts, seed: generate_with_tools(  # noqa: E731
        ScriptedPolicy(policy, script), prompts, 2, SAMPLING, seed, ["calculator"], 1, False)
    both = run([question("a"), question("b")], seed=7)
    again = run([question("a"), question("b")], seed=7)
    alone = run([question("b")], seed=7)
    other = run([question("a"), question("b")], seed=8)
    key = lambda r: (r.response_ids, r.logprobs, r.loss_mask)  # noqa: E731
    assert [key(r) for r in both] == [key(r) for r in again]
    assert [key(r) for r in both[2:]] == [key(r) for r in alone]
    assert [key(r) for r in both] != [key(r) for r in other]
    # each (prompt, sample) continues from its own random stream
    assert both[0].response_ids != both[1].response_ids or both[0].logprobs != both[1].logprobs


def test_without_calls_it_is_the_single_turn_worker(policy):
    prompts = [question("a"), question("b")]
    sampling = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=12)
    multi = generate_with_tools(policy, prompts, 2, sampling, 11, ["calculator"], 2, render_speech=False)
    single = RolloutWorker(policy, render_speech=False).generate(prompts, 2, sampling, seed=11)
    assert [(r.response_ids, r.logprobs, r.text, r.finished) for r in multi] == [
        (r.response_ids, r.logprobs, r.text, r.finished) for r in single
    ]


def test_audio_search_changes_the_voice_of_the_speech_after_it(policy):
    detok, tok = policy.detokenizer, policy.tokenizer
    units = detok.encode("hello there")
    spoken = tok.render_response(Response(text="", speech="hello there"), units)  # <tts_start>...<tts_end><|EOT|>
    script = {"q": format_tool_call("audio_search", {"query": "a deep male voice"}), "q/sample0/turn1": spoken}
    rollout, = generate_with_tools(ScriptedPolicy(policy, script), [question()], 1, SAMPLING, 0, ["audio_search"], 1, True)
    assert rollout.voice == "en-us+Storm" and rollout.audio_tokens == units
    assert rollout.spoken_text == "hello there"
    deep = detok.render(units, voice="en-us+Storm")
    assert rollout.sample_rate == deep.sample_rate and np.array_equal(rollout.waveform, deep.waveform)
    default = detok.render(units).waveform
    assert len(default) != len(deep.waveform) or not np.allclose(default, deep.waveform)


# --- edges ------------------------------------------------------------------------------------


def test_a_response_with_the_audio_placeholder_is_not_continued(policy):
    tok = policy.tokenizer
    trace = ToolTrace(0, 0)
    turn = [tok.special[chat.AUDIO_PATCH]] + ids(policy, CALL, end=False)
    trace.add_turn(turn, [-1.0] * len(turn), tok, True)
    assert run_pending_tools([trace], tok, CALC, None, max_turns=2) == []
    assert trace.tool_results == [] and trace.tool_calls[0]["executed"] is False
    assert "audio placeholder" in trace.tool_calls[0]["reason"]


def test_stop_ids_are_passed_when_the_policy_takes_them(policy):
    class StopAware(Policy):
        def generate(self, batch, n, sampling, seed=0, stop_ids=()):
            self.stops = list(stop_ids)
            return super().generate(batch, n, sampling, seed)

    aware = StopAware(policy.model, policy.tokenizer, policy.detokenizer)
    generate_turn(aware, aware.encode_prompts([question()]), 1, SAMPLING, 0)
    assert aware.stops == [policy.tokenizer.special[chat.TOOL_CALL_END]]


def test_configuration_mistakes_raise_before_generating(policy):
    with pytest.raises(ValueError, match="did you mean 'calculator'"):
        generate_with_tools(policy, [question()], 1, SAMPLING, 0, ["calculater"], 1)
    with pytest.raises(ValueError, match="not enabled"):
        generate_with_tools(policy, [question()], 1, SAMPLING, 0, ["calculator"], 1, tool_options={"retrieval": {"root": "."}})
    with pytest.raises(ValueError, match="max_turns=-1"):
        generate_with_tools(policy, [question()], 1, SAMPLING, 0, ["calculator"], -1)


def test_tools_run_inside_ray_rollout_workers(policy):
    """A group of 2 Ray workers with the calculator enabled: each worker runs the calls its
    rows make (scripted here, so every row calls) and gives the in-process worker's
    rollouts, tool results, loss masks and call records."""
    from vocalign.rollouts.group import RolloutGroup

    scripted = ScriptedPolicy(policy, {f"{p}#{j}": CALL for p in ("a", "b", "c") for j in range(2)})
    prompts = [question("a"), question("b"), question("c")]
    local = RolloutWorker(scripted, render_speech=False, tools=["calculator"], max_turns=1).generate(prompts, 2, SAMPLING, 7)
    with RolloutGroup(scripted, 2, render_speech=False, tools=["calculator"], max_turns=1) as group:
        remote = group.generate(prompts, 2, SAMPLING, 7)
    assert len(remote) == len(local) == 6
    for a, b in zip(local, remote):
        assert (b.response_ids, b.loss_mask, b.prompt.id) == (a.response_ids, a.loss_mask, a.prompt.id)
        assert b.tool_calls == a.tool_calls and b.tool_calls[0]["executed"]
        assert "10063" in b.raw_text  # 347 * 29, computed in the worker and inserted as the tool turn
    with pytest.raises(ValueError, match="tool_options name tools that are not enabled"):
        RolloutGroup(scripted, 1, tools=["calculator"], tool_options={"retrieval": {"root": "."}})
