#!/usr/bin/env bash
# Download the wheels bench/gpu_check.sh installs on a GPU machine that has torch, transformers,
# peft and most of the scientific stack but lacks vocalign's audio and config packages (and
# espeak-ng, which the espeakng-loader wheel carries). Versions are those of .venv (what
# `make test` runs), else the newest. WITH_TRANSFORMERS=1 adds transformers and the hub client
# it needs, for a machine whose transformers is older than vocalign's requirement (vocalign's
# own `transformers` sampling path, `rollouts.engine: hf`, needs it; the demo runs without).
#
#     bash bench/gpu_wheels.sh [WHEELS_DIR=.whl] [PYTHON_VERSION=3.12]
set -euo pipefail
DIR=${1:-.whl}
PY=${2:-3.12}
NAMES="omegaconf jiwer rapidfuzz librosa audioread pooch platformdirs soxr decorator soundfile cffi pycparser espeakng-loader"
if [ "${WITH_TRANSFORMERS:-0}" = 1 ]; then
  NAMES="$NAMES transformers tokenizers huggingface_hub httpx2 httpcore2 truststore hf-xet regex kernels tomlkit peft"
fi
mkdir -p "$DIR"
specs=()
for name in $NAMES; do
  version=$(.venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null || true)
  specs+=("$name${version:+==$version}")
done
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp "${platforms[@]}" \
  --platform any -d "$DIR" "${specs[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
du -sh "$DIR"
