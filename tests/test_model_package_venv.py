"""A model package installed alone, as a user installs it: the same loading path as on a GPU.

Loading always passes ``device_map`` to ``from_pretrained`` (CPU included), so this fresh venv, made
only from the wheels and their declared dependencies, proves the CUDA path needs nothing undeclared.
"""

from __future__ import annotations

import json
from pathlib import Path

from .conftest import ROOT, Venv, build_wheel

SCRIPT = """
import json, sys, types
from pathlib import Path

from transformers.integrations.accelerate import check_and_set_device_map

from inference_pio import PluginManager
from inference_pio.runtime.devices import resolve_device
from inference_pio.runtime.hf_plugin import from_pretrained_kwargs
from inference_pio_glm_4_7_flash.testing import make_tiny_checkpoint

checkpoint = make_tiny_checkpoint(Path(sys.argv[1]))
pm = PluginManager()
plugin = pm.activate_plugin("glm_4_7_flash", device="cpu", model_path=str(checkpoint), max_context=128)
result = plugin.generate_text("hello", max_new_tokens=4)
plan = types.SimpleNamespace(dtype="bfloat16", quantization="none")
maps = {}
for device in ("cuda:0", "cuda:1", resolve_device("auto")):
    kwargs = from_pretrained_kwargs(plan, device, {})
    maps[device] = str(check_and_set_device_map(kwargs["device_map"]))  # transformers' own check in from_pretrained
pm.shutdown()
print(json.dumps({"tokens": result.usage.completion_tokens, "maps": maps}))
"""


def test_a_model_package_installed_alone_activates_and_its_cuda_arguments_need_nothing_missing(
    tmp_path: Path, wheels: dict[str, Path]
) -> None:
    glm = build_wheel(ROOT / "packages" / "inference-pio-glm-4-7-flash", tmp_path / "wheels")
    venv = Venv(tmp_path / "venv")
    venv.pip("-c", str(ROOT / "constraints.txt"), str(wheels["core"]), str(glm))
    (tmp_path / "check.py").write_text(SCRIPT)
    proc = venv.run("python", str(tmp_path / "check.py"), str(tmp_path / "tiny"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["tokens"] == 4
    assert set(report["maps"]) == {"cuda:0", "cuda:1", "cpu"}
