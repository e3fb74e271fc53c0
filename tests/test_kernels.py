"""The fused kernels of the training forward (`vocalign.model.kernels`), each against the
autograd composition of the same ops as `transformers` writes them: values and
gradients, with and without gradient recording."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, apply_rotary_pos_emb

from vocalign.model.kernels import linear, qkv_rope, rms_norm, swiglu, token_logprobs


def grads(out, inputs, weight):
    return torch.autograd.grad((out * weight).sum(), inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_qwen2s(dtype):
    torch.manual_seed(0)
    norm = Qwen2RMSNorm(48, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48))
    x = (torch.randn(3, 5, 48) * 3).to(dtype).requires_grad_()
    ours = rms_norm(x, norm.weight, norm.variance_epsilon)
    theirs = norm(x)
    assert ours.dtype == theirs.dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ours, theirs, **tol)
    w = torch.randn(3, 5, 48).to(dtype)
    for a, b in zip(grads(ours, (x, norm.weight), w), grads(theirs, (x, norm.weight), w)):
        torch.testing.assert_close(a, b, **(tol if dtype == torch.float32 else dict(atol=0.1, rtol=2e-2)))
    with torch.no_grad():
        torch.testing.assert_close(rms_norm(x, norm.weight, norm.variance_epsilon), ours.detach(), atol=0, rtol=0)


def test_qkv_rope_is_transformers_rotary_embedding_on_the_split_projection():
    torch.manual_seed(0)
    B, T, H, KV, d = 2, 7, 4, 2, 8
    qkv = torch.randn(B, T, (H + 2 * KV) * d, requires_grad=True)
    angles = torch.randn(B, T, d // 2)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    q, k, v = qkv_rope(qkv, cos.unsqueeze(2), sin.unsqueeze(2), H, KV)

    def theirs_of(qkv):
        x = qkv.view(B, T, H + 2 * KV, d).transpose(1, 2)
        return (*apply_rotary_pos_emb(x[:, :H], x[:, H : H + KV], cos, sin), x[:, H + KV :])  # [B, heads, T, d]

    rq, rk, rv = theirs_of(qkv)
    for ours, theirs in ((q, rq), (k, rk), (v, rv)):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    weights = [torch.randn_like(t) for t in (q, k, v)]
    (ours,) = torch.autograd.grad(sum((t * w).sum() for t, w in zip((q, k, v), weights)), qkv)
    (theirs,) = torch.autograd.grad(sum((t * w).sum() for t, w in zip((rq, rk, rv), weights)), qkv)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    # an output without a gradient (v unused) contributes zeros
    q, k, v = qkv_rope(qkv, cos.unsqueeze(2), sin.unsqueeze(2), H, KV)
    rq, rk, rv = theirs_of(qkv)
    (ours,) = torch.autograd.grad((q * weights[0]).sum() + (k * weights[1]).sum(), qkv)
    (theirs,) = torch.autograd.grad((rq * weights[0]).sum() + (rk * weights[1]).sum(), qkv)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    assert ours.view(B, T, -1, d)[:, :, H + KV :].abs().sum() == 0
    with torch.no_grad():
        for a, b in zip(qkv_rope(qkv, cos.unsqueeze(2), sin.unsqueeze(2), H, KV), (rq, rk, rv)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_swiglu_is_silu_gate_times_up():
    torch.manual_seed(0)
    gate_up = torch.randn(3, 5, 2 * 16, requires_grad=True)
    ours = swiglu(gate_up)
    theirs = F.silu(gate_up[..., :16]) * gate_up[..., 16:]
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    w = torch.randn_like(ours)
    torch.testing.assert_close(grads(ours, (gate_up,), w)[0], grads(theirs, (gate_up,), w)[0], atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(swiglu(gate_up), theirs.detach(), atol=1e-6, rtol=0)


def test_token_logprobs_and_entropy_are_log_softmaxs():
    torch.manual_seed(0)
    logits = (torch.randn(3, 6, 50) * 4).requires_grad_()
    targets = torch.randint(0, 50, (3, 6))
    taken, entropy = token_logprobs(logits, targets)
    logp = F.log_softmax(logits, -1)
    expected = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(taken, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, -(logp.exp() * logp).sum(-1).detach(), atol=1e-5, rtol=0)
    assert not entropy.requires_grad
    w = torch.randn(3, 6)
    torch.testing.assert_close(grads(taken, (logits,), w)[0], grads(expected, (logits,), w)[0], atol=1e-6, rtol=0)
    taken, entropy = token_logprobs(logits, targets, entropy=False)
    assert entropy is None
    torch.testing.assert_close(taken, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("out_features", [24, 40])  # narrowing and widening: the weight's gradient takes either layout
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_with_a_residual_is_f_linear_plus_the_residual(out_features, with_bias):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 32, requires_grad=True)
    weight = torch.randn(out_features, 32, requires_grad=True)
    bias = torch.randn(out_features, requires_grad=True) if with_bias else None
    residual = torch.randn(3, 5, out_features, requires_grad=True)
    inputs = [t for t in (x, weight, bias, residual) if t is not None]
    ours = linear(x, weight, bias, residual)
    theirs = residual + F.linear(x, weight, bias)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    w = torch.randn_like(ours)
    for a, b in zip(grads(ours, inputs, w), grads(theirs, inputs, w)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(linear(x, weight, bias), F.linear(x, weight, bias), atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, weight, bias, residual), theirs.detach(), atol=1e-5, rtol=0)


def test_attention_by_batched_matmuls_is_sdpas():
    """The CPU matmul path (small scores) against torch's scaled_dot_product_attention: grouped
    query heads, a padding-and-causal mask, values and gradients; a large score tensor or a
    non-contiguous q takes SDPA itself."""
    from vocalign.model import kernels

    torch.manual_seed(0)
    B, H, KV, T, P, d = 3, 4, 2, 5, 4, 8
    S = P + T
    q = torch.randn(B, H, T, d, requires_grad=True)
    k, v = torch.randn(B, KV, S, d, requires_grad=True), torch.randn(B, KV, S, d, requires_grad=True)
    valid = torch.ones(B, P, dtype=torch.bool)
    valid[0, :2] = False  # a left-padded prompt
    mask = torch.cat([valid[:, None, None, :].expand(B, 1, T, P), torch.ones(T, T, dtype=torch.bool).tril().expand(B, 1, T, T)], -1)
    ours = kernels.attention(q, k, v, mask, 0.3)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    w = torch.randn_like(ours)
    for a, b in zip(grads(ours, (q, k, v), w), grads(theirs, (q, k, v), w)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    additive = kernels.additive_mask(mask, H, KV, torch.float32)
    torch.testing.assert_close(kernels.attention(q, k, v, mask, 0.3, additive), theirs, atol=1e-6, rtol=0)
    assert torch.isinf(additive).sum() == (~mask).sum() * H
    # the flash path: a non-contiguous q, or scores above the size limit (the additive mask is then not read)
    strided = torch.cat([q, q], dim=1)[:, :H]  # q's values, not contiguous
    assert not strided.is_contiguous()
    torch.testing.assert_close(kernels.attention(strided, k, v, mask, 0.3), theirs, atol=1e-6, rtol=0)
    # bf16 takes SDPA too (its softmax stays in fp32 there)
    half = [t.detach().bfloat16() for t in (q, k, v)]
    torch.testing.assert_close(kernels.attention(*half, mask, 0.3, additive=torch.empty(0)).float(), theirs.detach(), atol=3e-2, rtol=0)
    limit = kernels.SMALL_SCORES_BYTES
    try:
        kernels.SMALL_SCORES_BYTES = 0
        torch.testing.assert_close(kernels.attention(q, k, v, mask, 0.3, additive=torch.empty(0)), theirs, atol=1e-6, rtol=0)
    finally:
        kernels.SMALL_SCORES_BYTES = limit
