"""``inference-pio serve``: run the OpenAI-compatible server for one or more plugins."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from typing import TYPE_CHECKING, Any

from inference_pio.errors import ConfigError, InferencePIOError
from inference_pio.plugin_system.manager import PluginManager

if TYPE_CHECKING:
    from inference_pio.server.state import ServerSettings

log = logging.getLogger("inference_pio.server")


def add_serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve plugins over an OpenAI-compatible HTTP API")
    p.add_argument("name", nargs="?", help="plugin to serve (default: [server].models in the config file)")
    p.add_argument("--model-path", help="checkpoint directory or hub id for NAME")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set INFERENCE_PIO_API_KEY)")
    p.add_argument("--max-batch-size", type=int, help="requests decoded together (default 8)")
    p.add_argument("--max-queue", type=int, help="requests waiting for a slot before 429 (default 64)")
    p.add_argument("--max-context", type=int, help="context window per request (default 4096)")
    p.add_argument(
        "--allow-image-host",
        action="append",
        default=[],
        help="host whose http(s) image URLs may be fetched (repeatable; default: none)",
    )
    p.add_argument("--grace-seconds", type=float, help="on SIGTERM, time for in-flight requests (default 30)")
    ray = p.add_argument_group("Ray Serve (pip install 'inference-pio-core[ray]'; [server.ray] in the config file)")
    ray.add_argument("--ray", action="store_true", help="serve on Ray Serve: replicas behind one endpoint")
    ray.add_argument("--address", help="Ray cluster to join (e.g. 10.0.0.5:6379 or auto; default: start a local one)")
    ray.add_argument("--replicas", type=int, help="replicas per model (default 1)")
    ray.add_argument("--min-replicas", type=int, help="autoscale each model between --min-replicas ...")
    ray.add_argument("--max-replicas", type=int, help="... and --max-replicas, on ongoing requests per replica")
    ray.add_argument(
        "--target-ongoing-requests", type=float, help="autoscaling target per replica (default: its max batch size)"
    )
    ray.add_argument("--num-cpus", type=float, help="CPUs per replica (default 1)")
    ray.add_argument("--num-gpus", type=float, help="GPUs per replica (default: from the memory plan on a GPU, else 0)")
    p.set_defaults(handler=cmd_serve)


RAY_FLAGS = ("address", "replicas", "min_replicas", "max_replicas", "target_ongoing_requests", "num_cpus", "num_gpus")


def settings_from(pm: PluginManager, args: argparse.Namespace) -> tuple[ServerSettings, dict[str, Any]]:
    from inference_pio.server.state import ServedModel, ServerSettings

    section = pm.config_manager.section("server")
    names = [args.name] if args.name else list(section.get("models", []))
    if not names:
        raise ConfigError(
            "name a plugin to serve (inference-pio serve NAME) or list them in the config file: "
            '[server] models = ["qwen3_vl_2b"]'
        )
    models = []
    for name in names:
        config: dict[str, Any] = {}
        if args.max_batch_size:  # flag > [plugins.NAME] > [server] > 8
            config["max_batch_size"] = args.max_batch_size
        elif "max_batch_size" not in pm.config_manager.section("plugins", name):
            config["max_batch_size"] = int(section.get("max_batch_size", 8))
        for key, value in (
            ("model_path", args.model_path),
            ("device", args.device),
            ("max_queue", args.max_queue),
            ("max_context", args.max_context),
        ):
            if value is not None and (key != "model_path" or args.name):
                config[key] = value
        models.append(ServedModel(name, config))
    api_key = args.api_key or os.environ.get("INFERENCE_PIO_API_KEY") or section.get("api_key")
    hosts = frozenset(args.allow_image_host or section.get("allowed_image_hosts", []))
    settings = ServerSettings(
        models=models,
        api_key=api_key,
        allowed_image_hosts=hosts,
        max_body_bytes=int(section.get("max_body_bytes", 32 * 1024 * 1024)),
        max_n=int(section.get("max_n", 4)),
    )
    net = {
        "host": args.host or section.get("host", "127.0.0.1"),
        "port": args.port or int(section.get("port", 8000)),
        "grace": args.grace_seconds if args.grace_seconds is not None else float(section.get("grace_seconds", 30)),
    }
    return settings, net


def cmd_serve(pm: PluginManager, args: argparse.Namespace) -> int:
    given = [f"--{f.replace('_', '-')}" for f in RAY_FLAGS if getattr(args, f, None) is not None]
    if given and not args.ray:
        raise ConfigError(f"{', '.join(given)} configure Ray Serve: add --ray")
    if args.ray:
        return cmd_serve_ray(pm, args)
    try:
        import uvicorn

        from inference_pio.server.app import create_app
    except ImportError as exc:
        raise InferencePIOError(
            f"the server needs its extra dependencies ({exc.name} is missing): pip install 'inference-pio-core[serve]'"
        ) from exc

    settings, net = settings_from(pm, args)
    for model in settings.models:
        pm.get_plugin(model.name)  # fail fast on unknown or broken plugins, before binding the port
    app = create_app(settings, pm)
    log.warning("serving %s on http://%s:%s", ", ".join(m.name for m in settings.models), net["host"], net["port"])
    config = uvicorn.Config(
        app,
        host=net["host"],
        port=net["port"],
        log_level="info",
        timeout_graceful_shutdown=int(net["grace"]),
        h11_max_incomplete_event_size=1024 * 1024,
    )
    # uvicorn re-raises SIGTERM after its graceful shutdown; a no-op handler makes that a clean exit 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.Server(config).run()
    return 0


def cmd_serve_ray(pm: PluginManager, args: argparse.Namespace) -> int:
    """``serve --ray``: the same server as a Ray Serve application (see ``server.ray_serve``)."""
    try:
        from inference_pio.server import ray_serve
    except ImportError as exc:
        raise InferencePIOError(
            f"serving on Ray needs its extra dependencies ({exc.name} is missing): "
            "pip install 'inference-pio-core[serve,ray]'"
        ) from exc

    settings, net = settings_from(pm, args)
    for model in settings.models:
        pm.get_plugin(model.name)  # fail fast on unknown or broken plugins, before starting Ray
    flags = {f: getattr(args, f) for f in RAY_FLAGS}
    options = ray_serve.RayOptions.from_config(
        pm.config_manager.section("server", "ray"), flags, str(pm.config_manager.config_file)
    )
    directories = list(getattr(args, "plugins_dir", []))
    verbose = bool(getattr(args, "verbose", False))
    return ray_serve.serve_on_ray(pm, settings, net, options, directories, verbose=verbose)
