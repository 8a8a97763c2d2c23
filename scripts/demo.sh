#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then generate with the shipped tiny model in every mode,
# printing tokens per forward and tokens/s for each.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
exec "$root/.venv/bin/python" "$root/scripts/run_all_modes.py" "$@"
