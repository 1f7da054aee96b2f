"""A PostgreSQL restart under a running deployment: a front-end's next call works, the learner
waits it out, takes its lock again and goes on learning, and stops if another learner took the
lock meanwhile. Each test has a PostgreSQL server of its own to restart."""

from __future__ import annotations

import dataclasses
import threading
import time

import psycopg
import pytest

from chatbot import db
from chatbot.model import load_model
from chatbot.store import Store
from learner.loop import LearnerLockLost
from learner.worker import Learner
from tests.postgres import PostgresServer, postgres_bin
from tests.test_store import add_turn

pytestmark = [pytest.mark.processes,  # restarts a PostgreSQL server of its own
              pytest.mark.skipif(postgres_bin() is None, reason="PostgreSQL is not installed")]


@pytest.fixture
def server():
    with PostgresServer(durable=True) as server:  # a crash keeps what was committed
        yield server


def restart(server, mode="immediate"):
    server.stop(mode)
    server.start()


def test_a_front_end_call_after_a_restart_gets_a_new_connection(server, monkeypatch):
    store = Store(server.url())
    _, pair = add_turn(store)
    restart(server)
    monkeypatch.setattr(db, "PING_AFTER_IDLE_S", 0.0)  # (its pooled connections sat idle)
    store.record_vote("ann", pair, "A")  # no error: the dead connection was not handed out
    assert [v["choice"] for v in store.votes()] == ["A"]
    store.close()


def test_without_the_check_the_first_call_after_a_restart_fails(server, monkeypatch):
    """What the check prevents (and why the test above proves something)."""
    store = Store(server.url())
    _, pair = add_turn(store)
    restart(server)
    monkeypatch.setattr(db, "PING_AFTER_IDLE_S", 1e9)
    with pytest.raises(Exception, match="(?i)connection|terminat|closed"):
        store.record_vote("ann", pair, "A")
    store.record_vote("ann", pair, "A")  # the broken one was dropped: the next call works
    store.close()


def test_the_learner_lock_is_taken_again_after_a_restart_unless_another_took_it(server):
    learner = Store(server.url())
    assert learner.take_learner_lock(wait_s=0)
    restart(server)
    assert learner.keep_learner_lock()  # its session ended with the restart: taken again
    other = Store(server.url())
    assert not other.take_learner_lock(wait_s=0)  # and it holds it
    server.stop()
    with pytest.raises(psycopg.OperationalError):  # the server is down: it cannot say
        learner.keep_learner_lock()
    server.start()
    assert other.take_learner_lock(wait_s=0)  # another learner came first after the restart
    assert not learner.keep_learner_lock()
    learner.close()
    other.close()


def test_the_learner_waits_out_a_restart_and_learns_the_votes_after_it(server, tiny_config):
    config = dataclasses.replace(tiny_config, db=server.url(), learn_every=1, replay=0,
                                 kl_tripwire=100.0, learner_poll_seconds=0.1)
    store = Store(config.db_url)
    assert store.take_learner_lock(wait_s=0)
    learner = Learner(config, store, load_model(config, training=True), seed=0)
    stop, failure = threading.Event(), []

    def run():
        try:
            learner.run_forever(stop)
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    voter = Store(config.db_url)
    _, pair = add_turn(voter)
    voter.record_vote("ann", pair, "A")
    wait_for(lambda: voter.live_adapter_version() == 1)
    restart(server)
    time.sleep(1.5)  # the learner polls a database that is back, with dead connections
    _, pair = add_turn(voter, message="after the restart")
    voter.record_vote("ann", pair, "B")
    wait_for(lambda: voter.live_adapter_version() == 2)
    assert thread.is_alive() and not failure
    other = Store(config.db_url)
    assert not other.take_learner_lock(wait_s=0)  # it still holds the lock
    other.close()
    stop.set()
    thread.join(30)


def test_a_learner_whose_lock_was_taken_while_the_database_was_away_stops(server, tiny_config):
    config = dataclasses.replace(tiny_config, db=server.url(), learner_poll_seconds=0.1)
    store = Store(config.db_url)
    assert store.take_learner_lock(wait_s=0)
    learner = Learner(config, store, load_model(config, training=True), seed=0)
    restart(server)
    other = Store(config.db_url)
    assert other.take_learner_lock(wait_s=0)  # another learner, first
    with pytest.raises(LearnerLockLost):
        learner.run_forever(threading.Event())
    other.close()


def wait_for(condition, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except Exception:  # noqa: BLE001 - the database may be restarting
            pass
        time.sleep(0.2)
    raise AssertionError("timed out")
