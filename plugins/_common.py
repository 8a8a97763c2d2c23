"""Shared plumbing of the plugin modules: the optional Triton import, argument checks, and the compile-to-PTX
step and dtype mapping of the TensorRT AOT implementations.

Triton is optional: without it the modules still import (their ``@triton.jit`` kernels become stubs that raise
on launch) so CPU-only installs keep the torch references. Under ``TRITON_INTERPRET=1`` (set before triton is
first imported) Triton's interpreter runs the kernels on CPU tensors; bf16 operands of ``tl.dot`` are then cast to
fp32 (they give wrong results in the interpreter).
"""

from typing import Any, Iterable, Optional

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # CPU-only install: references only
    HAS_TRITON = False

    class _MissingKernel:
        def __init__(self, fn: Any) -> None:
            self.fn = fn

        def __getitem__(self, grid: Any) -> Any:
            raise RuntimeError(f"Triton kernel {self.fn.__name__} needs the `triton` package; "
                               "use the torch reference (TRIMODE_KERNELS=reference)")

    class _MissingTriton:
        @staticmethod
        def jit(fn: Any = None, **_: Any) -> Any:
            return _MissingKernel(fn) if fn is not None else _MissingKernel

    class _MissingLanguage:
        constexpr = Any  # kernels annotate their compile-time parameters with tl.constexpr

    triton = _MissingTriton()  # type: ignore[assignment]
    tl = _MissingLanguage()  # type: ignore[assignment]  # kernel bodies only run with triton present

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
                torch.int64: "i64", torch.uint8: "u8"}


class KernelArgumentError(ValueError):
    """A tensor handed to a kernel launcher has the wrong shape, dtype, device or strides."""


def is_interpreted(kernel: Any) -> bool:
    """True if ``kernel`` was decorated while TRITON_INTERPRET=1 (it then runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_launch(kernel: Any, *tensors: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter; all on one device."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise KernelArgumentError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if not HAS_TRITON:
        raise RuntimeError("the Triton kernels need the `triton` package (pip install triton)")
    if device.type != "cuda" and not is_interpreted(kernel):
        raise KernelArgumentError(
            f"Triton kernels need CUDA tensors (got {device}); on CPU set TRITON_INTERPRET=1 before triton is "
            "first imported, or use the reference (TRIMODE_KERNELS=reference)")


def check(name: str, t: torch.Tensor, shape: Iterable[Optional[int]], dtypes: Iterable[torch.dtype],
          last_contiguous: bool = True) -> None:
    """Raise KernelArgumentError unless ``t`` has the shape (None = any size), one of the dtypes, and (if
    asked) a unit stride on its last dimension."""
    shape, dtypes = tuple(shape), tuple(dtypes)
    if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise KernelArgumentError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if t.dtype not in dtypes:
        raise KernelArgumentError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if last_contiguous and t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise KernelArgumentError(f"{name}: the last dimension must be contiguous (stride 1), "
                                  f"got strides {t.stride()}")


def torch_dtype_of(trt: Any, dtype: Any) -> torch.dtype:
    """The torch dtype of a TensorRT ``trt.DataType`` (the float and integer types the plugins take)."""
    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
            trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool}[dtype]


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def default_arch() -> int:
    """The compute capability to compile AOT kernels for: the local GPU's, else 90 (H100/H200). Triton's PTX
    targets that architecture only (sm_90a for 90), so an engine runs on the GPU generation it was built on."""
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return 10 * major + minor
    return 90


def compile_ptx(kernel: Any, signature: dict[str, str], constexprs: dict[str, Any], num_warps: int,
                num_stages: int, arch: Optional[int] = None) -> tuple[str, str, int, int]:
    """Compile a Triton kernel ahead of time for ``sm_<arch>``: (name, PTX, threads per block, shared bytes).

    Runs without a GPU (Triton's compiler is host code) but not under TRITON_INTERPRET=1 (the kernel objects
    are then interpreter wrappers). Parameters must be ordered (inputs, integer extras, outputs) - the order
    in which TensorRT's AOT launcher passes them; Triton appends two scratch pointers, which must stay unused.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if is_interpreted(kernel):
        raise RuntimeError("compile_ptx needs real Triton kernels: run without TRITON_INTERPRET")
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch or default_arch(), 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    meta = compiled.metadata
    assert meta.global_scratch_size == 0 and getattr(meta, "profile_scratch_size", 0) == 0, \
        f"{meta.name} uses Triton scratch memory, which TensorRT's AOT launcher does not provide"
    return meta.name, compiled.asm["ptx"], meta.num_warps * 32, meta.shared

