"""Fused forward and backward passes for the training forward's elementwise work.

A full-weight training step of a small decoder spends about half its time outside the
matmuls, in elementwise ops: `transformers` computes RMSNorm as six ops, rotary
embedding as six per tensor (two slices, a negation, a concatenation, two products), and
autograd records each, saves its inputs and runs its backward as several more. On a
CPU, where each op is a pass over memory, that is most of the non-matmul time. Each
function here is one `torch.autograd.Function` with a hand-written backward that makes
fewer passes and saves less:

- `rms_norm(x, weight, eps)`: Qwen2's RMSNorm (statistics in fp32, scaled in the input's
  dtype), saving the normalised input and the inverse RMS;
- `qkv_rope(qkv, cos, sin, n_heads, n_kv)`: splits a fused q/k/v projection into heads,
  applies rotary embedding to q and k (the half-split layout of `transformers`'
  `rotate_half`), and returns q, k, v head-major for attention; its backward writes the
  gradient of the whole fused projection at once;
- `attention(q, k, v, mask, scale)`: grouped-query attention; on a CPU with small score
  tensors as batched matmuls (faster there than the flash kernel, forward and backward),
  else `scaled_dot_product_attention`;
- `swiglu(gate_up)`: `silu(gate) * up` from a fused gate/up projection, its backward
  writing one gradient for both halves;
- `linear(x, weight, bias, residual)`: `residual + x @ weight.T + bias` with the residual
  added inside the matmul, and the weight's gradient computed as `(x.T @ grad).T` when the
  layer widens (out > in features): at [8064, 256] -> 1536 that layout is 20% faster on
  this machine's BLAS than `grad.T @ x`;
- `token_logprobs(logits, targets, entropy)`: the log-probability of each target token
  and (not differentiated) the entropy of each distribution, from one softmax; its
  backward is `(onehot - softmax) * grad` without the [N, V] zero-fill of a gather's
  backward.

Each is checked against the autograd composition of the same ops, values and gradients,
in `tests/test_kernels.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _normalised(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / rms(x), 1 / rms(x)) in fp32, as transformers computes RMSNorm's statistics."""
    xf = x.float()
    inv = torch.rsqrt(torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps))
    return xf * inv, inv


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        normed, inv = _normalised(x, eps)
        ctx.save_for_backward(normed, inv, weight)
        ctx.in_dtype = x.dtype
        return weight * normed.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        normed, inv, weight = ctx.saved_tensors
        # d/dx of w * x * inv: inv * (g - normed * mean(g * normed)) with g = grad * w; the
        # product grad * normed serves both the weight's gradient and that mean
        grad_normed = grad.float() * normed
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = grad_normed.reshape(-1, grad.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            dot = (grad_normed * weight).mean(-1, keepdim=True)
            grad_x = (grad * weight).float().addcmul_(normed, dot, value=-1).mul_(inv).to(ctx.in_dtype)
        return grad_x, grad_weight, None


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * (x / sqrt(mean(x**2) + eps))` over the last dimension, as Qwen2's RMSNorm."""
    if _needs_grad(x, weight):
        return _RMSNorm.apply(x, weight, eps)
    return weight * _normalised(x, eps)[0].to(x.dtype)


def _rotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> None:
    """out = x * cos + rotate_half(x) * sin (or its transpose, for the backward), where
    rotate_half(x) = [-x2, x1]: out1 = x1 c1 - x2 s1, out2 = x2 c2 + x1 s2; the transpose
    is out1 = x1 c1 + x2 s2, out2 = x2 c2 - x1 s1."""
    half = x.shape[-1] // 2
    x1, x2, o1, o2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
    c1, c2, s1, s2 = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
    torch.mul(x1, c1, out=o1)
    o1.addcmul_(x2, s2 if inverse else s1, value=1 if inverse else -1)
    torch.mul(x2, c2, out=o2)
    o2.addcmul_(x1, s1 if inverse else s2, value=-1 if inverse else 1)


def _split_rotated(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv: int):
    """q and k rotated into their own head-major tensors, v a [B, n_kv, T, d] view of qkv."""
    B, T, _ = qkv.shape
    x = qkv.view(B, T, n_heads + 2 * n_kv, -1)
    d = x.shape[-1]
    # written head-major ([B, heads, T, d], what attention reads) through [B, T, heads, d] views
    q = torch.empty(B, n_heads, T, d, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(B, n_kv, T, d, dtype=qkv.dtype, device=qkv.device)
    _rotate_into(q.transpose(1, 2), x[:, :, :n_heads], cos, sin, inverse=False)
    _rotate_into(k.transpose(1, 2), x[:, :, n_heads : n_heads + n_kv], cos, sin, inverse=False)
    return q, k, x[:, :, n_heads + n_kv :].transpose(1, 2)


class _QKVRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv: int):
        q, k, v = _split_rotated(qkv, cos, sin, n_heads, n_kv)
        ctx.save_for_backward(cos, sin)
        ctx.shape = (n_heads, n_kv)
        return q, k, v.contiguous()

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor | None, grad_k: torch.Tensor | None, grad_v: torch.Tensor | None):
        cos, sin = ctx.saved_tensors
        n_heads, n_kv = ctx.shape
        some = next(g for g in (grad_q, grad_k, grad_v) if g is not None)
        B, _, T, d = some.shape
        make = torch.zeros if grad_q is None or grad_k is None or grad_v is None else torch.empty
        grad = make(B, T, n_heads + 2 * n_kv, d, dtype=some.dtype, device=some.device)
        if grad_q is not None:
            _rotate_into(grad[:, :, :n_heads], grad_q.transpose(1, 2), cos, sin, inverse=True)
        if grad_k is not None:
            _rotate_into(grad[:, :, n_heads : n_heads + n_kv], grad_k.transpose(1, 2), cos, sin, inverse=True)
        if grad_v is not None:
            grad[:, :, n_heads + n_kv :] = grad_v.transpose(1, 2)
        return grad.view(B, T, -1), None, None, None, None


def qkv_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv: int):
    """From a fused projection qkv [B, T, (n_heads + 2 n_kv) * d] and rotary cos/sin [B, T, 1, d]:
    q [B, n_heads, T, d] and k [B, n_kv, T, d] (contiguous) with rotary embedding applied, and
    v [B, n_kv, T, d] (a view of qkv when no gradient is recorded)."""
    if _needs_grad(qkv):
        return _QKVRope.apply(qkv, cos, sin, n_heads, n_kv)
    return _split_rotated(qkv, cos, sin, n_heads, n_kv)


# score tensors up to this size take the batched-matmul attention on a CPU (see `attention`)
SMALL_SCORES_BYTES = 64 << 20


def matmul_attention(q: torch.Tensor, n_keys: int) -> bool:
    """Whether `attention` takes its batched-matmul path for queries q [B, H, T, d] over
    `n_keys` keys: on a CPU, in float32 (in bf16 the scores and their softmax would lose
    what SDPA keeps in fp32), for a contiguous q and a score tensor of at most
    `SMALL_SCORES_BYTES`."""
    B, H, T, _ = q.shape
    return (q.device.type == "cpu" and q.dtype == torch.float32 and q.is_contiguous()
            and B * H * T * n_keys * q.element_size() <= SMALL_SCORES_BYTES)


def additive_mask(mask: torch.Tensor, n_heads: int, n_kv: int, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask [B, 1, T, S] (True = attend) as the additive float mask
    [B * n_kv, (n_heads // n_kv) * T, S] that `attention`'s matmul path adds to its scores."""
    B, _, T, S = mask.shape
    group = n_heads // n_kv
    add = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return add.expand(B, n_kv * group, T, S).reshape(B * n_kv, group * T, S)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
              additive: torch.Tensor | None = None) -> torch.Tensor:
    """Grouped-query attention: q [B, H, T, d], k and v [B, KV, S, d], mask [B, 1, T, S] (True =
    attend). Where `matmul_attention` says so (a CPU, float32, small scores), as three batched matmuls over the query heads of each KV head (`additive`: the mask from
    `additive_mask`, built once for all layers); faster there than the flash-attention kernel at
    these sizes (forward and backward), which takes every other case."""
    B, H, T, d = q.shape
    KV, S = k.shape[1], k.shape[2]
    if not matmul_attention(q, S):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=KV != H)
    if additive is None:
        additive = additive_mask(mask, H, KV, q.dtype)
    scores = torch.baddbmm(additive, q.view(B * KV, (H // KV) * T, d), k.reshape(B * KV, S, d).transpose(1, 2), alpha=scale)
    return torch.bmm(torch.softmax(scores, dim=-1), v.reshape(B * KV, S, d)).view(B, H, T, d)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        inner = gate_up.shape[-1] // 2
        gate, up = gate_up[..., :inner], gate_up[..., inner:]
        act = F.silu(gate)
        ctx.save_for_backward(gate_up, act)
        return act * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        gate_up, act = ctx.saved_tensors
        inner = gate_up.shape[-1] // 2
        gate, up = gate_up[..., :inner], gate_up[..., inner:]
        out = torch.empty_like(gate_up)
        torch.mul(grad, act, out=out[..., inner:])
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=out[..., :inner])
        return out


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for gate_up = [gate, up] along the last dimension."""
    if _needs_grad(gate_up):
        return _SwiGLU.apply(gate_up)
    inner = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :inner]).mul_(gate_up[..., inner:])


def _linear_forward(flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None) -> torch.Tensor:
    """residual + flat @ weight.T + bias for flat [N, in], the additions inside addmm where they can be."""
    if residual is None:
        return torch.addmm(bias, flat, weight.t()) if bias is not None else flat @ weight.t()
    out = torch.addmm(residual.reshape(-1, weight.shape[0]), flat, weight.t())
    return out.add_(bias) if bias is not None else out


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(flat, weight)
        ctx.in_shape = x.shape
        return _linear_forward(flat, weight, bias, residual).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        flat, weight = ctx.saved_tensors
        g = grad.reshape(-1, weight.shape[0])
        need_x, need_w, need_b, need_r = ctx.needs_input_grad
        grad_x = (g @ weight).view(ctx.in_shape) if need_x else None
        grad_w = None
        if need_w:
            grad_w = (flat.t() @ g).t() if weight.shape[0] > weight.shape[1] else g.t() @ flat
        return grad_x, grad_w, g.sum(0) if need_b else None, grad if need_r else None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """`residual + x @ weight.T + bias` (`F.linear` plus a residual), see the module docstring."""
    if _needs_grad(x, weight, *(t for t in (bias, residual) if t is not None)):
        return _Linear.apply(x, weight, bias, residual)
    return _linear_forward(x.reshape(-1, x.shape[-1]), weight, bias, residual).view(*x.shape[:-1], weight.shape[0])


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool):
        logp = torch.log_softmax(logits, -1)
        taken = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        probs = logp.exp_()  # logp is not needed again but for the entropy: sum p log p = sum p logits - lse
        if with_entropy:
            lse = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - taken
            entropy = lse - (probs * logits).sum(-1)
        else:
            entropy = taken.new_zeros(())
        ctx.save_for_backward(probs, targets)
        ctx.mark_non_differentiable(entropy)
        return taken, entropy

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _):
        probs, targets = ctx.saved_tensors
        grad_logits = probs * -grad.unsqueeze(-1)
        grad_logits.scatter_add_(-1, targets.unsqueeze(-1), grad.unsqueeze(-1))
        return grad_logits, None, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log_softmax(logits)[..., target] for logits [..., V] and targets [...], and the entropy
    of each distribution [...] (None unless `entropy`; it carries no gradient)."""
    shape = targets.shape
    taken, ent = _TokenLogprobs.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), entropy)
    return taken.view(shape), (ent.view(shape) if entropy else None)
