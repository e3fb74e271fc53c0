"""Loading your own prompts: JSON lines, Parquet or a Hugging Face dataset folder.

`load_prompts(path)` reads a `.jsonl` / `.json` file, a `.parquet` file, or a folder
written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, with the `datasets`
library, and turns each row into a `Prompt`. Audio is decoded with soundfile
(`vocalign.data.audio.load_audio`), never by `datasets` itself, and resampled to
`sample_rate` (16 kHz by default).

Row schema (one row = one prompt):

| field      | required | meaning |
|------------|----------|---------|
| `id`       | no       | string or integer naming the row; default: the row's index (0-based). Must be unique. |
| `prompt`   | see below| text of the human turn (may be "" when `audio` is given). |
| `audio`    | see below| audio of the human turn: a file path, `{"path": ..., "bytes": ...}` (bytes win when set), or `{"array": [...], "sampling_rate": 16000}`. Any format libsndfile reads (WAV, FLAC, OGG, MP3, ...); stereo is averaged to mono. |
| `messages` | see below| instead of `prompt`/`audio`: the conversation as a list of turns `{"role", "content", "audio"}`; `role` is one of system, human, assistant, tool_json_schemas, input; `content` is text ("" by default); `audio` is optional, as above. The last turn must be `human` or `input` (what the model answers). |
| `system`   | no       | text of a system turn put first. |
| `task`     | no       | the task name (`Prompt.task`, used to pick rewards); default: the `task` argument. |
| `response` | no       | reference answer for SFT (`Prompt.target`): a string (a text answer), or `{"text", "speech", "style", "think", "codes"}` where `speech` is what is said aloud, `style` is as below, and `codes` (optional) is the speech as the model's own audio codes (Qwen2.5-Omni's talker codec: used instead of `speech`). |
| any other  | no       | reference fields for rewards, kept in `Prompt.meta` under their own names, e.g. `answer`, `transcript`, `label`, `style`. |

A row needs `messages`, or `prompt` and/or `audio` (an audio-only row is a spoken
question); `messages` cannot be combined with `prompt` or `audio`. `style`, in meta or
in `response`, maps attributes to levels: `{"rate": "slow"|"normal"|"fast", "pitch":
"low"|"normal"|"high", "volume": "soft"|"normal"|"loud"}` (give only the attributes
you mean). Null values are treated as absent (JSON lines rows may leave fields out).
In JSON lines a field may hold different types in different rows (`response` as text
in one row and a dict in another); Parquet columns hold one type each. A dataset saved
with an `Audio` column works as it is: its audio is read undecoded and decoded here.

Relative audio paths are resolved against the folder that holds the data file (for a
dataset folder: that folder). A bad row (a missing, unreadable, empty or non-finite
audio file, a missing or mistyped field, a duplicate id) raises `BadRowError` naming
the row and the file; with `on_bad_row="skip"` it is skipped instead, and counted in
`LoadedPrompts.skipped` with its reason in `skipped_reasons`.

Example row (JSON lines):
    {"id": "q1", "prompt": "", "audio": "clips/q1.wav", "answer": 7,
     "response": {"text": "7", "speech": "seven", "style": {"rate": "slow"}}}
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vocalign.data.audio import BadAudioError, load_audio
from vocalign.data.types import ROLES, STYLE_LEVELS, Audio, Message, Prompt, Response, SpeechStyle

if TYPE_CHECKING:
    import datasets

ON_BAD_ROW = ("raise", "skip")
DATA_FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Row fields with a meaning of their own; every other field goes to Prompt.meta.
SCHEMA_FIELDS = ("id", "prompt", "audio", "messages", "system", "task", "response")
_LAST_ROLES = ("human", "input")
_BATCH_ROWS = 1000

_Bad = Callable[[str], "BadRowError"]  # makes the error for one row from a problem description


class BadRowError(ValueError):
    """A dataset row that cannot become a Prompt; the message names the row and the file."""


@dataclass
class LoadedPrompts:
    """The prompts of a dataset, and the rows left out under on_bad_row="skip"."""

    prompts: list[Prompt]
    skipped: int = 0
    skipped_reasons: list[str] = field(default_factory=list)


def load_prompts(
    path: str | Path,
    *,
    split: str | None = None,
    sample_rate: int = 16000,
    on_bad_row: str = "raise",
    task: str = "custom",
    max_seconds: float | None = None,
) -> LoadedPrompts:
    """Load the prompts in `path` (see the module docstring for the row schema).

    split: for a DatasetDict folder, which split (may be left out when there is only
    one); a single file or Dataset folder has one split, so leave it out or say "train".
    on_bad_row: "raise" stops at the first bad row with a BadRowError; "skip" leaves
    bad rows out and counts them. `max_seconds`: a longer audio clip is a bad row (the
    model's encoder cannot take it).
    """
    path = Path(path)
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row={on_bad_row!r} is not known; use one of {', '.join(map(repr, ON_BAD_ROW))}")
    dataset = open_dataset(path, split, on_bad_row)
    loaded = prompts_from_dataset(dataset.data, path, dataset.base_dir, sample_rate=sample_rate, on_bad_row=on_bad_row,
                                  task=task, max_seconds=max_seconds)
    loaded.skipped += len(dataset.bad_lines)
    loaded.skipped_reasons[:0] = dataset.bad_lines
    return loaded


def prompts_from_dataset(
    dataset: datasets.Dataset,
    path: str | Path,
    base_dir: str | Path,
    *,
    sample_rate: int = 16000,
    on_bad_row: str = "raise",
    task: str = "custom",
    max_seconds: float | None = None,
) -> LoadedPrompts:
    """The prompts of a `datasets.Dataset` whose rows follow the row schema.

    `path` names the data in error messages; relative audio paths start from `base_dir`.
    Other formats (benchmarks' own fields) are mapped onto the schema first and come in here.
    """
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row={on_bad_row!r} is not known; use one of {', '.join(map(repr, ON_BAD_ROW))}")
    path, base_dir = Path(path), Path(base_dir)
    columns = set(dataset.column_names)
    if not columns & {"prompt", "audio", "messages"}:
        raise ValueError(
            f"dataset {str(path)!r} has columns {sorted(columns)} but no 'prompt', 'audio' or "
            f"'messages'; every row needs one of them (see the row schema in vocalign.data.user_data)"
        )
    # The arrow view gives raw values: audio stays a path or {"path", "bytes"} dict and
    # is never decoded by `datasets` (which would need torchcodec).
    table = dataset.with_format("arrow")
    features = dataset.features
    loaded = LoadedPrompts(prompts=[])
    seen_ids: dict[str, int] = {}
    for start in range(0, len(table), _BATCH_ROWS):
        for offset, raw in enumerate(table[start : start + _BATCH_ROWS].to_pylist()):
            index = start + offset
            row = {k: _decode_json(features[k], v) for k, v in raw.items()}
            try:
                prompt = _row_to_prompt(row, index, path, base_dir, sample_rate, task, seen_ids, max_seconds)
            except BadRowError as e:
                if on_bad_row == "raise":
                    raise
                loaded.skipped += 1
                loaded.skipped_reasons.append(str(e))
                continue
            seen_ids[prompt.id] = index
            loaded.prompts.append(prompt)
    return loaded


@dataclass
class OpenedData:
    """A dataset read from disk: its rows, the folder relative audio paths start from, and the
    JSON lines skipped (under on_bad_row="skip") because they were not UTF-8 JSON objects."""

    data: datasets.Dataset
    base_dir: Path
    bad_lines: list[str] = field(default_factory=list)


def open_dataset(path: Path, split: str | None = None, on_bad_row: str = "raise") -> OpenedData:
    """The `datasets.Dataset` at `path` (see `load_prompts`), JSON lines checked line by line first."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() in (".jsonl", ".json") and not _starts_with_bracket(path):
        good, bad = _checked_json_lines(path, on_bad_row)
        if bad:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                clean = Path(tmp) / path.name
                clean.write_bytes(b"\n".join(good) + b"\n")
                if not good:
                    raise ValueError(f"data file {str(path)!r} has no readable row: {bad[0]}")
                dataset, _ = _open_dataset(clean, split)  # datasets keeps its own Arrow copy of the rows
                return OpenedData(dataset, path.parent, bad)
    dataset, base_dir = _open_dataset(path, split)
    return OpenedData(dataset, base_dir)


def _starts_with_bracket(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4096).lstrip().startswith(b"[")


def _checked_json_lines(path: Path, on_bad_row: str) -> tuple[list[bytes], list[str]]:
    """The lines of a JSON lines file that are UTF-8 JSON objects, and a reason per other line.

    Under on_bad_row="raise" the first bad line raises a BadRowError naming the file and line.
    """
    good, bad = [], []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"line {number} of {str(path)!r}"
        try:
            row = json.loads(raw.decode("utf-8"))
            problem = None if isinstance(row, dict) else f"{where} is JSON but not an object ({{...}}): one row per line"
        except UnicodeDecodeError as e:
            problem = (f"{where} is not UTF-8 text (byte 0x{raw[e.start]:02x} at position {e.start}); "
                       f"save the file as UTF-8")
        except json.JSONDecodeError as e:
            problem = f"{where} is not valid JSON ({e.msg} at column {e.colno}); fix or remove the line"
        if problem is None:
            good.append(raw)
        elif on_bad_row == "raise":
            raise BadRowError(problem + " (or set data.on_bad_row=skip to leave bad lines out)")
        else:
            bad.append(problem)
    return good, bad


def _open_dataset(path: Path, split: str | None) -> tuple[datasets.Dataset, Path]:
    """The `datasets.Dataset` at `path`, and the folder relative audio paths start from."""
    import datasets  # imported here: it takes about a second, and most users of vocalign.data never load files

    if not path.exists():
        raise FileNotFoundError(
            f"data path {str(path)!r} does not exist; give a .jsonl, .json or .parquet file, "
            f"or a folder written by Dataset.save_to_disk"
        )
    if path.is_dir():
        if not ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            raise ValueError(
                f"folder {str(path)!r} is not a saved Hugging Face dataset (it has no "
                f"dataset_dict.json or state.json); save it with Dataset.save_to_disk, or give "
                f"a .jsonl/.json/.parquet file"
            )
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            return _pick_split(loaded, split, path), path
        _check_single_split(split, path)
        return loaded, path
    builder = DATA_FILE_FORMATS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"data file {str(path)!r} has an unknown extension {path.suffix!r}; use one of "
            f"{', '.join(DATA_FILE_FORMATS)}, or a folder written by Dataset.save_to_disk"
        )
    _check_single_split(split, path)
    if path.stat().st_size == 0:
        raise ValueError(f"data file {str(path)!r} is empty; it needs at least one row")
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # datasets wraps parse errors; the cause says what and where
        cause = e.__cause__ or e
        raise ValueError(
            f"data file {str(path)!r} could not be read as {builder} ({type(cause).__name__}: "
            f"{cause}); check that it is valid {'JSON lines' if builder == 'json' else 'Parquet'} "
            f"and that each field has one type in all rows"
        ) from e
    return dataset, path.parent


def _pick_split(splits: datasets.DatasetDict, split: str | None, path: Path) -> datasets.Dataset:
    names = list(splits)
    if split is None:
        if len(names) == 1:
            return splits[names[0]]
        raise ValueError(f"dataset {str(path)!r} has splits {names}; choose one with split=")
    if split not in splits:
        raise ValueError(f"dataset {str(path)!r} has no split {split!r}; its splits are {names}")
    return splits[split]


def _check_single_split(split: str | None, path: Path) -> None:
    if split not in (None, "train"):
        raise ValueError(
            f"split={split!r} was given, but {str(path)!r} holds a single split; leave split out, "
            f"or save several splits with DatasetDict.save_to_disk"
        )


# ----------------------------------------------------------------------- one row


def _row_to_prompt(
    row: dict[str, Any],
    index: int,
    path: Path,
    base_dir: Path,
    sample_rate: int,
    default_task: str,
    seen_ids: dict[str, int],
    max_seconds: float | None = None,
) -> Prompt:
    row = {k: _drop_nulls(v) for k, v in row.items() if v is not None}
    row_id = str(row.get("id", index))
    where = f"row {index} (id {row_id!r}) of {str(path)!r}"

    def bad(problem: str) -> BadRowError:
        return BadRowError(f"{where}: {problem}")

    if row_id in seen_ids:
        raise bad(f"id {row_id!r} was already used by row {seen_ids[row_id]}; give every row its own id")

    def audio_of(source: Any, what: str) -> Audio:
        try:
            audio = load_audio(source, sample_rate, where=f"{where}, {what}", base_dir=base_dir)
        except BadAudioError as e:
            raise BadRowError(str(e)) from e
        if max_seconds is not None and audio.seconds > max_seconds:
            raise bad(f"{what} lasts {audio.seconds:.2f} s, longer than the {max_seconds:.2f} s the model's audio encoder "
                      f"takes (model.max_audio_seconds for the embedded model); cut the clip, drop the row, or set "
                      f"data.on_bad_row=skip")
        return audio

    messages: list[Message] = []
    system = row.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise bad(f"'system' is a {type(system).__name__}, not text; give the system turn as a string")
        messages.append(Message("system", system))

    if "messages" in row:
        if "prompt" in row or "audio" in row:
            raise bad("the row has both 'messages' and 'prompt'/'audio'; give the conversation one way")
        messages += _conversation(row["messages"], system is not None, bad, audio_of)
    elif "prompt" in row or "audio" in row:
        text = row.get("prompt", "")
        if not isinstance(text, str):
            raise bad(f"'prompt' is a {type(text).__name__}, not text; give the human turn's text as a string")
        audio = audio_of(row["audio"], "audio") if "audio" in row else None
        messages.append(Message("human", text, audio))
    else:
        raise bad("the row has no 'prompt', 'audio' or 'messages'; give the human turn in one of them")

    task = row.get("task", default_task)
    if not isinstance(task, str) or not task:
        raise bad(f"'task' is {task!r}; give a task name (a non-empty string) or leave it out")
    meta = {k: v for k, v in row.items() if k not in SCHEMA_FIELDS}
    if "style" in meta:
        _check_style(meta["style"], bad, "style")
    target = _response(row["response"], bad) if "response" in row else None
    return Prompt(id=row_id, messages=messages, task=task, meta=meta, target=target)


def _conversation(turns: Any, has_system: bool, bad: _Bad, audio_of: Callable[[Any, str], Audio]) -> list[Message]:
    """A row's `messages`: {role, content, audio} turns ending with one for the model to answer."""
    if not isinstance(turns, list) or not turns:
        raise bad(f"'messages' is {turns!r}; give a non-empty list of {{role, content, audio}} turns")
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise bad(f"messages[{k}] is {turn!r}; give each turn as a {{role, content, audio}} dict")
        if turn.get("role") not in ROLES:
            raise bad(f"messages[{k}] has role {turn.get('role')!r}, which is not known; use one of {', '.join(ROLES)}")
        content = turn.get("content", "")
        if not isinstance(content, str):
            raise bad(f"messages[{k}].content is a {type(content).__name__}, not text; give the turn's text as a string")
        if turn["role"] == "system" and has_system:
            raise bad("the row has both 'system' and a system turn in 'messages'; give the system text once")
        audio = audio_of(turn["audio"], f"messages[{k}].audio") if turn.get("audio") is not None else None
        messages.append(Message(turn["role"], content, audio))
    if messages[-1].role not in _LAST_ROLES:
        raise bad(
            f"the last turn of 'messages' has role {messages[-1].role!r}; a prompt ends with a "
            f"{' or '.join(_LAST_ROLES)} turn for the model to answer (put the reference answer in 'response')"
        )
    return messages


def _response(value: Any, bad: _Bad) -> Response:
    if isinstance(value, str):
        return Response(text=value)
    if not isinstance(value, dict):
        raise bad(f"'response' is a {type(value).__name__}; give text or a {{text, speech, style, think}} dict")
    unknown = sorted(set(value) - {"text", "speech", "style", "think", "codes"})
    if unknown:
        raise bad(f"'response' has unknown keys {unknown}; use text, speech, style, think, codes")
    style = value.get("style", {})
    _check_style(style, bad, "response.style")
    codes = value.get("codes")
    if codes is not None and (not isinstance(codes, list) or not all(isinstance(c, int) and c >= 0 for c in codes)):
        raise bad(f"'response.codes' is {str(codes)[:60]!r}; give the speech as a list of non-negative integer codes")
    return Response(
        text=value.get("text", ""),
        speech=value.get("speech"),
        style=SpeechStyle(**style),
        think=value.get("think"),
        codes=codes,
    )


def _check_style(style: Any, bad: _Bad, name: str) -> None:
    if not isinstance(style, dict):
        raise bad(f"'{name}' is {style!r}; give a dict of levels like {{\"rate\": \"slow\"}}")
    for attr, level in style.items():
        if attr not in STYLE_LEVELS or level not in STYLE_LEVELS[attr]:
            choices = "; ".join(f"{a}: {', '.join(levels)}" for a, levels in STYLE_LEVELS.items())
            raise bad(f"'{name}' has {attr}={level!r}, which is not a style level; use {choices}")


def _decode_json(feature: Any, value: Any) -> Any:
    """`value` with its JSON-typed parts parsed; everything else (audio included) left raw.

    The `datasets` JSON loader stores a field whose type differs between rows (e.g.
    `response` as text in one row and a dict in another) as JSON text.
    """
    import datasets

    if value is None:
        return None
    if isinstance(feature, datasets.Json):
        return feature.decode_example(value)
    if isinstance(feature, dict):
        return {k: _decode_json(feature.get(k), v) for k, v in value.items()}
    if isinstance(feature, (datasets.List, datasets.LargeList)):
        return [_decode_json(feature.feature, v) for v in value]
    return value


def _drop_nulls(value: Any) -> Any:
    """`value` with null entries of dicts removed, recursively (Arrow fills absent keys with null)."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list) and value and isinstance(value[0], (dict, list)):
        return [_drop_nulls(v) for v in value]
    return value  # lists of plain values (e.g. audio samples) are left as they are
