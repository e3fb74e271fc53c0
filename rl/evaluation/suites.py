"""Evaluation suites: held-out prompts, and how a policy's greedy responses to them are scored.

A suite builds its prompts (synthetic, under a `Variation`, or read from your own data),
says how its responses are generated (tools, speech) and scores each response into
per-prompt metric values. `vocalign.rl.evaluation.run` generates and aggregates.

| suite | prompts | metrics (per prompt, 0..1) |
|---|---|---|
| `spoken_qa` | a spoken arithmetic question | `correct` (the text answer), `spoken_correct` (the speech, as the embedded recognizer hears it, says the answer) |
| `style` | a spoken question with a requested speaking style, or none | `honoured` (the detector finds the requested level); per requested value, with the detector's confusion table |
| `transcription` | "transcribe the audio" and a spoken sentence | `accuracy` (1 - WER, floored at 0), `wer` |
| `perception` | a multiple-choice question about the audio (MMAU format) | `accuracy` |
| `tool_use` | a question that needs the calculator | `call` (the right call), `answer` (the right final answer) |

Register another with `@register_suite`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from vocalign.data.tasks import make_task
from vocalign.data.types import STYLE_LEVELS, Prompt, Rollout
from vocalign.rewards.asr import transcribe_rollouts
from vocalign.rewards.correctness import is_correct
from vocalign.rewards.paralinguistic import analyse
from vocalign.rewards.transcripts import word_error_rate

NO_REQUEST = "none"  # the style group of prompts that ask for no style


@dataclass(frozen=True)
class Variation:
    """How a synthetic suite's speech differs from training: speakers, prosody, noise, numbers.

    `voices`: a voice pool (train, heldout, default); `prosody`: narrow, train or wide;
    `noise`: none, train or heavy (see `vocalign.data.speakers`); `operands`: the range
    of the arithmetic operands, "LO-HI". The defaults are the training distribution of
    the embedded tasks.
    """

    voices: str = "train"
    prosody: str = "train"
    noise: str = "train"
    operands: str = "0-9"

    @classmethod
    def parse(cls, items: Sequence[str]) -> Variation:
        """From "key=value" strings (e.g. ["voices=heldout", "operands=10-12"])."""
        known = {f.name for f in fields(cls)}
        values: dict[str, str] = {}
        for item in items:
            key, eq, value = item.partition("=")
            if not eq or key not in known:
                raise ValueError(f"variation {item!r} is not KEY=VALUE with KEY one of {', '.join(sorted(known))}")
            values[key] = value
        variation = cls(**values)
        variation.operand_range()
        from vocalign.data.speakers import Conditions, resolve_voices

        Conditions(variation.prosody, "train", variation.noise)  # an unknown name fails here, naming the key
        resolve_voices(variation.voices)
        return variation

    def operand_range(self) -> tuple[int, int]:
        match = re.fullmatch(r"(\d+)-(\d+)", self.operands)
        if not match or int(match.group(1)) > int(match.group(2)):
            raise ValueError(f"variation operands={self.operands!r} is not a range LO-HI with LO <= HI, e.g. 10-12")
        return int(match.group(1)), int(match.group(2))

    def label(self) -> str:
        """What differs from the training distribution, e.g. "voices=heldout", or "in distribution"."""
        changed = [f"{f.name}={getattr(self, f.name)}" for f in fields(self) if getattr(self, f.name) != f.default]
        return ", ".join(changed) or "in distribution"

    def speech(self) -> dict[str, str]:
        """The synthetic task parameters of the speakers and acoustic conditions."""
        return {"voices": self.voices, "prosody": self.prosody, "noise": self.noise}


@dataclass
class SampleResult:
    """One prompt's scores: metric values (None: not measured for this prompt), its group
    in the suite's breakdown (e.g. the requested style), and details for tables."""

    prompt_id: str
    metrics: dict[str, float | None]
    group: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Suite:
    """A named evaluation: prompts, generation settings and a scoring function."""

    name: str
    description: str
    metrics: tuple[str, ...]
    build: Callable[[int, int, Variation], list[Prompt]]
    score: Callable[[list[Rollout]], list[SampleResult]]
    data_kind: str  # which user-data formats it reads (see vocalign.rl.evaluation.userdata)
    group_name: str | None = None
    reference_fields: tuple[str, ...] = ()  # the meta fields every prompt needs: what the suite scores against
    tools: tuple[str, ...] = ()
    speech_metrics: tuple[str, ...] = ()  # metrics measured on the speech: None for a policy that cannot speak


SUITES: dict[str, Suite] = {}


def register_suite(suite: Suite) -> Suite:
    if suite.name in SUITES:
        raise ValueError(f"evaluation suite {suite.name!r} is already registered")
    SUITES[suite.name] = suite
    return suite


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"evaluation suite {name!r} is not known; use one of {', '.join(SUITES)}")
    return SUITES[name]


# --------------------------------------------------------------------------- spoken QA


def _build_spoken_qa(n: int, seed: int, variation: Variation) -> list[Prompt]:
    lo, hi = variation.operand_range()
    return make_task("arithmetic", n, seed, min_operand=lo, max_operand=hi, **variation.speech())


def _score_spoken_qa(rollouts: list[Rollout]) -> list[SampleResult]:
    heard = transcribe_rollouts(rollouts)
    out = []
    for r, transcript in zip(rollouts, heard):
        answer = r.meta["answer"]
        spoken = float(transcript is not None and is_correct(transcript, answer))
        out.append(SampleResult(r.prompt.id, {"correct": float(is_correct(r.text, answer)), "spoken_correct": spoken},
                                detail={"text": r.text, "heard": transcript, "answer": answer}))
    return out


register_suite(Suite(
    "spoken_qa", "spoken arithmetic questions: is the text answer right, and does the speech say it",
    ("correct", "spoken_correct"), _build_spoken_qa, _score_spoken_qa, data_kind="qa", reference_fields=("answer",),
    speech_metrics=("spoken_correct",),
))


# --------------------------------------------------------------------------- style


STYLE_VALUES = tuple(level for levels in STYLE_LEVELS.values() for level in levels if level != "normal")


def _build_style(n: int, seed: int, variation: Variation) -> list[Prompt]:
    lo, hi = variation.operand_range()
    # one prompt in seven asks for nothing, so each of the seven groups is about equally large
    return make_task("arithmetic", n, seed, styled=True, style_in="text", no_request=1 / 7,
                     min_operand=lo, max_operand=hi, **variation.speech())


def detected_styles(rollouts: Sequence[Rollout], heard: Sequence[str | None]) -> list[dict[str, str]]:
    """The level of each attribute the detector measures in each rollout's speech ({} without speech).

    The speech is compared with the neutral speech of the en-us voice (the embedded
    detokenizer's; meta `voice` when a row names another), and the rate is measured
    against the words the recognizer heard.
    """
    return [analyse(r.waveform, r.sample_rate, transcript or None, r.meta.get("voice") or "en-us")[1]
            if r.waveform is not None and len(r.waveform) else {} for r, transcript in zip(rollouts, heard)]


def _score_style(rollouts: list[Rollout]) -> list[SampleResult]:
    heard = transcribe_rollouts(rollouts)
    out = []
    for r, detected in zip(rollouts, detected_styles(rollouts, heard)):
        requested = r.meta.get("style")
        if not isinstance(requested, dict):
            raise ValueError(f"style suite: prompt {r.prompt.id!r} has no meta 'style'; give each row a style dict, "
                             "{} for a prompt that asks for none")
        detail = {"requested": dict(requested), "detected": detected}
        if not requested:
            neutral = float(bool(detected) and all(v == "normal" for v in detected.values()))
            out.append(SampleResult(r.prompt.id, {"honoured": None, "neutral": neutral}, NO_REQUEST, detail))
            continue
        hits = [detected.get(attribute) == level for attribute, level in requested.items()]
        group = "+".join(requested.values())
        out.append(SampleResult(r.prompt.id, {"honoured": float(np.mean(hits)), "neutral": None}, group, detail))
    return out


register_suite(Suite(
    "style", "a requested speaking style (slow, fast, low, high, soft, loud) or none, measured by the detector",
    ("honoured", "neutral"), _build_style, _score_style, data_kind="style", group_name="requested style",
    reference_fields=("style",),
    speech_metrics=("honoured", "neutral"),
))


# --------------------------------------------------------------------------- transcription


def _build_transcription(n: int, seed: int, variation: Variation) -> list[Prompt]:
    return make_task("transcription", n, seed, **variation.speech())


def _score_transcription(rollouts: list[Rollout]) -> list[SampleResult]:
    out = []
    for r in rollouts:
        wer = word_error_rate(str(r.meta["transcript"]), r.text)
        out.append(SampleResult(r.prompt.id, {"accuracy": max(0.0, 1.0 - wer), "wer": wer},
                                detail={"text": r.text, "transcript": r.meta["transcript"]}))
    return out


register_suite(Suite(
    "transcription", "transcribe a spoken sentence: word error rate of the text answer",
    ("accuracy", "wer"), _build_transcription, _score_transcription, data_kind="transcripts",
    reference_fields=("transcript",),
))


# --------------------------------------------------------------------------- perception


def _build_perception(n: int, seed: int, variation: Variation) -> list[Prompt]:
    voices = "default" if variation.voices == "train" else variation.voices  # the voices whose gender is known
    prompts = make_task("perception", n, seed, voices=voices, noise="none" if variation.noise == "train" else variation.noise)
    for p in prompts:  # the MMAU fields: question, choices, answer
        p.meta["answer"] = p.meta["label"]
        p.meta["category"] = p.meta["attribute"]
    return prompts


def _score_perception(rollouts: list[Rollout]) -> list[SampleResult]:
    out = []
    for r in rollouts:
        correct = is_correct(r.text, r.meta["answer"], r.meta.get("choices"))
        out.append(SampleResult(r.prompt.id, {"accuracy": float(correct)}, str(r.meta.get("category") or "all"),
                                detail={"text": r.text, "answer": r.meta["answer"]}))
    return out


register_suite(Suite(
    "perception", "multiple-choice questions about the audio (rate, pitch, volume, gender; MMAU format)",
    ("accuracy",), _build_perception, _score_perception, data_kind="mcq", group_name="category",
    reference_fields=("answer",),
))


# --------------------------------------------------------------------------- tool use


def _build_tool_use(n: int, seed: int, variation: Variation) -> list[Prompt]:
    return make_task("tool_use", n, seed, kinds=("calculator",), describe_tools="none")


def _score_tool_use(rollouts: list[Rollout]) -> list[SampleResult]:
    from vocalign.rewards.tool_rewards import tool_call

    calls = tool_call(rollouts)
    out = []
    for r, call in zip(rollouts, calls):
        answer = r.meta.get("answer")
        out.append(SampleResult(
            r.prompt.id,
            {"call": None if call is None else float(call == 1.0),
             "answer": None if answer is None else float(is_correct(r.text, answer))},
            detail={"text": r.text, "calls": [c.get("raw") for c in r.tool_calls]},
        ))
    return out


register_suite(Suite(
    "tool_use", "questions that need the calculator: the call, and the final answer after its result",
    ("call", "answer"), _build_tool_use, _score_tool_use, data_kind="tools", tools=("calculator",),
    reference_fields=("expected_tool",),
))


def with_prompts_checked(suite: Suite, prompts: list[Prompt], source: str) -> list[Prompt]:
    """`prompts` after checking each has the reference fields `suite` scores against (a clear error otherwise)."""
    for i, p in enumerate(prompts):
        missing = [k for k in suite.reference_fields if k not in p.meta]
        if missing:
            raise ValueError(f"{source}: row {i} (id {p.id!r}) has no {', '.join(map(repr, missing))}, which the "
                             f"{suite.name} suite scores against; add it to every row")
    return prompts
