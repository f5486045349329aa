"""Loaded by pytest before any test module imports torch: OpenMP's passive waiting, as ``import inference_pio``
chooses for users (see the note in inference_pio/__init__.py); the tests import torch first."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
