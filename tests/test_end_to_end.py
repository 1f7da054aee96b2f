"""The two real processes: `python app.py` with its learner child, driven through the API.
Votes make the live adapter version rise; a dead learner leaves the chat serving."""

from __future__ import annotations

import os
import signal

import pytest
from gradio_client import Client

from chatbot.store import Store
from tests.serving import running_server, wait_for

pytestmark = pytest.mark.processes  # the server and its learner child


@pytest.fixture(scope="module")
def live_server(tiny_model_dir, tmp_path_factory):
    """One server for the module's tests, in file order: the first reads a fresh database,
    the last kills the learner (a server start is ~7 s of a test's time)."""
    folder = tmp_path_factory.mktemp("end-to-end")
    data = folder / "data"
    with running_server("--model", str(tiny_model_dir), "--data-dir", str(data),
                        "--max-new-tokens", "8", "--learn-every", "2",
                        "--swap-poll-seconds", "0.5", log_path=folder / "server.log") as (url, p):
        yield Client(url, verbose=False), data, p


def test_votes_make_the_live_version_rise(live_server):
    client, data, _ = live_server
    store = Store(data / "duet.db")
    wait_for(lambda: client.predict(api_name="/status")["learner"]["state"] == "idle", 120)
    for _ in range(2):  # two rounds
        for message in ("Hello there", "What is rain?"):
            turn = client.predict(message, "", api_name="/ask")
            client.predict(turn["pair_id"], "A", api_name="/vote")
        # the round's version, served (its preview, the first step, may be served before it)
        status = wait_for(lambda: (s := client.predict(api_name="/status"))["votes_pending"] == 0
                          and s["live_adapter_version"] == s["registry_live_version"] > 0 and s,
                          120)
        assert status["live_adapter_version"] == store.learner_steps(limit=1)[-1][
            "adapter_version"]
    turn = client.predict("And now?", "", api_name="/ask")
    assert turn["adapter_version"] == status["live_adapter_version"]
    reply_versions = {row["adapter_version"] for row in store.db.query(
        "select adapter_version from pairs")}
    assert {0, turn["adapter_version"]} <= reply_versions
    assert all(step["status"] == "promoted" for step in store.learner_steps())


def test_the_learner_runs_at_a_lower_priority_than_the_server(live_server):
    import psutil

    client, _, server = live_server
    status = wait_for(lambda: (s := client.predict(api_name="/status"))["learner"].get("pid")
                      and s, 120)
    learner = psutil.Process(status["learner"]["pid"])
    assert learner.nice() >= psutil.Process(server.pid).nice() + 10
    argv = learner.cmdline()  # fewer torch threads than the server while it works: half the
    threads = argv[len(argv) - 1 - argv[::-1].index("--threads") + 1]  # cores
    assert int(threads) == max(1, (os.cpu_count() or 2) // 2)
    assert argv[argv.index("--share-cpu-with") + 1] == str(server.pid)  # every core when idle
    assert "--idle-threads" not in argv


def test_a_dead_learner_leaves_the_chat_serving(live_server):
    client, _, _ = live_server
    status = wait_for(lambda: (s := client.predict(api_name="/status"))["learner"].get("pid")
                      and s["learner"]["state"] == "idle" and s, 120)
    os.kill(status["learner"]["pid"], signal.SIGKILL)
    stopped = wait_for(lambda: (s := client.predict(api_name="/status"))["learner"]["state"]
                       == "stopped" and s, 30)
    assert stopped["learner"]["exit_code"] == -signal.SIGKILL
    turn = client.predict("Still there?", "", api_name="/ask")
    assert len(turn["replies"]) == 2
    voted = client.predict(turn["pair_id"], "B", api_name="/vote")
    assert (voted["pair_id"], voted["choice"]) == (turn["pair_id"], "B")
