"""The README's main job: `inference-pio demo`, offline, with both model plugins installed."""

from __future__ import annotations

import os
import subprocess
import sys


def test_demo_runs_every_installed_model_plugin_offline() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFERENCE_PIO_CONFIG": "/nonexistent.toml"}
    proc = subprocess.run(
        [sys.executable, "-m", "inference_pio.cli", "demo", "--max-new-tokens", "5"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "-- glm_4_7_flash text:" in out
    assert "-- qwen3_vl_2b text:" in out
    assert "-- qwen3_vl_2b image:" in out
    assert "prompt tokens with the image" in out
    assert "Memory plan: float32 on cpu" in proc.stderr


def test_demo_of_an_unknown_plugin_fails_clearly() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "inference_pio.cli", "demo", "nope"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    assert "no plugin named 'nope'" in proc.stderr
