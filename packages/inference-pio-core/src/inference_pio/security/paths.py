"""Path validation for model checkpoints and plugin directories.

The whole tree under a checkpoint or plugin directory is checked, following symlinks to what they
point at: every entry must be a regular file or a directory, none world-writable, no pickle weights
below trust level maximum, and (when roots are given) every symlink must land inside a root. Files
the core reads itself go through :func:`read_checked`, which opens without blocking and checks the
opened descriptor, so what was validated is what is read.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from inference_pio.errors import PathNotAllowedError
from inference_pio.security.policy import TrustLevel

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_ENTRIES = 100_000  # a checkpoint or plugin folder is tens of files; this bounds a hostile tree
MAX_READ = 64 * 1024 * 1024  # config.json and plugin modules the core reads itself


def is_hub_id(model_path: str | Path) -> bool:
    """Whether ``model_path`` names a hub repository ('org/name') rather than a local directory: it
    contains a slash, is not written as a path and does not exist here."""
    text = str(model_path)
    return "/" in text and not text.startswith((".", "/", "~")) and not Path(text).expanduser().exists()


def _world_writable(mode: int) -> bool:
    return bool(mode & stat.S_IWOTH) and not bool(mode & stat.S_ISVTX)


def _kind(mode: int) -> str:
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file or directory"


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def _resolve_roots(roots: tuple[Path, ...] | None) -> tuple[Path, ...] | None:
    if roots is None:
        return None
    resolved = []
    for root in roots:
        try:
            resolved.append(root.expanduser().resolve())
        except OSError:
            continue
    return tuple(resolved)


def _resolve_directory(path: Path, what: str) -> tuple[Path, os.stat_result]:
    try:
        top = path.expanduser().resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise PathNotAllowedError(f"{what} {path} does not exist or loops through symlinks") from exc
    info = os.stat(top)
    if not stat.S_ISDIR(info.st_mode):
        kind = "not a directory" if stat.S_ISREG(info.st_mode) else _kind(info.st_mode)
        raise PathNotAllowedError(f"{what} {path} (resolved to {top}) is {kind}")
    return top, info


def check_tree(path: Path, what: str, *, roots: tuple[Path, ...] | None = None, allow_pickle: bool = True) -> Path:
    """Resolve ``path`` and check it and everything below it; returns the resolved directory.

    Symlinks are followed (with ``stat``, which never blocks, even on a FIFO) and judged by what
    they point at; symlinked folders are walked once each.
    """
    top, info = _resolve_directory(path, what)
    real_roots = _resolve_roots(roots)
    if _world_writable(info.st_mode):
        raise PathNotAllowedError(
            f"{what} {top} is world-writable, so anyone on this machine could change what "
            f"is loaded; run chmod o-w {top}"
        )
    seen = {(info.st_dev, info.st_ino)}
    pending = [top]
    count = 0
    while pending:
        folder = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                count += 1
                if count > MAX_ENTRIES:
                    raise PathNotAllowedError(
                        f"{what} {top} holds more than {MAX_ENTRIES} files and folders; point it at the "
                        "checkpoint folder itself"
                    )
                shown = Path(entry.path)
                try:
                    st = os.stat(entry.path)  # follows symlinks
                except (OSError, RuntimeError) as exc:
                    raise PathNotAllowedError(
                        f"{what} {top} contains {shown}, a symlink that points nowhere or loops; remove it"
                    ) from exc
                target = Path(os.path.realpath(entry.path)) if entry.is_symlink() else shown
                where = shown if target == shown else Path(f"{shown} -> {target}")
                if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                    raise PathNotAllowedError(
                        f"{what} {top} contains {where}, which is {_kind(st.st_mode)}; only regular files and "
                        "folders may be loaded"
                    )
                if _world_writable(st.st_mode):
                    raise PathNotAllowedError(
                        f"{where} is world-writable, so anyone on this machine could change what {what} {top} "
                        f"loads; run chmod o-w {target}"
                    )
                if real_roots is not None and target != shown and not _inside(target, real_roots):
                    allowed = ", ".join(str(r) for r in real_roots) or "none configured"
                    raise PathNotAllowedError(
                        f"{what} {top} contains the symlink {where}, which leaves the allowed roots: {allowed}"
                    )
                if not allow_pickle and stat.S_ISREG(st.st_mode) and shown.suffix in PICKLE_SUFFIXES:
                    raise PathNotAllowedError(
                        f"{top} holds pickle-based weights ({shown.relative_to(top)}), which can run code when "
                        "loaded; only safetensors are accepted below trust level maximum. Convert the "
                        "checkpoint to safetensors."
                    )
                if stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    pending.append(shown)
    return top


def check_directory(path: Path, what: str) -> Path:
    """Check a plugin directory and everything in it (see :func:`check_tree`)."""
    return check_tree(path, what)


def validate_model_path(path: str | Path, level: TrustLevel, roots: tuple[Path, ...] | None) -> Path:
    """Check a checkpoint directory for a plugin at ``level``; returns the resolved path or raises."""
    resolved_roots = _resolve_roots(roots)
    top, _ = _resolve_directory(Path(path), "model_path")
    if resolved_roots is not None and not _inside(top, resolved_roots):
        allowed = ", ".join(str(r) for r in resolved_roots) or "none configured"
        raise PathNotAllowedError(
            f"model_path {path} resolves to {top}, outside the roots allowed at trust level {level}: {allowed}. "
            "Add its folder to [trust] model_dirs in the config file, or raise the plugin's trust level."
        )
    return check_tree(Path(path), "model_path", roots=roots, allow_pickle=level >= TrustLevel.MAXIMUM)


def read_checked(path: Path, limit: int = MAX_READ) -> bytes:
    """Read a regular file without ever blocking: check it with ``stat``, open it ``O_NONBLOCK``, and
    check the opened descriptor is the same regular, not world-writable file before reading it."""
    before = os.stat(path)
    if not stat.S_ISREG(before.st_mode):
        raise PathNotAllowedError(f"{path} is {_kind(before.st_mode)}; only regular files are read")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
            raise PathNotAllowedError(f"{path} changed while it was being opened; refusing to read it")
        if _world_writable(st.st_mode):
            raise PathNotAllowedError(f"{path} is world-writable; run chmod o-w {path}")
        if st.st_size > limit:
            raise PathNotAllowedError(f"{path} is {st.st_size} bytes, over the {limit}-byte limit for this file")
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise PathNotAllowedError(f"{path} grew over the {limit}-byte limit while it was read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def custom_code_modules(checkpoint: Path) -> list[str]:
    """Python modules a checkpoint asks transformers to run (``auto_map``); inference-pio never runs them."""
    try:
        config = json.loads(read_checked(checkpoint / "config.json").decode("utf-8"))
    except PathNotAllowedError:
        raise
    except (OSError, ValueError):
        return []
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if not isinstance(auto_map, dict):
        return []
    return sorted({str(v).split(".")[0] for v in auto_map.values() if isinstance(v, str)})
