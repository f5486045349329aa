"""The isolated worker: runs one plugin under OS resource limits and answers the manager over pipes.

Started as ``python -I -m inference_pio.security.worker`` by its supervisor
(:mod:`inference_pio.security.supervisor`), which applies the rlimits before ``exec``, so before any
plugin code runs; the environment is scrubbed and the working directory is the worker's own. The
manager's side of the pipes is :class:`inference_pio.security.isolated.IsolatedPlugin`.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import select
import sys
from typing import IO, Any

from inference_pio.errors import InferencePIOError
from inference_pio.security import wire

CALLS = frozenset({"infer", "generate_text", "chat_completion", "tokenize", "detokenize", "supports_config"})
STREAMS = frozenset({"stream_text", "stream_chat"})


def breach_of(exc: BaseException) -> str | None:
    """Which resource limit an exception means, if any."""
    if isinstance(exc, MemoryError):
        return "memory"
    if isinstance(exc, OSError):
        if exc.errno == errno.EFBIG:
            return "disk_write_bytes"
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            return "open_files"
        if exc.errno == errno.ENOMEM:
            return "memory"
    if isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc) or "out of memory" in str(exc)):
        return "memory"
    return None


def error_message(exc: BaseException) -> dict[str, Any]:
    return {
        "error": {
            "type": type(exc).__name__,
            "message": str(exc),
            "param": getattr(exc, "param", None),
            "limit": getattr(exc, "limit", None),
            "value": getattr(exc, "value", None),
        }
    }


def cancelled(inp: IO[bytes]) -> bool:
    ready, _, _ = select.select([inp], [], [], 0)
    if not ready:
        return False
    return wire.recv(inp).get("op") == "cancel"


def build_plugin(spec: dict[str, Any]) -> Any:
    """Rebuild the plugin the way the manager found it: its entry point or directory module, then its factory."""
    from inference_pio.common.interfaces import ModelPluginInterface
    from inference_pio.plugin_system.discovery import find_factory
    from inference_pio.plugin_system.registry import resolve_factory

    factory = find_factory(spec["name"], distribution=spec.get("distribution"), directory=spec.get("directory"))
    plugin = resolve_factory(factory)()
    if not isinstance(plugin, ModelPluginInterface):
        raise TypeError(f"factory of plugin {spec['name']!r} returned {type(plugin).__name__}, not a plugin")
    return plugin


def serve(spec: dict[str, Any], inp: IO[bytes], out: IO[bytes]) -> int:
    plugin: Any = None
    while True:
        try:
            message = wire.recv(inp)
        except wire.WireError:
            return 0
        op = message.get("op")
        try:
            if op == "activate":
                plugin = build_plugin(spec)
                config = message["config"]
                plugin.initialize(**config)
                plugin.load_model(config)
                wire.send(out, {"ok": True})
            elif op == "call" and message.get("method") in CALLS and plugin is not None:
                result = getattr(plugin, message["method"])(*message.get("args", []), **message.get("kwargs", {}))
                wire.send(out, {"ok": result})
            elif op == "stream" and message.get("method") in STREAMS and plugin is not None:
                stream = getattr(plugin, message["method"])(*message.get("args", []), **message.get("kwargs", {}))
                for chunk in stream:
                    wire.send(out, {"chunk": chunk})
                    if cancelled(inp):
                        stream.close()
                        break
                wire.send(out, {"end": True})
            elif op == "shutdown":
                if plugin is not None:
                    plugin.cleanup()
                wire.send(out, {"ok": True})
                return 0
            elif op == "cancel":
                continue
            else:
                wire.send(out, {"error": {"type": "ProtocolError", "message": f"unknown or invalid op {op!r}"}})
        except BaseException as exc:
            limit = breach_of(exc)
            if limit is not None:
                try:
                    wire.send(out, {"breach": {"limit": limit, "message": f"{type(exc).__name__}: {exc}"}})
                finally:
                    os._exit(3)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            if not isinstance(exc, InferencePIOError):
                import traceback

                traceback.print_exc()
            wire.send(out, error_message(exc))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--in", dest="fd_in", type=int, required=True)
    parser.add_argument("--out", dest="fd_out", type=int, required=True)
    parser.add_argument("--spec", required=True)
    args = parser.parse_args(argv)
    spec = json.loads(args.spec)
    for path in reversed(spec.get("sys_path", [])):
        if path not in sys.path:
            sys.path.insert(0, path)
    with os.fdopen(args.fd_in, "rb", buffering=0) as inp, os.fdopen(args.fd_out, "wb", buffering=0) as out:
        return serve(spec, inp, out)


if __name__ == "__main__":
    sys.exit(main())
