"""``inference-pio info NAME --plan``: the memory plan an activation would follow, before any weight is loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from inference_pio import PluginManager
from inference_pio.common.memory import DeviceMemory
from inference_pio.errors import ConfigError

GB = 10**9


def test_info_plan_shows_the_precision_the_memory_allows() -> None:
    # 5 GB free: Qwen3-VL-2B in float32 (8.5 GB) does not fit the CPU, bfloat16 (4.3 GB) does
    env = {
        **os.environ,
        "INFERENCE_PIO_CONFIG": "/nonexistent/config.toml",
        "INFERENCE_PIO_SIMULATED_FREE_MEMORY": "5GB",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "inference_pio.cli", "info", "qwen3_vl_2b", "--plan", "--device", "cpu", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)["memory plan"]
    assert (plan["device"], plan["dtype"], plan["quantization"]) == ("cpu", "bfloat16", "none")
    assert "float32 needs" in plan["summary"] and "would not fit" in plan["summary"]


def test_the_plan_splits_glm_over_two_simulated_gpus_that_hold_it_only_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    pm = PluginManager(environ={"INFERENCE_PIO_CONFIG": "/nonexistent/config.toml"})
    pm.config_manager.memory_probe = lambda device: DeviceMemory(device, 48 * GB, 80 * GB)
    plan = pm.plan_plugin("glm_4_7_flash", device="cuda", quantization="none")  # ~60 GB of bf16 weights
    assert (plan.dtype, plan.quantization, plan.devices) == ("bfloat16", "none", ("cuda:0", "cuda:1"))
    assert "split over 2 GPUs" in plan.describe()
    assert not pm.get_record("glm_4_7_flash").active  # nothing was loaded


def test_an_isolated_plugin_is_not_planned_in_this_process(tmp_path: os.PathLike[str]) -> None:
    from pathlib import Path

    config = Path(tmp_path) / "config.toml"
    config.write_text('[trust.plugins]\nqwen3_vl_2b = "medium"\n')
    pm = PluginManager(environ={"INFERENCE_PIO_CONFIG": str(config)})
    with pytest.raises(ConfigError, match="isolated worker.*inference-pio run qwen3_vl_2b"):
        pm.plan_plugin("qwen3_vl_2b", device="cpu")


def test_the_config_files_device_holds_when_the_caller_names_none(tmp_path: os.PathLike[str]) -> None:
    from pathlib import Path

    config = Path(tmp_path) / "config.toml"
    config.write_text('[plugins.qwen3_vl_2b]\ndevice = "cpu"\n')
    env = {"INFERENCE_PIO_CONFIG": str(config), "INFERENCE_PIO_SIMULATED_FREE_MEMORY": "64GB"}
    pm = PluginManager(environ=env)
    assert pm.plan_plugin("qwen3_vl_2b").device == "cpu"  # [plugins.qwen3_vl_2b] device, not the call's default
    with pytest.raises(ConfigError, match="sees no CUDA GPU"):
        pm.plan_plugin("qwen3_vl_2b", device="cuda")  # a caller's choice still wins
