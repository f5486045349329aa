"""A third-party, transformers-backed plugin as a user installs it: docs/examples/inference-pio-tinyllama.

One fresh virtual environment for the module (the core wheel and the example's wheel, pinned only by the
repository's constraints.txt), the plugin at the trust level every pip-installed plugin gets (medium:
isolated worker, checkpoints only from allowed folders), then the author's and the user's paths through it:
the conformance kit, ``inference-pio run``, ``inference-pio demo`` and ``inference-pio serve`` with
concurrent streams.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from .conftest import ROOT, Venv, build_wheel
from .server_harness import ServerProcess

EXAMPLE = ROOT / "docs" / "examples" / "inference-pio-tinyllama"


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, wheels: dict[str, Path]) -> Venv:
    wheel = build_wheel(EXAMPLE, tmp_path_factory.mktemp("tinyllama-wheel"))
    env = Venv(tmp_path_factory.mktemp("venv") / "v")
    core = f"inference-pio-core[serve] @ {wheels['core'].as_uri()}"
    env.pip("-c", str(ROOT / "constraints.txt"), core, str(wheel), "pytest")
    return env


# Builds the example's tiny checkpoint, then loads it the way the guide shows for direct use of an HFTextPlugin
# (a plain dict, no manager); one interpreter for both, since importing torch is most of the cost.
CHECKPOINT_AND_PLAIN_DICT = """
import json, sys
from inference_pio.errors import ConfigError
from inference_pio_tinyllama.plugin import TinyLlamaPlugin
from inference_pio_tinyllama.testing import make_tiny_checkpoint

path = str(make_tiny_checkpoint(sys.argv[1]))
plugin = TinyLlamaPlugin()
plugin.initialize()
plugin.load_model({"model_path": path, "device": "cpu"})
report = {"plan": plugin.memory_plan.describe()}
report["tokens"] = plugin.generate_text("Hello", max_new_tokens=3).usage.completion_tokens
try:
    plugin.load_model({"model_path": path, "devise": "cpu"})
except ConfigError as exc:
    report["error"] = str(exc)
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def built(venv: Venv, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The example's tiny checkpoint, in a folder the user's config lists under [trust] model_dirs."""
    models = tmp_path_factory.mktemp("models")
    proc = venv.run("python", "-c", CHECKPOINT_AND_PLAIN_DICT, str(models / "tinyllama"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (venv.bin.parent / "config.toml").write_text(f"[trust]\nmodel_dirs = [{json.dumps(str(models))}]\n")
    venv.env["INFERENCE_PIO_CONFIG"] = str(venv.bin.parent / "config.toml")
    return models / "tinyllama", json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def checkpoint(built: tuple[Path, dict[str, Any]]) -> Path:
    return built[0]


def test_listed_at_the_default_third_party_trust_isolated(venv: Venv) -> None:
    proc = venv.run("inference-pio", "plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    (row,) = [r for r in json.loads(proc.stdout) if r["name"] == "tinyllama"]
    assert (row["distribution"], row["status"], row["trust"], row["isolated"]) == (
        "inference-pio-tinyllama",
        "ok",
        "medium",
        True,
    )


def test_the_examples_own_tests_pass_the_conformance_kit(venv: Venv, tmp_path: Path) -> None:
    """What the guide tells an author to run: the example's tests/ with pytest, in the installed environment."""
    shutil.copytree(EXAMPLE / "tests", tmp_path / "tests")
    proc = subprocess.run(
        [str(venv.bin / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**venv.env, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout


def test_load_model_takes_a_plain_dict(built: tuple[Path, dict[str, Any]]) -> None:
    """The guide's direct use of an HFTextPlugin: no manager, no resolved configuration."""
    report = built[1]
    assert report["plan"].startswith("float32 on cpu"), report
    assert report["tokens"] == 3
    assert "unknown configuration key 'devise'" in report["error"] and "device" in report["error"]


def test_kit_says_when_the_distribution_is_not_installed() -> None:
    from inference_pio.testing import Conformance, ConformanceError
    from inference_pio_glm_4_7_flash import create_glm_4_7_flash_plugin

    kit = Conformance(create_glm_4_7_flash_plugin, distribution="inference-pio-not-installed")
    with pytest.raises(ConformanceError, match="'inference-pio-not-installed' is not installed") as caught:
        kit.check_discovery()
    assert "pip install -e ." in str(caught.value)
    with pytest.raises(ConformanceError, match="is not installed"):
        kit.check_as_installed()


def test_kit_says_when_it_has_no_local_checkpoint() -> None:
    from inference_pio.testing import Conformance, ConformanceError
    from inference_pio_glm_4_7_flash import create_glm_4_7_flash_plugin

    kit = Conformance(create_glm_4_7_flash_plugin, config={"device": "cpu", "local_files_only": True})
    with pytest.raises(ConformanceError, match="no model_path") as caught:
        kit.check_lifecycle()
    assert "zai-org/GLM-4.7-Flash" in str(caught.value) and "config={'model_path': DIR}" in str(caught.value)


def test_kit_without_a_distribution_warns_what_it_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    from inference_pio.testing import Conformance, ConformanceError
    from inference_pio_glm_4_7_flash import create_glm_4_7_flash_plugin

    def stop() -> None:
        raise ConformanceError("stopped after the warning")

    kit = Conformance(create_glm_4_7_flash_plugin)
    monkeypatch.setattr(kit, "check_light_import", stop)
    with (
        pytest.warns(UserWarning, match=r"check_as_installed \(.*\) were NOT run"),
        pytest.raises(ConformanceError, match="stopped after the warning"),
    ):
        kit.run_all()


def test_run_answers_from_the_isolated_worker(venv: Venv, checkpoint: Path) -> None:
    proc = venv.run(
        "inference-pio", "run", "tinyllama", "Hello!", "--model-path", str(checkpoint), "--device", "cpu",
        "--max-new-tokens", "5",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[length; " in proc.stderr and "+ 5 completion tokens]" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_refuses_a_checkpoint_outside_the_allowed_folders(venv: Venv, checkpoint: Path, tmp_path: Path) -> None:
    elsewhere = shutil.copytree(checkpoint, tmp_path / "elsewhere")
    proc = venv.run("inference-pio", "run", "tinyllama", "Hello!", "--model-path", str(elsewhere), "--device", "cpu")
    assert proc.returncode == 1
    assert "model_dirs" in proc.stderr, proc.stderr  # the error says how to allow the folder
    assert "Traceback" not in proc.stderr


def test_demo_builds_its_checkpoint_and_answers_at_default_trust(venv: Venv) -> None:
    proc = venv.run("inference-pio", "demo", "tinyllama", "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "-- tinyllama text:" in proc.stdout
    assert "4 tokens]" in proc.stdout


def _stream(
    client: openai.OpenAI,
    index: int,
    start: threading.Barrier,
    times: dict[int, dict[str, float]],
    errors: list[BaseException],
) -> None:
    try:
        start.wait(60)
        stream = client.chat.completions.create(
            model="tinyllama",
            messages=[{"role": "user", "content": f"Request {index}: tell me a story."}],
            max_tokens=128,
            temperature=0.0,
            stream=True,
            extra_body={"ignore_eos": True},  # random weights: no early end-of-sequence
        )
        got: dict[str, float] = {}
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and "first" not in got:
                got["first"] = time.monotonic()
        got["done"] = time.monotonic()
        times[index] = got
    except BaseException as exc:
        errors.append(exc)


def test_serve_decodes_four_concurrent_streams_together(venv: Venv, checkpoint: Path, tmp_path: Path) -> None:
    """Every one of 4 concurrent streams gets its first token before any of them finishes: they share batches
    (served one after another, the 2nd would start only after the 1st ended)."""
    config = Path(venv.env["INFERENCE_PIO_CONFIG"])
    server = ServerProcess(
        config,
        python=str(venv.bin / "python"),
        env=venv.env,
        log=tmp_path / "serve.log",
        extra_args=("tinyllama", "--model-path", str(checkpoint), "--device", "cpu", "--max-batch-size", "4"),
    )
    try:
        server.wait_ready(timeout=240)
        times: dict[int, dict[str, float]] = {}
        errors: list[BaseException] = []
        start = threading.Barrier(4)
        clients = [
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300) for _ in range(4)
        ]
        threads = [
            threading.Thread(target=_stream, args=(client, i, start, times, errors)) for i, client in enumerate(clients)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert not errors, errors
        assert len(times) == 4 and all("first" in t for t in times.values()), times
        zero = min(t["first"] for t in times.values())
        firsts = sorted(round(t["first"] - zero, 3) for t in times.values())
        dones = sorted(round(t["done"] - zero, 3) for t in times.values())
        print(f"first tokens at {firsts} s, finished at {dones} s (from the earliest first token)")
        assert firsts[-1] < dones[0], f"a stream finished before all had started: firsts {firsts}, dones {dones}"
    finally:
        server.stop()
