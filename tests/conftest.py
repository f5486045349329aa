from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def build_wheel(project: Path, outdir: Path) -> Path:
    """Build ``project``'s wheel with the current interpreter's hatchling (no network)."""
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(outdir), str(project)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    name = project.name.replace("-", "_")
    return next(outdir.glob(f"{name}-*.whl"))


class Venv:
    """A fresh virtual environment, as a user makes one: pip installs into it, commands run from its bin/."""

    def __init__(self, path: Path) -> None:
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300)
        self.bin = path / "bin"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("INFERENCE_PIO_", "VIRTUAL_ENV"))}
        self.env["PATH"] = f"{self.bin}{os.pathsep}{self.env.get('PATH', '')}"
        self.env["INFERENCE_PIO_CONFIG"] = str(path / "no-config.toml")

    def pip(self, *args: str) -> None:
        """``pip install ARGS``; no bytecode compiling (most of an install's time with torch; imports compile
        what they use)."""
        proc = subprocess.run(
            [
                str(self.bin / "python"),
                "-m",
                "pip",
                "install",
                "-q",
                "--no-compile",
                "--disable-pip-version-check",
                *args,
            ],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / args[0]), *args[1:]], capture_output=True, text=True, env=self.env, timeout=300
        )


@pytest.fixture(scope="session")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wheels")
    return {
        "core": build_wheel(ROOT / "packages" / "inference-pio-core", out),
        "echo": build_wheel(ROOT / "docs" / "examples" / "inference-pio-echo", out),
        "broken": build_wheel(ROOT / "tests" / "fixtures" / "inference-pio-broken", out),
        "hog": build_wheel(ROOT / "tests" / "fixtures" / "inference-pio-hog", out),
        "clone": build_wheel(ROOT / "tests" / "fixtures" / "inference-pio-echo-clone", out),
    }


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Tiny Qwen3-VL and GLM-4.7-Flash checkpoints (read-only for the servers that load them), built once."""
    from inference_pio_glm_4_7_flash.testing import make_tiny_checkpoint as make_glm
    from inference_pio_qwen3_vl_2b.testing import make_tiny_checkpoint as make_qwen

    root = tmp_path_factory.mktemp("ckpt")
    return make_qwen(root / "qwen"), make_glm(root / "glm")
