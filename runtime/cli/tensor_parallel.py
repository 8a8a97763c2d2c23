"""The ``--tp`` options of ``trimode generate`` / ``trimode serve`` and the ``generate --tp N`` handler that
runs on every rank (mpiexec / torchrun launch N processes; runtime.parallel.comm)."""

from __future__ import annotations

import argparse
import os
import sys

from trimode.runtime import settings
from trimode.runtime.api import TriModeLM
from trimode.runtime.executors.engine_dir import EngineDirError
from trimode.runtime.model.hf_format import CheckpointError
from trimode.runtime.parallel.comm import (DEFAULT_TIMEOUT_S, TensorParallelConfigError, TensorParallelError,
                                           init_tensor_parallel)


def add_tp_arguments(parser) -> None:
    """The tensor-parallel options of a ``trimode`` subcommand (generate; the server later)."""
    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"--tp-timeout must be a number of seconds > 0, got {text!r}")
        return value

    g = parser.add_argument_group("tensor parallelism (launch N processes: mpiexec -n N, or torchrun)")
    g.add_argument("--tp", type=settings.positive_int("--tp"), default=1,
                   help="tensor-parallel ranks (default 1: no parallelism)")
    g.add_argument("--tp-backend", choices=["auto", "gloo", "nccl"], default="auto",
                   help="collectives backend (auto: nccl on GPUs, gloo on CPU)")
    g.add_argument("--tp-timeout", type=seconds, default=DEFAULT_TIMEOUT_S,
                   help=f"seconds a rank waits for the others before all stop with an error "
                        f"(default {DEFAULT_TIMEOUT_S:g})")


def generate_tensor_parallel(args, generate_with) -> int:
    """The handler of ``trimode generate --tp N`` (N > 1) on every rank. Rank 0 loads its shard as a
    ``TriModeLM`` and runs ``generate_with(args, lm)`` (the single-process generate: request, streaming,
    counters); the other ranks serve its steps and print nothing. A rank that fails prints one line and
    exits at once (without the group's teardown, which could wait on a dead peer), so the others see its
    connection close and stop with an error too."""
    where = ""

    def fail(message: str, code: int) -> int:
        print(f"trimode: error: {where}{message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(code)

    try:
        comm = init_tensor_parallel(args.tp, args.tp_backend, args.tp_timeout)
    except TensorParallelConfigError as e:
        return fail(f"--tp: {e}", 2)
    except TensorParallelError as e:
        return fail(str(e), 1)
    where = "" if comm.is_leader else f"(rank {comm.rank}) "
    try:
        if getattr(args, "engine", None):  # a `build_engine.py --tp N` directory: each rank runs its graph set
            if args.executor not in (None, "auto", "onnxruntime"):
                raise TensorParallelConfigError(f"--engine with --tp runs each rank's graphs with the onnxruntime "
                                                f"executor, not {args.executor!r}")
            loaded = TriModeLM.from_engine(args.engine, comm=comm,
                                           settings=settings.from_args(args, settings.GENERATE_OPTIONS))
        else:
            if args.executor not in (None, "torch"):
                raise TensorParallelConfigError(f"--executor {args.executor} runs an engine directory (--engine DIR); "
                                                f"a checkpoint (--model) runs on torch")
            loaded = TriModeLM.from_pretrained(args.model, comm=comm,
                                               settings=settings.from_args(args, settings.GENERATE_OPTIONS))
    except EngineDirError as e:
        return fail(f"--engine: {e}", 2)
    except CheckpointError as e:
        return fail(f"--model: {e}", 2)
    except TensorParallelConfigError as e:
        return fail(f"--tp: {e}", 2)
    except TensorParallelError as e:
        return fail(str(e), 1)
    if not comm.is_leader:
        try:
            loaded.serve()
        except TensorParallelError as e:
            return fail(str(e), 1)
        except BaseException as e:  # noqa: BLE001 - any failure must end this rank now
            return fail(f"tensor-parallel rank {comm.rank}: {type(e).__name__}: {e}", 1)
        return 0  # serve() left the group with rank 0
    executor = loaded.executor
    try:
        code = generate_with(args, loaded)
    except TensorParallelError as e:
        return fail(str(e), 1)
    except BaseException as e:
        if executor.is_broken:  # failed mid-step: the workers cannot be released cleanly
            return fail(f"tensor-parallel rank 0: {type(e).__name__}: {e}", 1)
        executor.close()
        raise  # a request error etc.: the workers are released, the CLI reports it as usual
    executor.close()  # releases the workers and leaves the group with them
    return code
