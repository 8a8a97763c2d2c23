"""trimode.build: from a checkpoint to an engine directory. It imports the runtime; the runtime never imports it.

``targets`` (GPU targets: architecture, memory, recipes), ``recipes`` (names -> ModelOpt configs),
``calibration``, ``quantize`` (ModelOpt -> unified HF checkpoint, in a child process; the runtime loads it with
``trimode.runtime.model.quantized``), ``onnx_graph`` + ``onnx_export`` (one graph per engine kind, plugin and
reference forms, shared weights file), ``sharding`` (a rank's tensors under ``--tp``), ``plugin_ops`` (plugin
node schemas, contrib form), ``trt_compile`` (TensorRT 11, lazily imported), ``pipeline`` (the build and its
manifest), ``evaluate`` (agreement, perplexity), ``memory_planner``. Nothing heavy is imported here.
"""
