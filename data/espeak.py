"""Speech synthesis with espeak-ng, through ctypes over the `espeakng-loader` wheel.

espeak-ng keeps one global synthesizer per process, so every call here holds a
process-wide lock: the wrapper is safe to call from several threads (calls are
serialised). Output is 16-bit PCM at 22,050 Hz, returned as float32 and resampled
with soxr to the rate the caller asks for.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import soxr

ESPEAK_RATE_HZ = 22050

# espeak_AUDIO_OUTPUT, espeak_PARAMETER and synth flags, from speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH, _PARAM_RANGE = 1, 2, 3, 4
_CHARS_UTF8 = 1
_FLAG_PHONEMES = 0x100
_POS_CHARACTER = 1

_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

# Ranges espeak-ng accepts (speak_lib.h): words per minute, 0-200 volume, 0-100 pitch.
RATE_RANGE = (80, 450)
PITCH_RANGE = (0, 99)
VOLUME_RANGE = (0, 200)


@dataclass(frozen=True)
class Voice:
    """An espeak-ng voice: a language voice plus an optional variant (timbre)."""

    name: str = "en-us"
    variant: str = ""  # e.g. "f3", "m2", "whisper"; "" for the plain voice

    @property
    def spec(self) -> str:
        return f"{self.name}+{self.variant}" if self.variant else self.name


class _Engine:
    """The process-wide espeak-ng instance. Use `engine()`; all methods lock."""

    def __init__(self) -> None:
        import espeakng_loader

        self.lock = threading.Lock()
        self.data_path = espeakng_loader.get_data_path()
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]
        lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int]
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 200, self.data_path.encode(), 0)
        if rate <= 0:
            raise RuntimeError(f"espeak-ng failed to initialise with data at {self.data_path}")
        self.sample_rate = rate
        self.lib = lib
        self._chunks: list[np.ndarray] = []

        def on_audio(wav, n, _events):  # called by espeak_Synth with each block of samples
            if n > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        self._callback = _CALLBACK(on_audio)  # keep a reference: espeak holds the pointer
        lib.espeak_SetSynthCallback(self._callback)
        self._voice: str | None = None

    def _set_voice(self, voice: Voice) -> None:
        if voice.spec == self._voice:
            return
        # espeak-ng silently falls back to the plain voice for an unknown variant
        if voice.variant and not os.path.exists(os.path.join(self.data_path, "voices", "!v", voice.variant)):
            raise ValueError(
                f"espeak-ng voice {voice.spec!r} is not known: no variant {voice.variant!r}; "
                "see `available_variants()` for the variants"
            )
        if self.lib.espeak_SetVoiceByName(voice.spec.encode()) != 0:
            raise ValueError(
                f"espeak-ng voice {voice.spec!r} is not known; see `available_variants()` "
                f"and the voices in {self.data_path}/lang"
            )
        self._voice = voice.spec

    def synth(self, text: str, voice: Voice, rate: int, pitch: int, volume: int, phonemes: bool) -> np.ndarray:
        data = text.encode("utf-8") + b"\0"
        flags = _CHARS_UTF8 | (_FLAG_PHONEMES if phonemes else 0)
        with self.lock:
            self._set_voice(voice)
            self.lib.espeak_SetParameter(_PARAM_RATE, int(rate), 0)
            self.lib.espeak_SetParameter(_PARAM_PITCH, int(pitch), 0)
            self.lib.espeak_SetParameter(_PARAM_VOLUME, int(volume), 0)
            self._chunks = []
            err = self.lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, flags, None, None)
            self.lib.espeak_Synchronize()
            chunks, self._chunks = self._chunks, []
        if err != 0:
            raise RuntimeError(f"espeak-ng could not synthesise {text[:60]!r} (error {err})")
        if not chunks:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(chunks).astype(np.float32) / 32768.0

    def phonemes(self, text: str, voice: Voice) -> list[str]:
        """espeak-ng phoneme mnemonics for `text`, one list entry per phoneme, words split by ' '."""
        out: list[str] = []
        with self.lock:
            self._set_voice(voice)
            buf = ctypes.c_char_p(text.encode("utf-8"))
            ptr = ctypes.pointer(buf)
            # phonememode: ascii mnemonics, '_' (0x5f) between phonemes (bits 8-23)
            mode = 0x5F << 8
            while ptr.contents.value:
                chunk = self.lib.espeak_TextToPhonemes(ptr, _CHARS_UTF8, mode)
                if chunk:
                    out.append(chunk.decode("utf-8"))
        words = " ".join(out).split()
        return [p for w in words for p in (w.split("_") + [" "]) if p][:-1] if words else []


@lru_cache(maxsize=1)
def engine() -> _Engine:
    return _Engine()


def _check_range(name: str, value: int, bounds: tuple[int, int]) -> int:
    lo, hi = bounds
    if not lo <= value <= hi:
        raise ValueError(f"espeak-ng {name}={value} is out of range; use {lo}..{hi}")
    return int(value)


def resample(waveform: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    if from_rate == to_rate or len(waveform) == 0:
        return waveform.astype(np.float32, copy=False)
    return soxr.resample(waveform, from_rate, to_rate, quality="HQ").astype(np.float32)


def synthesize(
    text: str,
    voice: Voice | str = Voice(),
    rate: int = 175,
    pitch: int = 50,
    volume: int = 100,
    sample_rate: int = 16000,
    phonemes: bool = False,
) -> np.ndarray:
    """Speak `text` (or espeak phoneme mnemonics when `phonemes`) and return float32 audio.

    rate is in words per minute (80-450), pitch 0-99 (50 is the voice's normal), volume
    0-200 (100 is normal). The waveform is resampled from 22,050 Hz to `sample_rate`.
    """
    if isinstance(voice, str):
        name, _, variant = voice.partition("+")
        voice = Voice(name, variant)
    if not text.strip():
        raise ValueError("synthesize() got empty text; give at least one word to speak")
    rate = _check_range("rate", rate, RATE_RANGE)
    pitch = _check_range("pitch", pitch, PITCH_RANGE)
    volume = _check_range("volume", volume, VOLUME_RANGE)
    eng = engine()
    if phonemes:
        text = f"[[{text}]]"
    wav = eng.synth(text, voice, rate, pitch, volume, phonemes)
    return resample(wav, eng.sample_rate, sample_rate)


def text_to_phonemes(text: str, voice: Voice | str = Voice()) -> list[str]:
    """espeak-ng's phoneme mnemonics for `text`; word boundaries are ' ' entries."""
    if isinstance(voice, str):
        name, _, variant = voice.partition("+")
        voice = Voice(name, variant)
    return engine().phonemes(text, voice)


def available_variants() -> list[str]:
    """Names of the voice variants shipped with espeak-ng (usable as `Voice.variant`)."""
    folder = os.path.join(engine().data_path, "voices", "!v")
    return sorted(os.listdir(folder))
