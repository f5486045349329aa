"""The supervisor: a small process between the manager and an isolated worker, running no plugin code.

Started by :class:`inference_pio.security.process.WorkerProcess` as ``python -I .../supervisor.py
CONFIG`` (a script, so that it imports only the standard library and starts fast). It

- dies with the manager: ``PR_SET_PDEATHSIG`` sends it SIGTERM when the manager exits or is killed;
- is a child subreaper (``PR_SET_CHILD_SUBREAPER``), so every process the worker starts, even one that
  detaches with ``setsid`` and a double fork, stays its descendant and is killed when the worker ends,
  when the manager stops it, or when the manager dies;
- forks the worker, applies the rlimits to it before ``exec`` and gives it a parent-death signal too;
- puts the worker in a cgroup of its own with ``memory.max`` when the memory limit is "cgroup" (GPU workers
  where a delegated cgroup v2 is available: the kernel enforces it), checking that the worker really
  landed there and falling back to "resident" if not;
- measures resident memory of the whole worker tree when the memory limit is "resident" (GPU workers
  without a usable cgroup, where an address-space limit would break CUDA), and kills the tree when it
  goes over;
- removes the worker's folder, then reports how the worker ended (exit code or signal, CPU seconds,
  peak memory) as one JSON line on the status pipe.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import select
import shutil
import signal
import sys
import time
from typing import Any

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36

RLIMITS = {
    "memory_bytes": resource.RLIMIT_AS,
    "disk_write_bytes": resource.RLIMIT_FSIZE,
    "open_files": resource.RLIMIT_NOFILE,
}
CPU_GRACE_SECONDS = 5  # between SIGXCPU (soft limit) and SIGKILL (hard limit)


def prctl(option: int, value: int) -> bool:
    """Call Linux ``prctl(option, value)``; False where it is not available or fails."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(ctypes.c_int(option), ctypes.c_ulong(value), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (from /proc; zombies included)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:  # no /proc (not Linux): nothing found, nothing killed beyond the worker
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, pending = [], [root]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def resident_bytes(pids: list[int]) -> int:
    """Resident memory of ``pids`` together (RSS; shared pages counted once per process)."""
    page, total = os.sysconf("SC_PAGE_SIZE"), 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as fh:
                total += int(fh.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
    return total


class Stop(Exception):
    """SIGTERM: the manager asked the supervisor to end the worker, or the manager died."""


def _stop(signum: int, frame: Any) -> None:
    raise Stop


def _write(path: str, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return ""


def cgroup_of(pid: int) -> str | None:
    """The cgroup v2 path of ``pid`` (as /proc shows it), or None."""
    for line in _read(f"/proc/{pid}/cgroup").splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


class Supervisor:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.limits: dict[str, Any] = config["limits"]
        self.worker = 0
        self.status: int | None = None
        self.usage: Any = None
        self.cgroup: str | None = None  # the worker's own cgroup folder, when the kernel enforces memory
        self.notes: dict[str, Any] = {}  # for the report: why a cgroup was not used

    def make_cgroup(self) -> str | None:
        """A new cgroup below the configured parent holding the memory limit; None (and a note) on failure."""
        parent, limit = self.config.get("cgroup"), self.limits.get("memory_bytes")
        if self.config["memory"] != "cgroup" or not parent or limit is None:
            return None
        folder = os.path.join(parent, f"inference-pio-worker-{os.getpid()}")
        try:
            os.mkdir(folder)
            _write(os.path.join(folder, "memory.max"), str(int(limit)))
        except OSError as exc:
            self.notes["cgroup_error"] = f"{folder}: {exc}"
            with contextlib.suppress(OSError):
                os.rmdir(folder)
            return None
        for name, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):  # not on every kernel
            with contextlib.suppress(OSError):
                _write(os.path.join(folder, name), value)
        return folder

    def enter_cgroup(self, pid: int, folder: str) -> bool:
        """Move ``pid`` into ``folder`` and check that /proc agrees it is there."""
        try:
            _write(os.path.join(folder, "cgroup.procs"), str(pid))
        except OSError as exc:
            self.notes["cgroup_error"] = f"moving the worker into {folder}: {exc}"
            return False
        where = cgroup_of(pid) or ""
        if not where.endswith("/" + os.path.basename(folder)):
            self.notes["cgroup_error"] = f"the worker is in cgroup {where!r}, not {folder} (not a cgroup v2 folder?)"
            return False
        return True

    def remove_cgroup(self) -> None:
        if self.cgroup is None:
            return
        for _ in range(100):  # the kernel lets go of the folder a moment after its last process is reaped
            try:
                os.rmdir(self.cgroup)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.01)

    def memory_breach(self) -> dict[str, Any]:
        """The report's part about a kernel out-of-memory kill in the worker's cgroup, if there was one."""
        if self.cgroup is None:
            return {}
        events = {}
        for line in _read(os.path.join(self.cgroup, "memory.events")).splitlines():
            key, _, value = line.partition(" ")
            events[key] = int(value) if value.strip().isdigit() else 0
        if events.get("oom_kill", 0) == 0 and events.get("oom_group_kill", 0) == 0:
            return {}
        peak = _read(os.path.join(self.cgroup, "memory.peak")).strip() or "0"
        return {"watchdog": "memory", "cgroup": self.cgroup, "peak_bytes": int(peak) if peak.isdigit() else 0}

    def start_worker(self) -> None:
        me = os.getpid()
        folder = self.make_cgroup()
        ready_r, ready_w = os.pipe() if folder else (-1, -1)
        pid = os.fork()
        if pid == 0:  # the worker: limits and parent-death signal, then exec
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                if os.getppid() != me:  # the supervisor died before the signal was armed
                    os._exit(1)
                if folder:  # wait until the supervisor has moved us into the cgroup (or given up)
                    os.close(ready_w)
                    if os.read(ready_r, 1) != b"1":
                        os._exit(1)
                    os.close(ready_r)
                for key, which in RLIMITS.items():
                    value = self.limits.get(key)
                    if value is not None and not (key == "memory_bytes" and self.config["memory"] != "address_space"):
                        resource.setrlimit(which, (int(value), int(value)))
                if self.limits.get("cpu_seconds") is not None:
                    cpu = int(self.limits["cpu_seconds"])
                    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + CPU_GRACE_SECONDS))
                os.execv(sys.executable, [sys.executable, *self.config["worker"]])
            finally:
                os._exit(127)
        self.worker = pid
        if folder:
            os.close(ready_r)
            if self.enter_cgroup(pid, folder):
                self.cgroup = folder
            else:  # the kernel will not enforce it: measure resident memory instead
                self.config["memory"] = "resident"
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
            os.write(ready_w, b"1")
            os.close(ready_w)

    def reap(self) -> None:
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.worker:
                self.status, self.usage = status, usage

    def kill_all(self) -> None:
        """SIGKILL every descendant until none is left (orphans keep arriving: we are their subreaper)."""
        me = os.getpid()
        for _ in range(200):
            pids = descendants(me)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)
            self.reap()
        self.reap()

    def run(self) -> dict[str, Any]:
        memory = self.limits.get("memory_bytes") if self.config["memory"] == "resident" else None
        report: dict[str, Any] = {}
        try:
            pidfd = os.pidfd_open(self.worker)
        except (AttributeError, OSError):
            pidfd = None
        try:
            while self.status is None:
                if pidfd is not None:
                    select.select([pidfd], [], [], 0.2 if memory else 1.0)
                else:
                    time.sleep(0.1)
                self.reap()
                if self.status is None and memory is not None:
                    held = resident_bytes(descendants(os.getpid()))
                    if held > memory:
                        report.update(watchdog="memory", resident_bytes=held)
                        break
        except Stop:
            report["stopped"] = True
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # cleaning up already; a second request changes nothing
            self.kill_all()
            report.update(self.memory_breach())
            self.remove_cgroup()
            shutil.rmtree(self.config["workdir"], ignore_errors=True)
            if pidfd is not None:
                os.close(pidfd)
        if self.status is not None:
            if os.WIFSIGNALED(self.status):
                report["signal"] = os.WTERMSIG(self.status)
            else:
                report["code"] = os.WEXITSTATUS(self.status)
            report["cpu_seconds"] = self.usage.ru_utime + self.usage.ru_stime
            report["max_rss_bytes"] = self.usage.ru_maxrss * 1024
        report["memory"] = self.config["memory"]
        report.update(self.notes)
        return report


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _stop)
    config = json.loads(argv[0])
    status_fd = int(config["status_fd"])
    os.set_inheritable(status_fd, False)
    supervisor = Supervisor(config)
    report: dict[str, Any] = {}
    try:
        prctl(PR_SET_CHILD_SUBREAPER, 1)
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != int(config["parent"]):  # the manager died before the signal was armed
            raise Stop
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        supervisor.start_worker()
        for fd in config["worker_fds"]:  # only the worker holds its pipe ends: the manager sees EOF when it dies
            os.close(fd)
        report = supervisor.run()
    except Stop:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        supervisor.kill_all()
        supervisor.remove_cgroup()
        shutil.rmtree(config["workdir"], ignore_errors=True)
        report = {"stopped": True}
    with contextlib.suppress(OSError):
        os.write(status_fd, json.dumps(report).encode() + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
