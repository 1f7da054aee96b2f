"""Forgetting a user: every row of theirs goes, the others' stay, and with --relearn the adapter
versions trained on their feedback go too and the others' feedback is learnt again - on SQLite
and on a real PostgreSQL server (the `store` fixture opens both in turn)."""

from __future__ import annotations

import pytest

import app
from chatbot.config import Config
from chatbot.errors import Conflict, NotFound
from chatbot.service import rollback
from chatbot.store import Store
from tests.test_store import add_turn

TABLES = ("users", "conversations", "messages", "pairs", "replies", "votes", "ratings",
          "corrections", "api_keys")


@pytest.fixture
def store(db_target):
    s = Store(db_target)
    yield s
    s.close()


def rows(store, user):
    """Every row of `user`'s, table by table (replies and messages through their pairs)."""
    pairs = "(select id from pairs where user_id = ?)"
    return {
        "users": store.db.query("select * from users where id = ?", (user,)),
        "conversations": store.db.query("select * from conversations where user_id = ?",
                                        (user,)),
        "messages": store.db.query("select m.* from messages m join conversations c on "
                                   "c.id = m.conversation_id where c.user_id = ? order by m.id",
                                   (user,)),
        "pairs": store.db.query("select * from pairs where user_id = ? order by id", (user,)),
        "replies": store.db.query(f"select * from replies where pair_id in {pairs} order by id",
                                  (user,)),
        **{t: store.db.query(f"select * from {t} where user_id = ? order by id", (user,))
           for t in ("votes", "ratings", "corrections", "api_keys")},
    }


def finish(store, version, parent, preview_of=None):
    """A learner round that used whatever is pending, published as `version`, live."""
    round_id = f"round-{version}"
    store.claim_feedback(round_id, limit=100)
    store.finish_round(round_id, {"version": version, "path": f"v{version}",
                                  "parent_version": parent, "base_model": "tiny",
                                  "sha256": "0" * 64, "metrics": {}, "status": "live",
                                  "preview_of": preview_of, "reason": "test"},
                       {"status": "promoted"})


def two_users(store):
    """ann: a vote, a rating, a correction, an API key; bob: a vote. One round uses all of it
    (v1); then bob votes again and a second round uses that (v2)."""
    conversation, first = add_turn(store, "ann", message="ann's secret")
    store.record_vote("ann", first, "A")
    store.record_rating("ann", first, "B", "down")
    _, second = add_turn(store, "ann", conversation_id=conversation)
    store.record_correction("ann", second, "my own words", side="A")
    store.add_api_key("ann", "f" * 64, "ann…")
    store.record_vote("bob", add_turn(store, "bob")[1], "B")
    finish(store, 1, 0)
    store.record_vote("bob", add_turn(store, "bob", message="again")[1], "A")
    finish(store, 2, 1)


def test_forgetting_a_user_deletes_every_row_of_theirs_and_names_what_trained_on_it(store):
    two_users(store)
    bob = rows(store, "bob")

    result = store.forget_user("ann")

    assert not any(rows(store, "ann").values())
    assert rows(store, "bob") == bob  # the others' rows are untouched
    assert result["deleted"] == {"votes": 1, "ratings": 1, "corrections": 1, "replies": 4,
                                 "pairs": 2, "messages": 4, "conversations": 1, "api_keys": 1}
    assert result["trained_on"] == [1] and result["removed"] == []
    assert store.live_adapter_version() == 2  # without --relearn the weights stay
    assert "ann" not in [u["id"] for u in store.users()]
    with pytest.raises(NotFound, match="no user 'ann'"):
        store.forget_user("ann")


def test_relearning_undoes_the_versions_trained_on_them_and_learns_the_others_again(
        store, tmp_path):
    two_users(store)

    result = store.forget_user("ann", relearn_from=store.round_origin(1))

    assert not any(rows(store, "ann").values())
    assert store.live_adapter_version() == 0  # v1's round started from the base model
    assert sorted(result["removed"]) == ["v1", "v2"]
    assert all(a["path"] is None and "forgotten" in a["reason"] for a in store.adapters())
    assert store.pending_counts()["votes_pending"] == 2  # bob's votes, to be learnt again
    with pytest.raises(Conflict, match="deleted from disk"):  # nothing brings v1 back
        rollback(store, Config(data_dir=tmp_path), to=1)


def test_the_origin_skips_a_preview_and_a_stale_origin_is_refused(store):
    store.record_vote("ann", add_turn(store, "ann")[1], "A")
    finish(store, 1, 0)  # a round on ann's vote
    store.record_vote("bob", add_turn(store, "bob")[1], "A")
    # bob's round publishes its first step as v2 (a preview), then itself as v3: it started
    # from v1
    store.publish_preview({"version": 2, "path": "v2", "parent_version": 1, "base_model": "tiny",
                           "sha256": "0" * 64, "metrics": {}, "preview_of": "round-3",
                           "status": "live", "reason": "preview"})
    finish(store, 3, 2)
    assert store.round_origin(3) == 1 and store.round_origin(1) == 0
    assert store.trained_on("bob") == [3]
    with pytest.raises(Conflict, match="meanwhile"):
        store.forget_user("bob", relearn_from=0)
    result = store.forget_user("bob", relearn_from=1)
    assert store.live_adapter_version() == 1 and sorted(result["removed"]) == ["v2", "v3"]
    assert store.votes() and all(v["user_id"] == "ann" for v in store.votes())


def test_a_user_whose_feedback_a_round_holds_cannot_be_forgotten_yet(store):
    two_users(store)
    store.record_vote("ann", add_turn(store, "ann", message="late")[1], "B")
    store.claim_feedback("round-3", limit=100)
    ann = rows(store, "ann")
    with pytest.raises(Conflict, match="training on ann's feedback"):
        store.forget_user("ann")
    assert rows(store, "ann") == ann


def test_the_command_forgets_and_deletes_the_folders_of_what_learnt_from_them(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    store = Store(data / "duet.db")
    two_users(store)
    for version in (1, 2):
        (data / "adapters" / f"v{version}").mkdir(parents=True)
    store.close()

    assert app.main(["--data-dir", str(data), "users", "list"]) == 0
    assert "ann\t1 conversations\t1 votes\t1 corrections" in capsys.readouterr().out
    assert app.main(["--data-dir", str(data), "users", "forget", "ann"]) == 0
    out = capsys.readouterr().out
    assert "forgot ann: 1 votes, 1 ratings, 1 corrections" in out and "v1" in out
    assert (data / "adapters" / "v1").exists()

    assert app.main(["--data-dir", str(data), "users", "forget", "bob", "--relearn"]) == 0
    assert "v0 is live" in capsys.readouterr().out
    assert not (data / "adapters" / "v1").exists() and not (data / "adapters" / "v2").exists()
    assert app.main(["--data-dir", str(data), "users", "forget", "nobody"]) == 2
    assert "no user 'nobody'" in capsys.readouterr().err
