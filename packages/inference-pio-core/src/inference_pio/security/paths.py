"""Path validation for model checkpoints and plugin directories."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from inference_pio.errors import PathNotAllowedError
from inference_pio.security.policy import TrustLevel

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def is_hub_id(model_path: str | Path) -> bool:
    """Whether ``model_path`` names a hub repository ('org/name') rather than a local directory: it
    contains a slash, is not written as a path and does not exist here."""
    text = str(model_path)
    return "/" in text and not text.startswith((".", "/", "~")) and not Path(text).expanduser().exists()


def _world_writable(mode: int) -> bool:
    return bool(mode & stat.S_IWOTH) and not bool(mode & stat.S_ISVTX)


def check_directory(path: Path, what: str) -> Path:
    """Resolve ``path`` (following symlinks) and refuse devices, FIFOs and world-writable folders or files."""
    try:
        resolved = path.expanduser().resolve(strict=True)
    except (FileNotFoundError, RuntimeError) as exc:
        raise PathNotAllowedError(f"{what} {path} does not exist or loops through symlinks") from exc
    info = resolved.stat()
    if not stat.S_ISDIR(info.st_mode):
        kind = "a device file" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else "not a directory"
        raise PathNotAllowedError(f"{what} {path} (resolved to {resolved}) is {kind}")
    if _world_writable(info.st_mode):
        raise PathNotAllowedError(
            f"{what} {resolved} is world-writable, so anyone on this machine could change what "
            f"is loaded; run chmod o-w {resolved}"
        )
    for child in resolved.iterdir():
        try:
            mode = child.lstat().st_mode
        except OSError:
            continue
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            raise PathNotAllowedError(f"{what} {resolved} contains {child.name}, which is a device, FIFO or socket")
        if stat.S_ISREG(mode) and _world_writable(mode):
            raise PathNotAllowedError(f"{child} is world-writable; run chmod o-w on it")
    return resolved


def inside(path: Path, roots: tuple[Path, ...]) -> bool:
    for root in roots:
        try:
            path.relative_to(root.expanduser().resolve())
            return True
        except (ValueError, OSError):
            continue
    return False


def validate_model_path(path: str | Path, level: TrustLevel, roots: tuple[Path, ...] | None) -> Path:
    """Check a checkpoint directory for a plugin at ``level``; returns the resolved path or raises."""
    resolved = check_directory(Path(path), "model_path")
    if roots is not None and not inside(resolved, roots):
        allowed = ", ".join(str(r) for r in roots) or "none configured"
        raise PathNotAllowedError(
            f"model_path {path} resolves to {resolved}, outside the roots allowed at trust level {level}: {allowed}. "
            "Add its folder to [trust] model_dirs in the config file, or raise the plugin's trust level."
        )
    if level < TrustLevel.MAXIMUM:
        pickles = sorted(p.name for p in resolved.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise PathNotAllowedError(
                f"{resolved} holds pickle-based weights ({', '.join(pickles)}), which can run code when loaded; "
                f"only safetensors are accepted below trust level maximum. Convert the checkpoint to safetensors."
            )
    return resolved


def custom_code_modules(checkpoint: Path) -> list[str]:
    """Python modules a checkpoint asks transformers to run (``auto_map``); inference-pio never runs them."""
    try:
        config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    auto_map = config.get("auto_map") or {}
    return sorted({str(v).split(".")[0] for v in auto_map.values() if isinstance(v, str)})
