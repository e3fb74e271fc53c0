"""The embedded speech recognizer: a small word-level CTC model for the synthetic speech domain.

Why it exists: rewards that listen to the policy's speech need ASR that runs offline on a
CPU, and generic recognizers fail on espeak-ng speech (pocketsphinx: WER ~0.8). The
domain is closed (the words of `vocalign.data.synthetic`'s tasks, `VOCABULARY`), so a
recognizer trained from scratch on synthesized speech is small (0.61M parameters, 1.2 MB
in fp16) and fast (~5 ms per clip on one CPU core, batched).

Model: 80-bin log-mel (10 ms hop), two stride-2 convolutions (40 ms frames), a 2-layer
bidirectional GRU and one output per word plus the CTC blank; greedy decoding.

This module is what the reward path loads; how the shipped weights were trained and
evaluated is `vocalign.rewards.training.ctc_asr`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import librosa
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vocalign.data.espeak import resample
from vocalign.data.synthetic import STYLE_PHRASES, number_to_words, sentence_words

ASSETS = Path(__file__).parent / "assets"
WEIGHTS_FILE = "ctc_asr.safetensors"
CONFIG_FILE = "ctc_asr.json"
SAMPLE_RATE = 16000
HOP, N_FFT = 160, 400  # 10 ms frames of 25 ms windows

# --- the domain ----------------------------------------------------------------------

_NUMBER_WORDS = [number_to_words(n) for n in range(20)] + [number_to_words(10 * n) for n in range(2, 10)]
_LABELS = ("slow", "normal", "fast", "low", "high", "soft", "loud", "female", "male")
_PERCEPTION = ("is the speech slow normal or fast", "is the voice low normal or high",
               "is the speech soft normal or loud", "is the voice female or male", "transcribe the audio")

# Every word the recognizer knows: numbers (0-99 as the synthetic tasks speak them, plus
# hundred/thousand/minus), the arithmetic questions and their style requests, the
# transcription/perception templates with all their slot words, the perception labels and
# "the answer is". Anything else is heard as the nearest of these words.
VOCABULARY: tuple[str, ...] = tuple(sorted(set(
    " ".join([
        *_NUMBER_WORDS, "hundred thousand minus what is plus the answer",
        *(p for phrases in STYLE_PHRASES.values() for p in phrases.values()), "and",
        *sentence_words(), *_LABELS, *_PERCEPTION,
    ]).split()
)))


# --- features and model ----------------------------------------------------------------


@lru_cache(maxsize=2)
def _mel_filters(n_mels: int) -> torch.Tensor:
    return torch.from_numpy(librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=n_mels)).float()


def log_mel(waveform: np.ndarray, n_mels: int = 80) -> torch.Tensor:
    """[frames, n_mels] log-mel of a 16 kHz clip, floored 80 dB under its peak and scaled
    to zero mean and unit variance, so that loudness does not change the features."""
    wav = torch.from_numpy(np.array(waveform, dtype=np.float32))  # a copy: arrays from Ray are read-only
    if len(wav) < N_FFT:
        wav = torch.nn.functional.pad(wav, (0, N_FFT - len(wav)))
    power = torch.stft(wav, N_FFT, HOP, window=torch.hann_window(N_FFT), return_complex=True).abs() ** 2
    mel = torch.clamp(_mel_filters(n_mels) @ power, min=1e-10).log10()
    mel = torch.maximum(mel, mel.max() - 8.0)
    return ((mel - mel.mean()) / (mel.std() + 1e-5)).T.contiguous()


@dataclass(frozen=True)
class RecognizerConfig:
    """The model's shape and its vocabulary (output k+1 is word k; output 0 is the CTC blank)."""

    vocabulary: tuple[str, ...] = VOCABULARY
    n_mels: int = 80
    channels: int = 32
    hidden: int = 128
    layers: int = 2


def _conv_frames(frames: torch.Tensor) -> torch.Tensor:
    for _ in range(2):  # two convolutions, kernel 3, stride 2, padding 1
        frames = (frames - 1) // 2 + 1
    return frames


class CTCRecognizer(nn.Module):
    """log-mel -> 2 stride-2 convs -> BiGRU -> per-frame word logits (40 ms frames)."""

    def __init__(self, config: RecognizerConfig) -> None:
        super().__init__()
        self.config = config
        c = config.channels
        self.conv = nn.Sequential(
            nn.Conv2d(1, c, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(c, c, 3, stride=2, padding=1), nn.GELU(),
        )
        freq = _conv_frames(torch.tensor(config.n_mels)).item()
        # LayerNorm before the GRU: CTC from scratch leaves its all-blank plateau much sooner.
        self.project = nn.Sequential(nn.Linear(c * freq, config.hidden), nn.LayerNorm(config.hidden))
        self.rnn = nn.GRU(config.hidden, config.hidden, num_layers=config.layers, batch_first=True,
                          bidirectional=True, dropout=0.1)
        self.out = nn.Linear(2 * config.hidden, len(config.vocabulary) + 1)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B, T, n_mels] (zero-padded), lengths [B] -> logits [B, T', V+1], lengths [B]."""
        x = self.conv(features.unsqueeze(1))  # [B, C, T', F']
        x = self.project(x.permute(0, 2, 1, 3).flatten(2))
        out_lengths = _conv_frames(lengths)
        packed = nn.utils.rnn.pack_padded_sequence(x, out_lengths.cpu(), batch_first=True, enforce_sorted=False)
        x, _ = self.rnn(packed)
        x, _ = nn.utils.rnn.pad_packed_sequence(x, batch_first=True)
        return self.out(x), out_lengths


def _batch(features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(f) for f in features])
    return nn.utils.rnn.pad_sequence(list(features), batch_first=True), lengths


def greedy_decode(logits: torch.Tensor, lengths: torch.Tensor, vocabulary: Sequence[str]) -> list[str]:
    """Best path per clip: the argmax word per frame, repeats merged, blanks dropped."""
    best = logits.argmax(-1).tolist()
    texts = []
    for path, n in zip(best, lengths.tolist()):
        words = [vocabulary[k - 1] for k, _ in itertools.groupby(path[:n]) if k != 0]
        texts.append(" ".join(words))
    return texts


# --- loading and transcribing ------------------------------------------------------------


class EmbeddedRecognizer:
    """The trained CTCRecognizer behind the ASR interface (`transcribe`)."""

    def __init__(self, model: CTCRecognizer, device: str = "cpu", batch_size: int = 64) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.batch_size = batch_size

    @classmethod
    def load(cls, path: str | Path = ASSETS, device: str = "cpu", batch_size: int = 64) -> EmbeddedRecognizer:
        """Weights and vocabulary saved by `save` (default: the ones shipped with vocalign)."""
        folder = Path(path)
        if not (folder / WEIGHTS_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"no embedded recognizer in {str(folder)!r}: it needs {WEIGHTS_FILE} and {CONFIG_FILE}; "
                "train one with `python -m vocalign.rewards.training.ctc_asr train --out DIR`, or leave the path out "
                "to use the shipped one"
            )
        saved = json.loads((folder / CONFIG_FILE).read_text())
        config = RecognizerConfig(**{**saved["model"], "vocabulary": tuple(saved["model"]["vocabulary"])})
        model = CTCRecognizer(config)
        model.load_state_dict({k: v.float() for k, v in load_file(folder / WEIGHTS_FILE).items()})
        return cls(model, device, batch_size)

    @torch.inference_mode()
    def transcribe(self, waveforms: Sequence[np.ndarray], sample_rate: int) -> list[str]:
        """One transcript per clip; an empty clip gives ""."""
        texts = [""] * len(waveforms)
        spoken = [i for i, w in enumerate(waveforms) if w is not None and len(w) > 0]
        for start in range(0, len(spoken), self.batch_size):
            chunk = spoken[start : start + self.batch_size]
            features = [log_mel(resample(np.asarray(waveforms[i], np.float32), sample_rate, SAMPLE_RATE),
                                self.model.config.n_mels) for i in chunk]
            batch, lengths = _batch(features)
            logits, out_lengths = self.model(batch.to(self.device), lengths)
            for i, text in zip(chunk, greedy_decode(logits.cpu(), out_lengths, self.model.config.vocabulary)):
                texts[i] = text
        return texts


def save(model: CTCRecognizer, folder: Path, provenance: dict) -> None:
    """fp16 weights (half the size of fp32; `load` computes in fp32) and a JSON with the
    config, vocabulary and how the weights were made."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, folder / WEIGHTS_FILE)
    info = {"model": {**asdict(model.config), "vocabulary": list(model.config.vocabulary)}, "training": provenance}
    (folder / CONFIG_FILE).write_text(json.dumps(info, indent=1) + "\n")
