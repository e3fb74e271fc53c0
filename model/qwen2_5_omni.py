"""Qwen2.5-Omni: a thinker that hears and writes text, a talker that speaks it as codec
tokens, and token2wav (a DiT and BigVGAN) that turns the codes into a 24 kHz waveform,
loaded through `transformers`' `Qwen2_5OmniForConditionalGeneration` from a folder laid
out as the released checkpoints are.

`OmniSpeech` samples both token streams itself, with the project's seeded inverse-CDF
sampler (`sample_tokens`, one uniform per token from a per-(seed, prompt, sample, stream)
generator), so it knows each token's log-probability, and computes the same
log-probabilities again, teacher-forced and differentiable, for training (`logprobs`).
How the talker is conditioned is the released model's (transformers'
`Qwen2_5OmniForConditionalGeneration.generate`):

- its prompt rows are the thinker's last hidden state plus its input embedding at every
  prompt position (audio placeholders' embeddings zeroed), then the speaker's text-bos
  embedding plus the codec pad embedding, then reply[0] plus the codec bos embedding;
- reply[j] is the thinker's last hidden state plus input embedding of its response token
  j; the talker's step k reads the embedding of its code k-1 plus reply[k], the replies
  followed by the text-eos and then text-pad embeddings (the pad for ever after);
- it stops at the codec eos or pad code. Codes token2wav cannot render (at or above the
  DiT's `num_embeds`, and codec bos) are never sampled, in generation and in training
  alike, so the log-probabilities are those of the distribution sampled from.

The thinker's hidden states reach the talker detached: each part's policy gradient
trains that part (see `logprobs`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vocalign.data.types import Prompt

from .sampling import Sampling, row_seed, sample_tokens

OUTPUT_RATE = 24_000  # token2wav's waveform (BigVGAN: 240 samples per mel frame, 100 frames per second)
INPUT_RATE = 16_000  # the Whisper features of the audio prompt
DEFAULT_SYSTEM = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
                  "auditory and visual inputs, as well as generating text and speech.")
SPEAKER_FILE = "spk_dict.pt"
CHAT_ROLES = {"human": "user"}  # vocalign's turn roles as Qwen's chat template names them
# what a released checkpoint folder must hold for vocalign to load it (besides the weights)
REQUIRED_FILES = {"config.json": "the model's configuration", SPEAKER_FILE: "the voices token2wav speaks with",
                  "preprocessor_config.json": "the Whisper feature extractor of the audio prompt",
                  "tokenizer_config.json": "the tokenizer"}


class OmniCheckpointError(ValueError):
    """A folder that is not a loadable Qwen2.5-Omni checkpoint; the message names the file."""


@dataclass
class OmniInputs:
    """One prompt, ready for the thinker."""

    ids: torch.Tensor  # [1, L]
    features: torch.Tensor | None  # [1, mel bins, frames]: the audio prompt's Whisper features
    feature_mask: torch.Tensor | None  # [1, frames]


@dataclass
class OmniSample:
    """One spoken response: the thinker's text tokens and the talker's codes, each with the
    log-probability it was sampled with, and the waveform token2wav made of the codes."""

    text_ids: list[int]
    text_logprobs: list[float]
    codes: list[int]  # the talker's codes, its stop code last when it stopped
    code_logprobs: list[float]
    waveform: np.ndarray | None
    sample_rate: int = OUTPUT_RATE


def check_checkpoint(folder: str | Path) -> Path:
    """`folder` as a Path, or an `OmniCheckpointError` naming what is wrong with it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise OmniCheckpointError(f"{folder} is not a folder; model.path must name a Qwen2.5-Omni checkpoint folder")
    config = folder / "config.json"
    if config.is_file():
        kind = json.loads(config.read_text()).get("model_type")
        if kind != "qwen2_5_omni":
            raise OmniCheckpointError(f"{config} says model_type {kind!r}, not 'qwen2_5_omni': {folder} is not a "
                                      "Qwen2.5-Omni checkpoint")
    for name, what in REQUIRED_FILES.items():
        if not (folder / name).is_file():
            raise OmniCheckpointError(f"{folder / name} is missing ({what}); a released Qwen2.5-Omni folder has it")
    return folder


class OmniSpeech(nn.Module):
    """A Qwen2.5-Omni model that samples and scores its text and its speech codes."""

    def __init__(self, hf_model, tokenizer, feature_extractor, system: str = DEFAULT_SYSTEM) -> None:
        super().__init__()
        self.hf = hf_model
        self.tokenizer, self.features, self.system = tokenizer, feature_extractor, system
        tc = hf_model.config.thinker_config
        self.audio_id = tc.audio_token_index
        self.stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        talker = hf_model.talker
        self.codec = {"pad": talker.codec_pad_token, "bos": talker.codec_bos_token, "eos": talker.codec_eos_token,
                      "mask": talker.codec_mask_token}
        renderable = hf_model.config.token2wav_config.dit_config.num_embeds
        self.code_stops = [self.codec["eos"], self.codec["pad"]]
        allowed = torch.zeros(talker.config.vocab_size, dtype=torch.bool)
        allowed[: min(renderable, talker.config.vocab_size)] = True
        allowed[self.codec["bos"]] = False
        allowed[self.code_stops] = True
        self.register_buffer("code_allowed", allowed, persistent=False)

    # -- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: str | Path, dtype: torch.dtype = torch.float32, system: str = DEFAULT_SYSTEM) -> OmniSpeech:
        from transformers import AutoTokenizer, Qwen2_5OmniForConditionalGeneration, WhisperFeatureExtractor

        folder = check_checkpoint(folder)
        hf = Qwen2_5OmniForConditionalGeneration.from_pretrained(folder, dtype=dtype, local_files_only=True)
        hf.token2wav.float()  # token2wav runs in float32 only
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        return cls(hf.eval(), tokenizer, WhisperFeatureExtractor.from_pretrained(folder, local_files_only=True), system)

    def save_pretrained(self, folder: str | Path) -> None:
        """The model in the released layout (LoRA adapters merged into a copy first), with its
        voices, tokenizer and feature extractor: `load` reads it back."""
        import copy

        folder = Path(folder)
        hf = self.hf
        if hasattr(hf, "merge_and_unload"):  # a peft wrapper
            hf = copy.deepcopy(hf).merge_and_unload()
        hf.save_pretrained(folder)
        torch.save(hf.speaker_map, folder / SPEAKER_FILE)
        self.tokenizer.save_pretrained(folder)
        self.features.save_pretrained(folder)

    @property
    def speakers(self) -> list[str]:
        return sorted(self.hf.speaker_map)

    def speaker(self, name: str) -> dict:
        if name not in self.hf.speaker_map:
            raise ValueError(f"speaker {name!r} is not one of this checkpoint's voices ({', '.join(self.speakers)}, "
                             f"from {SPEAKER_FILE}); set model.speaker to one of them")
        return self.hf.speaker_map[name]

    @property
    def device(self) -> torch.device:
        return self.hf.thinker.lm_head.weight.device

    # -- prompts -------------------------------------------------------------------------
    def inputs(self, prompt: Prompt) -> OmniInputs:
        """The chat text (system prompt, turns, the assistant's opening) with each audio turn's
        placeholders, and the audio's Whisper features."""
        from vocalign.data.espeak import resample

        messages = prompt.messages
        system = self.system
        if messages and messages[0].role == "system":  # the prompt's own system turn replaces the default
            system, messages = messages[0].content, messages[1:]
        text, clips = f"<|im_start|>system\n{system}<|im_end|>\n", []
        for m in messages:
            body = m.content
            if m.audio is not None:
                wav = resample(np.asarray(m.audio.waveform, np.float32), m.audio.sample_rate, INPUT_RATE)
                frames = len(wav) // self.features.hop_length
                n = ((frames - 1) // 2 + 1 - 2) // 2 + 1  # the audio encoder's output length
                body = "<|audio_bos|>" + "<|AUDIO|>" * n + "<|audio_eos|>" + body
                clips.append(wav)
            text += f"<|im_start|>{CHAT_ROLES.get(m.role, m.role)}\n{body}<|im_end|>\n"
        text += "<|im_start|>assistant\n"
        ids = torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]], device=self.device)
        if not clips:
            return OmniInputs(ids, None, None)
        feats = self.features(clips, sampling_rate=INPUT_RATE, return_attention_mask=True, padding="longest",
                              return_tensors="pt")
        return OmniInputs(ids, feats["input_features"].to(self.device, self.hf.thinker.dtype),
                          feats["attention_mask"].to(self.device))

    def _prompt_embeddings(self, inputs: OmniInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(thinker input embeddings with the audio placed, [1, L, H]; the 3-row positions [3, 1, L])."""
        thinker = self.hf.thinker.model
        embeds = thinker.get_input_embeddings()(inputs.ids)
        lengths = None
        if inputs.features is not None:
            features = thinker.get_audio_features(inputs.features, inputs.feature_mask, return_dict=True).last_hidden_state
            mask = (inputs.ids == self.audio_id).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(mask, features.to(embeds.dtype))
            lengths = inputs.feature_mask.sum(-1)
        positions, _ = thinker.get_rope_index(inputs.ids, None, None, torch.ones_like(inputs.ids), False, lengths)
        return embeds, positions

    # -- the two streams -----------------------------------------------------------------
    def _thinker(self, embeds, positions, cache=None):
        out = self.hf.thinker.model.language_model(inputs_embeds=embeds, position_ids=positions, cache=cache,
                                                   use_cache=cache is not None, return_dict=True)
        return self.hf.thinker.lm_head(out.last_hidden_state), out.last_hidden_state

    def _talker(self, embeds, positions, cache=None, hidden: bool = False):
        talker = self.hf.talker
        out = talker.model(inputs_embeds=talker.thinker_to_talker_proj(embeds), position_ids=positions, cache=cache,
                           use_cache=cache is not None, return_dict=True)
        logits = talker.codec_head(out.last_hidden_state).float().masked_fill(~self.code_allowed, float("-inf"))
        return (logits, out.last_hidden_state) if hidden else logits

    def _talker_prefix(self, inputs: OmniInputs, prompt_embeds, prompt_hidden, first_reply, first_id: int,
                       speaker: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The talker's prompt rows and their positions (released conditioning; see the module)."""
        talker, embed = self.hf.talker, self.hf.thinker.get_input_embeddings()
        bare = prompt_embeds.masked_fill((inputs.ids == self.audio_id).unsqueeze(-1), 0.0)
        codec = talker.get_input_embeddings()
        special = torch.tensor([[self.codec["pad"], self.codec["bos"]]], device=self.device)
        bos = embed(torch.tensor([[speaker["bos_token"]]], device=self.device)).detach()  # the thinker's table: not the talker's to train
        rows = torch.cat([prompt_hidden + bare, bos, first_reply], dim=1)
        rows[:, -2:] = rows[:, -2:] + codec(special)
        text_ids = torch.cat([inputs.ids, torch.tensor([[speaker["bos_token"], first_id]], device=self.device)], dim=1)
        lengths = inputs.feature_mask.sum(-1) if inputs.feature_mask is not None else None
        positions, _ = talker.get_rope_index(text_ids, None, None, torch.ones_like(text_ids), False, lengths)
        return rows, positions

    def _reply_tail(self, replies: torch.Tensor, length: int) -> torch.Tensor:
        """What the talker's steps 1..length read besides the last code: reply[1:], then the text-eos
        embedding, then the text-pad embedding repeated ([1, length, H])."""
        embed, talker = self.hf.thinker.get_input_embeddings(), self.hf.talker
        ends = embed(torch.tensor([[talker.text_eos_token, talker.text_pad_token]], device=self.device)).detach()
        tail = torch.cat([replies[:, 1:], ends], dim=1)
        if tail.shape[1] < length:
            tail = torch.cat([tail, ends[:, 1:].expand(1, length - tail.shape[1], -1)], dim=1)
        return tail[:, :length]

    # -- sampling ------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompt: Prompt, sampling: Sampling, seed: int, index: int = 0, speaker: str = "Chelsie",
               max_codes: int = 256, render: bool = True, timings: dict[str, float] | None = None) -> OmniSample:
        """One response to `prompt`: text, then codes, then (with `render`) the waveform. Seeded
        by (seed, prompt id, `index`): the same arguments give the same sample. `timings`, when
        given, accumulates the seconds of each part (thinker, talker, token2wav)."""
        import time

        from transformers import DynamicCache

        clock = {"t": time.perf_counter()}

        def lap(part: str) -> None:
            if timings is not None:
                now = time.perf_counter()
                timings[part] = timings.get(part, 0.0) + now - clock["t"]
                clock["t"] = now

        voice = self.speaker(speaker)
        inputs = self.inputs(prompt)
        embeds, positions = self._prompt_embeddings(inputs)
        uniforms = torch.rand(sampling.max_new_tokens + max_codes,
                              generator=torch.Generator().manual_seed(row_seed(seed, prompt.id, index)))
        cache = DynamicCache(config=self.hf.config.thinker_config.text_config)
        logits, hidden = self._thinker(embeds, positions, cache)
        prompt_hidden, position = hidden, int(positions.max()) + 1
        ids, logps, replies = [], [], []
        for t in range(sampling.max_new_tokens):
            token, logp = sample_tokens(logits[:, -1], uniforms[t : t + 1].to(self.device), sampling)
            ids.append(int(token)), logps.append(float(logp))
            if ids[-1] in self.stop_ids or t + 1 == sampling.max_new_tokens:
                break
            e = self.hf.thinker.get_input_embeddings()(token.view(1, 1))
            pos = torch.full((3, 1, 1), position + t, device=self.device)
            logits, h = self._thinker(e, pos, cache)
            replies.append(h + e)
        lap("thinker")
        if len(replies) == 0:  # a one-token answer: the talker has nothing to read
            return OmniSample(ids, logps, [], [], None)
        replies_t = torch.cat(replies, dim=1)
        rows, talk_pos = self._talker_prefix(inputs, embeds, prompt_hidden, replies_t[:, :1], ids[0], voice)
        tail = self._reply_tail(replies_t, max_codes)
        cache = DynamicCache(config=self.hf.config.talker_config)
        logits = self._talker(rows, talk_pos, cache)
        start = int(talk_pos.max()) + 1
        codes, code_logps = [], []
        for k in range(max_codes):
            code, logp = sample_tokens(logits[:, -1], uniforms[sampling.max_new_tokens + k :][:1].to(self.device), sampling)
            codes.append(int(code)), code_logps.append(float(logp))
            if codes[-1] in self.code_stops or k + 1 == max_codes:
                break
            e = self.hf.talker.get_input_embeddings()(code.view(1, 1)) + tail[:, k : k + 1]
            logits = self._talker(e, torch.full((3, 1, 1), start + k, device=self.device), cache)
        lap("talker")
        waveform = self.render(codes, speaker, row_seed(seed, prompt.id + "/token2wav", index)) if render else None
        lap("token2wav")
        return OmniSample(ids, logps, codes, code_logps, waveform)

    @torch.no_grad()
    def render(self, codes: list[int], speaker: str, seed: int) -> np.ndarray | None:
        """token2wav's 24 kHz waveform of `codes` (its stop code dropped), its noise seeded by `seed`."""
        spoken = [c for c in codes if c not in self.code_stops]
        if not spoken:
            return None
        voice = self.speaker(speaker)
        t2w = self.hf.token2wav
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            wav = t2w(torch.tensor([spoken], device=self.device), conditioning=voice["cond"].to(self.device).float(),
                      reference_mel=voice["ref_mel"].to(self.device).float())
        return wav.detach().float().cpu().numpy().reshape(-1)

    # -- training ------------------------------------------------------------------------
    def teacher_forced(self, prompt: Prompt | OmniInputs, text_ids: list[int], codes: list[int],
                       speaker: str = "Chelsie") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """One teacher-forced pass over a response: (the thinker's logits and last hidden states at
        the positions that predict each text token, [T, V] and [T, H]; the talker's, at the
        positions that predict each code, [N, C] and [N, Hc], or None without codes). The talker
        reads the thinker's states detached, so the thinker's gradient comes from its own tokens."""
        voice = self.speaker(speaker)
        inputs = prompt if isinstance(prompt, OmniInputs) else self.inputs(prompt)
        embeds, positions = self._prompt_embeddings(inputs)
        T, L = len(text_ids), inputs.ids.shape[1]
        response = torch.tensor([text_ids], device=self.device)
        e = self.hf.thinker.get_input_embeddings()(response)
        start = int(positions.max()) + 1
        pos = torch.cat([positions, (start + torch.arange(T - 1, device=self.device)).view(1, 1, -1).expand(3, 1, -1)], 2)
        logits, hidden = self._thinker(torch.cat([embeds, e[:, :-1]], dim=1), pos)
        text = (logits[0, L - 1 :], hidden[0, L - 1 :])
        if not codes:
            return (*text, None, None)
        replies = (hidden[:, L:] + e[:, :-1]).detach()
        rows, talk_pos = self._talker_prefix(inputs, embeds.detach(), hidden[:, :L].detach(), replies[:, :1], text_ids[0],
                                             voice)
        N = len(codes)
        steps = self.hf.talker.get_input_embeddings()(torch.tensor([codes[:-1]], dtype=torch.long, device=self.device))
        steps = steps + self._reply_tail(replies, N - 1)
        begin = int(talk_pos.max()) + 1
        all_pos = torch.cat([talk_pos, (begin + torch.arange(N - 1, device=self.device)).view(1, 1, -1).expand(3, 1, -1)], 2)
        talk_logits, talk_hidden = self._talker(torch.cat([rows, steps], dim=1), all_pos, hidden=True)
        first = rows.shape[1] - 1
        return (*text, talk_logits[0, first:], talk_hidden[0, first:])

    def logprobs(self, prompt: Prompt | OmniInputs, text_ids: list[int], codes: list[int], temperature: float = 1.0,
                 speaker: str = "Chelsie", entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Teacher-forced log-probabilities of `text_ids` (the thinker's) and `codes` (the talker's)
        under `temperature`: what `sample` recorded, now differentiable; with `entropy`, each
        token's distribution's entropy (text then codes, no gradient)."""
        text_logits, _, code_logits, _ = self.teacher_forced(prompt, text_ids, codes, speaker)
        text_dist = torch.log_softmax(text_logits.float() / temperature, -1)
        text = text_dist.gather(-1, torch.tensor(text_ids, device=self.device)[:, None])[:, 0]
        if code_logits is None:
            return text, torch.zeros(0, device=self.device), _entropy(text_dist) if entropy else None
        speech_dist = torch.log_softmax(code_logits / temperature, -1)
        speech = speech_dist.gather(-1, torch.tensor(codes, device=self.device)[:, None])[:, 0]
        return text, speech, torch.cat([_entropy(text_dist), _entropy(speech_dist)]) if entropy else None


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    """Each row's entropy, from log-probabilities that may be -inf (codes never sampled)."""
    with torch.no_grad():
        return -(logp.exp() * logp.masked_fill(torch.isinf(logp), 0.0)).sum(-1)
