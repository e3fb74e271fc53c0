"""The rollout worker: prompts in, scored-ready `Rollout`s out.

It holds a policy replica, generates in batches with a KV cache, parses each response
into think / text / speech, and renders the speech's audio tokens into a waveform with
the policy's detokenizer.

One class, two ways: `RolloutWorker` runs in the trainer's process (sharing, or holding
its own copy of, the policy), and `RolloutActor` is the same worker built in another
process from a policy snapshot, which `RolloutGroup` (rollouts/group.py) runs as a Ray
actor. Both stamp every rollout with the weight version they hold and can prove their
weights with `weight_checksum` (see rollouts/sync.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from vocalign.data.types import Prompt, Rollout
from vocalign.model.policy import Policy, Sampling

from .contract import PendingRollouts
from .sync import WeightSyncError, live_state, restore_policy, state_bytes, state_checksum


class RolloutWorker:
    """Generates in this process with `policy` (the trainer's own, or a replica): a `RolloutSource`."""

    def __init__(self, policy: Policy, render_speech: bool = True, tools: Sequence[str] = (), max_turns: int = 2,
                 tool_options: dict[str, dict[str, Any]] | None = None) -> None:
        if tools and not hasattr(policy.tokenizer, "special"):
            raise ValueError(f"tools {list(tools)} need a policy with tool-call tokens (the embedded model, Qwen2-Audio); "
                             f"{type(policy).__name__} cannot call tools yet: leave rollouts.tools empty, and pass "
                             "`vocalign eval --suite` for suites without tools (e.g. --suite style)")
        self.policy = policy
        self.render_speech = render_speech and policy.detokenizer is not None
        self.version = 0
        self.restarts = 0  # nothing to restart in-process
        # multi-turn tool use: a response may call these tools up to max_turns times
        self.tools, self.max_turns, self.tool_options = list(tools), max_turns, tool_options or None
        self._synced_names: list[str] | None = None  # keys of the last state loaded

    # -- weights -------------------------------------------------------------------------
    def shares_weights(self, policy: Policy) -> bool:
        return self.policy is policy

    def sync(self, state: dict, version: int) -> dict[str, float]:
        """Take the trainer's trainable state (the adapter only, under LoRA), stamped `version`."""
        t0 = time.perf_counter()
        self.policy.load_trainable_state(state)
        self.version = version
        self._synced_names = sorted(state)
        return {"bytes": float(state_bytes(state)), "seconds": time.perf_counter() - t0}

    def verify(self, version: int, checksum: str) -> None:
        held_version, held = self.weight_state()
        if held_version != version or held != checksum:
            raise WeightSyncError(
                f"the rollout worker holds version {held_version} with checksum {held}, not the trainer's version "
                f"{version} with checksum {checksum}: sync the trainer's state again (sync(state, version))"
            )

    def set_version(self, version: int) -> None:
        """Stamp the weights held with `version` (a resumed trainer whose weights the worker already has)."""
        self.version = version

    def weight_version(self) -> int:
        return self.version

    def weight_checksum(self) -> str:
        """`state_checksum` of the worker's current values of the synced tensors.

        Before the first sync it covers the policy's own trainable state.
        """
        return state_checksum(live_state(self.policy, self._synced_names))

    def weight_state(self) -> tuple[int, str]:
        """(version, checksum) in one call: what `RolloutGroup.verify` compares."""
        return self.version, self.weight_checksum()

    # -- generation and scoring ----------------------------------------------------------
    def generate(self, prompts: list[Prompt], n: int, sampling: Sampling, seed: int) -> list[Rollout]:
        """`n` rollouts per prompt, grouped by prompt (rollout i*n+j is sample j of prompt i)."""
        if self.tools:
            from .multiturn import generate_with_tools

            return generate_with_tools(
                self.policy, prompts, n, sampling, seed, self.tools, self.max_turns, self.render_speech,
                self.tool_options, self.version,
            )
        batch = self.policy.encode_prompts(prompts)
        rollouts = []
        for gen in self.policy.generate(batch, n, sampling, seed=seed):
            parsed = self.policy.tokenizer.parse_response(gen.response_ids)
            waveform, rate = None, 0
            if self.render_speech and parsed.audio_ids:
                audio = self.policy.detokenizer.render(parsed.audio_ids)
                waveform, rate = audio.waveform, audio.sample_rate
            rollouts.append(
                Rollout(
                    prompt=prompts[gen.prompt_index], text=parsed.text, think=parsed.think,
                    spoken_text=parsed.spoken_text, audio_tokens=parsed.audio_ids, waveform=waveform,
                    sample_rate=rate, prompt_ids=batch.ids[gen.prompt_index], response_ids=gen.response_ids,
                    logprobs=gen.logprobs, weight_version=self.version, group=gen.prompt_index,
                    finished=gen.finished, tool_calls=[{"raw": t} for t in parsed.tool_calls],
                    raw_text=self.policy.tokenizer.decode_raw(gen.response_ids), think_tokens=parsed.think_tokens,
                )
            )
        return rollouts

    def close(self) -> None:
        """Nothing to release in-process (a `RolloutGroup` kills its actors)."""

    def generate_async(self, prompts: list[Prompt], n: int, sampling: Sampling, seed: int) -> PendingRollouts:
        """`generate`, run now: in one process there is nothing to overlap with."""
        return PendingRollouts(prompts, n, self.version, [0], local=self.generate(prompts, n, sampling, seed))

    def collect(self, pending: PendingRollouts) -> list[Rollout]:
        if pending.local is None:
            raise ValueError("these pending rollouts were started by a RolloutGroup: collect them with that group")
        return pending.local

    @torch.no_grad()
    def logprobs(self, prompts: list[Prompt], response_ids: list[list[int]], temperature: float = 1.0) -> list[list[float]]:
        """Per-token log-probabilities of `response_ids[i]` after `prompts[i]`, in eval mode.

        The same numbers the trainer computes for these sequences when both hold the same
        weights: a functional check of a sync beyond the checksum.
        """
        if len(prompts) != len(response_ids):
            raise ValueError(f"logprobs needs one response per prompt; got {len(prompts)} prompts and {len(response_ids)} responses")
        batch = self.policy.encode_prompts(prompts)
        seq = self.policy.sequences(batch.ids, response_ids, batch.encoded)
        was_training = self.policy.model.training
        self.policy.model.eval()
        try:
            logp = self.policy.logprobs(seq, temperature)
        finally:
            self.policy.model.train(was_training)
        return [logp[i, : len(r)].tolist() for i, r in enumerate(response_ids)]


class RolloutActor(RolloutWorker):
    """A `RolloutWorker` in its own process, built from a policy snapshot: run as a Ray actor.

    `lora` (r, alpha, dropout, target_modules) enables LoRA on a snapshot that has none
    yet; the adapter itself arrives with the first sync. `torch_threads` is per actor:
    replicas on one machine share its cores. `tools`, `max_turns` and `tool_options` are
    the in-process worker's: the tools run in the actor (a retrieval root must be readable
    on its node, a `module:function` tool importable there).
    """

    def __init__(
        self, snapshot: bytes, render_speech: bool = True, torch_threads: int = 1, device: str = "cpu",
        lora: dict[str, Any] | None = None, version: int = 0, tools: Sequence[str] = (), max_turns: int = 2,
        tool_options: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        torch.set_num_threads(torch_threads)
        policy = restore_policy(snapshot, device)
        if lora is not None and not policy.lora:
            policy.enable_lora(**lora)
        super().__init__(policy, render_speech, tools, max_turns, tool_options)
        self.version = version

    def generate_shard(self, prompts: list[Prompt], n: int, sampling: Sampling, seed: int) -> list[Rollout]:
        """`generate`, with each rollout's prompt left out of the reply.

        The driver holds the prompts (their audio included) and puts them back, so they
        do not travel twice.
        """
        rollouts = self.generate(prompts, n, sampling, seed)
        for r in rollouts:
            r.prompt = None  # type: ignore[assignment]
        return rollouts

    def ready(self) -> tuple[int, str]:
        """(process id, Ray node id): returns once the actor is built."""
        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id()
