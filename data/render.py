"""Speaking the synthetic tasks' clips: what to say and how is drawn, then rendered.

A task draws each clip first (`draw_clip`: the text, a speaker, espeak-ng settings, a
timbre warp, background noise and the seeds of espeak-ng's breath noise and of the
background noise), then speaks them all (`render_clips`) and gives clip i to prompt i
(`attach_audio`).

Why the audio is rendered in subprocesses: espeak-ng carries hidden state from one
utterance to the next (the phase of its pitch flutter is a static variable in
wavegen.c that no API resets), so the same text said twice in one process comes out
slightly different; and it seeds its breath noise from the clock. So the clips are
spoken in order, in chunks of 250, each chunk in a fresh Python process (about 0.2 s of
overhead; chunks run in parallel, one per CPU core). The audio then depends only on
the arguments, and the first k clips of a call with n > k are those of the call with
n = k.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from vocalign.data.espeak import Voice, engine, synthesize
from vocalign.data.speakers import Conditions, add_noise
from vocalign.data.types import Audio, Prompt, SpeechStyle

# Every synthesized clip is at most this long by default; it sits under the policy's audio limit.
MAX_CLIP_SECONDS = 4.0

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

# Clips rendered per fresh espeak-ng process (chunks run in parallel, one per CPU core).
_RENDER_CHUNK = 250


@dataclass(frozen=True)
class Clip:
    """What to speak and how; drawn in the caller's process, rendered in a fresh one."""

    text: str
    voice: Voice
    rate: int
    pitch: int
    volume: int
    breath_seed: int  # seeds espeak-ng's breath noise, which it otherwise seeds from the clock
    warp: float = 1.0  # resampling factor of the timbre warp (1: none)
    noise: tuple[str, float] | None = None  # (colour, SNR dB) of background noise
    noise_seed: int = 0


def draw_clip(
    rng: np.random.Generator, text: str, voices: Sequence[Voice], style: SpeechStyle | None = None,
    conditions: Conditions = Conditions(),
) -> Clip:
    """`text` spoken by a random voice from `voices`.

    With `style` (the label of a perception question, say), rate, pitch and volume are
    drawn within that style's STYLE_SETTINGS bands and the timbre is not warped (a warp
    would move pitch and rate off their labels); otherwise they are drawn from
    `conditions`' prosody ranges and warped. Background noise follows `conditions` either way.
    """
    voice = voices[int(rng.integers(len(voices)))]
    if style is None:
        settings = conditions.draw_prosody(rng)
        warp = conditions.draw_warp(rng)
    else:
        settings = {}
        for attr, levels in STYLE_SETTINGS.items():
            lo, hi = levels[getattr(style, attr)]
            settings[attr] = int(rng.integers(lo, hi + 1))
        warp = 1.0
    noise = conditions.draw_noise(rng)
    return Clip(text, voice, **settings, breath_seed=int(rng.integers(2**31)), warp=warp, noise=noise,
                noise_seed=int(rng.integers(2**31)))


def attach_audio(
    prompts: list[Prompt], clips: list[Clip], sample_rate: int, max_seconds: float, seed: int
) -> list[Prompt]:
    """Render `clips` and give clip i to the (last, human) turn of prompts[i]."""
    for i, (prompt, clip, wav) in enumerate(zip(prompts, clips, render_clips(clips, sample_rate))):
        if clip.noise is not None:
            wav = add_noise(wav, *clip.noise, seed=clip.noise_seed)
        # espeak-ng clips loud speech at full scale; resampling and noise can overshoot it.
        audio = Audio(np.clip(wav, -1.0, 1.0).astype(np.float32), sample_rate)
        if audio.seconds > max_seconds:
            raise ValueError(
                f"{prompt.task} prompt {i} (seed {seed}): {clip.text!r} spoken by {clip.voice.spec} at "
                f"{clip.rate} words per minute lasts {audio.seconds:.2f} s, over max_seconds={max_seconds}; use "
                f"shorter texts (for arithmetic: a smaller max_operand or max_attributes), faster prosody or raise max_seconds"
            )
        prompt.messages[-1].audio = audio
    return prompts


def render_clips(clips: list[Clip], sample_rate: int) -> list[np.ndarray]:
    """Speak every clip; each chunk of _RENDER_CHUNK clips, in order, in a fresh process.

    Fixed chunks keep the audio independent of how many chunks run at once.
    """
    chunks = [clips[i : i + _RENDER_CHUNK] for i in range(0, len(clips), _RENDER_CHUNK)]
    with ThreadPoolExecutor(max_workers=max(1, min(len(chunks), os.cpu_count() or 1))) as pool:
        rendered = list(pool.map(lambda chunk: _render_in_fresh_process(chunk, sample_rate), chunks))
    return [wav for chunk in rendered for wav in chunk]


def _render_in_fresh_process(clips: list[Clip], sample_rate: int) -> list[np.ndarray]:
    job = {
        "sample_rate": sample_rate,
        "clips": [[c.text, c.voice.spec, c.rate, c.pitch, c.volume, c.breath_seed, c.warp] for c in clips],
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run(
        [sys.executable, "-m", "vocalign.data.render"],
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
    """The rendering process: read a job (JSON) from stdin, write lengths and samples (.npy) to stdout.

    A warp of w renders at sample_rate / w and plays the samples at sample_rate: w times
    faster, with pitch and formants w times higher.
    """
    set_breath_seed = engine().lib.espeak_ng_SetRandSeed
    set_breath_seed.argtypes = [ctypes.c_long]
    waves = []
    for text, voice, rate, pitch, volume, breath_seed, warp in job["clips"]:
        set_breath_seed(breath_seed)
        rendered_at = int(round(job["sample_rate"] / warp))
        waves.append(synthesize(text, voice, rate, pitch, volume, sample_rate=rendered_at))
    np.save(sys.stdout.buffer, np.array([len(w) for w in waves], dtype=np.int64))
    np.save(sys.stdout.buffer, np.concatenate(waves).astype(np.float32))
    sys.stdout.flush()


if __name__ == "__main__":
    _render_job(json.load(sys.stdin))
