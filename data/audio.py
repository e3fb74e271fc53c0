"""Decoding audio from the shapes datasets hold it in, into a mono float32 `Audio`.

`load_audio` accepts a file path, raw encoded bytes, a sample array (with its rate),
or the dicts Hugging Face `datasets` produces ({"array", "sampling_rate"} for decoded
audio, {"path", "bytes"} for undecoded audio). Files and bytes are decoded with
soundfile (WAV, FLAC, OGG, MP3, ...; no torchcodec), channels are averaged to mono and
the result is resampled with soxr. Anything unusable raises `BadAudioError`, whose
message names where the audio came from, what is wrong and what to do.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from vocalign.data.espeak import resample
from vocalign.data.types import Audio

# More channels than this on the short axis of a 2-D array means it is not audio.
_MAX_CHANNELS = 16
# A float waveform whose peak passes this is unscaled integer PCM, not [-1, 1] audio.
_MAX_FLOAT_PEAK = 2.0


class BadAudioError(ValueError):
    """Audio that cannot be used: missing, unreadable, empty, non-finite or badly shaped."""


def load_audio(
    source: Any,
    target_rate: int,
    *,
    where: str,
    sample_rate: int | None = None,
    base_dir: str | Path | None = None,
) -> Audio:
    """Decode `source` to mono float32 audio at `target_rate` Hz.

    source: a path (str or Path; relative paths are resolved against `base_dir` when
    given), encoded bytes, a numpy array or list of samples (then `sample_rate` is
    required), or a dict {"array": ..., "sampling_rate": ...} or {"path": ..., "bytes":
    ...} (bytes win when both are set). `where` says where the audio came from, e.g.
    "row 17 of data/train.jsonl"; every error message starts with it.
    """
    if isinstance(source, dict):
        return _load_dict(source, target_rate, where, base_dir)
    if isinstance(source, (str, Path)):
        if not str(source).strip():
            raise BadAudioError(f"{where}: audio path is an empty string; give a file path or leave the audio out")
        path = _resolve(source, base_dir)
        wav, rate = _read_file(path, where)
        origin = f"audio file {str(path)!r}"
    elif isinstance(source, (bytes, bytearray, memoryview)):
        wav, rate = _read_bytes(bytes(source), where)
        origin = "audio bytes"
    elif isinstance(source, (np.ndarray, list, tuple)):
        if sample_rate is None:
            raise BadAudioError(
                f"{where}: audio given as an array of samples has no sample rate; pass "
                f"sample_rate=, or give a dict {{'array': ..., 'sampling_rate': ...}}"
            )
        wav, rate = _as_samples(source, where), sample_rate
        origin = "audio sample array"
    else:
        raise BadAudioError(
            f"{where}: audio of type {type(source).__name__} is not understood; give a file "
            f"path, encoded bytes, an array of samples with its sample_rate, or a dict with "
            f"'array' and 'sampling_rate' or with 'path' and/or 'bytes'"
        )
    return _finish(wav, rate, target_rate, where, origin)


def _load_dict(source: dict, target_rate: int, where: str, base_dir: str | Path | None) -> Audio:
    if source.get("array") is not None:
        rate = source.get("sampling_rate")
        if rate is None:
            raise BadAudioError(
                f"{where}: audio dict has 'array' but no 'sampling_rate'; add the rate in Hz"
            )
        try:
            rate = int(rate)
        except (TypeError, ValueError) as e:
            raise BadAudioError(f"{where}: audio 'sampling_rate' is {rate!r}; give the rate in Hz as a number") from e
        wav = _as_samples(source["array"], where)
        return _finish(wav, rate, target_rate, where, "audio sample array")
    if source.get("bytes") is not None:
        wav, rate = _read_bytes(bytes(source["bytes"]), where, name=source.get("path"))
        return _finish(wav, rate, target_rate, where, f"audio bytes of {source.get('path') or 'an unnamed file'!r}")
    if source.get("path"):
        path = _resolve(source["path"], base_dir)
        wav, rate = _read_file(path, where)
        return _finish(wav, rate, target_rate, where, f"audio file {str(path)!r}")
    raise BadAudioError(
        f"{where}: audio dict with keys {sorted(source)} holds no audio; it needs 'array' "
        f"and 'sampling_rate', or a 'path' or 'bytes' that is not empty"
    )


def _resolve(path: str | Path, base_dir: str | Path | None) -> Path:
    path = Path(path).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    return path


def _read_file(path: Path, where: str) -> tuple[np.ndarray, int]:
    if not path.exists():
        raise BadAudioError(
            f"{where}: audio file {str(path)!r} does not exist; fix the path (relative paths "
            f"are resolved against the data file's folder) or remove the row"
        )
    if path.is_dir():
        raise BadAudioError(f"{where}: audio path {str(path)!r} is a folder; give the path of an audio file")
    return _decode(str(path), f"{where}: audio file {str(path)!r}",
                   "convert it to WAV or FLAC (e.g. `ffmpeg -i in.xyz out.wav`) or remove the row")


def _read_bytes(data: bytes, where: str, name: str | None = None) -> tuple[np.ndarray, int]:
    what = f"audio bytes of {name!r}" if name else "audio bytes"
    if not data:
        raise BadAudioError(f"{where}: {what} are empty (0 bytes); give the encoded file's contents")
    return _decode(io.BytesIO(data), f"{where}: {what} ({len(data)} bytes)", "give the contents of a WAV/FLAC/OGG/MP3 file")


def _decode(source: str | io.BytesIO, what: str, fix: str) -> tuple[np.ndarray, int]:
    """A mono float32 waveform and its sample rate; a BadAudioError saying `what` failed and the `fix`."""
    try:
        wav, rate = sf.read(source, dtype="float32", always_2d=True)
    except sf.SoundFileError as e:
        raise BadAudioError(f"{what} could not be decoded as audio ({e}); {fix}") from e
    return wav.mean(axis=1), int(rate)


def _as_samples(array: Any, where: str) -> np.ndarray:
    """A 1-D float32 waveform from a sample array: integers scaled, channels averaged."""
    try:
        wav = np.asarray(array)
    except ValueError as e:  # ragged nested lists
        raise BadAudioError(f"{where}: audio samples do not form an array ({e}); give a flat list of numbers") from e
    if wav.dtype == object or not (np.issubdtype(wav.dtype, np.floating) or np.issubdtype(wav.dtype, np.integer)):
        raise BadAudioError(
            f"{where}: audio samples of dtype {wav.dtype} are not numbers; give a numeric array"
        )
    if np.issubdtype(wav.dtype, np.integer):
        if wav.dtype not in (np.int16, np.int32):
            raise BadAudioError(
                f"{where}: integer audio samples of dtype {wav.dtype} have no known scale; give "
                f"float samples in [-1, 1], or an int16/int32 PCM array"
            )
        wav = wav.astype(np.float32) / float(-np.iinfo(wav.dtype).min)
    if wav.ndim == 2:
        channel_axis = int(np.argmin(wav.shape))
        if wav.shape[channel_axis] > _MAX_CHANNELS:
            raise BadAudioError(
                f"{where}: audio array of shape {wav.shape} is not (samples,) or (samples, "
                f"channels); give a 1-D waveform"
            )
        wav = wav.mean(axis=channel_axis)
    elif wav.ndim != 1:
        raise BadAudioError(
            f"{where}: audio array of shape {wav.shape} has {wav.ndim} dimensions; give a 1-D "
            f"waveform or a (samples, channels) array"
        )
    return wav.astype(np.float32, copy=False)


def _finish(wav: np.ndarray, rate: int, target_rate: int, where: str, origin: str) -> Audio:
    if rate <= 0:
        raise BadAudioError(f"{where}: {origin} has sample rate {rate}; give the true rate in Hz")
    if wav.size == 0:
        raise BadAudioError(f"{where}: {origin} holds no samples (empty audio); give a real recording or remove the row")
    finite = np.isfinite(wav)
    if not finite.all():
        raise BadAudioError(
            f"{where}: {origin} has {int((~finite).sum())} non-finite samples (NaN or inf) of "
            f"{wav.size}; re-export the audio or remove the row"
        )
    peak = float(np.abs(wav).max())
    if peak > _MAX_FLOAT_PEAK:
        raise BadAudioError(
            f"{where}: {origin} has samples up to {peak:g}, far outside [-1, 1]; it looks like "
            f"unscaled integer PCM: divide by 32768 (16-bit) or store it as int16"
        )
    wav = np.ascontiguousarray(resample(wav, rate, target_rate), dtype=np.float32)
    return Audio(wav, target_rate)
