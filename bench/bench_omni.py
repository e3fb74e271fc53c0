"""Qwen2.5-Omni's speech path on this machine: a tiny random Qwen2.5-Omni (model/omni_tiny.py)
built offline in the released layout.

Part 1 samples spoken answers to spoken arithmetic questions, one at a time and in groups
of 8 answers to one prompt decoded as one batch (as `OmniPolicy` does for a GRPO group),
and reports thinker tokens per second, talker codes per second and token2wav's seconds of
audio per second of compute. Part 2 runs the `omni_speech_cpu` recipe (GRPO
under LoRA on the talker) and reports the medians of each phase of a step. One torch
thread. Results: BENCHMARKS.md.

    .venv/bin/python bench/bench_omni.py --samples 32 --steps 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from vocalign.data.tasks import make_task
from vocalign.model.omni_tiny import write_tiny_omni
from vocalign.model.policy import Sampling
from vocalign.model.qwen2_5_omni import OUTPUT_RATE, OmniSpeech
from vocalign.rl.config import Recipe
from vocalign.rl.recipe import load_recipe
from vocalign.rl.runner import train
from vocalign.rl.tracking import read_metrics

PHASES = ("rollout", "reward", "batch", "reference", "advantage", "update", "sync")


def sampling_speed(folder: Path, samples: int, group: int) -> dict[str, float]:
    """`samples` spoken answers, `group` at a time from one prompt (one batch per group)."""
    omni = OmniSpeech.load(folder)
    prompts = make_task("arithmetic", samples // group, seed=1)
    timings: dict[str, float] = {}
    text = codes = audio = 0.0
    omni.sample(prompts[0], Sampling(max_new_tokens=8), seed=0, max_codes=48)  # warm-up, not counted
    for prompt in prompts:
        for s in omni.sample_group(prompt, Sampling(max_new_tokens=8), 0, list(range(group)), max_codes=48,
                                   timings=timings):
            text, codes = text + len(s.text_ids), codes + len(s.codes)
            audio += 0.0 if s.waveform is None else len(s.waveform) / OUTPUT_RATE
    n = len(prompts) * group
    return {"group": group, "thinker tokens/s": text / timings["thinker"], "talker codes/s": codes / timings["talker"],
            "token2wav audio s/s": audio / timings["token2wav"], "mean text tokens": text / n, "mean codes": codes / n,
            "mean audio s": audio / n}


def step_phases(folder: Path, steps: int, out: Path) -> dict[str, float]:
    overrides = [f"model.path={folder}", f"rl.steps={steps}", f"run.save_every={steps}", "run.progress=false",
                 f"run.output_dir={out}"]
    run_dir = train(load_recipe("omni_speech_cpu", overrides, Recipe), "omni_speech_cpu")
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("stage") == "rl"][1:]
    keys = ["time/step_s", "throughput/samples_per_s", *(f"time/{p}_s" for p in PHASES)]
    return {k: statistics.median(r.get(k, 0.0) for r in rows) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=32, help="spoken answers to time in part 1")
    parser.add_argument("--steps", type=int, default=6, help="RL steps in part 2; the first is not counted")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny_omni(Path(tmp) / "omni", seed=0)
        speeds = [sampling_speed(folder, args.samples, group) for group in (1, 8)]
        phases = step_phases(folder, args.steps, Path(tmp) / "run")
    print("| answers per batch | thinker tokens/s | talker codes/s | token2wav s of audio per s | mean text tokens | mean codes | mean audio s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for sp in speeds:
        print(f"| {sp['group']} | {sp['thinker tokens/s']:.0f} | {sp['talker codes/s']:.0f} | {sp['token2wav audio s/s']:.2f} | "
              f"{sp['mean text tokens']:.1f} | {sp['mean codes']:.1f} | {sp['mean audio s']:.2f} |")
    print("| step s | samples/s | " + " | ".join(PHASES) + " |")
    print("|---:|---:|" + "---:|" * len(PHASES))
    print(f"| {phases['time/step_s']:.2f} | {phases['throughput/samples_per_s']:.1f} | "
          + " | ".join(f"{phases[f'time/{p}_s']:.3f}" for p in PHASES) + " |")
    if args.out:
        args.out.write_text(json.dumps({"sampling": speeds, "step": phases}, indent=1))


if __name__ == "__main__":
    main()
