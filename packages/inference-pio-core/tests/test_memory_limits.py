"""Memory limits that CUDA survives (a cgroup v2 memory.max, else resident memory measured by the supervisor,
never RLIMIT_AS for a GPU worker), GPU access and its cap per trust level, all on a CPU-only machine."""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path

import pytest

from inference_pio import PluginManager
from inference_pio.errors import ConfigError, ResourceLimitExceeded
from inference_pio.security.gpu import cuda_indices
from inference_pio.security.policy import ResourceLimits, TrustLevel
from inference_pio.security.process import CGROUP_ENV, cgroup_parent, memory_accounting

ASKING = Path(__file__).parent / "fixtures" / "asking"
MiB = 2**20


def manager(tmp_path: Path, config: str) -> PluginManager:
    (tmp_path / "config.toml").write_text(config)
    pm = PluginManager(environ={"INFERENCE_PIO_CONFIG": str(tmp_path / "config.toml")})
    pm.load_plugins_from_directory(ASKING)
    return pm


def probe(pm: PluginManager, device: str, **config: object) -> dict[str, object]:
    pm.activate_plugin("gpu_probe", device=device, **config)
    return json.loads(pm.execute_plugin("gpu_probe", "?").text)  # type: ignore[no-any-return]


def test_a_gpu_workers_memory_limit_stops_a_hog_on_cpu_and_the_manager_keeps_serving(tmp_path: Path) -> None:
    """``memory_accounting = "cgroup"`` forces, on a CPU worker, the accounting a CUDA worker gets: the
    kernel's cgroup limit where one is delegated, else resident memory measured by the supervisor."""
    pm = manager(tmp_path, '[limits.low]\nmemory = "512MiB"\nmemory_accounting = "cgroup"\nwall_seconds = 120\n')
    try:
        expected = "cgroup" if cgroup_parent() is not None else "resident"
        limits = pm.trust_policy.limits_for(TrustLevel.LOW)
        assert memory_accounting("cpu", limits) == memory_accounting("cuda") == expected
        first = probe(pm, "cpu")
        assert first["rlimit_as"] == resource.RLIM_INFINITY  # no address-space cap for what CUDA would get
        with pytest.raises(ResourceLimitExceeded) as info:
            pm.execute_plugin("gpu_probe", "eat")
        assert info.value.limit == "memory" and info.value.value == 512 * MiB
        message = str(info.value)
        assert "exceeded its memory limit (512 MiB)" in message and "activate the plugin again" in message
        assert ("cgroup memory limit" if expected == "cgroup" else "MiB of resident memory") in message
        assert not pm.get_record("gpu_probe").active
        second = probe(pm, "cpu")  # the manager and the plugin both keep working: a fresh worker
        assert second["pid"] != first["pid"]
    finally:
        pm.shutdown()


def test_gpu_access_and_its_cap_follow_the_trust_level(tmp_path: Path) -> None:
    pm = manager(tmp_path, "")
    try:
        assert pm.get_record("gpu_probe").trust == TrustLevel.LOW  # a directory plugin
        with pytest.raises(ConfigError, match="which has no GPU.*inference-pio trust gpu_probe medium"):
            pm.activate_plugin("gpu_probe", device="cuda")
        low = probe(pm, "auto")  # auto means the CPU at a level without a GPU, which the worker cannot see
        assert (low["device"], low["visible"], low["torch_before_plugin"]) == ("cpu", "", False)
    finally:
        pm.shutdown()
    config = '[limits.medium]\nmemory = "3GiB"\nmemory_accounting = "address_space"\n'
    pm = manager(tmp_path, config + '[trust.plugins]\ngpu_probe = "medium"\n')
    try:
        medium = probe(pm, "cuda")  # this CPU-only torch has no CUDA: the worker claims nothing, the plugin decides
        assert (medium["device"], medium["gpu_memory_fraction"]) == ("cuda", 0.9)
        assert medium["torch_before_plugin"] is True  # the worker looked for the GPU before building the plugin
        assert medium["rlimit_as"] == resource.RLIM_INFINITY  # a GPU worker never gets an address-space cap,
        # not even where the level asks for one
        assert probe(pm, "auto")["rlimit_as"] == resource.RLIM_INFINITY
        cpu = probe(pm, "cpu", gpu_memory_fraction=1.0)
        assert cpu["rlimit_as"] == 3 * 2**30  # CPU workers keep the exact, immediate one
        assert cpu["gpu_memory_fraction"] == 0.9  # a worker may only lower its level's GPU cap
        assert cpu["torch_before_plugin"] is False  # CPU workers never import torch for it
        assert probe(pm, "cpu", gpu_memory_fraction=0.5)["gpu_memory_fraction"] == 0.5
    finally:
        pm.shutdown()


def test_cgroup_parent_is_used_only_where_memory_is_delegated_and_writable(tmp_path: Path) -> None:
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    own = root / "user.slice" / "app.slice" / "term.scope"
    own.mkdir(parents=True)
    proc.mkdir()
    (proc / "cgroup").write_text("0::/user.slice/app.slice/term.scope\n")
    (proc / "mountinfo").write_text(
        "25 1 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n30 25 0:26 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
    )

    def control(folder: Path, controllers: str) -> None:
        (folder / "cgroup.subtree_control").write_text(controllers + "\n")
        (folder / "cgroup.procs").write_text("")

    def found(environ: dict[str, str] | None = None) -> Path | None:
        return cgroup_parent(environ or {}, proc=proc, root=root)

    control(own, "")
    assert found() is None  # nothing delegates memory
    control(own.parent, "cpu pids")
    assert found() is None
    control(own.parent, "cpu memory pids")
    assert found() == own.parent  # a sibling of our own cgroup (a systemd user session's app.slice)
    (own.parent / "cgroup.procs").chmod(0o444)
    if os.geteuid() != 0:  # root writes anyway
        assert found() is None  # moving a process needs the common ancestor's cgroup.procs writable
    (own.parent / "cgroup.procs").chmod(0o644)
    control(own, "memory")
    assert found() == own
    assert found({CGROUP_ENV: "off"}) is None
    assert found({CGROUP_ENV: str(own.parent)}) == own.parent
    assert found({CGROUP_ENV: str(tmp_path / "missing")}) is None
    (proc / "mountinfo").write_text("25 1 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n")
    assert found() is None  # no cgroup v2 mounted


def test_a_cgroup_that_does_not_take_the_worker_falls_back_to_measuring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder that looks delegated but is no cgroup (the worker never shows up in it): the supervisor
    notices, and the limit is still held, by resident memory."""
    fake = tmp_path / "fake-cgroup"
    fake.mkdir()
    (fake / "cgroup.subtree_control").write_text("memory\n")
    (fake / "cgroup.procs").write_text("")
    monkeypatch.setenv(CGROUP_ENV, str(fake))
    assert memory_accounting("cuda") == "cgroup"
    assert memory_accounting("cpu", ResourceLimits(memory_accounting="resident")) == "resident"
    pm = manager(tmp_path, '[limits.low]\nmemory = "512MiB"\nmemory_accounting = "cgroup"\n')
    try:
        probe(pm, "cpu")
        tried = [p for p in fake.iterdir() if p.name.startswith("inference-pio-worker-")]
        assert len(tried) == 1 and (tried[0] / "memory.max").read_text() == str(512 * MiB)
        with pytest.raises(ResourceLimitExceeded, match="MiB of resident memory") as info:
            pm.execute_plugin("gpu_probe", "eat")
        assert info.value.limit == "memory"
    finally:
        pm.shutdown()


def test_the_worker_caps_every_gpu_its_device_setting_names() -> None:
    assert cuda_indices("cuda", 3) == cuda_indices("auto", 3) == [0, 1, 2]  # a split model uses them all
    assert cuda_indices("cuda:1", 3) == [1]
    assert cuda_indices("cuda:2, cuda:0,cuda:2", 3) == [2, 0]  # the first listed becomes current
    assert cuda_indices("cuda:5", 2) == [] and cuda_indices("cpu", 2) == []
