"""The SQLite store: conversations, pairs of replies, votes, ratings, adapters, learner steps.

One file in WAL mode, shared by the server and the learner (two processes). Every write is a
short `BEGIN IMMEDIATE` transaction, so a writer waits its turn (busy timeout) instead of
failing half-way, and nothing holds a transaction while a model runs. The schema is built by
numbered migrations (`m001_initial`, ...) applied on open.

Feedback (votes and ratings) moves pending -> claimed by a learner round -> used by the
adapter version that round published or rejected. A claim is only a mark; a learner that
dies leaves claims behind, which `release_claims` clears on its next start.

A pair has two replies (A, B) and status open -> voted (or discarded when regenerated). The
OpenAI-compatible API's `n=1` stores a "pair" with reply A alone and status `single`: it can
be rated (thumbs on A) but not voted on. API keys are stored as sha256 hashes only.

Left out: PostgreSQL (the same verbs would sit over it), full-text search, deleting data.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from chatbot.errors import Conflict, InvalidInput, NotFound
from chatbot.limits import fair_pick

CHOICES = ("A", "B", "tie", "both_bad")
SIDES = ("A", "B")
THUMBS = ("up", "down")
BUSY_TIMEOUT_S = 30.0

migrations = Migrations("duet")


@migrations()
def m001_initial(db: Database) -> None:
    db["users"].create({"id": str, "created_at": str}, pk="id")
    db["conversations"].create(
        {"id": str, "user_id": str, "title": str, "created_at": str, "updated_at": str},
        pk="id", foreign_keys=[("user_id", "users")],
    )
    db["conversations"].create_index(["user_id", "updated_at"])
    db["messages"].create(
        {"id": int, "conversation_id": str, "position": int, "role": str, "content": str,
         "pair_id": str, "created_at": str},
        pk="id", foreign_keys=[("conversation_id", "conversations")],
    )
    db["messages"].create_index(["conversation_id", "position"], unique=True)
    db["pairs"].create(
        {"id": str, "conversation_id": str, "message_id": int, "user_id": str,
         "prompt_token_ids": str, "adapter_version": int, "temperature": float, "top_p": float,
         "max_new_tokens": int, "status": str, "seconds": float, "first_token_seconds": float,
         "created_at": str},
        pk="id", foreign_keys=[("conversation_id", "conversations"), ("message_id", "messages")],
    )
    db["pairs"].create_index(["conversation_id"])
    db["replies"].create(
        {"id": int, "pair_id": str, "side": str, "text": str, "token_ids": str,
         "token_logprobs": str, "behaviour_logprob": float, "adapter_version": int,
         "finish_reason": str, "n_tokens": int, "ref_token_logprobs": str},
        pk="id", foreign_keys=[("pair_id", "pairs")],
    )
    db["replies"].create_index(["pair_id", "side"], unique=True)
    feedback_columns = {"claimed_by": str, "claimed_at": str, "used_by_version": int,
                        "used_at": str}
    db["votes"].create(
        {"id": int, "pair_id": str, "user_id": str, "choice": str, "split": str,
         "created_at": str, **feedback_columns},
        pk="id", foreign_keys=[("pair_id", "pairs")],
    )
    db["votes"].create_index(["pair_id"], unique=True)
    db["votes"].create_index(["used_by_version"])
    db["ratings"].create(
        {"id": int, "pair_id": str, "side": str, "user_id": str, "thumb": str,
         "created_at": str, **feedback_columns},
        pk="id", foreign_keys=[("pair_id", "pairs")],
    )
    db["ratings"].create_index(["pair_id", "side", "user_id"], unique=True)
    db["adapters"].create(
        {"version": int, "path": str, "parent_version": int, "base_model": str,
         "sha256": str, "status": str, "metrics": str, "reason": str, "created_at": str,
         "updated_at": str},
        pk="version",
    )
    db["learner_steps"].create(
        {"id": int, "round_id": str, "adapter_version": int, "parent_version": int,
         "objective": str, "status": str, "loss": float, "kl": float, "reward": float,
         "beta": float, "votes_used": int, "new_votes": int, "replayed_votes": int,
         "skipped_steps": int, "heldout_acc": float, "live_heldout_acc": float,
         "seconds": float, "note": str, "created_at": str},
        pk="id",
    )
    db["learner_status"].create(
        {"id": int, "pid": int, "state": str, "last_error": str, "started_at": str,
         "heartbeat_at": str},
        pk="id",
    )


@migrations()
def m002_judged_pairs(db: Database) -> None:
    """How many new A/B votes each round scored the live adapter on (and, under --judge-new,
    the candidate)."""
    db["learner_steps"].add_column("judged_pairs", int)


@migrations()
def m003_api_keys(db: Database) -> None:
    """Keys for the OpenAI-compatible API: only a hash of each key is kept."""
    db["api_keys"].create(
        {"id": int, "user_id": str, "key_sha256": str, "hint": str, "created_at": str},
        pk="id",
    )
    db["api_keys"].create_index(["key_sha256"], unique=True)
    db["api_keys"].create_index(["user_id"])


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _loads(row: dict, *keys: str) -> dict:
    for key in keys:
        if row.get(key) is not None:
            row[key] = json.loads(row[key])
    return row


class Store:
    """The only code that speaks SQL. Verbs are small, named after the domain, and atomic."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S, check_same_thread=False)
        self.db = Database(conn)
        self._lock = threading.RLock()  # one connection, shared by the server's threads
        self.db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        self.db.enable_wal()
        # NORMAL in WAL mode: a commit survives a process crash; a power cut may lose the
        # last few transactions but never corrupts the file.
        self.db.execute("PRAGMA synchronous = NORMAL")
        self.db.execute("PRAGMA foreign_keys = ON")
        with self._lock:
            migrations.apply(self.db)

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def _write(self):
        """A write transaction that takes the write lock up front (no deadlock on upgrade)."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.rollback()
                raise
            else:
                self.db.execute("COMMIT")

    def _rows(self, sql: str, params: tuple | list = ()) -> list[dict]:
        with self._lock:
            return [dict(row) for row in self.db.query(sql, params)]

    def _one(self, sql: str, params: tuple | list = ()) -> dict | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    # --- conversations -----------------------------------------------------------------

    def conversation(self, user_id: str, conversation_id: str) -> dict:
        row = self._one("select * from conversations where id = ? and user_id = ?",
                        (conversation_id, user_id))
        if row is None:
            raise NotFound(f"no conversation {conversation_id!r}")
        return row

    def conversations(self, user_id: str, limit: int = 100) -> list[dict]:
        return self._rows(
            "select * from conversations where user_id = ? order by updated_at desc limit ?",
            (user_id, limit))

    def messages(self, conversation_id: str) -> list[dict]:
        return self._rows("select * from messages where conversation_id = ? order by position",
                          (conversation_id,))

    def open_pair(self, conversation_id: str) -> dict | None:
        """The pair awaiting a vote at the end of this conversation, if any."""
        return self._one("select * from pairs where conversation_id = ? and status = 'open' "
                         "order by created_at desc limit 1", (conversation_id,))

    def reply_endings(self, conversation_id: str) -> dict[int, dict]:
        """How each assistant message that came from a stored reply ended: message id ->
        {finish_reason, n_tokens}. The reply is the side record_vote continued with (B on a
        B vote, else A; A of an n=1 reply)."""
        rows = self._rows(
            "select m.id, r.finish_reason, r.n_tokens from messages m "
            "join replies r on r.pair_id = m.pair_id "
            "left join votes v on v.pair_id = m.pair_id "
            "where m.conversation_id = ? and m.role = 'assistant' "
            "and r.side = case when v.choice = 'B' then 'B' else 'A' end", (conversation_id,))
        return {r["id"]: {"finish_reason": r["finish_reason"], "n_tokens": r["n_tokens"]}
                for r in rows}

    def recent_prompts(self, user_id: str, limit: int = 3) -> list[str]:
        """The first user message of the user's most recently active conversations, distinct,
        newest first."""
        rows = self._rows(
            "select m.content, max(c.updated_at) as at from conversations c "
            "join messages m on m.conversation_id = c.id "
            "where c.user_id = ? and m.role = 'user' and m.position = (select min(position) "
            "from messages where conversation_id = c.id and role = 'user') "
            "group by m.content order by at desc, max(c.rowid) desc limit ?", (user_id, limit))
        return [r["content"] for r in rows]

    def add_turn(self, user_id: str, conversation_id: str | None, message: str,
                 pair: dict, replies: list[dict]) -> tuple[str, str]:
        """Store a user message and the pair of replies to it; start a conversation if needed.

        `pair` holds the pairs columns the sampler knows (prompt tokens, settings, timings);
        `replies` the two replies columns, A first. Returns (conversation_id, pair_id).
        """
        with self._write() as db:
            stamp = now()
            if not conversation_id:
                conversation_id = uuid.uuid4().hex
                db["users"].insert({"id": user_id, "created_at": stamp}, ignore=True)
                db["conversations"].insert({"id": conversation_id, "user_id": user_id,
                                            "title": message.strip()[:80], "created_at": stamp,
                                            "updated_at": stamp})
                position = 0
            else:
                self.conversation(user_id, conversation_id)
                if self.open_pair(conversation_id):
                    raise Conflict("vote on the last pair of replies before sending a new message")
                last = db.execute("select max(position) from messages where conversation_id = ?",
                                  (conversation_id,)).fetchone()[0]
                position = 0 if last is None else last + 1
                db["conversations"].update(conversation_id, {"updated_at": stamp})
            message_id = db["messages"].insert(
                {"conversation_id": conversation_id, "position": position, "role": "user",
                 "content": message, "pair_id": None, "created_at": stamp}).last_pk
            pair_id = self._insert_pair(db, user_id, conversation_id, message_id, pair, replies)
        return conversation_id, pair_id

    def add_conversation_turn(self, user_id: str, history: list[dict], message: str,
                              pair: dict, replies: list[dict]) -> tuple[str, str]:
        """Start a conversation with `history` (earlier system/user/assistant messages), the
        user `message`, and its replies: two make an open pair; one makes a `single` pair whose
        reply is already the conversation's next message. Returns (conversation_id, pair_id).
        """
        with self._write() as db:
            stamp = now()
            conversation_id = uuid.uuid4().hex
            db["users"].insert({"id": user_id, "created_at": stamp}, ignore=True)
            db["conversations"].insert({"id": conversation_id, "user_id": user_id,
                                        "title": message.strip()[:80], "created_at": stamp,
                                        "updated_at": stamp})
            for position, turn in enumerate(history):
                db["messages"].insert({"conversation_id": conversation_id, "position": position,
                                       "role": turn["role"], "content": turn["content"],
                                       "pair_id": None, "created_at": stamp})
            message_id = db["messages"].insert(
                {"conversation_id": conversation_id, "position": len(history), "role": "user",
                 "content": message, "pair_id": None, "created_at": stamp}).last_pk
            status = "open" if len(replies) == 2 else "single"
            pair_id = self._insert_pair(db, user_id, conversation_id, message_id, pair, replies,
                                        status)
            if status == "single":
                db["messages"].insert({"conversation_id": conversation_id,
                                       "position": len(history) + 1, "role": "assistant",
                                       "content": replies[0]["text"], "pair_id": pair_id,
                                       "created_at": stamp})
        return conversation_id, pair_id

    def add_regenerated_pair(self, user_id: str, old_pair_id: str, pair: dict,
                             replies: list[dict]) -> str:
        """Replace an open pair by a new one for the same user message."""
        with self._write() as db:
            old = self.pair(user_id, old_pair_id)
            if old["status"] != "open":
                raise Conflict("only the latest pair, before it is voted on, can be regenerated")
            db["pairs"].update(old_pair_id, {"status": "discarded"})
            return self._insert_pair(db, user_id, old["conversation_id"], old["message_id"],
                                     pair, replies)

    def _insert_pair(self, db: Database, user_id: str, conversation_id: str, message_id: int,
                     pair: dict, replies: list[dict], status: str = "open") -> str:
        assert len(replies) == (1 if status == "single" else 2)
        pair_id = uuid.uuid4().hex
        db["pairs"].insert({**pair, "id": pair_id, "conversation_id": conversation_id,
                            "message_id": message_id, "user_id": user_id, "status": status,
                            "prompt_token_ids": json.dumps(pair["prompt_token_ids"]),
                            "created_at": now()})
        for side, reply in zip(SIDES, replies):
            db["replies"].insert({**reply, "pair_id": pair_id, "side": side,
                                  "token_ids": json.dumps(reply["token_ids"]),
                                  "token_logprobs": json.dumps(reply["token_logprobs"])})
        return pair_id

    # --- pairs, votes, ratings ----------------------------------------------------------

    def pair(self, user_id: str | None, pair_id: str) -> dict:
        """A pair with its two replies; `user_id=None` skips the ownership check (learner)."""
        row = self._one("select * from pairs where id = ?", (pair_id,))
        if row is None or (user_id is not None and row["user_id"] != user_id):
            raise NotFound(f"no pair {pair_id!r}")
        row["replies"] = [_loads(r, "token_ids", "token_logprobs", "ref_token_logprobs")
                          for r in self._rows("select * from replies where pair_id = ? "
                                              "order by side", (pair_id,))]
        return _loads(row, "prompt_token_ids")

    def record_vote(self, user_id: str, pair_id: str, choice: str) -> dict:
        """Store the vote and continue the conversation from the chosen reply.

        The continuation is reply A on `A` and `tie`, B on `B`, and A on `both_bad` (the
        conversation must go on from something; the vote still says neither was good).
        """
        if choice not in CHOICES:
            raise InvalidInput(f"choice must be one of {', '.join(CHOICES)}; got {choice!r}")
        with self._write() as db:
            pair = self._one("select * from pairs where id = ?", (pair_id,))
            if pair is None or pair["user_id"] != user_id:
                raise NotFound(f"no pair {pair_id!r}")
            if pair["status"] == "single":
                raise Conflict("this reply was served alone (n=1), so there is nothing to "
                               "compare: rate it with a thumb instead")
            if db["votes"].count_where("pair_id = ?", [pair_id]):
                raise Conflict("this pair already has a vote")
            if pair["status"] != "open":
                raise Conflict("this pair was replaced by a regenerated one")
            stamp = now()
            vote_id = db["votes"].insert({"pair_id": pair_id, "user_id": user_id,
                                          "choice": choice, "created_at": stamp}).last_pk
            side = "B" if choice == "B" else "A"
            text = db.execute("select text from replies where pair_id = ? and side = ?",
                              (pair_id, side)).fetchone()[0]
            position = db.execute("select position from messages where id = ?",
                                  (pair["message_id"],)).fetchone()[0]
            db["messages"].insert({"conversation_id": pair["conversation_id"],
                                   "position": position + 1, "role": "assistant",
                                   "content": text, "pair_id": pair_id, "created_at": stamp})
            db["pairs"].update(pair_id, {"status": "voted"})
            db["conversations"].update(pair["conversation_id"], {"updated_at": stamp})
        return {"vote_id": vote_id, "pair_id": pair_id, "choice": choice, "continued_with": side}

    def record_rating(self, user_id: str, pair_id: str, side: str, thumb: str) -> dict:
        """Thumbs up/down on one reply. A rating not yet used by the learner can be changed."""
        if side not in SIDES:
            raise InvalidInput(f"side must be A or B; got {side!r}")
        if thumb not in THUMBS:
            raise InvalidInput(f"thumb must be up or down; got {thumb!r}")
        with self._write() as db:
            pair = self._one("select user_id from pairs where id = ?", (pair_id,))
            if pair is None or pair["user_id"] != user_id:
                raise NotFound(f"no pair {pair_id!r}")
            if not db["replies"].count_where("pair_id = ? and side = ?", [pair_id, side]):
                raise InvalidInput(f"this reply was served alone (n=1): it is side A; there is "
                                   f"no side {side}")
            old = self._one("select * from ratings where pair_id = ? and side = ? and user_id = ?",
                            (pair_id, side, user_id))
            if old and old["claimed_by"] is not None and old["thumb"] != thumb:
                raise Conflict("this rating was already used for learning and cannot change")
            if old:
                db["ratings"].update(old["id"], {"thumb": thumb, "created_at": now()})
                return {"rating_id": old["id"], "changed": old["thumb"] != thumb}
            rating_id = db["ratings"].insert({"pair_id": pair_id, "side": side,
                                              "user_id": user_id, "thumb": thumb,
                                              "created_at": now()}).last_pk
        return {"rating_id": rating_id, "changed": True}

    def preference_rows(self) -> list[dict]:
        """Pairs with an A or B vote: the choice, the turn's place and both reply texts."""
        return self._rows(
            "select v.choice, p.conversation_id, m.position, "
            "ra.text as a_text, rb.text as b_text "
            "from votes v join pairs p on p.id = v.pair_id "
            "join messages m on m.id = p.message_id "
            "join replies ra on ra.pair_id = p.id and ra.side = 'A' "
            "join replies rb on rb.pair_id = p.id and rb.side = 'B' "
            "where v.choice in ('A', 'B') order by v.id")

    # --- learner: claiming and using feedback -----------------------------------------

    def pending_counts(self) -> dict:
        with self._lock:
            votes = self.db["votes"].count_where("used_by_version is null")
            ratings = self.db["ratings"].count_where("used_by_version is null")
            total = self.db["votes"].count
        return {"votes_total": total, "votes_pending": votes, "ratings_pending": ratings}

    def feedback_users(self) -> int:
        """How many users have ever voted or rated."""
        row = self._one("select count(*) as n from (select user_id from votes "
                        "union select user_id from ratings)")
        return row["n"]

    def claim_feedback(self, round_id: str, limit: int, max_user_share: float = 1.0) -> dict:
        """Mark up to `limit` pending votes and up to `limit` pending ratings as taken by
        this round, oldest first, no user holding more than `max_user_share` of either
        (no cap while only one user has ever given feedback)."""
        with self._write() as db:
            stamp = now()
            claimed = {}
            if self.feedback_users() <= 1:
                max_user_share = 1.0
            for table in ("votes", "ratings"):
                pending = db.execute(
                    f"select id, user_id from {table} where used_by_version is null "
                    "and claimed_by is null order by id").fetchall()
                ids = [row[0] for row in fair_pick(pending, lambda row: row[1], limit,
                                                   max_user_share)]
                db.execute(f"update {table} set claimed_by = ?, claimed_at = ? where id in "
                           f"({','.join('?' * len(ids))})", [round_id, stamp, *ids])
                claimed[table] = ids
        return claimed

    def release_claims(self, round_id: str | None = None) -> int:
        """Give claimed-but-unused feedback back to the pending pool (all rounds if None)."""
        where = "claimed_by is not null and used_by_version is null"
        params: list = []
        if round_id is not None:
            where += " and claimed_by = ?"
            params.append(round_id)
        with self._write() as db:
            n = 0
            for table in ("votes", "ratings"):
                n += db.execute(f"update {table} set claimed_by = null, claimed_at = null "
                                f"where {where}", params).rowcount
        return n

    def votes(self, where: str = "1", params: tuple | list = (), limit: int | None = None,
              order: str = "id") -> list[dict]:
        sql = f"select * from votes where {where} order by {order}"
        if limit is not None:
            sql += f" limit {int(limit)}"
        return self._rows(sql, params)

    def ratings(self, where: str = "1", params: tuple | list = ()) -> list[dict]:
        return self._rows(f"select * from ratings where {where} order by id", params)

    def feedback_by_id(self, table: str, ids: list[int]) -> list[dict]:
        """The votes or ratings with these ids, oldest first."""
        assert table in ("votes", "ratings")
        if not ids:
            return []
        return self._rows(f"select * from {table} where id in ({','.join('?' * len(ids))}) "
                          "order by id", ids)

    def used_feedback(self, table: str) -> list[dict]:
        """Votes or ratings some finished round has used (judged or trained on), oldest first."""
        assert table in ("votes", "ratings")
        return self._rows(f"select * from {table} where used_by_version is not null order by id")

    def cache_ref_logprobs(self, reply_id: int, logprobs: list[float]) -> None:
        with self._write() as db:
            db["replies"].update(reply_id, {"ref_token_logprobs": json.dumps(logprobs)})

    # --- adapters registry -------------------------------------------------------------

    def live_adapter(self) -> dict | None:
        row = self._one("select * from adapters where status = 'live'")
        return _loads(row, "metrics") if row else None

    def live_adapter_version(self) -> int:
        row = self.live_adapter()
        return row["version"] if row else 0

    def adapter(self, version: int) -> dict | None:
        row = self._one("select * from adapters where version = ?", (version,))
        return _loads(row, "metrics") if row else None

    def adapters(self) -> list[dict]:
        return [_loads(r, "metrics") for r in self._rows("select * from adapters order by version")]

    def next_adapter_version(self) -> int:
        row = self._one("select max(version) as v from adapters")
        return (row["v"] or 0) + 1

    def finish_round(self, round_id: str, adapter: dict, step: dict) -> str:
        """Register a published adapter, use the round's feedback, and log the step: one commit.

        `adapter["status"]` is `live` (promote: the previous live one is retired) or
        `rejected`. A promotion only happens if the live version is still the adapter's parent;
        if someone rolled back meanwhile, the candidate is stored as rejected instead. Either
        way the round's claimed feedback is now used by this version. Returns the status.
        """
        with self._write() as db:
            stamp = now()
            adapter = dict(adapter)
            live = db.execute("select version from adapters where status = 'live'").fetchone()
            live_version = live[0] if live else 0
            if adapter["status"] == "live" and live_version != adapter["parent_version"]:
                adapter["status"] = "rejected"
                adapter["reason"] = "the live version changed while this candidate trained"
                step = {**step, "status": "rejected"}
            if adapter["status"] == "live":
                db.execute("update adapters set status = 'retired', updated_at = ? "
                           "where status = 'live'", (stamp,))
            db["adapters"].insert({**adapter, "metrics": json.dumps(adapter.get("metrics", {})),
                                   "created_at": stamp, "updated_at": stamp})
            for table in ("votes", "ratings"):
                db.execute(f"update {table} set used_by_version = ?, used_at = ? "
                           "where claimed_by = ? and used_by_version is null",
                           (adapter["version"], stamp, round_id))
            db["learner_steps"].insert({**step, "round_id": round_id, "created_at": stamp})
        return adapter["status"]

    def log_failed_round(self, round_id: str, step: dict) -> None:
        with self._write() as db:
            db["learner_steps"].insert({**step, "round_id": round_id, "status": "failed",
                                        "created_at": now()})

    def set_live(self, version: int) -> None:
        """Make `version` the live adapter (0 = the base model). Used by rollback."""
        with self._write() as db:
            if version and not db["adapters"].count_where("version = ?", [version]):
                raise NotFound(f"no adapter version {version}")
            stamp = now()
            db.execute("update adapters set status = 'retired', updated_at = ? "
                       "where status = 'live'", (stamp,))
            if version:
                db.execute("update adapters set status = 'live', updated_at = ? where version = ?",
                           (stamp, version))

    def set_adapter_path(self, version: int, path: str | None) -> None:
        with self._write() as db:
            db["adapters"].update(version, {"path": path, "updated_at": now()})

    def learner_steps(self, limit: int = 1000) -> list[dict]:
        return self._rows("select * from learner_steps order by id desc limit ?", (limit,))[::-1]

    # --- API keys ---------------------------------------------------------------------

    def add_api_key(self, user_id: str, key_sha256: str, hint: str) -> int:
        with self._write() as db:
            return db["api_keys"].insert({"user_id": user_id, "key_sha256": key_sha256,
                                          "hint": hint, "created_at": now()}).last_pk

    def api_key_user(self, key_sha256: str) -> str | None:
        """The user a key hash belongs to, or None."""
        row = self._one("select user_id from api_keys where key_sha256 = ?", (key_sha256,))
        return row["user_id"] if row else None

    def api_keys(self) -> list[dict]:
        """Every key's user, hint and creation time (never the hash)."""
        return self._rows("select id, user_id, hint, created_at from api_keys order by id")

    def remove_api_keys(self, user_id: str) -> int:
        """Delete every key of a user; returns how many there were."""
        with self._write() as db:
            return db.execute("delete from api_keys where user_id = ?", (user_id,)).rowcount

    # --- learner process status --------------------------------------------------------

    def set_learner_status(self, pid: int, state: str, last_error: str | None = None) -> None:
        with self._write() as db:
            stamp = now()
            row = {"id": 1, "pid": pid, "state": state, "heartbeat_at": stamp}
            if state == "starting":
                row["started_at"] = stamp
                row["last_error"] = None
            if last_error is not None:
                row["last_error"] = last_error
            db["learner_status"].upsert(row, pk="id")

    def learner_status(self) -> dict | None:
        return self._one("select * from learner_status where id = 1")
