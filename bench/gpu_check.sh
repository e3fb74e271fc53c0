#!/usr/bin/env bash
# One GPU check, end to end, for a machine with an NVIDIA GPU and torch/transformers/peft
# installed (no network needed). Run it from the repository root:
#
#     bash bench/gpu_check.sh OUT_DIR [WHEELS_DIR]
#
# WHEELS_DIR holds wheels of the packages the machine lacks (omegaconf, jiwer, rapidfuzz,
# librosa, audioread, pooch, platformdirs, soxr, decorator, soundfile, cffi, pycparser,
# espeakng-loader: espeak-ng itself ships inside that wheel); they are installed into
# /tmp/site without touching the machine's own packages. Then:
#   1. the GPU tests (tests/test_devices.py: GRPO under LoRA and full weights, PPO, resume);
#   2. `vocalign train` on the demo recipe on the GPU, cut down: SFT, GRPO under LoRA with
#      checkpoints, a kill-free resume that continues the run, and GRPO with full weights
#      from the SFT model; speech is rendered by espeak-ng on the machine's CPUs;
#   3. `vocalign eval` of that run's SFT and final models, every suite;
#   4. the fast decoder and training forward against transformers (bench/bench_engine.py)
#      at Qwen2-0.5B's shapes in bf16 (skipped where transformers is older than 5.24).
# Every step's exit status, wall time and output tail go to OUT_DIR/gpu_check.json, with
# the runs' summary.json and eval.json.
set -uo pipefail
OUT=${1:?give the output folder}
WHEELS=${2:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -n "$WHEELS" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
rm -rf /tmp/vocalign && python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/vocalign . || exit 1
export PYTHONPATH=/tmp/vocalign:$PYTHONPATH
VOCALIGN="python3 -m vocalign.rl.cli"
RUNS=/tmp/gpu_runs
rm -rf "$RUNS" && mkdir -p "$RUNS"

steps=()
step() {  # step NAME LIMIT_SECONDS COMMAND...: run it, record its status, time and output tail
  local name=$1 limit=$2; shift 2
  local start=$(date +%s.%N)
  timeout "$limit" "$@" > "$RUNS/$name.log" 2>&1
  local rc=$?
  local secs=$(python3 -c "import time; print(round(time.time() - $start, 1))")
  echo "== $name: exit $rc in ${secs} s"
  tail -n 3 "$RUNS/$name.log"
  local row
  row=$(python3 -c 'import json,sys; print(json.dumps({"step": sys.argv[1], "rc": int(sys.argv[2]), "seconds": float(sys.argv[3]), "tail": open(sys.argv[4], errors="replace").read()[-3000:]}))' "$name" "$rc" "$secs" "$RUNS/$name.log")
  steps+=("$row")
  echo "$row" >> "$OUT/steps.jsonl"  # kept even if a later step runs out of time
}

CUT="sft.steps=200 rl.steps=12 run.save_every=6 logging.wandb=false run.progress=false eval.n=70 model.device=cuda"
step gpu_tests 150 python3 -m pytest -q -x tests/test_devices.py -k cuda
step train_lora 240 $VOCALIGN train demo $CUT run.output_dir=$RUNS/lora
step resume_lora 120 $VOCALIGN train demo $CUT rl.steps=18 run.output_dir=$RUNS/lora run.resume=true
step train_full 150 $VOCALIGN train demo sft.steps=0 rl.steps=6 rl.lora.enabled=false run.save_every=3 logging.wandb=false \
  run.progress=false eval.n=70 model.device=cuda model.path=$RUNS/lora/checkpoints/base run.output_dir=$RUNS/full
step eval 120 $VOCALIGN eval sft=$RUNS/lora/checkpoints/base rl=$RUNS/lora --n 100 --out $RUNS/eval --force
# the transformers path of the benchmark needs the transformers vocalign requires (>= 5.24: the
# `cache` keyword); an older one on the machine skips the step rather than failing it
if python3 -c "import sys, transformers; sys.exit(tuple(map(int, transformers.__version__.split('.')[:2])) < (5, 24))"; then
  step bench_engine 180 python3 bench/bench_engine.py --device cuda --preset 0.5b --dtype bfloat16 --prompts 16 --group 8 --new-tokens 256 --repeats 2
else
  echo "== bench_engine: skipped, transformers $(python3 -c 'import transformers; print(transformers.__version__)') < 5.24"
fi

python3 - "$OUT" "$RUNS" "${steps[@]}" <<'EOF'
import json, subprocess, sys
from pathlib import Path
out, runs, steps = Path(sys.argv[1]), Path(sys.argv[2]), [json.loads(s) for s in sys.argv[3:]]
def read(path):
    p = runs / path
    return json.loads(p.read_text()) if p.exists() else None
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip()
import torch, transformers
result = {"gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__, "steps": steps,
          "summary_lora": read("lora/summary.json"), "summary_full": read("full/summary.json"),
          "eval": read("eval/eval.json")}
(out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
print("wrote", out / "gpu_check.json")
EOF
