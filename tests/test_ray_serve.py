"""``inference-pio serve --ray``: a real local Ray started by the command, two replicas of a tiny checkpoint,
the official openai client; the single-process server on the same config is the reference."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from inference_pio.common.metadata import GB
from inference_pio.errors import ConfigError
from inference_pio.server.ray_serve import RayOptions, replica_resources
from inference_pio_qwen3_vl_2b.testing import make_tiny_checkpoint as make_qwen

from .openai_schema import Checked
from .server_harness import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
MODEL = "qwen3_vl_2b"
CHECKED = Checked()
PROMPTS = ["Hello, who are you?", "Tell me a story", "Count to ten", "What is Ray?", "Hi", "Name three colours"]


def write_config(path: Path, checkpoint: Path) -> Path:
    path.write_text(f"""
[server]
models = ["{MODEL}"]

[plugins.{MODEL}]
model_path = "{checkpoint}"
device = "cpu"
max_batch_size = 4
max_queue = 16
max_context = 512
""")
    return path


def ray_processes(mark: str) -> list[int]:
    """Live processes (zombies excluded) started under this test's marker: the CLI, Ray's daemons, workers."""
    found = []
    needle = f"IPIO_RAY_TEST_MARK={mark}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def client_for(server: ServerProcess, *, checked: bool = True) -> openai.OpenAI:
    """The official client; ``checked``: each answer is validated against OpenAI's OpenAPI document first (which
    reads a stream whole before the client sees it: tests that act mid-stream go without)."""
    hooks = {"response": [CHECKED]} if checked else {}
    http = openai.DefaultHttpxClient(event_hooks=hooks, timeout=120)
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, http_client=http)


def stream_chat(client: openai.OpenAI, prompt: str, **kwargs: Any) -> tuple[str, str | None]:
    text, finish = "", None
    for event in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], stream=True, **kwargs
    ):
        if event.choices:
            text += event.choices[0].delta.content or ""
            finish = event.choices[0].finish_reason or finish
    return text, finish


def answers(client: openai.OpenAI) -> list[tuple[str, str | None]]:
    """Every prompt greedy and sampled with a seed, six at a time."""
    jobs = [(p, {"max_tokens": 24, "temperature": 0}) for p in PROMPTS]
    jobs += [(p, {"max_tokens": 24, "temperature": 0.9, "seed": 7 + i}) for i, p in enumerate(PROMPTS)]
    with ThreadPoolExecutor(6) as pool:
        return list(pool.map(lambda job: stream_chat(client, job[0], **job[1]), jobs))


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ray")
    return write_config(root / "config.toml", make_qwen(root / "qwen"))


@pytest.fixture(scope="module")
def reference(config: Path) -> list[tuple[str, str | None]]:
    """The single-process server's answers (it stops before Ray starts: two cores)."""
    plain = ServerProcess(config, log=config.with_name("plain.log"))
    try:
        plain.wait_ready()
        return answers(client_for(plain))
    finally:
        assert plain.stop() == 0, plain.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def mark() -> str:
    return uuid.uuid4().hex


@pytest.fixture(scope="module")
def ray_server(config: Path, mark: str, reference: list[Any]) -> Iterator[ServerProcess]:
    env = dict(os.environ, IPIO_RAY_TEST_MARK=mark, RAY_USAGE_STATS_ENABLED="0")
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="ipr", dir="/tmp")  # short: Ray's socket paths have a limit
    proc = ServerProcess(config, extra_args=("--ray", "--replicas", "2"), log=config.with_name("ray.log"), env=env)
    try:
        proc.wait_ready(timeout=400)
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


def health(server: ServerProcess) -> dict[str, Any]:
    return httpx.get(f"{server.url}/health", timeout=10).json()  # type: ignore[no-any-return]


def replicas(server: ServerProcess) -> dict[str, int]:
    """Live replicas of the model: id -> pid."""
    return {r["replica"]: r["pid"] for r in health(server)["deployments"][MODEL]["replicas"]}


def per_replica(server: ServerProcess, name: str, labels: str = "") -> dict[str, float]:
    """A metric's value per ``replica`` label."""
    values: dict[str, float] = {}
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") and labels in line:
            replica = line.split('replica="', 1)[1].split('"', 1)[0]
            values[replica] = values.get(replica, 0.0) + float(line.rpartition(" ")[2])
    return values


def wait_for(what: str, check: Any, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# -- without Ray --------------------------------------------------------------------------------------------
def test_replica_resources_follow_the_memory_plan_unless_configured() -> None:
    from inference_pio import PluginManager

    metadata = PluginManager().get_plugin(MODEL).metadata
    weights = int(metadata.memory_requirements["bfloat16"])
    cpu, why = replica_resources(metadata, {"device": "cpu", "dtype": "bfloat16"}, {}, gpu_memory=None)
    assert cpu["num_cpus"] == 1 and "num_gpus" not in cpu
    assert cpu["memory"] > weights and "RAM" in why
    shared, _ = replica_resources(metadata, {"device": "cuda"}, {}, gpu_memory=80 * GB)
    assert 0 < shared["num_gpus"] < 1  # a 2B model in bf16 shares an 80 GB GPU
    split, why = replica_resources(metadata, {"device": "cuda"}, {}, gpu_memory=2 * GB)
    assert split["num_gpus"] == 3  # more than one GPU's worth: whole GPUs, split inside the replica
    unknown, why = replica_resources(metadata, {"device": "cuda"}, {}, gpu_memory=None)
    assert unknown["num_gpus"] == 1 and "gpu_memory" in why
    configured, _ = replica_resources(metadata, {"device": "cuda"}, {"num_gpus": 0.5, "num_cpus": 2}, gpu_memory=None)
    assert (configured["num_gpus"], configured["num_cpus"]) == (0.5, 2)


def test_ray_options_merge_flags_over_the_config_and_name_unknown_keys() -> None:
    section = {"replicas": 3, "num_cpus": 2, "gpu_memory": "24GiB", "models": {MODEL: {"max_replicas": 4}}}
    options = RayOptions.from_config(section, {"replicas": None, "num_cpus": 0.5}, "c.toml")
    assert (options.replicas, options.num_cpus, options.gpu_memory) == (3, 0.5, 24 * 2**30)
    assert options.for_model(MODEL)["max_replicas"] == 4
    with pytest.raises(ConfigError, match="'replica'.*\\[server.ray\\] in c.toml"):
        RayOptions.from_config({"replica": 2}, {}, "c.toml")
    with pytest.raises(ConfigError, match=r"server.ray.models.qwen3_vl_2b"):
        RayOptions.from_config({"models": {MODEL: {"num_gpu": 1}}}, {}, "c.toml")


def test_ray_flags_need_ray_and_listing_never_imports_ray(config: Path) -> None:
    env = dict(os.environ, INFERENCE_PIO_CONFIG=str(config))
    refused = subprocess.run(
        [sys.executable, "-m", "inference_pio.cli", "serve", "--replicas", "2"], env=env, capture_output=True, text=True
    )
    assert refused.returncode == 1 and "--replicas configure Ray Serve: add --ray" in refused.stderr
    code = (
        "import sys, inference_pio\n"
        "from inference_pio.cli import main\n"
        "assert main(['plugins']) == 0\n"
        "assert 'ray' not in sys.modules, 'listing plugins imported ray'\n"
    )
    listed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr


# -- on a local Ray -----------------------------------------------------------------------------------------
def test_two_replicas_stream_concurrently_and_answer_as_one_process(
    ray_server: ServerProcess, reference: list[tuple[str, str | None]], mark: str
) -> None:
    assert len(ray_processes(mark)) > 3  # the CLI, Ray's daemons, the replicas: what the last test must not find
    wait_for("two live replicas", lambda: len(replicas(ray_server)) == 2, timeout=300)  # /health is 200 with one
    body = health(ray_server)
    assert body["status"] == "ready" and body["models"] == [MODEL], body
    assert all("float32 on cpu" in r["memory_plan"] for r in body["deployments"][MODEL]["replicas"])
    client = client_for(ray_server)
    assert [m.id for m in client.models.list()] == [MODEL]
    checked = CHECKED.events
    assert answers(client) == reference  # greedy and seeded sampling, six streams at a time
    assert CHECKED.events > checked
    # Both replicas took requests: each one's own counter says so.
    for _ in range(5):
        served = wait_for(
            "the replicas' reports", lambda: per_replica(ray_server, "inference_pio_replica_requests_total")
        )
        if len(served) == 2 and all(served.values()):
            break
        answers(client)
    assert len(served) == 2 and all(v > 0 for v in served.values()), served
    assert set(per_replica(ray_server, "inference_pio_active_batch_size")) == set(replicas(ray_server))
    # The same errors as one process, from the same handlers.
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5000)


def test_a_client_that_leaves_frees_its_slot_in_the_replica(ray_server: ServerProcess) -> None:
    body = {"model": MODEL, "prompt": "go on", "max_tokens": 400, "ignore_eos": True, "stream": True}
    before = sum(per_replica(ray_server, "inference_pio_replica_requests_total", 'outcome="cancelled"').values())
    with httpx.stream("POST", f"{ray_server.url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert all(next(lines) is not None for _ in range(6))  # streaming, then the client hangs up
    wait_for(
        "the replica to count the cancelled stream",
        lambda: (
            sum(per_replica(ray_server, "inference_pio_replica_requests_total", 'outcome="cancelled"').values())
            > before
        ),
        timeout=60,
    )
    wait_for(
        "every decode slot free",
        lambda: not any(per_replica(ray_server, "inference_pio_active_batch_size").values()),
        timeout=30,
    )


def test_a_killed_replica_fails_only_its_own_streams_and_comes_back(ray_server: ServerProcess) -> None:
    client = client_for(ray_server, checked=False)
    before = replicas(ray_server)
    long = {"max_tokens": 400, "temperature": 0, "extra_body": {"ignore_eos": True}}
    started = threading.Semaphore(0)
    outcomes: list[Any] = []

    def long_stream(prompt: str) -> None:
        try:
            stream = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompt}], stream=True, **long
            )
            text, finish, signalled = "", None, False
            for event in stream:
                if event.choices and event.choices[0].delta.content and not signalled:
                    started.release()
                    signalled = True
                if event.choices:
                    text += event.choices[0].delta.content or ""
                    finish = event.choices[0].finish_reason or finish
            outcomes.append(finish)
        except openai.APIError as exc:
            outcomes.append(exc)
        finally:
            if not signalled:
                started.release()

    streams = [threading.Thread(target=long_stream, args=(p,)) for p in PROMPTS[:4]]
    for thread in streams:
        thread.start()
    for _ in streams:
        assert started.acquire(timeout=120)
    busy = wait_for(
        "a replica with streams in flight",
        lambda: [r for r, n in per_replica(ray_server, "inference_pio_active_batch_size").items() if n > 0],
    )
    victim = busy[0]
    # Requests sent while the replica dies and while it is replaced must all be answered.
    short: list[int] = []
    stop = threading.Event()

    def keep_asking() -> None:
        while not stop.is_set():
            response = httpx.post(
                f"{ray_server.url}/v1/completions",
                json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
                timeout=120,
            )
            short.append(response.status_code)

    asker = threading.Thread(target=keep_asking)
    asker.start()
    os.kill(before[victim], signal.SIGKILL)
    for thread in streams:
        thread.join(timeout=180)
    back = wait_for(
        "a new replica in place of the killed one",
        lambda: (now := replicas(ray_server)) and len(now) == 2 and victim not in now and now,
        timeout=240,
    )
    time.sleep(1)
    stop.set()
    asker.join(timeout=120)
    failed = [o for o in outcomes if isinstance(o, Exception)]
    assert failed, f"no stream was on the killed replica {victim}: {outcomes}"
    assert all("stopped while generating" in str(e) for e in failed), failed
    assert all(o == "length" for o in outcomes if not isinstance(o, Exception)), outcomes
    assert len(outcomes) == 4
    assert short and set(short) == {200}, short  # nothing that had not started was lost
    assert before[victim] not in back.values()
    _, finish = stream_chat(client, "after the restart", max_tokens=4)
    assert finish == "length"
    assert health(ray_server)["status"] == "ready"


def test_sigterm_drains_every_replica_and_leaves_no_ray_process(ray_server: ServerProcess, mark: str) -> None:
    client = client_for(ray_server, checked=False)
    result: list[Any] = []
    started = threading.Event()

    def drained_stream() -> None:
        try:
            stream = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "a long answer"}],
                stream=True,
                max_tokens=150,
                extra_body={"ignore_eos": True},
            )
            count = 0
            for event in stream:
                if event.choices and event.choices[0].delta.content:
                    count += 1
                    started.set()
                if event.choices and event.choices[0].finish_reason:
                    result.append(event.choices[0].finish_reason)
        except Exception as exc:
            result.append(exc)
        finally:
            started.set()

    thread = threading.Thread(target=drained_stream)
    thread.start()
    assert started.wait(60)
    ray_server.proc.send_signal(signal.SIGTERM)
    thread.join(120)
    assert result == ["length"]  # the request in flight finished
    assert ray_server.stop() == 0, ray_server.log.read_text()[-3000:]
    left = wait_for("Ray's processes to end", lambda: not ray_processes(mark) or None, timeout=60)
    assert left


def test_the_kuberay_example_builds_the_application_the_command_builds(tmp_path: Path) -> None:
    """docs/examples/kuberay/rayservice.yaml: its import path and config file give the command's deployments."""
    import importlib

    import yaml

    docs = list(yaml.safe_load_all((ROOT / "docs/examples/kuberay/rayservice.yaml").read_text()))
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    service = next(d for d in docs if d["kind"] == "RayService")
    (application,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    module, _, name = application["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), name)
    path = tmp_path / "config.toml"
    path.write_text(config_map["data"]["config.toml"])
    ingress = builder({"config": str(path)})._bound_deployment
    assert ingress.name == "ingress"
    targets = ingress.init_args[4]
    assert targets == {
        MODEL: f"{MODEL}: 1..4 replicas (autoscaled), each 1 CPU, 0.2 GPU (4.68 GB weights+headroom, GPUs of 26 GB)"
    }
