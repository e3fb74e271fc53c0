"""A learned preference reward model: trained with TRL's RewardTrainer, served as the `reward_model` reward.

Training (`train_reward_model`) fits a small sequence-classification transformer (a
Qwen2 built from a config, one output) to chosen/rejected pairs with the Bradley-Terry
loss -log sigmoid(r_chosen - r_rejected), on CPU, with no downloads. The model and its
tokenizer are saved to one folder, which `load_reward_model` (or any
`AutoModelForSequenceClassification.from_pretrained`) reads without this code.

The text a score is computed from is the question in the project's chat format followed
by the response and the end-of-turn token (`reward_model_text`): the same string in
training and in serving, so the scores mean the same thing in both.

Serving: the `reward_model` reward scores a batch of rollouts in one padded forward
pass; each saved folder is loaded once per process. Spoken responses are scored through
their transcripts (`source="transcript"`, or `"auto"` when a rollout has speech).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vocalign.data.types import Rollout
from vocalign.model import chat

from .training.preference_data import DEFAULT_KINDS, PAIR_KINDS, PreferencePair
from .registry import reward

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# torch, transformers, datasets and trl are imported inside the functions that use them:
# together they take seconds to import, and `import vocalign.rewards` should stay instant.

SOURCES = ("auto", "text", "spoken_text", "transcript")
NORMALIZATIONS = ("sigmoid", "raw")


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


def reward_model_problems(config: RewardModelConfig) -> list[str]:
    """What is wrong with `config` (a recipe's `reward_model` section), as one line per problem."""
    problems = [
        f"reward_model.{name}={getattr(config, name)} must be at least 1"
        for name in ("train_pairs", "eval_pairs", "max_operand", "hidden_size", "layers", "heads", "steps", "batch_size", "logging_steps")
        if getattr(config, name) < 1
    ]
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


# --- the text a score is computed from -------------------------------------------------


def reward_param_problems(name: str, params: dict) -> list[str]:
    """Files a recipe's reward params name that are not there (checked before a run starts):
    the `reward_model` reward's `path`, the paralinguistic classifier's local `classifier_path`."""
    problems = []
    if name == "reward_model" and params.get("path") is not None and not Path(str(params["path"])).is_dir():
        problems.append(f"reward reward_model: path={params['path']} is not a folder; give the reward model a run saved "
                        f"(RUN/reward_model, from a `kind: reward_model` recipe)")
    classifier = params.get("classifier_path") if name == "paralinguistic" else None
    if classifier and str(classifier).startswith((".", "/", "~")) and not Path(str(classifier)).expanduser().exists():
        problems.append(f"reward paralinguistic: classifier_path={classifier} does not exist")
    return problems


def reward_model_text(question: str, response: str) -> str:
    """The question as a human turn and the response as the assistant's, ended by <|EOT|>."""
    return f"{reward_model_prompt(question)}{response}{chat.EOT}"


def reward_model_prompt(question: str) -> str:
    return f"{chat.BOT}human\n{question}{chat.EOT}{chat.BOT}assistant\n"


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
        with _library_progress_bars_off():
            trainer = RewardTrainer(model=model, args=args, train_dataset=preference_dataset(pairs), processing_class=tokenizer)
        log = _progress_and_log(config.steps, progress, on_log)
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(log)
        trainer.train()
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    with _library_progress_bars_off():
        model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return TrainedRewardModel(
        path=path,
        parameters=sum(p.numel() for p in model.parameters()),
        steps=config.steps,
        seconds=time.perf_counter() - started,
        final_loss=log.last_loss,
    )


@contextmanager
def _library_progress_bars_off() -> Iterator[None]:
    """Hide the bars `datasets` and `transformers` draw for tokenizing, saving and loading:
    they take a fraction of a second here and would bury the training bar."""
    from datasets.utils import logging as datasets_logging
    from transformers.utils import logging as transformers_logging

    datasets_on = datasets_logging.is_progress_bar_enabled()
    transformers_on = transformers_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_on:
            datasets_logging.enable_progress_bar()
        if transformers_on:
            transformers_logging.enable_progress_bar()


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


@dataclass
class LoadedRewardModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase

    def score(self, questions: Sequence[str], responses: Sequence[str]) -> list[float]:
        """Raw scores (logits) of the responses to the questions, in one padded forward pass."""
        if len(questions) != len(responses):
            raise ValueError(f"score: {len(questions)} questions for {len(responses)} responses; give one each")
        if not responses:
            return []
        import torch

        texts = [reward_model_text(q, r) for q, r in zip(questions, responses)]
        # Right padding, as in training; the classifier reads each row's last token that is not padding.
        batch = self.tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
        with torch.no_grad():
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits[:, 0].float().tolist()


_LOADED: dict[tuple[str, int], LoadedRewardModel] = {}


def load_reward_model(path: str | Path) -> LoadedRewardModel:
    """The reward model saved in folder `path`, loaded once per process (reloaded if the folder's weights change)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ValueError(
            f"reward_model: path {str(path)!r} is not a folder; give the folder a reward-model run saved "
            "(runs/<run>/reward_model, made by `vocalign train recipes/reward_model.yaml`)"
        )
    weights = [f for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).is_file()]
    if not (folder / "config.json").is_file() or not weights:
        raise ValueError(
            f"reward_model: folder {str(path)!r} holds no saved model (config.json and model.safetensors); "
            "give the folder a reward-model run saved (runs/<run>/reward_model)"
        )
    key = (str(folder.resolve()), (folder / weights[0]).stat().st_mtime_ns)
    if key not in _LOADED:
        _LOADED[key] = _load(folder)
    return _LOADED[key]


def _load(folder: Path) -> LoadedRewardModel:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        with _library_progress_bars_off():
            model = AutoModelForSequenceClassification.from_pretrained(folder)
            tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"reward_model: folder {str(folder)!r} cannot be loaded as a sequence-classification model with its "
            f"tokenizer ({error}); save both there with save_pretrained"
        ) from error
    if model.config.num_labels != 1:
        raise ValueError(
            f"reward_model: the model in {str(folder)!r} has {model.config.num_labels} outputs; a reward model "
            "has one (num_labels=1)"
        )
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id != model.config.pad_token_id:
        raise ValueError(
            f"reward_model: in {str(folder)!r} the tokenizer's pad id ({tokenizer.pad_token_id}) differs from the "
            f"model's ({model.config.pad_token_id}); batched scores would read padding. Save the tokenizer it was trained with"
        )
    model.eval()
    return LoadedRewardModel(model, tokenizer)


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


# --- the reward ------------------------------------------------------------------------


@reward("reward_model")
def reward_model(
    rollouts: list[Rollout],
    *,
    path: str,
    source: str = "auto",
    asr: str = "embedded",
    normalize: str = "sigmoid",
) -> list[float | None]:
    """A learned preference score of the response to the question; sigmoid(score) in (0, 1) by default.

    `path`: a folder saved by `train_reward_model` (a reward_model recipe's
    runs/<run>/reward_model). `source`: what is scored: "text", "spoken_text", "transcript"
    (the speech transcribed by the `asr` recognizer; None without speech) or "auto" (the
    transcript when the rollout has speech, else the text). `normalize`: "sigmoid" (the
    probability that the response is preferred to a response scored 0, about a typical
    one since training centres scores on 0) or "raw" (the score itself).
    """
    if source not in SOURCES:
        raise ValueError(f"reward_model: source={source!r} is not known; use one of {', '.join(SOURCES)}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"reward_model: normalize={normalize!r} is not known; use one of {', '.join(NORMALIZATIONS)}")
    model = load_reward_model(path)
    responses = _responses(rollouts, source, asr)
    scored = [i for i, text in enumerate(responses) if text is not None]
    raw = model.score([_question(rollouts[i]) for i in scored], [responses[i] for i in scored])
    scores: list[float | None] = [None] * len(rollouts)
    for i, value in zip(scored, raw):
        scores[i] = 1.0 / (1.0 + math.exp(-value)) if normalize == "sigmoid" else value
    return scores


def _question(rollout: Rollout) -> str:
    """meta["question"] when the dataset gives it (spoken questions), else the last human turn's text."""
    question = rollout.meta.get("question")
    if question:
        return str(question)
    human = [m.content for m in rollout.prompt.messages if m.role == "human"]
    return human[-1] if human else ""


def _responses(rollouts: Sequence[Rollout], source: str, asr: str) -> list[str | None]:
    """The text to score per rollout; None where `source` asks for a transcript and there is no speech."""
    if source == "text":
        return [r.text for r in rollouts]
    if source == "spoken_text":
        return [r.spoken_text for r in rollouts]
    spoken = [i for i, r in enumerate(rollouts) if r.waveform is not None]
    transcripts = _transcribe([rollouts[i] for i in spoken], asr)
    heard = dict(zip(spoken, transcripts))
    fallback = (lambda r: r.text) if source == "auto" else (lambda r: None)
    return [heard[i] if i in heard else fallback(r) for i, r in enumerate(rollouts)]


def _transcribe(rollouts: Sequence[Rollout], asr: str) -> list[str]:
    """Transcripts of the rollouts' speech, one recognizer call per sample rate."""
    if not rollouts:
        return []
    from vocalign.rewards.asr import get_asr  # the recognizer loads only when speech is scored

    recognizer = get_asr(asr)
    out: list[str] = [""] * len(rollouts)
    for rate in sorted({r.sample_rate for r in rollouts}):
        idx = [i for i, r in enumerate(rollouts) if r.sample_rate == rate]
        for i, text in zip(idx, recognizer.transcribe([np.asarray(rollouts[i].waveform) for i in idx], rate)):
            out[i] = text
    return out
