"""The ``inference-pio`` command line: list, inspect, run, chat with, demo and trust model plugins.

Listing never imports torch; running imports it through the plugin's ``load_model``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from inference_pio.common.interfaces import DEFAULT_MAX_NEW_TOKENS, StreamChunk, TextModelPluginInterface
from inference_pio.errors import InferencePIOError
from inference_pio.plugin_system.manager import PluginManager, get_plugin_manager
from inference_pio.plugin_system.trust import allow_root, forget_root, write_grant
from inference_pio.security.policy import ResourceLimits, TrustLevel

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 130  # argparse itself exits 2 on a usage error


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[str(r.get(c) if r.get(c) is not None else "-") for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def _limits_text(limits: dict[str, Any]) -> str | None:
    short = {
        "memory_bytes": "mem",
        "disk_write_bytes": "disk",
        "cpu_seconds": "cpu",
        "open_files": "files",
        "wall_seconds": "wall",
        "gpu_memory_fraction": "gpu",
        "memory_accounting": "mem-by",
    }
    parts = []
    for key, value in limits.items():
        if key.endswith("_bytes"):
            value = f"{value / 2**30:g}G" if value >= 2**30 else f"{value / 2**20:g}M"
        elif key.endswith("_seconds"):
            value = f"{value:g}s"
        elif key == "gpu_memory_fraction":
            value = f"{value:.0%}" if value else "none"
        parts.append(f"{short.get(key, key)}={value}")
    return " ".join(parts) or None


def _request_text(request: dict[str, Any] | None) -> str | None:
    if not request:
        return None
    state = "granted" if request["granted"] else "not granted"
    if not request["needs"]:  # a register(trust=...) request
        return f"trust {request['level']} ({state})"
    return f"{','.join(request['needs'])} ({request['level']}: {state})"


def cmd_plugins(pm: PluginManager, args: argparse.Namespace) -> int:
    rows = [r.as_row() for r in pm.list_plugins()]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("No inference-pio plugins are installed. Install one, e.g.: pip install inference-pio-qwen3-vl-2b")
    else:
        for row in rows:
            row["isolated"] = "yes" if row["isolated"] else "no"
            row["limits"] = _limits_text(row.get("limits") or {})
            row["asks"] = _request_text(row.get("request"))
        columns = ["name", "version", "distribution", "status", "trust", "isolated", "limits", "asks", "error"]
        print(_table(rows, columns))
        for row in rows:
            request = row.get("request")
            if request and not request["granted"]:
                print(
                    f"{row['name']} asks for {', '.join(request['needs']) or 'trust ' + request['level']}, "
                    f"which takes trust level {request['level']}; to grant it: {request['grant']}"
                )
    return EXIT_OK


def cmd_info(pm: PluginManager, args: argparse.Namespace) -> int:
    record = pm.get_record(args.name)
    info: dict[str, Any] = record.as_row()
    if record.metadata is not None:
        meta = record.metadata.model_dump()
        meta["memory_requirements_gb"] = {k: round(v / 1e9, 2) for k, v in meta.pop("memory_requirements").items()}
        info["metadata"] = meta
    if args.plan:
        config = {k: v for k, v in (("model_path", args.model_path), ("quantization", args.quantization)) if v}
        plan = pm.plan_plugin(args.name, device=args.device, **config)
        info["memory plan"] = plan.describe()
        if args.json:
            info["memory plan"] = {**dataclasses.asdict(plan), "summary": plan.describe()}
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return EXIT_OK
    if record.trust is not None:
        limits = pm.trust_policy.limits_for(record.trust)
        info["limits"] = _limits_text(info["limits"] or {})
        if record.isolated and limits.memory_bytes is not None:
            info["memory accounting"] = _memory_accounting(limits)
        info["request"] = _request_text(info["request"])
        if record.extra.get("request") and not record.extra["request"]["granted"]:
            info["request"] += f"; to grant it: {record.extra['request']['grant']}"
    for key, value in info.items():
        if key == "metadata":
            for mkey, mvalue in value.items():
                if mkey in ("name", "version"):
                    continue
                if isinstance(mvalue, (list, tuple)):
                    mvalue = ", ".join(map(str, mvalue))
                print(f"{mkey:>24}: {mvalue}")
        else:
            print(f"{key:>24}: {value if value is not None else '-'}")
    return EXIT_OK


def _memory_accounting(limits: ResourceLimits) -> str:
    from inference_pio.security.process import describe_memory_accounting

    return describe_memory_accounting(limits)


def cmd_trust(pm: PluginManager, args: argparse.Namespace) -> int:
    record = pm.get_record(args.name)  # a typo fails here, naming the plugins there are
    level = None if args.level.strip().lower() == "default" else TrustLevel.parse(args.level, "trust LEVEL")
    done = write_grant(pm.config_manager.config_file, record.name, level)
    print(done)
    fresh = PluginManager()  # the config file as it is now
    for directory in args.plugins_dir:
        fresh.load_plugins_from_directory(directory)
    now = fresh.get_record(record.name)
    where = "isolated, in a worker process" if now.isolated else "in-process"
    limits = _limits_text(now.as_row()["limits"] or {}) or "none"
    print(f"{record.name} now runs at trust level {now.trust} ({where}); limits: {limits}")
    if level == TrustLevel.MAXIMUM:
        print("maximum also lets pickle weights (*.bin, *.pt, ...) pass path validation: they run code when loaded")
    return EXIT_OK


def _activate(pm: PluginManager, name: str, args: argparse.Namespace, err: TextIO) -> TextModelPluginInterface:
    config = {"model_path": getattr(args, "model_path", None), "max_context": getattr(args, "max_context", None)}
    print(f"Loading {name} on {args.device or 'the configured device'}...", file=err, flush=True)
    plugin = pm.activate_plugin(name, device=args.device, **{k: v for k, v in config.items() if v is not None})
    if plugin.memory_plan is not None:
        print(f"Memory plan: {plugin.memory_plan.describe()}", file=err, flush=True)
    if not isinstance(plugin, TextModelPluginInterface):
        raise InferencePIOError(f"plugin {name!r} does not generate text; 'run' and 'chat' need a text plugin")
    return plugin


def _gen_params(args: argparse.Namespace) -> dict[str, Any]:
    params = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "repetition_penalty": args.repetition_penalty,
    }
    if args.stop:
        params["stop"] = args.stop
    return {k: v for k, v in params.items() if v is not None}


class _Shown:
    """What a terminal shows of a chunk: reasoning (split off by the plugin) between ``<think>`` and
    ``</think>``, then the answer."""

    def __init__(self) -> None:
        self.thinking = False

    def __call__(self, chunk: StreamChunk) -> str:
        shown = ""
        if chunk.reasoning:
            shown += ("" if self.thinking else "<think>") + chunk.reasoning
            self.thinking = True
        if self.thinking and (chunk.text or chunk.finish_reason is not None):
            shown += "</think>"
            self.thinking = False
        return shown + chunk.text


def _print_stream(chunks: Iterator[StreamChunk], out: TextIO) -> StreamChunk:
    last = StreamChunk("")
    shown = _Shown()
    for chunk in chunks:
        out.write(shown(chunk))
        out.flush()
        last = chunk
    out.write("\n")
    return last


def cmd_run(pm: PluginManager, args: argparse.Namespace) -> int:
    plugin = _activate(pm, args.name, args, sys.stderr)
    try:
        if args.raw:
            stream = plugin.stream_text(args.prompt, **_gen_params(args))
        else:
            messages: list[dict[str, Any]] = []
            if args.system:
                messages.append({"role": "system", "content": args.system})
            content: Any = args.prompt
            if args.image:
                content = [*({"type": "image", "image": p} for p in args.image), {"type": "text", "text": args.prompt}]
            messages.append({"role": "user", "content": content})
            stream = plugin.stream_chat(messages, **_gen_params(args))
        last = _print_stream(stream, sys.stdout)
        if last.usage is not None:
            print(
                f"[{last.finish_reason}; {last.usage.prompt_tokens} prompt + {last.usage.completion_tokens} "
                "completion tokens]",
                file=sys.stderr,
            )
    finally:
        pm.deactivate_plugin(args.name)
    return EXIT_OK


def cmd_chat(pm: PluginManager, args: argparse.Namespace) -> int:
    plugin = _activate(pm, args.name, args, sys.stderr)
    history: list[dict[str, Any]] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chatting with", args.name, "- /reset clears the history, /exit (or Ctrl-D) quits.", file=sys.stderr)
    try:
        while True:
            if interactive:
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                break
            text = line.rstrip("\n")
            if text.strip() in ("/exit", "/quit"):
                break
            if text.strip() == "/reset":
                history = history[:1] if args.system else []
                continue
            if not text.strip():
                continue
            history.append({"role": "user", "content": text})
            try:
                parts: list[str] = []
                shown = _Shown()
                for chunk in plugin.stream_chat(history, **_gen_params(args)):
                    parts.append(chunk.text)  # the answer only: templates drop earlier turns' reasoning anyway
                    sys.stdout.write(shown(chunk))
                    sys.stdout.flush()
                sys.stdout.write("\n")
                history.append({"role": "assistant", "content": "".join(parts)})
            except InferencePIOError as exc:  # a bad turn must not end the session
                history.pop()
                print(f"error: {exc}", file=sys.stderr)
    finally:
        pm.deactivate_plugin(args.name)
    return EXIT_OK


def demo_image() -> Any:
    """A small synthetic picture (a red square on a blue-green gradient) for offline demos."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (96, 64))
    for x in range(96):
        for y in range(64):
            image.putpixel((x, y), (0, 2 * x, 4 * y))
    ImageDraw.Draw(image).rectangle((30, 16, 62, 48), fill=(220, 30, 30))
    return image


def cmd_demo(pm: PluginManager, args: argparse.Namespace) -> int:
    records = [r for r in pm.list_plugins() if r.status == "ok" and (args.name is None or r.name == args.name)]
    if args.name is not None and not records:
        pm.get_plugin(args.name)  # raises the precise reason (not found, broken, disabled)
    if not records:
        print("No model plugins installed; install one, e.g.: pip install inference-pio-qwen3-vl-2b", file=sys.stderr)
        return EXIT_ERROR
    failures = 0
    with tempfile.TemporaryDirectory(prefix="inference-pio-demo-") as tmp:
        for record in records:
            print(f"== {record.name}: building its tiny offline checkpoint", file=sys.stderr, flush=True)
            checkpoint = None
            try:
                checkpoint = pm.demo_checkpoint(record.name, Path(tmp))
                if checkpoint is None:
                    print(f"   {record.name} provides no demo checkpoint; skipped", file=sys.stderr)
                    continue
                args.model_path = str(checkpoint)
                allow_root(record, checkpoint)  # its own demo checkpoint, for this plugin only (isolated ones too)
                plugin = _activate(pm, record.name, args, sys.stderr)
                params = {"max_new_tokens": args.max_new_tokens, "temperature": 0.0}
                print(f"-- {record.name} text: ", end="", flush=True)
                last = _print_stream(
                    plugin.stream_chat([{"role": "user", "content": "Hello! Who are you?"}], **params), sys.stdout
                )
                print(f"   [{last.finish_reason}, {last.usage.completion_tokens if last.usage else 0} tokens]")
                if "image" in plugin.metadata.modalities:
                    image = Path(tmp) / "demo.png"  # a file, which crosses to an isolated worker as its path
                    if not image.exists():
                        demo_image().save(image)
                    print(f"-- {record.name} image: ", end="", flush=True)
                    content = [
                        {"type": "image", "image": str(image)},
                        {"type": "text", "text": "Describe this image."},
                    ]
                    last = _print_stream(
                        plugin.stream_chat([{"role": "user", "content": content}], **params), sys.stdout
                    )
                    print(
                        f"   [{last.finish_reason}, {last.usage.prompt_tokens if last.usage else 0} prompt tokens "
                        "with the image]"
                    )
            except InferencePIOError as exc:
                failures += 1
                print(f"error: {record.name}: {exc}", file=sys.stderr)
            finally:
                pm.deactivate_plugin(record.name)
                if checkpoint is not None:
                    forget_root(record, checkpoint)
    print("(tiny random weights: the text is noise; the demo shows the whole path works offline)", file=sys.stderr)
    return EXIT_ERROR if failures else EXIT_OK


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        help="auto | cpu | cuda (every visible GPU) | cuda:N | cuda:0,cuda:1 (default: the config file's, else auto)",
    )
    p.add_argument("--model-path", help="local checkpoint directory or hub id (default: the plugin's model)")
    p.add_argument("--max-context", type=int, help="context window to allocate (prompt + new tokens)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help=f"most tokens to generate (default {DEFAULT_MAX_NEW_TOKENS})",
    )
    p.add_argument("--temperature", type=float, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--system", help="system message")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inference-pio", description="Plugin-based local inference.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the plugin system does")
    parser.add_argument("--plugins-dir", action="append", default=[], help="also load plugins from this directory")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plugins", help="list installed plugins (never imports torch)")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p = sub.add_parser("info", help="show one plugin's metadata and status")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--plan",
        action="store_true",
        help="also show the memory plan for --device (precision, quantization, a split over GPUs); loads no weights",
    )
    p.add_argument("--device", help="with --plan: auto | cpu | cuda | cuda:N | cuda:0,cuda:1 (default: configured)")
    p.add_argument("--model-path", help="with --plan: local checkpoint to size (default: the plugin's metadata)")
    p.add_argument("--quantization", choices=["auto", "none", "int8", "int4"], help="with --plan")
    p = sub.add_parser("run", help="answer one prompt, streaming tokens")
    p.add_argument("name")
    p.add_argument("prompt")
    p.add_argument("--image", action="append", help="image path (repeatable)")
    p.add_argument("--raw", action="store_true", help="continue the prompt as plain text, without the chat template")
    _add_generation_args(p)
    p = sub.add_parser("chat", help="interactive chat that keeps the conversation")
    p.add_argument("name")
    _add_generation_args(p)
    p = sub.add_parser("demo", help="run installed model plugins on tiny generated checkpoints, offline")
    p.add_argument("name", nargs="?")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p = sub.add_parser("trust", help="grant a plugin a trust level: writes [trust.plugins] in the config file")
    p.add_argument("name", help="plugin name, as 'inference-pio plugins' lists it")
    p.add_argument("level", help="low | medium | high | maximum, or 'default' to remove the grant")
    from inference_pio.server.cli import add_serve_parser  # light: the server itself is imported by 'serve'

    add_serve_parser(sub)
    return parser


COMMANDS = {
    "plugins": cmd_plugins,
    "info": cmd_info,
    "run": cmd_run,
    "chat": cmd_chat,
    "demo": cmd_demo,
    "trust": cmd_trust,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("inference_pio.progress").setLevel(logging.INFO)  # e.g. compiling the decode step
    try:
        pm = get_plugin_manager()
        for directory in args.plugins_dir:
            pm.load_plugins_from_directory(directory)
        handler = COMMANDS.get(args.command) or args.handler
        return int(handler(pm, args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (InferencePIOError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
