"""An isolated transformers-backed plugin (a tiny random Llama loaded from a directory, at the medium trust a
pip-installed third-party plugin gets) serves many requests at once: its worker runs the plugin's own
scheduler, so concurrent streams share decode steps, as in process. Real worker subprocesses throughout."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from inference_pio import InvalidRequestError, MemoryPlan, PluginManager
from inference_pio.errors import PluginLoadError, QueueFullError

HF_PLUGINS = Path(__file__).parent / "fixtures" / "hf_plugins"
sys.path.insert(0, str(HF_PLUGINS))
from fixture_hf import make_checkpoint  # noqa: E402

SLOTS = 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def manager(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PluginManager]:
    config = tmp_path_factory.mktemp("cfg") / "config.toml"
    config.write_text(f'[trust]\ndirectory = "medium"\nmodel_dirs = ["{checkpoint.parent}"]\n')
    pm = PluginManager(environ={"INFERENCE_PIO_CONFIG": str(config), "HF_HUB_OFFLINE": "1"})
    pm.load_plugins_from_directory(HF_PLUGINS)
    yield pm
    pm.shutdown()


@pytest.fixture
def plugin(manager: PluginManager, checkpoint: Path) -> Any:
    """The plugin, active in its worker with 4 decode slots and no waiting queue (activated again if a test
    ended its worker)."""
    record = manager.get_record("fixture_hf")
    assert (str(record.trust), record.isolated) == ("medium", True)
    if not record.active:
        manager.activate_plugin(
            "fixture_hf", device="cpu", model_path=str(checkpoint), max_batch_size=SLOTS, max_queue=0, max_context=512
        )
    return manager.get_plugin("fixture_hf")


def chat(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Hello {i}, how are you today?"}]


def text_of(plugin: Any, i: int, n: int) -> str:
    return "".join(c.text for c in plugin.stream_chat(chat(i), max_new_tokens=n, ignore_eos=True))


def wait_until(check: Any, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return bool(check())


def test_concurrent_streams_share_decode_steps_in_the_worker(plugin: Any) -> None:
    alone = [text_of(plugin, i, 40) for i in range(SLOTS)]
    sizes: list[int] = []
    plugin.scheduler.on_step = sizes.append
    first: dict[int, float] = {}
    ended: dict[int, float] = {}
    texts: dict[int, str] = {}
    go = threading.Barrier(SLOTS)

    def run(i: int) -> None:
        go.wait()
        parts = []
        for chunk in plugin.stream_chat(chat(i), max_new_tokens=40, ignore_eos=True):
            first.setdefault(i, time.monotonic())
            parts.append(chunk.text)
        ended[i] = time.monotonic()
        texts[i] = "".join(parts)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(SLOTS)]
    for t in threads:
        t.start()
    active = 0
    while any(t.is_alive() for t in threads):
        active = max(active, plugin.scheduler.stats()["active"])
        time.sleep(0.01)
    assert len(ended) == SLOTS, "a stream failed"
    assert max(first.values()) < min(ended.values())  # every stream started before any finished
    assert [texts[i] for i in range(SLOTS)] == alone  # batching never changes a request's tokens
    assert active > 1
    # every decode step the worker ran is reported with its batch size (the first tokens come from prefill)
    assert wait_until(lambda: sum(sizes) >= 39 * SLOTS), sizes
    assert max(sizes) > 1
    assert plugin.in_flight == 0


def test_closing_one_stream_cancels_it_in_the_worker_and_the_others_go_on(plugin: Any) -> None:
    alone = [text_of(plugin, i, 60) for i in range(3)]
    streams = [plugin.stream_chat(chat(i), max_new_tokens=60, ignore_eos=True) for i in range(3)]
    assert alone[0].startswith(next(streams[0]).text)
    streams[0].close()  # the client went away
    assert list(streams[0]) == []
    assert ["".join(c.text for c in s) for s in streams[1:]] == alone[1:]
    assert wait_until(lambda: plugin.scheduler.stats()["active"] == 0)
    assert wait_until(lambda: plugin.in_flight == 0)  # the worker ended the cancelled stream too
    assert text_of(plugin, 0, 60) == alone[0]


def test_a_full_worker_refuses_at_once_with_the_plugins_own_queue_full_error(plugin: Any) -> None:
    holders = [plugin.stream_chat(chat(i), max_new_tokens=400, ignore_eos=True) for i in range(SLOTS)]
    for stream in holders:
        next(stream)  # each holds a decode slot
    with pytest.raises(QueueFullError, match=f"all {SLOTS} decode slots are busy") as info:
        plugin.stream_chat(chat(9), max_new_tokens=4)
    assert info.value.retry_after == 1.0
    for stream in holders:
        stream.close()
    assert wait_until(lambda: plugin.scheduler.stats()["active"] == 0)
    assert text_of(plugin, 9, 4)


def test_memory_plan_options_and_runtime_stats_cross_from_the_worker(plugin: Any, checkpoint: Path) -> None:
    plan = plugin.memory_plan
    assert isinstance(plan, MemoryPlan) and plan.device == "cpu" and plan.dtype == "float32"
    assert "float32 on cpu" in plan.describe()
    assert list(plugin.Options.model_fields) == ["style"]
    assert plugin.Options.parse({"style": "terse"}).style == "terse"
    with pytest.raises(InvalidRequestError, match="unknown option 'thinking'") as info:
        plugin.Options.parse({"thinking": True})
    assert info.value.param == "thinking"
    with pytest.raises(InvalidRequestError) as info:
        plugin.Options.parse({"style": "loud"})
    assert info.value.param == "style"
    stats = plugin.scheduler.stats()
    assert (stats["slots"], stats["queued"], stats["compiled"]) == (SLOTS, 0, False)
    chunks = list(plugin.stream_chat(chat(1), max_new_tokens=4, ignore_eos=True, logprobs=2))
    entries = [e for c in chunks for e in c.logprobs]  # logprobs cross the pipe with their chunks
    assert len(entries) == 4 and all(len(e.top) == 2 and e.logprob <= 0 for e in entries)
    assert [e.token_id for e in entries] == list(chunks[-1].token_ids)
    terse = "".join(c.text for c in plugin.stream_chat(chat(1), max_new_tokens=8, ignore_eos=True, style="terse"))
    assert terse != text_of(plugin, 1, 8)  # the option reached the worker's chat template


def worker_pid(plugin: Any) -> int:
    supervisor = plugin.process.proc.pid
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def test_when_the_worker_dies_every_open_stream_ends_with_the_crash(plugin: Any, manager: PluginManager) -> None:
    streams = [plugin.stream_chat(chat(i), max_new_tokens=400, ignore_eos=True) for i in range(3)]
    for stream in streams:
        next(stream)
    os.kill(worker_pid(plugin), signal.SIGKILL)
    for stream in streams:
        with pytest.raises(PluginLoadError, match="was killed by SIGKILL"):
            for _ in stream:
                pass
    assert not manager.get_record("fixture_hf").active
    assert not plugin.alive
