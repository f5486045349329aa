"""Ray Serve path: requests/s and latency with 1 and 2 replicas, and its overhead against the plain server.

    python benchmarks/bench_ray.py                       # tiny qwen3_vl_2b checkpoint, CPU, 8 clients, 30 s each
    python benchmarks/bench_ray.py --clients 16 --seconds 60 --max-tokens 32

Starts, one after the other on the same config and load: the one-process server, ``serve --ray --replicas 1``
and ``serve --ray --replicas 2`` (each on a local Ray it stops). Closed loop: ``--clients`` clients each send
streaming chat requests back to back (``ignore_eos``, so every answer has ``--max-tokens`` tokens) for
``--seconds`` after a warm-up. Prints, per configuration: requests/s, tokens/s, p50/p99 request latency and
time to first token (client side), errors; then the Ray path's overhead at 1 replica. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] * 1e3


def load(url: str, model: str, clients: int, seconds: float, max_tokens: int, warmup: float) -> dict[str, Any]:
    """Closed-loop streaming load; only requests that start after the warm-up count."""
    lock = threading.Lock()
    latency: list[float] = []
    ttft: list[float] = []
    errors: list[str] = []
    tokens = [0]
    start = time.monotonic() + warmup
    deadline = start + seconds

    def client(i: int) -> None:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": f"client {i}: tell me something"}],
            "max_tokens": max_tokens,
            "stream": True,
            "ignore_eos": True,
            "temperature": 0,
            "stream_options": {"include_usage": True},
        }
        with httpx.Client(timeout=300) as http:
            while time.monotonic() < deadline:
                sent = time.monotonic()
                first, count, ok = None, 0, False
                try:
                    with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                        if response.status_code != 200:
                            raise RuntimeError(f"{response.status_code}: {response.read()[:200]!r}")
                        for line in response.iter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                ok = ok or line == "data: [DONE]"
                                continue
                            event = json.loads(line[6:])
                            if "error" in event:
                                raise RuntimeError(event["error"]["message"])
                            if event.get("usage"):
                                count = event["usage"]["completion_tokens"]
                            elif event["choices"] and event["choices"][0]["delta"].get("content"):
                                first = first or time.monotonic()
                except Exception as exc:
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                done = time.monotonic()
                if sent >= start and done <= deadline and ok:
                    with lock:
                        latency.append(done - sent)
                        ttft.append((first or done) - sent)
                        tokens[0] += count

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "requests": len(latency),
        "rps": len(latency) / seconds,
        "tokens_per_s": tokens[0] / seconds,
        "p50_ms": pct(latency, 50),
        "p99_ms": pct(latency, 99),
        "ttft_p50_ms": pct(ttft, 50),
        "ttft_p99_ms": pct(ttft, 99),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--warmup", type=float, default=5)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--num-cpus", type=float, help="CPUs per Ray replica (default 1: torch then runs one thread)")
    ap.add_argument("--only", choices=["plain", "ray1", "ray2"], action="append", help="run only these (repeatable)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    from inference_pio_qwen3_vl_2b.testing import make_tiny_checkpoint
    from tests.server_harness import ServerProcess

    tmp = Path(tempfile.mkdtemp(prefix="inference-pio-bench-ray-"))
    config = tmp / "config.toml"
    checkpoint = make_tiny_checkpoint(tmp / "q")
    config.write_text(
        f'[server]\nmodels = ["qwen3_vl_2b"]\n\n[plugins.qwen3_vl_2b]\nmodel_path = "{checkpoint}"\n'
        f'device = "cpu"\nmax_batch_size = {args.max_batch_size}\nmax_queue = 64\nmax_context = 512\n'
    )
    cpus = ("--num-cpus", str(args.num_cpus)) if args.num_cpus else ()
    runs = {"plain": (), "ray1": ("--ray", "--replicas", "1", *cpus), "ray2": ("--ray", "--replicas", "2", *cpus)}
    results: dict[str, dict[str, Any]] = {}
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    for name, extra in runs.items():
        if args.only and name not in args.only:
            continue
        env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ipb", dir="/tmp")
        server = ServerProcess(config, extra_args=extra, log=tmp / f"{name}.log", env=env)
        try:
            server.wait_ready(timeout=600)
            if name == "ray2":  # /health is 200 with one live replica: wait for both
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline:
                    live = httpx.get(f"{server.url}/health", timeout=10).json()["deployments"]["qwen3_vl_2b"]
                    if len(live["replicas"]) == 2:
                        break
                    time.sleep(0.5)
            results[name] = load(server.url, "qwen3_vl_2b", args.clients, args.seconds, args.max_tokens, args.warmup)
        finally:
            code = server.stop()
            shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
            if code != 0:
                print(f"{name}: server exited {code}; log {server.log}", file=sys.stderr)
        r = results[name]
        print(
            f"{name:>6}: {r['rps']:6.2f} req/s  {r['tokens_per_s']:7.1f} tok/s  p50 {r['p50_ms']:7.0f} ms  "
            f"p99 {r['p99_ms']:7.0f} ms  ttft p50 {r['ttft_p50_ms']:6.0f} ms  p99 {r['ttft_p99_ms']:6.0f} ms  "
            f"({r['requests']} requests, {r['errors']} errors{': ' + r['first_error'] if r['first_error'] else ''})",
            flush=True,
        )
    if "plain" in results and "ray1" in results:
        plain, ray1 = results["plain"], results["ray1"]
        print(
            f"Ray overhead at 1 replica: p50 {ray1['p50_ms'] - plain['p50_ms']:+.0f} ms "
            f"({ray1['p50_ms'] / plain['p50_ms'] - 1:+.0%}), throughput {ray1['rps'] / plain['rps'] - 1:+.0%}"
        )
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
