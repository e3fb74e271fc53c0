"""Think length: is the reasoning there, and short enough?

Step-Audio 2's first PPO stage rewards a response whose thinking is non-empty and under
a length limit (arXiv 2507.16632), so that the model keeps reasoning but stops rambling
before it speaks. The limit is counted without the policy's tokenizer, on the decoded
`Rollout.think`, in one of two units:
- `words`: runs of non-space characters ("three plus four" is 3);
- `chars`: characters of the text with its outer whitespace stripped ("three plus four" is 15).
For English BPE vocabularies a token is roughly 4 characters or 0.75 words (OpenAI's
rule of thumb for its tokenizers), so a budget of T tokens is about 0.75*T words or 4*T
characters.

A think block the model opened but never closed (the response was cut inside it, seen
in `Rollout.raw_text`) scores 0: the thinking did not end, whatever its length so far.
"""

from __future__ import annotations

from vocalign.data.types import Rollout
from vocalign.rewards.registry import reward

UNITS = ("words", "chars")


def think_length_score(length: int, max_length: int, graded: bool = False) -> float:
    """The score of a thinking `length` units long under a limit of `max_length`.

    0 when empty; 1 up to `max_length`; above it 0 (binary), or with `graded` a linear
    decay from 1 at `max_length` to 0 at 2*max_length: (2*max_length - length) / max_length,
    and 0 beyond.
    """
    if length <= 0:
        return 0.0
    if length <= max_length:
        return 1.0
    if not graded:
        return 0.0
    return max(0.0, (2 * max_length - length) / max_length)


def think_size(think: str, unit: str = "words") -> int:
    """The length of `think` in `unit` (see the module doc)."""
    return len(think.split()) if unit == "words" else len(think.strip())


@reward("think_length")
def think_length(
    rollouts: list[Rollout], *, max_length: int = 200, unit: str = "words", graded: bool = False
) -> list[float | None]:
    """1.0 when the thinking is non-empty and at most max_length units long, else 0.0 (Step-Audio 2's PPO stage 1).

    `unit` is `words` (whitespace-separated) or `chars`. `graded=True` decays linearly
    from 1 at max_length to 0 at 2*max_length instead of dropping to 0. A think block
    cut off before `</think>` scores 0.
    """
    _check_params(max_length, unit)
    return [
        0.0 if _cut_inside_think(r.raw_text) else think_length_score(think_size(r.think, unit), max_length, graded)
        for r in rollouts
    ]


def _cut_inside_think(raw_text: str) -> bool:
    """Whether the last <think> of the response is never closed."""
    opened = raw_text.rfind("<think>")
    return opened >= 0 and "</think>" not in raw_text[opened:]


def _check_params(max_length: int, unit: str) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(
            f"think_length reward: max_length={max_length!r} must be a positive integer (the longest "
            "thinking that scores 1, in `unit`s), e.g. 200"
        )
    if unit not in UNITS:
        raise ValueError(f"think_length reward: unit={unit!r} is not known; use one of {', '.join(UNITS)}")
