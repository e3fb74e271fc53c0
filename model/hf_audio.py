"""`transformers`-native audio LMs behind the `AudioLM` interface: Qwen2-Audio.

`Qwen2AudioLM` wraps a `Qwen2AudioForConditionalGeneration` and uses its own parts:

    16 kHz audio -> log-mel (`config.audio_config.num_mel_bins` bins, 100 Hz, padded to
      the encoder's fixed window of 2 * max_source_positions frames)
      -> `audio_tower` (Whisper-style encoder + 2x average pooling: 25 Hz)
      -> `multi_modal_projector` (one linear layer into the LM width)
      -> `language_model` + `lm_head`; projected frames replace the placeholder tokens
         (`config.audio_token_id`) of the prompt.

so `Policy(Qwen2AudioLM(hf_model), chat_tokenizer)` generates, scores and trains with
LoRA exactly like the embedded Step-Audio-2-style model. The parts are registered under
the names `Policy` expects (`encoder`, `adaptor`, `lm`), so LoRA wraps the language
model only and the audio tower stays frozen.

Chat format. vocalign renders Step-Audio 2's chat format (`vocalign.model.chat`), whose
special tokens and `<audio_k>` speech tokens a released Qwen2-Audio tokenizer does not
have. `add_chat_tokens` adds them (`tokenizer.add_tokens`), sizes the embeddings to
the new vocabulary, initialises the new rows (Qwen's own counterparts where there is one:
`<|BOT|>` from `<|im_start|>`, `<|EOT|>` from `<|im_end|>`, `<audio_patch>` from
`<|AUDIO|>`, ...; else the mean embedding) and makes `<audio_patch>` the model's audio
placeholder (`config.audio_token_id`). The new tokens start untrained: run an SFT stage
in this format before RL. `load_qwen2_audio_policy(folder)` does all of it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, Qwen2AudioForConditionalGeneration
from transformers.masking_utils import create_bidirectional_mask

from . import chat
from .detokenizer import build_detokenizer
from .features import HOP, N_FFT, SAMPLE_RATE, log_mel
from .policy import Policy, place_audio, save_merged
from .tokenizer import ChatTokenizer

# New chat tokens that start from the embedding of a Qwen2-Audio token with the same role.
QWEN_COUNTERPARTS = {
    chat.BOT: "<|im_start|>",
    chat.EOT: "<|im_end|>",
    chat.PAD: "<|endoftext|>",
    chat.AUDIO_START: "<|audio_bos|>",
    chat.AUDIO_PATCH: "<|AUDIO|>",
    chat.AUDIO_END: "<|audio_eos|>",
}


def valid_mel_frames(n_samples: int) -> int:
    """Log-mel frames that hold a clip of `n_samples`, as Whisper's feature extractor counts them."""
    return max(1, math.ceil(n_samples / HOP))


class Qwen2AudioLM(nn.Module):
    """A `Qwen2AudioForConditionalGeneration` as an `AudioLM` (see the module docstring)."""

    def __init__(self, hf_model: Qwen2AudioForConditionalGeneration) -> None:
        super().__init__()
        if not isinstance(hf_model, Qwen2AudioForConditionalGeneration):
            raise TypeError(
                f"Qwen2AudioLM wraps a transformers Qwen2AudioForConditionalGeneration, got {type(hf_model).__name__}; "
                "load one with Qwen2AudioLM.from_pretrained(folder)"
            )
        self.config = hf_model.config
        self.encoder = hf_model.model.audio_tower
        self.adaptor = hf_model.model.multi_modal_projector
        self.lm = hf_model.model.language_model
        self.lm_head = hf_model.lm_head
        # Kept outside the module tree (its parts are in it, under the names above):
        # registering it too would list every weight twice.
        self.__dict__["hf_model"] = hf_model

    @property
    def audio_token_id(self) -> int:
        return self.config.audio_token_id

    @property
    def max_audio_seconds(self) -> float:
        return 2 * self.encoder.config.max_source_positions * HOP / SAMPLE_RATE

    # -- audio -------------------------------------------------------------------------
    def encode_audio(self, waveforms: list) -> list[torch.Tensor]:
        """Audio-tower frames (25 Hz) for each 16 kHz clip, cut to the clip's own length.

        As Qwen2-Audio does: the mel is padded to the encoder's whole window and the
        padding is masked out of the encoder's self-attention.
        """
        cfg = self.encoder.config
        window = 2 * cfg.max_source_positions
        too_long = [i for i, w in enumerate(waveforms) if len(w) > window * HOP]
        if too_long:
            i = too_long[0]
            raise ValueError(
                f"audio clip {i} is {len(waveforms[i]) / SAMPLE_RATE:.2f} s long; this Qwen2-Audio model takes at most "
                f"{self.max_audio_seconds:.2f} s per clip: cut the clip"
            )
        weight = self.encoder.conv1.weight
        mel = log_mel(waveforms, cfg.num_mel_bins, window).to(weight)
        lengths = torch.tensor([valid_mel_frames(len(w)) for w in waveforms], device=weight.device)
        conv_lengths, out_lengths = self.encoder._get_feat_extract_output_lengths(lengths)
        n_conv = cfg.max_source_positions
        valid = (torch.arange(n_conv, device=weight.device)[None, :] < conv_lengths[:, None]).long()
        mask = create_bidirectional_mask(
            config=cfg, inputs_embeds=torch.zeros(len(waveforms), n_conv, 1, dtype=weight.dtype, device=weight.device),
            attention_mask=valid,
        )
        frames = self.encoder(mel, attention_mask=mask).last_hidden_state
        return [frames[i, :n] for i, n in enumerate(out_lengths.tolist())]

    def audio_placeholders(self, n_samples: int) -> int:
        _, out = self.encoder._get_feat_extract_output_lengths(torch.tensor(valid_mel_frames(n_samples)))
        return int(out)

    # -- language model ----------------------------------------------------------------
    def input_embeddings(self, input_ids: torch.Tensor, encoded: list[torch.Tensor] | None) -> torch.Tensor:
        """Token embeddings, with each clip's projected frames in its placeholder slots (row order)."""
        embeds = self.lm.get_input_embeddings()(input_ids)
        if encoded:
            fix = f"config.audio_token_id must be the tokenizer's {chat.AUDIO_PATCH} id (add_chat_tokens sets it)"
            embeds = place_audio(embeds, input_ids, self.audio_token_id, self.adaptor(torch.cat(encoded)), fix)
        return embeds

    def decode(self, inputs_embeds, attention_mask, position_ids, cache=None, use_cache=False):
        """Run the language model and its head; returns (logits, KV cache)."""
        out = self.lm(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, use_cache=use_cache,
        )
        return self.lm_head(out.last_hidden_state), out.cache

    def hidden_states(self, inputs_embeds, attention_mask, position_ids) -> torch.Tensor:
        """The language model's last hidden states [B, T, H] (no LM head): what a value head reads."""
        return self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state

    # -- save / load -------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        """Save as a standard Qwen2-Audio checkpoint (weights and config; the tokenizer is saved apart).

        Under LoRA the adapters are merged into a copy of the model first, which needs
        memory for a second model; to keep only the adapter, save `Policy.trainable_state()`.
        """
        save_merged(self, folder)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, n_audio_tokens: int = 0, dtype: torch.dtype | str = torch.float32
    ) -> tuple["Qwen2AudioLM", ChatTokenizer]:
        """Load a local Qwen2-Audio checkpoint and its tokenizer, with the chat tokens added.

        `n_audio_tokens` is the size of the speech detokenizer's unit inventory (0: the
        model only hears); see `add_chat_tokens`. Nothing is downloaded: `folder` is a
        local copy (e.g. from `huggingface-cli download Qwen/Qwen2-Audio-7B-Instruct`).
        """
        folder = Path(folder)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"{folder} holds no config.json; pass the local folder of a Qwen2-Audio checkpoint")
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        if model_type != "qwen2_audio":
            raise ValueError(f"{folder}/config.json is a {model_type!r} model; Qwen2AudioLM loads model_type 'qwen2_audio'")
        hf_model = Qwen2AudioForConditionalGeneration.from_pretrained(folder, dtype=dtype)
        check_feature_extractor(folder, hf_model.config.audio_config.num_mel_bins)
        tokenizer = add_chat_tokens(hf_model, AutoTokenizer.from_pretrained(folder), n_audio_tokens)
        return cls(hf_model), tokenizer


def check_feature_extractor(folder: str | Path, num_mel_bins: int) -> None:
    """Fail early when the checkpoint's feature extractor is not the log-mel `features.log_mel` computes."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    ours = {"feature_size": num_mel_bins, "sampling_rate": SAMPLE_RATE, "hop_length": HOP, "n_fft": N_FFT}
    differ = {k: (saved[k], v) for k, v in ours.items() if k in saved and saved[k] != v}
    if differ:
        raise ValueError(
            f"{path} describes features vocalign does not compute: {differ} (saved, ours); "
            "vocalign's log-mel is Whisper's at 16 kHz, hop 160, n_fft 400"
        )


def add_chat_tokens(hf_model, tokenizer, n_audio_tokens: int = 0) -> ChatTokenizer:
    """Give a released Qwen2-Audio model and tokenizer vocalign's chat format.

    Adds the missing chat special tokens and `<audio_0>` ... `<audio_{n-1}>` with
    `tokenizer.add_tokens(..., special_tokens=True)`, sizes the model's embeddings and
    head to the vocabulary (released checkpoints keep spare rows, ids no tokenizer
    decodes, which a policy must not sample), sets each new row to its Qwen counterpart's
    (`QWEN_COUNTERPARTS`) or to the mean of the old rows, and makes `<audio_patch>` the
    audio placeholder. Tokens already there are kept as they are, so calling it on a
    saved, extended model changes nothing. `hf_model` and `tokenizer` change in place;
    the returned `ChatTokenizer` wraps `tokenizer`.
    """
    vocab = tokenizer.get_vocab()
    old_len = len(tokenizer)
    present_audio = sum(1 for t in vocab if re.fullmatch(r"<audio_\d+>", t))
    if present_audio and n_audio_tokens and present_audio != n_audio_tokens:
        raise ValueError(
            f"the tokenizer already holds {present_audio} <audio_k> tokens but n_audio_tokens={n_audio_tokens}; "
            "use the detokenizer the model was extended for"
        )
    new_tokens = [t for t in chat.SPECIAL_TOKENS if t not in vocab]
    if not present_audio:
        new_tokens += [chat.audio_token(k) for k in range(n_audio_tokens)]
    tokenizer.add_tokens(new_tokens, special_tokens=True)
    if hf_model.get_input_embeddings().num_embeddings != len(tokenizer):
        hf_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if new_tokens:
        new_ids = tokenizer.convert_tokens_to_ids(new_tokens)
        aliases = [
            (tokenizer.convert_tokens_to_ids(t), vocab[QWEN_COUNTERPARTS[t]])
            for t in new_tokens if QWEN_COUNTERPARTS.get(t) in vocab
        ]
        embed, head = hf_model.get_input_embeddings().weight, hf_model.get_output_embeddings().weight
        with torch.no_grad():
            for weight in [embed] if head is embed else [embed, head]:
                weight[new_ids] = weight[:old_len].mean(0)
                for new, old in aliases:
                    weight[new] = weight[old]
    hf_model.config.audio_token_id = tokenizer.convert_tokens_to_ids(chat.AUDIO_PATCH)
    return ChatTokenizer(tokenizer)


def load_qwen2_audio_policy(folder: str | Path, detokenizer: str | None = None, dtype: torch.dtype | str = torch.float32) -> Policy:
    """A `Policy` over a local Qwen2-Audio checkpoint.

    With `detokenizer` (a registered name, e.g. "espeak_units") the vocabulary gets one
    `<audio_k>` token per unit, so the model can learn to speak; without, it only hears.
    """
    detok = build_detokenizer(detokenizer) if detokenizer else None
    model, tokenizer = Qwen2AudioLM.from_pretrained(folder, len(detok.units) if detok else 0, dtype)
    return Policy(model, tokenizer, detok)
