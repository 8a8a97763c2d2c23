"""trimode.runtime: the decoding core (flat: requests, passes, modes, the engine loop, the paged KV cache,
sampling, unmasking, acceptance, settings, assembly, the ``TriModeLM`` API) and its wings ``model``,
``executors``, ``parallel``, ``serving``, ``cli``. docs/architecture.md has the layer table."""
