"""The Step-Audio 2 architecture, built from `transformers` parts.

    16 kHz audio -> log-mel (100 Hz)
      -> audio encoder (Qwen2-Audio/Whisper encoder with 2x average pooling): 25 Hz frames
      -> adaptor: Conv1d(kernel 3, stride 2) to 12.5 Hz, then a 2-layer MLP into the LM width
      -> Qwen2 causal LM, whose vocabulary holds text, chat special tokens and audio tokens;
         adaptor frames replace the <audio_patch> placeholders of the prompt.

The encoder is frozen during RL (its outputs can be cached per prompt). The same module
at small scale is the embedded default; real checkpoints load into the same classes.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2_audio.configuration_qwen2_audio import Qwen2AudioEncoderConfig
from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

from .features import SAMPLE_RATE, log_mel, mel_frames
from .policy import CausalLMParts, place_audio

CONFIG_NAME = "vocalign_config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class StepAudio2Config:
    """Sizes of the three parts. `text` and `encoder` are `transformers` config kwargs."""

    text: dict = field(default_factory=dict)
    encoder: dict = field(default_factory=dict)
    adaptor_hidden: int = 256
    audio_patch_id: int = -1
    interleave_ratio: tuple[int, int] = (1, 4)
    detokenizer: str = "espeak_units"
    architecture: str = "step_audio2"

    @property
    def max_audio_seconds(self) -> float:
        # the encoder takes a fixed window of 2 * max_source_positions mel frames (10 ms each)
        return 2 * self.encoder["max_source_positions"] / 100.0


def tiny_config(vocab_size: int, audio_patch_id: int, max_audio_seconds: float = 4.0) -> StepAudio2Config:
    """The embedded default: 2.53M parameters, trainable on 2 CPU cores."""
    return StepAudio2Config(
        text=dict(
            vocab_size=vocab_size, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            tie_word_embeddings=True, rope_theta=10000.0, attention_dropout=0.0,
        ),
        encoder=dict(
            num_mel_bins=80, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=512,
            d_model=128, max_source_positions=int(max_audio_seconds * 50),
        ),
        adaptor_hidden=256,
        audio_patch_id=audio_patch_id,
    )


def encoder_frames(n_samples: int) -> int:
    """How many valid 25 Hz encoder frames a clip of `n_samples` (16 kHz) yields."""
    f = mel_frames(n_samples)
    f = (f - 1) // 2 + 1  # encoder conv, stride 2: 50 Hz
    return max(1, f // 2)  # average pooling: 25 Hz


def adaptor_frames(n_samples: int) -> int:
    """How many 12.5 Hz adaptor frames (= <audio_patch> placeholders) a clip yields."""
    return (encoder_frames(n_samples) - 1) // 2 + 1  # adaptor conv, stride 2


# Clips are padded to a multiple of this many mel frames (0.32 s) and encoded with clips
# of the same padded length only, so a clip's encoding never depends on its batch.
PAD_BUCKET = 32


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's sinusoidal position embeddings: [length, channels], sines then cosines."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2))
    angles = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class Adaptor(nn.Module):
    """25 Hz encoder frames -> 12.5 Hz LM embeddings: Conv1d(k=3, s=2), then an MLP."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(d_in, d_hidden, kernel_size=3, stride=2, padding=1)
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(d_hidden, d_out), nn.GELU(), nn.Linear(d_out, d_out))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:  # [B, T, d_in] -> [B, ceil(T/2), d_out]
        return self.mlp(self.conv(frames.transpose(1, 2)).transpose(1, 2))


class StepAudio2Model(CausalLMParts, nn.Module):
    def __init__(self, config: StepAudio2Config) -> None:
        super().__init__()
        self.config = config
        self.encoder = Qwen2AudioEncoder(Qwen2AudioEncoderConfig(**config.encoder))
        self.lm = Qwen2ForCausalLM(Qwen2Config(**config.text))
        self.adaptor = Adaptor(config.encoder["d_model"], config.adaptor_hidden, config.text["hidden_size"])
        with torch.no_grad():  # Whisper's fixed sinusoidal positions; transformers leaves them random here
            self.encoder.embed_positions.weight.copy_(sinusoids(*self.encoder.embed_positions.weight.shape))

    # -- audio -------------------------------------------------------------------------
    def encode_audio(self, waveforms: list) -> list[torch.Tensor]:
        """Encoder frames (25 Hz) for each 16 kHz clip, cut to the clip's own length."""
        n_frames = 2 * self.config.encoder["max_source_positions"]
        too_long = [i for i, w in enumerate(waveforms) if len(w) > n_frames * 160]
        if too_long:
            raise ValueError(
                f"audio clip {too_long[0]} is {len(waveforms[too_long[0]]) / SAMPLE_RATE:.2f} s long; this model "
                f"takes at most {self.config.max_audio_seconds:.2f} s per clip: cut the clip, or build the model for "
                "longer clips (recipe key model.max_audio_seconds; a run checks its data files against it when they load)"
            )
        # The encoder's own forward insists on its full window; run its parts on each
        # clip's bucket length instead (see PAD_BUCKET).
        enc = self.encoder
        buckets: dict[int, list[int]] = {}
        for i, w in enumerate(waveforms):
            buckets.setdefault(min(n_frames, -(-mel_frames(len(w)) // PAD_BUCKET) * PAD_BUCKET), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(waveforms)
        for length, rows in buckets.items():
            mel = log_mel([waveforms[i] for i in rows], self.config.encoder["num_mel_bins"], length).to(enc.conv1.weight)
            x = F.gelu(enc.conv2(F.gelu(enc.conv1(mel)))).transpose(1, 2)
            x = x + enc.embed_positions.weight[: x.shape[1]]
            for layer in enc.layers:
                x = layer(x, None)
            x = enc.layer_norm(enc.avg_pooler(x.transpose(1, 2)).transpose(1, 2))
            for k, i in enumerate(rows):
                out[i] = x[k, : encoder_frames(len(waveforms[i]))]
        return out

    def audio_placeholders(self, n_samples: int) -> int:
        return adaptor_frames(n_samples)

    # -- language model ----------------------------------------------------------------
    def input_embeddings(self, input_ids: torch.Tensor, encoded: list[torch.Tensor] | None) -> torch.Tensor:
        """Token embeddings, with each clip's adaptor frames in its <audio_patch> slots (row order)."""
        embeds = self.lm.get_input_embeddings()(input_ids)
        if encoded:
            frames = torch.cat([self.adaptor(e.unsqueeze(0))[0] for e in encoded])
            fix = "render prompts with the policy's tokenizer"
            embeds = place_audio(embeds, input_ids, self.config.audio_patch_id, frames, fix)
        return embeds

    # -- save / load -------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.config.text.get("tie_word_embeddings"):
            state.pop("lm.lm_head.weight", None)  # shared with the input embedding
        save_file(state, str(folder / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "StepAudio2Model":
        folder = Path(folder)
        if not (folder / CONFIG_NAME).exists():
            raise FileNotFoundError(f"{folder} holds no {CONFIG_NAME}; is it a folder written by save_pretrained?")
        raw = json.loads((folder / CONFIG_NAME).read_text())
        raw["interleave_ratio"] = tuple(raw["interleave_ratio"])
        model = cls(StepAudio2Config(**raw))
        missing, unexpected = model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)), strict=False)
        missing = [k for k in missing if k != "lm.lm_head.weight"]
        if missing or unexpected:
            raise ValueError(f"{folder / WEIGHTS_NAME} does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.lm.tie_weights()
        return model
