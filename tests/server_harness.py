"""Start a real `inference-pio serve` subprocess on 127.0.0.1 for tests (and the load script)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    def __init__(
        self,
        config: Path,
        *,
        api_key: str | None = None,
        extra_args: tuple[str, ...] = (),
        log: Path | None = None,
        python: str = sys.executable,
        global_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        """``python``: the interpreter (another venv's); ``global_args`` go before ``serve`` (``--plugins-dir``)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environ = {k: v for k, v in (env or os.environ).items() if not k.startswith("INFERENCE_PIO_")}
        environ.update({"INFERENCE_PIO_CONFIG": str(config), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
        if api_key:
            environ["INFERENCE_PIO_API_KEY"] = api_key
        self.log = log or config.with_suffix(".log")
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen(
            [python, "-m", "inference_pio.cli", *global_args, "serve", "--port", str(self.port), *extra_args],
            env=environ,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log.read_text()[-4000:]}")

    def metric(self, name: str, labels: str = "") -> float:
        """Sum of a Prometheus sample's values (lines starting with ``name`` and containing ``labels``)."""
        total = 0.0
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith(name) and (not labels or labels in line) and not line.startswith("#"):
                head, _, value = line.rpartition(" ")
                if head.split("{")[0] == name:
                    total += float(value)
        return total

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return int(self.proc.returncode)


def write_config(path: Path, qwen: Path, glm: Path, *, max_queue: int = 4) -> Path:
    path.write_text(f"""
[server]
models = ["qwen3_vl_2b", "glm_4_7_flash"]
max_n = 2
max_body_bytes = 2000000

[plugins.qwen3_vl_2b]
model_path = "{qwen}"
device = "cpu"
max_batch_size = 4
max_queue = {max_queue}
max_context = 512
max_images = 2

[plugins.glm_4_7_flash]
model_path = "{glm}"
device = "cpu"
max_batch_size = 2
max_queue = 0
max_context = 512
""")
    return path
