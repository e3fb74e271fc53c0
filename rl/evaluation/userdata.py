"""Your own evaluation data, in vocalign's row schema or in public benchmarks' formats.

Every format is read with `datasets` and mapped onto vocalign's row schema
(`vocalign.data.user_data`), so audio is decoded and checked the same way, and a bad
row is reported with its file, row and field. What each suite reads:

| suite | formats (detected from the fields of the first row) |
|---|---|
| `spoken_qa` | vocalign rows with `answer`; VoiceBench rows (`audio`, `prompt`, `reference`: `answer` is `reference`); URO-Bench rows (`source_wav`, `source_text`, `target_text`: audio, question text, `answer`; a list of targets keeps its first) |
| `style` | vocalign rows with `style` ({"rate": "slow"}; {} asks for none) |
| `transcription` | a folder of audio with transcripts: LJSpeech (`metadata.csv`, `ID|text|normalized`, audio in `wavs/ID.wav`), LibriSpeech (`*.trans.txt` lines `ID TEXT` beside `ID.flac`) or pairs `X.wav` + `X.txt`; or vocalign rows with `transcript` |
| `perception` | MMAU JSON or JSON lines (`id`, `audio_id`, `question`, `choices`, `answer`, and `category` or `task` for the breakdown); VoiceBench multiple choice (`audio`, `prompt`, `reference` a letter A-D, the options spoken or written in the prompt) |
| `tool_use` | vocalign rows with `expected_tool`, `expected_args` and `answer` |

An MMAU question is asked as its text followed by its choices, "(a) Man (b) Woman ...";
the answer counts when the response names the right choice or its letter.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from vocalign.data.synthetic import TRANSCRIBE_INSTRUCTION
from vocalign.data.types import Prompt
from vocalign.data.user_data import DATA_FILE_FORMATS, open_dataset, prompts_from_dataset

from .suites import Suite, with_prompts_checked

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")


def load_suite_data(suite: Suite, path: str | Path, on_bad_row: str = "raise") -> tuple[list[Prompt], list[str]]:
    """The prompts in `path` for `suite`, and the reasons of any rows skipped (on_bad_row="skip")."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{suite.name} data {str(path)!r} does not exist; give a file or folder (see `vocalign eval --help`)")
    bad_lines: list[str] = []
    if path.is_dir() and suite.data_kind == "transcripts" and not (path / "state.json").exists():
        rows, base = _transcript_folder(path), path
        dataset = datasets.Dataset.from_list(rows)
    else:
        dataset, base, bad_lines = _read_table(path, on_bad_row)
        dataset = _to_schema(dataset, suite, path)
    loaded = prompts_from_dataset(dataset, path, base, on_bad_row=on_bad_row, task=suite.name)
    return with_prompts_checked(suite, loaded.prompts, str(path)), bad_lines + loaded.skipped_reasons


def _read_table(path: Path, on_bad_row: str):
    """A JSON / JSON lines / Parquet file or a saved dataset folder, as a `datasets.Dataset`."""
    import datasets

    if path.is_file() and path.suffix.lower() not in DATA_FILE_FORMATS:
        raise ValueError(f"data file {str(path)!r} has an unknown extension {path.suffix!r}; use .jsonl, .json or .parquet")
    if path.is_file() and path.suffix.lower() == ".json" and _starts_with(path, "["):  # MMAU ships one JSON list
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"data file {str(path)!r} holds a JSON list whose items are not all objects; give one object per row")
        return datasets.Dataset.from_list([_jsonable(r) for r in rows]), path.parent, []
    opened = open_dataset(path, None, on_bad_row)
    return opened.data, opened.base_dir, opened.bad_lines


def _starts_with(path: Path, char: str) -> bool:
    with open(path, encoding="utf-8") as f:
        return f.read(4096).lstrip().startswith(char)


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    """A row whose dict-valued fields are JSON text: rows of one JSON list may give a field dicts of
    different keys, which one Arrow column cannot hold."""
    return {k: json.dumps(v) if isinstance(v, dict) else v for k, v in row.items()}


def _to_schema(dataset, suite: Suite, path: Path):
    """`dataset` with a benchmark's fields mapped onto vocalign's row schema."""
    columns = set(dataset.column_names)
    if {"audio_id", "question", "choices", "answer"} <= columns:  # MMAU
        return dataset.map(_mmau_row, remove_columns=["audio_id", "question"])
    if {"source_wav", "target_text"} <= columns:  # URO-Bench
        return dataset.map(_uro_row, remove_columns=sorted({"source_wav", "source_text", "target_text"} & columns))
    if {"audio", "prompt", "reference"} <= columns:  # VoiceBench
        return dataset.map(lambda row: _voicebench_row(row, suite), remove_columns=["reference"])
    return dataset


def _mmau_row(row: dict[str, Any]) -> dict[str, Any]:
    options = " ".join(f"({chr(ord('a') + i)}) {c}" for i, c in enumerate(row["choices"] or []))
    out = {"audio": row["audio_id"], "prompt": f"{row['question']} {options}".strip()}
    if row.get("category") is None and row.get("task") is not None:
        out["category"] = row["task"]
    return out


def _uro_row(row: dict[str, Any]) -> dict[str, Any]:
    target = row["target_text"]
    if isinstance(target, str) and target.startswith("["):
        target = json.loads(target)
    answer = target[0] if isinstance(target, list) and target else target
    return {"audio": row["source_wav"], "prompt": "", "question": row.get("source_text"), "answer": answer}


def _voicebench_row(row: dict[str, Any], suite: Suite) -> dict[str, Any]:
    reference = row["reference"]
    out: dict[str, Any] = {"answer": reference}
    if suite.data_kind == "mcq":
        letters = ["A", "B", "C", "D"]
        out["choices"] = letters
        out["answer"] = str(reference).strip("() ").upper()
    return out


def _transcript_folder(folder: Path) -> list[dict[str, Any]]:
    """Rows of a folder of audio with transcripts (LJSpeech, LibriSpeech or X.wav + X.txt pairs)."""
    rows: list[dict[str, Any]] = []
    if (folder / "metadata.csv").exists():  # LJSpeech: ID|text|normalized text, audio in wavs/
        with open(folder / "metadata.csv", encoding="utf-8", newline="") as f:
            for k, fields in enumerate(csv.reader(f, delimiter="|", quoting=csv.QUOTE_NONE), start=1):
                if len(fields) < 2:
                    raise ValueError(f"{folder / 'metadata.csv'} line {k}: expected ID|text[|normalized text], got {'|'.join(fields)!r}")
                text = fields[2] if len(fields) > 2 and fields[2] else fields[1]
                audio = folder / "wavs" / f"{fields[0]}.wav"
                rows.append(_transcript_row(fields[0], audio, text))
        return rows
    trans = sorted(folder.rglob("*.trans.txt"))
    if trans:  # LibriSpeech: ID TEXT per line, audio ID.flac beside it
        for file in trans:
            for k, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                utt, _, text = line.partition(" ")
                if not text:
                    raise ValueError(f"{file} line {k}: expected 'ID TEXT', got {line!r}")
                audio = next((file.parent / f"{utt}{s}" for s in AUDIO_SUFFIXES if (file.parent / f"{utt}{s}").exists()),
                             file.parent / f"{utt}.flac")
                rows.append(_transcript_row(utt, audio, text))
        return rows
    audio_files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    if not audio_files:
        raise ValueError(f"{folder} holds no audio with transcripts: give LJSpeech's metadata.csv, LibriSpeech's "
                         f"*.trans.txt, or X.wav files each with an X.txt transcript")
    for audio in audio_files:
        text_file = audio.with_suffix(".txt")
        if not text_file.exists():
            raise ValueError(f"{audio} has no transcript: put its text in {text_file.name} beside it")
        rows.append(_transcript_row(str(audio.relative_to(folder).with_suffix("")), audio, text_file.read_text(encoding="utf-8")))
    return rows


def _transcript_row(utt: str, audio: Path, text: str) -> dict[str, Any]:
    return {"id": utt, "audio": str(audio), "prompt": TRANSCRIBE_INSTRUCTION, "transcript": " ".join(text.lower().split())}
