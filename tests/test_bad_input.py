"""Bad input fails early and clearly, and nothing on disk is lost.

Every case runs the real command line (`vocalign.rl.cli.main`) and checks the exit status,
that the one-line message names the input and what to do, and what is left on disk.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from vocalign.data.espeak import synthesize
from vocalign.rl.checkpoint import ADAPTER_NAME, checkpoints
from vocalign.rl.cli import main
from vocalign.rl.tracking import read_metrics

QUICK = ["sft.steps=0", "rl.steps=1", "rl.prompts_per_step=1", "rl.group_size=2", "rl.minibatches=1", "rl.max_new_tokens=8",
         "eval.suites=[]", "logging.wandb=false", "run.progress=false", "data.eval_prompts=1", "data.rl_tasks[0].n=8"]


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    """The error message: one `vocalign:` message (a recipe's problems are listed under it), no traceback."""
    assert "Traceback" not in err, err
    starts = [i for i, line in enumerate(err.splitlines()) if line.startswith("vocalign:")]
    assert len(starts) == 1, err
    return " ".join(err.splitlines()[starts[0]:])


# --- your own data -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clips")
    speech = synthesize("what is two plus two", sample_rate=16000)
    sf.write(folder / "good.wav", speech, 16000)
    sf.write(folder / "good2.wav", synthesize("what is one plus three", sample_rate=16000), 16000)
    sf.write(folder / "stereo.wav", np.stack([speech, speech], axis=1), 16000)
    sf.write(folder / "8k.wav", synthesize("what is two plus two", sample_rate=8000), 8000)
    sf.write(folder / "long.wav", np.tile(speech, 4), 16000)  # ~6 s, over the embedded model's 4 s
    sf.write(folder / "empty.wav", np.zeros(0, np.float32), 16000)
    nan = speech.copy()
    nan[100] = np.nan
    sf.write(folder / "nan.wav", nan, 16000, subtype="FLOAT")
    (folder / "corrupt.wav").write_bytes(b"RIFF....WAVE not a real file")
    return folder


def rows_file(path: Path, clips: Path, names: list[str]) -> Path:
    rows = [{"id": name, "prompt": "", "audio": str(clips / f"{name}.wav"), "answer": 4} for name in names]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("bad, message", [
    ("missing", "missing.wav' does not exist"),
    ("corrupt", "corrupt.wav"),
    ("empty", "empty audio"),
    ("nan", "non-finite samples"),
    ("long", "longer than the 4.00 s the model's audio encoder takes (model.max_audio_seconds"),
])
def test_a_bad_clip_is_refused_at_load_naming_the_row_and_file(bad, message, clips, tmp_path, capsys) -> None:
    data = rows_file(tmp_path / "data.jsonl", clips, ["good", "good2", bad])
    out = tmp_path / "run"
    code, _, err = run(["train", "demo", *QUICK, f"data.train_file={data}", f"run.output_dir={out}"], capsys)
    line = one_line(err)
    assert code == 2 and message in line and f"(id '{bad}')" in line and "data.jsonl" in line
    assert not out.exists()  # a run that failed while setting up leaves nothing behind


def test_under_skip_bad_rows_are_left_out_and_said_and_stereo_and_8k_are_converted(clips, tmp_path, capsys) -> None:
    names = ["good", "good2", "stereo", "8k", "missing", "corrupt", "empty", "nan", "long"]
    data = rows_file(tmp_path / "data.jsonl", clips, names)
    with open(data, "a", encoding="utf-8") as f:
        f.write('{"id": "broken", "prompt": \n')  # a malformed line
    with open(data, "ab") as f:
        f.write('{"id": "latin", "prompt": "caf\u00e9"}\n'.encode("latin-1"))  # not UTF-8
    out = tmp_path / "run"
    code, out_text, err = run(["train", "demo", *QUICK, f"data.train_file={data}", "data.on_bad_row=skip",
                               "data.eval_prompts=128", f"run.output_dir={out}"], capsys)
    assert code == 0, err
    said = out_text + err
    for name in ("missing", "corrupt", "empty", "nan", "long"):
        assert f"skipped row" in said and f"(id '{name}')" in said, name
    assert "line 10" in said and "not valid JSON" in said and "line 11" in said and "not UTF-8" in said
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_rows"] == {"train_file": 7}
    # 4 usable rows: a tenth, at least one, is held out; the console says so
    assert "holding out its first 1 of 4 rows" in said


def test_too_few_rows_and_sft_rows_without_a_response(clips, tmp_path, capsys) -> None:
    one = rows_file(tmp_path / "one.jsonl", clips, ["good"])
    code, _, err = run(["train", "demo", *QUICK, f"data.train_file={one}", f"run.output_dir={tmp_path / 'a'}"], capsys)
    assert code == 2 and "has 1 usable rows; it needs at least 2" in one_line(err)
    no_response = rows_file(tmp_path / "sft.jsonl", clips, ["good"])
    code, _, err = run(["train", "demo", *QUICK, "sft.steps=1", f"data.sft_file={no_response}", "data.sft_tasks[0].n=2",
                        "data.sft_tasks[1].n=2", "data.sft_tasks[2].n=2", f"run.output_dir={tmp_path / 'b'}"], capsys)
    line = one_line(err)
    assert code == 2 and "have no `response`" in line and "good" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --- values and names, checked before anything runs ------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["rl.steps=-5", "sft.steps=-3"], "rl.steps=-5 must be >= 0"),
    (["rl.steps=0", "sft.steps=0"], "nothing to train"),
    (["rl.lr=-0.1"], "rl.lr=-0.1 must be a positive learning rate"),
    (["rl.temperature=0"], "rl.temperature=0.0 must be > 0"),
    (["rl.temperature=-1"], "rl.temperature=-1.0 must be > 0"),
    (["rl.top_p=1.5"], "rl.top_p=1.5 must be in (0, 1]"),
    (["rl.top_p=0"], "rl.top_p=0.0 must be in (0, 1]"),
    (["loss.ratio_max=1.1"], "loss.ratio_max=1.1 must exceed 1 + loss.clip_high"),
    (["rewards=[{name: reward_model, params: {path: no/such/folder}}]"], "path=no/such/folder is not a folder"),
    (["rollouts.tools=[calculator]", "rollouts.tool_options={calculator: {api_ur: x}}"],
     "rollouts.tool_options.calculator.api_ur is not an option of calculator"),
    (["rollouts.tools=[retrieval]", "rollouts.tool_options={retrieval: {rot: docs}}"], "did you mean 'root'?"),
    (["rollouts.tool_options={weather: {api_url: x}}"], "no tool called weather is in rollouts.tools"),
    (["data.train_file=no/such.jsonl"], "data.train_file=no/such.jsonl does not exist"),
])
def test_bad_values_are_refused_before_anything_runs(overrides, message, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    code, _, err = run(["train", "demo", *QUICK, *overrides, f"run.output_dir={out}"], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()


# --- run folders ----------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "done"
    assert main(["train", "demo", *QUICK, "rl.steps=2", "run.save_every=1", "run.keep_last=3", f"run.output_dir={out}"]) == 0
    return out


def test_an_existing_run_folder_is_refused_with_nothing_changed(finished_run, capsys) -> None:
    before = snapshot(finished_run)
    code, _, err = run(["train", "demo", *QUICK, f"run.output_dir={finished_run}"], capsys)
    line = one_line(err)
    assert code == 2 and "already holds a run" in line and "run.resume=true" in line and "--force" in line
    assert snapshot(finished_run) == before
    # a reward-model run is refused there too
    code, _, err = run(["train", "reward_model", f"run.output_dir={finished_run}", "logging.wandb=false"], capsys)
    assert code == 2 and "already holds a run" in one_line(err) and snapshot(finished_run) == before


def test_resume_needs_a_checkpoint(tmp_path, capsys) -> None:
    (tmp_path / "crashed").mkdir()
    (tmp_path / "crashed" / "metrics.jsonl").write_text('{"step": 1, "stage": "rl"}\n')
    before = snapshot(tmp_path / "crashed")
    for folder in ("crashed", "misspelt"):
        code, _, err = run(["train", "demo", *QUICK, "run.resume=true", f"run.output_dir={tmp_path / folder}"], capsys)
        assert code == 2 and "run.resume=true" in one_line(err)
    assert snapshot(tmp_path / "crashed") == before and not (tmp_path / "misspelt").exists()
    # a folder without checkpoints that holds another run is refused too; --force replaces that run
    code, _, err = run(["train", "demo", *QUICK, f"run.output_dir={tmp_path / 'crashed'}"], capsys)
    assert code == 2 and "already holds a run (metrics.jsonl)" in one_line(err)
    assert main(["train", "demo", *QUICK, f"run.output_dir={tmp_path / 'crashed'}", "--force"]) == 0
    assert [r["stage"] for r in read_metrics(tmp_path / "crashed" / "metrics.jsonl")] == ["rl"]  # one run's rows


def test_a_run_that_fails_after_training_marks_its_folder_for_reuse(tmp_path, capsys, monkeypatch) -> None:
    from vocalign.rl.sft import SFTTrainer

    step = SFTTrainer.step

    def breaks_at_the_second_step(self, i):
        if i == 1:
            raise RuntimeError("a bug in the middle of a run")
        return step(self, i)

    out = tmp_path / "run"
    monkeypatch.setattr(SFTTrainer, "step", breaks_at_the_second_step)
    with pytest.raises(RuntimeError, match="a bug"):  # a bug keeps its traceback
        main(["train", "demo", *QUICK, "sft.steps=3", "data.sft_tasks[0].n=4", "data.sft_tasks[1].n=2",
              "data.sft_tasks[2].n=2", "sft.batch_size=2", "run.save_every=100", f"run.output_dir={out}"])
    assert "a bug in the middle of a run" in (out / "failed.txt").read_text()
    assert read_metrics(out / "metrics.jsonl")  # its logs stay readable
    monkeypatch.undo()
    assert main(["train", "demo", *QUICK, f"run.output_dir={out}"]) == 0  # a failed run's folder may be reused
    assert not (out / "failed.txt").exists()


# --- damaged checkpoints ---------------------------------------------------------------------------


def test_a_truncated_latest_checkpoint_falls_back_to_the_newest_intact_one(finished_run, tmp_path, capsys) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    (newest_step, newest), (older_step, older) = checkpoints(run_dir / "checkpoints")[-1], checkpoints(run_dir / "checkpoints")[-2]
    adapter = newest / ADAPTER_NAME
    adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])
    # export falls back, naming the damaged file
    with pytest.warns(UserWarning, match=rf"{newest.name} is damaged \({ADAPTER_NAME} \(\d+ bytes, saved with \d+\)\); using .*{older.name}"):
        code, out_text, _ = run(["export", str(newest), str(tmp_path / "export")], capsys)
    assert code == 0 and f"exported step {older_step}" in out_text
    # and so does resume: it continues from the older checkpoint
    with pytest.warns(UserWarning, match=f"{newest.name} is damaged"):
        code, out_text, err = run(["train", "demo", *QUICK, "rl.steps=3", "run.save_every=1", "run.keep_last=3",
                                   "run.resume=true", f"run.output_dir={run_dir}"], capsys)
    assert code == 0, err
    assert f"resuming from {older}" in out_text
    # every checkpoint damaged: a clear error, nothing run
    for _, folder in checkpoints(run_dir / "checkpoints"):
        (folder / "trainer_state.json").write_text("{not json")
    before = snapshot(run_dir)
    code, _, err = run(["train", "demo", *QUICK, "run.resume=true", f"run.output_dir={run_dir}"], capsys)
    assert code == 2 and "no intact checkpoint" in one_line(err) and "trainer_state.json" in err
    assert snapshot(run_dir) == before


def test_a_damaged_base_is_named(finished_run, tmp_path, capsys) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    weights = run_dir / "checkpoints" / "base" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, _, err = run(["train", "demo", *QUICK, "run.resume=true", f"run.output_dir={run_dir}"], capsys)
    line = one_line(err)
    assert code == 2 and "checkpoints/base is damaged (model.safetensors" in line and "Restore it" in line
    code, _, err = run(["export", str(checkpoints(run_dir / "checkpoints")[-1][1]), str(tmp_path / "x")], capsys)
    assert code == 2 and "checkpoints/base is damaged" in one_line(err)


def test_debug_shows_the_traceback(tmp_path) -> None:
    with pytest.raises(ValueError, match="rl.lr=-0.1"):
        main(["train", "demo", *QUICK, "rl.lr=-0.1", "--debug", f"run.output_dir={tmp_path / 'x'}"])


def test_a_truncated_optimiser_state_stops_a_resume_but_not_an_export(finished_run, tmp_path, capsys) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    (_, older), (newest_step, newest) = checkpoints(run_dir / "checkpoints")[-2:]
    optimizer = newest / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    code, out_text, _ = run(["export", str(newest), str(tmp_path / "export")], capsys)
    assert code == 0 and f"exported step {newest_step}" in out_text  # export never reads the optimiser
    with pytest.warns(UserWarning, match=rf"{newest.name} is damaged \(optimizer.pt \(100 bytes"):
        code, out_text, err = run(["train", "demo", *QUICK, "rl.steps=3", "run.save_every=1", "run.keep_last=3",
                                   "run.resume=true", f"run.output_dir={run_dir}"], capsys)
    assert code == 0 and f"resuming from {older}" in out_text, err


def test_a_row_without_its_fields_is_named(clips, tmp_path, capsys) -> None:
    data = rows_file(tmp_path / "data.jsonl", clips, ["good", "good2"])
    with open(data, "a") as f:
        f.write(json.dumps({"id": "empty-row", "answer": 3}) + "\n")
    code, _, err = run(["train", "demo", *QUICK, f"data.train_file={data}", f"run.output_dir={tmp_path / 'r'}"], capsys)
    line = one_line(err)
    assert code == 2 and "(id 'empty-row')" in line and "has no 'prompt', 'audio' or 'messages'" in line


def test_an_unimported_decorated_reward_is_told_to_use_module_function(tmp_path, capsys) -> None:
    code, _, err = run(["train", "demo", *QUICK, "rewards=[{name: my_style_reward}]", f"run.output_dir={tmp_path / 'r'}"],
                       capsys)
    assert code == 2 and "'your_module:function'" in one_line(err)
