"""Checkpoints that try to run code: custom-code canaries (auto_map) and code-running pickles never execute."""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from inference_pio import PluginManager
from inference_pio.errors import PathNotAllowedError
from inference_pio_glm_4_7_flash.testing import make_tiny_checkpoint

CANARY = """
import pathlib
pathlib.Path({target!r}).write_text("custom code ran")
"""


class RunsCode:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, (f"echo pickle ran > {self.target}",))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("glm") / "tiny")


@pytest.fixture(params=["low", "high"])
def manager(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[PluginManager, Path]]:
    models = tmp_path / "models"
    models.mkdir()
    config = tmp_path / "config.toml"
    config.write_text(f'[trust]\nmodel_dirs = ["{models}"]\n[trust.plugins]\nglm_4_7_flash = "{request.param}"\n')
    pm = PluginManager(environ={"INFERENCE_PIO_CONFIG": str(config), "HF_HUB_OFFLINE": "1"})
    yield pm, models
    pm.shutdown()


def test_auto_map_custom_code_is_never_executed(manager: tuple[PluginManager, Path], tiny: Path) -> None:
    pm, models = manager
    checkpoint = models / "with-code"
    shutil.copytree(tiny, checkpoint)
    canary = models.parent / "canary-auto-map"
    (checkpoint / "modeling_canary.py").write_text(CANARY.format(target=str(canary)))
    (checkpoint / "configuration_canary.py").write_text(CANARY.format(target=str(canary)))
    config = json.loads((checkpoint / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_canary.CanaryConfig",
        "AutoModelForCausalLM": "modeling_canary.CanaryModel",
    }
    (checkpoint / "config.json").write_text(json.dumps(config))
    pm.activate_plugin("glm_4_7_flash", device="cpu", model_path=str(checkpoint), max_context=256)
    result = pm.execute_plugin("glm_4_7_flash", "Hello", max_new_tokens=3)
    assert result.usage.completion_tokens >= 1
    assert pm.get_record("glm_4_7_flash").isolated == (str(pm.get_record("glm_4_7_flash").trust) == "low")
    assert not canary.exists()


def test_code_running_pickle_weights_are_refused(manager: tuple[PluginManager, Path], tiny: Path) -> None:
    pm, models = manager
    checkpoint = models / "pickled"
    checkpoint.mkdir()
    shutil.copy(tiny / "config.json", checkpoint / "config.json")
    canary = models.parent / "canary-pickle"
    (checkpoint / "pytorch_model.bin").write_bytes(pickle.dumps(RunsCode(canary)))
    with pytest.raises(PathNotAllowedError, match="pickle-based weights"):
        pm.activate_plugin("glm_4_7_flash", device="cpu", model_path=str(checkpoint))
    assert not canary.exists()
    assert not pm.get_record("glm_4_7_flash").active
