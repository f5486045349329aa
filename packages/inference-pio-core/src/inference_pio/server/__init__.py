"""The OpenAI-compatible HTTP server (``pip install inference-pio-core[serve]``; ``inference-pio serve``)."""
