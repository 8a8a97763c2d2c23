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

Lifecycle:
- the server never outlives its launcher: tritonserver is started with ``PR_SET_PDEATHSIG`` = SIGKILL (Linux
  ``prctl``), so it dies with the thread that started it, and its backend stubs exit when their parent is gone;
  shared-memory regions (``/dev/shm/trimode_<launcher pid>_*``) and work directories of launchers that died
  without cleaning up are removed by the next ``start`` (``runtime.serving.processes``);
- ready means ready and ours: besides ``/v2/health/ready``, the ``stats`` command over gRPC and over HTTP must
  answer with ``server_pid`` = this tritonserver's pid, so a stale server on the same ports is never taken for
  ours;
- ``stop`` first drains (``command="drain TOKEN"``, TOKEN a per-launch secret in tritonserver's environment):
  every stream in flight ends at once with a final "the server is shutting down" error; then SIGTERM, at most
  ``exit_timeout`` + ``kill_grace`` seconds, then SIGKILL to the whole process group; then the shared-memory
  regions and the work directory are removed. ``stop`` returns tritonserver's exit status and sets
  ``clean_exit`` and ``stop_report`` (see ``TritonServer.stop``).
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from trimode.runtime.serving.processes import SHM_DIR, die_with_parent, remove_stale_files
from trimode.runtime.serving.repository import DEFAULT_MODEL_NAME

PACKAGE_ROOT = Path(__file__).resolve().parents[2]   # the repository root is the trimode package
ENV_VAR = "TRIMODE_TRITON_ENV"
DRAIN_TOKEN_ENV = "TRIMODE_DRAIN_TOKEN"   # read by runtime.serving.triton_model (the drain command)


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

def _model_name(repo: Path) -> str:
    names = sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))
    return names[0] if len(names) == 1 else DEFAULT_MODEL_NAME


class TritonServer:
    """A ``tritonserver`` process on 127.0.0.1 serving ``repo``. Use as a context manager, or start()/stop().

    Ports left None are picked free; ``startup_timeout`` seconds to become ready; at stop, ``exit_timeout``
    seconds for tritonserver to exit after SIGTERM (the launcher drains first, so it has nothing in flight), and
    ``kill_grace`` more before SIGKILL. ``model``: the trimode model's name (default: the repository's only
    model). Call ``start`` from a thread that lives as long as the server (the main thread): the server is
    killed when that thread ends. Raises ``ServingError`` (no repository, no backend environment, a server that
    exits or fails to load the model during startup, another server answering on our ports; the message carries
    the log tail). ``library_dirs`` (those that exist) go on tritonserver's ``LD_LIBRARY_PATH``, which its
    backend stubs inherit: ``trimode serve`` passes TensorRT-RTX's ``tensorrt_libs.link_dir()`` there.
    """

    def __init__(self, repo: str | Path, triton_env: str | Path | None = None, http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None, log_file: str | Path | None = None,
                 log_verbose: int = 0, startup_timeout: float = 180.0, exit_timeout: int = 5,
                 kill_grace: float = 5.0, model: str | None = None, library_dirs: Sequence[str | Path] = ()) -> None:
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise ServingError(f"model repository {self.repo} does not exist")
        self.env = find_triton_env(triton_env)
        self.http_port, self.grpc_port = http_port or free_port(), grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.log_file, self.log_verbose = log_file, log_verbose
        self.startup_timeout, self.exit_timeout, self.kill_grace = startup_timeout, exit_timeout, kill_grace
        self.model = model or _model_name(self.repo)
        self.library_dirs = [str(d) for d in library_dirs if Path(d).is_dir()]
        self.process: subprocess.Popen | None = None
        self.clean_exit: bool | None = None   # after stop: drained, unloaded, no crash (see stop)
        self.stop_report: dict = {}           # after stop: what stopping did and took (seconds)
        self._token = secrets.token_hex(16)
        self._shm_prefix = f"trimode_{os.getpid()}_{secrets.token_hex(4)}_"   # this server's regions only
        self._ready = False
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
                "--backend-config", f"python,shm-region-prefix-name={self._shm_prefix}"]

    def start(self) -> "TritonServer":
        info = _env_info(self.env)
        root = Path(info["pytriton"]) / "tritonserver"
        tritonserver = root / "bin" / "tritonserver"
        stub = root / "python_backend_stubs" / info["version"] / "triton_python_backend_stub"
        if not tritonserver.exists() or not stub.exists():
            raise ServingError(f"the nvidia-pytriton install in {self.env} lacks {tritonserver.name} or a "
                               f"backend stub for Python {info['version']}")
        remove_stale_files()
        self._workdir = Path(tempfile.mkdtemp(prefix=f"trimode-triton-{os.getpid()}-"))
        backend = self._workdir / "backends" / "python"
        shutil.copytree(root / "backends" / "python", backend, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, backend / "triton_python_backend_stub")
        env = dict(os.environ)
        env["PATH"] = f"{self.env / 'bin'}{os.pathsep}{env.get('PATH', '')}"   # the stub's python3
        # the copied stub no longer finds the wheel's bundled libraries (cudart...) through its RPATH
        libs = Path(info["pytriton"]).parent / "nvidia_pytriton.libs"
        # library_dirs: e.g. where libtensorrt_rtx.so is (the backend stub loads TensorRT-RTX plans in-process and
        # cannot re-execute itself with a loader path that it did not start with)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (info["libdir"], str(libs), *self.library_dirs,
                                                             env.get("LD_LIBRARY_PATH")) if p)
        env.pop("PYTHONHOME", None)
        env.setdefault("OMP_NUM_THREADS", "1")
        env[DRAIN_TOKEN_ENV] = self._token
        log_path = Path(self.log_file) if self.log_file else self._workdir / "tritonserver.log"
        self._log_path = log_path
        self._log = open(log_path, "ab")
        self.clean_exit, self.stop_report, self._ready = None, {}, False
        self.process = subprocess.Popen(self.command(backend.parent, tritonserver), env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=die_with_parent())
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, chars: int = 4000) -> str:
        """The end of tritonserver's log (after ``stop`` removed a temporary log: its last 20000 characters)."""
        try:
            return self._log_path.read_text(errors="replace")[-chars:]
        except (OSError, AttributeError):
            return getattr(self, "_last_log", "")[-chars:]

    def _log_since(self, offset: int) -> str:
        """tritonserver's log from byte ``offset`` on ("" if unreadable)."""
        try:
            with open(self._log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except (OSError, AttributeError):
            return ""

    def _log_size(self) -> int:
        try:
            return self._log_path.stat().st_size
        except (OSError, AttributeError):
            return 0

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    # log lines after which the server never becomes ready (the Python backend may wait for a dead stub)
    FATAL = ("error while loading shared libraries", "failed to load", "Stub process", "Traceback (most recent")

    def served_pids(self) -> dict[str, int | None]:
        """The ``server_pid`` that the ``stats`` command reports over gRPC and over HTTP (None: no answer)."""
        out: dict[str, int | None] = {"grpc": None, "http": None}
        try:
            out["grpc"] = stats(self.grpc_url, self.model, timeout=5).get("server_pid")
        except Exception:
            pass
        try:
            out["http"] = http_stats(self.http_url, self.model, timeout=5).get("server_pid")
        except Exception:
            pass
        return out

    def is_own(self) -> bool:
        """True when both the gRPC and the HTTP port answer from this launcher's tritonserver."""
        pids = self.served_pids()
        return self.process is not None and pids["grpc"] == self.process.pid and pids["http"] == self.process.pid

    def wait_ready(self) -> None:
        """Wait until the server is ready and both its ports answer from our own process (``served_pids``);
        ``ServingError`` when it exits, fails to load the model, another server holds a port, or on timeout."""
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServingError(f"tritonserver exited with status {self.process.returncode} during startup; "
                                   f"log tail:\n{self.log_tail()}")
            if self.is_ready():
                pids = self.served_pids()
                if pids["grpc"] == self.process.pid and pids["http"] == self.process.pid:
                    self._log_ready = self._log_size()  # stop reads the log from here on
                    self._ready = True
                    return
                other = [f"{k} port {getattr(self, k + '_port')} (pid {v})" for k, v in pids.items()
                         if v is not None and v != self.process.pid]
                if other:
                    raise ServingError(f"another tritonserver answers on {', '.join(other)}, not ours (pid "
                                       f"{self.process.pid}): stop it or choose other ports; log tail:\n"
                                       f"{self.log_tail()}")
            log = self.log_tail(20000)
            if any(pattern in log for pattern in self.FATAL):
                time.sleep(0.5)  # let the rest of the message reach the log
                raise ServingError(f"tritonserver failed to load the model; log tail:\n{self.log_tail()}")
            time.sleep(0.2)
        raise ServingError(f"tritonserver was not ready after {self.startup_timeout:.0f} s; log tail:\n"
                           f"{self.log_tail()}")

    def drain(self, timeout: float = 8.0) -> dict | None:
        """Ask the model to end every request in flight with "the server is shutting down" and to refuse new
        ones (``command="drain TOKEN"``); returns its stats after the drain, or None if it did not answer."""
        try:
            return stats(self.grpc_url, self.model, timeout=timeout, command=f"drain {self._token}")
        except Exception:
            return None

    # tritonserver 2.51 waits without end for open (even idle) client gRPC streams once its models are unloaded
    IDLE_TRANSPORT_GRACE = 1.0
    CRASH = ("Signal (11)", "Signal (6)", "Segmentation fault", "malloc_consolidate", "malloc(): ", "free(): ",
             "terminate called", "core dumped")

    def stop(self, timeout: float | None = None) -> int | None:
        """Drain, SIGTERM, wait up to ``timeout`` (default ``exit_timeout`` + ``kill_grace``) seconds, then
        SIGKILL the whole process group (the backend stubs too); remove the shared-memory regions and the work
        directory. Returns tritonserver's exit status (negative: killed by that signal), None if never started.

        tritonserver never exits while a client holds a gRPC stream open, even an idle one, after its models are
        unloaded; so once the model is unloaded (its log says so) and the server is still up
        ``IDLE_TRANSPORT_GRACE`` s later, it is killed then: nothing is in flight any more. ``clean_exit``: every
        request in flight was ended by the drain, the model unloaded, the server exited 0 or was killed only
        for idle connections, and its log shows no crash. ``stop_report`` says what happened and how long it
        took (seconds)."""
        code = None
        if self.process is not None:
            start = time.monotonic()
            timeout = self.exit_timeout + self.kill_grace if timeout is None else timeout
            report: dict = {"drained": False, "sigterm": False, "unloaded": False, "killed": False}
            log_start = getattr(self, "_log_ready", 0)
            # never drain a server that is not proven ours, nor wait on one that does not answer (hung)
            if self.process.poll() is None and self._ready and self.is_ready():
                report["drained"] = self.drain() is not None
                report["drain_s"] = round(time.monotonic() - start, 3)
            if self.process.poll() is None:
                report["sigterm"] = True
                self.process.send_signal(signal.SIGTERM)
                deadline, unloaded_at = time.monotonic() + timeout, None
                unloaded = f"successfully unloaded '{self.model}'"
                while self.process.poll() is None and time.monotonic() < deadline:
                    if unloaded_at is None and unloaded in self._log_since(log_start):
                        unloaded_at = time.monotonic()
                    if unloaded_at is not None and time.monotonic() - unloaded_at >= self.IDLE_TRANSPORT_GRACE:
                        report["killed_idle_transport"] = True
                        break
                    time.sleep(0.05)
                report["killed"] = self.process.poll() is None
            try:  # stub processes left behind (they share the server's process group)
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            code = self.process.wait()
            log = self._log_since(log_start)
            report["unloaded"] = f"successfully unloaded '{self.model}'" in log
            report["crashed"] = any(p in log for p in self.CRASH)
            report.update(exit_status=code, stop_s=round(time.monotonic() - start, 3))
            self.clean_exit = (report["drained"] and report["unloaded"] and not report["crashed"]
                               and (code == 0 or report.get("killed_idle_transport", False)))
            self.stop_report = report
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None
            self._last_log = self.log_tail(20000)
        for path in glob.glob(str(SHM_DIR / f"{self._shm_prefix}*")):
            try:
                os.unlink(path)
            except OSError:
                pass
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        return code

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def stats(grpc_url: str, model: str = DEFAULT_MODEL_NAME, timeout: float = 10.0, command: str = "stats") -> dict:
    """The ``command="stats"`` health query over gRPC: pages in use, requests in flight, totals, the serving
    tritonserver's ``server_pid`` (``command``: another command answered by the stats, e.g. "drain TOKEN").
    Raises the client's error, or ``queue.Empty`` after ``timeout`` seconds without an answer."""
    import queue

    import numpy as np
    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        cmd = grpcclient.InferInput("command", [1], "BYTES")
        cmd.set_data_from_numpy(np.array([command.encode()], dtype=np.object_))
        client.async_stream_infer(model, [cmd])
        result, error = results.get(timeout=timeout)
        if error is not None:
            raise error
        return json.loads(result.as_numpy("counters")[0])
    finally:
        client.stop_stream()
        client.close()


def http_stats(http_url: str, model: str = DEFAULT_MODEL_NAME, timeout: float = 10.0) -> dict:
    """The ``command="stats"`` query over HTTP (``POST /v2/models/<model>/generate_stream``, one SSE event)."""
    body = json.dumps({"command": "stats"}).encode()
    req = urllib.request.Request(f"http://{http_url}/v2/models/{model}/generate_stream", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for line in r:
            if line.startswith(b"data:"):
                event = json.loads(line[5:])
                if "error" in event:
                    raise ServingError(f"stats over HTTP failed: {event['error']}")
                return json.loads(event["counters"])
    raise ServingError("stats over HTTP: no answer")


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
