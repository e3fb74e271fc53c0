"""A text-only `transformers` causal LM behind the `AudioLM` interface.

`CausalTextLM` wraps any `AutoModelForCausalLM` (a Qwen2 built from a config in the
benchmarks and tests) so `Policy` generates, scores and trains it with LoRA exactly as
it does the speech models. It has no audio: `encode_audio` returns nothing for no
clips and `audio_placeholders` refuses, so a prompt with audio fails at rendering time
with a message that says so instead of producing a silent mismatch later.

Why it exists: it lets vocalign's RL loop run on a plain text LM (benchmarks against
TRL's `GRPOTrainer`, which trains text LMs only, and text-only experiments) with the
same `Policy`, rollout worker and trainers as the speech models.

    model = CausalTextLM(Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), ...)))
    policy = text_policy(model, ChatTokenizer(build_tokenizer(0)))
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from .policy import CausalLMParts, Policy, save_merged
from .tokenizer import ChatTokenizer


class CausalTextLM(CausalLMParts, nn.Module):
    """A causal LM with no audio input, as an `AudioLM` (see the module docstring).

    `lm` is the wrapped model (what LoRA wraps); `encoder` is an empty module, so
    `Policy.freeze_encoder` has nothing to freeze and works unchanged.
    """

    def __init__(self, hf_model: PreTrainedModel) -> None:
        super().__init__()
        if not isinstance(hf_model, PreTrainedModel) or not hasattr(hf_model, "get_decoder"):
            raise TypeError(
                f"CausalTextLM wraps a transformers causal LM (e.g. Qwen2ForCausalLM), got {type(hf_model).__name__}; "
                "build one with AutoModelForCausalLM.from_config(...) or load one with CausalTextLM.from_pretrained(folder)"
            )
        self.config = hf_model.config
        self.lm = hf_model
        self.encoder = nn.Module()
        # The unwrapped model, kept outside the module tree (its weights are already in it
        # under `lm`): saving merges LoRA into a copy and saves this one.
        self.__dict__["hf_model"] = hf_model

    # -- audio: none ----------------------------------------------------------------------
    def encode_audio(self, waveforms: list) -> list[torch.Tensor]:
        if waveforms:
            raise ValueError(
                f"{len(waveforms)} audio clip(s) given to a text-only model ({type(self.hf_model).__name__}); "
                "give it prompts without audio, or use a speech model (the embedded default or Qwen2-Audio)"
            )
        return []

    def audio_placeholders(self, n_samples: int) -> int:
        raise ValueError(
            f"a prompt holds an audio clip ({n_samples} samples) but this model ({type(self.hf_model).__name__}) "
            "is text-only; drop the audio from the prompt's messages or use a speech model"
        )

    # -- language model -------------------------------------------------------------------
    def input_embeddings(self, input_ids: torch.Tensor, encoded: list[torch.Tensor] | None) -> torch.Tensor:
        """Token embeddings; there are no audio frames to place."""
        if encoded:
            raise ValueError(
                f"{len(encoded)} encoded audio clip(s) given to a text-only model; its prompts must hold no audio"
            )
        return self.lm.get_input_embeddings()(input_ids)

    # -- save / load ----------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        """Save as a standard `transformers` checkpoint (weights and config; the tokenizer is
        saved apart), LoRA merged in (see `save_merged`)."""
        save_merged(self, folder)

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype | str = torch.float32) -> "CausalTextLM":
        """Load a local causal-LM checkpoint (nothing is downloaded: `folder` must hold config.json)."""
        folder = Path(folder)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"{folder} holds no config.json; pass the local folder of a causal LM checkpoint")
        return cls(AutoModelForCausalLM.from_pretrained(folder, dtype=dtype))


def text_policy(model: CausalTextLM, tokenizer: ChatTokenizer) -> Policy:
    """A `Policy` over a text-only model: no detokenizer (it cannot speak).

    The model's vocabulary must cover the tokenizer's, or sampling could pick ids the
    tokenizer cannot decode and the chat special tokens would have no embedding.
    """
    if not isinstance(model, CausalTextLM):
        raise TypeError(f"text_policy takes a CausalTextLM, got {type(model).__name__}; wrap the model: CausalTextLM(hf_model)")
    rows = model.lm.get_input_embeddings().num_embeddings
    if rows != len(tokenizer):
        raise ValueError(
            f"the model has {rows} embedding rows but the tokenizer {len(tokenizer)} tokens; build the model with "
            f"vocab_size={len(tokenizer)} (or resize its embeddings to the tokenizer)"
        )
    if tokenizer.n_audio:
        raise ValueError(
            f"the tokenizer holds {tokenizer.n_audio} <audio_k> tokens but a text-only policy has no detokenizer to "
            "render them; build the tokenizer with build_tokenizer(0)"
        )
    return Policy(model, tokenizer, detokenizer=None)
