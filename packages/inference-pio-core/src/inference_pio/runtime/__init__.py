"""The shared generation runtime: static KV cache, decode loop, sampling, streaming, chat handling.

Imported only when a plugin loads a model; torch and transformers are imported here, never by
``import inference_pio``.
"""
