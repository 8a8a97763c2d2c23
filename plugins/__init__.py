"""trimode.plugins: the custom ops of docs/kernels.md, one module each (Triton kernel, launcher, torch reference,
TensorRT plugin definition): ``paged_attention``, ``kv_append``, ``draft_verify``, ``confidence_unmask``.

Call the ops through ``trimode.plugins.dispatch`` (``dispatch.paged_attention(...)`` etc.), which picks the kernels
or the references. Importing this package imports neither Triton, the kernels nor TensorRT.
"""

from .dispatch import BACKENDS, ENV_VAR, register_tensorrt_plugins, resolve_backend

__all__ = ["BACKENDS", "ENV_VAR", "register_tensorrt_plugins", "resolve_backend"]
