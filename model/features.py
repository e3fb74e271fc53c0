"""Whisper-style log-mel features: 16 kHz audio -> 100 frames per second."""

from __future__ import annotations

from functools import lru_cache

import librosa
import numpy as np
import torch

SAMPLE_RATE = 16000
HOP = 160  # 10 ms
N_FFT = 400  # 25 ms


@lru_cache(maxsize=4)
def _mel_filters(n_mels: int) -> torch.Tensor:
    return torch.from_numpy(librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=n_mels)).float()


def mel_frames(n_samples: int) -> int:
    """Number of log-mel frames for a clip of `n_samples` (16 kHz)."""
    return max(1, n_samples // HOP)


def log_mel(waveforms: list[np.ndarray], n_mels: int, n_frames: int) -> torch.Tensor:
    """Log-mel spectrograms, padded with silence or cut to `n_frames`: [B, n_mels, n_frames].

    Scaled as Whisper does: log10, floored 8 below the clip's max, then (x + 4) / 4.
    """
    n_samples = n_frames * HOP
    batch = torch.zeros(len(waveforms), n_samples)
    for i, w in enumerate(waveforms):
        w = torch.tensor(np.asarray(w[:n_samples], dtype=np.float32))  # a copy: Ray delivers read-only arrays
        batch[i, : len(w)] = w
    stft = torch.stft(batch, N_FFT, HOP, window=torch.hann_window(N_FFT), return_complex=True)
    power = stft[..., :-1].abs() ** 2
    mel = _mel_filters(n_mels) @ power
    logmel = torch.clamp(mel, min=1e-10).log10()
    logmel = torch.maximum(logmel, logmel.amax(dim=(1, 2), keepdim=True) - 8.0)
    return (logmel + 4.0) / 4.0
