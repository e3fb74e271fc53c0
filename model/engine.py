"""A lean decoder for sampling: Qwen2-family language models without the per-step overhead.

`Policy.generate` spends most of its time in the decode loop, one token per row per
step. Through `transformers` each step re-creates the attention mask, concatenates the
KV cache (a copy of every layer's keys and values, growing each step) and, under LoRA,
runs two extra small matmuls per projection. `FastDecoder` is a rollout copy of the
same weights built for that loop:

- LoRA adapters merged into the projections (W + scale * B @ A), so LoRA costs nothing
  at sampling time;
- q/k/v fused into one matmul and gate/up into another (fewer, larger matmuls);
- a KV cache allocated once for prompt + new tokens, written in place;
- the padding mask kept as a growing boolean row per sequence.

The model's embedding, rotary embedding module and LM head are called as they are; the
RMSNorms, rotary embedding, SwiGLU and attention (with the model's scaling) run as the
kernels of `vocalign.model.kernels`. The copy is made when generation starts (under ZeRO-3, inside
the trainer's gather), so it always holds the current weights; it costs a copy of the
fused q/k/v and gate/up weights (of every projection under LoRA, merged), as a colocated
inference engine holds its own weights.

What it supports: decoders whose layers are Qwen2's (`q/k/v/o_proj`, `gate/up/down_proj`
with SiLU, full attention; Qwen2, Qwen2-Audio's language model and the embedded
Step-Audio-2-style model). `FastDecoder.unsupported(model)` says why another model is
not; `Policy` then samples through `transformers` (`rollouts.engine: auto`), or refuses
(`rollouts.engine: fast`).

Its log-probabilities match the `transformers` forward within float rounding (tested to
1e-5); sampled tokens are the same unless two candidates' cumulative probabilities tie
within that rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels import additive_mask, attention, linear, matmul_attention, qkv_rope, rms_norm, swiglu


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | str:
    """(decoder, lm_head) of an AudioLM's language model, or why they cannot be found."""
    lm = getattr(model, "lm", None)
    if lm is None:
        return f"{type(model).__name__} has no `lm` attribute holding its language model"
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # through a peft wrapper
    if hasattr(base, "lm_head") and hasattr(base, "model"):
        return base.model, base.lm_head
    head = getattr(model, "lm_head", None)
    if head is None:
        return f"{type(model).__name__}'s language model ({type(base).__name__}) has no LM head the engine can find"
    return base, head


def _linear(module: nn.Module, merge: bool = True) -> tuple[torch.Tensor, torch.Tensor | None] | str:
    """(weight, bias) of a linear layer as it computes now: active LoRA adapters merged in
    (with `merge=False` only checked, the base weight returned)."""
    base = getattr(module, "base_layer", None)
    if base is None:
        if not isinstance(module, nn.Linear):
            return f"{type(module).__name__} is not a linear layer"
        return module.weight, module.bias
    if not isinstance(base, nn.Linear):
        return f"LoRA wraps a {type(base).__name__}, not a linear layer"
    weight = base.weight
    if not getattr(module, "disable_adapters", False) and not getattr(module, "merged", False):
        for name in module.active_adapters:
            if name not in module.lora_A:
                continue
            if getattr(module, "use_dora", {}).get(name, False):
                return "DoRA adapters are not supported"
            if merge:
                weight = weight + module.get_delta_weight(name).to(weight.dtype)
    return weight, base.bias



def token_positions(mask: torch.Tensor) -> torch.Tensor:
    """Each token's position in a left-padded batch (mask [B, T], 1 = token; padding at 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def prompt_attention_mask(valid: torch.Tensor) -> torch.Tensor:
    """The [B, 1, P, P] boolean attention mask of a left-padded prompt: causal, and only
    over valid keys (`valid` [B, P]); a padding query attends to itself only, so no row of
    the mask is empty (an empty row gives NaN)."""
    P = valid.shape[1]
    causal = torch.ones(P, P, dtype=torch.bool, device=valid.device).tril()
    return (causal & valid[:, None, None, :]) | torch.eye(P, dtype=torch.bool, device=valid.device)

class FastDecoder:
    """Prefill and one-token decode steps over a rollout copy of a Qwen2-family decoder.

        engine = FastDecoder(policy.model)          # or FastDecoder.unsupported(model) first
        logits = engine.prefill(embeds, mask, positions, capacity=P + T)   # [B, V], last position
        logits = engine.step(next_embeds, next_positions)                  # [B, V]
    """

    ATTENTION_LAYER = ("q_proj", "k_proj", "v_proj", "o_proj")
    MLP_LAYER = ("gate_proj", "up_proj", "down_proj")

    @classmethod
    def unsupported(cls, model: nn.Module, parts: tuple[nn.Module, nn.Module] | None = None) -> str | None:
        """Why `model` cannot run on this engine, or None if it can. `parts`: its (decoder, LM
        head), where they are not `model.lm`'s (a Qwen2.5-Omni thinker's or talker's)."""
        parts = parts or _parts(model)
        if isinstance(parts, str):
            return parts
        decoder, head = parts
        config = getattr(decoder, "config", None)
        if config is None or not hasattr(decoder, "layers") or not hasattr(decoder, "rotary_emb"):
            return f"{type(decoder).__name__} is not a Qwen2-style decoder (no config, layers or rotary_emb)"
        if getattr(config, "hidden_act", None) != "silu":
            return f"the MLP activation is {getattr(config, 'hidden_act', None)!r}; the engine implements silu"
        if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])) or getattr(config, "use_sliding_window", False):
            return "the model uses sliding-window attention; the engine implements full attention"
        for i, layer in enumerate(decoder.layers):
            attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            if attn is None or mlp is None or not all(hasattr(attn, n) for n in cls.ATTENTION_LAYER) or not all(
                hasattr(mlp, n) for n in cls.MLP_LAYER
            ):
                return f"layer {i} ({type(layer).__name__}) lacks Qwen2's q/k/v/o and gate/up/down projections"
            for name, module in [*((n, getattr(attn, n)) for n in cls.ATTENTION_LAYER), *((n, getattr(mlp, n)) for n in cls.MLP_LAYER)]:
                got = _linear(module, merge=False)
                if isinstance(got, str):
                    return f"layer {i} {name}: {got}"
        norms = [n for layer in decoder.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        for norm in [*norms, getattr(decoder, "norm", None)]:
            if not (hasattr(norm, "weight") and hasattr(norm, "variance_epsilon")):
                return f"{type(norm).__name__} is not Qwen2's RMSNorm (a weight and variance_epsilon)"
        got = _linear(head, merge=False)
        if isinstance(got, str):
            return f"lm_head: {got}"
        if any(p.numel() == 0 for p in decoder.parameters()) or got[0].numel() == 0:
            # DeepSpeed ZeRO-3 outside a gather: its hooks fetch each weight as a module runs
            return "its weights are partitioned (DeepSpeed ZeRO-3 outside full_parameters())"
        return None

    def __init__(self, model: nn.Module, parts: tuple[nn.Module, nn.Module] | None = None) -> None:
        reason = self.unsupported(model, parts)
        if reason is not None:
            raise ValueError(f"the fast decoder cannot run {type(model).__name__}: {reason}; sample with rollouts.engine: hf")
        decoder, head = parts or _parts(model)
        config = decoder.config
        self.decoder = decoder
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.layers = []
        with torch.no_grad():
            for layer in decoder.layers:
                attn, mlp = layer.self_attn, layer.mlp
                q, k, v, o = (_linear(getattr(attn, n)) for n in self.ATTENTION_LAYER)
                gate, up, down = (_linear(getattr(mlp, n)) for n in self.MLP_LAYER)
                self.layers.append({
                    "norm1": _norm(layer.input_layernorm), "norm2": _norm(layer.post_attention_layernorm), "scale": attn.scaling,
                    # (weight, bias) pairs: only the joined (and LoRA-merged) weights are new tensors;
                    # o and down are the model's own without LoRA
                    "qkv": _joined([q, k, v]), "o": o, "gate_up": _joined([gate, up]), "down": down,
                })
            self.final_norm = _norm(decoder.norm)
            self.head = _linear(head)  # the LM head (often the tied embedding), not copied
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.valid: torch.Tensor | None = None
        self.length = 0

    # -- the forward --------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, positions: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """x [B, T, H] at `positions` [B, T], written into the cache at self.length..; returns the last hidden [B, H]."""
        B, T, H = x.shape
        start, end = self.length, self.length + T
        cos, sin = self.decoder.rotary_emb(x, positions)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [B, T, 1, d]
        x = x.reshape(B * T, H)
        mask = _Mask(attn_mask, self.n_heads, self.n_kv)
        for i, w in enumerate(self.layers):
            h = rms_norm(x, *w["norm1"])
            q, k, v = qkv_rope(linear(h, *w["qkv"]).view(B, T, -1), cos, sin, self.n_heads, self.n_kv)
            self.keys[i][:, :, start:end] = k
            self.values[i][:, :, start:end] = v
            attn = mask.attend(q, self.keys[i][:, :, :end], self.values[i][:, :, :end], w["scale"])
            x = linear(attn.transpose(1, 2).reshape(B * T, -1), *w["o"], residual=x)
            h = rms_norm(x, *w["norm2"])
            x = linear(swiglu(linear(h, *w["gate_up"])), *w["down"], residual=x)
        self.length = end
        return rms_norm(x.view(B, T, H)[:, -1], *self.final_norm)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, *self.head).float()

    @torch.no_grad()
    def prefill(
        self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, capacity: int, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run the (left-padded) prompts: embeds [U, P, H], mask [U, P] (1 = token), positions [U, P];
        allocate room for `capacity` positions in all. `rows` [B] (optional) gives each
        sequence's prompt: a prompt sampled n times runs once and its cache is copied to
        its n rows. Returns the last position's logits [B, V] (U without `rows`)."""
        logits = self._prefill(embeds, mask, positions, capacity)
        if rows is None:
            return logits
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.valid = self.valid.index_select(0, rows)
        return logits.index_select(0, rows)

    def _prefill(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, capacity: int) -> torch.Tensor:
        B, P, _ = embeds.shape
        if capacity < P:
            raise ValueError(f"capacity {capacity} is smaller than the prompt length {P}")
        shape = (B, self.n_kv, capacity, self.head_dim)
        dtype, device = self.layers[0]["qkv"][0].dtype, embeds.device
        # not zeroed: attention reads positions < length only, and every one of them is written
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in self.layers]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in self.layers]
        self.valid = torch.zeros(B, capacity, dtype=torch.bool, device=device)
        self.valid[:, :P] = mask.bool()
        self.length = 0
        attn_mask = prompt_attention_mask(self.valid[:, :P])
        return self._logits(self._forward(embeds.to(dtype), positions, attn_mask))

    @torch.no_grad()
    def step(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One new token per row: embeds [B, 1, H], positions [B, 1]. Returns its logits [B, V]."""
        if self.valid is None:
            raise RuntimeError("FastDecoder.step before prefill")
        if self.length >= self.valid.shape[1]:
            raise RuntimeError(f"the KV cache holds {self.valid.shape[1]} positions and is full; prefill with a larger capacity")
        self.valid[:, self.length] = True
        attn_mask = self.valid[:, None, None, : self.length + 1]
        return self._logits(self._forward(embeds.to(self.layers[0]["qkv"][0].dtype), positions, attn_mask))


class _Mask:
    """A boolean attention mask [B, 1, T, S] (True = attend), shared by every layer of a
    forward, with its additive form made once, on first use, where `attention` takes its
    batched-matmul path."""

    def __init__(self, mask: torch.Tensor, n_heads: int, n_kv: int) -> None:
        self.mask, self.n_heads, self.n_kv = mask, n_heads, n_kv
        self.additive: torch.Tensor | None = None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        if self.additive is None and matmul_attention(q, k.shape[2]):
            self.additive = additive_mask(self.mask, self.n_heads, self.n_kv, q.dtype)
        return attention(q, k, v, self.mask, scale, self.additive)


def _norm(module: nn.Module) -> tuple[torch.Tensor, float]:
    """(weight, eps) of a Qwen2 RMSNorm."""
    return module.weight, module.variance_epsilon


class FastForward:
    """The training forward of a Qwen2-family decoder, differentiable, with fused kernels.

        engine = FastForward(policy.model)           # or FastForward.unsupported(model) first
        hidden = engine.hidden(prompt_embeds, prompt_mask, prompt_positions,
                               response_embeds, response_positions, rows)   # [B, 1 + R', H]

    It computes what the `transformers` forward computes, on the model's own parameters
    (gradients reach them as they would through the model), but:

    - q/k/v and gate/up each run as one matmul on the joined weights (joined by a
      differentiable `cat` each call, so the parameters and checkpoints stay the model's);
      under LoRA the adapters join too (A stacked, B block-diagonal; see `_project`);
    - RMSNorm, rotary embedding, SwiGLU and the log-probabilities run as the fused
      autograd functions of `vocalign.model.kernels`;
    - the prompts run once each (U of them, `[U, P]`), and each of the B response rows
      attends to its prompt's keys and values (`rows[b]` is row b's prompt; None when
      U = B, each row its own): a GRPO group's prompt is computed once, forward and
      backward;
    - the last response token is not run: nothing reads its output.

    The first hidden state of each row is its prompt's last position (it predicts the
    first response token); the others are the response positions but the last. All are
    after the decoder's final norm, so the LM head or a value head reads them as they are.
    """

    @classmethod
    def unsupported(cls, model: nn.Module) -> str | None:
        """Why `model` cannot train through this forward, or None if it can."""
        reason = FastDecoder.unsupported(model)
        if reason is not None:
            return reason
        decoder, _ = _parts(model)
        if getattr(decoder, "gradient_checkpointing", False):
            return "gradient checkpointing is on (the fast forward keeps every activation)"
        if decoder.training and float(getattr(decoder.config, "attention_dropout", 0.0) or 0.0) > 0:
            return "attention dropout is on in training"
        return None

    def __init__(self, model: nn.Module) -> None:
        reason = self.unsupported(model)
        if reason is not None:
            raise ValueError(f"the fast training forward cannot run {type(model).__name__}: {reason}; set rl.forward_engine: hf")
        self.decoder, self.head = _parts(model)
        config = self.decoder.config
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads

    def _layer(self, layer: nn.Module, x: torch.Tensor, cos, sin, mask: _Mask, past=None):
        """One decoder layer on x [B, T, H]; `past` = the (keys, values) to prepend. Returns x
        and this layer's (keys, values)."""
        B, T, H = x.shape
        attn, mlp = layer.self_attn, layer.mlp
        h = rms_norm(x, *_norm(layer.input_layernorm))
        q, k, v = qkv_rope(_project(h, attn.q_proj, attn.k_proj, attn.v_proj), cos, sin, self.n_heads, self.n_kv)
        own = (k, v)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        out = mask.attend(q, k, v, attn.scaling)
        x = _project(out.transpose(1, 2).reshape(B, T, -1), attn.o_proj, residual=x)
        h = rms_norm(x, *_norm(layer.post_attention_layernorm))
        x = _project(swiglu(_project(h, mlp.gate_proj, mlp.up_proj)), mlp.down_proj, residual=x)
        return x, own

    def hidden(self, prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor, prompt_positions: torch.Tensor,
               response_embeds: torch.Tensor, response_positions: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """prompt_embeds [U, P, H] (left-padded; prompt_mask [U, P], 1 = token), response_embeds
        [B, R', H] (all response tokens but the last, right-padded) at response_positions [B, R'];
        rows [B]: each row's prompt (None: U = B). Returns the final-normed hidden states
        [B, 1 + R', H] that predict the B rows' R' + 1 response tokens."""
        U, P, _ = prompt_embeds.shape
        device = prompt_embeds.device
        valid = prompt_mask.bool()
        mask = prompt_attention_mask(valid)
        cos, sin = self._rotary(prompt_embeds, prompt_positions)
        x, past = prompt_embeds, []
        mask = _Mask(mask, self.n_heads, self.n_kv)
        for layer in self.decoder.layers:
            x, kv = self._layer(layer, x, cos, sin, mask)
            past.append(kv)
        last = x[:, -1:]
        if rows is not None:
            last = last.index_select(0, rows)
        R = response_embeds.shape[1]
        if R:
            B = response_embeds.shape[0]
            seen = (valid if rows is None else valid.index_select(0, rows))[:, None, None, :].expand(B, 1, R, P)
            mask = torch.cat([seen, torch.ones(R, R, dtype=torch.bool, device=device).tril().expand(B, 1, R, R)], dim=-1)
            cos, sin = self._rotary(response_embeds, response_positions)
            y = response_embeds
            mask = _Mask(mask, self.n_heads, self.n_kv)
            for layer, (k, v) in zip(self.decoder.layers, past):
                if rows is not None:  # each row reads its prompt's keys and values
                    k, v = k.index_select(0, rows), v.index_select(0, rows)
                y, _ = self._layer(layer, y, cos, sin, mask, past=(k, v))
            last = torch.cat([last, y], dim=1)
        return rms_norm(last, *_norm(self.decoder.norm))

    def logits(self, *args, **kwargs) -> torch.Tensor:
        """The LM head on `hidden(...)`: [B, 1 + R', V]."""
        return self.head(self.hidden(*args, **kwargs))

    def _rotary(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.decoder.rotary_emb(x, positions)
        return cos.unsqueeze(2), sin.unsqueeze(2)  # [B, T, 1, d]: broadcast over the heads of [B, T, heads, d]


def _project(x: torch.Tensor, *linears: nn.Module, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Linear layers on the same input, outputs joined along the last dimension (+ residual),
    as one matmul on their joined weights. Under LoRA (one plain adapter per layer, no
    dropout) the adapters join too: A matrices stacked, B matrices (scaled) block-diagonal,
    so q/k/v is three matmuls in all, not three per layer; layers LoRA wraps otherwise
    (dropout, several adapters, DoRA) run as their peft modules."""
    parts = [_plain_lora(m) for m in linears]
    if any(p is None for p in parts):
        outs = [m(x) for m in linears]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return out if residual is None else residual + out
    weight, bias = _joined([(base.weight, base.bias) for base, _ in parts])
    out = linear(x, weight, bias, residual)
    if all(adapter is None for _, adapter in parts):
        return out
    stacked = torch.cat([adapter[0] for _, adapter in parts if adapter is not None])
    # a layer without an adapter is a zero-width block: its outputs get nothing from the adapters
    blocks = [adapter[1] * adapter[2] if adapter is not None else base.weight.new_zeros(base.weight.shape[0], 0)
              for base, adapter in parts]
    return linear(linear(x, stacked), torch.block_diag(*blocks), None, out)


def _joined(weights: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weights (and biases: zeros where a layer has none; None if none has one) of linear
    layers on the same input, joined into one layer's."""
    if len(weights) == 1:
        return weights[0]
    weight = torch.cat([w for w, _ in weights])
    if all(b is None for _, b in weights):
        return weight, None
    return weight, torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in weights])


def _plain_lora(module: nn.Module):
    """(linear, (A, B, scaling) or None) for a plain `nn.Linear` (no adapter) or a peft LoRA
    linear computing base(x) + scaling * B(A(x)) without dropout (None: its adapters are
    disabled, as for the KL reference, or merged); None for any other layer."""
    if isinstance(module, nn.Linear):
        return module, None
    base = getattr(module, "base_layer", None)
    if not isinstance(base, nn.Linear):
        return None
    if getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
        return base, None
    active = [name for name in module.active_adapters if name in module.lora_A]
    if not active:
        return base, None
    if len(active) > 1 or getattr(module, "use_dora", {}).get(active[0], False):
        return None
    name = active[0]
    dropout = module.lora_dropout[name]
    if not isinstance(dropout, nn.Identity) and not (isinstance(dropout, nn.Dropout) and (dropout.p == 0 or not dropout.training)):
        return None
    return base, (module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name])
