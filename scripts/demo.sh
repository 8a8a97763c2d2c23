#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, build the shipped tiny model's engine directory (the ONNX
# stage; the TensorRT stage runs only where TensorRT 11 and a GPU exist), then generate in every mode
# through the engine's onnxruntime executor, printing tokens per forward and tokens/s for each.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
py="$root/.venv/bin/python"
"$py" "$root/scripts/build_engine.py" --model "$root/models/tiny-kjv" --out "$root/engines/tiny-kjv" \
    --block-length 16 --max-seq 512 --overwrite   # rebuilt only when the model or settings changed
exec "$py" "$root/scripts/run_all_modes.py" --engine "$root/engines/tiny-kjv" "$@"
