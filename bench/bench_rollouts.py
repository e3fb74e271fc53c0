"""Rollout throughput in-process and on Ray workers, and the cost of a weight sync.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_rollouts.py [--prompts 16] [--samples 8]
        [--max-new-tokens 48] [--workers 1 2] [--repeats 3] [--threads 1] [--gpus-per-worker 0]

The same work every way: `--prompts` spoken arithmetic questions x `--samples` samples,
`--max-new-tokens` tokens at most, speech rendered (render_speech on). The policy is the
embedded one with its output biased towards `<tts_start>` and 20 audio units (an
untrained policy almost never speaks, and rendering is part of a rollout's cost), so
most responses carry a waveform back from the workers.

Each configuration generates once untimed (warm-up), then `--repeats` times; the table
gives the median. Every Ray run is checked against the in-process tokens (same seed,
same samples). "Ray overhead" is the 1-worker time minus the in-process time: the
transfer of prompts and rollouts (waveforms included) and Ray's call latency.

Weight sync: the trainable state of a LoRA policy (r=8, the recipe default: the adapter
only) and of a full-weight policy (everything but the frozen audio encoder), sent to
every worker of the largest group (`sync`), then checked (`verify`: every worker hashes
its weights). Writes bench/results/rollouts.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from vocalign.data.tasks import make_task
from vocalign.data.types import Rollout
from vocalign.model import chat
from vocalign.model.loading import embedded_policy
from vocalign.model.policy import Policy, Sampling
from vocalign.common.ray_cluster import ensure_ray
from vocalign.rollouts.group import RolloutGroup
from vocalign.rollouts.sync import state_checksum
from vocalign.rollouts.worker import RolloutWorker

RESULTS = Path(__file__).parent / "results" / "rollouts.json"
LORA = {"r": 8, "alpha": 16}


def speaking_policy(lora: bool = False) -> Policy:
    """The embedded policy, biased to open speech and say audio units 40-59."""
    policy = embedded_policy(0)
    head = policy.model.lm.lm_head
    bias = torch.zeros(head.out_features)
    bias[policy.tokenizer.special[chat.TTS_START]] = 4.0
    bias[policy.tokenizer.audio_offset + 40 : policy.tokenizer.audio_offset + 60] = 4.0
    head.bias = nn.Parameter(bias)
    if lora:
        policy.enable_lora(**LORA)
    policy.freeze_encoder()
    return policy


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of `repeats` calls after one warm-up call, and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def throughput(name: str, seconds: float, rollouts: list[Rollout], reference: list[Rollout]) -> dict:
    tokens = sum(len(r.response_ids) for r in rollouts)
    return {
        "name": name, "seconds": seconds, "responses_per_s": len(rollouts) / seconds, "tokens_per_s": tokens / seconds,
        "tokens": tokens, "speaking": sum(r.waveform is not None for r in rollouts),
        "audio_seconds": sum(r.speech_seconds for r in rollouts),
        "same_tokens_as_in_process": [r.response_ids for r in rollouts] == [r.response_ids for r in reference],
    }


def sync_cost(lora: bool, workers: int, repeats: int, args: argparse.Namespace) -> dict:
    policy = speaking_policy(lora)
    with RolloutGroup(policy, workers, render_speech=False, torch_threads=args.threads,
                      gpus_per_worker=args.gpus_per_worker, lora_config=LORA if lora else None) as group:
        syncs, verifies = [], []
        for version in range(1, repeats + 2):
            with torch.no_grad():
                for p in policy.trainable_parameters():
                    p.add_(1e-3)  # a new version of the weights each time
            state = policy.trainable_state()
            stats = group.sync(state, version)
            t = time.perf_counter()
            group.verify(version, state_checksum(state))
            if version > 1:  # the first is the warm-up
                syncs.append(stats["seconds"])
                verifies.append(time.perf_counter() - t)
        return {
            "weights": "LoRA r=8 adapter" if lora else "full (encoder frozen)", "workers": workers,
            "tensors": len(state), "bytes": int(stats["bytes"]), "sync_s": statistics.median(syncs),
            "verify_s": statistics.median(verifies),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in-process and in each worker")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, help="> 0: workers (and the in-process run) on GPU")
    parser.add_argument("--address", default=None, help="a Ray cluster to join (default: a local Ray)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if args.gpus_per_worker > 0 else "cpu"
    prompts = make_task("arithmetic", args.prompts, seed=0)
    sampling = Sampling(max_new_tokens=args.max_new_tokens)
    policy = speaking_policy()
    policy.model.to(device)
    ensure_ray(num_cpus=max(args.workers), address=args.address)

    def generate(worker) -> list[Rollout]:
        return worker.generate(prompts, args.samples, sampling, seed=1)

    seconds, reference = timed(lambda: generate(RolloutWorker(policy, render_speech=True)), args.repeats)
    rows = [throughput("in-process", seconds, reference, reference)]
    for workers in args.workers:
        t = time.perf_counter()
        with RolloutGroup(policy, workers, render_speech=True, torch_threads=args.threads,
                          gpus_per_worker=args.gpus_per_worker) as group:
            startup = time.perf_counter() - t
            seconds, rollouts = timed(lambda: generate(group), args.repeats)
        rows.append(throughput(f"Ray, {workers} worker{'s' if workers > 1 else ''}", seconds, rollouts, reference) | {"startup_s": startup})
    syncs = [sync_cost(lora, max(args.workers), args.repeats, args) for lora in (True, False)]

    base = rows[0]["seconds"]
    one = next((r for r in rows if r["name"] == "Ray, 1 worker"), None)
    overhead = None if one is None else {"seconds": one["seconds"] - base, "fraction": one["seconds"] / base - 1}
    print(f"{args.prompts} prompts x {args.samples} samples, max_new_tokens {args.max_new_tokens}, render_speech on, "
          f"torch threads {args.threads}, device {device}; median of {args.repeats}\n")
    print("| rollouts | s per batch | responses/s | tokens/s | speaking | same tokens | worker startup (s) |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for r in rows:
        start = f"{r['startup_s']:.1f}" if "startup_s" in r else "-"
        print(f"| {r['name']} | {r['seconds']:.2f} | {r['responses_per_s']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['speaking']}/{len(reference)} | {'yes' if r['same_tokens_as_in_process'] else 'NO'} | {start} |")
    if overhead is not None:
        print(f"\nRay overhead (1 worker vs in-process): {overhead['seconds']:+.2f} s per batch ({overhead['fraction']:+.0%})")
    print("\n| weights synced | workers | tensors | bytes per sync | sync (s) | verify (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for s in syncs:
        print(f"| {s['weights']} | {s['workers']} | {s['tensors']} | {s['bytes']:,} | {s['sync_s']:.3f} | {s['verify_s']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"config": config, "device": device, "generation": rows,
                                    "ray_overhead": overhead, "sync": syncs}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
