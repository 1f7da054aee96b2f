"""People's verbs of the store: API keys (sha256 hashes only), the users list, and forgetting a
user.

A user can be forgotten (`forget_user`): every row of theirs goes in one transaction, and the
adapter versions trained on their feedback are named; with `relearn_from`, the version their
feedback's first round started from goes live, the later versions' folders are unregistered,
and the other users' feedback those versions used is pending again, to be learnt anew.

`Store` (chatbot/store.py) inherits these. Left out: accounts and passwords (the server's
--auth options hold those, never the database).
"""

from __future__ import annotations

from chatbot.db import Cursor, Database, now
from chatbot.errors import Conflict, NotFound
from chatbot.learner_store import FEEDBACK_TABLES
from chatbot.registry import RegistryVerbs


class UserVerbs(RegistryVerbs):
    db: Database

    def add_api_key(self, user_id: str, key_sha256: str, hint: str) -> int:
        with self.db.transaction() as cur:
            return cur.insert("api_keys", {"user_id": user_id, "key_sha256": key_sha256,
                                           "hint": hint, "created_at": now()}, returning="id")

    def api_key_user(self, key_sha256: str) -> str | None:
        """The user a key hash belongs to, or None."""
        row = self.db.one("select user_id from api_keys where key_sha256 = ?", (key_sha256,))
        return row["user_id"] if row else None

    def api_keys(self) -> list[dict]:
        """Every key's user, hint and creation time (never the hash)."""
        return self.db.query("select id, user_id, hint, created_at from api_keys order by id")

    def users(self) -> list[dict]:
        """Every user with conversations or API keys: id, conversations, votes, corrections."""
        return self.db.query(
            "select u.id, (select count(*) from conversations c where c.user_id = u.id) as "
            "conversations, (select count(*) from votes v where v.user_id = u.id) as votes, "
            "(select count(*) from corrections r where r.user_id = u.id) as corrections "
            "from (select id from users union select user_id as id from api_keys) u "
            "order by u.id")

    def trained_on(self, user_id: str) -> list[int]:
        """The adapter versions whose rounds used some of the user's feedback, oldest first."""
        with self.db.read() as cur:
            return self._trained_on(cur, user_id)

    @staticmethod
    def _trained_on(cur: Cursor, user_id: str) -> list[int]:
        rows = cur.rows(" union ".join(
            f"select distinct used_by_version as v from {table} "
            "where user_id = ? and used_by_version is not null" for table in FEEDBACK_TABLES),
            (user_id,) * len(FEEDBACK_TABLES))
        return sorted(row["v"] for row in rows)

    def forget_user(self, user_id: str, relearn_from: int | None = None) -> dict:
        """Delete every row of a user - conversations, messages, pairs, replies, votes,
        ratings, corrections, API keys - in one transaction. Returns how many of each, and
        `trained_on`: the adapter versions whose rounds used their feedback (their weights
        keep what it taught).

        `relearn_from`: the version the first of those rounds started from (0: the base
        model), which the caller checked is on disk. It goes live; every later version is
        retired and unregistered from disk (`removed`: their paths, for the caller to delete),
        so no rollback can bring one back; and the feedback those versions used is pending
        again, for the learner to learn without the forgotten user's.

        NotFound for an unknown user; Conflict while a learner round holds a claim on their
        feedback (it is training on it: try again when it ends), or when `relearn_from` is
        no longer where their feedback's first round started (a round finished meanwhile)."""
        with self.db.transaction() as cur:
            cur.lock_registry()
            known = cur.value("select count(*) from users where id = ?", (user_id,)) + cur.value(
                "select count(*) from api_keys where user_id = ?", (user_id,))
            if not known:
                raise NotFound(f"no user {user_id!r}")
            for table in FEEDBACK_TABLES:
                if cur.value(f"select count(*) from {table} where user_id = ? and claimed_by "
                             "is not null and used_by_version is null", (user_id,)):
                    raise Conflict(f"a learner round is training on {user_id}'s feedback now; "
                                   "try again when it ends")
            trained = self._trained_on(cur, user_id)
            removed: list[str] = []
            if relearn_from is not None:
                origin = self.round_origin(trained[0], cur) if trained else None
                if origin != relearn_from:
                    raise Conflict("the learner used more of their feedback meanwhile; "
                                   "try again")
                removed = self._relearn_from(cur, relearn_from)
            pairs = "(select id from pairs where user_id = ?)"
            conversations = "(select id from conversations where user_id = ?)"
            counts = {}
            for table in FEEDBACK_TABLES:
                counts[table] = cur.run(f"delete from {table} where user_id = ? or pair_id in "
                                        f"{pairs}", (user_id, user_id))
            counts["replies"] = cur.run(f"delete from replies where pair_id in {pairs}",
                                        (user_id,))
            counts["pairs"] = cur.run("delete from pairs where user_id = ? or conversation_id "
                                      f"in {conversations}", (user_id, user_id))
            counts["messages"] = cur.run(
                f"delete from messages where conversation_id in {conversations}", (user_id,))
            counts["conversations"] = cur.run("delete from conversations where user_id = ?",
                                              (user_id,))
            counts["api_keys"] = cur.run("delete from api_keys where user_id = ?", (user_id,))
            cur.run("delete from users where id = ?", (user_id,))
            return {"deleted": counts, "trained_on": trained, "removed": removed,
                    "live_adapter_version": self._live_version(cur)}

    @staticmethod
    def _relearn_from(cur: Cursor, version: int) -> list[str]:
        """Make `version` live, retire and unregister every later version, and return the
        feedback they used to pending. Returns the unregistered versions' folder names."""
        stamp = now()
        later = cur.rows("select version, path from adapters where version > ?", (version,))
        RegistryVerbs._set_live(cur, version, stamp)
        cur.run("update adapters set reason = ?, path = null, updated_at = ? where version > ?",
                ("trained on the feedback of a forgotten user", stamp, version))
        cur.run("delete from adapter_files where version > ?", (version,))
        for table in FEEDBACK_TABLES:
            cur.run(f"update {table} set claimed_by = null, claimed_at = null, "
                    "used_by_version = null, used_at = null where used_by_version > ?",
                    (version,))
        return [row["path"] for row in later if row["path"]]

    def remove_api_keys(self, user_id: str) -> int:
        """Delete every key of a user; returns how many there were."""
        with self.db.transaction() as cur:
            return cur.run("delete from api_keys where user_id = ?", (user_id,))
