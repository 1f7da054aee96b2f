"""The store: migrations, the vote and rating rules, claiming feedback, the registry."""

from __future__ import annotations

import sqlite3

import pytest

from chatbot.errors import Conflict, InvalidInput, NotFound
from chatbot.store import Store, migrations

PAIR = {"prompt_token_ids": [1, 2, 3], "adapter_version": 0, "temperature": 0.8, "top_p": 0.95,
        "max_new_tokens": 8, "seconds": 0.1, "first_token_seconds": 0.01}


def replies(a="first", b="second"):
    return [{"text": t, "token_ids": [5, 6, 2], "token_logprobs": [-1.0, -2.0, -0.5],
             "behaviour_logprob": -3.5, "adapter_version": 0, "finish_reason": "stop",
             "n_tokens": 3} for t in (a, b)]


def add_turn(store, user="ann", conversation_id=None, message="hello", a="first", b="second"):
    return store.add_turn(user, conversation_id, message, PAIR, replies(a, b))


def snapshot(store):
    tables = ["conversations", "messages", "pairs", "replies", "votes", "ratings"]
    return {t: list(store.db.query(f"select * from {t} order by rowid")) for t in tables}


def test_migrations_build_every_table_once(tmp_path):
    path = tmp_path / "duet.db"
    Store(path).close()
    store = Store(path)  # reopening applies nothing twice
    tables = set(store.db.table_names())
    assert {"users", "conversations", "messages", "pairs", "replies", "votes", "ratings",
            "adapters", "learner_steps", "api_keys"} <= tables
    applied = [m.name for m in migrations.applied(store.db)]
    assert applied == ["m001_initial", "m002_judged_pairs", "m003_api_keys"]
    assert "judged_pairs" in store.db["learner_steps"].columns_dict
    assert store.db.execute("pragma journal_mode").fetchone()[0] == "wal"


def test_add_turn_stores_message_pair_and_both_replies(store):
    conversation_id, pair_id = add_turn(store)
    pair = store.pair("ann", pair_id)
    assert pair["conversation_id"] == conversation_id
    assert pair["prompt_token_ids"] == [1, 2, 3]
    assert [r["side"] for r in pair["replies"]] == ["A", "B"]
    assert pair["replies"][0]["token_logprobs"] == [-1.0, -2.0, -0.5]
    assert [m["role"] for m in store.messages(conversation_id)] == ["user"]


@pytest.mark.parametrize("choice,continued", [("A", "first"), ("B", "second"),
                                              ("tie", "first"), ("both_bad", "first")])
def test_vote_continues_the_conversation_from_the_chosen_reply(store, choice, continued):
    conversation_id, pair_id = add_turn(store)
    result = store.record_vote("ann", pair_id, choice)
    assert result["choice"] == choice
    messages = store.messages(conversation_id)
    assert [(m["role"], m["content"]) for m in messages] == [("user", "hello"),
                                                             ("assistant", continued)]
    assert store.pending_counts() == {"votes_total": 1, "votes_pending": 1, "ratings_pending": 0}


@pytest.mark.parametrize("user,pair_id,choice,error", [
    ("ann", "no-such-pair", "A", NotFound),
    ("bob", None, "A", NotFound),  # another user's pair looks like no pair at all
    ("ann", None, "C", InvalidInput),
    ("ann", None, "a", InvalidInput),
])
def test_bad_votes_are_refused_and_change_nothing(store, user, pair_id, choice, error):
    _, real_pair = add_turn(store)
    before = snapshot(store)
    with pytest.raises(error):
        store.record_vote(user, pair_id or real_pair, choice)
    assert snapshot(store) == before


def test_second_vote_on_a_pair_is_refused_and_changes_nothing(store):
    _, pair_id = add_turn(store)
    store.record_vote("ann", pair_id, "A")
    before = snapshot(store)
    with pytest.raises(Conflict, match="already has a vote"):
        store.record_vote("ann", pair_id, "B")
    assert snapshot(store) == before


def test_new_message_before_voting_is_refused(store):
    conversation_id, _ = add_turn(store)
    before = snapshot(store)
    with pytest.raises(Conflict, match="vote on the last pair"):
        add_turn(store, conversation_id=conversation_id, message="again")
    assert snapshot(store) == before


def test_other_users_conversation_is_invisible(store):
    conversation_id, pair_id = add_turn(store)
    store.record_vote("ann", pair_id, "A")
    with pytest.raises(NotFound):
        add_turn(store, user="bob", conversation_id=conversation_id)
    assert store.conversations("bob") == []
    assert len(store.conversations("ann")) == 1


def test_regenerated_pair_replaces_the_open_one(store):
    conversation_id, old = add_turn(store)
    new = store.add_regenerated_pair("ann", old, PAIR, replies("third", "fourth"))
    assert store.pair("ann", old)["status"] == "discarded"
    assert store.open_pair(conversation_id)["id"] == new
    with pytest.raises(Conflict):
        store.record_vote("ann", old, "A")
    store.record_vote("ann", new, "B")
    assert store.messages(conversation_id)[-1]["content"] == "fourth"


def test_ratings_can_change_until_claimed(store):
    _, pair_id = add_turn(store)
    store.record_rating("ann", pair_id, "A", "up")
    assert store.record_rating("ann", pair_id, "A", "down")["changed"] is True
    assert [r["thumb"] for r in store.ratings()] == ["down"]
    store.claim_feedback("round-1", limit=10)
    with pytest.raises(Conflict):
        store.record_rating("ann", pair_id, "A", "up")
    with pytest.raises(InvalidInput):
        store.record_rating("ann", pair_id, "C", "up")
    with pytest.raises(InvalidInput):
        store.record_rating("ann", pair_id, "B", "sideways")
    with pytest.raises(NotFound):
        store.record_rating("bob", pair_id, "B", "up")


def test_claim_release_and_finish_round(store):
    pair_ids = []
    for i in range(3):
        conversation_id, pair_id = add_turn(store, message=f"m{i}")
        store.record_vote("ann", pair_id, "A")
        pair_ids.append(pair_id)
    claimed = store.claim_feedback("r1", limit=2)
    assert len(claimed["votes"]) == 2
    assert store.claim_feedback("r2", limit=10)["votes"] == [3]  # the one left
    assert store.release_claims("r2") == 1
    store.finish_round("r1", {"version": 1, "path": "v1", "parent_version": 0,
                              "base_model": "m", "sha256": "x", "status": "live"},
                       {"adapter_version": 1, "status": "promoted", "loss": 0.1})
    assert store.pending_counts()["votes_pending"] == 1
    assert [v["used_by_version"] for v in store.votes()] == [1, 1, None]
    assert store.live_adapter_version() == 1
    store.finish_round("r3", {"version": 2, "path": "v2", "parent_version": 1,
                              "base_model": "m", "sha256": "y", "status": "rejected"},
                       {"adapter_version": 2, "status": "rejected"})
    assert store.live_adapter_version() == 1
    store.set_live(0)
    assert store.live_adapter_version() == 0
    with pytest.raises(NotFound):
        store.set_live(7)


def test_writers_in_two_connections_wait_instead_of_failing(tmp_path):
    path = tmp_path / "duet.db"
    first, second = Store(path), Store(path)
    _, pair_id = add_turn(first)
    blocker = sqlite3.connect(path, timeout=1)
    blocker.execute("begin immediate")
    import threading

    result = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "vote", second.record_vote("ann", pair_id, "A")))
    thread.start()
    thread.join(0.5)
    assert thread.is_alive()  # waiting on the busy timeout, not failing
    blocker.rollback()
    thread.join(10)
    assert result["vote"]["choice"] == "A"


@pytest.mark.parametrize("choice,cut", [("A", False), ("B", True), ("tie", False),
                                        ("both_bad", False)])
def test_reply_endings_follow_the_reply_the_conversation_went_on_with(store, choice, cut):
    conversation_id, pair_id = store.add_turn(
        "ann", None, "hello", PAIR,
        [{**r, "finish_reason": reason, "n_tokens": n}
         for r, reason, n in zip(replies(), ("stop", "length"), (3, 8))])
    assert store.reply_endings(conversation_id) == {}  # no assistant message yet
    store.record_vote("ann", pair_id, choice)
    [message] = [m for m in store.messages(conversation_id) if m["role"] == "assistant"]
    ending = store.reply_endings(conversation_id)[message["id"]]
    assert ending == ({"finish_reason": "length", "n_tokens": 8} if cut
                      else {"finish_reason": "stop", "n_tokens": 3})


def test_recent_prompts_are_first_messages_of_the_users_latest_conversations(store):
    for message in ("oldest", "middle", "newest"):
        conversation_id, pair_id = add_turn(store, message=message)
        store.record_vote("ann", pair_id, "A")
    add_turn(store, conversation_id=conversation_id, message="a second turn")
    add_turn(store, user="bob", message="bob's")
    add_turn(store, message="middle")  # the same prompt again counts once
    assert store.recent_prompts("ann", 3) == ["middle", "newest", "oldest"]
    assert store.recent_prompts("ann", 1) == ["middle"]
    assert store.recent_prompts("carol") == []
