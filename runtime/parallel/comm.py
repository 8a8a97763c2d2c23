"""Process groups for tensor parallelism: who is which rank, one group with timeouts, and the few
collectives the sharded model and the step broadcast use.

Launchers (N processes, one per GPU or CPU rank):

    mpiexec -n N trimode generate --tp N ...                       # mpi4py: rank 0 broadcasts MASTER_ADDR/PORT
    torchrun --nproc-per-node N -m trimode.runtime.cli generate --tp N ...   # RANK/WORLD_SIZE/MASTER_* env

Backends: NCCL on CUDA (device ``cuda:<local rank>``), gloo on CPU. Every collective runs under the
group's timeout, and every failure of one (a peer's connection closed because it died, or no answer
within the timeout because it hangs) becomes a ``TensorParallelError`` naming this rank, so the other
ranks stop with an error instead of waiting forever. NCCL enforces its timeout with its own watchdog
(it aborts the process); gloo raises in the caller.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Mapping

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0
_MPI_ENV = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALRANKID")


class TensorParallelError(RuntimeError):
    """A tensor-parallel run that cannot go on: a peer rank died or timed out, or the ranks disagree."""


class TensorParallelConfigError(TensorParallelError):
    """A tensor-parallel size or launch that cannot work (user input: says what is allowed)."""


@dataclass(frozen=True)
class LaunchInfo:
    """Where this process sits in the job, and where rank 0 listens for the group's rendezvous."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" (env variables), "mpi" (mpi4py) or "single"


def discover_launch(env: Mapping[str, str] | None = None) -> LaunchInfo:
    """Rank discovery: torchrun's env variables if set, else MPI through mpi4py, else a single process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        return LaunchInfo(rank, world, int(env.get("LOCAL_RANK", rank)), int(env.get("LOCAL_WORLD_SIZE", world)),
                          env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "29500")), "torchrun")
    if any(k in env for k in _MPI_ENV):
        return _discover_mpi(env)
    return LaunchInfo(0, 1, 0, 1, "127.0.0.1", 0, "single")


def _discover_mpi(env: Mapping[str, str]) -> LaunchInfo:
    try:
        from mpi4py import MPI
    except ImportError:
        raise TensorParallelConfigError("started by an MPI launcher but mpi4py is not installed: "
                                  "pip install mpi4py mpich (or use torchrun)") from None
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    hosts = comm.allgather(MPI.Get_processor_name())
    local_rank = hosts[:rank].count(hosts[rank])
    address = None
    if rank == 0:
        addr = env.get("MASTER_ADDR") or ("127.0.0.1" if len(set(hosts)) == 1 else _routable_address())
        port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else _free_port()
        address = (addr, port)
    addr, port = comm.bcast(address, root=0)
    return LaunchInfo(rank, world, local_rank, hosts.count(hosts[rank]), addr, port, "mpi")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _routable_address() -> str:
    """This host's address as other hosts see it (the interface of the default route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outgoing interface
            return s.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())


class TPComm:
    """The tensor-parallel group of this process: its rank, its device, and the collectives it needs."""

    def __init__(self, rank: int, world_size: int, device: torch.device, timeout_s: float,
                 group: dist.ProcessGroup | None = None) -> None:
        self.rank, self.world_size, self.device, self.timeout_s = rank, world_size, device, timeout_s
        self.group = group

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        try:
            yield
        except RuntimeError as e:  # gloo/NCCL errors (DistBackendError is a RuntimeError)
            raise TensorParallelError(
                f"tensor-parallel rank {self.rank}/{self.world_size}: {what} failed: a peer rank died or did not "
                f"answer within {self.timeout_s:g} s ({str(e).splitlines()[0][:300]})") from None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks (in place, returned): the reduce of a row-parallel layer."""
        if self.world_size > 1:
            with self._collective("all-reduce"):
                dist.all_reduce(x, group=self.group)
        return x

    def gather_cat(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Rank 0: the ranks' x concatenated along ``dim`` in rank order; other ranks: x unchanged."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.is_leader else None
        with self._collective("gather"):
            dist.gather(x, parts, dst=0, group=self.group)
        return torch.cat(parts, dim=dim) if self.is_leader else x

    def broadcast(self, x: torch.Tensor, what: str = "broadcast") -> torch.Tensor:
        """Rank 0's x on every rank (in place)."""
        if self.world_size > 1:
            with self._collective(what):
                dist.broadcast(x, src=0, group=self.group)
        return x

    def all_gather_ints(self, values: list[int], what: str = "handshake") -> list[list[int]]:
        """Every rank's ``values`` (same length everywhere), in rank order."""
        mine = torch.tensor(values, dtype=torch.long, device=self.device)
        if self.world_size == 1:
            return [values]
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        with self._collective(what):
            dist.all_gather(parts, mine, group=self.group)
        return [p.tolist() for p in parts]

    def close(self) -> None:
        """Leave the group: a barrier (every rank has received everything sent to it), then the group's
        teardown. Every rank must call it once the last message is through (``TensorParallelExecutor.close``
        and ``TensorParallelWorker.serve`` do); idempotent. A rank that exits with the group still up, or
        destroys it while a peer is still reading, can abort in gloo's exit ("terminate called without an
        active exception"). After a failed collective, exit without it instead (``os._exit``): the barrier
        would wait for a dead peer."""
        if self.world_size > 1 and dist.is_initialized():
            try:
                with self._collective("leaving the group"):
                    dist.barrier(group=self.group)
            finally:
                dist.destroy_process_group()


def launch_of_size(tp: int, env: Mapping[str, str] | None = None) -> LaunchInfo:
    """This process's place in the job, which must have started ``tp`` processes."""
    launch = discover_launch(env)
    if launch.world_size != tp:
        raise TensorParallelConfigError(
            f"--tp {tp} needs {tp} processes but the launcher started {launch.world_size} "
            f"({launch.launcher}); launch with `mpiexec -n {tp} ...` or `torchrun --nproc-per-node {tp} ...`")
    return launch


def init_tensor_parallel(tp: int, backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S,
                         env: Mapping[str, str] | None = None) -> TPComm:
    """Join the job's tensor-parallel group of ``tp`` ranks (one per process). ``backend``: auto, gloo, nccl."""
    if timeout_s <= 0:
        raise TensorParallelConfigError(f"the collective timeout must be > 0 seconds, got {timeout_s}")
    launch = launch_of_size(tp, env)
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise TensorParallelConfigError(f"tensor-parallel backend must be auto, gloo or nccl, got {backend!r}")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise TensorParallelConfigError("the nccl backend needs CUDA GPUs; use gloo on CPU")
        device = torch.device("cuda", launch.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if tp == 1:
        return TPComm(0, 1, device, timeout_s)
    return join_group(launch.rank, tp, launch.master_addr, launch.master_port, backend, timeout_s,
                      launch.local_world_size, device)


def join_group(rank: int, tp: int, master_addr: str, master_port: int, backend: str = "auto",
               timeout_s: float = DEFAULT_TIMEOUT_S, local_world_size: int | None = None,
               device: torch.device | None = None) -> TPComm:
    """Join a tensor-parallel group of ``tp`` ranks as ``rank``, rank 0 listening at master_addr:master_port
    (a process the launcher did not start, such as the Triton backend, joins as rank 0 this way)."""
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks on one host share its cores (torch would give each rank all of them)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world_size or tp, 1)))
    try:
        dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}",
                                rank=rank, world_size=tp, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as e:
        raise TensorParallelError(f"tensor-parallel rank {rank}/{tp}: could not join the group at "
                                  f"{master_addr}:{master_port} within {timeout_s:g} s: "
                                  f"{str(e).splitlines()[0][:300]}") from None
    return TPComm(rank, tp, device, timeout_s, dist.group.WORLD)
