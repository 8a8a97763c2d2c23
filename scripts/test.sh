#!/usr/bin/env bash
# The test command: sets up .venv (first run only) and runs the whole suite on CPU.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
bash "$root/scripts/setup_triton_env.sh"   # the Triton server's backend environment (numpy<2)
cd "$root"
exec "$root/.venv/bin/python" -m pytest "$@"
