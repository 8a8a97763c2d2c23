"""Starting and stopping a real ``tritonserver`` on a model repository (``runtime.serving.repository``), and
reading its health: ``TritonServer``, ``stats`` (the ``command="stats"`` request) and ``metrics`` (the
``trimode_*`` Prometheus gauges). The command line (``trimode serve``) is ``runtime.cli.serve``.

The server is the ``tritonserver`` 2.51 binary bundled in the ``nvidia-pytriton`` wheel, run from the backend
environment that ``scripts/setup_triton_env.sh`` creates (``.venv-triton`` beside ``.venv``: numpy<2, which
the Python backend stub needs, with the main environment's packages behind it). ``TritonServer`` copies the
Python backend and the stub that matches the environment's Python into a private backend directory, points
the stub at that Python (PATH) and at its own libpython (LD_LIBRARY_PATH = the interpreter's LIBDIR),
binds HTTP, gRPC and metrics to 127.0.0.1 on free ports, waits until the server is ready and stops it (and
its stub processes) cleanly. Setup problems raise ``ServingError`` saying what is missing and how to fix it.

Health: the standard ``/v2/health/ready``, the Prometheus gauges ``trimode_*`` on the metrics port, and the
``command="stats"`` request, which answers with pages in use and requests in flight (see
``runtime.serving.triton_model``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from trimode.runtime.serving.repository import DEFAULT_MODEL_NAME

PACKAGE_ROOT = Path(__file__).resolve().parents[2]   # the repository root is the trimode package
ENV_VAR = "TRIMODE_TRITON_ENV"


class ServingError(RuntimeError):
    """The server could not be set up or started; the message says what is missing and how to fix it."""


# ---- the backend environment -------------------------------------------------------------------------------

def _env_python(env: Path) -> Path:
    return env / "bin" / "python"


def find_triton_env(env: str | Path | None = None) -> Path:
    """The backend environment: ``env``, else $TRIMODE_TRITON_ENV, else ``.venv-triton`` in the repository."""
    path = Path(env or os.environ.get(ENV_VAR) or PACKAGE_ROOT / ".venv-triton")
    if not _env_python(path).exists():
        raise ServingError(f"no Triton backend environment at {path}: run scripts/setup_triton_env.sh "
                           f"(or point ${ENV_VAR} / --triton-env at one)")
    return path


def _env_info(env: Path) -> dict:
    code = ("import json, sys, sysconfig, importlib.util as u; s = u.find_spec('pytriton'); "
            "import numpy; print(json.dumps({'libdir': sysconfig.get_config_var('LIBDIR'), "
            "'version': '%d.%d' % sys.version_info[:2], 'numpy': numpy.__version__, "
            "'pytriton': None if s is None else list(s.submodule_search_locations)[0]}))")
    try:
        out = subprocess.run([str(_env_python(env)), "-c", code], capture_output=True, text=True, check=True)
    except subprocess.CalledProcessError as e:
        raise ServingError(f"the backend environment {env} is broken: {e.stderr.strip()[-400:]}") from None
    info = json.loads(out.stdout)
    if info["pytriton"] is None:
        raise ServingError(f"nvidia-pytriton is not installed in {env}: run scripts/setup_triton_env.sh")
    if int(info["numpy"].split(".")[0]) >= 2:
        raise ServingError(f"{env} has numpy {info['numpy']}; the Triton Python backend needs numpy<2 "
                           f"(with numpy 2 every output arrives empty): run scripts/setup_triton_env.sh")
    return info


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the server ------------------------------------------------------------------------------------------

class TritonServer:
    """A ``tritonserver`` process on 127.0.0.1 serving ``repo``. Use as a context manager, or start()/stop().

    Ports left None are picked free; ``startup_timeout`` seconds to become ready, ``exit_timeout`` seconds for
    in-flight requests at stop. Raises ``ServingError`` (no repository, no backend environment, a server that
    exits or fails to load the model during startup; the message carries the log tail).
    """

    def __init__(self, repo: str | Path, triton_env: str | Path | None = None, http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None, log_file: str | Path | None = None,
                 log_verbose: int = 0, startup_timeout: float = 180.0, exit_timeout: int = 10) -> None:
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise ServingError(f"model repository {self.repo} does not exist")
        self.env = find_triton_env(triton_env)
        self.http_port, self.grpc_port = http_port or free_port(), grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.log_file, self.log_verbose = log_file, log_verbose
        self.startup_timeout, self.exit_timeout = startup_timeout, exit_timeout
        self.process: subprocess.Popen | None = None
        self._workdir: Path | None = None
        self._log = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self, backend_dir: Path, tritonserver: Path) -> list[str]:
        return [str(tritonserver), "--model-repository", str(self.repo), "--backend-directory", str(backend_dir),
                "--http-address", "127.0.0.1", "--http-port", str(self.http_port),
                "--grpc-address", "127.0.0.1", "--grpc-port", str(self.grpc_port),
                "--metrics-address", "127.0.0.1", "--metrics-port", str(self.metrics_port),
                "--allow-metrics", "true", "--allow-gpu-metrics", "false", "--allow-cpu-metrics", "false",
                "--allow-sagemaker", "false", "--allow-vertex-ai", "false",
                "--disable-auto-complete-config", "--strict-readiness", "true", "--exit-on-error", "true",
                "--exit-timeout-secs", str(self.exit_timeout), "--log-verbose", str(self.log_verbose),
                # several servers on one machine must not share the backend's shared-memory regions
                "--backend-config", f"python,shm-region-prefix-name=trimode_{os.getpid()}_{self.grpc_port}_"]

    def start(self) -> "TritonServer":
        info = _env_info(self.env)
        root = Path(info["pytriton"]) / "tritonserver"
        tritonserver = root / "bin" / "tritonserver"
        stub = root / "python_backend_stubs" / info["version"] / "triton_python_backend_stub"
        if not tritonserver.exists() or not stub.exists():
            raise ServingError(f"the nvidia-pytriton install in {self.env} lacks {tritonserver.name} or a "
                               f"backend stub for Python {info['version']}")
        self._workdir = Path(tempfile.mkdtemp(prefix="trimode-triton-"))
        backend = self._workdir / "backends" / "python"
        shutil.copytree(root / "backends" / "python", backend, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, backend / "triton_python_backend_stub")
        env = dict(os.environ)
        env["PATH"] = f"{self.env / 'bin'}{os.pathsep}{env.get('PATH', '')}"   # the stub's python3
        # the copied stub no longer finds the wheel's bundled libraries (cudart...) through its RPATH
        libs = Path(info["pytriton"]).parent / "nvidia_pytriton.libs"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (info["libdir"], str(libs), env.get("LD_LIBRARY_PATH"))
                                                 if p)
        env.pop("PYTHONHOME", None)
        env.setdefault("OMP_NUM_THREADS", "1")
        log_path = Path(self.log_file) if self.log_file else self._workdir / "tritonserver.log"
        self._log_path = log_path
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(self.command(backend.parent, tritonserver), env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self._log_path.read_text(errors="replace")[-chars:]
        except (OSError, AttributeError):
            return ""

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    # log lines after which the server never becomes ready (the Python backend may wait for a dead stub)
    FATAL = ("error while loading shared libraries", "failed to load", "Stub process", "Traceback (most recent")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServingError(f"tritonserver exited with status {self.process.returncode} during startup; "
                                   f"log tail:\n{self.log_tail()}")
            if self.is_ready():
                return
            log = self.log_tail(20000)
            if any(pattern in log for pattern in self.FATAL):
                time.sleep(0.5)  # let the rest of the message reach the log
                raise ServingError(f"tritonserver failed to load the model; log tail:\n{self.log_tail()}")
            time.sleep(0.2)
        raise ServingError(f"tritonserver was not ready after {self.startup_timeout:.0f} s; log tail:\n"
                           f"{self.log_tail()}")

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM (in-flight requests get ``exit_timeout`` s), then SIGKILL to the whole process group."""
        code = None
        if self.process is not None:
            timeout = self.exit_timeout + 10 if timeout is None else timeout
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            try:  # stub processes left behind (they share the server's process group)
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            code = self.process.wait()
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        return code

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def stats(grpc_url: str, model: str = DEFAULT_MODEL_NAME, timeout: float = 10.0) -> dict:
    """The ``command="stats"`` health query over gRPC: pages in use, requests in flight, totals."""
    import queue

    import numpy as np
    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        cmd = grpcclient.InferInput("command", [1], "BYTES")
        cmd.set_data_from_numpy(np.array([b"stats"], dtype=np.object_))
        client.async_stream_infer(model, [cmd])
        result, error = results.get(timeout=timeout)
        if error is not None:
            raise error
        return json.loads(result.as_numpy("counters")[0])
    finally:
        client.stop_stream()
        client.close()


def metrics(metrics_url: str, prefix: str = "trimode_") -> dict[str, float]:
    """The ``trimode_*`` gauges from the Prometheus endpoint (one model: labels dropped)."""
    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = float(value)
    return out
