"""A `transformers` audio classifier as a reward backend (emotion, speaker traits, ...).

Any folder or hub id that `AutoModelForAudioClassification` and `AutoFeatureExtractor`
load works; its `config.id2label` names the labels that rows ask for. Loaded
classifiers are cached per process, so a reward called every step loads once.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from vocalign.data.espeak import resample

SCORE_MODES = ("probability", "argmax")


@dataclass
class AudioClassifier:
    """A loaded audio-classification model with its feature extractor."""

    path: str
    model: Any  # a transformers *ForAudioClassification, in eval mode
    feature_extractor: Any
    labels: list[str]  # index -> label, from config.id2label
    batch_size: int = 16

    @property
    def sample_rate(self) -> int:
        return int(self.feature_extractor.sampling_rate)

    def label_index(self, label: Any) -> int:
        """The output index of `label`, looked up by name (case-insensitively)."""
        folded = [name.casefold() for name in self.labels]
        key = str(label).casefold()
        if key in folded:
            return folded.index(key)
        close = difflib.get_close_matches(str(label), self.labels, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(
            f"audio classifier {self.path!r} has no label {label!r}; {hint}its labels (config.id2label): "
            f"{', '.join(self.labels)}. Fix the rows' labels or choose a classifier trained on them"
        )

    @torch.no_grad()
    def probabilities(self, waveforms: Sequence[np.ndarray], sample_rates: Sequence[int]) -> np.ndarray:
        """(clips, labels) softmax probabilities; clips are resampled to the extractor's rate."""
        out = []
        for start in range(0, len(waveforms), self.batch_size):
            batch = [
                resample(np.asarray(w, dtype=np.float32), int(sr), self.sample_rate)
                for w, sr in zip(waveforms[start : start + self.batch_size], sample_rates[start : start + self.batch_size])
            ]
            inputs = self.feature_extractor(
                batch, sampling_rate=self.sample_rate, return_tensors="pt", padding=True,
                return_attention_mask=True,
            )
            logits = self.model(**inputs).logits.float()
            out.append(torch.softmax(logits, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.labels)), dtype=np.float32)

    def label_scores(
        self,
        waveforms: Sequence[np.ndarray],
        sample_rates: Sequence[int],
        labels: Sequence[Any],
        mode: str = "probability",
    ) -> list[float]:
        """Per clip, the probability of its label (`probability`) or 1.0/0.0 for whether
        its label is the top one (`argmax`)."""
        if mode not in SCORE_MODES:
            raise ValueError(f"audio classifier score mode {mode!r} is not known; use one of {', '.join(SCORE_MODES)}")
        index = [self.label_index(label) for label in labels]
        probs = self.probabilities(waveforms, sample_rates)
        if mode == "argmax":
            return [float(p.argmax() == k) for p, k in zip(probs, index)]
        return [float(p[k]) for p, k in zip(probs, index)]


@lru_cache(maxsize=4)
def load_classifier(path: str) -> AudioClassifier:
    """The classifier at `path` (a folder or hub id), loaded once per process."""
    from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

    try:
        feature_extractor = AutoFeatureExtractor.from_pretrained(path)
        model = AutoModelForAudioClassification.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"audio classifier {path!r} could not be loaded ({error}); give a folder or hub id with a "
            "transformers audio-classification model and its feature extractor (preprocessor_config.json)"
        ) from error
    model.eval()
    id2label = model.config.id2label
    labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
    return AudioClassifier(path=path, model=model, feature_extractor=feature_extractor, labels=labels)
