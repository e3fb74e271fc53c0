"""Step-Audio 2's chat format, its special tokens and text/audio interleaving.

A conversation is rendered as

    <|BOT|>system\\n{text}<|EOT|><|BOT|>human\\n{text}<audio_start><audio_patch>*N<audio_end><|EOT|>
    <|BOT|>assistant\\n

and an assistant turn as

    [<think>{reasoning}</think>]{text}[<tts_start>{text and audio tokens interleaved}<tts_end>]<|EOT|>

Speech output interleaves the text being spoken with its audio tokens at a fixed ratio
(1 text token : 4 audio tokens by default); when the text runs out first the text slot
holds <tts_pad>. Tool calls are `<tool_call>function\\n{name}\\n{json}</tool_call>`; their
results come back as a turn of role `input`.
"""

from __future__ import annotations

from dataclasses import dataclass

BOT, EOT = "<|BOT|>", "<|EOT|>"
AUDIO_START, AUDIO_PATCH, AUDIO_END = "<audio_start>", "<audio_patch>", "<audio_end>"
THINK_START, THINK_END = "<think>", "</think>"
TTS_START, TTS_END, TTS_PAD = "<tts_start>", "<tts_end>", "<tts_pad>"
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
PAD = "<|pad|>"

SPECIAL_TOKENS = [
    PAD, BOT, EOT, AUDIO_START, AUDIO_PATCH, AUDIO_END, THINK_START, THINK_END,
    TTS_START, TTS_END, TTS_PAD, TOOL_CALL_START, TOOL_CALL_END,
]


def audio_token(k: int) -> str:
    """The vocabulary entry of audio token k (the detokenizer's unit k)."""
    return f"<audio_{k}>"


def interleave(text_ids: list[int], audio_ids: list[int], pad_id: int, ratio: tuple[int, int] = (1, 4)) -> list[int]:
    """Interleave text and audio token ids: `ratio[0]` text then `ratio[1]` audio, repeated.

    When the audio runs out the remaining text follows in its slots; when the text runs
    out its slots hold `pad_id` until the audio is done.
    """
    n_text, n_audio = ratio
    if n_text < 1 or n_audio < 1:
        raise ValueError(f"interleave ratio {ratio} must be two positive integers (text, audio), e.g. (1, 4)")
    out: list[int] = []
    t = a = 0
    while t < len(text_ids) or a < len(audio_ids):
        chunk = text_ids[t : t + n_text]
        t += len(chunk)
        if a < len(audio_ids):
            chunk = chunk + [pad_id] * (n_text - len(chunk))
        out.extend(chunk)
        out.extend(audio_ids[a : a + n_audio])
        a += n_audio
    return out


@dataclass
class ParsedResponse:
    """An assistant turn split into its parts (token-level, before detokenization)."""

    think: str
    text: str
    spoken_text: str
    audio_ids: list[int]  # indices into the detokenizer's units (not vocabulary ids)
    tool_calls: list[str]
    finished: bool  # True when the turn ended with <|EOT|>
    think_tokens: int = 0  # tokens inside <think>...</think>
