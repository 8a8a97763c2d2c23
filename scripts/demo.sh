#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, build the shipped tiny model's engine directory (the ONNX
# stage; the TensorRT stage runs only where TensorRT 11 and a GPU exist), then generate in every mode
# through the engine's onnxruntime executor, printing per mode tokens per forward, accepted tokens per verify,
# tokens/s against AR, and this machine's measured c(16)/c(1) (a 16-token pass over a 1-token pass), which
# decides whether spec or diffusion can beat AR here. Options after the script go to run_all_modes.py
# (--threads N, --no-prepack, --executor torch, ...).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
py="$root/.venv/bin/python"
"$py" "$root/scripts/build_engine.py" --model "$root/models/tiny-kjv" --out "$root/engines/tiny-kjv" \
    --block-length 16 --max-seq 512 --overwrite   # rebuilt only when the model or settings changed
exec "$py" "$root/scripts/run_all_modes.py" --engine "$root/engines/tiny-kjv" "$@"
