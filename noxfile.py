"""Developer automation: `nox -s tests`, `nox -s lint` (ruff, mypy, import-linter), `nox -s build` (sdists, wheels)."""

from __future__ import annotations

import shutil
from pathlib import Path

import nox

ROOT = Path(__file__).parent
PACKAGES = sorted(p for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").is_file())
nox.options.sessions = ["lint", "tests", "build"]


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite, with torch pinned to its CPU build by constraints.txt."""
    session.install("-r", "requirements-dev.txt")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("-r", "requirements-dev.txt")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")
    session.run("lint-imports")


@nox.session
def build(session: nox.Session) -> None:
    """Build the sdist and wheel of every distribution into dist/ and check them with twine."""
    if not isinstance(session.virtualenv, nox.virtualenv.PassthroughEnv):
        session.install("build", "twine", "hatchling")
    dist = ROOT / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    for package in PACKAGES:
        session.run("python", "-m", "build", "--no-isolation", "--outdir", str(dist), str(package))
    session.run("twine", "check", "--strict", *sorted(str(p) for p in dist.iterdir()))
