"""Several front-ends, one learner: two `python app.py` servers on different ports share one
PostgreSQL database and no folder (each has its own --data-dir), and one `python -m learner`
trains for both. Votes cast on either server are trained on, both servers swap to each new
version (fetched from the database and checked against its manifest), and a user's
conversations and pairs are theirs on both servers and nobody else's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from gradio_client import Client

from chatbot.store import Store
from tests.serving import ROOT, running_server, wait_for

USERS = {"alice": "alice-password", "bob": "bob-password"}




def test_two_front_ends_share_one_database_and_one_learner(tiny_model_dir, tmp_path,
                                                            postgres_url):
    users = tmp_path / "users.txt"
    users.write_text("".join(f"{u}:{p}\n" for u, p in USERS.items()))
    users.chmod(0o600)
    common = ("--model", str(tiny_model_dir), "--db", postgres_url, "--no-learner",
              "--max-new-tokens", "6", "--swap-poll-seconds", "0.5",
              "--max-votes-per-minute", "0", "--auth-file", str(users))
    learner_log = open(tmp_path / "learner.log", "wb")
    learner = subprocess.Popen(
        [sys.executable, "-m", "learner", "--db", postgres_url,
         "--data-dir", str(tmp_path / "learner"), "--model", str(tiny_model_dir),
         "--max-new-tokens", "6", "--learn-every", "1", "--max-user-share", "1",
         "--steps-per-round", "1"],
        cwd=ROOT, stdout=learner_log, stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    try:
        with running_server(*common, "--data-dir", str(tmp_path / "front1"),
                            log_path=tmp_path / "front1.log") as (url1, _), \
                running_server(*common, "--data-dir", str(tmp_path / "front2"),
                               log_path=tmp_path / "front2.log") as (url2, _):
            clients = {(user, n): Client(url, auth=(user, password), verbose=False)
                       for user, password in USERS.items() for n, url in ((1, url1), (2, url2))}

            # alice asks on one server, votes and goes on on the other
            turn = clients["alice", 1].predict("hello from one", "", api_name="/ask")
            assert clients["alice", 2].predict(turn["pair_id"], "A", api_name="/vote")["ok"]
            again = clients["alice", 2].predict("and now from two", turn["conversation_id"],
                                                api_name="/ask")
            assert again["conversation_id"] == turn["conversation_id"]
            # ... and bob reaches none of it, on either server
            for n in (1, 2):
                with pytest.raises(Exception, match="no pair"):
                    clients["bob", n].predict(again["pair_id"], "B", api_name="/vote")
                with pytest.raises(Exception, match="no conversation"):
                    clients["bob", n].predict("mine now", turn["conversation_id"],
                                              api_name="/ask")
            assert clients["alice", 1].predict(again["pair_id"], "B", api_name="/vote")["ok"]

            # votes from both users on both servers
            for i in range(6):
                client = clients[("alice", "bob")[i % 2], 1 + (i // 2) % 2]
                pair_id = client.predict(f"question {i}", "", api_name="/ask")["pair_id"]
                assert client.predict(pair_id, "AB"[i % 2], api_name="/vote")["ok"]

            store = Store(postgres_url)
            votes = store.votes()
            assert len(votes) == 8 and {v["user_id"] for v in votes} == set(USERS)
            wait_for(lambda: all(v["used_by_version"] for v in store.votes()), 240)
            version = store.live_adapter_version()
            assert version > 0
            for url in (url1, url2):  # both swapped to the newest live version
                status = wait_for(lambda u=url: (s := Client(
                    u, auth=("alice", USERS["alice"]), verbose=False).predict(
                    api_name="/status"))["live_adapter_version"]
                    == s["registry_live_version"] and s, 60)
                assert status["live_adapter_version"] >= version
                assert status["swap_error"] is None
                assert status["learner"]["state"] in ("idle", "preparing", "training")
                assert status["votes_pending"] == 0
            for front in ("front1", "front2"):  # fetched from the database, no shared folder
                assert (tmp_path / front / "adapters" / f"v{version}" / "manifest.json").exists()
            assert not (tmp_path / "front1" / "duet.db").exists()
            store.close()
    finally:
        learner.terminate()
        learner.wait(30)
        learner_log.close()
    log = "".join((tmp_path / name).read_text() for name in
                  ("front1.log", "front2.log", "learner.log"))
    assert "Traceback" not in log
