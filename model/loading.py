"""Building the embedded default policy, and saving/loading policies with their tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from . import chat
from .detokenizer import build_detokenizer
from .policy import Policy
from .step_audio2 import CONFIG_NAME, StepAudio2Model, tiny_config
from .tokenizer import ChatTokenizer, build_tokenizer


def embedded_policy(seed: int = 0, max_audio_seconds: float = 4.0) -> Policy:
    """The embedded default: a small Step-Audio-2-style model, randomly initialised.

    Its audio tokens are the units of the espeak-ng phoneme detokenizer.
    """
    detok = build_detokenizer("espeak_units")
    tokenizer = ChatTokenizer(build_tokenizer(len(detok.units)))
    torch.manual_seed(seed)
    config = tiny_config(len(tokenizer), tokenizer.special[chat.AUDIO_PATCH], max_audio_seconds)
    return Policy(StepAudio2Model(config), tokenizer, detok)


def save_policy(policy: Policy, folder: str | Path) -> None:
    """Save the model (config + safetensors weights) and its tokenizer into `folder`."""
    folder = Path(folder)
    policy.model.save_pretrained(folder)
    policy.tokenizer.hf.save_pretrained(folder)


def load_policy(folder: str | Path) -> Policy:
    """Load a policy saved by `save_policy` (or `vocalign export`)."""
    folder = Path(folder)
    if not (folder / CONFIG_NAME).exists():
        raise FileNotFoundError(
            f"{folder} is not a saved vocalign model (no {CONFIG_NAME}); pass a folder written by save_policy or `vocalign export`"
        )
    model = StepAudio2Model.from_pretrained(folder)
    tokenizer = ChatTokenizer(PreTrainedTokenizerFast.from_pretrained(folder), model.config.interleave_ratio)
    return Policy(model, tokenizer, build_detokenizer(model.config.detokenizer))
