"""Speech duration: how close the spoken answer's length is to a target.

The duration is read from the waveform the rollout worker rendered (`len(waveform) /
sample_rate`), so it measures what the model actually said aloud, whatever model made the
audio. The score is 1 at `target_s` seconds and falls linearly by 1 per `tolerance_s`
seconds away from it, to 0; a response with no speech scores 0. Useful to ask for short
(or unhurried) spoken answers, and as a reward any speech-out model can learn from its
waveform even before it can say words (the talker-only check in docs/models.md).
"""

from __future__ import annotations

from vocalign.data.types import Rollout
from vocalign.rewards.registry import reward


def duration_score(seconds: float, target_s: float, tolerance_s: float) -> float:
    return max(0.0, 1.0 - abs(seconds - target_s) / tolerance_s)


@reward("speech_duration")
def speech_duration(rollouts: list[Rollout], *, target_s: float = 1.0, tolerance_s: float = 1.0) -> list[float]:
    """1.0 when the speech lasts target_s seconds, falling linearly to 0 at tolerance_s away; 0 with no speech."""
    if not target_s > 0 or not tolerance_s > 0:
        raise ValueError(f"speech_duration reward: target_s={target_s!r} and tolerance_s={tolerance_s!r} must be "
                         "positive numbers of seconds, e.g. target_s: 1.0, tolerance_s: 1.0")
    return [duration_score(len(r.waveform) / r.sample_rate, target_s, tolerance_s)
            if r.waveform is not None and len(r.waveform) and r.sample_rate else 0.0 for r in rollouts]
