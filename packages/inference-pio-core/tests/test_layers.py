"""What importing costs: only the decode loop imports torch; listing plugins never does.

The static layering is import-linter's job (``lint-imports``, contracts in the root pyproject.toml); these tests
check the same promises at run time, in fresh interpreters, where lazy imports and import side effects show.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import inference_pio

TORCH_MODULES = {
    "inference_pio.runtime.engine",
    "inference_pio.runtime.kv_cache",
    "inference_pio.runtime.sampling",
    "inference_pio.runtime.scheduler",
}
"""The decode loop: the only modules allowed to import torch (and, through it, transformers) when imported."""

MODEL_PACKAGES = ["inference_pio_qwen3_vl_2b", "inference_pio_glm_4_7_flash"]

FIRST_HEAVY_IMPORT = """
import importlib, json, sys
for name in sys.argv[2:]:
    importlib.import_module(name)
    heavy = sorted(m for m in sys.argv[1].split(",") if m in sys.modules)
    if heavy:
        print(json.dumps([name, heavy]))
        break
else:
    print(json.dumps(None))
"""


def first_heavy_import(modules: list[str], heavy: tuple[str, ...]) -> list[object] | None:
    """Import ``modules`` in order in a fresh interpreter; the first one after which any of ``heavy`` is loaded."""
    proc = subprocess.run(
        [sys.executable, "-c", FIRST_HEAVY_IMPORT, ",".join(heavy), *modules],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: list[object] | None = json.loads(proc.stdout)
    return result


def core_modules() -> list[str]:
    found = [m.name for m in pkgutil.walk_packages(inference_pio.__path__, "inference_pio.")]
    return ["inference_pio", *sorted(found)]


def test_every_core_module_but_the_decode_loop_imports_neither_torch_nor_transformers() -> None:
    torch_free = [m for m in core_modules() if m not in TORCH_MODULES]
    assert "inference_pio.server.app" in torch_free and "inference_pio.runtime.hf_plugin" in torch_free
    assert first_heavy_import(torch_free, ("torch", "transformers")) is None


def test_model_packages_and_their_entry_modules_import_no_torch() -> None:
    modules = [f"{pkg}{suffix}" for pkg in MODEL_PACKAGES for suffix in ("", ".hooks", ".metadata")]
    assert first_heavy_import(modules, ("torch", "transformers")) is None


def test_the_decode_loop_list_is_current() -> None:
    """Each listed module imports torch at its top (or another listed module), so the list cannot grow stale."""
    for module in sorted(TORCH_MODULES):
        path = Path(inference_pio.__path__[0]).joinpath(*module.split(".")[1:]).with_suffix(".py")
        imported = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
        assert imported & {"torch", *TORCH_MODULES}, f"{module} no longer imports torch: remove it from TORCH_MODULES"


def test_importing_the_core_and_listing_plugins_import_neither_pydantic_nor_the_runtime() -> None:
    """Listing is the cold-start path (``inference-pio plugins``): pydantic alone would be a third of it."""
    code = (
        "import json, sys, io, contextlib, inference_pio\n"
        "before = sorted(m for m in sys.modules if m == 'pydantic' or m.startswith('inference_pio.runtime'))\n"
        "import inference_pio.cli as cli\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    assert cli.main(['plugins', '--json']) == 0\n"
        "rows = json.loads(out.getvalue())\n"
        "after = sorted(m for m in sys.modules if m == 'pydantic' or m.startswith('inference_pio.runtime'))\n"
        "print(json.dumps([before, after, sorted(r['name'] for r in rows if r['status'] == 'ok')]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after, listed = json.loads(proc.stdout)
    assert before == [] and after == []
    assert {"qwen3_vl_2b", "glm_4_7_flash"} <= set(listed)


def test_pydantic_models_load_on_first_use_under_their_usual_names() -> None:
    from inference_pio import GenerationParams
    from inference_pio.common import config_manager, interfaces, schemas

    assert GenerationParams is interfaces.GenerationParams is schemas.GenerationParams
    assert interfaces.PluginOptions is schemas.PluginOptions
    assert config_manager.BuiltinConfig is schemas.BuiltinConfig
    assert interfaces.ModelPluginInterface.Options is schemas.PluginOptions
    assert GenerationParams().max_new_tokens == interfaces.DEFAULT_MAX_NEW_TOKENS
    assert config_manager.BuiltinConfig().max_queue == config_manager.DEFAULT_MAX_QUEUE
    with pytest.raises(AttributeError, match="NoSuchName"):
        _ = interfaces.NoSuchName  # type: ignore[attr-defined]
