"""The model wing: what a checkpoint is and how it becomes an ``NLDModel``.

``config`` (config.json), ``rope`` (RoPE / YaRN), ``network`` (the NLD network, which knows no cache),
``tokenizer``, ``checkpoint`` (HF-format checkpoints and the PEFT drafter LoRA), ``quantized`` (ModelOpt
unified-HF checkpoints, dequantized with Q/DQ simulated). Imports only ``trimode.runtime.model.*``.
"""
