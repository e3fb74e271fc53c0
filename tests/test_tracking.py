"""Run tracking: metrics.jsonl, summary.json, the reward curve and real W&B offline runs.

W&B runs here are real offline runs (wandb writes its binary run log under the run
folder); the run log is decoded with wandb's own protobuf records to check what it holds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vocalign.rl.tracking import (
    RunTracker,
    TrackingError,
    moving_average,
    plot_rewards,
    reward_components,
    read_metrics,
    redact_argv,
    resolve_wandb_mode,
)

FAKE_KEY = "fakekey" + "0123456789abcdef" * 3  # looks like a W&B key, is none


@dataclass
class LoggingConfig:
    wandb: bool = True
    project: str = "vocalign-tests"
    entity: str | None = None
    run_name: str | None = "tracking-test"
    mode: str = "offline"


@pytest.fixture(autouse=True)
def isolated_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep wandb's own folders in the test folder and start with no credentials."""
    home = tmp_path / "wandb_home"
    for variable, folder in [
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_DATA_DIR", "data"),
    ]:
        monkeypatch.setenv(variable, str(home / folder))
    monkeypatch.setenv("NETRC", str(home / "netrc"))
    for variable in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE",
                     "WANDB_BASE_URL", "WANDB_SILENT"):
        monkeypatch.delenv(variable, raising=False)
    return home


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def wandb_records(run_log: Path) -> list[Any]:
    """The records of a finished W&B run log, once its last one (`exit`) is on disk.

    `run.finish()` can return a few milliseconds before wandb's service has flushed the
    run log (seen here: a read right after `close` found only the file header now and
    then), so this waits for the `exit` record rather than read a log still being written.
    """
    for _ in range(600):  # up to a minute; it normally takes one or two tries
        records = decode_run_log(run_log)
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        time.sleep(0.1)
    raise AssertionError(f"{run_log} has no exit record after a minute: the run was not finished")


def decode_run_log(run_log: Path) -> list[Any]:
    """Decode a W&B run log (.wandb): a LevelDB-style log of protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2

    data = run_log.read_bytes()
    assert data[:4] == b":W&B"
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def logged_history(run_log: Path) -> list[dict[str, Any]]:
    rows = []
    for record in wandb_records(run_log):
        if record.WhichOneof("record_type") == "history":
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            rows.append({key: value for key, value in items.items() if not key.startswith("_")})
    return rows


ROWS = [
    ({"reward/mean": 0.25, "loss": 1.5, "stage": "ppo_think"}, 1),
    ({"reward/mean": 0.5, "loss": float("nan"), "stage": "ppo_think"}, 2),
    ({"reward/mean": 0.75, "loss": float("inf"), "stage": "grpo"}, 3),
]


def test_metrics_summary_and_reward_curve_without_wandb(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    tracker = RunTracker(run_dir, {"trainer": {"steps": 3}}, LoggingConfig(wandb=False))
    with tracker:
        for metrics, step in ROWS:
            tracker.log(metrics, step)
        written_before_close = read_metrics(run_dir / "metrics.jsonl")
        tracker.summary({"reward/final": 0.75, "best": float("nan")})

    expected = [
        {"step": 1, "reward/mean": 0.25, "loss": 1.5, "stage": "ppo_think"},
        {"step": 2, "reward/mean": 0.5, "loss": None, "stage": "ppo_think"},
        {"step": 3, "reward/mean": 0.75, "loss": None, "stage": "grpo"},
    ]
    assert written_before_close == expected, "each row is flushed as it is logged"
    assert read_metrics(run_dir / "metrics.jsonl") == expected
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary == {"reward/final": 0.75, "best": None}
    assert (run_dir / "config.yaml").read_text() == "trainer:\n  steps: 3\n"
    assert tracker.wandb_mode == "disabled" and tracker.wandb_run_id is None
    assert not (run_dir / "wandb").exists()
    assert png_size(run_dir / "reward_curve.png") == (1000, 360), "two stages, two panels"
    assert (run_dir / "reward_curve.png").stat().st_size > 10_000


def test_offline_wandb_run_holds_the_logged_metrics_and_can_be_resumed(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    recipe = {"trainer": {"steps": 3}, "logging": {"api_key": "do-not-keep"}}
    with RunTracker(run_dir, recipe, LoggingConfig(mode="offline")) as tracker:
        for metrics, step in ROWS:
            tracker.log(metrics, step)
        tracker.summary({"reward/final": 0.75})

    assert tracker.wandb_mode == "offline"
    assert tracker.wandb_dir is not None and tracker.wandb_dir.parent == run_dir / "wandb"
    assert tracker.wandb_dir.name.endswith(f"-{tracker.wandb_run_id}")
    run_log = tracker.wandb_dir / f"run-{tracker.wandb_run_id}.wandb"
    history = logged_history(run_log)
    assert [row["step"] for row in history] == [1, 2, 3]
    assert [row["reward/mean"] for row in history] == [0.25, 0.5, 0.75]
    assert [row["stage"] for row in history] == ["ppo_think", "ppo_think", "grpo"]
    assert history[0]["loss"] == 1.5
    assert math.isnan(history[1]["loss"]) and history[2]["loss"] == math.inf, "W&B keeps NaN/inf"
    config_updates = {
        item.key: json.loads(item.value_json)
        for record in wandb_records(run_log)
        if record.WhichOneof("record_type") == "run"
        for item in record.run.config.update
    }
    assert config_updates["logging"] == {"api_key": "<redacted>"}
    assert config_updates["trainer"] == {"steps": 3}

    with RunTracker(
        run_dir, recipe, LoggingConfig(mode="offline"), resume_id=tracker.wandb_run_id
    ) as resumed:
        resumed.log({"reward/mean": 1.0, "stage": "grpo"}, 4)

    assert resumed.wandb_run_id == tracker.wandb_run_id
    assert [row["step"] for row in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]
    resumed_log = resumed.wandb_dir / f"run-{resumed.wandb_run_id}.wandb"  # type: ignore[operator]
    assert logged_history(resumed_log) == [{"reward/mean": 1.0, "stage": "grpo", "step": 4}]


SECRET_RUN = """
import os, sys
from dataclasses import dataclass
from pathlib import Path

contacts = open(os.environ["CONTACTS_FILE"], "a")  # written at once: exit hooks count too
def audit(event, args):
    if event == "socket.getaddrinfo":
        host = args[0]
    elif event == "socket.connect" and isinstance(args[1], tuple):
        host = args[1][0]
    else:
        return  # not a network contact (a unix socket is how wandb reaches its service)
    if host not in ("localhost", "127.0.0.1", "::1"):
        contacts.write(f"{event} {host}\\n")
        contacts.flush()
sys.addaudithook(audit)

from vocalign.rl.tracking import RunTracker

@dataclass
class Options:
    wandb: bool = True
    project: str = "secret-test"
    entity: str | None = None
    run_name: str | None = None
    mode: str = "offline"

key = os.environ["WANDB_API_KEY"]
recipe = {"logging": {"api_key": key}, "rewards": [{"params": {"hf_token": key}}]}
with RunTracker(Path(sys.argv[1]), recipe, Options()) as tracker:
    # a key that reaches a metric or the summary under a secret-looking name is hidden too
    tracker.log({"reward/mean": 0.5, "hf_token": key}, step=1)
    tracker.summary({"reward/final": 0.5, "service": {"api_key": key}})
print(tracker.wandb_dir)
"""


def test_api_key_is_written_nowhere_and_offline_contacts_no_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    contacts = tmp_path / "contacts.txt"
    monkeypatch.setenv("CONTACTS_FILE", str(contacts))
    run_dir = tmp_path / "run"
    # The key also travels on the command line, as a user's override might carry it:
    # wandb records the command line in the run's metadata.
    arguments = [str(run_dir), f"logging.api_key={FAKE_KEY}", "--hf-token", FAKE_KEY]
    done = subprocess.run(
        [sys.executable, "-c", SECRET_RUN, *arguments],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    wandb_dir = Path(done.stdout.strip().splitlines()[-1])
    assert wandb_dir.is_relative_to(run_dir / "wandb") and any(wandb_dir.glob("*.wandb"))
    assert contacts.read_text() == "", "an offline run must not reach for the network"
    files = [path for path in tmp_path.rglob("*") if path.is_file() and not path.is_symlink()]
    assert len(files) > 5, "the run folder and wandb's own folders hold files to search"
    holding_key = [str(path) for path in files if FAKE_KEY.encode() in path.read_bytes()]
    assert holding_key == []
    assert "<redacted>" in (run_dir / "config.yaml").read_text()
    assert read_metrics(run_dir / "metrics.jsonl") == [{"step": 1, "reward/mean": 0.5, "hf_token": "<redacted>"}]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary == {"reward/final": 0.5, "service": {"api_key": "<redacted>"}}


def test_secret_options_are_hidden_in_the_command_line() -> None:
    argv = ["train", "demo", "trainer.max_new_tokens=64", "logging.api_key=k1", "--token", "k2",
            "--password=k3", "--steps", "5", "hf_token=k4"]
    assert redact_argv(argv) == [
        "train", "demo", "trainer.max_new_tokens=64", "logging.api_key=<redacted>", "--token",
        "<redacted>", "--password=<redacted>", "--steps", "5", "hf_token=<redacted>",
    ]


IMPORTS = """
import sys
from dataclasses import dataclass
from pathlib import Path
import vocalign.rl.recipe, vocalign.rl.tracking
assert "wandb" not in sys.modules and "matplotlib" not in sys.modules, "imported eagerly"

@dataclass
class Options:
    wandb: bool = False
    project: str = "p"
    entity: str | None = None
    run_name: str | None = None
    mode: str = "auto"

with vocalign.rl.tracking.RunTracker(Path(sys.argv[1]), {}, Options()) as tracker:
    tracker.log({"loss": 1.0}, step=1)
print("wandb" in sys.modules)
"""


def test_importing_and_running_without_wandb_never_imports_wandb(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", IMPORTS, str(tmp_path / "run")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    assert not (tmp_path / "run" / "wandb").exists()
    assert not (tmp_path / "run" / "reward_curve.png").exists(), "no reward was logged"


def test_auto_mode_goes_offline_without_credentials(
    isolated_wandb: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    auto = LoggingConfig(mode="auto")
    assert resolve_wandb_mode(auto) == "offline"

    isolated_wandb.mkdir(parents=True, exist_ok=True)
    netrc_file = isolated_wandb / "netrc"
    netrc_file.write_text("machine example.org login user password other\n")
    assert resolve_wandb_mode(auto) == "offline", "a netrc entry for another host is no W&B key"
    for host in ("api.wandb.ai", "api.forge.coreweave.com"):
        netrc_file.write_text(f"machine {host} login user password {FAKE_KEY}\n")
        assert resolve_wandb_mode(auto) == "online"

    netrc_file.write_text(f"machine wandb.internal login user password {FAKE_KEY}\n")
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.internal")
    assert resolve_wandb_mode(auto) == "online", "a self-hosted server's entry counts"

    netrc_file.unlink()
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert resolve_wandb_mode(auto) == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_wandb_mode(auto) == "offline", "WANDB_MODE=offline is respected"
    assert resolve_wandb_mode(LoggingConfig(wandb=False, mode="online")) == "disabled"
    assert resolve_wandb_mode(LoggingConfig(mode="disabled")) == "disabled"


def test_unusable_logging_settings_say_what_to_do() -> None:
    with pytest.raises(TrackingError) as online:
        resolve_wandb_mode(LoggingConfig(mode="online"))
    assert str(online.value) == (
        "logging.mode is 'online' but no W&B API key is configured; set WANDB_API_KEY or "
        "run `wandb login`, or use logging.mode=offline and upload later with `wandb sync`"
    )
    with pytest.raises(TrackingError, match="logging.mode is 'onlne'; use one of auto, online"):
        resolve_wandb_mode(LoggingConfig(mode="onlne"))


def test_log_accepts_numbers_and_strings_only(tmp_path: Path) -> None:
    with RunTracker(tmp_path / "run", {}, LoggingConfig(wandb=False)) as tracker:
        with pytest.raises(TypeError, match="metric 'reward/all' is a list"):
            tracker.log({"reward/all": [0.1, 0.2]}, step=1)
        with pytest.raises(ValueError, match="must not contain 'step'"):
            tracker.log({"step": 3, "loss": 1.0}, step=3)
        tracker.log({"accepted": True, "count": 3}, step=1)
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == [
        {"step": 1, "accepted": True, "count": 3}
    ]


def test_moving_average_is_a_trailing_mean() -> None:
    assert moving_average([1.0, 2.0, 3.0, 4.0, 10.0], window=2) == [1.0, 1.5, 2.5, 3.5, 7.0]
    assert moving_average([4.0, 2.0, 0.0], window=10) == [4.0, 3.0, 2.0]
    with pytest.raises(ValueError, match="at least 1"):
        moving_average([1.0], window=0)


def test_plot_rewards_draws_one_panel_per_stage(tmp_path: Path) -> None:
    rows = [{"step": step, "loss": 1.0, "stage": "sft"} for step in range(5)]
    rows += [{"step": 5 + step, "reward/mean": step / 20, "reward/asr": 0.5, "stage": "grpo"}
             for step in range(20)]
    rows += [{"step": 25 + step, "reward/mean": 0.9, "stage": "ppo"} for step in range(20)]

    one_key = plot_rewards(tmp_path / "one.png", rows)
    two_keys = plot_rewards(tmp_path / "two.png", rows, keys=("reward/mean", "reward/asr"))

    assert png_size(one_key) == (1000, 360), "sft has no reward, so two panels"
    assert png_size(two_keys) == (1000, 360)
    assert one_key.read_bytes() != two_keys.read_bytes()
    assert png_size(plot_rewards(tmp_path / "flat.png", rows, by="none")) == (500, 360)
    assert reward_components(rows) == ("reward/mean", "reward/asr")
    with pytest.raises(ValueError, match="no metrics row has a number for reward/kl"):
        plot_rewards(tmp_path / "none.png", rows, keys=("reward/kl",))


# --- the sample table -------------------------------------------------------------------


@dataclass
class Samples:
    """A step's rollouts with their scores, as the runner hands them to `log_audio_table`."""

    rollouts: list[Any]
    rewards: dict[str, list[float | None]]
    total: list[float]


@pytest.fixture(scope="module")
def samples() -> Samples:
    """Real rollouts of the embedded policy: 2 spoken questions, 2 samples each.

    An untrained policy almost never speaks, so the first rollout is given the reference
    answer's speech, rendered by the policy's own detokenizer as a spoken response is;
    the table then has a real clip for the recognizer, beside responses without speech.
    """
    from vocalign.data.tasks import make_task
    from vocalign.model.loading import embedded_policy
    from vocalign.model.policy import Sampling
    from vocalign.rewards import RewardSpec, score
    from vocalign.rollouts.worker import RolloutWorker

    policy = embedded_policy(0)
    prompts = make_task("arithmetic", 2, seed=3)
    rollouts = RolloutWorker(policy).generate(prompts, 2, Sampling(max_new_tokens=12), seed=0)
    target = prompts[0].target
    assert target is not None and target.speech
    units = policy.detokenizer.encode(target.speech, target.style)
    speech = policy.detokenizer.render(units)
    rollouts[0] = dataclasses.replace(
        rollouts[0], spoken_text=target.speech, audio_tokens=policy.tokenizer.audio_ids(units),
        waveform=speech.waveform, sample_rate=speech.sample_rate,
    )
    specs = [RewardSpec("correctness"), RewardSpec("speech_consistency", 0.5, {"against": "spoken_text"})]
    scores = score(rollouts, specs)
    return Samples(rollouts, scores.components, scores.total)


def staged_run_table(run_log: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """The `samples` table as W&B will upload it (an artifact staged on disk) and its files."""
    artifacts = [record.artifact for record in wandb_records(run_log) if record.WhichOneof("record_type") == "artifact"]
    (table_artifact,) = [a for a in artifacts if a.type == "run_table" and a.name.endswith("-samples")]
    files = {entry.path: Path(entry.local_path) for entry in table_artifact.manifest.contents}
    return json.loads(files["samples.table.json"].read_text()), files


def test_audio_table_in_an_offline_wandb_run(tmp_path: Path, samples: Samples) -> None:
    import soundfile

    from vocalign.rewards.asr import get_asr

    rollouts = samples.rollouts
    run_dir = tmp_path / "run"
    with RunTracker(run_dir, {}, LoggingConfig(mode="offline")) as tracker:
        rows = tracker.log_audio_table(7, rollouts, samples.rewards, samples.total, n=2)
    # one answer to each question before a second answer to either
    assert [r.group for r in rollouts] == [0, 0, 1, 1]
    picked = [0, 2]
    assert [row["response"] for row in rows] == [rollouts[i].text for i in picked]

    table, files = staged_run_table(tracker.wandb_dir / f"run-{tracker.wandb_run_id}.wandb")  # type: ignore[operator]
    assert table["columns"] == [
        "step", "prompt", "prompt_audio", "response", "spoken_text", "transcript", "speech", "speech_seconds",
        "reward/correctness", "reward/speech_consistency", "total",
    ]
    cells = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert len(cells) == 2
    heard = get_asr("embedded").transcribe([rollouts[0].waveform], rollouts[0].sample_rate)[0]
    assert heard, "the recognizer hears words in the rendered reference answer"
    for cell, row, index in zip(cells, rows, picked):
        rollout = rollouts[index]
        assert cell["step"] == 7
        assert cell["prompt"] == f"human: [audio {rollout.prompt.audio[0].seconds:.1f} s]"  # a spoken question
        assert cell["response"] == rollout.text and cell["spoken_text"] == rollout.spoken_text
        assert cell["reward/correctness"] == samples.rewards["correctness"][index]
        assert cell["reward/speech_consistency"] == samples.rewards["speech_consistency"][index]
        assert cell["total"] == pytest.approx(samples.total[index])
        assert {k: v for k, v in cell.items() if k not in ("prompt_audio", "speech")} == row
        # the prompt's clip, playable: the same samples at the same rate
        clip = rollout.prompt.audio[0]
        waveform, rate = soundfile.read(files[cell["prompt_audio"]["path"]], dtype="float32")
        assert rate == clip.sample_rate and len(waveform) == len(clip.waveform)
    assert cells[0]["transcript"] == heard and cells[0]["spoken_text"] == rollouts[0].spoken_text
    waveform, rate = soundfile.read(files[cells[0]["speech"]["path"]], dtype="float32")
    assert rate == rollouts[0].sample_rate and len(waveform) == len(rollouts[0].waveform)
    assert np.abs(waveform - rollouts[0].waveform).max() < 1e-3  # 16-bit WAV
    assert rollouts[2].waveform is None and cells[1]["speech"] is None  # no speech, no clip
    assert cells[1]["transcript"] == ""
    # the same rows are in the run folder, as with W&B off
    assert read_metrics(run_dir / "samples.jsonl") == rows


def test_audio_table_without_wandb_goes_to_samples_jsonl(tmp_path: Path, samples: Samples) -> None:
    run_dir = tmp_path / "run"
    with RunTracker(run_dir, {}, LoggingConfig(wandb=False)) as tracker:
        first = tracker.log_audio_table(5, samples.rollouts, samples.rewards, samples.total)
        second = tracker.log_audio_table(10, samples.rollouts, samples.rewards, samples.total, n=1)
    assert not (run_dir / "wandb").exists()
    written = read_metrics(run_dir / "samples.jsonl")
    assert written == first + second
    assert [row["step"] for row in written] == [5, 5, 5, 5, 10]
    assert [row["response"] for row in first] == [r.text for r in samples.rollouts]
    speech = first[0]
    assert speech["spoken_text"] == samples.rollouts[0].spoken_text and speech["transcript"]
    assert speech["speech_seconds"] == pytest.approx(samples.rollouts[0].speech_seconds, abs=1e-3)
    # a reward that did not apply (no speech to compare) is null, not 0
    assert [row["reward/speech_consistency"] for row in first][1:] == [None, None, None]
    assert set(first[0]) == {"step", "prompt", "response", "spoken_text", "transcript", "speech_seconds",
                             "reward/correctness", "reward/speech_consistency", "total"}


def test_audio_table_survives_a_failing_recognizer(
    tmp_path: Path, samples: Samples, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vocalign.rewards.asr

    def broken(name: str = "embedded", **kwargs: Any) -> Any:
        raise OSError("recognizer weights missing")

    monkeypatch.setattr(vocalign.rewards.asr, "get_asr", broken)
    with RunTracker(tmp_path / "run", {}, LoggingConfig(wandb=False)) as tracker:
        rows = tracker.log_audio_table(1, samples.rollouts, samples.rewards, samples.total, n=2)
    assert [row["transcript"] for row in rows] == ["", ""]
    assert rows[0]["spoken_text"] == samples.rollouts[0].spoken_text


def test_audio_table_checks_its_inputs(tmp_path: Path, samples: Samples) -> None:
    with RunTracker(tmp_path / "run", {}, LoggingConfig(wandb=False)) as tracker:
        short = {**samples.rewards, "correctness": samples.rewards["correctness"][:2]}
        with pytest.raises(ValueError, match="reward 'correctness' has 2 scores for 4 rollouts"):
            tracker.log_audio_table(1, samples.rollouts, short, samples.total)
        with pytest.raises(ValueError, match="reward 'total' has 3 scores for 4 rollouts"):
            tracker.log_audio_table(1, samples.rollouts, samples.rewards, samples.total[:3])
        with pytest.raises(ValueError, match="n >= 1"):
            tracker.log_audio_table(1, samples.rollouts, samples.rewards, samples.total, n=0)
        assert tracker.log_audio_table(1, [], {}, []) == []
    assert not (tmp_path / "run" / "samples.jsonl").exists()
    with pytest.raises(RuntimeError, match="before open"):
        RunTracker(tmp_path / "r2", {}, LoggingConfig(wandb=False)).log_audio_table(1, [], {}, [])
