"""Loading user datasets (JSON lines, Parquet, HF dataset folders) and decoding their audio."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from vocalign.data.audio import BadAudioError, load_audio
from vocalign.data.espeak import synthesize
from vocalign.data.types import Response, SpeechStyle
from vocalign.data.user_data import BadRowError, load_prompts

RATE_IN = 22050  # files are written at espeak-ng's rate and loaded at 16 kHz


def _resampled_length(n: int, to_rate: int = 16000) -> int:
    return round(n * to_rate / RATE_IN)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return synthesize("what is two plus two", sample_rate=RATE_IN)


@pytest.fixture
def clips(tmp_path: Path, speech: np.ndarray) -> dict[str, Path]:
    """Real audio files under tmp_path/clips, plus broken ones."""
    folder = tmp_path / "clips"
    folder.mkdir()
    paths = {
        "mono": folder / "mono.wav",
        "stereo": folder / "stereo.flac",
        "empty": folder / "empty.wav",
        "nan": folder / "nan.wav",
        "not_audio": folder / "notes.wav",
    }
    sf.write(paths["mono"], speech, RATE_IN)
    sf.write(paths["stereo"], np.stack([speech, 0.5 * speech], axis=1), RATE_IN)
    sf.write(paths["empty"], np.zeros(0, dtype=np.float32), RATE_IN)
    broken = speech.copy()
    broken[100] = np.nan
    sf.write(paths["nan"], broken, RATE_IN, subtype="FLOAT")
    paths["not_audio"].write_text("these are meeting notes, not a recording\n")
    return paths


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _good_rows() -> list[dict]:
    return [
        {"id": "q1", "prompt": "", "audio": "clips/mono.wav", "answer": 4,
         "response": {"text": "4", "speech": "four", "style": {"rate": "slow"}}},
        {"prompt": "what colour is the sky?", "answer": "blue", "response": "blue"},
        {"messages": [{"role": "system", "content": "be brief"},
                      {"role": "human", "content": "transcribe this", "audio": "clips/stereo.flac"}],
         "transcript": "what is two plus two", "task": "transcription"},
        {"prompt": "say it loudly", "style": {"volume": "loud"}, "system": "you speak"},
    ]


def _check_good_prompts(prompts, speech: np.ndarray) -> None:
    assert [p.id for p in prompts] == ["q1", "1", "2", "3"]  # ids default to the row index
    q1, sky, tr, loud = prompts

    (audio,) = q1.audio
    assert audio.sample_rate == 16000 and audio.waveform.dtype == np.float32
    assert abs(len(audio.waveform) - _resampled_length(len(speech))) <= 1
    assert q1.messages[0].role == "human" and q1.messages[0].content == ""
    assert q1.meta == {"answer": 4}
    assert q1.target == Response(text="4", speech="four", style=SpeechStyle(rate="slow"))
    assert q1.task == "custom"

    assert sky.audio == [] and sky.messages[0].content == "what colour is the sky?"
    assert sky.meta == {"answer": "blue"} and sky.target == Response(text="blue")

    assert [m.role for m in tr.messages] == ["system", "human"]
    assert tr.task == "transcription" and tr.meta == {"transcript": "what is two plus two"}
    (stereo,) = tr.audio
    assert stereo.waveform.ndim == 1  # downmixed: the mean of the two channels
    assert abs(len(stereo.waveform) - _resampled_length(len(speech))) <= 1
    assert np.sqrt(np.mean(stereo.waveform**2)) == pytest.approx(0.75 * np.sqrt(np.mean(audio.waveform**2)), rel=0.02)
    assert tr.target is None

    assert [(m.role, m.content) for m in loud.messages] == [("system", "you speak"), ("human", "say it loudly")]
    assert loud.meta == {"style": {"volume": "loud"}}  # the nulls Arrow fills in are gone


def test_jsonl_rows_become_prompts(tmp_path, clips, speech):
    loaded = load_prompts(_write_jsonl(tmp_path / "train.jsonl", _good_rows()))
    assert loaded.skipped == 0 and loaded.skipped_reasons == []
    _check_good_prompts(loaded.prompts, speech)


def test_parquet_rows_become_prompts(tmp_path, clips, speech):
    # Parquet columns hold one type; Arrow gives absent struct fields as nulls
    rows = [
        {"id": "q1", "prompt": "", "audio": {"bytes": clips["mono"].read_bytes(), "path": "mono.wav"},
         "answer": "4", "response": {"text": "4", "speech": "four", "style": {"rate": "slow"}, "think": "2 and 2"}},
        {"id": "q2", "prompt": "what colour is the sky?", "audio": None, "answer": "blue",
         "response": {"text": "blue"}},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    q1, q2 = load_prompts(tmp_path / "train.parquet", sample_rate=8000).prompts
    (audio,) = q1.audio
    assert audio.sample_rate == 8000
    assert abs(len(audio.waveform) - _resampled_length(len(speech), 8000)) <= 1
    assert q1.target == Response(text="4", speech="four", style=SpeechStyle(rate="slow"), think="2 and 2")
    assert q2.audio == [] and q2.meta == {"answer": "blue"} and q2.target == Response(text="blue")


def test_hf_dataset_folder_with_audio_feature_is_decoded_without_torchcodec(tmp_path, clips, speech):
    rows = [
        {"prompt": "", "audio": str(clips["mono"]), "answer": 4},
        {"prompt": "", "audio": str(clips["stereo"]), "answer": 5},
    ]
    ds = datasets.Dataset.from_list(rows).cast_column("audio", datasets.Audio())
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "ds"))

    test = load_prompts(tmp_path / "ds", split="test").prompts
    assert [p.meta for p in test] == [{"answer": 5}]
    assert abs(len(test[0].audio[0].waveform) - _resampled_length(len(speech))) <= 1

    with pytest.raises(ValueError, match=r"has splits \['train', 'test'\]; choose one with split="):
        load_prompts(tmp_path / "ds")
    with pytest.raises(ValueError, match="has no split 'dev'; its splits are"):
        load_prompts(tmp_path / "ds", split="dev")

    ds.save_to_disk(str(tmp_path / "single"))
    assert [p.meta["answer"] for p in load_prompts(tmp_path / "single").prompts] == [4, 5]


def test_array_audio_in_a_row(tmp_path, speech):
    row = {"prompt": "", "audio": {"array": speech[:8000].tolist(), "sampling_rate": RATE_IN}}
    (prompt,) = load_prompts(_write_jsonl(tmp_path / "a.jsonl", [row])).prompts
    assert abs(len(prompt.audio[0].waveform) - _resampled_length(8000)) <= 1


BAD_ROWS = {
    "missing file": ({"prompt": "", "audio": "clips/nowhere.wav"}, r"clips/nowhere\.wav' does not exist"),
    "not audio": ({"prompt": "", "audio": "clips/notes.wav"}, r"notes\.wav' could not be decoded as audio"),
    "empty audio": ({"prompt": "", "audio": "clips/empty.wav"}, r"empty\.wav'.* holds no samples"),
    "nan audio": ({"prompt": "", "audio": "clips/nan.wav"}, r"nan\.wav'.* 1 non-finite samples \(NaN or inf\)"),
    "no prompt": ({"answer": 3}, "has no 'prompt', 'audio' or 'messages'"),
    "bad style": ({"prompt": "hi", "style": {"rate": "very fast"}}, "rate='very fast', which is not a style level"),
    "ends with assistant": (
        {"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        "the last turn of 'messages' has role 'assistant'",
    ),
    "bad role": ({"messages": [{"role": "user", "content": "hi"}]}, r"messages\[0\] has role 'user', which is not known"),
    "prompt and messages": (
        {"prompt": "hi", "messages": [{"role": "human", "content": "hi"}]},
        "has both 'messages' and 'prompt'/'audio'",
    ),
    "duplicate id": ({"id": "0", "prompt": "again"}, "id '0' was already used by row 0"),
}


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_a_bad_row_is_named_with_its_file_and_can_be_skipped(tmp_path, clips, kind):
    bad_row, problem = BAD_ROWS[kind]
    rows = [{"prompt": "fine"}, bad_row, {"prompt": "also fine"}]
    path = _write_jsonl(tmp_path / "data.jsonl", rows)
    row_id = bad_row.get("id", "1")
    with pytest.raises(BadRowError, match=rf"row 1 \(id '{row_id}'\) of '{path}'.*{problem}") as info:
        load_prompts(path)
    assert ";" in str(info.value)  # the message goes on to say what to do

    loaded = load_prompts(path, on_bad_row="skip")
    assert [p.messages[-1].content for p in loaded.prompts] == ["fine", "also fine"]
    assert loaded.skipped == 1 and len(loaded.skipped_reasons) == 1
    assert "row 1" in loaded.skipped_reasons[0] and str(path) in loaded.skipped_reasons[0]


def test_skip_mode_counts_every_bad_row(tmp_path, clips):
    rows = [bad for bad, _ in BAD_ROWS.values() if "id" not in bad] + [{"prompt": "ok"}]
    path = _write_jsonl(tmp_path / "data.jsonl", rows)
    loaded = load_prompts(path, on_bad_row="skip")
    assert [p.id for p in loaded.prompts] == [str(len(rows) - 1)]
    assert loaded.skipped == len(rows) - 1 == len(loaded.skipped_reasons)
    for i, reason in enumerate(loaded.skipped_reasons):
        assert reason.startswith(f"row {i} (id '{i}') of '{path}'")


def test_whole_file_problems_are_clear(tmp_path):
    good = _write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "hi"}])
    with pytest.raises(ValueError, match="on_bad_row='ignore' is not known; use one of 'raise', 'skip'"):
        load_prompts(good, on_bad_row="ignore")
    with pytest.raises(FileNotFoundError, match="missing.jsonl' does not exist"):
        load_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("prompt\nhi\n")
    with pytest.raises(ValueError, match=r"unknown extension '\.csv'; use one of \.jsonl, \.json, \.parquet"):
        load_prompts(tmp_path / "data.csv")
    with pytest.raises(ValueError, match="is not a saved Hugging Face dataset"):
        load_prompts(tmp_path)
    (tmp_path / "broken.jsonl").write_text('{"prompt": "hi"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"line 2 of '.*broken.jsonl' is not valid JSON \(Expecting value at column 12\)"):
        load_prompts(tmp_path / "broken.jsonl")
    # under skip the line is left out and its reason kept; the good row loads
    skipped = load_prompts(tmp_path / "broken.jsonl", on_bad_row="skip")
    assert [p.messages[-1].content for p in skipped.prompts] == ["hi"] and skipped.skipped == 1
    assert "line 2" in skipped.skipped_reasons[0]
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "hi"}\n{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"line 2 of '.*latin1.jsonl' is not UTF-8 text \(byte 0xe9"):
        load_prompts(tmp_path / "latin1.jsonl")
    assert load_prompts(tmp_path / "latin1.jsonl", on_bad_row="skip").skipped == 1
    no_prompt = _write_jsonl(tmp_path / "answers.jsonl", [{"answer": 1}])
    with pytest.raises(ValueError, match=r"has columns \['answer'\] but no 'prompt', 'audio' or 'messages'"):
        load_prompts(no_prompt)
    with pytest.raises(ValueError, match="split='test' was given, but .* holds a single split"):
        load_prompts(good, split="test")


def test_load_audio_accepts_the_shapes_datasets_produce(clips, speech):
    n16 = _resampled_length(len(speech))
    from_path = load_audio(clips["mono"], 16000, where="test")
    from_bytes = load_audio(clips["mono"].read_bytes(), 16000, where="test")
    from_dict = load_audio({"path": str(clips["mono"]), "bytes": None}, 16000, where="test")
    from_array = load_audio({"array": speech, "sampling_rate": RATE_IN}, 16000, where="test")
    pcm16 = load_audio((speech * 32767).astype(np.int16), 16000, where="test", sample_rate=RATE_IN)
    for audio in (from_path, from_bytes, from_dict, from_array, pcm16):
        assert audio.sample_rate == 16000 and abs(len(audio.waveform) - n16) <= 1
        assert np.abs(audio.waveform - from_path.waveform).max() < 1e-3
    channels_first = load_audio(np.stack([speech, speech]), RATE_IN, where="test", sample_rate=RATE_IN)
    assert np.allclose(channels_first.waveform, speech)


def test_load_audio_errors_say_where_what_and_what_to_do(speech):
    where = "row 17 of data/train.jsonl"
    cases = [
        (lambda: load_audio(speech, 16000, where=where), "has no sample rate; pass sample_rate="),
        (lambda: load_audio(np.zeros((4, 100, 2)), 16000, where=where, sample_rate=16000), r"shape \(4, 100, 2\)"),
        (lambda: load_audio(speech * 32768, 16000, where=where, sample_rate=RATE_IN), "unscaled integer PCM"),
        (lambda: load_audio(b"", 16000, where=where), r"empty \(0 bytes\)"),
        (lambda: load_audio(io.BytesIO(), 16000, where=where), "BytesIO is not understood"),
        (lambda: load_audio({"path": None, "bytes": None}, 16000, where=where), "holds no audio"),
        (lambda: load_audio({"array": [0.1, 0.2]}, 16000, where=where), "no 'sampling_rate'"),
        (lambda: load_audio(np.arange(10), 16000, where=where, sample_rate=16000), "int64 have no known scale"),
    ]
    for call, problem in cases:
        with pytest.raises(BadAudioError, match=rf"^row 17 of data/train\.jsonl: .*{problem}"):
            call()
