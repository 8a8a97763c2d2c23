"""The executors wing: turning a step's passes into logits.

``base`` (the ``Executor`` interface and a registry that imports built-in executors by name on first use),
``torch_executor`` (the reference), ``onnx_executor`` and ``trt_executor`` (engine directories),
``engine_dir`` (the engine directory's manifest and its check), ``engine_kinds`` (which graph serves which
pass kind), ``ort_ops`` (the plugin ops' onnxruntime contrib form).
"""
