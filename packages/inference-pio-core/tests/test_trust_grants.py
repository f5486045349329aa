"""What a plugin asks for, shown by the CLI; the one-step grant written into the config file; and
``inference-pio demo`` for an isolated plugin — all through the real command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from inference_pio import PluginManager
from inference_pio.errors import PathNotAllowedError
from inference_pio.plugin_system.trust import allow_root, forget_root, write_grant
from inference_pio.security.policy import TrustLevel

FIXTURES = Path(__file__).parent / "fixtures"
ASKING = FIXTURES / "asking"


def cli(config: Path, *args: str, plugins: Path = ASKING) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "INFERENCE_PIO_CONFIG": str(config), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "inference_pio.cli", "--plugins-dir", str(plugins), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def rows(config: Path) -> dict[str, dict[str, object]]:
    proc = cli(config, "plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    return {row["name"]: row for row in json.loads(proc.stdout)}


USER_CONFIG = """# my inference-pio settings
[defaults]
max_context = 2048  # keep this

[trust]
model_dirs = ["/srv/models"]

[trust.plugins]
"some.other" = "low"   # an earlier decision

[limits.low]
memory = "4GiB"
"""


def test_a_request_is_shown_and_granted_in_one_step_by_the_user_only(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(USER_CONFIG)
    before = rows(config)
    assert before["wants_gpu"]["trust"] == "low"  # asking grants nothing
    assert before["wants_gpu"]["request"] == {
        "needs": ["gpu"],
        "level": "medium",
        "granted": False,
        "grant": "inference-pio trust wants_gpu medium",
    }
    assert before["wants_in_process"]["request"]["level"] == "high"  # type: ignore[index]
    assert before["gpu_probe"]["request"] is None
    table = cli(config, "plugins").stdout
    assert "gpu (medium: not granted)" in table
    assert (
        "wants_gpu asks for gpu, which takes trust level medium; to grant it: inference-pio trust wants_gpu medium"
        in (table)
    )
    info = cli(config, "info", "wants_in_process").stdout
    assert "in_process,gpu (high: not granted); to grant it: inference-pio trust wants_in_process high" in info
    assert "gpu=none" in info and "memory accounting: address space (RLIMIT_AS) on cpu" in info

    granted = cli(config, "trust", "wants_gpu", "medium")
    assert granted.returncode == 0, granted.stderr
    assert f'added wants_gpu = "medium" to [trust.plugins] in {config}' in granted.stdout
    assert "wants_gpu now runs at trust level medium (isolated, in a worker process)" in granted.stdout
    assert "gpu=90%" in granted.stdout
    text = config.read_text()
    assert "# my inference-pio settings" in text and "# keep this" in text and "# an earlier decision" in text
    data = tomllib.loads(text)
    assert data["trust"]["plugins"] == {"some.other": "low", "wants_gpu": "medium"}
    assert data["defaults"] == {"max_context": 2048} and data["limits"] == {"low": {"memory": "4GiB"}}
    after = rows(config)
    assert after["wants_gpu"]["trust"] == "medium" and after["wants_gpu"]["request"]["granted"] is True  # type: ignore[index]
    assert after["wants_in_process"]["trust"] == "low"  # one grant, one plugin

    assert cli(config, "trust", "wants_in_process", "high").returncode == 0
    assert rows(config)["wants_in_process"]["isolated"] is False
    removed = cli(config, "trust", "wants_gpu", "default")
    assert "removed the grant for 'wants_gpu'" in removed.stdout
    assert tomllib.loads(config.read_text())["trust"]["plugins"] == {"some.other": "low", "wants_in_process": "high"}

    typo = cli(config, "trust", "wants_gpo", "medium")
    assert typo.returncode == 1 and "no plugin named 'wants_gpo'" in typo.stderr
    bad = cli(config, "trust", "wants_gpu", "root")
    assert bad.returncode == 1 and "low, medium, high or maximum" in bad.stderr
    assert tomllib.loads(config.read_text())["trust"]["plugins"] == {"some.other": "low", "wants_in_process": "high"}


def test_grants_go_into_a_new_file_and_layouts_it_cannot_edit_safely_are_left_alone(tmp_path: Path) -> None:
    fresh = tmp_path / "sub" / "config.toml"
    assert "added [trust.plugins]" in write_grant(fresh, "p", TrustLevel.HIGH)
    assert tomllib.loads(fresh.read_text()) == {"trust": {"plugins": {"p": "high"}}}
    inline = tmp_path / "inline.toml"
    inline.write_text('[trust]\nplugins = { q = "low" }\n')
    from inference_pio import ConfigError

    with pytest.raises(ConfigError, match='without a \\[trust.plugins\\] table.*p = "high"'):
        write_grant(inline, "p", TrustLevel.HIGH)
    assert inline.read_text() == '[trust]\nplugins = { q = "low" }\n'
    broken = tmp_path / "broken.toml"
    broken.write_text("[trust\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        write_grant(broken, "p", TrustLevel.HIGH)


def test_demo_works_for_an_isolated_plugin_and_opens_no_folder_to_others(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("")
    demo = cli(config, "demo", "fixture_text", plugins=FIXTURES / "plugins")
    assert demo.returncode == 0, demo.stderr
    assert "-- fixture_text text: Hello! Who are you?" in demo.stdout
    assert "-- fixture_text image: <image:demo.png>" in demo.stdout
    assert rows(config)["gpu_probe"]["isolated"] is True

    pm = PluginManager(environ={"INFERENCE_PIO_CONFIG": str(config)})
    pm.load_plugins_from_directory(FIXTURES / "plugins")
    pm.load_plugins_from_directory(ASKING)
    checkpoint = tmp_path / "demo" / "fixture_text"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text("{}")
    record = pm.get_record("fixture_text")
    assert record.isolated and record.trust == TrustLevel.LOW
    try:
        with pytest.raises(PathNotAllowedError):
            pm.activate_plugin("fixture_text", device="cpu", model_path=str(checkpoint))
        allow_root(record, checkpoint)
        pm.activate_plugin("fixture_text", device="cpu", model_path=str(checkpoint))
        with pytest.raises(PathNotAllowedError):  # for that plugin only
            pm.activate_plugin("gpu_probe", device="cpu", model_path=str(checkpoint))
        with pytest.raises(PathNotAllowedError):  # and that folder only
            pm.activate_plugin("fixture_text", device="cpu", model_path=str(tmp_path))
        forget_root(record, checkpoint)
        with pytest.raises(PathNotAllowedError):
            pm.activate_plugin("fixture_text", device="cpu", model_path=str(checkpoint))
    finally:
        pm.shutdown()
