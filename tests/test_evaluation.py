"""`vocalign eval`: intervals, suites scored on real speech, user-data formats, targets, the command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from vocalign.data.espeak import synthesize
from vocalign.data.types import Message, Prompt, Rollout, SpeechStyle
from vocalign.model.detokenizer import EspeakUnitDetokenizer
from vocalign.model.loading import embedded_policy, save_policy
from vocalign.rl.cli import main
from vocalign.rl.evaluation import SUITES, Variation, bootstrap_mean, get_suite, paired_difference, resolve_targets
from vocalign.rl.evaluation.run import summarise
from vocalign.rl.evaluation.userdata import load_suite_data

# --- intervals ----------------------------------------------------------------------------


def test_bootstrap_mean_brackets_the_mean_and_narrows_with_n() -> None:
    rng = np.random.default_rng(0)
    small = bootstrap_mean(list(rng.integers(0, 2, 40).astype(float)))
    large = bootstrap_mean(list(rng.integers(0, 2, 4000).astype(float)))
    for e in (small, large):
        assert e.low <= e.mean <= e.high
    assert (large.high - large.low) < (small.high - small.low) / 5
    # a 0/1 mean of 0.5 over 400 prompts: the normal approximation's half width is 1.96 * 0.5 / 20 = 0.049
    half = bootstrap_mean([0.0, 1.0] * 200)
    assert half.mean == 0.5 and abs((half.high - half.low) / 2 - 0.049) < 0.006


def test_bootstrap_leaves_none_out_and_is_seeded() -> None:
    e = bootstrap_mean([1.0, None, 0.0, None, 1.0])
    assert e.n == 3 and e.mean == pytest.approx(2 / 3)
    assert bootstrap_mean([None, None]).n == 0
    assert bootstrap_mean([0.2, 0.9, 0.4], seed=3) == bootstrap_mean([0.2, 0.9, 0.4], seed=3)


def test_paired_difference_is_tighter_than_separate_intervals() -> None:
    rng = np.random.default_rng(1)
    a = list(rng.integers(0, 2, 200).astype(float))
    b = [1.0 if i % 10 == 0 else x for i, x in enumerate(a)]  # b fixes one prompt in ten
    d = paired_difference(a, b)
    assert d.mean == pytest.approx(np.mean(b) - np.mean(a))
    assert d.low > 0  # the improvement is certain, although the two intervals overlap
    assert bootstrap_mean(a).high > bootstrap_mean(b).low
    same = paired_difference(a, a)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference([1.0], [1.0, 0.0])


def test_variation_parse_and_label() -> None:
    v = Variation.parse(["voices=heldout", "operands=10-12"])
    assert v.operand_range() == (10, 12) and v.label() == "voices=heldout, operands=10-12"
    assert Variation().label() == "in distribution"
    for bad, message in [("voices=nobody", "voice pool 'nobody'"), ("operands=12-10", "LO <= HI"),
                         ("colour=red", "KEY=VALUE"), ("prosody=loud", "prosody='loud'")]:
        with pytest.raises(ValueError, match=message):
            Variation.parse([bad])


# --- suites scored on real speech ------------------------------------------------------------

DETOK = EspeakUnitDetokenizer()


def spoken_rollout(prompt: Prompt, text: str, speech: str | None, style: SpeechStyle | None = None) -> Rollout:
    audio = DETOK.render(DETOK.encode(speech, style)) if speech else None
    return Rollout(prompt=prompt, text=text, think="", spoken_text=speech or "", audio_tokens=[],
                   waveform=None if audio is None else audio.waveform, sample_rate=0 if audio is None else audio.sample_rate,
                   prompt_ids=[], response_ids=[], logprobs=[])


def prompt(pid: str, **meta) -> Prompt:
    return Prompt(id=pid, messages=[Message("human", "")], task="test", meta=meta)


def test_spoken_qa_scores_the_text_and_what_the_speech_says() -> None:
    rollouts = [
        spoken_rollout(prompt("a", answer=7), "7", "seven"),
        spoken_rollout(prompt("b", answer=12), "12", "four"),  # says the wrong number
        spoken_rollout(prompt("c", answer=3), "5", "three"),  # writes the wrong number
        spoken_rollout(prompt("d", answer=3), "3", None),  # does not speak
    ]
    scores = [r.metrics for r in get_suite("spoken_qa").score(rollouts)]
    assert [s["correct"] for s in scores] == [1.0, 1.0, 0.0, 1.0]
    assert [s["spoken_correct"] for s in scores] == [1.0, 0.0, 1.0, 0.0]


def test_style_suite_uses_the_detector_per_requested_value_and_none() -> None:
    cases = [({"rate": "fast"}, SpeechStyle(rate="fast"), 1.0), ({"rate": "fast"}, SpeechStyle(rate="slow"), 0.0),
             ({"pitch": "high"}, SpeechStyle(pitch="high"), 1.0), ({"volume": "soft"}, SpeechStyle(volume="loud"), 0.0)]
    rollouts = [spoken_rollout(prompt(f"s{i}", style=req), "14", "fourteen", said) for i, (req, said, _) in enumerate(cases)]
    rollouts.append(spoken_rollout(prompt("n1", style={}), "14", "fourteen", SpeechStyle()))
    rollouts.append(spoken_rollout(prompt("n2", style={}), "14", "fourteen", SpeechStyle(pitch="high")))
    results = get_suite("style").score(rollouts)
    assert [r.metrics["honoured"] for r in results[:4]] == [expected for *_, expected in cases]
    assert [r.group for r in results] == ["fast", "fast", "high", "soft", "none", "none"]
    assert [r.metrics["neutral"] for r in results[4:]] == [1.0, 0.0]
    summary = summarise(results, ("honoured", "neutral"))
    assert summary["groups"]["fast"]["honoured"]["mean"] == 0.5
    assert summary["confusion"]["fast"] == {"fast": 1, "slow": 1}
    assert summary["confusion"]["soft"] == {"loud": 1}
    assert summary["confusion"]["none/pitch"] == {"normal": 1, "high": 1}


def test_transcription_and_perception_scoring() -> None:
    t = get_suite("transcription").score([
        spoken_rollout(prompt("t1", transcript="the red cup is on the table"), "the red cup is on the table", None),
        spoken_rollout(prompt("t2", transcript="the red cup is on the table"), "the red cup", None),
    ])
    assert t[0].metrics == {"accuracy": 1.0, "wer": 0.0}
    assert t[1].metrics["wer"] == pytest.approx(4 / 7) and t[1].metrics["accuracy"] == pytest.approx(3 / 7)
    choices = ["Man", "Woman", "Child", "Robot"]
    p = get_suite("perception").score([
        spoken_rollout(prompt("p1", answer="Woman", choices=choices, category="sound"), "woman", None),
        spoken_rollout(prompt("p2", answer="Woman", choices=choices, category="sound"), "(b)", None),
        spoken_rollout(prompt("p3", answer="Woman", choices=choices, category="sound"), "Robot", None),
    ])
    assert [r.metrics["accuracy"] for r in p] == [1.0, 1.0, 0.0] and p[0].group == "sound"


# --- your own data ------------------------------------------------------------------------------


def write_wav(path: Path, text: str = "seven", seconds: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    wav = synthesize(text, sample_rate=16000)
    sf.write(path, wav if seconds is None else np.zeros(int(seconds * 16000), np.float32), 16000)
    return path


def test_mmau_json_maps_question_choices_and_answer(tmp_path: Path) -> None:
    write_wav(tmp_path / "test-mini-audios" / "x1.wav", "hello")
    rows = [{"id": "x1", "audio_id": "./test-mini-audios/x1.wav", "question": "Who is speaking?",
             "choices": ["Man", "Woman", "Child", "Robot"], "answer": "Man", "dataset": "AudioSet", "task": "sound",
             "split": "test-mini", "category": "Reasoning", "sub-category": "Acoustic Source Inference",
             "difficulty": "medium"}]
    (tmp_path / "mmau.json").write_text(json.dumps(rows))
    prompts, skipped = load_suite_data(get_suite("perception"), tmp_path / "mmau.json")
    assert not skipped and len(prompts) == 1
    p = prompts[0]
    assert p.messages[-1].content == "Who is speaking? (a) Man (b) Woman (c) Child (d) Robot"
    assert p.messages[-1].audio is not None and p.meta["answer"] == "Man" and p.meta["category"] == "Reasoning"
    assert p.meta["choices"] == ["Man", "Woman", "Child", "Robot"]


def test_voicebench_and_uro_bench_rows_map_to_spoken_qa(tmp_path: Path) -> None:
    write_wav(tmp_path / "q.wav", "what is two plus two")
    (tmp_path / "vb.jsonl").write_text(json.dumps({"audio": "q.wav", "prompt": "", "reference": "four"}) + "\n")
    (tmp_path / "uro" / "test.jsonl").parent.mkdir()
    write_wav(tmp_path / "uro" / "wavs" / "1.wav", "what is two plus two")
    (tmp_path / "uro" / "test.jsonl").write_text(json.dumps(
        {"source_wav": "wavs/1.wav", "source_text": "what is two plus two", "target_text": "four"}) + "\n")
    for path in (tmp_path / "vb.jsonl", tmp_path / "uro" / "test.jsonl"):
        (p,), _ = load_suite_data(get_suite("spoken_qa"), path)
        assert p.meta["answer"] == "four" and p.messages[-1].audio.seconds > 0.5
    (tmp_path / "mcq.jsonl").write_text(json.dumps({"audio": "q.wav", "prompt": "pick one", "reference": "C"}) + "\n")
    (p,), _ = load_suite_data(get_suite("perception"), tmp_path / "mcq.jsonl")
    assert p.meta["answer"] == "C" and p.meta["choices"] == ["A", "B", "C", "D"]


@pytest.mark.parametrize("layout", ["ljspeech", "librispeech", "pairs"])
def test_transcript_folders(tmp_path: Path, layout: str) -> None:
    if layout == "ljspeech":
        write_wav(tmp_path / "wavs" / "LJ001-0001.wav", "the red cup")
        (tmp_path / "metadata.csv").write_text("LJ001-0001|The red cup.|the red cup\n")
    elif layout == "librispeech":
        write_wav(tmp_path / "19" / "198" / "19-198-0001.flac".replace(".flac", ".wav"), "the red cup")
        (tmp_path / "19" / "198" / "19-198.trans.txt").write_text("19-198-0001 THE RED CUP\n")
    else:
        write_wav(tmp_path / "a" / "one.wav", "the red cup")
        (tmp_path / "a" / "one.txt").write_text("The red cup\n")
    (p,), _ = load_suite_data(get_suite("transcription"), tmp_path)
    assert p.meta["transcript"] in ("the red cup", "the red cup.") and p.messages[-1].content == "transcribe the audio"
    assert p.messages[-1].audio.seconds > 0.3


def test_bad_user_data_names_the_file_row_and_field(tmp_path: Path) -> None:
    write_wav(tmp_path / "ok.wav")
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF not really a wav")
    rows = [{"id": "a", "audio": "ok.wav", "answer": 7}, {"id": "b", "audio": "missing.wav", "answer": 7}]
    (tmp_path / "missing.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"row 1 \(id 'b'\).*missing\.jsonl.*missing\.wav"):
        load_suite_data(get_suite("spoken_qa"), tmp_path / "missing.jsonl")
    (tmp_path / "corrupt.jsonl").write_text(json.dumps({"id": "c", "audio": "corrupt.wav", "answer": 7}) + "\n")
    with pytest.raises(ValueError, match=r"row 0 \(id 'c'\).*corrupt\.wav"):
        load_suite_data(get_suite("spoken_qa"), tmp_path / "corrupt.jsonl")
    (tmp_path / "noref.jsonl").write_text(json.dumps({"id": "d", "audio": "ok.wav"}) + "\n")
    with pytest.raises(ValueError, match=r"noref\.jsonl: row 0 \(id 'd'\) has no 'answer'"):
        load_suite_data(get_suite("spoken_qa"), tmp_path / "noref.jsonl")
    # under skip, the bad rows are left out and listed; the good one stays
    prompts, skipped = load_suite_data(get_suite("spoken_qa"), tmp_path / "missing.jsonl", on_bad_row="skip")
    assert [p.id for p in prompts] == ["a"] and len(skipped) == 1 and "missing.wav" in skipped[0]
    (tmp_path / "nolabel").mkdir()
    write_wav(tmp_path / "nolabel" / "x.wav")
    with pytest.raises(ValueError, match=r"x\.wav has no transcript: put its text in x\.txt"):
        load_suite_data(get_suite("transcription"), tmp_path / "nolabel")


# --- targets and the command -------------------------------------------------------------------


def test_targets_resolve_and_refuse_what_is_not_there(tmp_path: Path) -> None:
    save_policy(embedded_policy(0), tmp_path / "model")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    targets = resolve_targets(["embedded", str(tmp_path / "model"), f"mine={tmp_path / 'model'}"])
    assert [(t.label, t.kind) for t in targets] == [("embedded", "embedded"), ("model", "model"), ("mine", "model")]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_targets([str(tmp_path / "nothing")])
    with pytest.raises(ValueError, match="without a checkpoint"):
        resolve_targets([str(tmp_path / "run")])
    with pytest.raises(ValueError, match="named twice"):
        resolve_targets([f"a={tmp_path / 'model'}", "a=embedded"])


def test_eval_command_runs_every_suite_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    save_policy(embedded_policy(0), tmp_path / "model")
    out = tmp_path / "eval"
    code = main(["eval", "embedded", f"copy={tmp_path / 'model'}", "--n", "6", "--out", str(out),
                 "--variation", "voices=heldout", "--max-new-tokens", "8"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "eval.json").read_text())
    assert report["targets"] == ["embedded", "copy"] and report["variation"] == "voices=heldout"
    assert set(report["suites"]) == set(SUITES)
    for name, suite in report["suites"].items():
        for metric in suite["metrics"]:
            e = suite["targets"]["embedded"]["metrics"][metric]
            assert e["n"] == 0 or e["low"] <= e["mean"] <= e["high"], (name, metric, e)
            # the same weights answer the same prompts the same way: every paired difference is exactly 0
            d = suite["differences"]["copy - embedded"]["metrics"][metric]
            assert d["n"] == 0 or (d["mean"], d["low"], d["high"]) == (0.0, 0.0, 0.0)
    assert {p.name for p in out.iterdir()} >= {"eval.json", "eval.md", "samples.jsonl", "overview.png", "style.png"}
    assert "| honoured |" in (out / "eval.md").read_text()
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 6 * len(SUITES)


def test_eval_command_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for argv, message in [
        (["eval", str(tmp_path / "none")], "does not exist"),
        (["eval", "embedded", "--suite", "nope"], "suite 'nope' is not known"),
        (["eval", "embedded", "--variation", "voices=x"], "voice pool 'x'"),
        (["eval", "embedded", "--data", "spoken_qa=" + str(tmp_path / "q.jsonl"), "--suite", "style"],
         "does not evaluate"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert main(["eval", "embedded", "--out", str(tmp_path / "busy"), "--n", "1"]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "busy" / "keep.txt").read_text() == "mine"
