"""The policy interface: batched generation with a KV cache, and the training forward.

`Policy` is model-agnostic. A model plugs in through `AudioLM`, four small methods:
encode audio (the frozen part, cacheable), build input embeddings with the audio in its
placeholders, run the decoder with a KV cache, and count placeholders per clip. The
embedded Step-Audio-2-style model and `transformers`-native audio LMs (Qwen2-Audio)
both implement it, so generation, log-probabilities and LoRA work the same for both.

Sampling is seeded per (prompt, sample): row r draws its uniforms from its own
generator, so a prompt's samples do not depend on which other prompts share the batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from torch import nn

from vocalign.data.types import Prompt

from .kernels import token_logprobs
from .decoding import decode
from .engine import token_positions
from .sampling import Sampling, row_seed, sample_tokens
from .lora import attach_lora
from .tokenizer import ChatTokenizer


class AudioLM(Protocol):
    """What a model provides to `Policy`.

    For `enable_lora` and `freeze_encoder` it also has the submodules `lm` (the decoder
    LoRA wraps) and `encoder` (the audio encoder).
    """

    def encode_audio(self, waveforms: list) -> list[torch.Tensor]: ...

    def input_embeddings(self, input_ids: torch.Tensor, encoded: list[torch.Tensor] | None) -> torch.Tensor: ...

    def decode(self, inputs_embeds, attention_mask, position_ids, cache=None, use_cache=False): ...

    def audio_placeholders(self, n_samples: int) -> int: ...


class CausalLMParts:
    """`decode` and `hidden_states` for an AudioLM whose `lm` is a `transformers` causal LM
    with its own head (peft-wrapped or not): the embedded model and `CausalTextLM`."""

    def decode(self, inputs_embeds, attention_mask, position_ids, cache=None, use_cache=False):
        """Run the causal LM; returns (logits, KV cache)."""
        out = self.lm(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, use_cache=use_cache,
        )
        return out.logits, out.cache

    def hidden_states(self, inputs_embeds, attention_mask, position_ids) -> torch.Tensor:
        """The decoder's last hidden states [B, T, H] (after its final norm, no LM head): what a value head reads."""
        decoder = self.lm.get_decoder()  # through a peft wrapper too; its LoRA layers are inside
        return decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state


def save_merged(model: nn.Module, folder) -> None:
    """Save `model.hf_model` (a `transformers` model whose language model is `model.lm`) as a
    standard checkpoint. Under LoRA the adapters are merged into a copy first (memory for
    a second model); to keep only the adapter, save `Policy.trainable_state()`."""
    if hasattr(model.lm, "merge_and_unload"):
        import copy

        model = copy.deepcopy(model)
        model.lm = model.lm.merge_and_unload()
    model.hf_model.save_pretrained(folder)


GREEDY_TEMPERATURE = 1e-4  # near-greedy: sampling needs a temperature above 0


@dataclass
class PromptBatch:
    """Prompts rendered to ids (left-padded) with their audio encoded."""

    prompts: list[Prompt]
    ids: list[list[int]]
    encoded: list[list[torch.Tensor]]  # per prompt, encoder frames of each clip


@dataclass
class Generation:
    prompt_index: int
    sample_index: int
    response_ids: list[int]
    logprobs: list[float]
    finished: bool


@dataclass
class SequenceBatch:
    """Prompt + response sequences for a training forward.

    `input_ids` is [B, P + R]: prompts left-padded to P, responses right-padded to R.
    `response_mask` [B, R] marks real response tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_len: int
    encoded: list[torch.Tensor]  # encoder frames of every clip, in row order
    # rows that share a prompt (a GRPO group): each row's index into the distinct prompts,
    # and the first row of each distinct prompt; None when every row's prompt is its own
    prompt_of_row: list[int] | None = None
    prompt_rows: list[int] | None = None
    clips_per_row: list[int] | None = None


def place_audio(embeds: torch.Tensor, input_ids: torch.Tensor, placeholder_id: int, frames: torch.Tensor, fix: str) -> torch.Tensor:
    """Put audio frames ([N, hidden], in row order) into the N placeholder slots of `input_ids`."""
    slots = input_ids == placeholder_id
    if int(slots.sum()) != frames.shape[0]:
        raise ValueError(
            f"prompt has {int(slots.sum())} audio placeholders (token id {placeholder_id}) but its audio "
            f"gives {frames.shape[0]} frames; {fix}"
        )
    return embeds.masked_scatter(slots.unsqueeze(-1), frames.to(embeds.dtype))


class Policy:
    """A trainable speech LM: generation, log-probabilities, LoRA and trainable state."""

    def __init__(self, model: nn.Module, tokenizer: ChatTokenizer, detokenizer=None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.detokenizer = detokenizer
        self.lora = False
        # how `generate` samples: "auto" (the fast decoder where it runs the model, else
        # transformers), "fast" (the fast decoder, or an error) or "hf" (transformers)
        self.decode_engine = "auto"
        self.decode_compile = False  # the static decoder's step through torch.compile
        # training forward: run each distinct prompt of a batch once (see response_logits)
        self.shared_prompt_forward = True
        # how the training forward runs: "auto" (the fused FastForward where it runs the
        # model, else transformers), "fast" (FastForward, or an error) or "hf"
        self.forward_engine = "auto"
        self._reference: nn.Module | None = None  # full weights: a frozen copy (keep_reference)

    # -- inputs --------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[Prompt], train_encoder: bool = False) -> PromptBatch:
        """Render prompts to ids and encode their audio (with gradients only if `train_encoder`)."""
        clips = [a.waveform for p in prompts for a in p.audio]
        with torch.set_grad_enabled(train_encoder):
            encoded = self.model.encode_audio(clips) if clips else []
        per_prompt, ids, k = [], [], 0
        for p in prompts:
            n = len(p.audio)
            frames = encoded[k : k + n]
            k += n
            per_prompt.append(frames)
            ids.append(self.tokenizer.render_prompt(p.messages, [self.model.audio_placeholders(len(a.waveform)) for a in p.audio]))
        return PromptBatch(prompts, ids, per_prompt)

    def sequences(self, prompt_ids: list[list[int]], response_ids: list[list[int]], encoded: list[list[torch.Tensor]]) -> SequenceBatch:
        """Pack prompts (left-padded) and responses (right-padded) into one batch."""
        pad = self.tokenizer.pad_id
        P = max(len(p) for p in prompt_ids)
        R = max(1, max(len(r) for r in response_ids))
        rows, mask, rmask = [], [], []
        for p, r in zip(prompt_ids, response_ids):
            rows.append([pad] * (P - len(p)) + list(p) + list(r) + [pad] * (R - len(r)))
            mask.append([0] * (P - len(p)) + [1] * (len(p) + len(r)) + [0] * (R - len(r)))
            rmask.append([1] * len(r) + [0] * (R - len(r)))
        # the same prompt: the same ids and the same encoded clips (the same tensors, as a
        # prompt's clips are encoded once and shared by its samples)
        distinct: dict[tuple, int] = {}
        prompt_of_row = [distinct.setdefault((tuple(p), tuple(id(e) for e in frames)), len(distinct))
                         for p, frames in zip(prompt_ids, encoded)]
        first = {}
        for row, k in enumerate(prompt_of_row):
            first.setdefault(k, row)
        device = self.device
        return SequenceBatch(
            input_ids=torch.tensor(rows, device=device), attention_mask=torch.tensor(mask, device=device),
            response_mask=torch.tensor(rmask, device=device, dtype=torch.float32), prompt_len=P,
            encoded=[e for frames in encoded for e in frames],
            prompt_of_row=prompt_of_row if len(distinct) < len(rows) else None,
            prompt_rows=[first[k] for k in range(len(distinct))], clips_per_row=[len(frames) for frames in encoded],
        )

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_static", None)  # a snapshot for a rollout worker: it builds its own (graphs do not pickle)
        return state

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- generation ----------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, batch: PromptBatch, n: int, sampling: Sampling, seed: int = 0, stop_ids: Sequence[int] = ()) -> list[Generation]:
        """`n` samples per prompt, grouped by prompt. Seeded per (seed, prompt id, sample).

        A row stops at the end of turn or at any of `stop_ids` (e.g. `</tool_call>`), which it keeps."""
        rows = [(i, j) for i in range(len(batch.prompts)) for j in range(n)]
        B, T = len(rows), sampling.max_new_tokens
        uniforms = torch.stack([
            torch.rand(T, generator=torch.Generator().manual_seed(row_seed(seed, batch.prompts[i].id, j)))
            for i, j in rows
        ]).to(self.device)
        was_training = self.model.training
        self.model.eval()
        # each prompt is embedded (its audio placed) once; its n rows share that
        prompts = self.sequences(batch.ids, [[] for _ in batch.ids], batch.encoded)
        P = prompts.prompt_len
        prompt_mask = prompts.attention_mask[:, :P]
        embeds = self.model.input_embeddings(prompts.input_ids[:, :P], prompts.encoded)
        prompt_of_row = torch.tensor([i for i, _ in rows], device=self.device)
        stops = torch.tensor([self.tokenizer.eot_id, *stop_ids], device=self.device)
        out, logps, lengths, done = decode(self.model, self.decoder_for_sampling(), embeds, prompt_mask, prompt_of_row,
                                           uniforms, sampling, stops, self.tokenizer.pad_id)
        self.model.train(was_training)
        gens = []
        for r, (i, j) in enumerate(rows):
            L = int(lengths[r])
            gens.append(Generation(i, j, out[r, :L].tolist(), logps[r, :L].tolist(), bool(done[r])))
        return gens

    def decoder_for_sampling(self):
        """The engine `generate` samples with (`decode_engine`, the recipe's `rollouts.engine`):
        "static" a `StaticDecoder` (CUDA graphs on CUDA); "fast" a `FastDecoder`; "auto" the
        static decoder on CUDA (but under ZeRO-3) and the fast one elsewhere, where they run the model; None
        ("hf", or "auto" on a model neither runs): sample through the model's own `decode`."""
        from .engine import FastDecoder
        from .static_decoder import StaticDecoder

        choice = getattr(self, "decode_engine", "auto")
        # auto leaves ZeRO-3 (parameters with a ds_id) to the fast decoder: a static one keeps a whole copy
        wanted = choice == "static" or (choice == "auto" and self.device.type == "cuda"
                                        and not any(hasattr(p, "ds_id") for p in self.model.parameters()))
        reason = StaticDecoder.unsupported(self.model) if wanted else None
        if reason is not None and choice == "static":
            raise ValueError(f"rollouts.engine is 'static' but the static decoder cannot run this model: {reason}; "
                             "set rollouts.engine: auto (or fast, hf)")
        if wanted and reason is None:
            static, compile = getattr(self, "_static", None), getattr(self, "decode_compile", False)
            if static is not None and static.source == id(self.model) and static.compile == compile:
                try:
                    static.refresh(self.model)  # the current weights into the buffers its graphs read
                    return static
                except ValueError:  # other shapes: build anew
                    pass
            self._static = StaticDecoder(self.model, compile=compile)
            return self._static
        return self._engine(choice, FastDecoder, "rollouts.engine", "the fast decoder", "sample through transformers")

    def forward_for_training(self):
        """The engine the training forward runs on: a `FastForward` when `forward_engine` is
        "fast", or "auto" and the model is one it runs (now: under ZeRO-3 the weights are
        gathered only inside `transformers` modules' hooks); else None (`transformers`)."""
        from .engine import FastForward

        return self._engine(getattr(self, "forward_engine", "auto"), FastForward, "rl.forward_engine",
                            "the fast training forward", "run the forward through transformers")

    def _engine(self, choice: str, engine: type, key: str, what: str, otherwise: str):
        """`engine(self.model)` when `choice` (the recipe's `key`) is "fast", or "auto" and the
        engine runs the model; None for "hf", or "auto" on a model it does not run."""
        if choice == "hf":
            return None
        reason = engine.unsupported(self.model)
        if reason is None:
            return engine(self.model)
        if choice == "fast":
            raise ValueError(f"{key} is 'fast' but {what} cannot run this model: {reason}; set {key}: auto (or hf) to {otherwise}")
        return None

    def _shares_prompts(self, batch: SequenceBatch) -> bool:
        return batch.prompt_of_row is not None and getattr(self, "shared_prompt_forward", True)

    def _distinct_prompts(self, batch: SequenceBatch) -> tuple[list[int], list[torch.Tensor]]:
        """The first row of each distinct prompt and the encoded clips of those rows, in order."""
        starts = [0]
        for n in batch.clips_per_row:
            starts.append(starts[-1] + n)
        first = batch.prompt_rows
        return first, [batch.encoded[k] for row in first for k in range(starts[row], starts[row + 1])]

    def _fast_hidden(self, engine, batch: SequenceBatch, head: bool) -> torch.Tensor:
        """FastForward's hidden states (or logits, with `head`) predicting each response token: [B, R, .]."""
        P, R = batch.prompt_len, batch.input_ids.shape[1] - batch.prompt_len
        rows = None
        if self._shares_prompts(batch):
            first, clips = self._distinct_prompts(batch)
            rows = torch.tensor(batch.prompt_of_row, device=batch.input_ids.device)
            prompt_ids, prompt_mask = batch.input_ids[first, :P], batch.attention_mask[first, :P]
        else:
            clips, prompt_ids, prompt_mask = batch.encoded, batch.input_ids[:, :P], batch.attention_mask[:, :P]
        args = (
            self.model.input_embeddings(prompt_ids, clips), prompt_mask, token_positions(prompt_mask),
            # the last response token is not run: no position after it is scored
            self.model.input_embeddings(batch.input_ids[:, P : P + R - 1], None),
            token_positions(batch.attention_mask)[:, P : P + R - 1], rows,
        )
        return engine.logits(*args) if head else engine.hidden(*args)

    def response_logits(self, batch: SequenceBatch) -> torch.Tensor:
        """Logits that predict each response token: [B, R, V].

        When rows share prompts (the samples of a GRPO group) and `shared_prompt_forward`
        is on, each distinct prompt runs once and its KV cache is reused by its rows'
        responses: the same logits (within float rounding) and gradients, without
        computing a prompt's forward and backward once per sample. `forward_engine`
        chooses between the fused `FastForward` and `transformers` (same values)."""
        engine = self.forward_for_training()
        if engine is not None:
            return self._fast_hidden(engine, batch, head=True)
        if self._shares_prompts(batch):
            return self._shared_prompt_logits(batch)
        logits, _ = self.model.decode(self._embeddings(batch), batch.attention_mask, token_positions(batch.attention_mask))
        return logits[:, batch.prompt_len - 1 : -1]

    def _embeddings(self, batch: SequenceBatch) -> torch.Tensor:
        """The input embeddings of whole sequences [B, P + R, H]. Audio goes into the prompt's
        placeholders only: a response may contain the placeholder token too (sampling can
        pick it), and generation embedded it as a token."""
        P = batch.prompt_len
        return torch.cat([
            self.model.input_embeddings(batch.input_ids[:, :P], batch.encoded),
            self.model.input_embeddings(batch.input_ids[:, P:], None),
        ], dim=1)

    def _shared_prompt_logits(self, batch: SequenceBatch) -> torch.Tensor:
        P = batch.prompt_len
        first, clips = self._distinct_prompts(batch)
        prompt_mask = batch.attention_mask[first, :P]
        embeds = self.model.input_embeddings(batch.input_ids[first, :P], clips)
        prompt_logits, cache = self.model.decode(embeds, prompt_mask, token_positions(prompt_mask), use_cache=True)
        if cache is None:
            raise RuntimeError(
                f"{type(self.model).__name__}.decode returned no KV cache with use_cache=True, so rows cannot share their "
                "prompt's forward; return the cache, or set policy.shared_prompt_forward = False"
            )
        index = torch.tensor(batch.prompt_of_row, device=batch.input_ids.device)
        cache.batch_select_indices(index)  # each row reads its prompt's keys and values (differentiably)
        responses = self.model.input_embeddings(batch.input_ids[:, P:], None)
        logits, _ = self.model.decode(
            responses, batch.attention_mask, token_positions(batch.attention_mask)[:, P:], cache=cache, use_cache=True,
        )
        return torch.cat([prompt_logits[index, -1:], logits[:, :-1]], dim=1)

    def logprobs(self, batch: SequenceBatch, temperature: float = 1.0) -> torch.Tensor:
        """Per-token log-probabilities of the response tokens under `temperature`: [B, R]."""
        return self.logprobs_and_entropy(batch, temperature, entropy=False)[0]

    def logprobs_and_entropy(
        self, batch: SequenceBatch, temperature: float = 1.0, entropy: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token log-probabilities [B, R] and, when `entropy`, the entropy of each
        token's distribution [B, R] (no gradient: it is logged, not trained on)."""
        logits = self.response_logits(batch).float()
        if temperature != 1.0:  # a division by 1 would still copy [B, R, V] (and again in the backward)
            logits = logits / temperature
        taken, ent = token_logprobs(logits, batch.input_ids[:, batch.prompt_len :], entropy)
        return taken * batch.response_mask, (ent * batch.response_mask if entropy else None)

    def response_hidden_states(self, batch: SequenceBatch) -> torch.Tensor:
        """The decoder's last hidden states at the positions that predict each response token: [B, R, H]."""
        engine = self.forward_for_training()
        if engine is not None:  # rows that share a prompt compute it once here too
            return self._fast_hidden(engine, batch, head=False)
        hidden = self.model.hidden_states(self._embeddings(batch), batch.attention_mask, token_positions(batch.attention_mask))
        return hidden[:, batch.prompt_len - 1 : -1]

    def trained_tokens(self, response_ids: Sequence[int]) -> list[float]:
        """1.0 for each response token whose part of the model trains (every token here; see
        OmniPolicy, whose thinker or talker may be left out)."""
        return [1.0] * len(response_ids)

    def audio_token_mask(self, batch: SequenceBatch) -> torch.Tensor:
        """1.0 where a response token is an audio token, else 0.0: [B, R]."""
        t = self.tokenizer
        targets = batch.input_ids[:, batch.prompt_len :]
        return ((targets >= t.audio_offset) & (targets < t.audio_offset + t.n_audio)).float() * batch.response_mask

    # -- LoRA and trainable state --------------------------------------------------------
    def enable_lora(self, r: int = 8, alpha: int = 16, dropout: float = 0.0, target_modules: list[str] | None = None) -> None:
        """Wrap the LM in peft LoRA adapters; the audio encoder and adaptor are frozen."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.lm = attach_lora(self.model.lm, r, alpha, dropout, target_modules)
        self.lora = True

    @property
    def hidden_size(self) -> int:
        """The width of `response_hidden_states` (what a value head reads)."""
        return self.model.lm.config.hidden_size

    def with_model(self, model: nn.Module) -> Policy:
        """This policy's tokenizer and settings over another copy of its model (PPO's critic body)."""
        import copy

        view = copy.copy(self)
        view.model, view.lora, view._reference = model, False, None
        return view

    def train_language_model(self) -> None:
        """Make the language model's weights trainable (full-weight training; the encoder stays as it is)."""
        for p in self.model.lm.parameters():
            p.requires_grad_(True)

    def adapter_model(self) -> nn.Module:
        """The module the LoRA adapters wrap (a peft model once `enable_lora` ran)."""
        return self.model.lm

    def merge_lora(self) -> None:
        """Fold the LoRA adapters into the base weights, in place; the policy is then a plain model."""
        self.model.lm = self.model.lm.merge_and_unload()
        self.lora = False

    def freeze_encoder(self) -> None:
        for p in self.model.encoder.parameters():
            p.requires_grad_(False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The tensors training changes: only the adapter under LoRA, else every trainable weight."""
        if self.lora:
            from peft import get_peft_model_state_dict

            return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.adapter_model()).items()}
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        return {k: v.detach().clone() for k, v in self.model.state_dict().items() if k in names}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.lora:
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(self.adapter_model(), state)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise ValueError(f"adapter state has keys this policy does not: {unexpected[:5]}")
            return
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"trainable state has keys this policy does not: {unexpected[:5]}")

    def keep_reference(self, model: nn.Module | None = None) -> None:
        """Keep a frozen copy of the current weights (or `model`, e.g. reloaded when a run
        resumes) as the KL reference of a full-weight policy.

        Under LoRA nothing is copied: the reference is the base with the adapters disabled.
        """
        if self.lora or self._reference is not None:
            return
        import copy

        ref = (model if model is not None else copy.deepcopy(self.model)).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        self._reference = ref

    def drop_reference(self) -> None:
        """Forget the full-weight KL reference (a new RL stage keeps its own)."""
        self._reference = None

    @contextlib.contextmanager
    def reference(self):
        """The reference model: under LoRA, the base model with the adapters disabled;
        with full weights, the frozen copy made by `keep_reference`."""
        if self.lora:
            with self.adapter_model().disable_adapter():
                yield self
            return
        if self._reference is None:
            raise RuntimeError("a full-weight policy has no reference until keep_reference() copies its weights")
        yield self.with_model(self._reference)  # this policy's class and settings over the frozen copy
