"""Decoding speed at a GRPO-shaped batch against the memory-bandwidth limit.

    python bench/bench_decode.py [--device cuda] [--preset 0.5b|embedded] [--dtype bfloat16]
        [--prompts 16] [--group 8] [--new-tokens 256] [--repeats 3] [--engines static,fast,hf_generate,...]

The model is a Qwen2 decoder built from a config with random weights: `0.5b` has
Qwen2-0.5B's shapes (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, its
151,936-token vocabulary, tied embeddings), `embedded` the embedded Step-Audio-2-style
model's language model. `--prompts` random prompts of 32 to 48 tokens (left-padded) are
each sampled `--group` times for exactly `--new-tokens` tokens (no stop token), so every
engine produces the same number of tokens. Engines:

- `static`: vocalign's static decoder (static KV cache, fixed attention, the step a CUDA
  graph on CUDA) - what `rollouts.engine: auto` samples with on a GPU;
- `static_compiled`: the same with its step compiled by torch.compile first
  (`rollouts.compile: true`; the first run includes the compilation);
- `fast`: vocalign's fast decoder (what `auto` samples with on a CPU);
- `hf_loop`: vocalign's loop over the `transformers` forward (`rollouts.engine: hf`);
- `hf_generate`: `transformers`' `generate` as it comes (sampling, dynamic cache);
- `hf_generate_static`: `generate` with `cache_implementation="static"`, and `transformers`'
  own compilation of the forward where it applies it (`hf_generate_static_eager`: with
  `disable_compile=True`).

The limit: each decode step must read every weight once (the tied LM head once) and the
keys and values of every position so far; their bytes summed over the steps, divided by
the device's copy bandwidth measured here (a device-to-device copy, bytes read plus
written), is the time no decoder can beat at this batch. `--check` first compares the
static decoder with the fast one in float32 (TF32 off) on this device: sampled tokens and
log-probabilities. Writes one JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

ENGINES = ("static", "static_compiled", "fast", "hf_loop", "hf_generate", "hf_generate_static", "hf_generate_static_eager")


def qwen2_config(preset: str):
    from transformers import Qwen2Config

    if preset == "0.5b":
        return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                           num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                           rope_theta=1_000_000.0, tie_word_embeddings=True)
    from vocalign.model import chat
    from vocalign.model.detokenizer import build_detokenizer
    from vocalign.model.step_audio2 import tiny_config
    from vocalign.model.tokenizer import ChatTokenizer, build_tokenizer

    tokenizer = ChatTokenizer(build_tokenizer(len(build_detokenizer("espeak_units").units)))
    return Qwen2Config(**tiny_config(len(tokenizer), tokenizer.special[chat.AUDIO_PATCH]).text)


def build(preset: str, device: str, dtype: torch.dtype):
    from transformers import Qwen2ForCausalLM

    from vocalign.model.hf_text import CausalTextLM

    torch.manual_seed(0)
    config = qwen2_config(preset)
    config.pad_token_id, config.eos_token_id, config.bos_token_id = 0, None, None
    return CausalTextLM(Qwen2ForCausalLM(config).to(device=device, dtype=dtype).eval())


def make_batch(model, prompts: int, group: int, new_tokens: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    vocab = model.lm.config.vocab_size
    lengths = torch.randint(32, 49, (prompts,), generator=g)
    P = int(lengths.max())
    ids = torch.randint(1, vocab, (prompts, P), generator=g)
    mask = (torch.arange(P)[None] >= P - lengths[:, None]).long()
    ids = ids * mask  # left padding: id 0
    rows = torch.arange(prompts).repeat_interleave(group)
    uniforms = torch.rand(prompts * group, new_tokens, generator=g)
    return ids.to(device), mask.to(device), rows.to(device), uniforms.to(device)


def weight_bytes(model) -> int:
    """Bytes of what one decode step reads: every decoder weight and the LM head, once."""
    lm = model.lm
    seen, total = set(), 0
    for name, p in lm.named_parameters():
        if "embed_tokens" in name and not lm.config.tie_word_embeddings:
            continue  # an untied table is looked up (a row per token), not read whole
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def kv_bytes_per_position(model) -> int:
    c = model.lm.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * next(model.parameters()).element_size()


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a device-to-device copy of 1 GiB (read + written), the best of 10."""
    n = 1 << 30 if device == "cuda" else 1 << 27
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(12):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n / best


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_engine(name: str, model, batch, new_tokens: int, state: dict):
    """One generation of the whole batch; returns the tokens [B, T]."""
    from vocalign.model.decoding import decode
    from vocalign.model.engine import FastDecoder
    from vocalign.model.sampling import Sampling
    from vocalign.model.static_decoder import StaticDecoder

    ids, mask, rows, uniforms = batch
    if name in ("static", "static_compiled", "fast", "hf_loop"):
        if name.startswith("static"):
            if name not in state:
                state[name] = StaticDecoder(model, compile=name == "static_compiled")
            else:
                state[name].refresh(model)  # as Policy.generate does before each generation
            engine = state[name]
        else:
            engine = FastDecoder(model) if name == "fast" else None
        embeds = model.input_embeddings(ids, None)
        stops = torch.tensor([-1], device=ids.device)  # no stop token: every row runs new_tokens
        return decode(model, engine, embeds, mask, rows, uniforms, Sampling(max_new_tokens=new_tokens), stops, 0)[0]
    options = {"cache_implementation": "static"} if name.startswith("hf_generate_static") else {}
    if name == "hf_generate_static_eager":
        options["disable_compile"] = True
    return model.lm.generate(input_ids=ids[rows], attention_mask=mask[rows], do_sample=True, top_k=0, top_p=1.0,
                             temperature=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                             **options)[:, ids.shape[1]:]


def check(args) -> dict:
    """The static decoder against the fast one, float32 with TF32 off, on this device."""
    from vocalign.model.decoding import decode
    from vocalign.model.engine import FastDecoder
    from vocalign.model.sampling import Sampling
    from vocalign.model.static_decoder import StaticDecoder

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model = build(args.preset, args.device, torch.float32)
    ids, mask, rows, uniforms = make_batch(model, 4, 4, 32, args.device, seed=1)
    embeds = model.input_embeddings(ids, None)
    stops = torch.tensor([-1], device=ids.device)
    static = StaticDecoder(model)
    got = decode(model, static, embeds, mask, rows, uniforms, Sampling(max_new_tokens=32, temperature=1.3), stops, 0)
    want = decode(model, FastDecoder(model), embeds, mask, rows, uniforms, Sampling(max_new_tokens=32, temperature=1.3), stops, 0)
    same = (got[0] == want[0]).all(-1)
    both = got[0] == want[0]
    return {"rows_with_the_same_tokens": f"{int(same.sum())}/{len(same)}",
            "logprob_max_difference_where_tokens_agree": float((got[1] - want[1]).abs()[both].max()),
            "graphs": static.graphs}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", choices=["0.5b", "embedded"], default="0.5b")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--engines", default="static,fast,hf_generate")
    p.add_argument("--check", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    engines = args.engines.split(",")
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise SystemExit(f"--engines: unknown {unknown}; choose from {', '.join(ENGINES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here; use --device cpu")
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    import transformers

    report = {
        "command": " ".join(["bench/bench_decode.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "transformers": transformers.__version__, "preset": args.preset, "dtype": args.dtype,
        "rows": args.prompts * args.group, "new_tokens": args.new_tokens,
    }
    if args.check:
        report["check_float32"] = check(args)
        print("check (float32):", report["check_float32"], flush=True)
    model = build(args.preset, args.device, getattr(torch, args.dtype))
    batch = make_batch(model, args.prompts, args.group, args.new_tokens, args.device)
    B, T, P = args.prompts * args.group, args.new_tokens, batch[0].shape[1]
    lengths = batch[1].sum(-1)[batch[2]]  # each row's prompt length
    per_step = [weight_bytes(model) + int((lengths + t + 1).sum()) * kv_bytes_per_position(model) for t in range(T)]
    bandwidth = copy_bandwidth(args.device)
    report["limit"] = {"weight_bytes": weight_bytes(model), "kv_bytes_per_position": kv_bytes_per_position(model),
                       "bytes_read": sum(per_step), "copy_bandwidth_bytes_per_s": bandwidth,
                       "seconds": sum(per_step) / bandwidth, "prompt_tokens": P}
    print(f"limit: {sum(per_step) / 1e9:.1f} GB read over {T} steps at {bandwidth / 1e12:.2f} TB/s = "
          f"{report['limit']['seconds'] * 1e3:.1f} ms", flush=True)
    state, times = {}, {}
    for name in engines:  # each alone: a warm-up (graph capture, compilation), then the repeats
        runs = []
        for r in range(args.repeats + 1):
            sync(args.device)
            start = time.perf_counter()
            tokens = run_engine(name, model, batch, T, state)
            sync(args.device)
            if r:
                runs.append(time.perf_counter() - start)
            else:
                warm = time.perf_counter() - start
        assert tokens.shape == (B, T), f"{name} produced {tuple(tokens.shape)} tokens, not {(B, T)}"
        s = statistics.median(runs)
        times[name] = {"seconds": s, "runs": runs, "first_run_seconds": warm, "tokens_per_s": B * T / s,
                       "times_the_limit": s / report["limit"]["seconds"]}
        if name.startswith("static"):
            times[name]["graphs"] = state[name].graphs
        print(f"{name}: {s:.3f} s ({B * T / s:,.0f} tokens/s, {s / report['limit']['seconds']:.1f}x the limit; "
              f"first run {warm:.1f} s)", flush=True)
    for name, t in times.items():
        if "hf_generate" in times:
            t["speedup_over_hf_generate"] = times["hf_generate"]["seconds"] / t["seconds"]
    report["engines"] = times
    out = Path(args.out or Path(__file__).parent / "results" / f"decode-{args.device}-{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
