"""Data-parallel RL training (`rl.trainers`) on one machine: N=1 against N=2, and where
the rollouts are generated.

Part 1 runs the embedded demo's GRPO stage (no SFT, 2 prompts x 8 responses per step, 2
minibatches) for LoRA and full weights, first in one process (rl.trainers=1), then with
two trainer ranks (Ray actors, gloo; the ranks generate too), one torch thread per
process. It reports samples per second, the time of each phase of a step, and each
step's gradient all-reduce: bytes sent per rank and seconds.

Part 2 (LoRA; 4 prompts x 8 responses of up to 48 tokens, so generation weighs more)
compares where generation runs: in the one trainer process; colocated in two trainer
ranks (each generates half the prompts, then both train); in a separate Ray rollout
worker beside two ranks (the worker generates while the ranks wait, then the ranks
train while it waits, and it takes the new adapter each step); and one trainer with one
worker generating the next step's rollouts while the trainer updates
(`rollouts.async_generation`, one step off-policy). Results: BENCHMARKS.md.

    .venv/bin/python bench/bench_trainers.py --steps 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from vocalign.rl.config import Recipe
from vocalign.rl.recipe import load_recipe
from vocalign.rl.runner import train
from vocalign.rl.tracking import read_metrics

PHASES = ("rollout", "reward", "batch", "reference", "advantage", "update", "sync")


KEYS = ["throughput/samples_per_s", "time/step_s", "trainers/allreduce_bytes", "trainers/allreduce_s", "sync/bytes",
        *(f"time/{p}_s" for p in PHASES)]

# part 2: where generation runs (name, overrides)
PLACEMENTS = [
    ("one process", ["rl.trainers=1"]),
    ("2 ranks, colocated", ["rl.trainers=2"]),
    ("2 ranks + 1 rollout worker", ["rl.trainers=2", "rollouts.num_workers=1", "rollouts.cpus_per_worker=0"]),
    ("1 trainer + 1 worker, async", ["rl.trainers=1", "rollouts.num_workers=1", "rollouts.async_generation=true"]),
]


def run(name: str, steps: int, out: Path, *more: str, prompts: int = 2, tokens: int = 24) -> dict:
    """The medians over steps 2.. of one run's per-step metrics."""
    overrides = [
        "sft.steps=0", f"rl.steps={steps}", "data.rl_tasks[0].n=64", "data.eval_prompts=4", "eval.suites=[]",
        f"rl.prompts_per_step={prompts}", "rl.group_size=8", "rl.minibatches=2", f"rl.max_new_tokens={tokens}",
        "logging.wandb=false", "logging.audio_every=0", "run.progress=false", f"run.save_every={steps}",
        f"run.output_dir={out / name.replace(' ', '_')}", *more,
    ]
    run_dir = train(load_recipe("demo", overrides, Recipe), "demo")
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("stage") == "rl"][1:]
    return {k: statistics.median(r.get(k, 0.0) for r in rows) for k in KEYS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="RL steps per run; the first is not counted")
    parser.add_argument("--out", type=Path, default=None, help="write the tables as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the driver, like each rank and worker
    ranks, placements = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for weights in ("lora", "full"):
            for trainers in (1, 2):
                more = [f"rl.trainers={trainers}", *([] if weights == "lora" else ["rl.lora.enabled=false"])]
                ranks.append({"weights": weights, "trainers": trainers,
                              **run(f"{weights}-{trainers}", args.steps, Path(tmp), *more)})
        for name, more in PLACEMENTS:
            placements.append({"generation": name, **run(name, args.steps, Path(tmp), *more, prompts=4, tokens=48)})
    print("| weights | trainers | samples/s | step s | " + " | ".join(PHASES) + " | all-reduce MB/step | all-reduce s/step |")
    print("|---|---:|---:|---:|" + "---:|" * len(PHASES) + "---:|---:|")
    for r in ranks:
        phases = " | ".join(f"{r[f'time/{p}_s']:.3f}" for p in PHASES)
        print(f"| {r['weights']} | {r['trainers']} | {r['throughput/samples_per_s']:.1f} | {r['time/step_s']:.2f} | {phases} | "
              f"{r['trainers/allreduce_bytes'] / 1e6:.2f} | {r['trainers/allreduce_s']:.3f} |")
    print()
    print("| generation | samples/s | step s | rollout | update | sync | sync MB/step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in placements:
        print(f"| {r['generation']} | {r['throughput/samples_per_s']:.1f} | {r['time/step_s']:.2f} | {r['time/rollout_s']:.3f} | "
              f"{r['time/update_s']:.3f} | {r['time/sync_s']:.3f} | {r['sync/bytes'] / 1e6:.2f} |")
    if args.out:
        args.out.write_text(json.dumps({"ranks": ranks, "generation": placements}, indent=1))


if __name__ == "__main__":
    main()
