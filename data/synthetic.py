"""Seeded synthetic speech tasks, spoken by espeak-ng.

Each task function returns `list[Prompt]`: the human turn carries the question (as
16 kHz float32 audio by default, or as text for `styled_speech`), `task` names the
task, `meta` holds the reference fields a reward needs and `target` is the SFT
reference answer. All randomness comes from `numpy.random.default_rng(seed)`, so the
same seed gives identical prompts with bit-identical audio.

Speakers and acoustic conditions come from `vocalign.data.speakers`: by default a
question is spoken by one of about 560 espeak-ng voices (English accents x variants,
`voice_pool("train")`), with its rate, pitch and volume drawn across slow to fast, low
to high and soft to loud, its timbre warped and, for a quarter of the clips, background noise.
`voices`, `prosody`, `warp` and `noise` choose other pools and conditions, e.g. the
held-out voices (`voices="heldout"`) or prosody outside the trained ranges
(`prosody="wide"`), which is how an evaluation measures what the model does on speech
it never heard. The clips are drawn first and rendered in fresh processes
(`vocalign.data.render`), so the audio depends only on the arguments, and the first k
prompts of a call with n > k are those of the call with n = k.

Tasks (registered with `vocalign.data.tasks`; call `make_task(name, n, seed, **kw)`):
- `arithmetic`: "what is A plus/minus B" spoken, operands in min_operand..max_operand;
  answer in text (digits) and speech (words); `styled=True` adds a requested speaking style, spoken ("... answer slowly")
  or as text (`style_in="text"`); `target_style="random"` makes SFT targets speak in
  random styles that follow no request.
- `transcription`: a short templated sentence spoken; answer is its transcript.
- `perception`: a sentence spoken slow/normal/fast, low/normal/high, soft/normal/loud
  or by a female/male voice; the question asks about one attribute.
- `styled_speech`: a text instruction `say "X" slowly` (no question audio: the skill
  is producing speech in a style, not hearing one); answer is X spoken in that style.
- `tool_use`: questions that need a tool call (calculator, audio_search); see
  `vocalign.data.tool_tasks`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vocalign.data.espeak import Voice
from vocalign.data.render import MAX_CLIP_SECONDS, STYLE_SETTINGS, attach_audio, draw_clip
from vocalign.data.speakers import (
    DEFAULT_VOICES,
    FEMALE_VOICES,
    MALE_VOICES,
    VOICE_GENDER,
    Conditions,
    resolve_voices,
)
from vocalign.data.tasks import check_count, task
from vocalign.data.types import STYLE_LEVELS, Message, Prompt, Response, SpeechStyle

__all__ = [  # names other modules take from here, besides the tasks
    "DEFAULT_VOICES", "FEMALE_VOICES", "MALE_VOICES", "VOICE_GENDER", "MAX_CLIP_SECONDS", "STYLE_SETTINGS",
    "STYLE_PHRASES", "PERCEPTION_CHOICES", "PERCEPTION_QUESTIONS", "number_to_words",
    "style_phrase", "sentence", "sentence_words",
]

VoiceChoice = str | Sequence[str | Voice]  # a pool name (train, heldout, default) or a list of voices

# How a speaking style is asked for in words; "normal" is never asked for.
STYLE_PHRASES: dict[str, dict[str, str]] = {
    "rate": {"slow": "slowly", "fast": "quickly"},
    "pitch": {"low": "in a low voice", "high": "in a high voice"},
    "volume": {"soft": "softly", "loud": "loudly"},
}

# Perception: the answer choices per attribute and the question that lists them.
PERCEPTION_CHOICES: dict[str, tuple[str, ...]] = {**STYLE_LEVELS, "gender": ("female", "male")}
PERCEPTION_QUESTIONS = {
    "rate": "is the speech slow, normal or fast?",
    "pitch": "is the voice low, normal or high?",
    "volume": "is the speech soft, normal or loud?",
    "gender": "is the voice female or male?",
}

TRANSCRIBE_INSTRUCTION = "transcribe the audio"

# Sentence templates for transcription, perception and styled speech: lowercase, no
# punctuation, numbers in words, so a transcript is exactly what is spoken.
_TEMPLATES = (
    "the {colour} {thing} is on the {place}",
    "i can see {count} {animals}",
    "the train leaves at {hour} {minutes}",
    "we meet again on {day}",
    "please paint the {thing} {colour}",
    "it is {degrees} degrees today",
    "my number ends in {d1} {d2} {d3}",
)
_COLOURS = ("red", "blue", "green", "yellow", "black", "white", "brown", "pink")
_THINGS = ("ball", "book", "cup", "hat", "box", "key", "chair", "lamp")
_PLACES = ("table", "floor", "shelf", "bed", "desk", "roof")
_ANIMALS = ("cats", "dogs", "birds", "fish", "horses", "ducks")
_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_MINUTES = ("fifteen", "thirty", "forty five")
_SLOT_WORDS = _COLOURS + _THINGS + _PLACES + _ANIMALS + _DAYS + _MINUTES

_ONES = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
    "eighteen", "nineteen",
)
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_SCALES = ((10**9, "billion"), (10**6, "million"), (10**3, "thousand"))


def number_to_words(n: int) -> str:
    """An integer in lowercase English words, as the synthetic answers are spoken.

    Words are separated by single spaces: no hyphens and no "and" (US style), e.g.
    21 -> "twenty one", 105 -> "one hundred five", 1010 -> "one thousand ten",
    -3 -> "minus three". Works for |n| < 10**12.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ValueError(f"number_to_words() needs an int, got {n!r} ({type(n).__name__})")
    n = int(n)
    if abs(n) >= 10**12:
        raise ValueError(f"number_to_words({n}) is out of range; it handles |n| < 10**12")
    if n < 0:
        return "minus " + number_to_words(-n)
    if n == 0:
        return "zero"
    words: list[str] = []
    for scale, name in _SCALES:
        if n >= scale:
            words += [_below_thousand(n // scale), name]
            n %= scale
    if n:
        words.append(_below_thousand(n))
    return " ".join(words)


def _below_thousand(n: int) -> str:
    words: list[str] = []
    if n >= 100:
        words += [_ONES[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        words.append(_TENS[n // 10])
        n %= 10
        if n:
            words.append(_ONES[n])
    elif n or not words:
        words.append(_ONES[n])
    return " ".join(words)


def style_phrase(style: dict[str, str]) -> str:
    """The words that request `style` ({attribute: level}), e.g. "slowly, in a high voice and loudly"."""
    phrases = [STYLE_PHRASES[attr][level] for attr, level in style.items()]
    return " and ".join([", ".join(phrases[:-1]), phrases[-1]] if len(phrases) > 1 else phrases)


# ---------------------------------------------------------------------------- tasks


@task("arithmetic")
def arithmetic(
    n: int,
    seed: int,
    *,
    max_operand: int = 9,
    min_operand: int = 0,
    styled: bool = False,
    max_attributes: int = 1,
    no_request: float = 0.0,
    style_in: str = "audio",
    target_style: str = "requested",
    think: bool = False,
    voices: VoiceChoice = "train",
    prosody: str = "train",
    warp: str = "train",
    noise: str = "train",
    sample_rate: int = 16000,
    max_seconds: float = MAX_CLIP_SECONDS,
) -> list[Prompt]:
    """Spoken "what is A plus B" / "what is A minus B", operands in min_operand..max_operand.

    A minus question never goes negative. meta: `question` (the spoken text), `answer`
    (int), `operands` [A, B], `op` ("plus" or "minus"). The target answers with the
    digits in text and the number in words in speech.

    With `styled`, the prompt asks for a speaking style; meta `style` is then
    {attribute: level} (1..max_attributes attributes, never "normal"), except for a
    share `no_request` of the prompts, which ask for no style: their meta `style` is {}
    (a request for nothing, which a reward may score as neutral speech). `style_in` says
    where the request is: "audio" speaks it at the end of the question ("... answer
    slowly", part of meta `question`), "text" writes it as the human turn's text
    ("answer slowly"). `target_style` says how the SFT target speaks: "requested" (in
    the requested style; "normal" without a request) or "random" (every attribute at a
    level drawn uniformly, whatever was asked: varied delivery that follows no request,
    which leaves following requests to RL). With `think`, the target first reasons in
    <think>: it writes out the question it heard and the style asked for ("three plus
    four", "three plus four answer slowly"), then answers.
    `voices`, `prosody`, `warp` and `noise` choose the speakers and acoustic conditions
    (see `vocalign.data.speakers`). With the defaults every clip fits MAX_CLIP_SECONDS;
    larger operands, several spoken style requests or slow "wide" prosody make longer
    questions, and a clip over `max_seconds` is an error.
    """
    _check_arithmetic(n, min_operand, max_operand, no_request, styled, max_attributes, style_in, target_style)
    speakers = resolve_voices(voices)
    conditions = Conditions(prosody, warp, noise)
    rng = np.random.default_rng(seed)
    prompts, clips = [], []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(min_operand, max_operand + 1, size=2))
        op = "plus" if rng.random() < 0.5 else "minus"
        if op == "minus" and b > a:
            a, b = b, a
        question = f"what is {number_to_words(a)} {op} {number_to_words(b)}"
        style = _draw_style(rng, max_attributes) if styled else {}
        if styled and no_request and rng.random() < no_request:
            style = {}
        request = f"answer {style_phrase(style)}" if style else ""
        if request and style_in == "audio":
            question += f"? {request}"
        clips.append(draw_clip(rng, question, speakers, conditions=conditions))
        spoken_style = style
        if target_style == "random":
            spoken_style = {attr: levels[int(rng.integers(len(levels)))] for attr, levels in STYLE_LEVELS.items()}
        prompt_id = f"arithmetic{'-styled' if styled else ''}-{seed}-{i}"
        prompts.append(_arithmetic_prompt(prompt_id, (a, op, b), question, request, style if styled else None,
                                          spoken_style, style_in, think))
    return attach_audio(prompts, clips, sample_rate, max_seconds, seed)


def _check_arithmetic(n: int, min_operand: int, max_operand: int, no_request: float, styled: bool, max_attributes: int,
                      style_in: str, target_style: str) -> None:
    check_count(n, "arithmetic")
    if not 0 <= min_operand <= max_operand:
        raise ValueError(f"arithmetic: operands {min_operand}..{max_operand}: need 0 <= min_operand <= max_operand")
    if not 0.0 <= no_request <= 1.0:
        raise ValueError(f"arithmetic: no_request={no_request} is a share of the prompts; use a value in [0, 1]")
    if styled:
        _check_max_attributes(max_attributes, "arithmetic")
    if style_in not in ("audio", "text"):
        raise ValueError(f"arithmetic: style_in={style_in!r} is not known; use 'audio' (spoken) or 'text'")
    if target_style not in ("requested", "random"):
        raise ValueError(f"arithmetic: target_style={target_style!r} is not known; use 'requested' or 'random'")


def _arithmetic_prompt(prompt_id: str, operation: tuple[int, str, int], question: str, request: str,
                       style: dict[str, str] | None, spoken_style: dict[str, str], style_in: str, think: bool) -> Prompt:
    """One arithmetic prompt (its audio attached later); `style` is None for an unstyled task."""
    a, op, b = operation
    answer = a + b if op == "plus" else a - b
    meta = {"question": question, "answer": answer, "operands": [a, b], "op": op}
    if style is not None:
        meta["style"] = style
    return Prompt(
        id=prompt_id,
        messages=[Message("human", request if style_in == "text" else "")],
        task="arithmetic",
        meta=meta,
        target=Response(
            text=str(answer), speech=number_to_words(answer), style=SpeechStyle(**spoken_style),
            think=" ".join(filter(None, [f"{number_to_words(a)} {op} {number_to_words(b)}", request])) if think else None,
        ),
    )


@task("transcription")
def transcription(
    n: int,
    seed: int,
    *,
    voices: VoiceChoice = "train",
    prosody: str = "train",
    warp: str = "train",
    noise: str = "train",
    sample_rate: int = 16000,
    max_seconds: float = MAX_CLIP_SECONDS,
) -> list[Prompt]:
    """A short templated sentence spoken; the human text is "transcribe the audio".

    meta: `transcript` (lowercase words, numbers in words, no punctuation). The target
    is the transcript as text, with no speech.
    """
    check_count(n, "transcription")
    speakers = resolve_voices(voices)
    conditions = Conditions(prosody, warp, noise)
    rng = np.random.default_rng(seed)
    prompts, clips = [], []
    for i in range(n):
        text = sentence(rng)
        clips.append(draw_clip(rng, text, speakers, conditions=conditions))
        prompts.append(
            Prompt(
                id=f"transcription-{seed}-{i}",
                messages=[Message("human", TRANSCRIBE_INSTRUCTION)],
                task="transcription",
                meta={"transcript": text},
                target=Response(text=text),
            )
        )
    return attach_audio(prompts, clips, sample_rate, max_seconds, seed)


@task("perception")
def perception(
    n: int,
    seed: int,
    *,
    attributes: Sequence[str] = tuple(PERCEPTION_CHOICES),
    voices: VoiceChoice = "default",
    noise: str = "none",
    sample_rate: int = 16000,
    max_seconds: float = MAX_CLIP_SECONDS,
) -> list[Prompt]:
    """A sentence spoken in one style; the text question asks about one attribute.

    The asked attribute ("rate", "pitch", "volume" or "gender") and its label are drawn
    uniformly; the other style attributes stay normal. For "gender" the voice is drawn
    from the female or male voices among `voices` (see VOICE_GENDER; the default pool
    holds the voices whose gender is known). `noise` adds background noise as in the
    other tasks (none by default: the labels were calibrated on clean speech). Pitch levels are
    relative to the voice's own normal pitch. meta: `attribute`, `label`, `choices`,
    `text` (the spoken sentence), `voice` (the espeak voice). The target text is the label.
    """
    check_count(n, "perception")
    unknown = [a for a in attributes if a not in PERCEPTION_CHOICES]
    if unknown or not attributes:
        raise ValueError(
            f"perception: attributes={list(attributes)!r} is not valid; "
            f"use one or more of {', '.join(PERCEPTION_CHOICES)}"
        )
    speakers = resolve_voices(voices)
    conditions = Conditions(noise=noise)
    by_gender = {g: [v for v in speakers if VOICE_GENDER.get(v.variant) == g] for g in PERCEPTION_CHOICES["gender"]}
    if "gender" in attributes and not all(by_gender.values()):
        raise ValueError(
            f"perception: gender questions need both a female and a male voice among voices="
            f"{[v.spec for v in speakers]}; the known ones are {', '.join(VOICE_GENDER)}"
        )
    rng = np.random.default_rng(seed)
    prompts, clips = [], []
    for i in range(n):
        attribute = attributes[int(rng.integers(len(attributes)))]
        choices = PERCEPTION_CHOICES[attribute]
        label = choices[int(rng.integers(len(choices)))]
        text = sentence(rng)
        style = SpeechStyle() if attribute == "gender" else SpeechStyle(**{attribute: label})
        pool = by_gender[label] if attribute == "gender" else speakers
        clip = draw_clip(rng, text, pool, style, conditions)
        clips.append(clip)
        prompts.append(
            Prompt(
                id=f"perception-{seed}-{i}",
                messages=[Message("human", PERCEPTION_QUESTIONS[attribute])],
                task="perception",
                meta={"attribute": attribute, "label": label, "choices": list(choices), "text": text,
                      "voice": clip.voice.spec},
                target=Response(text=label),
            )
        )
    return attach_audio(prompts, clips, sample_rate, max_seconds, seed)


@task("styled_speech")
def styled_speech(n: int, seed: int, *, max_attributes: int = 1) -> list[Prompt]:
    """A text instruction `say "X" slowly`; the answer is X spoken in that style.

    The instruction is text only: the skill is producing speech in a style. meta:
    `text` (X) and `style` ({attribute: level}, 1..max_attributes attributes, never
    "normal"). The target has no text and speaks X in the style.
    """
    check_count(n, "styled_speech")
    _check_max_attributes(max_attributes, "styled_speech")
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(n):
        text = sentence(rng)
        style = _draw_style(rng, max_attributes)
        prompts.append(
            Prompt(
                id=f"styled_speech-{seed}-{i}",
                messages=[Message("human", f'say "{text}" {style_phrase(style)}')],
                task="styled_speech",
                meta={"text": text, "style": style},
                target=Response(text="", speech=text, style=SpeechStyle(**style)),
            )
        )
    return prompts


# -------------------------------------------------------------------------- helpers


def _check_max_attributes(max_attributes: int, task: str) -> None:
    if not 1 <= max_attributes <= len(STYLE_PHRASES):
        raise ValueError(
            f"{task}: max_attributes={max_attributes} must be in 1..{len(STYLE_PHRASES)} "
            f"(how many of {', '.join(STYLE_PHRASES)} one prompt may ask for)"
        )


def _draw_style(rng: np.random.Generator, max_attributes: int) -> dict[str, str]:
    """1..max_attributes distinct style attributes, each at a non-normal level."""
    names = list(STYLE_PHRASES)
    count = int(rng.integers(1, max_attributes + 1))
    style = {}
    for k in sorted(rng.choice(len(names), size=count, replace=False)):
        levels = list(STYLE_PHRASES[names[k]])
        style[names[k]] = levels[int(rng.integers(len(levels)))]
    return style


def sentence(rng: np.random.Generator) -> str:
    """A random template sentence of the transcription, perception and styled-speech tasks."""
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]

    def pick(options: Sequence[str]) -> str:
        return options[int(rng.integers(len(options)))]

    slots = {
        "colour": pick(_COLOURS),
        "thing": pick(_THINGS),
        "place": pick(_PLACES),
        "animals": pick(_ANIMALS),
        "day": pick(_DAYS),
        "minutes": pick(_MINUTES),
        "count": number_to_words(int(rng.integers(2, 13))),
        "hour": number_to_words(int(rng.integers(1, 13))),
        "degrees": number_to_words(int(rng.integers(10, 36))),
        "d1": number_to_words(int(rng.integers(10))),
        "d2": number_to_words(int(rng.integers(10))),
        "d3": number_to_words(int(rng.integers(10))),
    }
    return template.format(**slots)


def sentence_words() -> set[str]:
    """Every word `sentence` can say, besides the numbers it draws (2-12, 1-12, 10-35, 0-9)."""
    fixed = {w for t in _TEMPLATES for w in t.split() if not w.startswith("{")}
    return fixed | {w for phrase in _SLOT_WORDS for w in phrase.split()}
