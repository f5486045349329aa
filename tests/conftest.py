from __future__ import annotations

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
