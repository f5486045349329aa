"""Load test: N concurrent streaming clients with random disconnects against a server on 127.0.0.1.

    python benchmarks/load_test.py --clients 8 --seconds 30                # starts its own server on tiny checkpoints
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --model qwen3_vl_2b --pid 1234

Reports requests/s, output tokens/s, time-to-first-token and inter-token latency percentiles (client side),
errors, and the server's resident memory before and after. Traffic goes to loopback only; it stops by itself.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url")
    ap.add_argument("--pid", type=int, help="server process id, for RSS (with --url)")
    ap.add_argument("--model", default="qwen3_vl_2b")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--disconnect", type=float, default=0.2, help="probability a client hangs up mid-stream")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    server = None
    if args.url is None:
        from inference_pio_glm_4_7_flash.testing import make_tiny_checkpoint as glm
        from inference_pio_qwen3_vl_2b.testing import make_tiny_checkpoint as qwen
        from tests.server_harness import ServerProcess

        tmp = Path(tempfile.mkdtemp(prefix="inference-pio-load-"))
        config = tmp / "config.toml"
        config.write_text(f"""[server]\nmodels = ["qwen3_vl_2b", "glm_4_7_flash"]\n
[plugins.qwen3_vl_2b]\nmodel_path = "{qwen(tmp / "qwen")}"\ndevice = "cpu"\nmax_batch_size = 8\nmax_context = 1024\n
[plugins.glm_4_7_flash]\nmodel_path = "{glm(tmp / "glm")}"\ndevice = "cpu"\nmax_batch_size = 8\nmax_context = 1024\n""")
        server = ServerProcess(config)
        server.wait_ready()
        args.url, args.pid = server.url, server.proc.pid
    rss_before = rss_mb(args.pid) if args.pid else float("nan")
    rng = random.Random(args.seed)
    lock = threading.Lock()
    stats = {"done": 0, "disconnected": 0, "errors": 0, "tokens": 0}
    first_errors: list[str] = []
    ttft: list[float] = []
    itl: list[float] = []
    deadline = time.monotonic() + args.seconds

    def client(i: int) -> None:
        local_rng = random.Random(rng.random())
        with httpx.Client(timeout=120) as http:
            while time.monotonic() < deadline:
                hang_up_after = local_rng.randint(1, 8) if local_rng.random() < args.disconnect else None
                body = {
                    "model": args.model,
                    "stream": True,
                    "max_tokens": args.max_tokens,
                    "temperature": 0.8,
                    "messages": [{"role": "user", "content": f"client {i} says {local_rng.random():.6f}"}],
                    "stream_options": {"include_usage": True},
                }
                start, last, chunks = time.perf_counter(), None, 0
                try:
                    with http.stream("POST", f"{args.url}/v1/chat/completions", json=body) as response:
                        if response.status_code != 200:
                            response.read()
                            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
                        for line in response.iter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            event = json.loads(line[6:])
                            if "error" in event:
                                raise RuntimeError(event["error"]["message"])
                            now = time.perf_counter()
                            if event.get("choices") and event["choices"][0]["delta"].get("content"):
                                chunks += 1
                                with lock:
                                    (ttft if last is None else itl).append(now - (start if last is None else last))
                                last = now
                            if event.get("usage"):
                                with lock:
                                    stats["tokens"] += event["usage"]["completion_tokens"]
                            if hang_up_after is not None and chunks >= hang_up_after:
                                with lock:
                                    stats["disconnected"] += 1
                                    stats["tokens"] += chunks
                                break
                        else:
                            with lock:
                                stats["done"] += 1
                except Exception as exc:
                    with lock:
                        stats["errors"] += 1
                        if len(first_errors) < 3:
                            first_errors.append(f"client {i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    time.sleep(1.0)
    rss_after = rss_mb(args.pid) if args.pid else float("nan")
    requests = stats["done"] + stats["disconnected"]
    print(f"{args.clients} clients, {elapsed:.1f} s, model {args.model} at {args.url}")
    print(
        f"  requests: {requests} ({stats['done']} complete, {stats['disconnected']} disconnected), "
        f"errors: {stats['errors']}, {requests / elapsed:.2f} req/s, {stats['tokens'] / elapsed:.1f} output tok/s"
    )
    print(
        f"  TTFT ms p50 {pct(ttft, 50):.1f} p90 {pct(ttft, 90):.1f} p99 {pct(ttft, 99):.1f}; "
        f"ITL ms p50 {pct(itl, 50):.1f} p90 {pct(itl, 90):.1f} p99 {pct(itl, 99):.1f} "
        f"(mean {statistics.fmean(itl) * 1e3 if itl else float('nan'):.1f})"
    )
    print(f"  server RSS: {rss_before:.0f} MB before, {rss_after:.0f} MB after")
    for line in first_errors:
        print(f"  error: {line}")
    if server is not None:
        metrics = httpx.get(f"{args.url}/metrics").text
        batch = [
            ln
            for ln in metrics.splitlines()
            if ln.startswith("inference_pio_decode_batch_size_sum")
            or ln.startswith("inference_pio_decode_batch_size_count")
        ]
        print("  " + "; ".join(batch))
        print(f"  server exit code after SIGTERM: {server.stop()}")


if __name__ == "__main__":
    main()
