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

import hashlib
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
        self.codec = {"pad": talker.codec_pad_token, "bos": talker.codec_bos_token, "eos": talker.codec_eos_token}
        renderable = hf_model.config.token2wav_config.dit_config.num_embeds
        self.code_stops = [self.codec["eos"], self.codec["pad"]]
        allowed = torch.zeros(talker.config.vocab_size, dtype=torch.bool)
        allowed[: min(renderable, talker.config.vocab_size)] = True
        allowed[self.codec["bos"]] = False
        allowed[self.code_stops] = True
        self.register_buffer("code_allowed", allowed, persistent=False)
        self.decode_engine = "auto"  # how the two streams sample: auto, static or hf (see omni_static.py)
        self.decode_compile = False  # the static decoder's step through torch.compile
        self.render_steps = 10  # token2wav's ODE time points (the released default; fewer: faster, coarser)

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
        """One response to `prompt` (see `sample_group`), sample number `index`."""
        return self.sample_group(prompt, sampling, seed, [index], speaker, max_codes, render, timings)[0]

    @torch.no_grad()
    def sample_group(self, prompt: Prompt, sampling: Sampling, seed: int, indices: list[int], speaker: str = "Chelsie",
                     max_codes: int = 256, render: bool = True, timings: dict[str, float] | None = None,
                     inputs: OmniInputs | None = None) -> list[OmniSample]:
        """Responses to `prompt`, one per index, sampled together: text, then codes, then (with
        `render`) the waveform. The prompt runs once; its rows decode as one batch (they share
        the prompt's length and positions, so nothing is padded). Each is seeded by (seed,
        prompt id, index): the same arguments give the same samples, whatever else is in the
        group. `timings`, when given, accumulates the seconds of each part (thinker, talker,
        token2wav). `inputs` is `self.inputs(prompt)` when the caller has it already."""
        clock = Laps(timings)
        voice = self.speaker(speaker)
        inputs = inputs if inputs is not None else self.inputs(prompt)
        embeds, positions = self._prompt_embeddings(inputs)
        uniforms = torch.stack([torch.rand(sampling.max_new_tokens + max_codes,
                                           generator=torch.Generator().manual_seed(row_seed(seed, prompt.id, i)))
                                for i in indices]).to(self.device)
        texts, prompt_hidden = self._sample_text(embeds, positions, uniforms, sampling)
        clock.lap("thinker")
        spoken = [r for r, (ids, _, replies) in enumerate(texts) if replies is not None]  # a one-token answer has none
        codes = (self._sample_codes(inputs, embeds, prompt_hidden, texts, spoken, uniforms, sampling, voice, max_codes)
                 if spoken else {})
        clock.lap("talker")
        out = []
        for r, (ids, logps, _) in enumerate(texts):
            cs, cl = codes.get(r, ([], []))
            out.append(OmniSample(ids, logps, cs, cl, self.render(cs, speaker) if render and cs else None))
        clock.lap("token2wav")
        return out

    def _sample_text(self, embeds, positions, uniforms,
                     sampling: Sampling) -> tuple[list[tuple[list[int], list[float], torch.Tensor | None]], torch.Tensor]:
        """The thinker's rows: (ids, log-probabilities, the replies the talker reads [1, T-1, H] or
        None), and the prompt's last hidden states [1, L, H]."""
        from transformers import DynamicCache

        from . import omni_static

        if omni_static.use_static(self):
            return omni_static.sample_text(self, embeds, positions, uniforms, sampling)
        R, T = uniforms.shape[0], sampling.max_new_tokens
        cache = DynamicCache(config=self.hf.config.thinker_config.text_config)
        logits, prompt_hidden = self._thinker(embeds, positions, cache)
        cache.batch_select_indices(torch.zeros(R, dtype=torch.long, device=self.device))  # the prompt's keys, per row
        last, position = logits[:, -1].expand(R, -1), int(positions.max()) + 1
        ids, logps, replies = [[] for _ in range(R)], [[] for _ in range(R)], [[] for _ in range(R)]
        active = list(range(R))
        for t in range(T):
            tokens, lps = sample_tokens(last, uniforms[:, t], sampling)
            for r in active:
                ids[r].append(int(tokens[r])), logps[r].append(float(lps[r]))
            active = [r for r in active if ids[r][-1] not in self.stop_ids and t + 1 < T]
            if not active:
                break
            e = self.hf.thinker.get_input_embeddings()(tokens.view(R, 1))
            logits, h = self._thinker(e, torch.full((3, R, 1), position + t, device=self.device), cache)
            last = logits[:, -1]
            for r in active:
                replies[r].append(h[r : r + 1] + e[r : r + 1])
        return [(ids[r], logps[r], torch.cat(replies[r], dim=1) if replies[r] else None) for r in range(R)], prompt_hidden

    def _sample_codes(self, inputs, embeds, prompt_hidden, texts, rows: list[int], uniforms, sampling: Sampling,
                      voice: dict, max_codes: int) -> dict[int, tuple[list[int], list[float]]]:
        """The talker's codes and their log-probabilities for the text rows `rows`, as one batch."""
        from transformers import DynamicCache

        prefixes, tails = [], []
        for r in rows:
            ids, _, replies = texts[r]
            prefix, talk_pos = self._talker_prefix(inputs, embeds, prompt_hidden, replies[:, :1], ids[0], voice)
            prefixes.append(prefix)
            tails.append(self._reply_tail(replies, max_codes))
        B, T0 = len(rows), sampling.max_new_tokens
        prefix, tail = torch.cat(prefixes), torch.cat(tails)
        from . import omni_static

        if omni_static.use_static(self):
            got = omni_static.sample_codes(self, prefix, talk_pos.expand(3, B, -1), tail, uniforms[rows, T0 : T0 + max_codes], sampling)
            return dict(zip(rows, got))
        cache = DynamicCache(config=self.hf.config.talker_config)
        last = self._talker(prefix, talk_pos.expand(3, B, -1), cache)[:, -1]
        start = int(talk_pos.max()) + 1
        codes, logps = [[] for _ in rows], [[] for _ in rows]
        active = list(range(B))
        for k in range(max_codes):
            picked, lps = sample_tokens(last, uniforms[rows, T0 + k], sampling)
            for b in active:
                codes[b].append(int(picked[b])), logps[b].append(float(lps[b]))
            active = [b for b in active if codes[b][-1] not in self.code_stops and k + 1 < max_codes]
            if not active:
                break
            e = self.hf.talker.get_input_embeddings()(picked.view(B, 1)) + tail[:, k : k + 1]
            last = self._talker(e, torch.full((3, B, 1), start + k, device=self.device), cache)[:, -1]
        return {r: (codes[b], logps[b]) for b, r in enumerate(rows)}

    @torch.no_grad()
    def render(self, codes: list[int], speaker: str) -> np.ndarray | None:
        """token2wav's 24 kHz waveform of `codes` (its stop code dropped). The noise it starts from
        is seeded by the codes: the same codes always give the same waveform."""
        spoken = [c for c in codes if c not in self.code_stops]
        if not spoken:
            return None
        voice = self.speaker(speaker)
        t2w = self.hf.token2wav
        seed = int.from_bytes(hashlib.blake2b(str(spoken).encode(), digest_size=8).digest(), "little") >> 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            wav = t2w(torch.tensor([spoken], device=self.device), conditioning=voice["cond"].to(self.device).float(),
                      reference_mel=voice["ref_mel"].to(self.device).float(), num_steps=self.render_steps)
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


class Laps:
    """Seconds between calls of `lap`, added to `timings[part]` (nothing when `timings` is None)."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        import time

        self.timings, self.clock, self.t = timings, time.perf_counter, time.perf_counter()

    def lap(self, part: str) -> None:
        if self.timings is not None:
            now = self.clock()
            self.timings[part] = self.timings.get(part, 0.0) + now - self.t
            self.t = now


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    """Each row's entropy, from log-probabilities that may be -inf (codes never sampled)."""
    with torch.no_grad():
        return -(logp.exp() * logp.masked_fill(torch.isinf(logp), 0.0)).sum(-1)
