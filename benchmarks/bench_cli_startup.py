"""Cold wall time of `inference-pio plugins --json` (with whatever plugins are installed), median of N runs.

python benchmarks/bench_cli_startup.py --runs 10
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    exe = shutil.which("inference-pio") or sys.exit("inference-pio is not on PATH")
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        proc = subprocess.run([exe, "plugins", "--json"], capture_output=True, text=True, check=True)
        times.append(time.perf_counter() - start)
    names = [r["name"] for r in json.loads(proc.stdout)]
    check = "import sys, inference_pio.cli as c; c.main(['plugins','--json']); print('torch' in sys.modules)"
    torch_loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True).stdout.split()[-1]
    print(f"inference-pio plugins --json on {platform.machine()} ({platform.python_version()}), plugins: {names}")
    print(
        f"  median {statistics.median(times) * 1e3:.0f} ms, min {min(times) * 1e3:.0f} ms, "
        f"max {max(times) * 1e3:.0f} ms over {args.runs} runs; torch imported: {torch_loaded}"
    )


if __name__ == "__main__":
    main()
