"""Shared by the tensor-parallel tests: N ranks as threads (a ``TPComm`` whose collectives swap tensors through
shared slots), a workload on thread ranks, and the ``mpiexec`` of the environment for real MPI ranks."""

from __future__ import annotations

import json
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch

from trimode.runtime.parallel.comm import TPComm


class ThreadComm(TPComm):
    """Rank ``rank`` of ``world`` threads: every collective swaps tensors through shared slots."""

    def __init__(self, rank: int, shared: tuple[list, threading.Barrier]) -> None:
        super().__init__(rank, len(shared[0]), torch.device("cpu"), 30.0)
        self.slots, self.barrier = shared

    def _exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.slots[self.rank] = x.clone()
        self.barrier.wait()
        parts = list(self.slots)
        self.barrier.wait()
        return parts

    def all_reduce(self, x):
        parts = self._exchange(x)
        return x.copy_(sum(parts[1:], parts[0]))

    def gather_cat(self, x, dim=-1):
        parts = self._exchange(x)
        return torch.cat(parts, dim) if self.is_leader else x

    def broadcast(self, x, what=""):
        return x.copy_(self._exchange(x)[0])

    def all_gather_ints(self, values, what=""):
        return [p.tolist() for p in self._exchange(torch.tensor(values))]


def run_ranks(world: int, fn) -> list:
    """fn(comm) on ``world`` threads; their results in rank order (the first exception is raised)."""
    shared = ([None] * world, threading.Barrier(world, timeout=60))
    results, errors = [None] * world, []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(ThreadComm(rank, shared))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            shared[1].abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def run_workload_on_ranks(load, work, world: int = 2):
    """``load(comm)`` on every thread rank; rank 0 runs ``work(lm)`` and releases the workers, the others serve
    its steps. Returns rank 0's result and every rank's KV cache."""
    def rank(comm):
        loaded = load(comm)
        if not comm.is_leader:
            loaded.serve()
            return loaded.cache
        try:
            return work(loaded), loaded.cache
        finally:
            loaded.executor.close()

    (got, cache0), *others = run_ranks(world, rank)
    return got, [cache0, *others]



def _mpiexec() -> str:
    exe = Path(sys.executable).parent / "mpiexec"
    found = str(exe) if exe.exists() else shutil.which("mpiexec")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        found = None
    if not found:
        pytest.skip("MPI is not installed: pip install mpi4py mpich")
    return found


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])
