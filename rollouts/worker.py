"""The rollout worker: prompts in, scored-ready `Rollout`s out.

It holds a policy replica, generates in batches with a KV cache, parses each response
into think / text / speech, and renders the speech's audio tokens into a waveform with
the policy's detokenizer. This first version runs in-process.
"""

from __future__ import annotations

from vocalign.data.types import Prompt, Rollout
from vocalign.model.policy import Policy, Sampling


class RolloutWorker:
    def __init__(self, policy: Policy, render_speech: bool = True) -> None:
        self.policy = policy
        self.render_speech = render_speech and policy.detokenizer is not None
        self.version = 0

    def load_weights(self, state: dict, version: int) -> None:
        """Take the trainer's trainable state (the adapter only, under LoRA)."""
        self.policy.load_trainable_state(state)
        self.version = version

    def generate(self, prompts: list[Prompt], n: int, sampling: Sampling, seed: int) -> list[Rollout]:
        """`n` rollouts per prompt, grouped by prompt (rollout i*n+j is sample j of prompt i)."""
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
