"""`vocalign train` on a Qwen2-Audio checkpoint, end to end: `model.path` names a local
Qwen2-Audio folder (a tiny random one, saved as a released checkpoint is: Qwen's own
tokenizer, Whisper features), `model.detokenizer` gives it speech tokens; SFT, then GRPO
under LoRA with a KL; the run resumes from its checkpoint, and `vocalign export` of its
last checkpoint loads back as the same model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_qwen2_audio import qwen_like_tokenizer, tiny_qwen2_audio  # pytest puts tests/ on sys.path
from transformers import WhisperFeatureExtractor

from vocalign.data.types import Message, Prompt
from vocalign.model.hf_audio import Qwen2AudioLM
from vocalign.model.loading import VOCALIGN_META, load_policy
from vocalign.rl.checkpoint import latest_checkpoint, load_checkpoint
from vocalign.rl.config import Recipe
from vocalign.rl.export import export_checkpoint
from vocalign.rl.recipe import load_recipe
from vocalign.rl.runner import train
from vocalign.rl.tracking import read_metrics

RUN = [
    "sft.steps=2", "rl.steps=2", "data.sft_tasks[0].n=8", "data.sft_tasks[1].n=4", "data.sft_tasks[2].n=4", "data.rl_tasks[0].n=8", "data.eval_prompts=2", "eval.suites=[]",
    "sft.batch_size=4", "rl.prompts_per_step=2", "rl.group_size=2", "rl.max_new_tokens=8", "kl.coef=0.05",
    "rl.lora.r=4", "rl.lora.alpha=8", "rewards=[{name: correctness, weight: 1.0}]", "model.detokenizer=espeak_units",
    "model.max_audio_seconds=3.5", "logging.wandb=false", "logging.audio_every=0", "run.progress=false", "run.save_every=1",
]


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("qwen2-audio")
    tokenizer = qwen_like_tokenizer()
    tiny_qwen2_audio(len(tokenizer), tokenizer.convert_tokens_to_ids("<|AUDIO|>")).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def run_dir(released: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "qwen2-audio"
    return train(load_recipe("demo", [*RUN, f"model.path={released}", f"run.output_dir={out}"], Recipe), "demo")


def test_a_qwen2_audio_checkpoint_trains_through_the_run_loop(run_dir: Path) -> None:
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["stage"] for r in rows] == ["sft", "sft", "rl", "rl"]
    assert all(r["loss"] == r["loss"] for r in rows)  # not NaN
    base = run_dir / "checkpoints" / "base"
    assert json.loads((base / VOCALIGN_META).read_text()) == {"detokenizer": "espeak_units"}
    policy = load_policy(base)  # the detokenizer comes from the folder
    assert isinstance(policy.model, Qwen2AudioLM) and policy.detokenizer is not None
    assert policy.tokenizer.n_audio == len(policy.detokenizer.units)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "reward/mean" in summary["sft"] and "eval" in summary["rl"]


def test_the_run_resumes_and_its_checkpoint_exports_to_the_same_model(run_dir: Path, released: Path, tmp_path: Path) -> None:
    recipe = load_recipe("demo", [*RUN, "rl.steps=3", f"model.path={released}", f"run.output_dir={run_dir}", "run.resume=true"], Recipe)
    train(recipe, "demo")
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    last = latest_checkpoint(run_dir)
    assert last.name == "step-5"
    adapted = load_checkpoint(last)
    assert adapted.lora
    out = tmp_path / "exported"
    result = export_checkpoint(last, out)
    assert result.merged_lora
    exported = load_policy(out)
    assert not exported.lora and isinstance(exported.model, Qwen2AudioLM)
    batch = adapted.encode_prompts([Prompt("t", [Message("human", "what is two plus two")])])
    seq = adapted.sequences(batch.ids, [[5, 6, 7]], batch.encoded)
    with torch.no_grad():
        torch.testing.assert_close(exported.logprobs(seq), adapted.logprobs(seq), atol=1e-5, rtol=0)


def test_a_detokenizer_that_does_not_fit_the_folder_is_refused(run_dir: Path, tmp_path: Path) -> None:
    from vocalign.model.loading import embedded_policy, save_policy
    from vocalign.rl.config import check_recipe

    with pytest.raises(ValueError, match="saved with the speech detokenizer 'espeak_units', not 'other'.*model.detokenizer=espeak_units"):
        load_policy(run_dir / "checkpoints" / "base", detokenizer="other")
    with pytest.raises(FileNotFoundError, match="is not a saved vocalign model.*nor a Qwen2-Audio checkpoint"):
        load_policy(tmp_path)
    save_policy(embedded_policy(0), tmp_path / "embedded")
    with pytest.raises(ValueError, match="holds the embedded model.*leave model.detokenizer unset"):
        load_policy(tmp_path / "embedded", detokenizer="espeak_units")
    with pytest.raises(ValueError, match="model.detokenizer=espeak_units is for a Qwen2-Audio model.path"):
        check_recipe(load_recipe("demo", ["model.detokenizer=espeak_units"], Recipe))
