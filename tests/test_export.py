"""`vocalign export`: a real checkpoint of a tiny training run, exported and loaded back.

The run goes through the command line (`vocalign train demo ...`), so the checkpoints are
whatever the runner writes today: one SFT step (a full-weight checkpoint, step-1) and one
GRPO step on a LoRA adapter (step-2). A reward that differs between samples
(`text_characters`) gives GRPO a gradient, and a high learning rate moves the adapter
far enough that a missing merge would show in the log-probabilities.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vocalign.data.tasks import make_task
from vocalign.data.types import Response, Rollout
from vocalign.model.loading import load_policy
from vocalign.model.policy import Policy
from vocalign.rl.checkpoint import ADAPTER_NAME, STATE_NAME, load_checkpoint, write_manifest
from vocalign.rl.cli import main
from vocalign.rl.export import PEFT_KEY_MARKERS, export_checkpoint

SFT_CHECKPOINT, LORA_CHECKPOINT = "step-1", "step-2"


def text_characters(rollouts: list[Rollout]) -> list[float]:
    """The length of each visible text answer: differs between samples, so GRPO has a gradient."""
    return [float(len(r.text)) for r in rollouts]


# The tiny run, as command-line overrides of the demo recipe: every recipe key the tests
# depend on is here (and only here).
TINY_RUN = [
    "sft.steps=1", "data.sft_tasks[0].n=8", "data.sft_tasks[1].n=4", "sft.batch_size=4",
    "rl.steps=1", "data.rl_tasks[0].n=4", "data.eval_prompts=2", "eval.suites=[]",
    "rl.prompts_per_step=2", "rl.group_size=4", "rl.max_new_tokens=12", "rl.minibatches=1",
    "rl.lr=0.05", "rl.lora.r=4", "rl.lora.alpha=8",
    f"rewards=[{{name: correctness, weight: 1.0}}, {{name: '{__name__}:text_characters', weight: 0.1}}]",
    "run.save_every=1", "run.keep_last=2", "run.progress=false", "logging.wandb=false",
]
RL_STAGE = "rl"  # the RL stage's name in trainer_state.json and its section of summary.json


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", "demo", *TINY_RUN, f"run.output_dir={out}"]) == 0
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["base", SFT_CHECKPOINT, LORA_CHECKPOINT], names
    return out


@pytest.fixture(scope="module")
def exported(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "model"
    result = export_checkpoint(run_dir / "checkpoints" / LORA_CHECKPOINT, out)
    assert (result.out, result.step, result.stage, result.merged_lora) == (out, 2, RL_STAGE, True)
    return out


def fixed_logprobs(policy: Policy) -> torch.Tensor:
    """Log-probabilities of one fixed response (think, text, interleaved speech) to a spoken question."""
    prompt = make_task("arithmetic", 1, seed=11)[0]
    assert prompt.audio, "the fixed prompt should carry audio, so the encoder and adaptor count too"
    answer = Response(text="7", speech="seven", think="what is three plus four")
    response = policy.tokenizer.render_response(answer, units=[3, 14, 15, 9, 2, 6, 5, 3])
    batch = policy.encode_prompts([prompt])
    with torch.no_grad():
        return policy.logprobs(policy.sequences(batch.ids, [response], batch.encoded))[0]


# --- the exported model -----------------------------------------------------------------


def test_exported_model_computes_what_the_lora_checkpoint_computes(run_dir: Path, exported: Path) -> None:
    checkpoint = load_checkpoint(run_dir / "checkpoints" / LORA_CHECKPOINT)
    assert checkpoint.lora
    policy = load_policy(exported)
    assert not policy.lora
    expected = fixed_logprobs(checkpoint)
    torch.testing.assert_close(fixed_logprobs(policy), expected, rtol=0, atol=1e-5)
    # The adapter moved the model: without the merge the export would be the base.
    base = fixed_logprobs(load_policy(run_dir / "checkpoints" / "base"))
    assert (base - expected).abs().max() > 1e-3


def test_exported_folder_is_a_plain_model_without_adapter_weights(run_dir: Path, exported: Path) -> None:
    files = {p.name for p in exported.iterdir()}
    assert {"vocalign_config.json", "model.safetensors", "README.md"} <= files
    assert not files & {ADAPTER_NAME, STATE_NAME, "adapter_config.json", "adapter_model.safetensors"}
    weights = load_file(str(exported / "model.safetensors"))
    assert [key for key in weights if any(marker in key for marker in PEFT_KEY_MARKERS)] == []
    base = load_file(str(run_dir / "checkpoints" / "base" / "model.safetensors"))
    assert weights.keys() == base.keys()
    changed = [key for key in weights if not torch.equal(weights[key], base[key])]
    # LoRA adapts the LM's attention and MLP projections only: the merge changes those
    assert changed and all(key.startswith("lm.model.layers.") and key.endswith("proj.weight") for key in changed)


def test_model_card_says_how_the_model_was_trained(run_dir: Path, exported: Path) -> None:
    card = (exported / "README.md").read_text()
    assert f"# vocalign model: step 2 ({RL_STAGE})" in card
    assert f"training step **2**, stage **{RL_STAGE}**" in card and "LoRA adapter is merged" in card
    description = (run_dir / "config.yaml").read_text().split("description: ", 1)[1].splitlines()[0]
    assert description.strip("'\"")[:40] in card
    assert "`arithmetic` x 4" in card  # the RL task, with its size from the overrides
    assert "| `lr` | `0.05` |" in card and "| `lora.r` | `4` |" in card
    assert "| `correctness` | 1.0 |" in card
    assert f"| `{__name__}:text_characters` | 0.1 |" in card
    summary = json.loads((run_dir / "summary.json").read_text())
    rl = summary[RL_STAGE]
    assert f"| `reward/mean` | {rl['reward/mean first 10%']:.4g} | {rl['reward/mean last 10%']:.4g} |" in card
    assert f"| `reward/correctness` | {rl['eval']['reward/correctness']:.4g} |" in card
    assert "load_policy(" in card
    assert "critic." not in card and "deepspeed." not in card, "settings of parts a LoRA GRPO run does not use"


def test_full_weight_checkpoint_exports_unchanged(run_dir: Path, tmp_path: Path) -> None:
    checkpoint = run_dir / "checkpoints" / SFT_CHECKPOINT
    result = export_checkpoint(checkpoint, tmp_path / "sft")
    assert (result.step, result.stage, result.merged_lora) == (1, "sft", False)
    exported, saved = load_file(str(tmp_path / "sft" / "model.safetensors")), load_file(str(checkpoint / "model.safetensors"))
    assert exported.keys() == saved.keys()
    assert all(torch.equal(exported[key], saved[key]) for key in saved)
    card = (tmp_path / "sft" / "README.md").read_text()
    assert "step **1**, stage **sft**" in card and "Full weights." in card


def test_unknown_checkpoint_files_are_ignored_and_an_unfinished_run_is_said(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run_dir / "checkpoints", copy / "checkpoints")
    shutil.copy(run_dir / "config.yaml", copy / "config.yaml")  # no summary.json: an unfinished run
    folder = copy / "checkpoints" / LORA_CHECKPOINT
    (folder / "optimizer.pt").write_bytes(b"not read by export")
    (folder / "future_state.bin").write_bytes(b"\x00\x01")
    state = json.loads((folder / STATE_NAME).read_text())
    # what the run knew when it saved the checkpoint, if the trainer state carries it
    state["summary"] = {"rl": {"reward/mean first 10%": 0.25, "reward/mean last 10%": 0.625}}
    (folder / STATE_NAME).write_text(json.dumps(state))
    write_manifest(folder)  # as if saved so (an edited file no longer matches its manifest)
    export_checkpoint(folder, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Metrics up to this checkpoint" in card and "## Final metrics" not in card
    assert "| `reward/mean` | 0.25 | 0.625 |" in card
    assert "| `correctness` | 1.0 |" in card  # the recipe is still described

    del state["summary"]
    (folder / STATE_NAME).write_text(json.dumps(state))
    write_manifest(folder)
    export_checkpoint(folder, tmp_path / "out", force=True)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "No `summary.json` in the run folder" in card and "## Metrics" not in card and "reward/mean" not in card


# --- through the command line -------------------------------------------------------------


def test_cli_export_and_its_refusals(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = str(run_dir / "checkpoints" / LORA_CHECKPOINT)
    out = tmp_path / "out"
    assert main(["export", checkpoint, str(out)]) == 0
    assert f"exported step 2 ({RL_STAGE}, LoRA adapter merged into its base) to {out}" in capsys.readouterr().out
    model = (out / "model.safetensors").read_bytes()

    # a non-empty OUT is refused and left alone, unless --force
    (out / "notes.txt").write_text("mine")
    assert main(["export", checkpoint, str(out)]) == 2
    assert capsys.readouterr().err == (
        f"vocalign: OUT {out} exists and is not empty; pass an empty or new folder, or --force to replace it\n"
    )
    assert (out / "notes.txt").read_text() == "mine"
    assert main(["export", checkpoint, str(out), "--force"]) == 0
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").read_bytes() == model
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "no temporary folder is left behind"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", checkpoint, str(empty)]) == 0, "an empty OUT is fine"


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "vocalign: checkpoint {ckpt} does not exist; pass RUN_DIR/checkpoints/step-N"),
        ("run folder", "vocalign: {ckpt} is not a checkpoint (no trainer_state.json); pass RUN_DIR/checkpoints/step-N"),
        ("damaged state", "vocalign: {ckpt}/trainer_state.json is not valid JSON"),
        ("no base", "vocalign: cannot load checkpoint {ckpt}: "),
        ("unreadable state", "vocalign: cannot load checkpoint {ckpt}"),
        ("out in checkpoints", "vocalign: OUT {out} overlaps the run's checkpoints"),
        ("out is a file", "vocalign: OUT {out} is a file; pass a folder (new or empty)"),
    ],
)
def test_cli_errors_are_one_line_with_exit_status_2(
    case: str, message: str, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint, out = run_dir / "checkpoints" / LORA_CHECKPOINT, tmp_path / "out"
    if case == "missing":
        checkpoint = tmp_path / "checkpoints" / "step-9"
    elif case == "run folder":
        checkpoint = run_dir
    elif case == "damaged state":
        checkpoint = tmp_path / "checkpoints" / "step-3"
        checkpoint.mkdir(parents=True)
        (checkpoint / STATE_NAME).write_text('{"step": 3, "lora"')
    elif case == "no base":  # a LoRA adapter copied away from its run's checkpoints/base
        checkpoint = tmp_path / "checkpoints" / LORA_CHECKPOINT
        shutil.copytree(run_dir / "checkpoints" / LORA_CHECKPOINT, checkpoint)
    elif case == "unreadable state":  # says LoRA, names no adapter settings and has no adapter file
        shutil.copytree(run_dir / "checkpoints" / "base", tmp_path / "checkpoints" / "base")
        checkpoint = tmp_path / "checkpoints" / "step-3"
        checkpoint.mkdir()
        (checkpoint / STATE_NAME).write_text('{"step": 3, "stage": "rl", "lora": true}')
    elif case == "out in checkpoints":
        out = run_dir / "checkpoints" / "export"
    elif case == "out is a file":
        out.write_text("a file")
    assert main(["export", str(checkpoint), str(out), "--force"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.format(ckpt=checkpoint, out=out)), err
    assert err.count("\n") == 1, "one line"
    assert case == "out is a file" or not out.exists()
