"""The store: migrations, the vote and rating rules, claiming feedback, the registry - each
test on SQLite and on a real PostgreSQL server (`store` below opens both in turn)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import pytest

from chatbot.errors import Conflict, InvalidInput, NotFound
from chatbot.migrations import MIGRATIONS
from chatbot.store import Store

PAIR = {"prompt_token_ids": [1, 2, 3], "adapter_version": 0, "temperature": 0.8, "top_p": 0.95,
        "max_new_tokens": 8, "seconds": 0.1, "first_token_seconds": 0.01}


def replies(a="first", b="second"):
    return [{"text": t, "token_ids": [5, 6, 2], "token_logprobs": [-1.0, -2.0, -0.5],
             "behaviour_logprob": -3.5, "adapter_version": 0, "finish_reason": "stop",
             "n_tokens": 3} for t in (a, b)]


def add_turn(store, user="ann", conversation_id=None, message="hello", a="first", b="second"):
    return store.add_turn(user, conversation_id, message, PAIR, replies(a, b))


@pytest.fixture
def store(db_target):
    s = Store(db_target)
    yield s
    s.close()


def snapshot(store):
    tables = ["conversations", "messages", "pairs", "replies", "votes", "ratings"]
    return {t: store.db.query(f"select * from {t} order by id") for t in tables}


def test_migrations_build_every_table_once(db_target):
    Store(db_target).close()
    store = Store(db_target)  # reopening applies nothing twice
    assert {"users", "conversations", "messages", "pairs", "replies", "votes", "ratings",
            "adapters", "learner_steps", "api_keys", "adapter_files", "corrections"
            } <= store.db.tables()
    assert store.db.applied_migrations() == [m.__name__ for m in MIGRATIONS] == [
        "m001_initial", "m002_judged_pairs", "m003_api_keys", "m004_adapter_files",
        "m005_corrections", "m006_preview_of", "m007_drop_votes_split", "m008_pair_candidates",
        "m009_reply_temperature"]
    assert "judged_pairs" in store.db.columns("learner_steps")
    assert "candidates" in store.db.columns("pairs")
    assert "temperature" in store.db.columns("replies")
    if store.db.dialect.name == "sqlite":
        assert store.db.query("pragma journal_mode")[0]["journal_mode"] == "wal"


def test_a_sqlite_file_made_by_sqlite_utils_opens_and_migrates(tmp_path):
    """Files made before the store spoke PostgreSQL recorded m001-m003 in sqlite-utils'
    table: they are not run again, only m004 and later are."""
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript(
        "create table _sqlite_migrations (id integer primary key, migration_set text, "
        "name text, applied_at text);"
        "create unique index idx__sqlite_migrations_migration_set_name on "
        "_sqlite_migrations (migration_set, name);"
        "insert into _sqlite_migrations (migration_set, name, applied_at) values "
        "('duet', 'm001_initial', 'x'), ('duet', 'm002_judged_pairs', 'x'), "
        "('duet', 'm003_api_keys', 'x');"
        "create table adapters (version integer primary key, path text);"
        "create table votes (id integer primary key, pair_id text, split text);"
        "create table pairs (id text primary key);"
        "create table replies (id integer primary key, pair_id text);")
    old.close()
    store = Store(path)
    assert store.db.applied_migrations()[-6:] == [
        "m004_adapter_files", "m005_corrections", "m006_preview_of", "m007_drop_votes_split",
        "m008_pair_candidates", "m009_reply_temperature"]
    assert {"adapter_files", "corrections"} <= store.db.tables()
    assert store.db.columns("votes") == {"id", "pair_id"}  # m001 not run again; m007 ran


def test_a_database_from_before_the_preview_column_is_upgraded(db_target):
    """m006 moves a preview's round from its metrics text into the `preview_of` column."""
    from chatbot.db import Database

    old = Database(db_target)
    old.migrate(MIGRATIONS[:5])
    with old.transaction() as cur:
        for version, metrics in ((1, {"kl": 0.1}), (2, {"kl": 0.2, "preview_of": "r2"})):
            cur.insert("adapters", {"version": version, "path": f"v{version}",
                                    "parent_version": version - 1, "status": "retired",
                                    "metrics": json.dumps(metrics)})
    old.close()
    store = Store(db_target)
    assert [(a["version"], a["preview_of"]) for a in store.adapters()] == [(1, None), (2, "r2")]
    assert store.round_origin(2) == 1
    store.close()


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
    assert store.pending_counts() == {"votes_total": 1, "votes_pending": 1, "ratings_pending": 0,
                                      "corrections_total": 0, "corrections_pending": 0}


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


def test_the_used_votes_texts_are_what_the_length_rate_counts(store):
    """Store.used_vote_texts: each A-or-B vote a finished round used, its id first, with both
    replies' texts in side order; ties and pending votes are not among them."""
    for i, (a, b, choice) in enumerate([("one", "one two", "A"), ("x y z", "x", "B"),
                                        ("p", "q", "tie"), ("r", "s t", "B")]):
        _, pair_id = add_turn(store, message=f"m{i}", a=a, b=b)
        store.record_vote("ann", pair_id, choice)
    store.claim_feedback("r1", limit=3)
    store.finish_round("r1", {"version": 1, "path": "v1", "parent_version": 0,
                              "base_model": "m", "sha256": "x", "status": "live"},
                       {"adapter_version": 1, "status": "promoted", "loss": 0.1})
    assert [row[1:] for row in store.used_vote_texts()] == [("A", "one", "one two"),
                                                            ("B", "x y z", "x")]
    ids = [row[0] for row in store.used_vote_texts()]
    assert ids == sorted(ids) and len(set(ids)) == 2


def test_writers_in_two_connections_wait_instead_of_failing(tmp_path):
    path = tmp_path / "duet.db"
    first, second = Store(path), Store(path)
    _, pair_id = add_turn(first)
    blocker = sqlite3.connect(path, timeout=1)
    blocker.execute("begin immediate")
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "vote", second.record_vote("ann", pair_id, "A")))
    thread.start()
    thread.join(0.5)
    assert thread.is_alive()  # waiting on the busy timeout, not failing
    # ... and holding no lock of the store's own: its other threads read on meanwhile
    started = time.monotonic()
    assert second.pair("ann", pair_id)["status"] == "open"
    assert second.pending_counts()["votes_total"] == 0
    assert time.monotonic() - started < 0.3
    blocker.rollback()
    thread.join(10)
    assert result["vote"]["choice"] == "A"


def test_a_claim_skips_votes_another_claim_holds(store):
    """Two learners never claim the same vote: on PostgreSQL a claim locks the rows it takes
    (FOR UPDATE SKIP LOCKED) and passes over rows another transaction holds; on SQLite one
    writer at a time."""
    for i in range(4):
        _, pair_id = add_turn(store, message=f"m{i}")
        store.record_vote("ann", pair_id, "A")
    if store.db.dialect.name == "postgresql":
        with store.db.transaction() as other:  # another learner, mid-claim on votes 1 and 2
            other.rows("select id from votes where id in (1, 2) for update")
            started = time.monotonic()
            assert store.claim_feedback("r1", limit=10)["votes"] == [3, 4]
            assert time.monotonic() - started < 2  # skipped, not waited for
    second = Store(store.db.target)
    claims = {}
    threads = [threading.Thread(target=lambda s=s, r=r: claims.setdefault(
        r, s.claim_feedback(r, limit=1)["votes"])) for s, r in ((store, "a"), (second, "b"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    taken = claims["a"] + claims["b"]
    assert len(taken) == len(set(taken)), "a vote was claimed twice"
    assert taken  # (at the same instant, one claim may find both candidates taken)
    second.close()


def test_two_front_ends_voting_on_one_pair_store_one_vote(store):
    _, pair_id = add_turn(store)
    second = Store(store.db.target)
    results = []

    def vote(s, choice):
        try:
            results.append(s.record_vote("ann", pair_id, choice)["choice"])
        except Conflict:
            results.append("refused")

    threads = [threading.Thread(target=vote, args=(s, c)) for s, c in ((store, "A"),
                                                                        (second, "B"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(results)[-1] == "refused" and len(store.votes(pair_id=pair_id)) == 1
    assert len([m for m in store.messages(store.pair("ann", pair_id)["conversation_id"])
                if m["role"] == "assistant"]) == 1
    second.close()


def test_adapter_files_are_kept_with_the_registry_until_the_folder_goes(store):
    files = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": bytes(range(256)),
             "manifest.json": b"{}"}
    store.finish_round("r1", {"version": 1, "path": "v1", "parent_version": 0,
                              "base_model": "m", "sha256": "x", "status": "live"},
                       {"adapter_version": 1, "status": "promoted"}, files=files)
    assert store.adapter_files(1) == files
    store.set_adapter_path(1, None)
    assert store.adapter_files(1) == {} and store.adapter(1)["path"] is None


def test_one_learner_per_database(store):
    second = Store(store.db.target)
    assert store.take_learner_lock(wait_s=0)
    assert not second.take_learner_lock(wait_s=0)
    store.close()  # the learner ends: its lock goes with it
    assert second.take_learner_lock(wait_s=5)
    second.close()


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


def test_corrected_prompts_are_the_rewritten_turns_with_their_conversation(store):
    first, pair_id = add_turn(store, message="first question")
    store.record_correction("ann", pair_id, "first rewrite")
    store.record_vote("ann", add_turn(store, message="voted only")[1], "A")
    _, pair_id = add_turn(store, conversation_id=first, message="follow-up")
    store.record_vote("ann", pair_id, "B")
    store.record_correction("ann", pair_id, "second rewrite", side="B")
    _, pair_id = add_turn(store, message="first question")  # the same prompt again
    store.record_correction("ann", pair_id, "a later rewrite")
    _, pair_id = add_turn(store, user="bob", message="bob's")
    store.record_correction("bob", pair_id, "bob's rewrite")
    assert store.corrected_prompts("ann", 3) == [
        {"messages": [{"role": "user", "content": "first question"}],
         "correction": "a later rewrite"},
        {"messages": [{"role": "user", "content": "first question"},
                      {"role": "assistant", "content": "first rewrite"},
                      {"role": "user", "content": "follow-up"}],
         "correction": "second rewrite"}]  # the same first question once, its newest edit
    assert [c["correction"] for c in store.corrected_prompts("ann", 1)] == ["a later rewrite"]
    assert store.corrected_prompts("carol") == []


def test_the_sqlite_file_reads_in_sqlite_utils(tmp_path):
    """The file is plain SQLite for the tools people use on it (sqlite-utils, and Datasette,
    which reads it the same way): named tables, their foreign keys, JSON kept as text."""
    import sqlite_utils

    from tests.test_forget import two_users

    store = Store(tmp_path / "duet.db")
    two_users(store)
    db = sqlite_utils.Database(tmp_path / "duet.db")
    for table in ("users", "conversations", "messages", "pairs", "replies", "votes",
                  "ratings", "corrections", "adapters", "learner_steps", "api_keys"):
        assert db[table].count == len(store.db.query(f"select * from {table}")), table
    assert {(fk.column, fk.other_table) for fk in db["votes"].foreign_keys} == {
        ("pair_id", "pairs")}
    assert ("pair_id", "pairs") in {(fk.column, fk.other_table)
                                    for fk in db["corrections"].foreign_keys}
    reply = next(db["replies"].rows)
    assert json.loads(reply["token_ids"]) == [5, 6, 2] and reply["text"] == "first"
    (row,) = db.query("select count(*) as n from votes where choice = 'A'")
    assert row["n"] == 2
    store.close()
