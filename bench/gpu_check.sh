#!/usr/bin/env bash
# One GPU check, end to end, in under 10 minutes, for a machine with an NVIDIA GPU and torch
# installed (no network needed). From the repository root:
#
#     bash bench/gpu_wheels.sh .whl                 # where pip can reach PyPI: the wheels to carry
#     bash bench/gpu_check.sh OUT_DIR [WHEELS_DIR]  # on the GPU machine
#
# WHEELS_DIR (default .whl, if it exists) holds wheels of what the machine lacks or holds too
# old (bench/gpu_wheels.sh lists them; espeak-ng comes inside the espeakng-loader wheel, so
# speech is rendered by espeak-ng on the machine's CPUs). They are installed into /tmp/site,
# vocalign from this working tree into /tmp/vocalign, without touching the machine's packages.
# Then, most important first, each step under its own time limit and all of them under a
# budget (BUDGET seconds, default 560; a step that no longer fits is recorded as skipped):
#   1. the GPU tests: tests/test_devices.py (GRPO under LoRA and full weights, PPO, resume)
#      and tests/test_static_decoder.py (the CUDA-graph decode step against the fast decoder);
#   2. decode speed at Qwen2-0.5B's shapes, 16 prompts x 8 samples x 256 tokens in bf16: the
#      static decoder, the fast decoder and transformers' generate (dynamic and static cache),
#      against the bandwidth limit (bench/bench_decode.py --check);
#   3. `vocalign train` on the demo recipe on the GPU, cut down: SFT then GRPO under LoRA with
#      checkpoints, a resume that continues that run, and GRPO with full weights from its SFT model;
#   4. the training update's speed and MFU at Qwen2-0.5B's decoder shapes (bench/bench_engine.py);
#   5. decode speed at the embedded model's shapes; then at Qwen2-0.5B's, the static decoder with
#      its step compiled (rollouts.compile) and transformers' generate with its static cache and
#      its own compilation (the slowest to warm up, so last).
# Every step's exit status, wall time and output tail, the runs' summaries and the benchmarks'
# JSON go into OUT_DIR/gpu_check.json; each step's row also goes to OUT_DIR/steps.jsonl as it ends.
# DEVICE=cpu QUICK=1 runs the same script at toy sizes on a CPU (a check of the script itself).
set -uo pipefail
OUT=${1:?give the output folder}
WHEELS=${2:-.whl}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
BUDGET=${BUDGET:-560}
T0=$(date +%s)
mkdir -p "$OUT"
: > "$OUT/steps.jsonl"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl > /dev/null 2>&1; then
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
rm -rf /tmp/vocalign && python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/vocalign . || exit 1
export PYTHONPATH=/tmp/vocalign:${PYTHONPATH:-}
VOCALIGN="python3 -m vocalign.rl.cli"
RUNS=/tmp/gpu_runs
rm -rf "$RUNS" && mkdir -p "$RUNS"

step() {  # step NAME LIMIT_SECONDS COMMAND...: run it within what is left of the budget; record it
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  if (( left < 20 )); then
    echo "== $name: skipped, ${left} s of the budget left"
    python3 -c 'import json,sys; print(json.dumps({"step": sys.argv[1], "skipped": "out of time"}))' "$name" >> "$OUT/steps.jsonl"
    return
  fi
  (( limit > left )) && limit=$left
  local start=$(date +%s.%N)
  timeout "$limit" "$@" > "$RUNS/$name.log" 2>&1
  local rc=$?
  local secs=$(python3 -c "import time; print(round(time.time() - $start, 1))")
  echo "== $name: exit $rc in ${secs} s (limit ${limit} s)"
  tail -n 4 "$RUNS/$name.log"
  python3 -c 'import json,sys; print(json.dumps({"step": sys.argv[1], "rc": int(sys.argv[2]), "seconds": float(sys.argv[3]), "limit": int(sys.argv[4]), "tail": open(sys.argv[5], errors="replace").read()[-3000:]}))' \
    "$name" "$rc" "$secs" "$limit" "$RUNS/$name.log" >> "$OUT/steps.jsonl"
}

if [ "$QUICK" = 1 ]; then
  SFT=20; RL=4; EVERY=2; MORE=6; N=10; DEC="--prompts 2 --group 2 --new-tokens 16 --repeats 1"; ENG="--preset tiny --prompts 2 --group 2 --new-tokens 8"
else
  SFT=200; RL=12; EVERY=6; MORE=18; N=70; DEC="--prompts 16 --group 8 --new-tokens 256 --repeats 2"; ENG="--preset 0.5b --prompts 16 --group 8 --new-tokens 128"
fi
CUT="sft.steps=$SFT rl.steps=$RL run.save_every=$EVERY logging.wandb=false run.progress=false eval.n=$N model.device=$DEVICE"

step environment 60 python3 -c "
import torch, transformers, peft
from vocalign.data.espeak import synthesize
print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)
print('cuda', torch.cuda.is_available() and torch.cuda.get_device_name())
print('espeak-ng: one second of speech,', len(synthesize('one two three four', sample_rate=16000)), 'samples')"
step gpu_tests 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_devices.py tests/test_static_decoder.py -k cuda -rs
step decode_0_5b 150 python3 bench/bench_decode.py --device "$DEVICE" --preset 0.5b --dtype bfloat16 $DEC --check \
  --engines static,fast,hf_generate,hf_generate_static_eager --out "$RUNS/decode_0_5b.json"
step train_lora 240 $VOCALIGN train demo $CUT run.output_dir=$RUNS/lora
step resume_lora 120 $VOCALIGN train demo $CUT rl.steps=$MORE run.output_dir=$RUNS/lora run.resume=true
step train_full 150 $VOCALIGN train demo sft.steps=0 rl.steps=$(( RL / 2 )) rl.lora.enabled=false run.save_every=$(( EVERY / 2 )) \
  logging.wandb=false run.progress=false eval.n=$N model.device=$DEVICE model.path=$RUNS/lora/checkpoints/base run.output_dir=$RUNS/full
step update_mfu 120 python3 bench/bench_engine.py --device "$DEVICE" $ENG --dtype bfloat16 --repeats 2 --skip-agreement --out "$RUNS/engine.json"
step decode_embedded 60 python3 bench/bench_decode.py --device "$DEVICE" --preset embedded --dtype bfloat16 $DEC \
  --engines static,fast,hf_generate --out "$RUNS/decode_embedded.json"
step decode_0_5b_compiled 180 python3 bench/bench_decode.py --device "$DEVICE" --preset 0.5b --dtype bfloat16 $DEC \
  --engines static_compiled,hf_generate_static --out "$RUNS/decode_0_5b_compiled.json"

python3 - "$OUT" "$RUNS" "$DEVICE" <<'EOF'
import json, subprocess, sys
from pathlib import Path
out, runs, device = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()]
def read(path):
    p = runs / path
    return json.loads(p.read_text()) if p.exists() else None
def ran(name):
    return any(s["step"] == name and s.get("rc") == 0 for s in steps)
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
except FileNotFoundError:
    gpu = None
import torch, transformers
decode, engine = read("decode_0_5b.json"), read("engine.json")
compiled = read("decode_0_5b_compiled.json")
acceptance = {
    "train_ran": {"sft_grpo_lora": ran("train_lora") and read("lora/summary.json") is not None,
                  "resume_lora": ran("resume_lora"), "grpo_full_weights": ran("train_full") and read("full/summary.json") is not None},
}
if decode:
    e, limit = decode["engines"], decode["limit"]["seconds"]
    acceptance["decode_0_5b"] = {
        "rows": decode["rows"], "new_tokens": decode["new_tokens"], "limit_s": limit, **{f"{k}_s": v["seconds"] for k, v in e.items()},
        "static_over_limit": e["static"]["seconds"] / limit,
        "hf_generate_over_static": e["hf_generate"]["seconds"] / e["static"]["seconds"] if "hf_generate" in e else None,
        "goal": "static within 5x of the limit and at least 3x faster than hf_generate"}
    if compiled:  # the same batch and limit: the compiled runs beside the others
        for k, v in compiled["engines"].items():
            acceptance["decode_0_5b"][f"{k}_s"] = v["seconds"]
            acceptance["decode_0_5b"][f"{k}_over_limit"] = v["seconds"] / limit
            if "hf_generate" in e:
                acceptance["decode_0_5b"][f"hf_generate_over_{k}"] = e["hf_generate"]["seconds"] / v["seconds"]
if engine:
    acceptance["update_0_5b"] = {k: v for k, v in engine["time"]["fast"].items() if "update" in k}
result = {"gpu": gpu, "device": device, "torch": torch.__version__, "transformers": transformers.__version__,
          "acceptance": acceptance, "steps": steps, "decode_0_5b": decode, "decode_0_5b_compiled": compiled,
          "decode_embedded": read("decode_embedded.json"), "engine_0_5b": engine,
          "summary_lora": read("lora/summary.json"), "summary_full": read("full/summary.json")}
(out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
print(json.dumps(acceptance, indent=1, default=str))
print("wrote", out / "gpu_check.json")
EOF
