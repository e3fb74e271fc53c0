"""The tokenizer of the embedded model, built offline, and the chat rendering around it.

The vocabulary is: a byte-level BPE over English text (trained at build time on a
small built-in corpus, so any text can be encoded), the chat special tokens of
`vocalign.model.chat`, and one token per audio unit of the speech detokenizer
(`<audio_0>` ... `<audio_{n-1}>`, a contiguous id range). It is saved with the model as
a standard `tokenizer.json`, so `from_pretrained` needs nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vocalign.data.types import Message, Response

from . import chat
from .chat import ParsedResponse

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety hundred thousand".split()
_WORDS = """
what is plus minus times divided by the answer say it slowly quickly fast slow in a high low voice loudly softly
loud soft quietly normal normally speaker talking speaking pitch rate volume speed female male man woman transcribe
audio clip please question how many much are you this that of and or to for with on at from as be was were has have
do does did not no yes can will would should could about which who when where why number numbers time o'clock
morning evening afternoon night today tomorrow yesterday red green blue yellow black white orange purple colour color
cat dog bird house car tree water book sun moon day week month year hello thank thanks good great bad right wrong left
i we they he she me us them my your our their first second third last next one's point percent dollars cents
"""


def _corpus() -> list[str]:
    words = _ONES + _TENS + _WORDS.split()
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    lines += [f"what is {a} plus {b}" for a in _ONES[:10] for b in _ONES[:10]]
    lines += [f"{i} {i * 7} {i * 13} {i}.5 ${i}.25 {i}:30" for i in range(0, 120)]
    lines += ["The Quick Brown Fox Jumps Over The Lazy Dog. (A, B, C?) [x] {y} 'z' \"w\" - ! ; # % & * / \\ @ ^ _ ` | ~ < > ="]
    return lines


def build_tokenizer(n_audio_tokens: int, text_vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Build the embedded tokenizer offline: byte-level BPE + chat specials + audio tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=text_vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=chat.SPECIAL_TOKENS,
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token=chat.PAD, eos_token=chat.EOT, bos_token=chat.BOT,
        additional_special_tokens=chat.SPECIAL_TOKENS[3:],
    )
    tok.add_tokens([chat.audio_token(k) for k in range(n_audio_tokens)], special_tokens=True)
    return tok


class ChatTokenizer:
    """Renders conversations and assistant turns to ids, and parses generated ids back.

    Works on any `transformers` tokenizer whose vocabulary holds the chat special tokens
    and a contiguous range of `<audio_k>` tokens.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast, interleave_ratio: Sequence[int] = (1, 4)) -> None:
        self.hf = tokenizer
        self.interleave_ratio = (int(interleave_ratio[0]), int(interleave_ratio[1]))
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in chat.SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise ValueError(f"tokenizer lacks the chat special tokens {missing}; build it with build_tokenizer()")
        self.special = ids
        self.pad_id, self.eot_id = ids[chat.PAD], ids[chat.EOT]
        audio = [(int(m.group(1)), i) for t, i in tokenizer.get_added_vocab().items() if (m := re.fullmatch(r"<audio_(\d+)>", t))]
        self.n_audio = len(audio)
        self.audio_offset = min(i for _, i in audio) if audio else len(tokenizer)
        if audio and sorted(audio) != [(k, self.audio_offset + k) for k in range(self.n_audio)]:
            raise ValueError("the tokenizer's <audio_k> tokens are not a contiguous id range in order")

    def __len__(self) -> int:
        return len(self.hf)

    # -- ids -------------------------------------------------------------------------
    def text_ids(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False) if text else []

    def is_audio(self, token_id: int) -> bool:
        return self.audio_offset <= token_id < self.audio_offset + self.n_audio

    def audio_ids(self, units: Sequence[int]) -> list[int]:
        return [self.audio_offset + u for u in units]

    # -- rendering -------------------------------------------------------------------
    def render_prompt(self, messages: Sequence[Message], audio_lengths: Sequence[int]) -> list[int]:
        """Ids of a conversation up to the assistant's turn.

        `audio_lengths[i]` is how many <audio_patch> placeholders the i-th audio clip
        takes (its number of adaptor frames).
        """
        clips = iter(audio_lengths)
        ids: list[int] = []
        for m in messages:
            ids += [self.special[chat.BOT]] + self.text_ids(f"{m.role}\n{m.content}")
            if m.audio is not None:
                n = next(clips)
                ids += [self.special[chat.AUDIO_START]] + [self.special[chat.AUDIO_PATCH]] * n + [self.special[chat.AUDIO_END]]
            ids.append(self.eot_id)
        return ids + [self.special[chat.BOT]] + self.text_ids("assistant\n")

    def render_response(self, response: Response, units: Sequence[int] = ()) -> list[int]:
        """Ids of an assistant turn. `units` are the speech's audio units (detokenizer ids)."""
        ids: list[int] = []
        if response.think is not None:
            ids += [self.special[chat.THINK_START]] + self.text_ids(response.think) + [self.special[chat.THINK_END]]
        ids += self.text_ids(response.text)
        if response.speech is not None:
            spoken = chat.interleave(
                self.text_ids(response.speech), self.audio_ids(units), self.special[chat.TTS_PAD], self.interleave_ratio
            )
            ids += [self.special[chat.TTS_START]] + spoken + [self.special[chat.TTS_END]]
        return ids + [self.eot_id]

    # -- parsing ---------------------------------------------------------------------
    def decode_raw(self, ids: Sequence[int]) -> str:
        """The response as text with every tag kept (<think>, <tts_start>, <audio_k>, <|EOT|>, ...)."""
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def parse_response(self, ids: Sequence[int]) -> ParsedResponse:
        """Split generated ids into think / text / spoken text / audio units / tool calls."""
        ids = list(ids)
        finished = self.eot_id in ids
        if finished:
            ids = ids[: ids.index(self.eot_id)]
        sp = self.special
        section = "text"
        parts: dict[str, list[int]] = {"think": [], "text": [], "spoken": [], "tool": []}
        audio: list[int] = []
        tools: list[list[int]] = []
        for i in ids:
            if i == sp[chat.THINK_START]:
                section = "think"
            elif i == sp[chat.THINK_END] or i == sp[chat.TTS_END]:
                section = "text"
            elif i == sp[chat.TTS_START]:
                section = "spoken"
            elif i == sp[chat.TOOL_CALL_START]:
                section, parts["tool"] = "tool", []
            elif i == sp[chat.TOOL_CALL_END]:
                tools.append(parts["tool"])
                section = "text"
            elif self.is_audio(i):
                if section == "spoken":
                    audio.append(i - self.audio_offset)
            elif i in (sp[chat.TTS_PAD], self.pad_id):
                continue
            else:
                parts[section].append(i)

        def dec(x: list[int]) -> str:
            return self.hf.decode(x, skip_special_tokens=True).strip()

        return ParsedResponse(
            think=dec(parts["think"]), text=dec(parts["text"]), spoken_text=dec(parts["spoken"]),
            audio_ids=audio, tool_calls=[dec(t) for t in tools], finished=finished,
            think_tokens=len(parts["think"]),
        )

