"""What each distribution ships: every file its pyproject declares is really in its wheel."""

from __future__ import annotations

import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.conftest import build_wheel

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").is_file())


@pytest.mark.parametrize("package", PACKAGES, ids=[p.name for p in PACKAGES])
def test_wheel_ships_every_declared_license_file(package: Path, tmp_path: Path) -> None:
    project = tomllib.loads((package / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = project.get("license-files", [])
    assert declared, f"{package.name}/pyproject.toml declares no license-files"
    missing = [name for name in declared if not (package / name).is_file()]
    assert not missing, f"{package.name} declares license-files {missing} that do not exist in {package}"
    with zipfile.ZipFile(build_wheel(package, tmp_path)) as wheel:
        shipped = {Path(n).name for n in wheel.namelist() if "/licenses/" in n}
    assert set(declared) <= shipped, f"{package.name}'s wheel ships licenses {sorted(shipped)}, not {declared}"
