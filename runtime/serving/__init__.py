"""The serving wing: ``engine_service`` (the one thread that steps the engine for many clients), the Triton
Python-backend model (``triton_request`` parses and checks inputs, ``triton_model`` streams), ``repository``
(writes a Triton model repository), ``server`` (starts and stops ``tritonserver``; ``processes``: it dies with
its launcher and leaves nothing behind), ``client`` (a gRPC streaming client)."""
