"""Many people chatting at once on the embedded model: 16 clients for a bounded time, no
failed request, memory flat; and a full queue answers at once with a clear message."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from gradio_client import Client

from tests.serving import running_server

pytestmark = pytest.mark.slow

CLIENTS = 16
SECONDS = 15


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def test_sixteen_clients_chat_at_once(tmp_path):
    data = tmp_path / "data"
    with running_server("--data-dir", str(data), "--no-learner", "--max-new-tokens", "12",
                        "--concurrency", "2", "--queue-size", "64",
                        "--max-votes-per-minute", "0",
                        log_path=tmp_path / "server.log", timeout=300) as (url, server):
        Client(url, verbose=False).predict("warm up", "", api_name="/ask")
        memory_before = rss_mb(server.pid)
        deadline = time.monotonic() + SECONDS
        counts = {"asks": 0, "votes": 0}
        failures: list[str] = []
        lock = threading.Lock()

        def chat(i):
            client = Client(url, verbose=False)
            conversation = ""
            while time.monotonic() < deadline:
                try:
                    turn = client.predict(f"Client {i}: tell me something", conversation,
                                          api_name="/ask")
                    client.predict(turn["pair_id"], "A", api_name="/vote")
                    conversation = turn["conversation_id"]
                    with lock:
                        counts["asks"] += 1
                        counts["votes"] += 1
                except Exception as exc:  # noqa: BLE001 - every failure is counted
                    with lock:
                        failures.append(f"{type(exc).__name__}: {exc}")

        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(chat, range(CLIENTS)))
        memory_after = rss_mb(server.pid)
    print(f"\n{CLIENTS} clients, {SECONDS} s: {counts}, failures {len(failures)}, "
          f"server RSS {memory_before:.0f} -> {memory_after:.0f} MB")
    assert failures == []
    assert counts["asks"] >= CLIENTS  # every client got at least one turn through
    assert memory_after - memory_before < 300


def test_a_full_queue_says_so_quickly(tmp_path):
    data = tmp_path / "data"
    # 16-token replies: the first request still runs long after all 8 are in the queue
    with running_server("--data-dir", str(data), "--no-learner", "--max-new-tokens", "16",
                        "--concurrency", "1", "--queue-size", "2",
                        log_path=tmp_path / "server.log", timeout=300) as (url, _):
        def ask(i):
            started = time.monotonic()
            try:
                Client(url, verbose=False).predict(f"question {i}", "", api_name="/ask")
                return "ok", time.monotonic() - started
            except Exception as exc:  # noqa: BLE001 - the message is what is checked
                return str(exc), time.monotonic() - started

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(ask, range(8)))
    refused = [(message, seconds) for message, seconds in results if message != "ok"]
    assert refused, "8 requests into a queue of 2 with one worker: some must be refused"
    for message, seconds in refused:
        assert "queue" in message.lower()
        assert seconds < 15  # an answer, not a hang
    assert any(message == "ok" for message, _ in results)
