#!/usr/bin/env bash
# Creates (or refreshes) .venv-triton: the environment in which the Triton server's Python backend runs
# trimode, and installs the Triton client into the main environment (.venv).
#
# Why a second environment: the nvidia-pytriton wheel (which bundles a real tritonserver 2.51, its Python
# backend and per-Python backend stubs) needs numpy<2 where the backend stub runs (with numpy 2 every output
# arrives empty), while the main environment keeps numpy 2. .venv-triton uses the same interpreter as .venv,
# holds nvidia-pytriton and numpy<2, and appends .venv's site-packages (torch, trimode, ...) behind its own,
# so the stub imports numpy 1.x and everything else from .venv. Serving an engine directory with the onnxruntime
# executor needs onnx and onnxruntime there too: .venv has them with the [build] / [onnx] extras; otherwise they are
# installed into .venv-triton (beside numpy<2). The check at the end runs an onnxruntime session under numpy<2.
#
# Idempotent: a second run only checks the stamp. Run scripts/setup_env.sh first.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
main="${TRIMODE_VENV:-$root/.venv}"
env="${TRIMODE_TRITON_ENV:-$root/.venv-triton}"
pytriton_spec="nvidia-pytriton==0.7.0"
numpy_spec="numpy>=1.26,<2"
client_spec="tritonclient[http,grpc]>=2.50"

if [ ! -x "$main/bin/python" ]; then
    echo "[setup-triton] $main does not exist: run scripts/setup_env.sh first" >&2
    exit 1
fi
stamp="$env/.trimode-triton-setup"
want="$( (cat "$root/scripts/setup_triton_env.sh"; echo "$main") | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$env/bin/python" ] \
        && "$main/bin/python" -c "import tritonclient.grpc, tritonclient.http" >/dev/null 2>&1; then
    exit 0
fi
pip_main=("$main/bin/python" -m pip --disable-pip-version-check -q)
if ! "$main/bin/python" -c "import tritonclient.grpc, tritonclient.http" >/dev/null 2>&1; then
    echo "[setup-triton] installing $client_spec into $main" >&2
    "${pip_main[@]}" install "$client_spec"
fi
# the interpreter behind .venv (a venv's python is a link to it)
base="$("$main/bin/python" -c "import sys; print(sys._base_executable)")"
if [ ! -x "$env/bin/python" ]; then
    echo "[setup-triton] creating $env (with $base)" >&2
    "$base" -m venv "$env"
fi
echo '*' > "$env/.gitignore"   # never commit it
pip_env=("$env/bin/python" -m pip --disable-pip-version-check -q)
echo "[setup-triton] installing $pytriton_spec and $numpy_spec into $env" >&2
"${pip_env[@]}" install "$pytriton_spec" "$numpy_spec"
# .venv's packages behind .venv-triton's own (site.addsitedir also runs .venv's .pth files: the editable trimode)
env_site="$("$env/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"
main_site="$("$main/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"
echo "import site; site.addsitedir('$main_site')" > "$env_site/zz-trimode-main-env.pth"
# engine directories (trimode serve --engine): onnxruntime runs their reference graphs
onnx_spec=("onnx>=1.17" "onnxruntime>=1.20")
if ! (cd /tmp && "$env/bin/python" -c "import onnx, onnxruntime") >/dev/null 2>&1; then
    echo "[setup-triton] installing ${onnx_spec[*]} into $env (engine directories)" >&2
    "${pip_env[@]}" install "${onnx_spec[@]}" "$numpy_spec"
fi
# check: numpy<2 first, torch and trimode from .venv, the server binary and a stub for this Python
(cd /tmp && "$env/bin/python" - <<'EOF'
import sys
from pathlib import Path

import numpy
import onnx
import onnxruntime
import torch  # noqa: F401
import pytriton
import trimode.runtime.serving.triton_model  # noqa: F401

assert int(numpy.__version__.split(".")[0]) < 2, numpy.__version__
# onnxruntime built against numpy 2 must run under numpy 1.x here: one Add node
graph = onnx.helper.make_graph(
    [onnx.helper.make_node("Add", ["a", "b"], ["c"])], "check",
    [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [2]) for n in ("a", "b")],
    [onnx.helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [2])])
model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=9)
session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
one = numpy.ones(2, dtype=numpy.float32)
assert session.run(None, {"a": one, "b": one})[0].tolist() == [2.0, 2.0]
root = Path(pytriton.__file__).parent / "tritonserver"
stub = root / "python_backend_stubs" / ("%d.%d" % sys.version_info[:2]) / "triton_python_backend_stub"
assert (root / "bin" / "tritonserver").exists() and stub.exists(), root
print(f"[setup-triton] ok: numpy {numpy.__version__}, torch {torch.__version__}, onnxruntime "
      f"{onnxruntime.__version__}, tritonserver and stub present", file=sys.stderr)
EOF
)
echo "$want" > "$stamp"
