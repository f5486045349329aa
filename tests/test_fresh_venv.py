"""A user's install, for real: a fresh virtual environment, pip install, entry points, the CLI."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import Venv


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, wheels: dict[str, Path]) -> Venv:
    env = Venv(tmp_path_factory.mktemp("venv") / "v")
    env.pip(str(wheels["core"]))
    return env


def test_core_alone_lists_no_plugins_quickly_without_torch(venv: Venv) -> None:
    start = time.perf_counter()
    proc = venv.run("inference-pio", "plugins", "--json")
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
    assert venv.run("python", "-c", "import torch").returncode != 0  # torch is not even installed
    print(f"cold `inference-pio plugins --json`, core only: {elapsed:.3f} s")
    table = venv.run("inference-pio", "plugins")
    assert "No inference-pio plugins are installed" in table.stdout


def test_installed_plugin_appears_and_runs(venv: Venv, wheels: dict[str, Path]) -> None:
    venv.pip(str(wheels["echo"]))
    rows = json.loads(venv.run("inference-pio", "plugins", "--json").stdout)
    assert [(r["name"], r["distribution"], r["version"], r["status"]) for r in rows] == [
        ("echo", "inference-pio-echo", "1.0.0", "ok")
    ]
    proc = venv.run("inference-pio", "run", "echo", "hello plugin world", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "hello plugin world"


def test_broken_distribution_is_listed_as_broken_while_others_work(venv: Venv, wheels: dict[str, Path]) -> None:
    venv.pip(str(wheels["echo"]), str(wheels["broken"]))
    proc = venv.run("inference-pio", "plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["broken"]["status"] == "broken"
    assert "not installed (on purpose)" in rows["broken"]["error"]
    assert rows["broken"]["distribution"] == "inference-pio-broken"
    assert rows["echo"]["status"] == "ok"
    assert venv.run("inference-pio", "run", "echo", "still works", "--device", "cpu").stdout.strip() == "still works"
    strict = subprocess.run(
        [str(venv.bin / "inference-pio"), "plugins"],
        capture_output=True,
        text=True,
        env={**venv.env, "INFERENCE_PIO_STRICT": "1"},
        timeout=120,
    )
    assert strict.returncode == 1
    assert "not installed (on purpose)" in strict.stderr
    disabled = subprocess.run(
        [str(venv.bin / "inference-pio"), "plugins", "--json"],
        capture_output=True,
        text=True,
        env={**venv.env, "INFERENCE_PIO_DISABLE_PLUGINS": "broken"},
        timeout=120,
    )
    assert {r["name"]: r["status"] for r in json.loads(disabled.stdout)} == {"broken": "disabled", "echo": "ok"}


def test_example_plugin_passes_the_conformance_kit_as_a_pytest_plugin(
    venv: Venv, wheels: dict[str, Path], tmp_path: Path
) -> None:
    venv.pip(str(wheels["echo"]), "pytest")
    test = tmp_path / "test_echo_conforms.py"
    test.write_text(
        "from inference_pio_echo import create_echo_plugin\n\n"
        "def test_echo_conforms(plugin_conformance):\n"
        "    plugin_conformance(create_echo_plugin, config={'device': 'cpu'},\n"
        "                       distribution='inference-pio-echo').run_all()\n"
    )
    proc = venv.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout


def test_pip_installed_plugin_breaching_its_memory_limit_is_stopped(
    venv: Venv, wheels: dict[str, Path], tmp_path: Path
) -> None:
    venv.pip(str(wheels["echo"]), str(wheels["hog"]))
    config = tmp_path / "limits.toml"
    config.write_text('[trust]\nthird_party = "low"\n[limits.low]\nmemory = "768MiB"\n')
    env = {**venv.env, "INFERENCE_PIO_CONFIG": str(config)}
    rows = {
        r["name"]: r
        for r in json.loads(
            subprocess.run(
                [str(venv.bin / "inference-pio"), "plugins", "--json"], capture_output=True, text=True, env=env
            ).stdout
        )
    }
    assert (rows["hog"]["trust"], rows["hog"]["isolated"]) == ("low", True)
    hog = subprocess.run(
        [str(venv.bin / "inference-pio"), "run", "hog", "eat", "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert hog.returncode == 1
    assert "exceeded its memory limit (768 MiB)" in hog.stderr
    assert "Traceback" not in hog.stderr
    echo = subprocess.run(
        [str(venv.bin / "inference-pio"), "run", "echo", "still here", "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert echo.stdout.strip() == "still here"


def test_two_distributions_claiming_one_name_is_an_error_naming_both(tmp_path: Path, wheels: dict[str, Path]) -> None:
    env = Venv(tmp_path / "v2")
    env.pip(str(wheels["core"]), str(wheels["echo"]), str(wheels["clone"]))
    rows = json.loads(env.run("inference-pio", "plugins", "--json").stdout)
    echo = [r for r in rows if r["name"] == "echo"]
    assert len(echo) == 1
    assert echo[0]["status"] == "broken"
    assert "inference-pio-echo" in echo[0]["error"]
    assert "inference-pio-echo-clone" in echo[0]["error"]
    run = env.run("inference-pio", "run", "echo", "hello", "--device", "cpu")
    assert run.returncode == 1
    assert "registered twice" in run.stderr
