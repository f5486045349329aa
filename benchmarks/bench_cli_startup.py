"""Cold time of `inference-pio plugins --json` (with whatever plugins are installed), median of N runs.

python benchmarks/bench_cli_startup.py --runs 20

Wall time is what a user waits; CPU time (user + system of the child) moves much less when other work shares the
machine, so compare that one between runs on a busy box. One untimed run first writes the bytecode caches, as any
earlier use would have.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    exe = shutil.which("inference-pio") or sys.exit("inference-pio is not on PATH")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([exe, "plugins", "--json"], capture_output=True, check=True, env=env)
    walls: list[float] = []
    cpus: list[float] = []
    for _ in range(args.runs):
        start = time.perf_counter()
        proc = subprocess.Popen([exe, "plugins", "--json"], stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own CPU time, which Popen.wait would not report
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stdout.close()
        walls.append(time.perf_counter() - start)
        cpus.append(usage.ru_utime + usage.ru_stime)
        if proc.returncode != 0:
            sys.exit(f"inference-pio plugins --json exited {proc.returncode}")
    names = [r["name"] for r in json.loads(out)]
    check = "import sys, inference_pio.cli as c; c.main(['plugins','--json']); print('torch' in sys.modules)"
    torch_loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True).stdout.split()[-1]
    print(f"inference-pio plugins --json on {platform.machine()} ({platform.python_version()}), plugins: {names}")
    print(
        f"  wall median {statistics.median(walls) * 1e3:.0f} ms, min {min(walls) * 1e3:.0f} ms, "
        f"max {max(walls) * 1e3:.0f} ms over {args.runs} runs; torch imported: {torch_loaded}"
    )
    print(f"  cpu (user+sys) median {statistics.median(cpus) * 1e3:.0f} ms, min {min(cpus) * 1e3:.0f} ms")
    print(f"  load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
