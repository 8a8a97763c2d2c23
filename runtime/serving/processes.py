"""Process hygiene for the Triton launcher (``runtime.serving.server``): a server that dies with its launcher
(Linux ``prctl(PR_SET_PDEATHSIG)``), and removal of what launchers killed with SIGKILL left behind (the Python
backend's shared-memory regions ``/dev/shm/trimode_<launcher pid>_*``, work directories
``<tmp>/trimode-triton-<pid>-*`` and temporary repositories ``<tmp>/trimode-repo-<pid>-*``). Linux only; where
``prctl`` is missing the server simply does not get the death signal."""

from __future__ import annotations

import ctypes
import glob
import os
import shutil
import signal
import tempfile
from pathlib import Path

SHM_DIR = Path("/dev/shm")
_PR_SET_PDEATHSIG = 1


def die_with_parent():
    """A ``preexec_fn`` for Popen: the child gets SIGKILL when the thread that started it dies (Linux
    ``prctl(PR_SET_PDEATHSIG)``), or exits at once if the parent is already gone. None where unsupported."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl   # resolved before the fork
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:   # the launcher died between fork and prctl
            os._exit(1)
    return preexec


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` exists (also when it belongs to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_files() -> list[str]:
    """Remove the shared-memory regions (``/dev/shm/trimode_<pid>_*``), work directories
    (``<tmp>/trimode-triton-<pid>-*``) and temporary repositories (``<tmp>/trimode-repo-<pid>-*``, written by
    ``trimode serve --model``) of launchers that are no longer alive; returns the removed paths."""
    removed = []
    tmp = tempfile.gettempdir()
    patterns = [(str(SHM_DIR / "trimode_*"), "_"), (os.path.join(tmp, "trimode-triton-*"), "-"),
                (os.path.join(tmp, "trimode-repo-*"), "-")]
    for pattern, sep in patterns:
        for path in glob.glob(pattern):
            parts = Path(path).name.split(sep)
            pid = parts[1 if sep == "_" else 2] if len(parts) > 2 else ""
            if not pid.isdigit() or pid_alive(int(pid)):
                continue
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except OSError:
                    continue
            removed.append(path)
    return removed
