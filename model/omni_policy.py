"""Qwen2.5-Omni as a vocalign `Policy`: the trainer, the rollout workers and the rewards
drive it as they drive the embedded model.

A response is one token stream to the trainer: the thinker's text tokens (ending with
`<|im_end|>`), then the talker's codes, each shifted past the thinker's vocabulary (code c
is id `audio_offset + c`). So:

- a rollout's `response_ids` and `logprobs` cover both parts, and `audio_token_mask` (the
  talker's codes) lets `loss.audio_token_weight` weight the talker's tokens against the
  thinker's;
- the advantage is shared: the sequence's reward (computed from the text and from the
  waveform) gives every token of the response, text and codes, the same advantage, as for
  the embedded model's interleaved speech tokens;
- `rl.train_parts` chooses what trains: the thinker's language model, the talker, or both
  (LoRA on the named parts' projections, or their full weights). The audio encoder, the
  vision tower and token2wav stay frozen. A part that does not train still samples its
  tokens; they are left out of the loss (`trained_tokens`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vocalign.data.types import Prompt, Response

from .chat import ParsedResponse
from .lora import LORA_TARGETS
from .policy import Generation, Policy, PromptBatch, Sampling, SequenceBatch
from .qwen2_5_omni import OUTPUT_RATE, OmniInputs, OmniSpeech

PARTS = ("thinker", "talker")
# where each part's trainable language model lives in Qwen2_5OmniForConditionalGeneration
PART_PREFIX = {"thinker": ("thinker.model.language_model.", "thinker.lm_head."), "talker": ("talker.",)}


def parts_problem(parts: Sequence[str]) -> str | None:
    """What is wrong with `rl.train_parts` for Qwen2.5-Omni, or None."""
    if not parts or any(p not in PARTS for p in parts):
        return f"rl.train_parts={list(parts)}: Qwen2.5-Omni's trainable parts are {', '.join(PARTS)}; name one or both"
    return None


class OmniTokens:
    """The tokenizer side of the combined stream: text ids below `audio_offset`, codes above."""

    def __init__(self, omni: OmniSpeech) -> None:
        self.hf, self.omni = omni.tokenizer, omni
        self.audio_offset = omni.hf.config.thinker_config.text_config.vocab_size
        self.n_audio = omni.hf.config.talker_config.vocab_size
        self.eot_id = self.hf.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eot_id

    def __len__(self) -> int:
        return self.audio_offset + self.n_audio

    def is_audio(self, token_id: int) -> bool:
        return token_id >= self.audio_offset

    def text_ids(self, text: str) -> list[int]:
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def split(self, ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """(the thinker's ids, the talker's codes) of a combined response."""
        return [i for i in ids if i < self.audio_offset], [i - self.audio_offset for i in ids if i >= self.audio_offset]

    def render_response(self, response: Response, units: Sequence[int] = ()) -> list[int]:
        """An SFT target: the text, `<|im_end|>`, then the given codes."""
        return self.text_ids(response.text) + [self.eot_id] + [self.audio_offset + c for c in units]

    def parse_response(self, ids: Sequence[int]) -> ParsedResponse:
        text_ids, codes = self.split(ids)
        finished = self.eot_id in text_ids
        if finished:
            text_ids = text_ids[: text_ids.index(self.eot_id)]
        text = self.hf.decode(text_ids, skip_special_tokens=True)
        spoken = [c for c in codes if c not in self.omni.code_stops]
        return ParsedResponse(think="", text=text, spoken_text=text if spoken else "", audio_ids=spoken, tool_calls=[],
                              finished=finished)

    def decode_raw(self, ids: Sequence[int]) -> str:
        text_ids, codes = self.split(ids)
        return self.hf.decode(text_ids) + (f" [{len(codes)} speech codes]" if codes else "")


@dataclass
class RenderedSpeech:
    waveform: np.ndarray
    sample_rate: int


class OmniVoice:
    """The detokenizer side: token2wav with the policy's speaker (the same codes always give
    the same waveform, see `OmniSpeech.render`)."""

    registered_name = None

    def __init__(self, omni: OmniSpeech, speaker: str) -> None:
        self.omni, self.speaker = omni, speaker
        omni.speaker(speaker)  # refuse an unknown voice now, naming the checkpoint's

    def encode(self, speech: str, style: dict | None = None) -> list[int]:
        """An SFT target's speech given only as text: codes cannot be derived from it, so such a
        target trains the thinker's text only (give `response.codes` to train the talker)."""
        return []

    def render(self, codes: Sequence[int]) -> RenderedSpeech:
        wav = self.omni.render(list(codes), self.speaker)
        return RenderedSpeech(wav if wav is not None else np.zeros(0, np.float32), OUTPUT_RATE)


class OmniPolicy(Policy):
    """`OmniSpeech` behind the `Policy` interface (see the module docstring)."""

    def __init__(self, model: OmniSpeech, speaker: str = "Chelsie", max_codes: int = 256,
                 train_parts: Sequence[str] = PARTS) -> None:
        super().__init__(model, OmniTokens(model), OmniVoice(model, speaker))
        self.speaker, self.max_codes = speaker, max_codes
        self.shared_prompt_forward = False  # every row runs its own forward (below)
        self.set_train_parts(train_parts)

    # `rollouts.engine` and `rollouts.compile`, which the model's own sampling reads (omni_static.py)
    decode_engine = property(lambda self: self.model.decode_engine, lambda self, v: setattr(self.model, "decode_engine", v))
    decode_compile = property(lambda self: self.model.decode_compile, lambda self, v: setattr(self.model, "decode_compile", v))

    # -- what trains ---------------------------------------------------------------------
    def set_train_parts(self, parts: Sequence[str]) -> None:
        problem = parts_problem(parts)
        if problem:
            raise ValueError(problem)
        self.train_parts = list(parts)
        if not self.lora:
            for name, p in self.model.hf.named_parameters():
                p.requires_grad_(self._in_parts(name))

    def _in_parts(self, name: str) -> bool:
        name = name.replace("base_model.model.", "")
        return any(name.startswith(prefix) for part in self.train_parts for prefix in PART_PREFIX[part])

    def trained_tokens(self, response_ids: Sequence[int]) -> list[float]:
        """1.0 on the tokens of a part that trains, 0.0 on the others (the trainer's loss mask)."""
        text, speech = float("thinker" in self.train_parts), float("talker" in self.train_parts)
        return [speech if self.tokenizer.is_audio(i) else text for i in response_ids]

    def enable_lora(self, r: int = 8, alpha: int = 16, dropout: float = 0.0, target_modules: list[str] | None = None,
                    train_parts: Sequence[str] | None = None) -> None:
        """LoRA adapters on the projections of the trained parts only (`train_parts`, as a
        checkpoint's lora_config records them; else the policy's)."""
        from peft import LoraConfig, get_peft_model

        if train_parts is not None:
            self.set_train_parts(train_parts)

        for p in self.model.parameters():
            p.requires_grad_(False)
        names = "|".join(target_modules or LORA_TARGETS)
        parts = "|".join({"thinker": r"thinker\.model\.language_model", "talker": r"talker\.model"}[p] for p in self.train_parts)
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=rf"^({parts})\..*\.({names})$")
        self.model.hf = get_peft_model(self.model.hf, config)
        self.lora = True

    def merge_lora(self) -> None:
        self.model.hf = self.model.hf.merge_and_unload()
        self.lora = False

    def adapter_model(self) -> nn.Module:
        return self.model.hf

    def freeze_encoder(self) -> None:
        for module in (self.model.hf.thinker.model.audio_tower, self.model.hf.thinker.model.visual, self.model.hf.token2wav):
            for p in module.parameters():
                p.requires_grad_(False)

    # -- prompts and generation ----------------------------------------------------------
    def encode_prompts(self, prompts: list[Prompt], train_encoder: bool = False) -> PromptBatch:
        """Each prompt's ids and, for a spoken one, its Whisper features and their mask (the
        encoder runs inside every forward)."""
        ids, encoded = [], []
        for p in prompts:
            inputs = self.model.inputs(p)
            ids.append(inputs.ids[0].tolist())
            encoded.append([inputs.features[0], inputs.feature_mask[0]] if inputs.features is not None else [])
        return PromptBatch(prompts, ids, encoded)

    @torch.no_grad()
    def generate(self, batch: PromptBatch, n: int, sampling: Sampling, seed: int = 0, stop_ids: Sequence[int] = ()) -> list[Generation]:
        """`n` spoken responses per prompt, grouped by prompt, seeded per (seed, prompt id, sample)."""
        was_training = self.model.training
        self.model.eval()
        gens, offset = [], self.tokenizer.audio_offset
        for i, prompt in enumerate(batch.prompts):  # a prompt's n samples decode as one batch
            inputs = _inputs(torch.tensor([batch.ids[i]], device=self.device), batch.encoded[i])
            group = self.model.sample_group(prompt, sampling, seed, list(range(n)), self.speaker, self.max_codes,
                                            render=False, inputs=inputs)
            for j, s in enumerate(group):
                gens.append(Generation(i, j, s.text_ids + [offset + c for c in s.codes], s.text_logprobs + s.code_logprobs,
                                       self.tokenizer.eot_id in s.text_ids))
        self.model.train(was_training)
        return gens

    # -- the training forward ------------------------------------------------------------
    def logprobs_and_entropy(self, batch: SequenceBatch, temperature: float = 1.0,
                             entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token log-probabilities of both parts' tokens, row by row: [B, R]."""
        taken = torch.zeros(batch.response_mask.shape, device=self.device)
        ent = torch.zeros_like(taken) if entropy else None
        for r, inputs, text, codes in self._rows(batch):
            t, c, e = self.model.logprobs(inputs, text, codes, temperature, self.speaker, entropy)
            taken[r, : len(text) + len(codes)] = torch.cat([t, c])
            if entropy:
                ent[r, : len(text) + len(codes)] = e
        return taken * batch.response_mask, (ent * batch.response_mask if entropy else None)

    def _rows(self, batch: SequenceBatch):
        """Per row of `batch`: (row, its prompt's inputs, its text ids, its codes)."""
        B, P = batch.response_mask.shape[0], batch.prompt_len
        clips = np.cumsum([0, *(batch.clips_per_row or [0] * B)])
        for r in range(B):
            ids = batch.input_ids[r : r + 1, :P][:, batch.attention_mask[r, :P].bool()]
            n = int(batch.response_mask[r].sum())
            text, codes = self.tokenizer.split(batch.input_ids[r, P : P + n].tolist())
            yield r, _inputs(ids, batch.encoded[clips[r] : clips[r + 1]]), text, codes

    def response_logits(self, batch: SequenceBatch) -> torch.Tensor:
        raise NotImplementedError("Qwen2.5-Omni's two streams have two vocabularies: use logprobs_and_entropy")

    @property
    def hidden_size(self) -> int:
        """The thinker's width plus the talker's: `response_hidden_states` puts each stream in its own columns."""
        config = self.model.hf.config
        return config.thinker_config.text_config.hidden_size + config.talker_config.hidden_size

    def response_hidden_states(self, batch: SequenceBatch) -> torch.Tensor:
        """[B, R, Ht + Hc]: at a text token, the thinker's last hidden state that predicts it in the
        first Ht columns; at a code, the talker's in the last Hc (zeros elsewhere). One linear head
        over it (PPO's critic) is thus one value head per stream."""
        width = self.model.hf.config.thinker_config.text_config.hidden_size
        out = torch.zeros(*batch.response_mask.shape, self.hidden_size, device=self.device)
        for r, inputs, text, codes in self._rows(batch):
            _, text_hidden, _, code_hidden = self.model.teacher_forced(inputs, text, codes, self.speaker)
            out[r, : len(text), :width] = text_hidden.float()
            if code_hidden is not None:
                out[r, len(text) : len(text) + len(codes), width:] = code_hidden.float()
        return out

    def train_language_model(self) -> None:
        """Full weights: the language models of `train_parts` train."""
        self.set_train_parts(self.train_parts)


def _inputs(ids: torch.Tensor, clips: list[torch.Tensor]) -> OmniInputs:
    """A prompt's ids [1, L] and its encoded clips as `encode_prompts` keeps them: [] (typed) or
    [features, feature mask] (spoken)."""
    if not clips:
        return OmniInputs(ids, None, None)
    return OmniInputs(ids, clips[0].unsqueeze(0), clips[1].unsqueeze(0))


def load_omni_policy(folder: str | Path, speaker: str = "Chelsie", max_codes: int = 256,
                     train_parts: Sequence[str] = PARTS, system: str | None = None, dtype: str = "float32",
                     render_steps: int = 10) -> OmniPolicy:
    """A Qwen2.5-Omni folder (released layout) as a policy speaking with `speaker`, its thinker and
    talker in `dtype` (token2wav in float32, its ODE over `render_steps` time points)."""
    from .qwen2_5_omni import DEFAULT_SYSTEM

    omni = OmniSpeech.load(folder, dtype=getattr(torch, dtype), system=system or DEFAULT_SYSTEM)
    omni.render_steps = render_steps
    return OmniPolicy(omni, speaker, max_codes, train_parts)

