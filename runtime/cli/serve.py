"""The serving command line: ``trimode triton-repo`` (write a Triton model repository) and ``trimode serve``
(start ``tritonserver`` on one and keep it running), also runnable alone as ``python -m trimode.runtime.serving``.

    trimode triton-repo --model CKPT | --engine DIR --out REPO [--num-pages N ...]
    trimode serve --repo REPO        (or --model CKPT / --engine DIR: a repository in a temp dir)
    trimode serve --engine DIR [--executor auto|tensorrt|onnxruntime|torch]
    mpiexec -n N trimode serve --tp N --model CKPT     (tensor parallel: rank 0 serves, ranks 1..N-1 work)

An engine directory (``scripts/build_engine.py``) is checked here first (``repository.check_engine``: a path that
is not one is a one-line error, exit status 2); the served model loads it with ``TriModeLM.from_engine`` (executor
``auto``: TensorRT where its plans can run in the backend process, else onnxruntime; unset ``--num-pages`` /
``--page-size`` / ``--max-concurrent-requests``: the engine's build-time limits). ``serve`` puts TensorRT-RTX's
library link directory on tritonserver's loader path when TensorRT-RTX is installed (``tensorrt_library_dirs``).

The repository is written by ``runtime.serving.repository``, the server run by ``runtime.serving.server``; the
runtime settings' options come from ``runtime.settings``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time

from trimode.plugins import tensorrt_libs
from trimode.runtime import settings
from trimode.runtime.serving.repository import DEFAULT_MODEL_NAME, write_repository
from trimode.runtime.serving.server import ENV_VAR, ServingError, TritonServer
from trimode.runtime.serving.triton_request import MODES

# the runtime settings a served model takes from the command line (the Triton parameters of the same names)
REPO_SETTINGS = ("num_pages", "page_size", "max_batch_size", "dtype", "executor", "threads")


def _add_repo_options(p: argparse.ArgumentParser) -> None:
    """The repository options of ``triton-repo`` and ``serve``; the runtime settings' options (names, defaults,
    choices) are ``runtime.settings.add_arguments``' (``--max-concurrent-requests`` lands in ``max_batch_size``)."""
    p.add_argument("--name", default=DEFAULT_MODEL_NAME, help="model name in the repository (default: trimode)")
    # --num-pages, --page-size, --max-concurrent-requests; not given: the defaults for a checkpoint, the engine's
    # build-time limits for an engine directory
    settings.add_arguments(p, names=REPO_SETTINGS[:3], unset=True)
    p.add_argument("--max-queued-requests", type=int, default=1024, help="waiting requests before rejecting")
    p.add_argument("--kv-admission", choices=["reserve", "greedy"], default="reserve",
                   help="reserve: admit only what fits in the worst case (default); greedy: admit at once, fail "
                        "the newest request if pages run out")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask")
    p.add_argument("--default-max-tokens", type=int, default=64)
    p.add_argument("--default-mode", choices=list(MODES), default="spec", help="mode of requests that name none")
    settings.add_arguments(p, names=("dtype",))
    p.add_argument("--executor", default=None, metavar="EXECUTOR",
                   help=f"with --model: a registered executor (default {settings.DEFAULTS.executor}); with --engine: "
                        f"{' | '.join(settings.ENGINE_EXECUTORS)} (default auto: tensorrt where its plans can run in the "
                        f"server, else onnxruntime; torch: the engine's checkpoint)")
    settings.add_arguments(p, names=("threads",))
    p.add_argument("--max-block-length", type=int, default=0,
                   help="largest block_length a request may ask (0: the checkpoint's block_size)")
    p.add_argument("--max-prompt-bytes", type=int, default=0,
                   help="largest text_input in bytes, refused before tokenizing (0: from the model's positions, "
                        "the KV budget and the vocabulary)")
    p.add_argument("--instance-count", type=int, default=1,
                   help="model instances; each owns its own runtime and KV cache (default 1)")
    p.add_argument("--copy-model", action="store_true",
                   help="copy the checkpoint (or the whole engine directory) into the repository")


def _repo_kwargs(args: argparse.Namespace) -> dict:
    """The ``write_repository`` keyword arguments of parsed repository options."""
    return dict(name=args.name, num_pages=args.num_pages, page_size=args.page_size,
                max_concurrent_requests=args.max_batch_size, max_queued_requests=args.max_queued_requests,
                kv_admission=args.kv_admission, max_tokens_limit=args.max_tokens_limit,
                default_max_tokens=args.default_max_tokens, default_mode=args.default_mode, dtype=args.dtype,
                executor=args.executor, threads=args.threads, instance_count=args.instance_count,
                copy_model=args.copy_model, max_block_length=args.max_block_length,
                max_prompt_bytes=args.max_prompt_bytes)


ENGINE_HELP = "an engine directory (scripts/build_engine.py --out); its manifest is checked first"


def add_subparsers(sub) -> None:
    """Register ``triton-repo`` and ``serve`` on an ``add_subparsers()`` object; each sets ``handler``."""
    r = sub.add_parser("triton-repo", help="write a Triton model repository for a checkpoint or an engine directory")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint directory")
    src.add_argument("--engine", help=ENGINE_HELP)
    r.add_argument("--out", required=True, help="repository directory to write")
    _add_repo_options(r)
    r.set_defaults(handler=triton_repo_command)

    s = sub.add_parser("serve", help="start tritonserver (bundled with nvidia-pytriton) on 127.0.0.1")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--repo", help="a model repository (from triton-repo)")
    src.add_argument("--model", help="a checkpoint: serve it from a repository written to a temp dir")
    src.add_argument("--engine", help=ENGINE_HELP + ": serve it from a repository written to a temp dir")
    s.add_argument("--http-port", type=int, default=None, help="default: a free port")
    s.add_argument("--grpc-port", type=int, default=None, help="default: a free port")
    s.add_argument("--metrics-port", type=int, default=None, help="default: a free port")
    s.add_argument("--triton-env", default=None, help=f"backend environment (default ${ENV_VAR} or .venv-triton)")
    s.add_argument("--log-file", default=None, help="tritonserver's log (default: a temp file)")
    s.add_argument("--log-verbose", type=int, default=0)
    s.add_argument("--startup-timeout", type=float, default=180.0)
    s.add_argument("--exit-timeout", type=int, default=5,
                   help="seconds tritonserver gets to exit after SIGTERM (in-flight requests are ended first)")
    s.add_argument("--kill-grace", type=float, default=5.0,
                   help="seconds after the exit timeout before tritonserver is killed")
    s.add_argument("--health-interval", type=float, default=2.0,
                   help="seconds between readiness checks of the running server")
    s.add_argument("--health-timeout", type=float, default=15.0,
                   help="a server that is not ready this many seconds is stopped: exit status 1")
    s.add_argument("--check", action="store_true", help="start, wait until ready, print the URLs, stop")
    _add_repo_options(s)
    from trimode.runtime.cli.tensor_parallel import add_tp_arguments

    add_tp_arguments(s)  # mpiexec -n N trimode serve --tp N --model CKPT
    s.set_defaults(handler=serve_command)


def tensorrt_library_dirs() -> list[str]:
    """The directories tritonserver's loader path needs for the backend to load TensorRT-RTX plans in-process
    (its stub cannot re-execute itself as ``trimode generate`` does): ``tensorrt_libs.link_dir()`` when
    TensorRT-RTX's libraries are installed, else none."""
    try:
        return [str(tensorrt_libs.link_dir())]
    except (tensorrt_libs.TensorRTUnavailable, OSError):
        return []


def _write_source_repository(out: str, args: argparse.Namespace, **extra):
    """``write_repository`` for ``--model`` or ``--engine``; a source the runtime refuses (not a checkpoint, not
    a finished engine build, limits beyond the engine's) is printed as one line naming the option, and returns
    None."""
    from trimode.runtime.executors.engine_dir import EngineDirError
    from trimode.runtime.model.hf_format import CheckpointError

    engine = getattr(args, "engine", None)
    try:
        if engine is not None:
            return write_repository(out, engine_dir=engine, **_repo_kwargs(args), **extra)
        return write_repository(out, args.model, **_repo_kwargs(args), **extra)
    except (CheckpointError, EngineDirError) as e:
        print(f"trimode: error: {'--engine' if engine is not None else '--model'}: {e}", file=sys.stderr, flush=True)
        return None


def triton_repo_command(args: argparse.Namespace) -> int:
    """``triton-repo``: write the repository, print ``{"repository": ..., "model": ...}`` as JSON; returns 0 (2
    for a ``--model`` / ``--engine`` the runtime refuses)."""
    out = _write_source_repository(args.out, args)
    if out is None:
        return 2
    print(json.dumps({"repository": str(out), "model": args.name}))
    return 0


def _check_tensorrt(args: argparse.Namespace) -> None:
    """``--engine DIR --executor tensorrt``: refuse at once (``ServingError``) plans that cannot run here."""
    if getattr(args, "engine", None) is not None and args.executor == "tensorrt":
        from trimode.runtime.executors.trt_executor import tensorrt_runnable

        runnable, why = tensorrt_runnable(args.engine, need_loader_path=False)  # the launcher gives the loader path
        if not runnable:
            raise ServingError(f"--executor tensorrt cannot run {args.engine} here: {why} (--executor onnxruntime "
                               f"runs its reference graphs on any CPU)")


def serve_command(args: argparse.Namespace) -> int:
    """``serve``: start tritonserver (on ``--repo``, or on a temp repository written for ``--model`` or
    ``--engine``; a source the runtime refuses is one line on stderr and exit status 2), print its
    URLs as one JSON line, run until SIGINT/SIGTERM (or at once with ``--check``), stop it (in-flight streams end
    with "the server is shutting down"; see ``TritonServer.stop``) and print a JSON line ``{"stopped": ...}``.
    While running, readiness is checked every ``--health-interval`` s; a server that exits, or is not ready for
    ``--health-timeout`` s (hung, or stopped behind our back), is stopped. Returns 0 after a clean stop, 1 when
    the server died, hung or had to be killed; a worker rank of ``--tp N`` returns 0 once rank 0 releases it."""
    tp_master = ""
    if getattr(args, "tp", 1) > 1:
        tp_master = _tensor_parallel_launch(args)
        if tp_master is None:  # a worker rank: served rank 0's steps until the server stopped
            return 0
    tmp = None
    repo = args.repo
    if repo is None:
        tmp = tempfile.mkdtemp(prefix=f"trimode-repo-{os.getpid()}-")  # removed by a later start if we die
        extra = dict(tp=args.tp, tp_master=tp_master, tp_timeout=args.tp_timeout) if tp_master else {}
        try:
            repo = _write_source_repository(tmp, args, **extra)
            if repo is not None:
                _check_tensorrt(args)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if repo is None:
            shutil.rmtree(tmp, ignore_errors=True)
            return 2
    stop = {"now": False, "started": False}

    def on_signal(signum, _frame) -> None:
        stop["now"] = True
        if not stop["started"]:  # still starting: stop waiting for readiness
            raise KeyboardInterrupt

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    server = TritonServer(repo, args.triton_env, args.http_port, args.grpc_port, args.metrics_port,
                          args.log_file, args.log_verbose, args.startup_timeout, exit_timeout=args.exit_timeout,
                          kill_grace=args.kill_grace, model=args.name if repo != args.repo else None,
                          library_dirs=tensorrt_library_dirs())
    failure = None
    try:
        try:
            server.start()
            stop["started"] = True
        except KeyboardInterrupt:
            print("trimode serve: stopped by a signal during startup", file=sys.stderr, flush=True)
            return 1
        print(json.dumps({"ready": True, "http": server.http_url, "grpc": server.grpc_url,
                          "metrics": server.metrics_url, "repository": str(repo), "pid": server.process.pid,
                          "serve_pid": os.getpid()}),
              flush=True)
        failure = None if args.check else _watch(server, stop, args.health_interval, args.health_timeout)
        if failure:
            print(f"trimode serve: {failure}; log tail:\n{server.log_tail()}", file=sys.stderr, flush=True)
    finally:
        code = server.stop()
        for s, h in old.items():
            signal.signal(s, h)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    report = {**server.stop_report, "clean": bool(server.clean_exit) and failure is None}
    if failure:
        report["failure"] = failure
    print(json.dumps({"stopped": report}), flush=True)
    if failure is None and not server.clean_exit and code is not None:
        print(f"trimode serve: tritonserver did not stop cleanly ({report}); log tail:\n{server.log_tail()}",
              file=sys.stderr, flush=True)
    return 0 if report["clean"] else 1


def _watch(server: TritonServer, stop: dict, interval: float, timeout: float) -> str | None:
    """Wait until ``stop["now"]`` (a signal); returns None then, or why the server must be stopped: it exited,
    or it was not ready for ``timeout`` seconds (hung, or shutting down behind our back)."""
    last_ok = next_check = time.monotonic()
    while not stop["now"]:
        if server.process.poll() is not None:
            return f"tritonserver exited with status {server.process.returncode}"
        now = time.monotonic()
        if now >= next_check:
            next_check = now + interval
            if server.is_ready():
                last_ok = now
            elif now - last_ok >= timeout:
                return f"tritonserver (pid {server.process.pid}) has not been ready for {now - last_ok:.0f} s"
        time.sleep(0.1)
    return None


def _tensor_parallel_launch(args: argparse.Namespace) -> str | None:
    """``serve --tp N`` under mpiexec/torchrun. Launcher rank 0 returns the host:port where the served model
    (the Triton backend, tensor-parallel rank 0) forms the group; ranks 1..N-1 join it here, load their shards,
    run rank 0's steps until it releases them (server stopped) and return None. A rank that fails exits."""
    from trimode.runtime.api import TriModeLM
    from trimode.runtime.model.checkpoint import CheckpointError, load_config
    from trimode.runtime.parallel.comm import TensorParallelConfigError, TensorParallelError, join_group, launch_of_size
    from trimode.runtime.parallel.sharding import check_tensor_parallel

    if args.repo is not None or args.model is None:
        raise ServingError("--tp serves a checkpoint: give --model (every rank loads its shard of it), not "
                           "--repo or --engine")
    try:
        check_tensor_parallel(load_config(args.model), args.tp)
    except (CheckpointError, TensorParallelConfigError) as e:
        raise ServingError(f"--tp {args.tp}: {e}") from None
    try:
        launch = launch_of_size(args.tp)
    except TensorParallelConfigError as e:
        raise ServingError(str(e)) from None
    if launch.rank == 0:
        return f"{launch.master_addr}:{launch.master_port}"
    try:
        comm = join_group(launch.rank, args.tp, launch.master_addr, launch.master_port, args.tp_backend,
                          args.tp_timeout, launch.local_world_size)
        worker = TriModeLM.from_pretrained(args.model, comm=comm, settings=settings.from_args(args, REPO_SETTINGS))
        worker.serve()
    except (TensorParallelError, CheckpointError) as e:
        print(f"trimode serve: error: (rank {launch.rank}) {e}", file=sys.stderr, flush=True)
        os._exit(1)  # no group teardown: it could wait on a dead peer
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m trimode.runtime.serving triton-repo|serve ...``: the two subcommands alone (``ServingError``
    and ``ValueError`` exit with status 2 and the message)."""
    parser = argparse.ArgumentParser(prog="python -m trimode.runtime.serving",
                                     description="Triton Inference Server deployment for trimode")
    add_subparsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ServingError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")

