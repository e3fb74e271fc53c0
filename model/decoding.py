"""The decode loop of `Policy.generate` on each engine: the static decoder (fixed shapes, CUDA
graphs on CUDA), the fast decoder, or the model's own `decode` (transformers)."""

from __future__ import annotations

import torch
from torch import nn

from .engine import token_positions
from .sampling import Sampling, decode_loop
from .static_decoder import StaticDecoder


def decode(model: nn.Module, engine, embeds: torch.Tensor, prompt_mask: torch.Tensor, rows: torch.Tensor,
           uniforms: torch.Tensor, sampling: Sampling, stops: torch.Tensor, pad_id: int):
    """Sample up to T = uniforms.shape[1] tokens for each row b of `rows` (the prompt it
    continues: embeds [U, P, H], prompt_mask [U, P]) with `engine` (a `StaticDecoder`, a
    `FastDecoder`, or None for the model's own `decode`). Returns tokens [B, T], their
    log-probabilities [B, T], lengths [B] and done [B] (see `decode_loop`)."""
    if isinstance(engine, StaticDecoder):
        return engine.sample(embeds, prompt_mask, rows, uniforms, sampling, stops, pad_id)
    P, T = prompt_mask.shape[1], uniforms.shape[1]
    mask = prompt_mask[rows]
    state = {"mask": mask, "positions": token_positions(mask)}
    if engine is not None:  # the prefill runs once per prompt
        last = engine.prefill(embeds, prompt_mask, token_positions(prompt_mask), capacity=P + T, rows=rows)
    else:
        logits, state["past"] = model.decode(embeds[rows], mask, state["positions"], use_cache=True)
        last = logits[:, -1]
    state["positions"] = state["positions"][:, -1:]

    def step(tokens: torch.Tensor) -> torch.Tensor:
        state["positions"] = state["positions"] + 1
        embedded = model.input_embeddings(tokens.unsqueeze(1), None)
        if engine is not None:
            return engine.step(embedded, state["positions"])
        state["mask"] = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], dim=1)
        logits, state["past"] = model.decode(embedded, state["mask"], state["positions"], cache=state["past"], use_cache=True)
        return logits[:, -1]

    return decode_loop(last, step, uniforms, sampling, stops, pad_id)
