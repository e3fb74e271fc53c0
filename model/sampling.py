"""Sampling: the settings (`Sampling`), the per-(seed, prompt, sample) seed of a response's
uniforms (`row_seed`), and inverse-CDF sampling with top-p from them (`sample_tokens`), which
returns each token's log-probability under the temperature: what the trainer recomputes.
Every model family samples with these, so a prompt's samples do not depend on which other
prompts share the batch, and the old log-probabilities are the sampled distribution's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"sampling temperature must be > 0 (got {self.temperature}); use a small value such as 1e-3 for near-greedy")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling top_p must be in (0, 1] (got {self.top_p})")


def row_seed(seed: int, prompt_id: str, sample_index: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{prompt_id}/{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor, sampling: Sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF sampling with top-p; returns (tokens, logprobs under the temperature)."""
    if sampling.top_p >= 1.0:  # no nucleus to find: the inverse CDF over the vocabulary as it is, no sort
        return sample_full(logits, uniforms, sampling.temperature)
    return sample_nucleus(logits, uniforms, sampling.temperature, sampling.top_p)


def sample_full(logits: torch.Tensor, uniforms: torch.Tensor, temperature) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_tokens` without top-p. `temperature` may be a float or a 0-d tensor (nothing here
    reads a tensor's value on the host: a CUDA graph can hold it)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    cum = logp.exp().cumsum(-1)
    tokens = (cum < uniforms.unsqueeze(-1) * cum[:, -1:]).sum(-1).clamp(max=logp.shape[-1] - 1)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def sample_nucleus(logits: torch.Tensor, uniforms: torch.Tensor, temperature, top_p) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_tokens` with top-p < 1; `temperature` and `top_p` floats or 0-d tensors."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    probs, order = logp.exp().sort(dim=-1, descending=True)
    cum = probs.cumsum(-1)
    probs = probs * ((cum - probs) < top_p)  # the smallest set reaching top_p
    cum = probs.cumsum(-1)
    pick = (cum < uniforms.unsqueeze(-1) * cum[:, -1:]).sum(-1).clamp(max=probs.shape[-1] - 1)
    tokens = order.gather(-1, pick.unsqueeze(-1)).squeeze(-1)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def decode_loop(last: torch.Tensor, step, uniforms: torch.Tensor, sampling: Sampling, stops: torch.Tensor,
                pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample up to T = uniforms.shape[1] tokens per row from the first logits `last` [B, V],
    `step(tokens [B]) -> logits [B, V]` running the model on each sampled token; a row stops
    after one of `stops` (which it keeps). Returns tokens [B, T] (pad after a stop), their
    log-probabilities [B, T] (0 after a stop), lengths [B] and done [B]."""
    B, T = uniforms.shape
    out = torch.full((B, T), pad_id, dtype=torch.long, device=last.device)
    logps = torch.zeros(B, T, device=last.device)
    done = torch.zeros(B, dtype=torch.bool, device=last.device)
    lengths = torch.full((B,), T, device=last.device)
    for t in range(T):
        tok, lp = sample_tokens(last, uniforms[:, t], sampling)
        tok = torch.where(done, pad_id, tok)
        out[:, t], logps[:, t] = tok, torch.where(done, 0.0, lp)
        newly = ~done & torch.isin(tok, stops)
        lengths = torch.where(newly, t + 1, lengths)
        done |= newly
        if bool(done.all()) or t == T - 1:
            break
        last = step(tok)
    return out, logps, lengths, done
