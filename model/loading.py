"""Building the embedded default policy, and saving/loading policies with their tokenizer.

A saved policy is a model folder with its tokenizer: the embedded Step-Audio-2-style model
(`vocalign_config.json`) or a `transformers`-native Qwen2-Audio checkpoint (`config.json`,
`model_type: qwen2_audio`) with `vocalign.json` beside it, which names the speech
detokenizer its `<audio_k>` tokens belong to. `load_policy` reads both, and a released
Qwen2-Audio folder too (its chat tokens are added on load), and a Qwen2.5-Omni folder in
the released layout (model/omni_policy.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


VOCALIGN_META = "vocalign.json"  # beside a transformers-native model: {"detokenizer": name or null}


def save_policy(policy: Policy, folder: str | Path) -> None:
    """Save the model (config + safetensors weights) and its tokenizer into `folder`."""
    folder = Path(folder)
    policy.model.save_pretrained(folder)
    policy.tokenizer.hf.save_pretrained(folder)
    if not isinstance(policy.model, StepAudio2Model):  # the embedded model's config names its detokenizer
        name = getattr(policy.detokenizer, "registered_name", None) if policy.detokenizer is not None else None
        (folder / VOCALIGN_META).write_text(json.dumps({"detokenizer": name}))


def load_policy(folder: str | Path, detokenizer: str | None = None, **options: Any) -> Policy:
    """Load a policy saved by `save_policy` (or `vocalign export`), or a local Qwen2-Audio or
    Qwen2.5-Omni checkpoint. `detokenizer` (a registered name) gives a Qwen2-Audio model speech
    tokens; a folder saved by vocalign names its own, and a different one is refused. `options`
    give a checkpoint's `dtype` and a Qwen2.5-Omni model's speaker, max_codes, system prompt and render_steps
    (`load_omni_policy`)."""
    folder = Path(folder)
    if not (folder / CONFIG_NAME).exists():
        config = folder / "config.json"
        if config.exists() and json.loads(config.read_text()).get("model_type") == "qwen2_5_omni":
            from .omni_policy import load_omni_policy

            return load_omni_policy(folder, **{k: v for k, v in options.items() if v is not None})
        dtype = getattr(torch, options.get("dtype") or "float32")
        if config.exists() and json.loads(config.read_text()).get("model_type") == "qwen2_audio":
            from .hf_audio import load_qwen2_audio_policy

            meta = folder / VOCALIGN_META
            saved = json.loads(meta.read_text()).get("detokenizer") if meta.exists() else None
            if saved and detokenizer and detokenizer != saved:
                raise ValueError(
                    f"{folder} was saved with the speech detokenizer {saved!r}, not {detokenizer!r}: its <audio_k> tokens "
                    f"are {saved!r}'s units; set model.detokenizer={saved} (or leave it unset)"
                )
            return load_qwen2_audio_policy(folder, detokenizer=detokenizer or saved, dtype=dtype)
        raise FileNotFoundError(
            f"{folder} is not a saved vocalign model (no {CONFIG_NAME}) nor a Qwen2-Audio checkpoint (a config.json "
            "with model_type qwen2_audio); pass a folder written by save_policy or `vocalign export`, or a local "
            "Qwen2-Audio download"
        )
    if detokenizer is not None:
        raise ValueError(
            f"{folder} holds the embedded model, whose config names its own detokenizer; leave model.detokenizer unset"
        )
    model = StepAudio2Model.from_pretrained(folder)
    tokenizer = ChatTokenizer(PreTrainedTokenizerFast.from_pretrained(folder), model.config.interleave_ratio)
    return Policy(model, tokenizer, build_detokenizer(model.config.detokenizer))
