"""Seeded synthetic speech tasks, spoken by espeak-ng.

Each task function returns `list[Prompt]`: the human turn carries the question (as
16 kHz float32 audio by default, or as text for `styled_speech`), `task` names the
task, `meta` holds the reference fields a reward needs and `target` is the SFT
reference answer. All randomness comes from `numpy.random.default_rng(seed)`, so the
same seed gives identical prompts with bit-identical audio.

Speakers are drawn from espeak-ng en-us voice variants (`DEFAULT_VOICES`), and every
clip's rate, pitch and volume are jittered inside the ranges of `STYLE_SETTINGS`, so
a model cannot memorise a single voice.

Why the audio is rendered in subprocesses: espeak-ng carries hidden state from one
utterance to the next (the phase of its pitch flutter is a static variable in
wavegen.c that no API resets), so the same text said twice in one process comes out
slightly different; and it seeds its breath noise from the clock. So each task call
draws everything first (a noise seed per clip included), then speaks its clips in
order, in chunks of 250, each chunk in a fresh Python process (about 0.2 s of
overhead; chunks run in parallel, one per CPU core). The audio then depends only on
the arguments, and the first k prompts of a call with n > k are those of the call
with n = k.

Tasks (see `TASKS`, or call `make_task(name, n, seed, **kw)`):
- `arithmetic`: "what is A plus/minus B" spoken; answer in text (digits) and speech
  (words); `styled=True` adds a requested speaking style, spoken ("... answer slowly")
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

import ctypes
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from vocalign.data.espeak import Voice, available_variants, engine, synthesize
from vocalign.data.types import STYLE_LEVELS, Audio, Message, Prompt, Response, SpeechStyle

# Every synthesized clip is at most this long; it sits under the policy's audio limit.
MAX_CLIP_SECONDS = 4.0

# espeak-ng en-us variants. Whispering, croaking and robotic variants are left out.
FEMALE_VOICES = ("f1", "f2", "f3", "f4", "f5")
MALE_VOICES = ("m1", "m2", "m3", "m4", "m5", "m6", "m7")
DEFAULT_VOICES = FEMALE_VOICES + MALE_VOICES
VOICE_GENDER = {**{v: "female" for v in FEMALE_VOICES}, **{v: "male" for v in MALE_VOICES}}

# espeak-ng settings per style level: each clip draws a value uniformly in [lo, hi]
# (centres 120/175/260 wpm, pitch 20/50/85, volume 35/100/188). Measured on the 12
# default voices: slow/normal/fast last about 1.45x/1x/0.72x as long; low/high pitch
# has about 0.75x/1.45x the F0 of normal (relative to the voice: a female voice's low
# is near a male voice's high); soft/loud have about 0.35x/1.8x the RMS of normal.
STYLE_SETTINGS: dict[str, dict[str, tuple[int, int]]] = {
    "rate": {"slow": (112, 128), "normal": (165, 185), "fast": (245, 275)},  # words per minute
    "pitch": {"low": (16, 24), "normal": (46, 54), "high": (81, 89)},  # espeak 0-99
    "volume": {"soft": (30, 40), "normal": (92, 108), "loud": (176, 200)},  # espeak 0-200
}

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

# Clips rendered per fresh espeak-ng process (chunks run in parallel, one per CPU core).
_RENDER_CHUNK = 250

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


def arithmetic(
    n: int,
    seed: int,
    *,
    max_operand: int = 9,
    styled: bool = False,
    max_attributes: int = 1,
    style_in: str = "audio",
    target_style: str = "requested",
    think: bool = False,
    voices: Sequence[str | Voice] = DEFAULT_VOICES,
    sample_rate: int = 16000,
    max_seconds: float = MAX_CLIP_SECONDS,
) -> list[Prompt]:
    """Spoken "what is A plus B" / "what is A minus B", operands in 0..max_operand.

    A minus question never goes negative. meta: `question` (the spoken text), `answer`
    (int), `operands` [A, B], `op` ("plus" or "minus"). The target answers with the
    digits in text and the number in words in speech.

    With `styled`, the prompt asks for a speaking style; meta `style` is then
    {attribute: level} (1..max_attributes attributes, never "normal"). `style_in` says
    where the request is: "audio" speaks it at the end of the question ("... answer
    slowly", part of meta `question`), "text" writes it as the human turn's text
    ("answer slowly"). `target_style` says how the SFT target speaks: "requested" (in
    the requested style; "normal" without a request) or "random" (every attribute at a
    level drawn uniformly, whatever was asked: varied delivery that follows no request,
    which leaves following requests to RL). With `think`, the target first reasons in
    <think>: it writes out the question it heard and the style asked for ("three plus
    four", "three plus four answer slowly"), then answers.
    With the defaults every clip fits MAX_CLIP_SECONDS; larger operands or several
    spoken style requests make longer questions, and a clip over `max_seconds` is an
    error.
    """
    _check_count(n, "arithmetic")
    if max_operand < 0:
        raise ValueError(f"arithmetic: max_operand={max_operand} must be >= 0")
    if styled:
        _check_max_attributes(max_attributes, "arithmetic")
    if style_in not in ("audio", "text"):
        raise ValueError(f"arithmetic: style_in={style_in!r} is not known; use 'audio' (spoken) or 'text'")
    if target_style not in ("requested", "random"):
        raise ValueError(f"arithmetic: target_style={target_style!r} is not known; use 'requested' or 'random'")
    speakers = _voices(voices)
    rng = np.random.default_rng(seed)
    prompts, clips = [], []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(0, max_operand + 1, size=2))
        op = "plus" if rng.random() < 0.5 else "minus"
        if op == "minus" and b > a:
            a, b = b, a
        answer = a + b if op == "plus" else a - b
        question = f"what is {number_to_words(a)} {op} {number_to_words(b)}"
        style = _draw_style(rng, max_attributes) if styled else {}
        request = f"answer {style_phrase(style)}" if style else ""
        if request and style_in == "audio":
            question += f"? {request}"
        clips.append(_draw_clip(rng, question, speakers, SpeechStyle()))
        spoken_style = style
        if target_style == "random":
            spoken_style = {attr: levels[int(rng.integers(len(levels)))] for attr, levels in STYLE_LEVELS.items()}
        meta = {"question": question, "answer": answer, "operands": [a, b], "op": op}
        if style:
            meta["style"] = style
        prompts.append(
            Prompt(
                id=f"arithmetic{'-styled' if styled else ''}-{seed}-{i}",
                messages=[Message("human", request if style_in == "text" else "")],
                task="arithmetic",
                meta=meta,
                target=Response(
                    text=str(answer), speech=number_to_words(answer), style=SpeechStyle(**spoken_style),
                    think=" ".join(filter(None, [f"{number_to_words(a)} {op} {number_to_words(b)}", request])) if think else None,
                ),
            )
        )
    return _attach_audio(prompts, clips, sample_rate, max_seconds, seed)


def transcription(
    n: int,
    seed: int,
    *,
    voices: Sequence[str | Voice] = DEFAULT_VOICES,
    sample_rate: int = 16000,
    max_seconds: float = MAX_CLIP_SECONDS,
) -> list[Prompt]:
    """A short templated sentence spoken; the human text is "transcribe the audio".

    meta: `transcript` (lowercase words, numbers in words, no punctuation). The target
    is the transcript as text, with no speech.
    """
    _check_count(n, "transcription")
    speakers = _voices(voices)
    rng = np.random.default_rng(seed)
    prompts, clips = [], []
    for i in range(n):
        text = sentence(rng)
        clips.append(_draw_clip(rng, text, speakers, SpeechStyle()))
        prompts.append(
            Prompt(
                id=f"transcription-{seed}-{i}",
                messages=[Message("human", TRANSCRIBE_INSTRUCTION)],
                task="transcription",
                meta={"transcript": text},
                target=Response(text=text),
            )
        )
    return _attach_audio(prompts, clips, sample_rate, max_seconds, seed)


def perception(
    n: int,
    seed: int,
    *,
    attributes: Sequence[str] = tuple(PERCEPTION_CHOICES),
    voices: Sequence[str | Voice] = DEFAULT_VOICES,
    sample_rate: int = 16000,
    max_seconds: float = MAX_CLIP_SECONDS,
) -> list[Prompt]:
    """A sentence spoken in one style; the text question asks about one attribute.

    The asked attribute ("rate", "pitch", "volume" or "gender") and its label are drawn
    uniformly; the other style attributes stay normal. For "gender" the voice is drawn
    from the female or male voices among `voices` (see VOICE_GENDER). Pitch levels are
    relative to the voice's own normal pitch. meta: `attribute`, `label`, `choices`,
    `text` (the spoken sentence), `voice` (the espeak voice). The target text is the label.
    """
    _check_count(n, "perception")
    unknown = [a for a in attributes if a not in PERCEPTION_CHOICES]
    if unknown or not attributes:
        raise ValueError(
            f"perception: attributes={list(attributes)!r} is not valid; "
            f"use one or more of {', '.join(PERCEPTION_CHOICES)}"
        )
    speakers = _voices(voices)
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
        clip = _draw_clip(rng, text, pool, style)
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
    return _attach_audio(prompts, clips, sample_rate, max_seconds, seed)


def styled_speech(n: int, seed: int, *, max_attributes: int = 1) -> list[Prompt]:
    """A text instruction `say "X" slowly`; the answer is X spoken in that style.

    The instruction is text only: the skill is producing speech in a style. meta:
    `text` (X) and `style` ({attribute: level}, 1..max_attributes attributes, never
    "normal"). The target has no text and speaks X in the style.
    """
    _check_count(n, "styled_speech")
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


def tool_use(n: int, seed: int, **kw) -> list[Prompt]:
    """Questions that need a tool; see `vocalign.data.tool_tasks.tool_use` (imported when used)."""
    from vocalign.data.tool_tasks import tool_use as make

    return make(n, seed, **kw)


TASKS: dict[str, Callable[..., list[Prompt]]] = {
    "arithmetic": arithmetic,
    "transcription": transcription,
    "perception": perception,
    "styled_speech": styled_speech,
    "tool_use": tool_use,
}


def make_task(name: str, n: int, seed: int, **kw) -> list[Prompt]:
    """`n` prompts of the task called `name` (a key of TASKS); `kw` go to its function."""
    if name not in TASKS:
        raise ValueError(f"synthetic task {name!r} is not known; use one of {', '.join(TASKS)}")
    return TASKS[name](n, seed, **kw)


# -------------------------------------------------------------------------- helpers


def _check_count(n: int, task: str) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"{task}: n={n!r} must be a non-negative int (the number of prompts)")


def _voices(voices: Sequence[str | Voice]) -> list[Voice]:
    """Voice objects for `voices`: a bare name is an en-us variant ("f3"), a "lang+variant" spec is kept."""
    out = []
    for v in voices:
        if isinstance(v, Voice):
            out.append(v)
        elif "+" in v:
            name, _, variant = v.partition("+")
            out.append(Voice(name, variant))
        else:
            out.append(Voice("en-us", v))
    if not out:
        raise ValueError("voices is empty; give at least one espeak-ng variant, e.g. DEFAULT_VOICES")
    known = set(available_variants())
    unknown = [v.spec for v in out if v.variant and v.variant not in known]
    if unknown:
        raise ValueError(f"voices {unknown} are not espeak-ng variants; see available_variants()")
    return out


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


@dataclass(frozen=True)
class _Clip:
    """What to speak and how; drawn in the caller's process, rendered in a fresh one."""

    text: str
    voice: Voice
    rate: int
    pitch: int
    volume: int
    noise_seed: int  # seeds espeak-ng's breath noise, which it otherwise seeds from the clock


def _draw_clip(rng: np.random.Generator, text: str, voices: Sequence[Voice], style: SpeechStyle) -> _Clip:
    """`text` spoken by a random voice from `voices`, with settings jittered within `style`'s levels."""
    voice = voices[int(rng.integers(len(voices)))]
    settings = {}
    for attr, levels in STYLE_SETTINGS.items():
        lo, hi = levels[getattr(style, attr)]
        settings[attr] = int(rng.integers(lo, hi + 1))
    return _Clip(text, voice, **settings, noise_seed=int(rng.integers(2**31)))


def _attach_audio(
    prompts: list[Prompt], clips: list[_Clip], sample_rate: int, max_seconds: float, seed: int
) -> list[Prompt]:
    """Render `clips` and give clip i to the (last, human) turn of prompts[i]."""
    for i, (prompt, clip, wav) in enumerate(zip(prompts, clips, _render(clips, sample_rate))):
        # espeak-ng clips loud speech at full scale; resampling can overshoot it slightly.
        audio = Audio(np.clip(wav, -1.0, 1.0), sample_rate)
        if audio.seconds > max_seconds:
            raise ValueError(
                f"{prompt.task} prompt {i} (seed {seed}): {clip.text!r} spoken by {clip.voice.spec} "
                f"lasts {audio.seconds:.2f} s, over max_seconds={max_seconds}; use shorter texts "
                f"(for arithmetic: a smaller max_operand or max_attributes) or raise max_seconds"
            )
        prompt.messages[-1].audio = audio
    return prompts


def _render(clips: list[_Clip], sample_rate: int) -> list[np.ndarray]:
    """Speak every clip; each chunk of _RENDER_CHUNK clips, in order, in a fresh process.

    Fixed chunks keep the audio independent of how many chunks run at once.
    """
    chunks = [clips[i : i + _RENDER_CHUNK] for i in range(0, len(clips), _RENDER_CHUNK)]
    with ThreadPoolExecutor(max_workers=max(1, min(len(chunks), os.cpu_count() or 1))) as pool:
        rendered = list(pool.map(lambda chunk: _render_in_fresh_process(chunk, sample_rate), chunks))
    return [wav for chunk in rendered for wav in chunk]


def _render_in_fresh_process(clips: list[_Clip], sample_rate: int) -> list[np.ndarray]:
    job = {
        "sample_rate": sample_rate,
        "clips": [[c.text, c.voice.spec, c.rate, c.pitch, c.volume, c.noise_seed] for c in clips],
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run(
        [sys.executable, "-m", "vocalign.data.synthetic"],
        input=json.dumps(job).encode(), capture_output=True, env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"the espeak-ng rendering process failed (exit {done.returncode}) on {len(clips)} clips; "
            f"its error output ends with:\n{done.stderr.decode(errors='replace')[-2000:]}"
        )
    out = io.BytesIO(done.stdout)
    lengths, samples = np.load(out), np.load(out)
    return np.split(samples, np.cumsum(lengths)[:-1])


def _render_job(job: dict) -> None:
    """The rendering process: read a job (JSON) from stdin, write lengths and samples (.npy) to stdout."""
    set_noise_seed = engine().lib.espeak_ng_SetRandSeed
    set_noise_seed.argtypes = [ctypes.c_long]
    waves = []
    for text, voice, rate, pitch, volume, noise_seed in job["clips"]:
        set_noise_seed(noise_seed)
        waves.append(synthesize(text, voice, rate, pitch, volume, sample_rate=job["sample_rate"]))
    np.save(sys.stdout.buffer, np.array([len(w) for w in waves], dtype=np.int64))
    np.save(sys.stdout.buffer, np.concatenate(waves).astype(np.float32))
    sys.stdout.flush()


if __name__ == "__main__":
    _render_job(json.load(sys.stdin))
