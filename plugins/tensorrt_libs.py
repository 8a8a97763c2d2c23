"""Which TensorRT: the two flavours an engine can be built and run with, how each is imported, and the
dynamic-loader fix TensorRT-RTX needs before its ONNX parser meets a plugin node.

Flavours (``FLAVOURS``):

- ``tensorrt``: TensorRT 11 (module ``tensorrt``), for datacenter GPUs (``--target hopper`` / ``blackwell``,
  SM90 / SM100). Builds and runs only on a machine with the GPU; its PyPI wheels are download placeholders, so
  it is installed from NVIDIA's own index.
- ``tensorrt-rtx``: TensorRT for RTX (module ``tensorrt_rtx``, from the ``tensorrt-rtx-cu12`` /
  ``tensorrt-rtx-cu13`` wheels; the bare ``tensorrt_rtx_bindings`` module of the ``-bindings`` wheel is used
  when the front-end package is absent), for RTX-class GPUs and the DGX Spark (``--target rtx`` / ``spark``:
  SM86, SM89, SM120, SM121). Its builder runs **without a GPU** (ahead-of-time build); the plan is specialised
  just in time on the GPU that loads it.

The loader trap (TensorRT-RTX 1.7.1, measured): the ONNX parser aborts the whole process (``terminate called
without an active exception``) at the first plugin node unless a file named exactly ``libtensorrt_rtx.so``
(unversioned) can be found by the dynamic loader; the wheel ships only ``libtensorrt_rtx.so.1``. The loader
reads ``LD_LIBRARY_PATH`` once, when a process starts, so the fix must be in place before the process starts:
``link_dir`` creates the symlink in a directory the project owns (``$TRIMODE_CACHE_DIR`` or
``~/.cache/trimode``), ``child_env`` gives the environment of a process that has it on its path, and
``loader_ready`` tells whether *this* process has it (it reads the environment the process started with,
``/proc/self/environ``). Callers check ``loader_ready`` before parsing a plugin graph and either run the work
in a child process with ``child_env`` or raise ``LoaderPathError`` (a clear message instead of an abort).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

RTX_LIBRARY = "libtensorrt_rtx.so"  # the unversioned name the parser looks for
RTX_LIBS_PACKAGE = "tensorrt_rtx_libs"  # the -libs wheel's package holding libtensorrt_rtx.so.1
CACHE_ENV = "TRIMODE_CACHE_DIR"


class TensorRTUnavailable(RuntimeError):
    """The TensorRT flavour asked for cannot be imported here; the message says why and how to install it."""


class LoaderPathError(RuntimeError):
    """This process cannot parse plugin graphs with TensorRT-RTX: ``libtensorrt_rtx.so`` is not on the loader
    path it started with (the parser would abort the process)."""


@dataclass(frozen=True)
class Flavour:
    """One TensorRT flavour: ``name`` (manifest value), ``title`` (for messages), ``modules`` (import names,
    first found wins), ``install`` (how to get it), ``needs_gpu_to_build`` (the builder needs a CUDA GPU),
    ``distributions`` (the pip packages whose version is the flavour's, first installed wins)."""

    name: str
    title: str
    modules: tuple[str, ...]
    install: str
    needs_gpu_to_build: bool
    distributions: tuple[str, ...] = ()


FLAVOURS: dict[str, Flavour] = {f.name: f for f in (
    Flavour("tensorrt", "TensorRT 11", ("tensorrt",),
            "install TensorRT 11 from NVIDIA (its PyPI wheels are placeholders that download from NVIDIA's index)",
            needs_gpu_to_build=True, distributions=("tensorrt-cu13-bindings", "tensorrt-cu12-bindings", "tensorrt")),
    Flavour("tensorrt-rtx", "TensorRT-RTX", ("tensorrt_rtx", "tensorrt_rtx_bindings"),
            "pip install 'trimode[tensorrt-rtx]' (tensorrt-rtx-cu12 on x86_64, tensorrt-rtx-cu13 on aarch64)",
            needs_gpu_to_build=False, distributions=("tensorrt-rtx-cu12-bindings", "tensorrt-rtx-cu13-bindings")),
)}


def get_flavour(name: str) -> Flavour:
    """The flavour called ``name``; ValueError naming the choices otherwise."""
    try:
        return FLAVOURS[name]
    except KeyError:
        raise ValueError(f"unknown TensorRT flavour {name!r}; choose from: {', '.join(FLAVOURS)}") from None


def import_tensorrt(flavour: str) -> ModuleType:
    """The Python module of ``flavour`` (``tensorrt`` or ``tensorrt_rtx``); TensorRTUnavailable if none imports."""
    spec = get_flavour(flavour)
    errors = []
    for name in spec.modules:
        try:
            return importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
    raise TensorRTUnavailable(f"{spec.title} is not installed ({'; '.join(errors)}): {spec.install}")


def flavour_available(flavour: str) -> tuple[bool, str]:
    """(True, "") if ``flavour``'s module is installed, else (False, why), **without importing it**: a process
    that only decides (the build's parent, the test process, a server choosing its executor) keeps TensorRT's
    large libraries out; TensorRT-RTX builds run in a child process. (A test run that had loaded TensorRT-RTX
    1.7.1 into the pytest process crashed later in an onnxruntime session creation; the cause was not
    isolated, so the two are kept in separate processes.)"""
    spec = get_flavour(flavour)
    if any(name in sys.modules or importlib.util.find_spec(name) is not None for name in spec.modules):
        return True, ""
    return False, f"{spec.title} is not installed (no module {' / '.join(spec.modules)}): {spec.install}"


def flavour_version(flavour: str) -> str | None:
    """The installed version of ``flavour`` from its pip package's metadata (no import), or None."""
    import importlib.metadata

    for dist in get_flavour(flavour).distributions:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def same_release(built: str, running: str) -> bool:
    """Whether a plan built by TensorRT ``built`` loads in TensorRT ``running``: the same major.minor.patch
    (plans are not portable across releases; the fourth, build number, is ignored)."""
    return built.split(".")[:3] == running.split(".")[:3]


# ---- the TensorRT-RTX loader trap --------------------------------------------------------------------------

def rtx_library_dir() -> Path | None:
    """The directory holding ``libtensorrt_rtx.so.1`` (the ``tensorrt_rtx_libs`` package), found without
    importing it; None if the -libs wheel is not installed."""
    spec = importlib.util.find_spec(RTX_LIBS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        if any(Path(location).glob(f"{RTX_LIBRARY}.*")):
            return Path(location)
    return None


def cache_dir() -> Path:
    """The project's own cache directory: ``$TRIMODE_CACHE_DIR``, else ``$XDG_CACHE_HOME/trimode``, else
    ``~/.cache/trimode``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "trimode"


def link_dir() -> Path:
    """A directory (created on first use, under ``cache_dir()``, else under the temporary directory) holding
    ``libtensorrt_rtx.so`` as a symlink to the installed ``libtensorrt_rtx.so.<N>``; one directory per library
    location, so two installs never share a link. Raises TensorRTUnavailable if the libraries are not installed."""
    libs = rtx_library_dir()
    if libs is None:
        raise TensorRTUnavailable(f"TensorRT-RTX's libraries ({RTX_LIBS_PACKAGE}) are not installed: "
                                  f"{FLAVOURS['tensorrt-rtx'].install}")
    target = sorted(libs.glob(f"{RTX_LIBRARY}.*"))[0]
    import hashlib

    key = hashlib.sha256(str(target.resolve()).encode()).hexdigest()[:12]
    out = cache_dir() / f"tensorrt-rtx-{key}"
    link = out / RTX_LIBRARY
    if not (link.is_symlink() and Path(os.readlink(link)) == target.resolve()):
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError:  # no writable cache directory (read-only home): the temporary directory, per user
            import tempfile

            out = Path(tempfile.gettempdir()) / f"trimode-{os.getuid()}" / f"tensorrt-rtx-{key}"
            link = out / RTX_LIBRARY
            out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{RTX_LIBRARY}.{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(target.resolve())
        os.replace(tmp, link)  # atomic: concurrent builds see the old link or the new one
    return out


def startup_library_path() -> list[str]:
    """The ``LD_LIBRARY_PATH`` entries this process started with (what the dynamic loader uses; later changes
    to ``os.environ`` do not reach it). Read from ``/proc/self/environ`` on Linux, else from ``os.environ``."""
    value = None
    try:
        for entry in Path("/proc/self/environ").read_bytes().split(b"\0"):
            if entry.startswith(b"LD_LIBRARY_PATH="):
                value = entry.split(b"=", 1)[1].decode(errors="replace")
    except OSError:
        value = os.environ.get("LD_LIBRARY_PATH")
    return [p for p in (value or "").split(os.pathsep) if p]


def loader_ready() -> bool:
    """True if this process's dynamic loader finds ``libtensorrt_rtx.so``: a directory on the loader path it
    started with holds it, or the libraries' own directory does (the parser's ``$ORIGIN`` run path)."""
    dirs = [Path(p) for p in startup_library_path()]
    libs = rtx_library_dir()
    if libs is not None:
        dirs.append(libs)
    return any((d / RTX_LIBRARY).exists() for d in dirs)


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` (default ``os.environ``) whose ``LD_LIBRARY_PATH`` starts with ``link_dir()``: a process
    started with it parses TensorRT-RTX plugin graphs."""
    out = dict(os.environ if env is None else env)
    first = str(link_dir())
    rest = [p for p in out.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != first]
    out["LD_LIBRARY_PATH"] = os.pathsep.join([first, *rest])
    return out


def require_loader_path(what: str) -> None:
    """Raise LoaderPathError (naming ``what`` and the fix) unless ``loader_ready()``."""
    if loader_ready():
        return
    try:
        fix = f"LD_LIBRARY_PATH={link_dir()}:$LD_LIBRARY_PATH"
    except TensorRTUnavailable as e:
        raise LoaderPathError(f"{what}: {e}") from None
    raise LoaderPathError(
        f"{what}: TensorRT-RTX's ONNX parser aborts this process at the first plugin node unless "
        f"{RTX_LIBRARY} is on the loader path the process started with; start it with {fix} "
        f"(the build does this itself by running the TensorRT stage in a child process)")


def reexec_with_loader_path() -> None:
    """Replace this process by itself with ``child_env()`` if the loader path lacks ``libtensorrt_rtx.so``
    (for entry points that load TensorRT-RTX plugin engines in-process); returns if nothing was needed, if
    TensorRT-RTX is not installed, or in the re-executed process (``TRIMODE_REEXEC`` set: never twice)."""
    if loader_ready() or rtx_library_dir() is None or os.environ.get("TRIMODE_REEXEC"):
        return
    env = dict(child_env(), TRIMODE_REEXEC="1")
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)  # orig_argv keeps -m / -c


__all__ = ["FLAVOURS", "Flavour", "LoaderPathError", "TensorRTUnavailable", "child_env", "flavour_available",
           "flavour_version",
           "get_flavour", "import_tensorrt", "link_dir", "loader_ready", "require_loader_path",
           "reexec_with_loader_path", "same_release"]


# ---- TensorRT-RTX plan headers -----------------------------------------------------------------------------

# TensorRT-RTX compute-capability names (``trt.ComputeCapability``) and their bits in a plan header's target mask
RTX_COMPUTE_CAPABILITIES = ("SM75", "SM80", "SM86", "SM89", "SM120", "SM121")
RTX_PLAN_MAGIC = b"vtrt"


def rtx_plan_header(plan: bytes) -> dict:
    """What a TensorRT-RTX plan's 64-byte header says: ``version`` "major.minor.patch" (bytes 0x18-0x1a) and
    ``targets``, the compute capabilities of the target bitmask (byte 0x20: bit 0 SM75, 1 SM80, 2 SM86, 3 SM89,
    4 SM120, 5 SM121). Layout measured on TensorRT-RTX 1.7.1 plans (not documented by NVIDIA); ValueError for
    data that does not start with the ``vtrt`` magic. For quantized plans the mask may list targets the plan's
    kernels cannot run on (FP8 / INT4 need SM89+ / SM80+)."""
    if len(plan) < 64 or plan[:4] != RTX_PLAN_MAGIC:
        raise ValueError(f"not a TensorRT-RTX plan (magic {plan[:4]!r}, expected {RTX_PLAN_MAGIC!r})")
    version = ".".join(str(b) for b in plan[0x18:0x1b])
    mask = plan[0x20]
    return {"version": version, "targets": [cc for bit, cc in enumerate(RTX_COMPUTE_CAPABILITIES) if mask >> bit & 1],
            "mask": mask}


def compute_capability_name(major: int, minor: int) -> str:
    """``SM<major><minor>``: the name a GPU's compute capability has in a manifest (e.g. (12, 1) -> SM121)."""
    return f"SM{major}{minor}"
