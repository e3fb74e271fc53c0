"""Typed records passed between the stages of an RL step.

Everything that crosses a stage boundary (data -> rollouts -> rewards -> rl) is one of
these dataclasses. `meta` holds the dataset row's reference fields (the expected
answer, the transcript, the requested speaking style, ...); it is the one place where
user-defined keys live.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

ROLES = ("system", "human", "assistant", "tool_json_schemas", "input")


@dataclass
class Audio:
    """A mono waveform, float32 in [-1, 1]."""

    waveform: np.ndarray
    sample_rate: int

    @property
    def seconds(self) -> float:
        return len(self.waveform) / float(self.sample_rate)


@dataclass
class Message:
    """One turn of a conversation. `audio` is spoken input for this turn, if any."""

    role: str
    content: str = ""
    audio: Audio | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"message role {self.role!r} is not known; use one of {', '.join(ROLES)}")


STYLE_LEVELS = {
    "rate": ("slow", "normal", "fast"),
    "pitch": ("low", "normal", "high"),
    "volume": ("soft", "normal", "loud"),
}


@dataclass(frozen=True)
class SpeechStyle:
    """How to speak: one named level per attribute (see STYLE_LEVELS)."""

    rate: str = "normal"
    pitch: str = "normal"
    volume: str = "normal"

    def __post_init__(self) -> None:
        for attr, levels in STYLE_LEVELS.items():
            if getattr(self, attr) not in levels:
                raise ValueError(
                    f"speech style {attr}={getattr(self, attr)!r} is not known; use one of {', '.join(levels)}"
                )


@dataclass
class Response:
    """A reference assistant turn, used as the SFT target.

    `speech` is what the assistant says aloud (inside <tts_start>...<tts_end>), spoken
    in `style`; None means a text-only answer. `codes`, when given, is the speech as the
    model's own audio tokens (indices into its audio vocabulary: Qwen2.5-Omni's codec
    codes), used as the target's speech instead of rendering `speech`.
    """

    text: str
    speech: str | None = None
    style: SpeechStyle = field(default_factory=SpeechStyle)
    think: str | None = None
    codes: list[int] | None = None


@dataclass
class Prompt:
    """A conversation to respond to, with the reference fields used to score responses."""

    id: str
    messages: list[Message]
    task: str = "custom"
    meta: dict[str, Any] = field(default_factory=dict)
    target: Response | None = None  # reference answer for SFT, when the row has one

    @property
    def audio(self) -> list[Audio]:
        return [m.audio for m in self.messages if m.audio is not None]


@dataclass
class Rollout:
    """One sampled response to a prompt, as produced by a rollout worker."""

    prompt: Prompt
    text: str  # the visible text answer (outside <think> and speech)
    think: str  # the content of <think>...</think>, "" when absent
    spoken_text: str  # the text tokens interleaved inside <tts_start>...<tts_end>
    audio_tokens: list[int]  # audio token ids inside <tts_start>...<tts_end>
    waveform: np.ndarray | None  # the rendered speech, None when the response has none
    sample_rate: int
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]  # per response token, under the sampling temperature
    weight_version: int = 0
    group: int = 0  # index of the prompt in its batch; samples of one prompt share it
    finished: bool = True  # False when max_new_tokens cut the response
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    # the whole response as the model wrote it, tags included ("<think>...</think>7<tts_start>...<|EOT|>")
    raw_text: str = ""
    think_tokens: int = 0  # policy tokens inside <think>...</think>
    # Multi-turn tool use (vocalign.rollouts.multiturn): response_ids then holds every
    # assistant turn and the tool results inserted between them. loss_mask is 1 per token
    # the policy generated and 0 per inserted token (whose logprob is 0.0); None means
    # every token is the policy's.
    loss_mask: list[int] | None = None
    tool_results: list[dict[str, Any]] = field(default_factory=list)  # {name, ok, text, turn, data} per call run
    voice: str | None = None  # the voice the speech was rendered in when a tool chose one (audio_search)

    @property
    def meta(self) -> dict[str, Any]:
        return self.prompt.meta

    @property
    def speech_seconds(self) -> float:
        if self.waveform is None:
            return 0.0
        return len(self.waveform) / float(self.sample_rate)
