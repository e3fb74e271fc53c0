"""Training the learned preference reward model (served by `vocalign.rewards.reward_model`).

A small Qwen2-architecture sequence classifier, trained from scratch with TRL's
`RewardTrainer` (Bradley-Terry loss) on synthetic preference pairs
(`vocalign.rewards.training.preference_data`), and its held-out pairwise accuracy.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vocalign.rewards.reward_model import LoadedRewardModel, library_progress_bars_off, reward_model_prompt

from .preference_data import DEFAULT_KINDS, PAIR_KINDS, PreferencePair

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

@dataclass
class RewardModelConfig:
    """The size of the reward model, how it is trained, and the synthetic pairs it learns from."""

    train_pairs: int = 4000  # synthetic preference pairs to train on
    eval_pairs: int = 400  # held-out pairs (another seed, no training triple repeated)
    kinds: list[str] = field(default_factory=lambda: list(DEFAULT_KINDS))  # see preference_data.PAIR_KINDS
    max_operand: int = 9  # arithmetic operands in 0..max_operand
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    steps: int = 120
    batch_size: int = 32  # pairs per optimiser step
    lr: float = 2e-3
    warmup_steps: int = 30
    # Pulls the scores of each batch towards 0, so sigmoid(score) reads as "better than a typical response".
    center_rewards_coefficient: float = 0.01
    logging_steps: int = 20
    # a staged recipe's reward_model stage (a reward model that hears, from the policy; the
    # size keys above do not apply): the spoken arithmetic questions' task params (voices,
    # noise, ...), and how many of them the policy answers `samples_per_question` times to
    # make `samples` pairs (a right answer it sampled over a wrong one); held-out questions
    # get the same share
    questions: dict[str, Any] = field(default_factory=dict)
    policy_samples: int = 0
    samples_per_question: int = 4


def reward_model_problems(config: RewardModelConfig) -> list[str]:
    """What is wrong with `config` (a recipe's `reward_model` section), as one line per problem."""
    problems = [
        f"reward_model.{name}={getattr(config, name)} must be at least 1"
        for name in ("train_pairs", "eval_pairs", "max_operand", "hidden_size", "layers", "heads", "steps", "batch_size",
                     "logging_steps", "samples_per_question")
        if getattr(config, name) < 1
    ]
    if config.policy_samples < 0:
        problems.append(f"reward_model.policy_samples={config.policy_samples} must be >= 0")
    if config.heads >= 1 and config.hidden_size % config.heads:
        problems.append(f"reward_model.hidden_size={config.hidden_size} must be a multiple of reward_model.heads={config.heads}")
    unknown = [k for k in config.kinds if k not in PAIR_KINDS]
    if unknown or not config.kinds:
        problems.append(f"reward_model.kinds={list(config.kinds)}: use a non-empty list of {', '.join(PAIR_KINDS)}")
    return problems


@dataclass
class TrainedRewardModel:
    """Where a trained reward model was saved, and what training took."""

    path: Path
    parameters: int
    steps: int
    seconds: float
    final_loss: float


# --- training --------------------------------------------------------------------------


def build_reward_model(config: RewardModelConfig, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A randomly initialised Qwen2 sequence classifier with one output, and the project's tokenizer (text only)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from vocalign.model.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(n_audio_tokens=0)
    torch.manual_seed(seed)
    model_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=4 * config.hidden_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        max_position_embeddings=256,
        num_labels=1,
        # The classifier reads the last token that is not padding: it must know the pad id.
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        use_cache=False,
    )
    return Qwen2ForSequenceClassification(model_config), tokenizer


def preference_dataset(pairs: Sequence[PreferencePair]) -> Dataset:
    """The pairs as TRL's preference columns: `prompt`, `chosen`, `rejected` (text; TRL adds the <|EOT|>)."""
    from datasets import Dataset

    return Dataset.from_dict({
        "prompt": [reward_model_prompt(p.question) for p in pairs],
        "chosen": [p.chosen for p in pairs],
        "rejected": [p.rejected for p in pairs],
    })


def train_reward_model(
    pairs: Sequence[PreferencePair],
    output_dir: str | Path,
    config: RewardModelConfig,
    seed: int,
    *,
    progress: bool = True,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainedRewardModel:
    """Train a reward model on `pairs` with TRL's RewardTrainer (CPU) and save it with its tokenizer to `output_dir`.

    `on_log(step, metrics)` receives the trainer's metrics every `config.logging_steps`
    steps (loss, accuracy and margin on the training batches, learning rate, ...).
    """
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import RewardConfig, RewardTrainer

    if not pairs:
        raise ValueError("train_reward_model: no preference pairs to train on")
    model, tokenizer = build_reward_model(config, seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:  # the Trainer wants a folder; nothing in it is kept
        args = RewardConfig(
            output_dir=scratch,
            max_steps=config.steps,
            per_device_train_batch_size=config.batch_size,
            learning_rate=config.lr,
            warmup_steps=config.warmup_steps,
            lr_scheduler_type="cosine",
            logging_steps=config.logging_steps,
            center_rewards_coefficient=config.center_rewards_coefficient or None,
            activation_checkpointing=False,  # TRL turns it on by default; on a model this small it only costs time
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            bf16=False,
            fp16=False,
            seed=seed,
            data_seed=seed,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        with library_progress_bars_off():
            trainer = RewardTrainer(model=model, args=args, train_dataset=preference_dataset(pairs), processing_class=tokenizer)
        log = _progress_and_log(config.steps, progress, on_log)
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(log)
        trainer.train()
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    with library_progress_bars_off():
        model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return TrainedRewardModel(
        path=path,
        parameters=sum(p.numel() for p in model.parameters()),
        steps=config.steps,
        seconds=time.perf_counter() - started,
        final_loss=log.last_loss,
    )


def _progress_and_log(steps: int, progress: bool, on_log: Callable[[int, dict[str, float]], None] | None) -> Any:
    """A Trainer callback: a progress bar with the latest loss and accuracy, and the metrics passed to `on_log`."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class ProgressAndLog(TrainerCallback):
        def __init__(self) -> None:
            self.bar = tqdm(total=steps, desc="reward model", disable=not progress, dynamic_ncols=True)
            self.last_loss = math.nan

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201 (the Trainer's signature)
            self.bar.update(1)

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN201
            metrics = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, int | float) and not isinstance(v, bool)}
            if "loss" in metrics and "accuracy" in metrics:  # a training-step row, not the end-of-training summary
                self.last_loss = metrics["loss"]
                self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.2f}")
                if on_log is not None:
                    on_log(state.global_step, metrics)

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            self.bar.close()

    return ProgressAndLog()


# --- loading and scoring -----------------------------------------------------------------


def pairwise_accuracy(
    model: LoadedRewardModel, pairs: Sequence[PreferencePair], batch_size: int = 256
) -> dict[str, float]:
    """The fraction of pairs whose chosen response outscores the rejected one: `accuracy` and `accuracy/<kind>`."""
    if not pairs:
        raise ValueError("pairwise_accuracy: no pairs to evaluate")
    wins = []
    for i in range(0, len(pairs), batch_size):
        part = pairs[i : i + batch_size]
        questions = [p.question for p in part]
        chosen = model.score(questions, [p.chosen for p in part])
        rejected = model.score(questions, [p.rejected for p in part])
        wins += [c > r for c, r in zip(chosen, rejected)]
    result = {"accuracy": float(np.mean(wins))}
    for kind in dict.fromkeys(p.kind for p in pairs):
        result[f"accuracy/{kind}"] = float(np.mean([w for w, p in zip(wins, pairs) if p.kind == kind]))
    return result
