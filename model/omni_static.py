"""Qwen2.5-Omni's thinker and talker on the static decoder (`StaticDecoder`): the same
fixed-shape step, CUDA graphs on CUDA, that samples the Qwen2-family policies.

Both are Qwen2-style decoders with multimodal rotary embedding (mRoPE). A generated token's
three position streams are equal, and mRoPE with equal streams is the plain rotary
embedding, so after the prompt the decoder's position table serves them. The prompt itself
(audio positions differ per stream) runs through `transformers` once, as before, and its
keys and values are copied into the static cache:

- the thinker's step records its final hidden state plus its input embedding, what the
  talker reads of each text token (`record`);
- the talker's step adds to its code's embedding the reply row of that step (`extra`:
  the thinker's states, then the text-eos and text-pad embeddings), runs it through
  `thinker_to_talker_proj` (`input_proj`), and never samples the codes token2wav cannot
  render (`allowed`).

`OmniSpeech.decode_engine` (the recipe's `rollouts.engine`) chooses: `auto` the static
decoder on CUDA and `transformers` elsewhere, `static` the static decoder, `hf`
`transformers`; `fast` is refused (the fast decoder is the static decoder's CPU-side
cousin and does not run Omni's two streams).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .sampling import Sampling
from .static_decoder import Parts, StaticDecoder

_DECODERS: "weakref.WeakKeyDictionary[nn.Module, tuple[StaticDecoder, StaticDecoder]]" = weakref.WeakKeyDictionary()


def thinker_parts(omni) -> Parts:
    thinker = omni.hf.thinker
    return Parts(thinker.model.language_model, thinker.lm_head, thinker.get_input_embeddings())


def talker_parts(omni) -> Parts:
    talker = omni.hf.talker
    return Parts(talker.model, talker.codec_head, talker.get_input_embeddings(), talker.thinker_to_talker_proj)


def unsupported(omni) -> str | None:
    """Why the static decoder cannot sample this model's thinker or talker, or None."""
    for name, parts in (("thinker", thinker_parts), ("talker", talker_parts)):
        reason = StaticDecoder.unsupported(omni, parts)
        if reason is not None:
            return f"its {name}: {reason}"
    return None


def use_static(omni) -> bool:
    """Whether `omni` samples on the static decoder (see the module docstring)."""
    choice = getattr(omni, "decode_engine", "auto")
    if choice == "fast":
        raise ValueError("rollouts.engine is 'fast', but the fast decoder does not run Qwen2.5-Omni's thinker and talker; "
                         "set rollouts.engine: auto, static or hf")
    if choice == "hf" or (choice == "auto" and omni.device.type != "cuda"):
        return False
    reason = unsupported(omni)
    if reason is not None and choice == "static":
        raise ValueError(f"rollouts.engine is 'static' but the static decoder cannot run this model: {reason}; "
                         "set rollouts.engine: auto (or hf)")
    return reason is None


def decoders(omni) -> tuple[StaticDecoder, StaticDecoder]:
    """The model's (thinker, talker) decoders, made once and refreshed with the current weights."""
    got, compile = _DECODERS.get(omni), getattr(omni, "decode_compile", False)
    if got is not None and got[0].compile == compile:
        try:
            for decoder in got:
                decoder.refresh(omni)
            return got
        except ValueError:  # other shapes (LoRA added or merged differently): build anew
            pass
    got = (StaticDecoder(omni, parts=thinker_parts, record=True, compile=compile),
           StaticDecoder(omni, parts=talker_parts, allowed=omni.code_allowed, compile=compile))
    _DECODERS[omni] = got
    return got


def _layers(cache) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


def sample_text(omni, embeds: torch.Tensor, positions: torch.Tensor, uniforms: torch.Tensor, sampling: Sampling):
    """`OmniSpeech._sample_text` on the static decoder: the same rows (ids, log-probabilities,
    replies or None) and the prompt's last hidden states."""
    from transformers import DynamicCache

    thinker, _ = decoders(omni)
    R, T = uniforms.shape[0], sampling.max_new_tokens
    cache = DynamicCache(config=omni.hf.config.thinker_config.text_config)
    logits, prompt_hidden = omni._thinker(embeds, positions, cache)
    keys, values = _layers(cache)
    position = torch.full((R,), int(positions.max()) + 1, device=omni.device)
    stops = torch.tensor(omni.stop_ids, device=omni.device)
    # the prompt's one row of keys and values: copied once into each of the R rows of the static cache
    tokens, logps, lengths, _, replies = thinker.sample_cached(keys, values, logits[:, -1].float().expand(R, -1), position,
                                                               uniforms[:, :T], sampling, stops, omni.stop_ids[0])
    out = []
    for r in range(R):
        n = int(lengths[r])
        out.append((tokens[r, :n].tolist(), logps[r, :n].tolist(), replies[r : r + 1, : n - 1] if n > 1 else None))
    return out, prompt_hidden


def sample_codes(omni, prefix: torch.Tensor, positions: torch.Tensor, tail: torch.Tensor, uniforms: torch.Tensor,
                 sampling: Sampling) -> list[tuple[list[int], list[float]]]:
    """The talker's codes and log-probabilities for each row of `prefix` [B, L, H] (at
    `positions` [3, B, L]), step k reading tail[:, k]; `uniforms` [B, max_codes]."""
    from transformers import DynamicCache

    _, talker = decoders(omni)
    B = prefix.shape[0]
    cache = DynamicCache(config=omni.hf.config.talker_config)
    last = omni._talker(prefix, positions, cache)[:, -1]
    keys, values = _layers(cache)
    position = torch.full((B,), int(positions.max()) + 1, device=omni.device)
    stops = torch.tensor(omni.code_stops, device=omni.device)
    codes, logps, lengths, _, _ = talker.sample_cached(keys, values, last, position, uniforms, sampling, stops,
                                                       omni.codec["pad"], extra=tail)
    return [(codes[b, : int(lengths[b])].tolist(), logps[b, : int(lengths[b])].tolist()) for b in range(B)]
