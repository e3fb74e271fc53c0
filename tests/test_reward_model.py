"""The learned preference reward model: synthetic pairs, training with TRL's RewardTrainer on a
tiny Qwen2 classifier, saving/loading, the batched `reward_model` reward, and the recipe job."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForSequenceClassification

from vocalign.data.types import Message, Prompt, Rollout
from vocalign.rewards import RewardSpec, check_rewards, score
from vocalign.rewards.correctness import is_correct, words_to_number
from vocalign.rewards.training.preference_data import PAIR_KINDS, PreferencePair, held_out_pairs, preference_pairs
from vocalign.rewards.reward_model import load_reward_model, reward_model
from vocalign.rewards.training.reward_model import RewardModelConfig, pairwise_accuracy, train_reward_model
from vocalign.rl.cli import main
from vocalign.rl.config import Recipe, check_recipe
from vocalign.rl.recipe import load_recipe
from vocalign.rl.tracking import read_metrics

RECIPE = Path(__file__).parent.parent / "recipes" / "reward_model.yaml"
TINY = dict(hidden_size=32, layers=1, heads=2, batch_size=8, lr=3e-3, warmup_steps=2, logging_steps=5)


def rollout(question: str, text: str, spoken_text: str = "", waveform: np.ndarray | None = None) -> Rollout:
    prompt = Prompt(id="p", messages=[Message("human", "")], task="arithmetic", meta={"question": question})
    return Rollout(
        prompt=prompt, text=text, think="", spoken_text=spoken_text, audio_tokens=[], waveform=waveform,
        sample_rate=16000, prompt_ids=[], response_ids=[], logprobs=[],
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[PreferencePair]]:
    torch.set_num_threads(1)
    pairs = preference_pairs(48, seed=0, kinds=["on_topic", "polite"])
    config = RewardModelConfig(steps=40, **TINY)
    out = tmp_path_factory.mktemp("rm") / "reward_model"
    logged: list[int] = []
    result = train_reward_model(pairs, out, config, seed=0, progress=False, on_log=lambda step, m: logged.append(step))
    assert result.path == out and result.steps == 40
    assert logged == [5, 10, 15, 20, 25, 30, 35, 40]
    return out, pairs


# --- preference pairs -------------------------------------------------------------------


def test_pairs_are_seeded_and_the_kinds_take_turns() -> None:
    first = preference_pairs(20, seed=3, kinds=PAIR_KINDS)
    assert first == preference_pairs(20, seed=3, kinds=PAIR_KINDS)
    assert first != preference_pairs(20, seed=4, kinds=PAIR_KINDS)
    assert [p.kind for p in first[:5]] == list(PAIR_KINDS)
    assert all(p.chosen != p.rejected for p in first)


def _answer(question: str) -> int:
    a, op, b = question.removeprefix("what is ").partition(" plus ") if " plus " in question else (
        question.removeprefix("what is ").partition(" minus "))
    return words_to_number(a) + (1 if "plus" in op else -1) * words_to_number(b)


def test_chosen_answers_are_right_and_wrong_answers_are_wrong() -> None:
    pairs = preference_pairs(200, seed=0, kinds=PAIR_KINDS)
    for pair in pairs:
        answer = _answer(pair.question)
        assert is_correct(pair.chosen, answer), pair
        if pair.kind == "correct":
            assert not is_correct(pair.rejected, answer), pair
        if pair.kind == "heard":  # the rejected response restates another question
            assert pair.question.removeprefix("what is ") not in pair.rejected, pair


def test_held_out_pairs_repeat_no_training_pair() -> None:
    train = preference_pairs(500, seed=0)
    held = held_out_pairs(100, seed=1, seen=train)
    assert len(held) == 100
    assert not {p.key for p in held} & {p.key for p in train}
    assert len({p.key for p in held}) == 100


def test_held_out_pairs_say_when_the_domain_runs_out() -> None:
    with pytest.raises(ValueError, match="found only .* not seen in training"):
        held_out_pairs(500, seed=1, seen=[], kinds=["concise"], max_operand=1)  # 7 questions x 6 x 3: 126 pairs


# --- training, saving, serving ------------------------------------------------------------


def test_saved_folder_loads_without_the_training_code(trained: tuple[Path, list[PreferencePair]]) -> None:
    path, _ = trained
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in path.iterdir()}
    model = load_reward_model(path)
    assert model.model.config.num_labels == 1
    assert load_reward_model(path) is model  # loaded once per process


def test_chosen_outscores_rejected_after_training(trained: tuple[Path, list[PreferencePair]]) -> None:
    path, pairs = trained
    easy = pairs[0]  # on_topic: an answer over a refusal or ramble
    scores = reward_model([rollout(easy.question, easy.chosen), rollout(easy.question, easy.rejected)], path=str(path))
    assert scores[0] > scores[1]
    assert all(0.0 < s < 1.0 for s in scores)  # sigmoid
    assert pairwise_accuracy(load_reward_model(path), pairs)["accuracy"] == 1.0


def test_batched_scores_equal_one_at_a_time(trained: tuple[Path, list[PreferencePair]]) -> None:
    path, pairs = trained
    rollouts = [rollout(p.question, text) for p in pairs[:6] for text in (p.chosen, p.rejected)]
    batched = reward_model(rollouts, path=str(path), normalize="raw")
    alone = [reward_model([r], path=str(path), normalize="raw")[0] for r in rollouts]
    np.testing.assert_allclose(batched, alone, rtol=0, atol=1e-5)
    assert len(set(np.round(batched, 4))) > 1  # the scores differ between responses


def test_sources_pick_the_text_that_is_scored(trained: tuple[Path, list[PreferencePair]]) -> None:
    path, pairs = trained
    good, bad = pairs[0].chosen, pairs[0].rejected
    r = rollout(pairs[0].question, text=good, spoken_text=bad)
    text, spoken, auto = (reward_model([r], path=str(path), source=s)[0] for s in ("text", "spoken_text", "auto"))
    assert text == auto  # no speech: "auto" scores the text
    assert spoken < text
    assert reward_model([r], path=str(path), source="transcript") == [None]  # no speech, nothing to transcribe


def test_sigmoid_is_the_raw_score_squashed(trained: tuple[Path, list[PreferencePair]]) -> None:
    path, pairs = trained
    r = rollout(pairs[1].question, pairs[1].chosen)
    raw = reward_model([r], path=str(path), normalize="raw")[0]
    assert reward_model([r], path=str(path))[0] == pytest.approx(1 / (1 + np.exp(-raw)))


def test_transcript_source_scores_what_the_asr_heard(trained: tuple[Path, list[PreferencePair]]) -> None:
    from vocalign.data.espeak import synthesize
    from vocalign.rewards import asr as asr_module

    path, _ = trained
    speech = synthesize("the answer is seven", sample_rate=16000)
    heard = asr_module.get_asr("embedded").transcribe([speech], 16000)[0]
    spoken = rollout("what is three plus four", text="", waveform=speech)
    as_text = rollout("what is three plus four", text=heard)
    assert reward_model([spoken], path=str(path), source="transcript") == reward_model([as_text], path=str(path), source="text")


def test_reward_through_the_registry(trained: tuple[Path, list[PreferencePair]]) -> None:
    path, pairs = trained
    rollouts = [rollout(pairs[0].question, pairs[0].chosen), rollout(pairs[0].question, pairs[0].rejected)]
    scores = score(rollouts, [RewardSpec("reward_model", params={"path": str(path)})])
    assert scores.components["reward_model"][0] > scores.components["reward_model"][1]


# --- errors a user can hit -------------------------------------------------------------------


def test_path_is_required() -> None:
    """`path` or, in a staged recipe, `stage`: a recipe without either is refused before it runs,
    and the reward called without a path says what to give."""
    from vocalign.rl.config import Recipe, RecipeCheckError, check_recipe

    check_rewards([RewardSpec("reward_model")])  # the params themselves are valid: path or stage
    with pytest.raises(RecipeCheckError, match="reward reward_model needs path=FOLDER"):
        check_recipe(Recipe(rewards=[RewardSpec("reward_model")], rl=Recipe().rl))
    with pytest.raises(ValueError, match="no path; give path=FOLDER"):
        reward_model([rollout("what is one plus one", "2")])


def test_missing_path_says_what_to_give(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"path '.*nowhere' is not a folder; give the folder .*reward_model"):
        reward_model([rollout("what is one plus one", "2")], path=str(tmp_path / "nowhere"))


def test_folder_without_a_model_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match="holds no saved model"):
        reward_model([rollout("what is one plus one", "2")], path=str(tmp_path))


def test_a_classifier_with_two_outputs_is_refused(tmp_path: Path, trained: tuple[Path, list[PreferencePair]]) -> None:
    config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=2, pad_token_id=0)
    Qwen2ForSequenceClassification(config).save_pretrained(tmp_path)
    load_reward_model(trained[0]).tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has 2 outputs; a reward model has one"):
        reward_model([rollout("what is one plus one", "2")], path=str(tmp_path))


def test_unknown_source_and_normalize_are_named(trained: tuple[Path, list[PreferencePair]]) -> None:
    path = str(trained[0])
    with pytest.raises(ValueError, match="source='speech' is not known"):
        reward_model([rollout("q", "a")], path=path, source="speech")
    with pytest.raises(ValueError, match="normalize='tanh' is not known"):
        reward_model([rollout("q", "a")], path=path, normalize="tanh")


def test_recipe_checks_the_reward_model_section() -> None:
    recipe = load_recipe(RECIPE, ["reward_model.hidden_size=30", "reward_model.heads=4", "reward_model.kinds=[rude]"], Recipe)
    with pytest.raises(ValueError) as info:
        check_recipe(recipe)
    assert "reward_model.hidden_size=30 must be a multiple of reward_model.heads=4" in str(info.value)
    assert "reward_model.kinds=['rude']" in str(info.value)


# --- the recipe, end to end ---------------------------------------------------------------------


def test_recipe_job_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    overrides = [f"reward_model.{k}={v}" for k, v in TINY.items()] + [
        "reward_model.steps=10", "reward_model.train_pairs=60", "reward_model.eval_pairs=30",
        f"run.output_dir={out}", "logging.wandb=false", "run.progress=false",
    ]
    assert main(["train", str(RECIPE), *overrides]) == 0
    summary = json.loads((out / "summary.json").read_text())
    held_out = summary["held_out"]
    assert set(held_out) == {"accuracy", "accuracy/on_topic", "accuracy/concise", "accuracy/polite"}
    assert 0.0 <= held_out["accuracy"] <= 1.0
    assert summary["held_out_pairs"] == 30 and summary["train_pairs"] == 60
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [5, 10] and all(r["stage"] == "reward_model" for r in rows)
    assert {"loss", "accuracy", "margin"} <= set(rows[0])
    assert load_reward_model(out / "reward_model").model.config.num_labels == 1
    assert "held-out pairwise accuracy" in capsys.readouterr().out
