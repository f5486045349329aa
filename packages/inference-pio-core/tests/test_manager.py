"""PluginManager: the public API as the design document shows it, fault isolation, selection, conflicts."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import inference_pio
from inference_pio import (
    ConfigError,
    ModelPluginMetadata,
    PluginConflictError,
    PluginDisabledError,
    PluginIncompatibleError,
    PluginLoadError,
    PluginManager,
    PluginNotActiveError,
    PluginNotFoundError,
    get_plugin_manager,
)


def test_api_works_exactly_as_documented_with_a_fixture_plugin(
    fixture_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (tmp_path / "config.toml").write_text(f'[trust]\nmodel_dirs = ["{models}"]\n')
    monkeypatch.setenv("INFERENCE_PIO_CONFIG", str(tmp_path / "config.toml"))
    pm = get_plugin_manager()
    assert pm is get_plugin_manager()
    assert pm.load_plugins_from_directory(fixture_dir) == ["fixture_text"]
    image = tmp_path / "img.jpg"
    image.write_bytes(b"not needed by the fixture")
    pm.activate_plugin("fixture_text", device="cpu", model_path=str(models))
    result = pm.execute_plugin("fixture_text", "Describe this image", image=str(image))
    assert result.text == "<image:img.jpg> Describe this image"
    assert result.finish_reason == "stop"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (4, 4)
    record = pm.get_record("fixture_text")
    assert (str(record.trust), record.isolated, record.active) == ("low", True, True)  # a directory plugin
    pm.deactivate_plugin("fixture_text")
    assert not record.active
    assert "fixture_text" in [r.name for r in pm.list_plugins()]
    assert pm.get_plugin("fixture_text").metadata.version == "0.3.0"


def test_trusted_directory_plugin_runs_in_process_through_its_lifecycle(fixture_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('[trust]\ndirectory = "high"\n')
    pm = PluginManager(environ={"INFERENCE_PIO_CONFIG": str(tmp_path / "c.toml")})
    pm.load_plugins_from_directory(fixture_dir)
    plugin = pm.activate_plugin("fixture_text", device="cpu", model_path=str(tmp_path))
    assert not pm.get_record("fixture_text").isolated
    assert pm.execute_plugin("fixture_text", "in process").text == "in process"
    pm.deactivate_plugin("fixture_text")
    events = __import__(type(plugin).__module__, fromlist=["EVENTS"]).EVENTS
    assert events[-3:] == ["initialize", f"load_model device=cpu model_path={tmp_path.resolve()}", "cleanup"]


def test_singleton_is_thread_safe() -> None:
    seen: list[PluginManager] = []
    threads = [threading.Thread(target=lambda: seen.append(get_plugin_manager())) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(m) for m in seen}) == 1


def test_execute_before_activate_says_what_to_do(pm: PluginManager, fixture_dir: Path) -> None:
    pm.load_plugins_from_directory(fixture_dir)
    with pytest.raises(PluginNotActiveError, match=r"activate_plugin\('fixture_text'"):
        pm.execute_plugin("fixture_text", "hi")


def test_unknown_plugin_lists_what_is_installed(pm: PluginManager, fixture_dir: Path) -> None:
    pm.load_plugins_from_directory(fixture_dir)
    with pytest.raises(PluginNotFoundError, match="no plugin named 'nope'.*fixture_text"):
        pm.get_plugin("nope")


def test_broken_plugins_are_recorded_and_others_keep_working(
    pm: PluginManager, fixture_dir: Path, broken_dir: Path
) -> None:
    pm.load_plugins_from_directory(broken_dir)
    pm.load_plugins_from_directory(fixture_dir)
    rows = {r.name: r for r in pm.list_plugins()}
    assert rows["raises_on_import"].status == "broken"
    assert "broken on purpose" in str(rows["raises_on_import"].error)
    assert rows["bad_metadata"].status == "broken"
    assert "parameter_count" in str(rows["bad_metadata"].error)
    assert rows["future_api"].status == "incompatible"
    assert rows["typo_hook"].status == "broken"
    assert "inference_pio_register_plugin" in str(rows["typo_hook"].error)
    with pytest.raises(PluginLoadError) as info:
        pm.get_plugin("raises_on_import")
    assert isinstance(info.value.original, RuntimeError)
    with pytest.raises(PluginIncompatibleError, match=">=9,<10"):
        pm.get_plugin("future_api")
    pm.activate_plugin("fixture_text", device="cpu")
    assert pm.execute_plugin("fixture_text", "still fine").text == "still fine"


def test_strict_mode_makes_any_failure_fatal(tmp_path: Path, broken_dir: Path) -> None:
    strict = PluginManager(environ={"INFERENCE_PIO_STRICT": "1", "INFERENCE_PIO_CONFIG": str(tmp_path / "x")})
    with pytest.raises(PluginLoadError, match="invalid plugin metadata: field 'parameter_count'"):
        strict.load_plugins_from_directory(broken_dir)
    only_import_error = tmp_path / "one"
    only_import_error.mkdir()
    (only_import_error / "boom.py").write_text((broken_dir / "raises_on_import.py").read_text())
    with pytest.raises(PluginLoadError, match="broken on purpose"):
        strict.load_plugins_from_directory(only_import_error)


def test_duplicate_names_are_an_error_naming_both_sources(pm: PluginManager, fixture_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "copy.py").write_text((fixture_dir / "fixture_text.py").read_text())
    pm.load_plugins_from_directory(fixture_dir)
    pm.load_plugins_from_directory(other)
    with pytest.raises(PluginConflictError) as info:
        pm.get_plugin("fixture_text")
    message = str(info.value)
    assert str(fixture_dir.resolve()) in message
    assert str(other.resolve()) in message


def test_loading_the_same_directory_twice_is_harmless(pm: PluginManager, fixture_dir: Path) -> None:
    assert pm.load_plugins_from_directory(fixture_dir) == ["fixture_text"]
    assert pm.load_plugins_from_directory(fixture_dir) == ["fixture_text"]
    assert pm.get_record("fixture_text").status == "ok"


@pytest.mark.parametrize(
    ("env", "status"),
    [
        ({"INFERENCE_PIO_PLUGINS": ""}, "disabled"),
        ({"INFERENCE_PIO_PLUGINS": "other"}, "disabled"),
        ({"INFERENCE_PIO_PLUGINS": "fixture_text"}, "ok"),
        ({"INFERENCE_PIO_DISABLE_PLUGINS": "fixture_text"}, "disabled"),
        ({}, "ok"),
    ],
)
def test_selection_environment_variables(tmp_path: Path, fixture_dir: Path, env: dict[str, str], status: str) -> None:
    pm = PluginManager(environ={**env, "INFERENCE_PIO_CONFIG": str(tmp_path / "x")})
    pm.load_plugins_from_directory(fixture_dir)
    assert pm.get_record("fixture_text").status == status
    if status == "disabled":
        with pytest.raises(PluginDisabledError):
            pm.activate_plugin("fixture_text", device="cpu")


def test_selection_empty_list_disables_installed_entry_points(tmp_path: Path) -> None:
    pm = PluginManager(environ={"INFERENCE_PIO_PLUGINS": "", "INFERENCE_PIO_CONFIG": str(tmp_path / "x")})
    records = pm.list_plugins()
    assert records, "the dev environment has the model plugins installed"
    assert {r.status for r in records} == {"disabled"}


def test_register_plugin_programmatically_validates_metadata(pm: PluginManager, fixture_dir: Path) -> None:
    assert pm.load_plugins_from_directory(fixture_dir)
    factory = pm.get_record("fixture_text").factory
    meta = factory().metadata.model_dump()
    meta["name"] = "my_programmatic"
    record = pm.register_plugin("my_programmatic", factory, ModelPluginMetadata(**meta))
    assert record.status == "ok"
    assert record.source == "programmatic"
    bad = dict(meta, name="bad_one", supported_devices=["toaster"])
    record = pm.register_plugin("bad_one", factory, bad)
    assert record.status == "broken"
    assert "supported_devices" in str(record.error)


def test_activation_rejects_unsupported_device_and_unknown_config(pm: PluginManager, fixture_dir: Path) -> None:
    pm.load_plugins_from_directory(fixture_dir)
    with pytest.raises(ConfigError, match="supports devices cpu"):
        pm.activate_plugin("fixture_text", device="cuda:0")
    with pytest.raises(ConfigError, match="unknown configuration key 'devcie'"):
        pm.activate_plugin("fixture_text", devcie="cpu")
    with pytest.raises(ConfigError, match="device"):
        pm.activate_plugin("fixture_text", device="gpu-please")


def test_missing_plugin_directory_is_a_clear_error(pm: PluginManager, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        pm.load_plugins_from_directory(tmp_path / "does-not-exist")


def test_public_names_are_exported() -> None:
    for name in (
        "get_plugin_manager",
        "PluginManager",
        "ModelPluginInterface",
        "TextModelPluginInterface",
        "ModelPluginMetadata",
        "ConfigManager",
        "PluginLoadError",
        "hookimpl",
    ):
        assert hasattr(inference_pio, name)
