"""The inference-pio command line, run as a user runs it: a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


def cli(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "INFERENCE_PIO_CONFIG": "/nonexistent/config.toml", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "inference_pio.cli", *args],
        capture_output=True,
        text=True,
        input=stdin,
        env=full_env,
        timeout=300,
    )


def test_plugins_json_lists_rows_with_the_documented_keys_and_imports_no_torch() -> None:
    code = (
        "import sys, json; from inference_pio.cli import main; rc = main(['plugins', '--json']);"
        "print(json.dumps({'rc': rc, 'heavy': [m for m in ('torch', 'transformers', 'fastapi', 'uvicorn', 'PIL')"
        " if m in sys.modules]}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    out = proc.stdout.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary == {"rc": 0, "heavy": []}
    rows = json.loads("\n".join(out[:-1]))
    assert {"name", "version", "distribution", "status", "error"} <= set(rows[0])


def test_import_inference_pio_imports_no_torch() -> None:
    code = "import sys, inference_pio; print([m for m in ('torch', 'transformers', 'PIL') if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "[]", proc.stderr


def test_plugins_table_shows_broken_plugins_next_to_working_ones() -> None:
    proc = cli("--plugins-dir", str(FIXTURES / "plugins"), "--plugins-dir", str(FIXTURES / "broken_plugins"), "plugins")
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert " ok " in lines["fixture_text"]
    assert "broken" in lines["raises_on_import"]
    assert "broken on purpose" in lines["raises_on_import"]
    assert "incompatible" in lines["future_api"]


def test_run_streams_the_answer() -> None:
    proc = cli(
        "--plugins-dir",
        str(FIXTURES / "plugins"),
        "run",
        "fixture_text",
        "hello there world",
        "--device",
        "cpu",
        "--max-new-tokens",
        "2",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "hello there"
    assert "[length; 3 prompt + 2 completion tokens]" in proc.stderr


def test_chat_keeps_history_and_survives_a_bad_turn() -> None:
    proc = cli(
        "--plugins-dir",
        str(FIXTURES / "plugins"),
        "chat",
        "fixture_text",
        "--device",
        "cpu",
        stdin="first\nsecond\n/exit\n",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["first", "first first second"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("info", "nope"), 1, "error: no plugin named 'nope'"),
        (("frobnicate",), 2, "invalid choice"),
        (("run", "fixture_text", "x", "--temperature", "-1"), 1, "invalid generation parameter 'temperature'"),
        (("--plugins-dir", "/nonexistent/dir", "plugins"), 1, "does not exist"),
    ],
)
def test_errors_have_shell_exit_codes_and_messages(args: tuple[str, ...], code: int, message: str) -> None:
    proc = cli("--plugins-dir", str(FIXTURES / "plugins"), *args)
    assert proc.returncode == code
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_info_prints_metadata_as_json() -> None:
    proc = cli("--plugins-dir", str(FIXTURES / "plugins"), "info", "fixture_text", "--json")
    info = json.loads(proc.stdout)
    assert info["status"] == "ok"
    assert info["metadata"]["model_id"] == "fixture/text"


def test_run_and_chat_default_to_the_generation_parameters_default_token_limit() -> None:
    from inference_pio import GenerationParams
    from inference_pio.cli import build_parser

    default = GenerationParams().max_new_tokens
    parser = build_parser()
    assert parser.parse_args(["run", "p", "hi"]).max_new_tokens == default
    assert parser.parse_args(["chat", "p"]).max_new_tokens == default
    assert f"default {default}" in " ".join(cli("run", "--help").stdout.split())
