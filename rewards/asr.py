"""Speech recognition for rewards: one interface, a registry of backends, a per-process cache.

A backend turns a batch of waveforms into transcripts in one call (`ASRBackend`); rewards
call it on a whole rollout batch at once. Backends are registered by name with
`@register_asr(name)` and built with `get_asr(name, **kwargs)`, which keeps the built
backend for the life of the process: rewards ask for it every step, and a reward worker
(a Ray actor, say) keeps the model loaded between calls.

Built in:
- "embedded": the small CTC recognizer shipped with vocalign (`vocalign.rewards.ctc_asr`),
  offline on CPU, for the synthetic speech domain; kwargs `path` (a folder written by
  `python -m vocalign.rewards.training.ctc_asr train`), `device`, `batch_size`.
- "whisper": any Whisper checkpoint through `transformers`, from a local folder or a hub
  id; kwargs `path`, `device`, `language`, `task`, `batch_size`, `max_new_tokens`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from vocalign.common.registry import Registry
from vocalign.data.espeak import resample


@runtime_checkable
class ASRBackend(Protocol):
    """Transcribes a batch of mono float32 waveforms, all at `sample_rate`."""

    def transcribe(self, waveforms: Sequence[np.ndarray], sample_rate: int) -> list[str]:
        """One transcript per waveform, in order; an empty waveform gives ""."""
        ...


ASR_SAMPLE_RATE = 16000  # every clip of a batch is brought to one rate, so the ASR runs once

_BACKENDS: Registry[Callable[..., ASRBackend]] = Registry("ASR backend", "Register a new one with @register_asr(name).")
_BUILT: dict[tuple[str, str], ASRBackend] = {}
_LOCK = threading.Lock()

_Factory = TypeVar("_Factory", bound=Callable[..., ASRBackend])


def register_asr(name: str) -> Callable[[_Factory], _Factory]:
    """Class/factory decorator: make a backend buildable as `get_asr(name, **kwargs)`."""

    return _BACKENDS.register(name)


def available_asr() -> list[str]:
    return list(_BACKENDS)


def get_asr(name: str = "embedded", **kwargs: Any) -> ASRBackend:
    """The backend registered as `name`, built with `kwargs` once per process and then reused."""
    factory = _BACKENDS.get(name)
    key = (name, repr(sorted(kwargs.items())))  # repr: kwargs may hold unhashable values (lists, dicts)
    with _LOCK:
        if key not in _BUILT:
            _BUILT[key] = factory(**kwargs)
        return _BUILT[key]


def transcribe_rollouts(rollouts: Sequence[Any], asr: str = "embedded", only: Sequence[int] | None = None,
                        **asr_kwargs: Any) -> list[str | None]:
    """What the `asr` backend hears in each rollout's speech, in one batch at 16 kHz; None for a
    rollout without speech, or not among the indices `only`."""
    wanted = range(len(rollouts)) if only is None else only
    spoken = [i for i in wanted if rollouts[i].waveform is not None and len(rollouts[i].waveform) > 0]
    heard: list[str | None] = [None] * len(rollouts)
    if spoken:
        clips = [resample(np.asarray(rollouts[i].waveform, np.float32), rollouts[i].sample_rate, ASR_SAMPLE_RATE) for i in spoken]
        for i, text in zip(spoken, get_asr(asr, **asr_kwargs).transcribe(clips, ASR_SAMPLE_RATE)):
            heard[i] = text
    return heard


def _spoken(waveforms: Sequence[np.ndarray | None]) -> list[int]:
    """Indices of the clips that hold at least one sample."""
    return [i for i, w in enumerate(waveforms) if w is not None and len(w) > 0]


# --- built-in backends -----------------------------------------------------------------


@register_asr("embedded")
def embedded_asr(path: str | None = None, device: str = "cpu", batch_size: int = 64) -> ASRBackend:
    """The CTC recognizer of `vocalign.rewards.ctc_asr`: the shipped weights, or those in `path`."""
    from vocalign.rewards.ctc_asr import ASSETS, EmbeddedRecognizer

    return EmbeddedRecognizer.load(path or ASSETS, device=device, batch_size=batch_size)


@register_asr("whisper")
class WhisperASR:
    """Whisper through `transformers`: batched greedy generate; clips over 30 s are cut to 30 s.

    `language` ("en", "english", ...) and `task` ("transcribe"/"translate") are passed to
    `generate` when set; left unset, the checkpoint's own generation config decides.
    """

    def __init__(
        self,
        path: str = "openai/whisper-small",
        device: str = "cpu",
        language: str | None = None,
        task: str | None = None,
        batch_size: int = 16,
        max_new_tokens: int = 128,
    ) -> None:
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        try:
            self.processor = WhisperProcessor.from_pretrained(path)
            self.model = WhisperForConditionalGeneration.from_pretrained(path).to(device).eval()
        except (OSError, ValueError) as error:  # a missing folder or file; a malformed hub id
            raise ValueError(
                f"whisper ASR: cannot load a Whisper model and processor from {path!r} ({error}); give `path` "
                "as a local folder saved with save_pretrained (model + processor) or a hub id such as "
                "'openai/whisper-small' (needs the hub, or the files in the local cache)"
            ) from error
        self.device = device
        self.batch_size = batch_size
        self.generate_kwargs = {"max_new_tokens": max_new_tokens}
        self.generate_kwargs.update({k: v for k, v in (("language", language), ("task", task)) if v is not None})

    def transcribe(self, waveforms: Sequence[np.ndarray], sample_rate: int) -> list[str]:
        import torch

        rate = self.processor.feature_extractor.sampling_rate
        texts = [""] * len(waveforms)
        spoken = _spoken(waveforms)
        for start in range(0, len(spoken), self.batch_size):
            chunk = spoken[start : start + self.batch_size]
            clips = [resample(np.asarray(waveforms[i], dtype=np.float32), sample_rate, rate) for i in chunk]
            inputs = self.processor.feature_extractor(
                clips, sampling_rate=rate, return_tensors="pt", return_attention_mask=True
            )
            with torch.inference_mode():
                ids = self.model.generate(
                    inputs.input_features.to(self.device, self.model.dtype),
                    attention_mask=inputs.attention_mask.to(self.device),
                    **self.generate_kwargs,
                )
            for i, text in zip(chunk, self.processor.batch_decode(ids, skip_special_tokens=True)):
                texts[i] = text.strip()
        return texts
