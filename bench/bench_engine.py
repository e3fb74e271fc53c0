"""vocalign's fast paths against the `transformers` paths they replace, on any device.

    .venv/bin/python bench/bench_engine.py [--device cpu|cuda] [--preset tiny|bench|0.5b]
        [--dtype float32|bfloat16] [--prompts 16] [--group 8] [--new-tokens 64] [--repeats 3]

Two parts, on a Qwen2 built from a config (random weights, the embedded tokenizer's
1,024-token vocabulary; `0.5b` has Qwen2-0.5B's decoder shapes: hidden 896, 24 layers,
14 heads, 2 KV heads, intermediate 4864):

1. **Agreement**, in float32 on the chosen device (TF32 off): `Policy.generate` through
   the fast decoder and through `transformers` from the same seeds (tokens equal,
   log-probs within 1e-4), and the training forward (`FastForward` with shared prompts
   against `transformers` running every row whole): log-probs and the gradient of every
   weight, under LoRA and with full weights.
2. **Time**, in `--dtype`: one GRPO-shaped batch (`--prompts` prompts x `--group`
   samples, up to `--new-tokens` new tokens) generated, then one update (log-probs and
   entropies, backward, AdamW step), each with the fast paths (`rollouts.engine: auto`,
   `rl.forward_engine: auto`, shared prompts) and with the `transformers` paths
   (`hf`, each row whole); the median of `--repeats` after one warm-up. The model FLOP/s
   of the update's forward and backward (6 x matmul parameters x useful tokens over their
   time, the optimiser step left out; see `update_flops`) and, on a GPU, that MFU against
   the datasheet's dense peak and against a measured 8192^3 matmul.

Prints a Markdown table and writes bench/results/engine-<device>-<preset>.json (`--out`).
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

from vocalign.data.types import Message, Prompt
from vocalign.model.hf_text import CausalTextLM, text_policy
from vocalign.model.lora import LORA_TARGETS
from vocalign.model.policy import Policy, Sampling
from vocalign.model.tokenizer import ChatTokenizer, build_tokenizer

PRESETS = {  # hidden, layers, heads, kv heads, intermediate
    "tiny": (64, 2, 4, 2, 128),
    "bench": (256, 4, 4, 2, 768),  # bench_trl.py's model
    "0.5b": (896, 24, 14, 2, 4864),  # Qwen2-0.5B's decoder
}


def make_policy(tokenizer: ChatTokenizer, preset: str, device: str, dtype: torch.dtype, seed: int = 0) -> Policy:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, layers, heads, kv, inner = PRESETS[preset]
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=inner, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eot_id,
    )
    return text_policy(CausalTextLM(Qwen2ForCausalLM(config).to(device=device, dtype=dtype)), tokenizer)


def make_prompts(n: int) -> list[Prompt]:
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    return [Prompt(f"p{i}", [Message("human", f"what is {words[i % 9]} plus {words[(3 * i + 1) % 9]}" + " please" * (i % 3))])
            for i in range(n)]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def use(policy: Policy, fast: bool) -> None:
    policy.decode_engine = policy.forward_engine = "auto" if fast else "hf"
    policy.shared_prompt_forward = fast


def training_batch(policy: Policy, prompts: list[Prompt], group: int, new_tokens: int, seed: int):
    encoded = policy.encode_prompts(prompts)
    gens = policy.generate(encoded, group, Sampling(max_new_tokens=new_tokens), seed=seed)
    return policy.sequences([encoded.ids[g.prompt_index] for g in gens], [g.response_ids for g in gens],
                            [encoded.encoded[g.prompt_index] for g in gens]), gens


# -- 1. agreement -----------------------------------------------------------------------------
def agreement(tokenizer: ChatTokenizer, args) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    out = {}
    prompts = make_prompts(min(args.prompts, 4))
    for variant in ("full", "lora"):
        policy = make_policy(tokenizer, args.preset, args.device, torch.float32)
        if variant == "lora":
            policy.enable_lora(r=8, alpha=16, target_modules=list(LORA_TARGETS))
            with torch.no_grad():  # non-zero adapters, so merging and the LoRA forward matter
                for name, p in policy.model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(std=0.02)
        runs = {}
        for fast in (True, False):
            use(policy, fast)
            runs[fast] = policy.generate(policy.encode_prompts(prompts), 4, Sampling(max_new_tokens=min(args.new_tokens, 32)), seed=3)
        same_tokens = [a.response_ids == b.response_ids for a, b in zip(runs[True], runs[False])]
        logprob_gap = max(max((abs(x - y) for x, y in zip(a.logprobs, b.logprobs)), default=0.0)
                          for a, b in zip(runs[True], runs[False]))
        encoded = policy.encode_prompts(prompts)
        gens = runs[False]
        seq = policy.sequences([encoded.ids[g.prompt_index] for g in gens], [g.response_ids for g in gens],
                               [encoded.encoded[g.prompt_index] for g in gens])
        grads, logps = {}, {}
        for fast in (True, False):
            use(policy, fast)
            policy.model.zero_grad()
            logp, _ = policy.logprobs_and_entropy(seq)
            (logp.sum() / seq.response_mask.sum()).backward()
            logps[fast] = logp.detach()
            grads[fast] = {n: p.grad.detach().clone() for n, p in policy.model.named_parameters() if p.grad is not None}
        grad_gap = max(float((grads[True][n] - g).abs().max() / g.abs().max().clamp(min=1e-12)) for n, g in grads[False].items())
        out[variant] = {
            "rows_with_the_same_tokens": f"{sum(same_tokens)}/{len(same_tokens)}",
            "sampled_logprob_max_difference": logprob_gap,
            "training_logprob_max_difference": float((logps[True] - logps[False]).abs().max()),
            "gradient_max_relative_difference": grad_gap,
            "weights_with_gradients": len(grads[False]),
        }
    return out


# -- 2. time ----------------------------------------------------------------------------------
def timing(tokenizer: ChatTokenizer, args) -> dict:
    dtype = getattr(torch, args.dtype)
    policy = make_policy(tokenizer, args.preset, args.device, dtype)
    prompts = make_prompts(args.prompts)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-6)
    results = {key: {"generate_s": [], "update_s": [], "forward_backward_s": [], "tokens": [], "flops": []}
               for key in ("fast", "transformers")}
    for r in range(args.repeats + 1):  # the two take turns; round 0 is a warm-up
        for fast in (True, False):
            use(policy, fast)
            sync(args.device)
            start = time.perf_counter()
            seq, gens = training_batch(policy, prompts, args.group, args.new_tokens, seed=r)
            sync(args.device)
            mid = time.perf_counter()
            policy.model.train()
            logp, _ = policy.logprobs_and_entropy(seq)
            (-logp.float().sum() / seq.response_mask.sum()).backward()
            sync(args.device)
            backward_end = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(args.device)
            end = time.perf_counter()
            if r:
                got = results["fast" if fast else "transformers"]
                got["generate_s"].append(mid - start)
                got["update_s"].append(end - mid)
                got["forward_backward_s"].append(backward_end - mid)
                got["tokens"].append(sum(len(g.response_ids) for g in gens) / len(gens))
                got["flops"].append(update_flops(policy, seq))
    summary = {}
    for key, r in results.items():
        summary[key] = {
            "generate_s": statistics.median(r["generate_s"]), "update_s": statistics.median(r["update_s"]),
            "mean_response_tokens": statistics.mean(r["tokens"]),
        }
        summary[key]["samples_per_s"] = args.prompts * args.group / (summary[key]["generate_s"] + summary[key]["update_s"])
        summary[key]["update_model_tflop"] = statistics.median(r["flops"]) / 1e12
        summary[key]["update_forward_backward_s"] = statistics.median(r["forward_backward_s"])
        # the forward and backward alone (the optimiser step is not model FLOPs)
        summary[key]["update_tflops_per_s"] = statistics.median(f / s for f, s in zip(r["flops"], r["forward_backward_s"])) / 1e12
    if args.device == "cuda":
        summary["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        summary["peak_tflops"] = {"datasheet_dense": DATASHEET_TFLOPS.get(args.dtype, {}).get(
            next((k for k in DATASHEET_TFLOPS["bfloat16"] if k in torch.cuda.get_device_name()), ""), None),
            "measured_matmul": matmul_tflops(getattr(torch, args.dtype))}
        for key in ("fast", "transformers"):
            for peak, value in summary["peak_tflops"].items():
                if value:
                    summary[key][f"update_mfu_vs_{peak}"] = summary[key]["update_tflops_per_s"] / value
    return summary


# NVIDIA's datasheet dense tensor-core peaks (TFLOP/s, SXM parts): H100 and H200 989 in bf16, 494 in TF32
DATASHEET_TFLOPS = {"bfloat16": {"H100": 989.0, "H200": 989.0, "A100": 312.0}, "float32": {"H100": 494.0, "H200": 494.0, "A100": 156.0}}


def matmul_tflops(dtype: torch.dtype, n: int = 8192) -> float:
    """This GPU's measured matmul rate: an n x n x n product, the mean of 10 after 3 warm-ups."""
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * 10 / (time.perf_counter() - start) / 1e12


def update_flops(policy: Policy, seq) -> float:
    """Model FLOPs of one update on `seq`: 6 x (matmul parameters, the LM head included) per
    useful token (each distinct prompt's tokens once, each row's response tokens), attention's
    score and value products left out (under 2% at these lengths)."""
    lm = policy.model.lm
    config = lm.config
    params = sum(p.numel() for n, p in lm.named_parameters() if "embed_tokens" not in n and p.dim() == 2)
    params += config.vocab_size * config.hidden_size if config.tie_word_embeddings else 0
    P = seq.prompt_len
    prompts = seq.attention_mask[seq.prompt_rows, :P].sum()
    return 6.0 * params * float(prompts + seq.response_mask.sum())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", choices=sorted(PRESETS), default="bench")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-agreement", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False); use --device cpu")
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tokenizer = ChatTokenizer(build_tokenizer(0))
    report = {
        "command": " ".join(["bench/bench_engine.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "preset": args.preset, "shape": dict(zip(("hidden", "layers", "heads", "kv_heads", "intermediate"), PRESETS[args.preset])),
        "dtype": args.dtype, "batch": {"prompts": args.prompts, "group": args.group, "new_tokens": args.new_tokens},
    }
    if not args.skip_agreement:
        report["agreement_float32"] = agreement(tokenizer, args)
        for variant, a in report["agreement_float32"].items():
            print(f"agreement ({variant}): {a}", flush=True)
    report["time"] = timing(tokenizer, args)
    t = report["time"]
    print(f"\n{args.preset} on {report['device']} ({args.dtype}), {args.prompts} prompts x {args.group}, up to {args.new_tokens} new tokens:")
    print("| paths | generate s | update s | samples/s | response tokens |\n|---|---:|---:|---:|---:|")
    for key in ("fast", "transformers"):
        r = t[key]
        print(f"| {key} | {r['generate_s']:.3f} | {r['update_s']:.3f} | {r['samples_per_s']:.1f} | {r['mean_response_tokens']:.1f} |")
    print(f"fast / transformers: {t['fast']['samples_per_s'] / t['transformers']['samples_per_s']:.2f}x samples/s")
    out = Path(args.out or Path(__file__).parent / "results" / f"engine-{args.device}-{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
