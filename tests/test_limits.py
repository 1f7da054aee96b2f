"""Per-user limits: fair batches and the vote rate limit; generation slots."""

from __future__ import annotations

import threading
import time

import pytest

from chatbot.errors import Conflict, TooBusy
from chatbot.limits import RateLimiter, Slots, fair_pick


def test_fair_pick_caps_one_users_share_and_keeps_order():
    items = [("mallory", i) for i in range(10)] + [("alice", 100), ("bob", 200)]
    picked = fair_pick(items, lambda item: item[0], limit=8, max_share=0.5)
    users = [user for user, _ in picked]
    assert users.count("mallory") == len(picked) // 2  # half of the batch, no more
    assert ("alice", 100) in picked and ("bob", 200) in picked
    assert [i for u, i in picked if u == "mallory"] == [0, 1]  # oldest first


def test_fair_pick_trims_a_batch_that_others_cannot_fill():
    items = [("mallory", i) for i in range(10)] + [("alice", 99)]
    picked = fair_pick(items, lambda item: item[0], limit=4, max_share=0.5)
    assert picked == [("mallory", 0), ("alice", 99)]
    alone = fair_pick(items[:10], lambda item: item[0], limit=4, max_share=0.5)
    assert alone == [("mallory", 0)]  # the surplus waits for others
    assert len(fair_pick(items[:10], lambda item: item[0], limit=4, max_share=1.0)) == 4


def test_a_single_user_setup_is_not_capped(store):
    from tests.test_store import add_turn

    for i in range(6):
        _, pair_id = add_turn(store, user="local", message=f"m{i}")
        store.record_vote("local", pair_id, "A")
    assert len(store.claim_feedback("r1", limit=4, max_user_share=0.5)["votes"]) == 4


def test_claim_respects_the_user_share(store):
    from tests.test_store import add_turn

    for i in range(6):
        _, pair_id = add_turn(store, user="mallory", message=f"m{i}")
        store.record_vote("mallory", pair_id, "A")
    _, pair_id = add_turn(store, user="alice", message="a")
    store.record_vote("alice", pair_id, "B")
    claimed = store.claim_feedback("r1", limit=4, max_user_share=0.5)
    ids = claimed["votes"]
    users = [v["user_id"] for v in store.votes(ids=ids)]
    assert users.count("mallory") == 1 and users.count("alice") == 1
    assert store.pending_counts()["votes_pending"] == 7  # claimed is not used: nothing lost


def test_rate_limiter_refuses_then_recovers():
    now = [0.0]
    limiter = RateLimiter(limit=3, window_s=60, clock=lambda: now[0])
    for _ in range(3):
        limiter.check("mallory")
    with pytest.raises(Conflict, match="try again in 60 s"):
        limiter.check("mallory")
    limiter.check("alice")  # other users are not affected
    now[0] = 61.0
    limiter.check("mallory")


def test_votes_over_the_rate_limit_are_refused_and_not_stored(store, fake_generator, tmp_path):
    from chatbot.config import Config
    from chatbot.service import ChatService

    service = ChatService(Config(data_dir=tmp_path, max_votes_per_minute=2), store,
                          fake_generator, model_id="fake")
    pairs = [service.ask("mallory", f"q{i}", "")["pair_id"] for i in range(3)]
    service.vote("mallory", pairs[0], "A")
    service.vote("mallory", pairs[1], "A")
    with pytest.raises(Conflict, match="too many votes"):
        service.vote("mallory", pairs[2], "A")
    assert len(store.votes()) == 2


def test_generation_slots_refuse_at_once_when_the_queue_is_full():
    slots = Slots(size=1, waiting=1)
    release, holding, second_done = threading.Event(), threading.Event(), threading.Event()

    def hold():
        with slots.taken():
            holding.set()
            release.wait(10)

    def wait_then_take():
        with slots.taken():
            second_done.set()

    first = threading.Thread(target=hold)
    first.start()
    assert holding.wait(10)
    second = threading.Thread(target=wait_then_take)
    second.start()
    deadline = time.monotonic() + 10
    while slots._queued < 1:  # the second is waiting for the first's slot
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not second_done.is_set()
    started = time.monotonic()
    with pytest.raises(TooBusy, match="queue is full"):
        with slots.taken():
            pass
    assert time.monotonic() - started < 1  # refused at once, not after a wait
    release.set()
    first.join(10)
    second.join(10)
    assert second_done.is_set()
