"""Kill -9 the server in the middle of a streamed reply, twice, and restart it: no
acknowledged vote is lost, the database passes its integrity check, the live adapter version
comes back, and the learner child does not outlive its server. On SQLite and on PostgreSQL.

Twice, not more: the second kill hits a server that itself came back from one, which is what
a third adds nothing to; each start of a server costs ~20 s of the test."""

from __future__ import annotations

import os
import signal
import time

import psutil
from gradio_client import Client

from chatbot.store import Store
from tests.serving import running_server, wait_for

RESTARTS = 2
LEARN_EVERY = 2  # a round may take 3 of the 4 votes: the last one then waits for company


def test_kill_the_server_mid_stream_and_restart(tiny_model_dir, tmp_path, db_target):
    data = tmp_path / "data"
    db_args = ("--db", db_target) if "://" in db_target else ()  # SQLite: the default file
    args = ("--model", str(tiny_model_dir), "--data-dir", str(data), *db_args,
            "--max-new-tokens", "48",
            "--learn-every", str(LEARN_EVERY), "--swap-poll-seconds", "0.5",
            "--max-votes-per-minute", "0")
    acked: list[str] = []
    live_before = None
    for restart in range(RESTARTS + 1):
        with running_server(*args, log_path=tmp_path / f"server{restart}.log") as (url, server):
            client = Client(url, verbose=False)
            if live_before is not None:  # the live version came back after the kill
                status = wait_for(lambda c=client, v=live_before: (
                    s := c.predict(api_name="/status"))["live_adapter_version"] == v and s, 60)
                assert status["votes_total"] >= len(acked)
            if restart == RESTARTS:
                break
            for i in range(4):
                turn = client.predict(f"message {restart}-{i}", "", api_name="/ask")
                if client.predict(turn["pair_id"], "A", api_name="/vote")["ok"]:
                    acked.append(turn["pair_id"])
            settled = wait_for(lambda c=client: (s := c.predict(api_name="/status"))
                               ["votes_pending"] < LEARN_EVERY and s["learner"]["state"] == "idle"
                               and s["live_adapter_version"] == s["registry_live_version"] and s,
                               120)
            live_before = settled["live_adapter_version"]
            assert live_before > 0
            learner_pid = client.predict(api_name="/status")["learner"]["pid"]
            job = client.submit("a message that is being answered when the power goes",
                                "", api_name="/ask")
            time.sleep(0.3)  # the reply is streaming now
            os.kill(server.pid, signal.SIGKILL)
            server.wait()
            job_failed = False
            try:
                job.result(timeout=10)
            except Exception:  # noqa: BLE001 - the server is gone: the call must fail
                job_failed = True
            assert job_failed
            wait_for(lambda pid=learner_pid: not psutil.pid_exists(pid)
                     or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 30)
        store = Store(db_target)
        if store.db.dialect.name == "sqlite":
            assert store.db.query("pragma integrity_check")[0]["integrity_check"] == "ok"
        assert set(acked) <= {vote["pair_id"] for vote in store.votes()}
        store.close()
    assert len(acked) == 4 * RESTARTS
