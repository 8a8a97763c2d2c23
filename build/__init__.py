"""trimode.build: quantization recipes and engine export.

``recipes`` (names -> ModelOpt configs), ``calibration``, ``quantize`` (ModelOpt -> unified HF checkpoint, in a
child process), ``quantized_loader`` (that checkpoint -> NLDModel / packed tensors), ``engine_kinds``,
``onnx_graph`` + ``onnx_export`` (one graph per engine kind, plugin and reference forms, shared weights file),
``plugin_ops`` (plugin node schemas, contrib form), ``trt_compile`` (TensorRT 11, lazily imported),
``pipeline`` (the build and its manifest), ``evaluate`` (agreement, perplexity), ``memory_planner``.
Nothing heavy is imported here.
"""
