"""trimode.plugins: the custom ops of docs/kernels.md, one module each (Triton kernel, launcher, torch reference,
TensorRT plugin definition): ``paged_attention``, ``kv_append``, ``draft_verify``, ``confidence_unmask``.

Call the ops through ``trimode.plugins.dispatch`` (``dispatch.paged_attention(...)`` etc.), which picks the kernels
or the references. Importing this package imports neither Triton, the kernels nor TensorRT.
"""

from trimode.plugins.dispatch import BACKENDS, ENV_VAR, register_tensorrt_plugins, resolve_backend

# The one declaration of the plugin ops that engine graphs carry (TensorRT's plugin namespace and each op's
# version, docs/kernels.md): the build writes them into the graphs and the manifest, the runtime refuses an
# engine directory built with other versions. Bump an op's version whenever its inputs, outputs or semantics change.
PLUGIN_NAMESPACE = "trimode"
PLUGIN_VERSIONS = {"paged_attention": "1", "kv_append": "1", "draft_verify": "1", "draft_verify_sampling": "1",
                   "confidence_unmask": "1"}

__all__ = ["BACKENDS", "ENV_VAR", "PLUGIN_NAMESPACE", "PLUGIN_VERSIONS", "register_tensorrt_plugins",
           "resolve_backend"]
