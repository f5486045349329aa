"""Process management for isolated plugins, manager side: start a worker under its supervisor, stop it,
and say how it ended. The RPC over its pipes lives in :mod:`inference_pio.security.isolated`.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Literal

from inference_pio.security.policy import ResourceLimits
from inference_pio.security.supervisor import PR_SET_DUMPABLE, prctl

PASS_ENV = (
    "PATH",
    "LANG",
    "LC_ALL",
    "TZ",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "OMP_NUM_THREADS",
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "CUDA_VISIBLE_DEVICES",
)
KEEP_DUMPABLE = "INFERENCE_PIO_KEEP_DUMPABLE"
ALLOCATION_FAILED = re.compile(r"MemoryError|bad_alloc|Cannot allocate memory|out of memory", re.IGNORECASE)
SUPERVISOR = str(Path(__file__).with_name("supervisor.py"))  # run as a script: stdlib only, starts fast
MemoryAccounting = Literal["address_space", "cgroup", "resident"]
CGROUP_ENV = "INFERENCE_PIO_CGROUP"  # a delegated cgroup v2 folder to put workers in, or "off"


def worker_environment(workdir: Path, hf_cache: Path, limits: ResourceLimits | None = None) -> dict[str, str]:
    """Only harmless variables pass; secrets (tokens, API keys, credentials) never reach the worker. A level
    without a GPU (``gpu_memory_fraction`` 0) gets none visible."""
    env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    if limits is not None and not limits.gpu_allowed:
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(
        {
            "HOME": str(workdir),
            "TMPDIR": str(workdir),
            "HF_HUB_CACHE": str(hf_cache),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def memory_accounting(device: str, limits: ResourceLimits | None = None) -> MemoryAccounting:
    """How a worker's memory limit is enforced. ``limits.memory_accounting`` forces a way; otherwise
    address space (``RLIMIT_AS``, exact, immediate) for CPU workers, and for anything that may initialise
    a GPU (CUDA reserves far more address space than any sensible limit) a cgroup v2 memory limit where
    the platform delegates one to us, else resident memory measured by the supervisor. A forced
    ``cgroup`` falls back to ``resident`` where none is available."""
    forced = None if limits is None else limits.memory_accounting
    if forced == "address_space" or (forced is None and device == "cpu"):
        return "address_space"
    if forced == "resident":
        return "resident"
    return "cgroup" if cgroup_parent() is not None else "resident"


def describe_memory_accounting(limits: ResourceLimits) -> str:
    """How this machine enforces ``limits.memory_bytes`` on a worker, per device (``inference-pio info``)."""
    parent = cgroup_parent()
    kernel = f"a cgroup v2 memory.max below {parent}" if parent else "resident memory measured by the supervisor"
    if limits.memory_accounting == "address_space":
        return f"address space (RLIMIT_AS) on cpu; on a GPU or auto still {kernel} (CUDA does not survive RLIMIT_AS)"
    if limits.memory_accounting == "resident":
        return "resident memory measured by the supervisor, on every device"
    if limits.memory_accounting == "cgroup":
        return f"{kernel}, on every device"
    return f"address space (RLIMIT_AS) on cpu; on a GPU or auto: {kernel}"


def _cgroup2_mount(mountinfo: str) -> tuple[Path, str] | None:
    """Where the cgroup v2 hierarchy is mounted, and which of its folders that mount shows as its root."""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if sep and right.split()[:1] == ["cgroup2"]:
            fields = left.split()
            return Path(fields[4]), fields[3]
    return None


def _usable_cgroup(folder: Path) -> bool:
    """A folder we may create a child cgroup in, with the memory controller enabled for its children, and
    whose ``cgroup.procs`` we may write (moving a process needs the common ancestor writable)."""
    try:
        controllers = (folder / "cgroup.subtree_control").read_text().split()
    except OSError:
        return False
    return "memory" in controllers and os.access(folder, os.W_OK) and os.access(folder / "cgroup.procs", os.W_OK)


def cgroup_parent(
    environ: dict[str, str] | None = None, proc: Path = Path("/proc/self"), root: Path | None = None
) -> Path | None:
    """The cgroup v2 folder that worker cgroups are created in, or ``None`` (then memory is measured).

    ``$INFERENCE_PIO_CGROUP`` names one (or ``off``); otherwise this process's own cgroup or its parent
    when either has the memory controller enabled for its children and is writable by us (the root
    cgroup as root; a systemd user session delegates ``user@UID.service/app.slice``). ``proc`` and
    ``root`` (the mount point) stand in for the real ones in tests."""
    env = os.environ if environ is None else environ
    chosen = env.get(CGROUP_ENV, "").strip()
    if chosen.lower() in ("off", "0", "no", "false"):
        return None
    if chosen:
        return Path(chosen) if _usable_cgroup(Path(chosen)) else None
    try:
        membership = (proc / "cgroup").read_text()
        mount = _cgroup2_mount((proc / "mountinfo").read_text())
    except OSError:
        return None
    own = next((line[3:] for line in membership.splitlines() if line.startswith("0::")), None)
    if own is None or mount is None:
        return None
    mount_point, mount_root = mount
    if root is not None:
        mount_point = root
    relative = os.path.relpath(own, mount_root) if own.startswith(mount_root) else None
    if relative is None or relative.startswith(".."):
        return None
    folder = (mount_point / relative).resolve() if relative != "." else mount_point
    for candidate in (folder, folder.parent):
        if candidate.is_relative_to(mount_point) and _usable_cgroup(candidate):
            return candidate
    return None


def make_non_dumpable() -> bool:
    """Make this process non-dumpable, so that a worker running as the same user cannot read its
    memory or environment through /proc (nor can debuggers attach). ``INFERENCE_PIO_KEEP_DUMPABLE=1``
    keeps it debuggable. Returns whether the process is now non-dumpable."""
    if os.environ.get(KEEP_DUMPABLE, "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    return prctl(PR_SET_DUMPABLE, 0)


class _Spawner:
    """Starts supervisors from one thread that lives as long as the process: Linux delivers the
    parent-death signal when the *thread* that forked a child ends, so forking from a short-lived
    thread (a server's loader thread, say) would kill the worker with it."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], Any], queue.Queue[tuple[bool, Any]]]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="inference-pio-spawner", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job, answer = self._jobs.get()
            try:
                answer.put((True, job()))
            except BaseException as exc:
                answer.put((False, exc))

    def call(self, job: Callable[[], Any]) -> Any:
        answer: queue.Queue[tuple[bool, Any]] = queue.Queue(1)
        self._jobs.put((job, answer))
        ok, value = answer.get()
        if not ok:
            raise value
        return value


_spawner: _Spawner | None = None
_spawner_lock = threading.Lock()


def _spawn(job: Callable[[], Any]) -> Any:
    global _spawner
    with _spawner_lock:
        if _spawner is None or not _spawner._thread.is_alive():
            _spawner = _Spawner()
    return _spawner.call(job)


class WorkerProcess:
    """One worker (``python -I -m inference_pio.security.worker``) under its supervisor, with a scrubbed
    environment, its own temporary folder and OS limits; ``to_worker``/``from_worker`` are its pipes."""

    def __init__(self, name: str, limits: ResourceLimits, *, memory: MemoryAccounting, hf_cache: Path) -> None:
        self.name = name
        self.limits = limits
        self.memory = memory
        self.hf_cache = hf_cache
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir: Path | None = None
        self.to_worker: IO[bytes] | None = None
        self.from_worker: IO[bytes] | None = None
        self._status: int | None = None
        self._log: IO[bytes] | None = None
        self._report: dict[str, Any] | None = None

    def start(self, spec: dict[str, Any]) -> None:
        make_non_dumpable()
        self.workdir = workdir = Path(tempfile.mkdtemp(prefix=f"inference-pio-{self.name}-"))
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        status_r, status_w = os.pipe()
        # kept open, so it is readable after the folder is gone; append mode, so reading it here never
        # moves where the supervisor and worker (which share the open file) write
        self._log = (self.workdir / "worker.log").open("a+b")
        worker = ["-I", "-m", "inference_pio.security.worker", "--in", str(to_r), "--out", str(from_w)]
        # the level's setting wins over the device's default, except that a worker that may use a GPU never
        # gets RLIMIT_AS, which CUDA does not survive
        forced = self.limits.memory_accounting
        if forced is not None and not (forced == "address_space" and self.memory != "address_space"):
            self.memory = memory_accounting("cpu", self.limits)
        parent = cgroup_parent() if self.memory == "cgroup" else None
        if parent is None and self.memory == "cgroup":
            self.memory = "resident"
        config = {
            "worker": [*worker, "--spec", json.dumps(spec)],
            "limits": self.limits.describe(),
            "memory": self.memory,
            "cgroup": None if parent is None else str(parent),
            "parent": os.getpid(),
            "workdir": str(self.workdir),
            "status_fd": status_w,
            "worker_fds": [to_r, from_w],
        }
        log = self._log
        try:
            self.proc = _spawn(
                lambda: subprocess.Popen(
                    [sys.executable, "-I", SUPERVISOR, json.dumps(config)],
                    pass_fds=(to_r, from_w, status_w),
                    cwd=workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=worker_environment(workdir, self.hf_cache, self.limits),
                    start_new_session=True,
                )
            )
        except BaseException:
            for fd in (to_w, from_r, status_r):
                os.close(fd)
            raise
        finally:
            for fd in (to_r, from_w, status_w):
                os.close(fd)
        self._status = status_r
        self.to_worker = os.fdopen(to_w, "wb", buffering=0)
        self.from_worker = os.fdopen(from_r, "rb", buffering=0)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float | None = 10) -> dict[str, Any]:
        """Wait for the supervisor to finish and return its report of how the worker ended."""
        if self._report is None:
            assert self.proc is not None
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill_group()
            self._report = self._read_report()
        return self._report

    def _read_report(self) -> dict[str, Any]:
        if self._status is None:
            return {}
        os.set_blocking(self._status, False)
        try:
            data = os.read(self._status, 1 << 16)
        except OSError:
            data = b""
        try:
            report = json.loads(data) if data else {}
        except ValueError:
            report = {}
        return report if isinstance(report, dict) else {}

    def _kill_group(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, grace: float = 10) -> None:
        """End the worker and everything it started (the supervisor does it), remove its folder."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        if self.proc is not None:
            self.wait(grace)
        for stream in (self.to_worker, self.from_worker):
            if stream is not None:
                stream.close()
        self.to_worker = self.from_worker = None
        if self._status is not None:
            os.close(self._status)
            self._status = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, size: int = 2000) -> str:
        if self._log is None:
            return ""
        try:
            self._log.flush()
            self._log.seek(0, os.SEEK_END)
            end = self._log.tell()
            self._log.seek(max(0, end - size))
            return self._log.read().decode(errors="replace")
        except (OSError, ValueError):
            return ""


def classify(report: dict[str, Any], limits: ResourceLimits, log_tail: str) -> tuple[str | None, str]:
    """Which limit ended the worker (``None`` for a crash) and what happened, from the supervisor's report."""
    if not report:
        return None, "ended without a report from its supervisor (the supervisor was killed or did not start)"
    number = report.get("signal")
    cpu = float(report.get("cpu_seconds") or 0)
    name = signal.Signals(number).name if number else ""
    if report.get("watchdog") == "memory" and report.get("cgroup"):
        peak = int(report.get("peak_bytes", 0)) / 2**20
        return "memory", (
            f"the kernel ended it at its cgroup memory limit (memory.max of {report['cgroup']}; peak {peak:.0f} MiB)"
        )
    if report.get("watchdog") == "memory":
        held = int(report.get("resident_bytes", 0)) / 2**20
        return "memory", f"its processes held {held:.0f} MiB of resident memory (measured, as for GPU workers)"
    if number == signal.SIGXCPU:
        return "cpu_seconds", f"was stopped by SIGXCPU after {cpu:.1f} s of CPU time over its whole life"
    if number == signal.SIGXFSZ:
        return "disk_write_bytes", "was stopped by SIGXFSZ when a file it wrote went over the limit"
    if number == signal.SIGKILL and limits.cpu_seconds is not None and cpu >= limits.cpu_seconds:
        return "cpu_seconds", f"ignored SIGXCPU and was killed at the hard CPU limit after {cpu:.1f} s of CPU time"
    if number and limits.memory_bytes is not None and ALLOCATION_FAILED.search(log_tail):
        return "memory", f"died of {name} after an allocation failed under its memory limit"
    if number == signal.SIGKILL:
        return None, "was killed by SIGKILL (another process, or the kernel's out-of-memory killer)"
    if number:
        return None, f"crashed with {name} ({signal.strsignal(number)})"
    return None, f"exited with code {report.get('code')}"
