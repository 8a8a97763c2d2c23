#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv and installs trimode into it.
# Idempotent: a second run only checks that everything is present.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TRIMODE_VENV:-$root/.venv}"
py="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating virtual environment in $venv" >&2
    "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
stamp="$venv/.trimode-setup"
want="$(cat "$root/pyproject.toml" "$root/scripts/setup_env.sh" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
# The CPU build of torch, pinned: an unpinned torch resolves to a multi-GB CUDA build.
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing torch (CPU build)" >&2
    "${pip[@]}" install "torch==2.13.0"
fi
echo "[setup] installing trimode and its dependencies (TensorRT-RTX included: the [tensorrt-rtx] extra)" >&2
"${pip[@]}" install -e "$root[dev]"
# TensorRT-RTX's builder runs on CPU: the default test run builds real engines with it (--target spark / rtx).
# Its loader fix (libtensorrt_rtx.so) is made by trimode itself at build time (plugins/tensorrt_libs.py).
if ! "$venv/bin/python" -c "import tensorrt_rtx_bindings" >/dev/null 2>&1; then
    echo "[setup] warning: TensorRT-RTX does not import here; the TensorRT-RTX tests will be skipped" >&2
fi
echo "$want" > "$stamp"
