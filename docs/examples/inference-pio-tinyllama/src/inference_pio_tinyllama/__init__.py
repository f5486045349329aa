"""An example third-party inference-pio plugin: TinyLlama-1.1B-Chat on the shared transformers runtime."""

from inference_pio_tinyllama.hooks import METADATA

__all__ = ["METADATA"]
