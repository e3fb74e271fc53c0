"""Decoding at fixed shapes: a static KV cache, one attention kernel, and on CUDA each
decode step replayed as a CUDA graph.

`FastDecoder` removes `transformers`' per-step work but still launches a few hundred
small kernels per token from Python, and its attention goes through
`scaled_dot_product_attention`, which on a GPU picks a backend (and cuDNN builds a plan)
for every new key length. At batch 128 a decode step of a 0.5B model reads about a
gigabyte, well under a millisecond of an H200's memory bandwidth, so that CPU-side work
is most of the step. `StaticDecoder` removes it:

- **Static shapes.** The KV cache is allocated once per (batch bucket, capacity bucket)
  and written in place at a position held in a device tensor; the batch is padded to a
  power of two and the capacity (prompt + new tokens) rounded up to a multiple of 64.
  Padded rows start finished and attend to one zero key.
- **One attention kernel.** A decode step's query is one token, so attention is two
  batched matmuls over the whole cache, the grouped query heads of each KV head reading
  that head's keys once (no repeat of K and V, as SDPA's memory-efficient kernel needs
  for grouped-query attention with a mask), with the padding and the not-yet-written
  positions masked out; scores and softmax in float32. No backend is chosen per call.
- **The whole step on the device.** Sampling (`sample_tokens`, the same inverse-CDF
  sampler with one uniform per token), the stop test, the output and length updates,
  the token's embedding, rotary embedding (a table made once per capacity), the layers
  and the LM head all read and write preallocated tensors; the step counter is a device
  tensor the step increments. The host replays the step and looks at `done` only every
  `check_every` steps.
- **CUDA graphs.** On CUDA the step is captured once per bucket with `torch.cuda.CUDAGraph`
  (all graphs share one memory pool) and replayed; the weights are the decoder's own
  buffers, refreshed in place (`refresh`) from the model before each generation, so a
  graph captured at the first step stays valid for the whole run. On a CPU the same step
  runs eagerly; that is how it is tested against `FastDecoder`.
- **LoRA** is merged into the refreshed weights, as `FastDecoder` merges it.

The prompt runs once per distinct prompt through `FastDecoder`'s prefill (eagerly; it is
one call per generation) over the same buffers, and its keys and values are copied into
the static cache.

Cost: a copy of the weights (as a colocated inference engine holds its own) and one KV
cache per cached bucket, at most `max_graphs` of them (the least recently used is dropped).
What it runs: what `FastDecoder` runs (Qwen2-family decoders), with the default or linear
rotary embedding (a table of positions needs position-independent frequencies).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch
from torch import nn

from .engine import FastDecoder, _linear, _parts, token_positions
from .kernels import linear, rms_norm, swiglu
from .sampling import Sampling, sample_full, sample_nucleus

CAPACITY_STEP = 64  # the KV cache's length is rounded up to a multiple of this
MAX_STOPS = 8  # stop tokens a graph's stop test holds (unused slots are -1)


@dataclass
class Parts:
    """What a decode step runs: the decoder (Qwen2-style layers, final norm, rotary module), the
    LM head, the embedding of sampled tokens and, optionally, a linear layer between that
    embedding and the decoder (Qwen2.5-Omni's talker reads its inputs through one)."""

    decoder: nn.Module
    head: nn.Module
    embedding: nn.Module
    input_proj: nn.Module | None = None


def model_parts(model: nn.Module) -> Parts | str:
    """An `AudioLM`'s parts (`model.lm`'s decoder, head and input embedding), or why not."""
    got = _parts(model)
    if isinstance(got, str):
        return got
    decoder, head = got
    if not hasattr(decoder, "get_input_embeddings"):
        return f"{type(decoder).__name__} has no get_input_embeddings() to embed sampled tokens with"
    return Parts(decoder, head, decoder.get_input_embeddings())


def batch_bucket(rows: int) -> int:
    """The batch a graph is captured for: the next power of two."""
    return 1 << max(0, (rows - 1).bit_length())


def capacity_bucket(positions: int) -> int:
    return -(-positions // CAPACITY_STEP) * CAPACITY_STEP


def _tensors(fast: FastDecoder) -> list[torch.Tensor]:
    """Every weight tensor the decoder reads, in a fixed order (None biases left out)."""
    out = []
    for layer in fast.layers:
        out += [layer["norm1"][0], layer["norm2"][0]]
        for key in ("qkv", "o", "gate_up", "down"):
            out += [t for t in layer[key] if t is not None]
    return out + [fast.final_norm[0], *(t for t in fast.head if t is not None)]


class StaticDecoder:
    """Sampling at fixed shapes over its own copy of a Qwen2-family decoder's weights.

        decoder = StaticDecoder(policy.model)     # or StaticDecoder.unsupported(model) first
        decoder.refresh(policy.model)             # before each generation: the current weights
        tokens, logps, lengths, done = decoder.sample(embeds, mask, rows, uniforms, sampling, stops, pad_id)
    """

    def __init__(self, model: nn.Module, max_graphs: int = 4, check_every: int | None = None,
                 parts: Callable[[nn.Module], Parts | str] = model_parts, allowed: torch.Tensor | None = None,
                 record: bool = False, compile: bool = False) -> None:
        """`parts(model)` finds what the step runs (see `Parts`); `allowed` [V] (bool) masks the
        tokens that may never be sampled; `record` keeps each step's final hidden state plus
        its input embedding (what Qwen2.5-Omni's talker reads of the thinker); `compile` runs
        the step compiled by torch.compile (fused elementwise kernels: fewer launches per
        step), once per bucket, before it is captured."""
        reason = self.unsupported(model, parts)
        if reason is not None:
            raise ValueError(f"the static decoder cannot run {type(model).__name__}: {reason}; sample with rollouts.engine: fast or hf")
        self.parts, self.allowed, self.record, self.compile = parts, allowed, record, compile
        p = parts(model)
        self.fast = FastDecoder(model, (p.decoder, p.head))
        # own the weights: the fused (and merged) ones are new tensors already; the others are cloned
        owned = {id(t): t.detach().clone() for t in _tensors(self.fast)}
        for layer in self.fast.layers:
            for key in ("norm1", "norm2", "qkv", "o", "gate_up", "down"):
                layer[key] = tuple(owned[id(t)] if isinstance(t, torch.Tensor) else t for t in layer[key])
        self.fast.final_norm = (owned[id(self.fast.final_norm[0])], self.fast.final_norm[1])
        self.fast.head = tuple(owned[id(t)] if t is not None else None for t in self.fast.head)
        table = p.embedding.weight
        self.embed = owned.get(id(table), None)  # a tied LM head is the embedding: one copy serves both
        if self.embed is None:
            self.embed = table.detach().clone()
        self.input_proj = None
        if p.input_proj is not None:
            self.input_proj = tuple(t.detach().clone() if t is not None else None for t in _linear(p.input_proj))
        self.source = id(model)
        self.device, self.dtype = self.embed.device, self.fast.layers[0]["qkv"][0].dtype
        if allowed is not None:
            self.allowed = allowed.to(self.device)
        self.max_graphs = max_graphs
        # CPU: the step runs eagerly and a look at `done` costs nothing; CUDA: every 16 steps
        self.check_every = check_every or (16 if self.device.type == "cuda" else 1)
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None
        self._rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def unsupported(cls, model: nn.Module, parts: Callable[[nn.Module], Parts | str] = model_parts) -> str | None:
        """Why `model` cannot run on this decoder, or None if it can."""
        p = parts(model)
        if isinstance(p, str):
            return p
        reason = FastDecoder.unsupported(model, (p.decoder, p.head))
        if reason is not None:
            return reason
        if p.input_proj is not None and isinstance(_linear(p.input_proj, merge=False), str):
            return f"the input projection: {_linear(p.input_proj, merge=False)}"
        rope = getattr(p.decoder.config, "rope_scaling", None) or getattr(p.decoder.config, "rope_parameters", None) or {}
        kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        if kind not in ("default", "linear"):
            return f"its rotary embedding is {kind!r}: its frequencies depend on the length, and the decoder tabulates them"
        return None

    def refresh(self, model: nn.Module) -> None:
        """Copy the model's current weights (LoRA merged) into the decoder's, in place."""
        p = self.parts(model)
        now = FastDecoder(model, (p.decoder, p.head))
        mine, theirs = _tensors(self.fast), _tensors(now)
        if p.input_proj is not None and self.input_proj is not None:
            mine += [t for t in self.input_proj if t is not None]
            theirs += [t for t in _linear(p.input_proj) if t is not None]
        if len(mine) != len(theirs) or any(a.shape != b.shape for a, b in zip(mine, theirs)):
            raise ValueError("the model's weights no longer have the shapes this static decoder was built for; build a new one")
        with torch.no_grad():
            for a, b in zip(mine, theirs):
                a.copy_(b)
            self.embed.copy_(p.embedding.weight)

    # -- the host side ------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, embeds: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, uniforms: torch.Tensor,
               sampling: Sampling, stops: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample up to T = uniforms.shape[1] tokens for each of the B rows of `rows` (row b
        continues prompt rows[b] of the left-padded embeds [U, P, H], mask [U, P]); `uniforms`
        [B, T] are each row's uniforms. A row stops after one of `stops`. Returns tokens
        [B, T] (pad after a stop), their log-probabilities [B, T] (0 after a stop), lengths
        [B] and done [B], as `Policy.generate`'s loop computes them."""
        positions = token_positions(mask)
        last = self.fast.prefill(embeds, mask, positions, capacity=mask.shape[1], rows=rows)  # [B, V]; the cache [B, kv, P, d]
        keys, values, valid = self.fast.keys, self.fast.values, self.fast.valid
        self.fast.keys, self.fast.values, self.fast.valid = [], [], None  # copied into the bucket's cache below
        return self._run(keys, values, valid, last, positions[rows, -1] + 1, uniforms, sampling, stops, pad_id)[:4]

    @torch.no_grad()
    def sample_cached(self, keys: list[torch.Tensor], values: list[torch.Tensor], last: torch.Tensor, position: torch.Tensor,
                      uniforms: torch.Tensor, sampling: Sampling, stops: torch.Tensor, pad_id: int,
                      extra: torch.Tensor | None = None):
        """Sample after a prefill run elsewhere (transformers): each layer's keys and values [B,
        kv, P, d], or [1, kv, P, d] for one prompt all B rows continue (rotary embedding applied;
        every position a token), the last logits [B, V],
        each row's next position [B]; `extra` [B, T, H] is added to the embedding of step t's
        token. Returns what `sample` does and, with `record`, each step's final hidden state
        plus its input [B, T, H] (else None)."""
        valid = torch.ones(last.shape[0], keys[0].shape[2], dtype=torch.bool, device=last.device)
        return self._run(keys, values, valid, last, position, uniforms, sampling, stops, pad_id, extra)

    def _run(self, keys, values, valid, last, position, uniforms, sampling, stops, pad_id, extra=None):
        if stops.numel() > MAX_STOPS:
            raise ValueError(f"{stops.numel()} stop tokens; the static decoder holds at most {MAX_STOPS}")
        (B, T), P = uniforms.shape, keys[0].shape[2]
        graph = self._graph(batch_bucket(B), capacity_bucket(P + T), sampling.top_p < 1.0, extra is not None)
        graph.load(keys, values, valid, last, position, uniforms, sampling, stops, pad_id, extra)
        del keys, values
        for t in range(T):
            graph.step()
            if t == T - 1 or ((t + 1) % self.check_every == 0 and bool(graph.done[:B].all())):
                break
        s = graph.state
        recorded = s.record[:B, :T].clone() if s.record is not None else None
        return s.out[:B, :T].clone(), s.logps[:B, :T].clone(), s.lengths[:B].clone(), s.done[:B].clone(), recorded

    def _graph(self, rows: int, capacity: int, nucleus: bool, extra: bool) -> "_Graph":
        key = (rows, capacity, nucleus, extra)
        if key in self._graphs:
            self._graphs.move_to_end(key)
            return self._graphs[key]
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        self._graphs[key] = _Graph(self, rows, capacity, nucleus, extra)
        return self._graphs[key]

    def rope(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [capacity, head_dim] of positions 0..capacity-1, from the model's rotary module."""
        if capacity not in self._rope:
            probe = torch.zeros(1, capacity, 1, dtype=self.dtype, device=self.device)
            cos, sin = self.fast.decoder.rotary_emb(probe, torch.arange(capacity, device=self.device)[None])
            self._rope = {capacity: (cos[0].contiguous(), sin[0].contiguous())}  # one table: the latest capacity
        return self._rope[capacity]

    @property
    def graphs(self) -> list[tuple]:
        """The cached buckets: (batch, capacity, nucleus, extra) and whether each replays a CUDA graph."""
        return [(*key, g.graph is not None) for key, g in self._graphs.items()]


class _Graph:
    """One bucket: its static state and its step, captured as a CUDA graph on CUDA."""

    def __init__(self, owner: StaticDecoder, rows: int, capacity: int, nucleus: bool, extra: bool) -> None:
        f = owner.fast
        dev, dtype = owner.device, owner.dtype
        self.owner, self.rows, self.capacity, self.nucleus = owner, rows, capacity, nucleus
        cos, sin = owner.rope(capacity)
        V = f.head[0].shape[0]
        self.state = s = SimpleNamespace(
            keys=[torch.zeros(rows, f.n_kv, capacity, f.head_dim, dtype=dtype, device=dev) for _ in f.layers],
            values=[torch.zeros(rows, f.n_kv, capacity, f.head_dim, dtype=dtype, device=dev) for _ in f.layers],
            # the attention mask as it is added to the scores: 0 where a row may attend, else -inf
            bias=torch.zeros(rows, capacity, dtype=torch.float32, device=dev),
            last=torch.zeros(rows, V, dtype=torch.float32, device=dev),  # the logits the next token is sampled from
            position=torch.zeros(rows, dtype=torch.long, device=dev),  # the next token's position
            uniforms=torch.zeros(rows, capacity, dtype=torch.float32, device=dev),
            out=torch.zeros(rows, capacity, dtype=torch.long, device=dev),
            logps=torch.zeros(rows, capacity, dtype=torch.float32, device=dev),
            lengths=torch.zeros(rows, dtype=torch.long, device=dev),
            done=torch.ones(rows, dtype=torch.bool, device=dev),
            t=torch.zeros(1, dtype=torch.long, device=dev),  # the step
            start=torch.zeros(1, dtype=torch.long, device=dev),  # the prompt's length: the cache slot of step 0
            stops=torch.full((MAX_STOPS,), -1, dtype=torch.long, device=dev),
            pad=torch.zeros((), dtype=torch.long, device=dev),
            sampling=SimpleNamespace(temperature=torch.ones((), device=dev), top_p=torch.ones((), device=dev)),
            cos=cos, sin=sin,
            # per step: an addition to the token's embedding (in), its final hidden state plus its input (out)
            extra=torch.zeros(rows, capacity, owner.embed.shape[1], dtype=dtype, device=dev) if extra else None,
            record=torch.zeros(rows, capacity, f.layers[0]["qkv"][0].shape[1], dtype=dtype, device=dev) if owner.record else None,
        )
        self.done = s.done
        self.graph = None
        # the step as it runs: compiled by torch.compile (inductor) with `compile`, else as written
        self.run = _compiled(self._step) if owner.compile else self._step
        if dev.type == "cuda":
            self.graph = self._capture(owner._pool)

    def _capture(self, pool):
        try:
            with torch.cuda.device(self.owner.device):
                return self._capture_here(pool)
        except Exception as error:  # noqa: BLE001 - the eager step computes the same; say so and go on
            torch.cuda.synchronize(self.owner.device)
            warnings.warn(f"capturing the decode step as a CUDA graph failed ({error!r}); it runs eagerly (same results, slower)",
                          stacklevel=3)
            return None

    def _capture_here(self, pool):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up (compilation, cuBLAS handles, allocator) on a side stream, as capture requires
                self.run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread-local: a Ray worker's other threads may touch CUDA while this captures
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            self.run()
        return graph

    def load(self, keys: list[torch.Tensor], values: list[torch.Tensor], valid: torch.Tensor, last: torch.Tensor,
             position: torch.Tensor, uniforms: torch.Tensor, sampling: Sampling, stops: torch.Tensor, pad_id: int,
             extra: torch.Tensor | None) -> None:
        """A generation's state: the prefill's cache [B, kv, P, d] and valid positions [B, P], its
        last logits, each row's next position, its uniforms, the sampling settings, the stop
        tokens, the pad id and the per-step additions to the input."""
        s, (B, T) = self.state, uniforms.shape
        P = keys[0].shape[2]
        for mine, theirs in zip(s.keys + s.values, keys + values):
            mine[:B, :, :P] = theirs
        s.bias.fill_(float("-inf"))
        s.bias[:B, :P].masked_fill_(valid[:, :P], 0.0)
        s.bias[B:, 0] = 0.0  # a padded row attends to one (zero) key: no empty softmax
        s.last.zero_()
        s.last[:B] = last
        s.position.zero_()
        s.position[:B] = position
        s.uniforms.zero_()
        s.uniforms[:B, :T] = uniforms
        if s.extra is not None:
            s.extra.zero_()
            s.extra[:B, : extra.shape[1]] = extra[:, : s.extra.shape[1]]
        s.out.fill_(pad_id)
        s.logps.zero_()
        s.lengths.fill_(T)
        s.done.fill_(True)
        s.done[:B] = False
        s.t.zero_()
        s.start.fill_(P)
        s.stops.fill_(-1)
        s.stops[: stops.numel()] = stops
        s.pad.fill_(pad_id)
        s.sampling.temperature.fill_(sampling.temperature)
        s.sampling.top_p.fill_(sampling.top_p)

    def step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.run()

    # -- the device side: fixed shapes, no host reads ------------------------------------
    def _step(self) -> None:
        s, f = self.state, self.owner.fast
        # sample this step's token from the last logits (top_p is a Python choice of the bucket)
        uniforms = s.uniforms.index_select(1, s.t).squeeze(1)
        if self.nucleus:  # a Python choice, made per bucket: the sampler reads no tensor on the host
            token, logp = sample_nucleus(s.last, uniforms, s.sampling.temperature, s.sampling.top_p)
        else:
            token, logp = sample_full(s.last, uniforms, s.sampling.temperature)
        token = torch.where(s.done, s.pad, token)
        s.out.index_copy_(1, s.t, token.unsqueeze(1))
        s.logps.index_copy_(1, s.t, torch.where(s.done, 0.0, logp).unsqueeze(1))
        newly = ~s.done & (token.unsqueeze(1) == s.stops).any(-1)
        s.lengths.copy_(torch.where(newly, s.t + 1, s.lengths))
        s.done.logical_or_(newly)
        # run it: its key and value go to cache slot start + t
        slot = s.start + s.t
        s.bias.index_fill_(1, slot, 0.0)
        x = embedded = self.owner.embed.index_select(0, token).to(self.owner.dtype)
        if s.extra is not None:
            x = embedded = embedded + s.extra.index_select(1, s.t).squeeze(1)
        if self.owner.input_proj is not None:
            x = linear(embedded, *self.owner.input_proj)
        B, H = x.shape
        cos = s.cos.index_select(0, s.position).view(B, 1, -1)
        sin = s.sin.index_select(0, s.position).view(B, 1, -1)
        bias = s.bias.view(B, 1, 1, -1)
        group = f.n_heads // f.n_kv
        for i, w in enumerate(f.layers):
            h = rms_norm(x, *w["norm1"])
            qkv = linear(h, *w["qkv"]).view(B, f.n_heads + 2 * f.n_kv, -1)
            qk = _rope(qkv[:, : f.n_heads + f.n_kv], cos, sin)  # q's and k's heads at once: one set of kernels
            q = qk[:, : f.n_heads]
            s.keys[i].index_copy_(2, slot, qk[:, f.n_heads :].unsqueeze(2))
            s.values[i].index_copy_(2, slot, qkv[:, f.n_heads + f.n_kv :].unsqueeze(2))
            attn = _decode_attention(q.view(B, f.n_kv, group, -1), s.keys[i], s.values[i], bias, w["scale"])
            x = linear(attn.reshape(B, -1), *w["o"], residual=x)
            h = rms_norm(x, *w["norm2"])
            x = linear(swiglu(linear(h, *w["gate_up"])), *w["down"], residual=x)
        hidden = rms_norm(x, *f.final_norm)
        if s.record is not None:
            s.record.index_copy_(1, s.t, (hidden + embedded).unsqueeze(1))
        logits = linear(hidden, *f.head).float()
        if self.owner.allowed is not None:
            logits = logits.masked_fill(~self.owner.allowed, float("-inf"))
        s.last.copy_(logits)
        s.position.add_(1)
        s.t.add_(1)


def _compiled(step: Callable[[], None]) -> Callable[[], None]:
    """`step` compiled whole (no graph breaks) for its fixed shapes; if compiling fails, a
    warning says why and `step` runs as written (the same results)."""
    compiled = torch.compile(step, dynamic=False, fullgraph=True)
    state = {"run": compiled}

    def run() -> None:
        try:
            state["run"]()
        except Exception as error:  # noqa: BLE001 - compilation fails before anything runs
            if state["run"] is step:
                raise
            warnings.warn(f"torch.compile of the decode step failed ({type(error).__name__}: {str(error)[:300]}); "
                          "it runs uncompiled (same results)", stacklevel=2)
            state["run"] = step
            step()

    return run


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [B, heads, d] at cos/sin [B, 1, d], as transformers writes it
    (x * cos + rotate_half(x) * sin), out of place: what torch.compile can trace."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per row: q [B, KV, G, d] (the G query heads of each KV head) over the
    cache keys/values [B, KV, S, d], bias [B, 1, 1, S] (0 or -inf). Returns [B, KV, G, d]."""
    scores = torch.matmul(q, keys.transpose(-1, -2)).float().mul_(scale).add_(bias)
    return torch.matmul(torch.softmax(scores, dim=-1).to(values.dtype), values)
