"""Data-parallel RL training (`rl.trainers`) on one machine: N=1 against N=2.

Runs the embedded demo's GRPO stage (no SFT, 2 prompts x 8 responses per step, 2
minibatches) for LoRA and full weights, first in one process (rl.trainers=1), then with
two trainer ranks (Ray actors, gloo), one torch thread per process. Reports samples per
second, the time of each phase of a step, and each step's gradient all-reduce: bytes
sent per rank and seconds. Results: BENCHMARKS.md.

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


def run(trainers: int, weights: str, steps: int, out: Path) -> list[dict]:
    overrides = [
        "sft.steps=0", f"rl.steps={steps}", "data.rl_tasks[0].n=64", "data.eval_prompts=4", "eval.suites=[]",
        "rl.prompts_per_step=2", "rl.group_size=8", "rl.minibatches=2", "rl.max_new_tokens=24",
        "logging.wandb=false", "logging.audio_every=0", "run.progress=false", f"run.save_every={steps}",
        f"rl.trainers={trainers}", f"run.output_dir={out / f'{weights}-{trainers}'}",
        *([] if weights == "lora" else ["rl.lora.enabled=false"]),
    ]
    run_dir = train(load_recipe("demo", overrides, Recipe), "demo")
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("stage") == "rl"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="RL steps per run; the first is not counted")
    parser.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the driver, like each rank
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for weights in ("lora", "full"):
            for trainers in (1, 2):
                rows = run(trainers, weights, args.steps, Path(tmp))[1:]
                med = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in
                       ["throughput/samples_per_s", "time/step_s", "trainers/allreduce_bytes", "trainers/allreduce_s",
                        *(f"time/{p}_s" for p in PHASES)]}
                results.append({"weights": weights, "trainers": trainers, **med})
    print("| weights | trainers | samples/s | step s | " + " | ".join(PHASES) + " | all-reduce MB/step | all-reduce s/step |")
    print("|---|---:|---:|---:|" + "---:|" * len(PHASES) + "---:|---:|")
    for r in results:
        phases = " | ".join(f"{r[f'time/{p}_s']:.3f}" for p in PHASES)
        print(f"| {r['weights']} | {r['trainers']} | {r['throughput/samples_per_s']:.1f} | {r['time/step_s']:.2f} | {phases} | "
              f"{r['trainers/allreduce_bytes'] / 1e6:.2f} | {r['trainers/allreduce_s']:.3f} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
