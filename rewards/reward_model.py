"""A learned preference reward model, served as the `reward_model` reward.

Training (`vocalign.rewards.training.reward_model.train_reward_model`) fits a small sequence-classification transformer (a
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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vocalign.data.types import Rollout
from vocalign.model import chat

from .registry import reward

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# torch, transformers, datasets and trl are imported inside the functions that use them:
# together they take seconds to import, and `import vocalign.rewards` should stay instant.

SOURCES = ("auto", "text", "spoken_text", "transcript")
NORMALIZATIONS = ("sigmoid", "raw")


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
        import torch

        with torch.random.fork_rng(devices=[]):  # loading draws no random numbers from the run (exact resume)
            _LOADED[key] = _load(folder)
    return _LOADED[key]


@contextmanager
def library_progress_bars_off() -> Iterator[None]:
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


def _load(folder: Path) -> LoadedRewardModel:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        with library_progress_bars_off():
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


# --- the reward ------------------------------------------------------------------------


@reward("reward_model")
def reward_model(
    rollouts: list[Rollout],
    *,
    path: str | None = None,
    stage: str | None = None,
    source: str = "auto",
    asr: str = "embedded",
    normalize: str = "sigmoid",
) -> list[float | None]:
    """A learned preference score of the response to the question; sigmoid(score) in (0, 1) by default.

    `path`: a folder saved by `train_reward_model` (a reward_model recipe's
    runs/<run>/reward_model), or by a staged recipe's `reward_model` stage (a reward model
    that hears the question: `vocalign.rewards.hearing_reward_model`); in a staged recipe
    `stage` names that stage instead, and the run fills in its folder. `source`: what is scored: "text", "spoken_text", "transcript"
    (the speech transcribed by the `asr` recognizer; None without speech) or "auto" (the
    transcript when the rollout has speech, else the text). `normalize`: "sigmoid" (the
    probability that the response is preferred to a response scored 0, about a typical
    one since training centres scores on 0) or "raw" (the score itself).
    """
    if source not in SOURCES:
        raise ValueError(f"reward_model: source={source!r} is not known; use one of {', '.join(SOURCES)}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"reward_model: normalize={normalize!r} is not known; use one of {', '.join(NORMALIZATIONS)}")
    if path is None:
        raise ValueError(f"reward_model: no path; give path=FOLDER (a saved reward model)"
                         + (f", or run the staged recipe that trains stage {stage!r}" if stage else ""))
    responses = _responses(rollouts, source, asr)
    scored = [i for i, text in enumerate(responses) if text is not None]
    from .hearing_reward_model import is_hearing_reward_model, load_hearing_reward_model

    if is_hearing_reward_model(path):  # it hears the question: the prompt itself, audio included
        raw = load_hearing_reward_model(path).score([rollouts[i].prompt for i in scored], [responses[i] for i in scored])
    else:
        raw = load_reward_model(path).score([_question(rollouts[i]) for i in scored], [responses[i] for i in scored])
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
    from vocalign.rewards.asr import transcribe_rollouts  # the recognizer loads only when speech is scored

    heard = transcribe_rollouts(rollouts, asr) if any(r.waveform is not None for r in rollouts) else []
    fallback = (lambda r: r.text) if source == "auto" else (lambda r: None)
    return [(heard[i] or "") if r.waveform is not None else fallback(r) for i, r in enumerate(rollouts)]
