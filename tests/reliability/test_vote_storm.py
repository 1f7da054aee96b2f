"""A vote storm: 16 clients vote at once while the learner claims batches, on SQLite and on
PostgreSQL. No "database is locked" (or deadlock) reaches anyone, and the votes stored are
exactly the votes acknowledged."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

from gradio_client import Client

from chatbot.store import Store
from tests.serving import running_server

CLIENTS = 16
PAIRS_EACH = 6


def test_vote_storm(tiny_model_dir, tmp_path, db_target):
    data = tmp_path / "data"
    db_args = ["--db", db_target] if "://" in db_target else []  # SQLite: the default file
    with running_server("--model", str(tiny_model_dir), "--data-dir", str(data), *db_args,
                        "--max-new-tokens", "6", "--learn-every", "4", "--concurrency", "4",
                        "--queue-size", "256", "--max-votes-per-minute", "0",
                        log_path=tmp_path / "server.log") as (url, _):
        def make_pairs(i):
            client = Client(url, verbose=False)
            return [client.predict(f"client {i} question {k}", "", api_name="/ask")["pair_id"]
                    for k in range(PAIRS_EACH)]

        with ThreadPoolExecutor(CLIENTS) as pool:
            pairs = list(pool.map(make_pairs, range(CLIENTS)))

        def vote_all(pair_ids):
            client = Client(url, verbose=False)
            acked, errors = [], []
            for pair_id in pair_ids:
                try:
                    reply = client.predict(pair_id, random.choice(["A", "B", "tie", "both_bad"]),
                                           api_name="/vote")
                    if reply["ok"]:
                        acked.append(pair_id)
                except Exception as exc:  # noqa: BLE001 - every failure is counted
                    errors.append(str(exc))
            return acked, errors

        with ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(vote_all, pairs))
    acked = [p for a, _ in results for p in a]
    errors = [message for _, messages in results for message in messages]
    assert errors == [], (tmp_path / "server.log").read_text()[-6000:]
    stored = [vote["pair_id"] for vote in Store(db_target).votes()]
    assert sorted(stored) == sorted(acked)
    assert len(acked) == CLIENTS * PAIRS_EACH
    log = (tmp_path / "server.log").read_text() + (data / "learner.log").read_text()
    assert "database is locked" not in log and "deadlock" not in log
