"""Think length: is the reasoning there, and short enough?

Step-Audio 2's first PPO stage rewards a response whose thinking is non-empty and under
a length limit (arXiv 2507.16632), so that the model keeps reasoning but stops rambling
before it speaks. The limit is counted in one of three units:
- `tokens` (default): the policy's own tokens inside <think>...</think>, as the rollout
  worker counted them (`Rollout.think_tokens`);
- `words`: runs of non-space characters of the decoded `Rollout.think` ("three plus four" is 3);
- `chars`: its characters with the outer whitespace stripped ("three plus four" is 15).
Words and characters need no tokenizer (rollouts from elsewhere); for English BPE
vocabularies a token is roughly 4 characters or 0.75 words (OpenAI's rule of thumb for
its tokenizers).

A think block the model opened but never closed (the response was cut inside it, seen
in `Rollout.raw_text`) scores 0: the thinking did not end, whatever its length so far.
"""

from __future__ import annotations

from vocalign.data.types import Rollout
from vocalign.rewards.registry import reward

UNITS = ("tokens", "words", "chars")


def think_length_score(length: int, max_tokens: int, graded: bool = False) -> float:
    """The score of a thinking `length` units long under a limit of `max_tokens`.

    0 when empty; 1 up to `max_tokens`; above it 0 (binary), or with `graded` a linear
    decay from 1 at `max_tokens` to 0 at 2*max_tokens: (2*max_tokens - length) / max_tokens,
    and 0 beyond.
    """
    if length <= 0:
        return 0.0
    if length <= max_tokens:
        return 1.0
    if not graded:
        return 0.0
    return max(0.0, (2 * max_tokens - length) / max_tokens)


def think_size(rollout: Rollout, unit: str = "tokens") -> int:
    """The length of the rollout's thinking in `unit` (see the module doc)."""
    if unit == "tokens":
        if rollout.think.strip() and not rollout.think_tokens:
            raise ValueError(
                f"think_length reward: prompt {rollout.prompt.id!r} has thinking but Rollout.think_tokens is 0; "
                "rollouts not made by a vocalign rollout worker must set think_tokens, or use unit: words"
            )
        return rollout.think_tokens
    return len(rollout.think.split()) if unit == "words" else len(rollout.think.strip())


@reward("think_length")
def think_length(
    rollouts: list[Rollout], *, max_tokens: int = 200, unit: str = "tokens", graded: bool = False
) -> list[float | None]:
    """1.0 when the thinking is non-empty and at most max_tokens long, else 0.0 (Step-Audio 2's PPO stage 1).

    `unit` is `tokens` (the policy's), `words` (whitespace-separated) or `chars`.
    `graded=True` decays linearly from 1 at max_tokens to 0 at 2*max_tokens instead of
    dropping to 0. A think block cut off before `</think>` scores 0.
    """
    _check_params(max_tokens, unit)
    return [
        0.0 if _cut_inside_think(r.raw_text) else think_length_score(think_size(r, unit), max_tokens, graded)
        for r in rollouts
    ]


def _cut_inside_think(raw_text: str) -> bool:
    """Whether the last <think> of the response is never closed."""
    opened = raw_text.rfind("<think>")
    return opened >= 0 and "</think>" not in raw_text[opened:]


def _check_params(max_tokens: int, unit: str) -> None:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(
            f"think_length reward: max_tokens={max_tokens!r} must be a positive integer (the longest "
            "thinking that scores 1, in `unit`s), e.g. 200"
        )
    if unit not in UNITS:
        raise ValueError(f"think_length reward: unit={unit!r} is not known; use one of {', '.join(UNITS)}")
