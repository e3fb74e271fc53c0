"""Training and evaluating the embedded speech recognizer (`vocalign.rewards.ctc_asr`) offline.

The model and why it exists: see `vocalign.rewards.ctc_asr`.

Data (seeded, rendered in-process, ~2 ms per clip): sentences of the synthetic tasks
(`random_sentence`), spoken two ways: (a) espeak-ng text-to-speech with English base
voices x voice variants, rate/pitch/volume drawn across and beyond `STYLE_SETTINGS`;
(b) the policy's own speech, `EspeakUnitDetokenizer` renders in all 27 `SpeechStyle`s.
The variants in `HELD_OUT_VARIANTS` are never used for training, so `evaluate` measures
voices the recognizer has not heard.

    python -m vocalign.rewards.training.ctc_asr train --out rewards/assets --minutes 20 --seed 0
    python -m vocalign.rewards.training.ctc_asr evaluate [--weights rewards/assets]
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vocalign.data.espeak import Voice, available_variants, synthesize
from vocalign.data.speakers import ACCENTS, HELD_OUT_VARIANTS
from vocalign.data.synthetic import STYLE_PHRASES, number_to_words, sentence, style_phrase
from vocalign.data.types import STYLE_LEVELS, SpeechStyle
from vocalign.model.detokenizer import EspeakUnitDetokenizer
from vocalign.rewards.ctc_asr import (
    _LABELS,
    _PERCEPTION,
    ASSETS,
    SAMPLE_RATE,
    VOCABULARY,
    CTCRecognizer,
    EmbeddedRecognizer,
    RecognizerConfig,
    _batch,
    log_mel,
    save,
)

# English base voices x espeak-ng variants make the speakers (the accents and held-out
# variants of the synthetic tasks' speaker pool): the held-out variants are never trained on.
BASE_VOICES = ACCENTS
_BASE_WEIGHTS = (0.5, 0.1, 0.1, 0.1, 0.1, 0.1)


def training_variants() -> list[str]:
    """The espeak-ng variants used for training: all but HELD_OUT_VARIANTS, plus "" (the plain voice)."""
    return [""] + [v for v in available_variants() if v not in HELD_OUT_VARIANTS]


def _number(rng: np.random.Generator) -> str:
    n = int(rng.integers(0, 20)) if rng.random() < 0.5 else int(rng.integers(0, 100))
    if rng.random() < 0.05:
        n = int(rng.integers(100, 1000)) if rng.random() < 0.7 else int(rng.integers(1000, 10000))
    return number_to_words(-n if rng.random() < 0.05 else n)


def random_sentence(rng: np.random.Generator) -> str:
    """A sentence of the synthetic speech domain: a question, an answer, a template
    sentence, a label, or (so that no word order is learnt as certain) random words."""
    kind = rng.random()
    if kind < 0.25:
        a, b = (_number(rng) if rng.random() < 0.3 else number_to_words(int(rng.integers(0, 10))) for _ in range(2))
        text = f"what is {a} {'plus' if rng.random() < 0.5 else 'minus'} {b}"
        if rng.random() < 0.5:
            names = list(STYLE_PHRASES)
            chosen = sorted(rng.choice(len(names), size=int(rng.integers(1, 4)), replace=False))
            style = {names[k]: str(rng.choice(list(STYLE_PHRASES[names[k]]))) for k in chosen}
            text += " answer " + style_phrase(style).replace(",", "")
        return text
    if kind < 0.5:
        return ("the answer is " if rng.random() < 0.3 else "") + _number(rng)
    if kind < 0.75:
        return sentence(rng)
    if kind < 0.85:
        return str(rng.choice(_LABELS + _PERCEPTION))
    return " ".join(rng.choice(VOCABULARY, size=int(rng.integers(1, 9))))


# --- speech ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Utterance:
    """One synthesized clip: what was said, by whom, and which kind of speech it is."""

    text: str
    waveform: np.ndarray
    kind: str  # "tts" (espeak-ng text-to-speech) or "policy" (EspeakUnitDetokenizer)
    voice: str


_STYLES = [SpeechStyle(*levels) for levels in itertools.product(*STYLE_LEVELS.values())]


@lru_cache(maxsize=1)
def _detokenizer() -> EspeakUnitDetokenizer:
    return EspeakUnitDetokenizer(sample_rate=SAMPLE_RATE)


def speak(text: str, kind: str, voice: str, rng: np.random.Generator) -> np.ndarray:
    """`text` as kind "tts" (settings drawn across and beyond STYLE_SETTINGS) or "policy"
    (one of the 27 SpeechStyles), by espeak-ng voice `voice` ("en-us+f3")."""
    if kind == "policy":
        d = _detokenizer()
        return d.render(d.encode(text, _STYLES[int(rng.integers(len(_STYLES)))]), voice=voice).waveform
    rate, pitch, volume = int(rng.integers(95, 340)), int(rng.integers(0, 100)), int(rng.integers(25, 201))
    return np.clip(synthesize(text, voice, rate, pitch, volume, sample_rate=SAMPLE_RATE), -1.0, 1.0)


def make_utterances(n: int, seed: int, variants: Sequence[str], policy_share: float = 0.4,
                    policy_voice_share: float = 0.5) -> list[Utterance]:
    """`n` seeded utterances of `random_sentence`s by `variants`; a `policy_share` of them are
    detokenizer renders, of which a `policy_voice_share` use the detokenizer's own voice (en-us)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        text = random_sentence(rng)
        variant = str(rng.choice(variants))
        kind = "policy" if rng.random() < policy_share else "tts"
        if kind == "policy" and rng.random() < policy_voice_share:
            base, variant = "en-us", ""
        else:
            base = str(rng.choice(BASE_VOICES, p=_BASE_WEIGHTS)) if kind == "tts" else "en-us"
        voice = Voice(base, variant).spec
        out.append(Utterance(text, speak(text, kind, voice, rng), kind, voice))
    return out


# --- training -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """How `train` makes its data and trains; the learning rate warms up for 100 steps, stays
    at its peak for the first half of the time budget, then follows a cosine to zero."""

    minutes: float = 20.0  # the shipped weights: 20 min on one core, ~3,900 steps
    seed: int = 0
    utterances: int = 12000
    batch_size: int = 32
    learning_rate: float = 3e-3
    noise_share: float = 0.3  # clips that get white noise at 15-40 dB SNR


def _training_features(config: TrainConfig) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    rng = np.random.default_rng(config.seed + 1)
    index = {w: k + 1 for k, w in enumerate(VOCABULARY)}
    features, targets = [], []
    for utt in make_utterances(config.utterances, config.seed, training_variants()):
        pad = rng.integers(0, int(0.3 * SAMPLE_RATE), size=2)
        wav = np.concatenate([np.zeros(pad[0], np.float32), utt.waveform, np.zeros(pad[1], np.float32)])
        if rng.random() < config.noise_share:
            rms = float(np.sqrt(np.mean(utt.waveform**2))) + 1e-6
            wav = wav + rng.normal(0, rms * 10 ** (-rng.uniform(15, 40) / 20), len(wav)).astype(np.float32)
        features.append(log_mel(wav).half())
        targets.append(torch.tensor([index[w] for w in utt.text.split()]))
    return features, targets


def _mask_frequencies(batch: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """SpecAugment-style: zero two random bands of up to 10 mel bins per clip."""
    for i in range(len(batch)):
        for _ in range(2):
            width, start = int(rng.integers(0, 11)), int(rng.integers(0, batch.shape[2] - 10))
            batch[i, :, start : start + width] = 0.0
    return batch


def train(config: TrainConfig, out: Path) -> CTCRecognizer:
    """Generate the seeded data, train for `config.minutes`, save to `out`."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed + 2)
    started = time.time()
    features, targets = _training_features(config)
    data_seconds = time.time() - started
    print(f"{len(features)} utterances in {data_seconds:.0f} s", flush=True)
    model = CTCRecognizer(RecognizerConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=1e-2)
    ctc = nn.CTCLoss(blank=0, zero_infinity=True)
    order = np.argsort([len(f) for f in features])  # batches of similar length waste less padding
    batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    budget, train_start, step = config.minutes * 60, time.time(), 0
    while (progress := (time.time() - train_start) / budget) < 1.0:
        decay = 0.5 * (1 + math.cos(math.pi * max(0.0, 2 * progress - 1)))
        lr = config.learning_rate * min(1.0, step / 100) * decay
        for group in optimizer.param_groups:
            group["lr"] = lr
        chosen = batches[int(rng.integers(len(batches)))]
        batch, lengths = _batch([features[i].float() for i in chosen])
        logits, out_lengths = model(_mask_frequencies(batch, rng), lengths)
        labels = [targets[i] for i in chosen]
        loss = ctc(logits.log_softmax(-1).transpose(0, 1), torch.cat(labels), out_lengths,
                   torch.tensor([len(t) for t in labels]))
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        step += 1
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e} {time.time() - train_start:.0f} s", flush=True)
    model.eval()
    provenance = {**asdict(config), "steps": step, "data_seconds": round(data_seconds, 1),
                  "train_seconds": round(time.time() - train_start, 1), "held_out_variants": list(HELD_OUT_VARIANTS)}
    save(model, out, provenance)
    print(f"saved to {out} after {step} steps", flush=True)
    return model


# --- evaluation ---------------------------------------------------------------------------


def corpus_wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Word errors over all clips / reference words over all clips."""
    import jiwer

    return jiwer.process_words(list(references), [h if h else "" for h in hypotheses]).wer


def contrast_pairs(n: int, seed: int, max_text_wer: float = 0.8) -> list[tuple[str, str]]:
    """`n` sentence pairs (A, B) whose text-vs-text WER is at least `max_text_wer`: they share few words."""
    rng = np.random.default_rng(seed)
    pairs: list[tuple[str, str]] = []
    while len(pairs) < n:
        a, b = random_sentence(rng), random_sentence(rng)
        if corpus_wer([b], [a]) >= max_text_wer:
            pairs.append((a, b))
    return pairs


def evaluate(weights: Path = ASSETS, n: int = 400, seed: int = 12345) -> dict[str, float]:
    """Held-out WERs (voices with HELD_OUT_VARIANTS only) per kind of speech, the WER of the
    policy's own voice, and the wrong-reference WER of contrast pairs; printed and returned."""
    recognizer = EmbeddedRecognizer.load(weights)
    results: dict[str, float] = {}
    sets = {
        "held-out variants, espeak-ng TTS (a)": make_utterances(n, seed, HELD_OUT_VARIANTS, policy_share=0.0),
        "held-out variants, policy speech (b)": make_utterances(
            n, seed + 1, HELD_OUT_VARIANTS, policy_share=1.0, policy_voice_share=0.0),
        "policy speech, detokenizer's own voice, new sentences": make_utterances(
            n, seed + 2, [""], policy_share=1.0, policy_voice_share=1.0),
    }
    recognizer.transcribe([sets[next(iter(sets))][0].waveform], SAMPLE_RATE)  # warm up before timing
    all_refs: list[str] = []
    all_hyps: list[str] = []
    for name, utterances in sets.items():
        started = time.time()
        hyps = recognizer.transcribe([u.waveform for u in utterances], SAMPLE_RATE)
        ms = 1000 * (time.time() - started) / len(utterances)
        refs = [u.text for u in utterances]
        results[name] = corpus_wer(refs, hyps)
        print(f"WER {results[name]:.3f}  {name} ({len(utterances)} clips, {ms:.1f} ms/clip)")
        if "held-out" in name:
            all_refs, all_hyps = all_refs + refs, all_hyps + hyps
    results["held-out overall"] = corpus_wer(all_refs, all_hyps)
    print(f"WER {results['held-out overall']:.3f}  held-out overall (a)+(b)")
    pairs = contrast_pairs(n // 2, seed + 3)
    rng = np.random.default_rng(seed + 4)
    spoken = [speak(a, kind, Voice("en-us", str(rng.choice(HELD_OUT_VARIANTS))).spec, rng)
              for (a, _), kind in zip(pairs, itertools.cycle(("tts", "policy")))]
    heard = recognizer.transcribe(spoken, SAMPLE_RATE)
    # Capped at 1 as the rewards cap it: a long hypothesis must not outweigh the other pairs.
    wrong = [min(corpus_wer([b], [h]), 1.0) for (_, b), h in zip(pairs, heard)]
    bound = [min(corpus_wer([b], [a]), 1.0) for a, b in pairs]
    results["wrong-reference"] = float(np.mean(wrong))
    results["wrong-reference text bound"] = float(np.mean(bound))
    print(f"WER {results['wrong-reference']:.3f}  wrong reference (audio of A scored against B, held-out "
          f"variants; mean over {len(pairs)} pairs of min(WER, 1)); text-vs-text: {np.mean(bound):.3f}")
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vocalign.rewards.training.ctc_asr", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("train", help="generate seeded speech and train the recognizer")
    fit.add_argument("--out", type=Path, required=True, help="folder for the weights and vocabulary")
    fit.add_argument("--minutes", type=float, default=TrainConfig.minutes)
    fit.add_argument("--seed", type=int, default=TrainConfig.seed)
    fit.add_argument("--utterances", type=int, default=TrainConfig.utterances)
    check = commands.add_parser("evaluate", help="held-out and wrong-reference WER")
    check.add_argument("--weights", type=Path, default=ASSETS)
    check.add_argument("--n", type=int, default=400, help="clips per held-out set")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.command == "train":
        train(TrainConfig(minutes=args.minutes, seed=args.seed, utterances=args.utterances), args.out)
    else:
        evaluate(args.weights, args.n)


if __name__ == "__main__":
    main()
