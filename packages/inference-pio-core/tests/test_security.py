"""Trust levels, OS-enforced limits in isolated workers, and path validation — with misbehaving plugins."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from inference_pio import PluginManager
from inference_pio.errors import PathNotAllowedError, ResourceLimitExceeded
from inference_pio.security.policy import TrustLevel

MISBEHAVING = Path(__file__).parent / "fixtures" / "misbehaving"


@pytest.fixture
def models(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    (root / "good").mkdir(parents=True)
    (root / "good" / "config.json").write_text("{}")
    return root


@pytest.fixture
def secure(tmp_path: Path, models: Path) -> PluginManager:
    config = tmp_path / "config.toml"
    config.write_text(f"""
[trust]
model_dirs = ["{models}"]

[limits.low]
memory = "1GiB"
cpu_seconds = 3
disk = "1MiB"
open_files = 64
wall_seconds = 20

[trust.plugins]
sleeper = "low"
""")
    pm = PluginManager(environ={"INFERENCE_PIO_CONFIG": str(config), "MY_SECRET_TOKEN": "hunter2"})
    pm.load_plugins_from_directory(MISBEHAVING)
    yield pm  # type: ignore[misc]
    pm.shutdown()


def still_serving(pm: PluginManager) -> None:
    pm.activate_plugin("well_behaved", device="cpu")
    assert pm.execute_plugin("well_behaved", "all good").text == "all good"


@pytest.mark.parametrize(
    ("plugin", "limit"),
    [
        ("memory_hog", "memory"),
        ("cpu_spinner", "cpu_seconds"),
        ("disk_filler", "disk_write_bytes"),
        ("file_hoarder", "open_files"),
    ],
)
def test_breaches_end_the_worker_with_a_clear_error(secure: PluginManager, plugin: str, limit: str) -> None:
    record = secure.get_record(plugin)
    assert (record.trust, record.isolated) == (TrustLevel.LOW, True)
    secure.activate_plugin(plugin, device="cpu")
    proxy = secure.get_plugin(plugin)
    with pytest.raises(ResourceLimitExceeded) as info:
        secure.execute_plugin(plugin, "go")
    assert info.value.limit == limit
    assert f"exceeded its {limit} limit" in str(info.value)
    assert not record.active
    assert not proxy.alive  # type: ignore[attr-defined]
    still_serving(secure)
    secure.activate_plugin(plugin, device="cpu")  # it can be activated again
    assert record.active


def test_a_hang_is_cut_at_the_wall_clock_limit(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[limits.low]\nwall_seconds = 5\n")
    pm = PluginManager(environ={"INFERENCE_PIO_CONFIG": str(config)})
    pm.load_plugins_from_directory(MISBEHAVING)
    pm.activate_plugin("sleeper", device="cpu")
    with pytest.raises(ResourceLimitExceeded, match="wall_seconds") as info:
        pm.execute_plugin("sleeper", "zzz")
    assert info.value.value == 5
    still_serving(pm)
    pm.shutdown()


def test_worker_gets_a_scrubbed_environment_and_its_own_directory(secure: PluginManager) -> None:
    secure.activate_plugin("env_dump", device="cpu")
    cwd, names = secure.execute_plugin("env_dump", "x").text.split("|")
    assert "MY_SECRET_TOKEN" not in names.split(",")
    assert "INFERENCE_PIO_CONFIG" not in names.split(",")
    assert set(names.split(",")) <= {
        "PATH",
        "LANG",
        "LC_ALL",
        "TZ",
        "HOME",
        "TMPDIR",
        "HF_HUB_CACHE",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONUNBUFFERED",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "OMP_NUM_THREADS",
        "OPENBLAS_CORETYPE",
        "OPENBLAS_L2_SIZE",
        "CUDA_VISIBLE_DEVICES",
        "LC_CTYPE",
        "OMP_WAIT_POLICY",  # set by the worker itself when it imports inference_pio
    }
    assert Path(cwd).name.startswith("inference-pio-env_dump-") and Path(cwd) != Path.cwd()


def test_bad_input_crosses_the_worker_boundary_as_the_same_error(secure: PluginManager) -> None:
    from inference_pio import InvalidRequestError

    secure.activate_plugin("well_behaved", device="cpu")
    with pytest.raises(InvalidRequestError, match="temperature") as info:
        secure.execute_plugin("well_behaved", "x", temperature=-3)
    assert info.value.param == "temperature"
    streamed = "".join(
        c.text
        for c in secure.get_plugin("well_behaved").stream_chat(  # type: ignore[attr-defined]
            [{"role": "user", "content": "streams too"}]
        )
    )
    assert streamed == "streams too"


def test_model_paths_must_stay_inside_allowed_roots(secure: PluginManager, models: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (models / "escape").symlink_to(outside)
    cases = {
        str(outside): "outside the roots allowed at trust level low",
        str(models / ".." / "outside"): "outside the roots",
        str(models / "escape"): "outside the roots",
        "/dev/null": "device file",
        "/etc": "outside the roots",
    }
    for path, message in cases.items():
        with pytest.raises(PathNotAllowedError, match=message) as info:
            secure.activate_plugin("well_behaved", device="cpu", model_path=path)
        assert str(models) in str(info.value) or "device" in message
    secure.activate_plugin("well_behaved", device="cpu", model_path=str(models / "good"))
    assert secure.get_record("well_behaved").active


def test_world_writable_and_pickle_checkpoints_are_refused(secure: PluginManager, models: Path) -> None:
    open_dir = models / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    with pytest.raises(PathNotAllowedError, match="world-writable"):
        secure.activate_plugin("well_behaved", device="cpu", model_path=str(open_dir))
    pickled = models / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04N.")
    with pytest.raises(PathNotAllowedError, match="pytorch_model.bin"):
        secure.activate_plugin("well_behaved", device="cpu", model_path=str(pickled))


def activate_in_thread(pm: PluginManager, model_path: Path, seconds: float = 20) -> BaseException | None:
    """Activate on a daemon thread so that a validation that blocks fails the test instead of hanging it."""
    import threading

    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            pm.activate_plugin("well_behaved", device="cpu", model_path=str(model_path))
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"activate_plugin blocked for {seconds} s on {model_path}"
    return outcome[0]


def test_symlinks_inside_a_checkpoint_are_judged_by_their_target(
    secure: PluginManager, models: Path, tmp_path: Path
) -> None:
    zero = models / "zero"
    zero.mkdir()
    (zero / "model.safetensors").symlink_to("/dev/zero")
    error = activate_in_thread(secure, zero)
    assert isinstance(error, PathNotAllowedError) and "/dev/zero, which is a device file" in str(error)
    fifo_dir = models / "fifo"
    fifo_dir.mkdir()
    os.mkfifo(tmp_path / "pipe")
    (fifo_dir / "config.json").symlink_to(models / "pipe-link")
    (models / "pipe-link").symlink_to(tmp_path / "pipe")
    error = activate_in_thread(secure, fifo_dir)
    assert isinstance(error, PathNotAllowedError) and "which is a FIFO" in str(error)
    leaves = models / "leaves"
    leaves.mkdir()
    (tmp_path / "elsewhere.safetensors").write_bytes(b"")
    (leaves / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    error = activate_in_thread(secure, leaves)
    assert isinstance(error, PathNotAllowedError) and "leaves the allowed roots" in str(error)


def test_hub_cache_layout_with_links_to_blobs_inside_the_root_is_accepted(secure: PluginManager, models: Path) -> None:
    repo = models / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc123").write_text("{}")
    snapshot = repo / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to("../../blobs/abc123")
    assert activate_in_thread(secure, snapshot) is None


@pytest.mark.parametrize("bad", ["fifo", "world_writable", "pickle", "world_writable_folder"])
def test_subfolders_of_a_checkpoint_are_checked_too(secure: PluginManager, models: Path, bad: str) -> None:
    checkpoint = models / f"nested-{bad}"
    sub = checkpoint / "sub" / "deeper"
    sub.mkdir(parents=True)
    (checkpoint / "config.json").write_text("{}")
    if bad == "fifo":
        os.mkfifo(sub / "weights.safetensors")
    elif bad == "world_writable":
        (sub / "weights.safetensors").write_bytes(b"")
        os.chmod(sub / "weights.safetensors", 0o666)
    elif bad == "pickle":
        (sub / "pytorch_model.bin").write_bytes(b"\x80\x04N.")
    else:
        os.chmod(sub, 0o777)
    error = activate_in_thread(secure, checkpoint)
    expected = {"fifo": "a FIFO", "world_writable": "world-writable", "pickle": "sub/deeper/pytorch_model.bin"}
    assert isinstance(error, PathNotAllowedError) and expected.get(bad, "world-writable") in str(error)


def test_read_checked_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    from inference_pio.security.paths import read_checked

    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link").symlink_to(tmp_path / "fifo")
    with pytest.raises(PathNotAllowedError, match="is a FIFO"):
        read_checked(tmp_path / "link")
    (tmp_path / "ok.json").write_text("{}")
    assert read_checked(tmp_path / "ok.json") == b"{}"


def test_plugin_directories_get_the_same_checks(tmp_path: Path) -> None:
    pm = PluginManager(environ={"INFERENCE_PIO_CONFIG": str(tmp_path / "none.toml")})
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(PathNotAllowedError, match="world-writable"):
        pm.load_plugins_from_directory(shared)
    os.chmod(shared, 0o755)
    (shared / "evil.py").write_text("X = 1\n")
    os.chmod(shared / "evil.py", 0o666)
    with pytest.raises(PathNotAllowedError, match="evil.py is world-writable"):
        pm.load_plugins_from_directory(shared)


def test_policy_defaults_and_configuration(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[trust]\nisolate_below = "medium"\n[trust.plugins]\nwell_behaved = "maximum"\n')
    pm = PluginManager(environ={"INFERENCE_PIO_CONFIG": str(config)})
    pm.load_plugins_from_directory(MISBEHAVING)
    rows = {r["name"]: r for r in (rec.as_row() for rec in pm.list_plugins())}
    assert (rows["well_behaved"]["trust"], rows["well_behaved"]["isolated"]) == ("maximum", False)
    assert (rows["memory_hog"]["trust"], rows["memory_hog"]["isolated"]) == ("low", True)
    assert rows["memory_hog"]["limits"]["cpu_seconds"] == 300
    assert rows["well_behaved"]["limits"] == {}
    assert (rows["env_dump"]["trust"], rows["env_dump"]["isolated"]) == ("low", True)  # asked for maximum
    assert (rows["qwen3_vl_2b"]["trust"], rows["qwen3_vl_2b"]["isolated"]) == ("high", False)  # asked for high
    bad = tmp_path / "bad.toml"
    bad.write_text('[trust]\ndirectory = "sorta"\n')
    from inference_pio import ConfigError

    with pytest.raises(ConfigError, match="low, medium, high or maximum"):
        _ = PluginManager(environ={"INFERENCE_PIO_CONFIG": str(bad)}).trust_policy


def test_trust_comes_from_config_then_the_distributions_request_capped_then_defaults(tmp_path: Path) -> None:
    from inference_pio.security.policy import TrustPolicy

    policy = TrustPolicy()
    dist = "distribution inference-pio-third"
    assert policy.level_for("third", dist, "inference-pio-third") == TrustLevel.MEDIUM  # asks nothing
    assert policy.level_for("third", dist, "inference-pio-third", TrustLevel.HIGH) == TrustLevel.HIGH
    assert policy.level_for("third", dist, "inference-pio-third", TrustLevel.MAXIMUM) == TrustLevel.HIGH  # capped
    assert policy.level_for("third", dist, "inference-pio-third", TrustLevel.LOW) == TrustLevel.LOW
    assert policy.level_for("local", "directory /x", None, TrustLevel.HIGH) == TrustLevel.LOW
    config = tmp_path / "c.toml"
    config.write_text('[trust]\nmax_requested = "medium"\n[trust.plugins]\nglm_4_7_flash = "high"\n')
    pm = PluginManager(environ={"INFERENCE_PIO_CONFIG": str(config)})
    qwen, glm = pm.get_record("qwen3_vl_2b"), pm.get_record("glm_4_7_flash")
    assert (qwen.trust, qwen.isolated) == (TrustLevel.MEDIUM, True)  # its request for high is capped
    assert (glm.trust, glm.isolated) == (TrustLevel.HIGH, False)  # configuration grants it
    config.write_text('[trust]\nfirst_party = "high"\n')
    from inference_pio import ConfigError

    with pytest.raises(ConfigError, match=r"\[trust\] first_party: unknown key; known: directory"):
        _ = PluginManager(environ={"INFERENCE_PIO_CONFIG": str(config)}).trust_policy


def test_a_bad_trust_request_makes_the_plugin_broken_not_the_manager(tmp_path: Path) -> None:
    (tmp_path / "asks.py").write_text(
        "from inference_pio import hookimpl\n"
        "@hookimpl\n"
        "def inference_pio_register_plugins(register):\n"
        "    register('asks', 'x:y', {}, trust='root')\n"
    )
    pm = PluginManager(environ={"INFERENCE_PIO_CONFIG": str(tmp_path / "none.toml")})
    pm.load_plugins_from_directory(tmp_path)
    record = pm.get_record("asks")
    assert record.status == "broken" and "trust level must be low, medium, high or maximum" in str(record.error)


def test_isolated_plugin_serves_concurrent_callers_and_streams_consumed_across_threads(
    secure: PluginManager,
) -> None:
    import threading

    secure.activate_plugin("well_behaved", device="cpu")
    plugin = secure.get_plugin("well_behaved")
    results: dict[int, str] = {}

    def call(i: int) -> None:
        if i % 2:
            results[i] = secure.execute_plugin("well_behaved", f"call {i}").text
        else:
            results[i] = "".join(c.text for c in plugin.stream_text(f"call {i}"))  # type: ignore[attr-defined]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {i: f"call {i}" for i in range(8)}
    stream = plugin.stream_text("handed over")  # type: ignore[attr-defined]
    first: list[str] = []
    worker = threading.Thread(target=lambda: first.append(next(stream).text))
    worker.start()
    worker.join(30)
    assert first == ["handed over"]
    stream.close()  # closed on another thread than the one that started it
    assert secure.execute_plugin("well_behaved", "after").text == "after"


def test_requests_in_flight_in_an_isolated_worker_are_bounded(secure: PluginManager) -> None:
    """Past ``max_requests`` calls and streams in flight, a request is refused at once; deactivating the plugin
    ends the ones in flight with a clear error."""
    import threading

    from inference_pio.errors import PluginNotActiveError, QueueFullError

    secure.activate_plugin("sleeper", device="cpu")
    plugin = secure.get_plugin("sleeper")
    plugin.max_requests = 1  # type: ignore[attr-defined]
    ended: list[BaseException] = []

    def hold() -> None:
        try:
            secure.execute_plugin("sleeper", "holds the worker")
        except BaseException as exc:
            ended.append(exc)

    holder = threading.Thread(target=hold)
    holder.start()
    assert wait_until(lambda: plugin.in_flight == 1)  # type: ignore[attr-defined]
    with pytest.raises(QueueFullError, match="already has 1 requests in flight"):
        plugin.tokenize("must wait")  # type: ignore[attr-defined]
    secure.deactivate_plugin("sleeper")
    holder.join(30)
    assert len(ended) == 1 and isinstance(ended[0], PluginNotActiveError), ended
    assert "was deactivated" in str(ended[0])


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie counts as gone: it runs no code)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_until(check: Callable[[], bool], seconds: float = 15) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


def test_a_worker_takes_every_process_it_started_with_it_even_detached_ones(secure: PluginManager) -> None:
    secure.activate_plugin("spawner", device="cpu")
    workdir = secure.get_plugin("spawner").workdir  # type: ignore[attr-defined]
    pids = [int(p) for p in secure.execute_plugin("spawner", "go").text.split(",")]
    assert not any(gone(pid) for pid in pids)
    secure.deactivate_plugin("spawner")
    assert wait_until(lambda: all(gone(pid) for pid in pids)), [p for p in pids if not gone(p)]
    assert not workdir.exists()


MANAGER_SCRIPT = """
import json, sys, time
from inference_pio import PluginManager
pm = PluginManager(environ={"INFERENCE_PIO_CONFIG": sys.argv[1]})
pm.load_plugins_from_directory(sys.argv[2])
pm.activate_plugin("spawner", device="cpu")
pids = [int(p) for p in pm.execute_plugin("spawner", "go").text.split(",")]
print(json.dumps({"pids": pids, "workdir": str(pm.get_plugin("spawner").workdir)}), flush=True)
if sys.argv[3] == "hang":
    time.sleep(600)
"""


@pytest.mark.parametrize("ending", ["killed", "exits"])
def test_when_the_manager_dies_its_workers_their_children_and_folders_go_too(tmp_path: Path, ending: str) -> None:
    """Killed with SIGKILL, or exiting without deactivate_plugin: nothing of the worker is left."""
    import json
    import signal
    import subprocess
    import sys

    script = tmp_path / "manager.py"
    script.write_text(MANAGER_SCRIPT)
    mode = "hang" if ending == "killed" else "exit"
    manager = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "none.toml"), str(MISBEHAVING), mode],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert manager.stdout is not None
    seen = json.loads(manager.stdout.readline())
    if ending == "killed":
        manager.send_signal(signal.SIGKILL)
    manager.wait(60)
    assert wait_until(lambda: all(gone(pid) for pid in seen["pids"])), [p for p in seen["pids"] if not gone(p)]
    assert wait_until(lambda: not Path(seen["workdir"]).exists())


@pytest.fixture
def strict_limits(tmp_path: Path) -> PluginManager:
    config = tmp_path / "strict.toml"
    config.write_text('[limits.low]\ncpu_seconds = 1\nwall_seconds = 180\nmemory = "512MiB"\n')
    pm = PluginManager(environ={"INFERENCE_PIO_CONFIG": str(config)})
    pm.load_plugins_from_directory(MISBEHAVING)
    yield pm  # type: ignore[misc]
    pm.shutdown()


def test_a_plugin_that_ignores_sigxcpu_is_reported_at_its_cpu_limit(strict_limits: PluginManager) -> None:
    strict_limits.activate_plugin("cpu_ignorer", device="cpu")
    with pytest.raises(ResourceLimitExceeded) as info:
        strict_limits.execute_plugin("cpu_ignorer", "spin")
    assert info.value.limit == "cpu_seconds" and "killed at the hard CPU limit" in str(info.value)


def test_a_segfault_is_a_crash_not_a_limit_breach(strict_limits: PluginManager) -> None:
    from inference_pio import PluginLoadError

    strict_limits.activate_plugin("segfaulter", device="cpu")
    with pytest.raises(PluginLoadError, match="crashed with SIGSEGV") as info:
        strict_limits.execute_plugin("segfaulter", "boom")
    assert not isinstance(info.value, ResourceLimitExceeded)
    assert not strict_limits.get_record("segfaulter").active


def test_gpu_workers_are_held_to_resident_memory_not_an_address_space_cap(tmp_path: Path) -> None:
    """CUDA reserves more address space than any sensible limit, so a worker that may use a GPU gets its
    memory measured as resident memory by the supervisor instead of RLIMIT_AS."""
    import resource

    config = tmp_path / "memory.toml"
    config.write_text('[limits.low]\nmemory = "512MiB"\nwall_seconds = 180\ngpu_memory_fraction = 0.5\n')
    strict_limits = PluginManager(environ={"INFERENCE_PIO_CONFIG": str(config)})
    strict_limits.load_plugins_from_directory(MISBEHAVING)

    strict_limits.activate_plugin("limits_probe", device="cpu")
    assert strict_limits.execute_plugin("limits_probe", "?").text == str(512 * 2**20)
    strict_limits.activate_plugin("limits_probe", device="cuda")
    assert strict_limits.execute_plugin("limits_probe", "?").text == str(resource.RLIM_INFINITY)
    strict_limits.activate_plugin("toucher", device="cuda")
    with pytest.raises(ResourceLimitExceeded, match="resident memory") as info:
        strict_limits.execute_plugin("toucher", "eat")
    assert info.value.limit == "memory" and info.value.value == 512 * 2**20
    strict_limits.shutdown()


def test_activating_an_isolated_plugin_keeps_the_managers_proc_files_from_its_worker(
    secure: PluginManager,
) -> None:
    """The manager becomes non-dumpable: a worker running as the same (non-root) user can no longer read
    /proc/<manager>/environ or mem. INFERENCE_PIO_KEEP_DUMPABLE=1 keeps it debuggable."""
    import ctypes
    import subprocess
    import sys

    secure.activate_plugin("proc_reader", device="cpu")
    pr_get_dumpable = 3
    assert ctypes.CDLL(None).prctl(pr_get_dumpable, 0, 0, 0, 0) == 0
    if os.geteuid() != 0:  # root reads every /proc file whatever the flag says
        assert secure.execute_plugin("proc_reader", "x").text == "PermissionError"
    probe = (
        "import ctypes; from inference_pio.security.process import make_non_dumpable; "
        "make_non_dumpable(); print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))"
    )
    kept = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, "INFERENCE_PIO_KEEP_DUMPABLE": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert kept.stdout.strip() == "1"


def test_security_names_are_public_from_inference_pio_which_stays_light() -> None:
    import subprocess
    import sys

    probe = (
        "import sys, inference_pio\n"
        "from inference_pio.errors import PathNotAllowedError, ResourceLimitExceeded\n"
        "from inference_pio.security.policy import ResourceLimits, TrustLevel\n"
        "assert inference_pio.TrustLevel is TrustLevel and inference_pio.ResourceLimits is ResourceLimits\n"
        "assert inference_pio.ResourceLimitExceeded is ResourceLimitExceeded\n"
        "assert inference_pio.PathNotAllowedError is PathNotAllowedError\n"
        "names = {'TrustLevel', 'ResourceLimits', 'ResourceLimitExceeded', 'PathNotAllowedError'}\n"
        "assert names <= set(inference_pio.__all__)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'inference_pio.security.isolated') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)


def test_plugins_json_fields_are_the_ones_docs_security_md_lists(tmp_path: Path) -> None:
    import re

    docs = (Path(__file__).resolve().parents[3] / "docs" / "security.md").read_text()
    section = docs.split("## `inference-pio plugins --json`", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE)
    pm = PluginManager(environ={"INFERENCE_PIO_CONFIG": str(tmp_path / "none.toml")})
    pm.load_plugins_from_directory(MISBEHAVING)
    pm.load_plugins_from_directory(Path(__file__).parent / "fixtures" / "broken_plugins")
    rows = [record.as_row() for record in pm.list_plugins()]
    assert any(row["status"] == "broken" for row in rows)
    for row in rows:
        assert list(row) == documented, row["name"]


def test_a_worker_activated_from_a_short_lived_thread_outlives_that_thread(secure: PluginManager) -> None:
    """Linux sends the parent-death signal when the forking *thread* ends; workers are forked from one
    long-lived thread, so activating from a thread that then exits (a server's loader) keeps them."""
    import threading

    loader = threading.Thread(target=lambda: secure.activate_plugin("well_behaved", device="cpu"))
    loader.start()
    loader.join(60)
    time.sleep(1)  # time for a parent-death signal to arrive, were it armed for the loader thread
    assert secure.execute_plugin("well_behaved", "still here").text == "still here"
