"""Every hook has a test and documentation, and each hook does what its docstring says."""

from __future__ import annotations

import inspect
from pathlib import Path

from inference_pio import PluginManager
from inference_pio.plugin_system import hookspecs

ROOT = Path(__file__).resolve().parents[3]
HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("inference_pio_")]


def test_hooks_exist() -> None:
    assert HOOKS == ["inference_pio_demo_checkpoint", "inference_pio_register_plugins"]


def test_every_hook_is_documented_in_the_plugin_author_guide() -> None:
    guide = (ROOT / "docs" / "plugin-authors.md").read_text()
    for hook in HOOKS:
        assert f"`{hook}" in guide, f"{hook} is not documented in docs/plugin-authors.md"


def test_every_hook_has_a_test() -> None:
    tests = Path(__file__).read_text()
    for hook in HOOKS:
        assert f"def test_hook_{hook.removeprefix('inference_pio_')}" in tests, f"{hook} has no test here"


def test_hook_register_plugins(pm: PluginManager, fixture_dir: Path) -> None:
    """A hook implementation registers name, factory and metadata through the callback."""
    assert pm.load_plugins_from_directory(fixture_dir) == ["fixture_text"]
    record = pm.get_record("fixture_text")
    assert record.metadata is not None
    assert record.metadata.name == "fixture_text"
    assert callable(record.factory)


def test_hook_demo_checkpoint(pm: PluginManager, fixture_dir: Path, tmp_path: Path) -> None:
    """The first implementation that answers for the plugin returns its checkpoint path; others return None."""
    pm.load_plugins_from_directory(fixture_dir)
    path = pm.demo_checkpoint("fixture_text", tmp_path)
    assert path == tmp_path / "fixture_text"
    assert (path / "config.json").is_file()


def test_entry_point_plugins_answer_only_for_their_own_names(pm: PluginManager, tmp_path: Path) -> None:
    pm.list_plugins()
    assert pm._pm.hook.inference_pio_demo_checkpoint(plugin_name="not_a_plugin", directory=tmp_path) is None


def test_model_packages_build_their_hooks_with_the_core_helper(tmp_path: Path) -> None:
    """register_plugins_hook and demo_checkpoint_hook give pluggy implementations that resolve their
    strings only when called; both model packages' entry modules are built with them."""
    from types import ModuleType

    from inference_pio.plugin_system.discovery import new_hook_manager, registrations
    from inference_pio.plugin_system.hookimpls import demo_checkpoint_hook, register_plugins_hook

    module = ModuleType("made_hooks")
    module.inference_pio_register_plugins = register_plugins_hook({"name": "made"}, "not.imported:yet", trust="high")  # type: ignore[attr-defined]
    module.inference_pio_demo_checkpoint = demo_checkpoint_hook("made", "pathlib:Path")  # type: ignore[attr-defined]
    hooks = new_hook_manager()
    hooks.register(module)
    [found] = registrations(hooks, module)
    assert (found.name, found.factory, found.trust) == ("made", "not.imported:yet", "high")
    assert hooks.hook.inference_pio_demo_checkpoint(plugin_name="made", directory=tmp_path) == tmp_path / "made"
    assert hooks.hook.inference_pio_demo_checkpoint(plugin_name="other", directory=tmp_path) is None
    for package in ("inference-pio-qwen3-vl-2b", "inference-pio-glm-4-7-flash"):
        source = next((ROOT / "packages" / package / "src").glob("*/hooks.py")).read_text()
        assert "register_plugins_hook(" in source and "demo_checkpoint_hook(" in source and "@hookimpl" not in source


def test_register_hooks_run_through_pluggys_hook_caller_so_wrappers_work(pm: PluginManager, tmp_path: Path) -> None:
    """A wrapper implementation only runs when pluggy calls the hook (calling the function directly would
    just create a generator), so this registration proves the manager uses pluggy's hook caller."""
    (tmp_path / "wrapped.py").write_text(
        "from inference_pio import hookimpl\n"
        "@hookimpl(wrapper=True)\n"
        "def inference_pio_register_plugins(register):\n"
        "    register('wrapped', 'x:y', {'name': 'wrapped'})\n"
        "    return (yield)\n"
    )
    assert pm.load_plugins_from_directory(tmp_path) == ["wrapped"]
