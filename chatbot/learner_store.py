"""The learner's half of the store's verbs: claiming and using feedback, finishing a round
(its version registered and its feedback used in one commit), learner steps and the learner's
status. The adapter registry's verbs are chatbot/registry.py's.

`Store` (chatbot/store.py) inherits these; nobody uses this class alone. The SQL is written
the way chatbot/store.py writes it (see chatbot/db.py for the dialects). Claims are marks, not
locks held: a claim transaction lasts milliseconds, the round that follows holds nothing.

Left out: more than one learner per database (`take_learner_lock` refuses a second one).
"""

from __future__ import annotations

import json

from chatbot.db import Cursor, Database, json_columns, marks, now
from chatbot.limits import fair_pick
from chatbot.registry import RegistryVerbs
from chatbot.states import AdapterStatus, LearnerState, RoundOutcome

FEEDBACK_TABLES = ("votes", "ratings", "corrections")
JSON_COLUMNS = {"corrections": ("token_ids",)}  # per feedback table, read back as Python


class LearnerVerbs(RegistryVerbs):
    db: Database

    # --- learner: claiming and using feedback -----------------------------------------

    def pending_counts(self) -> dict:
        row = self.db.one(
            "select (select count(*) from votes) as votes_total, "
            "(select count(*) from votes where used_by_version is null) as votes_pending, "
            "(select count(*) from ratings where used_by_version is null) as ratings_pending, "
            "(select count(*) from corrections) as corrections_total, "
            "(select count(*) from corrections where used_by_version is null) "
            "as corrections_pending")
        return {key: int(value) for key, value in row.items()}

    def used_vote_texts(self) -> list[tuple[int, str, str, str]]:
        """(vote id, choice, reply A's text, reply B's text) of every A-or-B vote a finished
        round has used, oldest first: what the learner measures its voters' taste for length
        on (learner/data.py)."""
        rows = self.db.query(
            "select v.id, v.choice, a.text as a_text, b.text as b_text from votes v "
            "join replies a on a.pair_id = v.pair_id and a.side = 'A' "
            "join replies b on b.pair_id = v.pair_id and b.side = 'B' "
            "where v.choice in ('A', 'B') and v.used_by_version is not null order by v.id")
        return [(int(row["id"]), row["choice"], row["a_text"] or "", row["b_text"] or "")
                for row in rows]

    def feedback_users(self) -> int:
        """How many users have ever voted, rated or corrected."""
        with self.db.read() as cur:
            return self._feedback_users(cur)

    @staticmethod
    def _feedback_users(cur: Cursor) -> int:
        return int(cur.value("select count(*) as n from (select user_id from votes "
                             "union select user_id from ratings "
                             "union select user_id from corrections) as feedback_users"))

    def claim_feedback(self, round_id: str, limit: int, max_user_share: float = 1.0) -> dict:
        """Mark up to `limit` pending votes, ratings and corrections (each) as taken by
        this round, oldest first, no user holding more than `max_user_share` of either
        (no cap while only one user has ever given feedback). Rows another claim is taking
        at this moment are skipped, never taken twice."""
        with self.db.transaction() as cur:
            stamp = now()
            claimed = {}
            if self._feedback_users(cur) <= 1:
                max_user_share = 1.0
            for table in FEEDBACK_TABLES:
                pending = cur.rows(f"select id, user_id from {table} where used_by_version is "
                                   "null and claimed_by is null order by id")
                ids = [row["id"] for row in fair_pick(pending, lambda row: row["user_id"], limit,
                                                      max_user_share)]
                if ids:  # lock the picked rows; a row another claim holds stays for later
                    ids = [row["id"] for row in cur.rows(
                        f"select id from {table} where id in ({marks(ids)}) and claimed_by is "
                        "null and used_by_version is null order by id"
                        + cur.dialect.skip_locked, ids)]
                if ids:
                    cur.run(f"update {table} set claimed_by = ?, claimed_at = ? "
                            f"where id in ({marks(ids)})", [round_id, stamp, *ids])
                claimed[table] = ids
        return claimed

    def release_claims(self, round_id: str | None = None) -> int:
        """Give claimed-but-unused feedback back to the pending pool (all rounds if None)."""
        where = "claimed_by is not null and used_by_version is null"
        params: list = []
        if round_id is not None:
            where += " and claimed_by = ?"
            params.append(round_id)
        with self.db.transaction() as cur:
            return sum(cur.run(f"update {table} set claimed_by = null, claimed_at = null "
                               f"where {where}", params) for table in FEEDBACK_TABLES)

    def votes(self, *, pair_id: str | None = None, ids: list[int] | None = None,
              choice: str | None = None) -> list[dict]:
        """Votes, oldest first: all, or those of one pair, with these ids, or this choice."""
        return self._feedback("votes", pair_id=pair_id, ids=ids, choice=choice)

    def ratings(self, *, pair_id: str | None = None, ids: list[int] | None = None
                ) -> list[dict]:
        """Ratings, oldest first: all, or those of one pair, or with these ids."""
        return self._feedback("ratings", pair_id=pair_id, ids=ids)

    def corrections(self, *, ids: list[int] | None = None) -> list[dict]:
        """Corrections, oldest first: all, or those with these ids."""
        return self._feedback("corrections", ids=ids)

    def cache_correction_tokens(self, correction_id: int, token_ids: list[int]) -> None:
        """The correction's token ids under the chat template (the learner encodes them)."""
        with self.db.transaction() as cur:
            cur.run("update corrections set token_ids = ? where id = ?",
                    (json.dumps(token_ids), correction_id))

    def feedback_by_id(self, table: str, ids: list[int]) -> list[dict]:
        """The votes, ratings or corrections with these ids, oldest first."""
        return self._feedback(table, ids=ids)

    def used_feedback(self, table: str) -> list[dict]:
        """Feedback of one kind some finished round has used (judged or trained on), oldest
        first."""
        return self._feedback(table, used=True)

    def pending_feedback(self, table: str) -> list[dict]:
        """Feedback of one kind no finished round has used yet, oldest first."""
        return self._feedback(table, used=False)

    def _feedback(self, table: str, *, pair_id: str | None = None,
                  ids: list[int] | None = None, choice: str | None = None,
                  used: bool | None = None) -> list[dict]:
        assert table in FEEDBACK_TABLES
        where, params = [], []
        if pair_id is not None:
            where.append("pair_id = ?")
            params.append(pair_id)
        if ids is not None:
            if not ids:
                return []
            where.append(f"id in ({marks(ids)})")
            params += ids
        if choice is not None:
            where.append("choice = ?")
            params.append(choice)
        if used is not None:
            where.append("used_by_version is " + ("not null" if used else "null"))
        rows = self.db.query(f"select * from {table} where {' and '.join(where) or 'true'} "
                             "order by id", params)
        return [json_columns(row, *JSON_COLUMNS.get(table, ())) for row in rows]

    def cache_ref_logprobs(self, reply_id: int, logprobs: list[float]) -> None:
        with self.db.transaction() as cur:
            cur.run("update replies set ref_token_logprobs = ? where id = ?",
                    (json.dumps(logprobs), reply_id))

    # --- rounds ------------------------------------------------------------------------

    def finish_round(self, round_id: str, adapter: dict, step: dict,
                     files: dict[str, bytes] | None = None,
                     preview_parent: int | None = None) -> str:
        """Register a published adapter (and, given `files`, keep its files), use the round's
        feedback, and log the step: one commit.

        `adapter["status"]` is `live` (promote: the previous live one is retired) or
        `rejected`. A promotion only happens if the live version is still the adapter's parent;
        if someone rolled back meanwhile, the candidate is stored as rejected instead. Either
        way the round's claimed feedback is now used by this version. Returns the status.
        `preview_parent`: the adapter's parent is this round's preview, and the version the
        round started from is this one: if the adapter is not promoted and the preview is
        still live, the preview is retired and that version is live again (the round's
        outcome stands, not its first step's).
        """
        with self.db.transaction() as cur:
            cur.lock_registry()
            stamp = now()
            adapter = self._register(cur, adapter, files, stamp)
            if adapter["status"] != AdapterStatus.LIVE:
                step = {**step, "status": RoundOutcome.REJECTED}
                if preview_parent is not None:
                    self._withdraw(cur, adapter["parent_version"], preview_parent,
                                   f"withdrawn: its round's v{adapter['version']} was rejected",
                                   stamp)
            for table in FEEDBACK_TABLES:
                cur.run(f"update {table} set used_by_version = ?, used_at = ? "
                        "where claimed_by = ? and used_by_version is null",
                        (adapter["version"], stamp, round_id))
            cur.insert("learner_steps", {**step, "round_id": round_id, "created_at": stamp})
        return adapter["status"]

    def log_failed_round(self, round_id: str, step: dict) -> None:
        with self.db.transaction() as cur:
            cur.insert("learner_steps", {**step, "round_id": round_id, "status": "failed",
                                         "created_at": now()})

    def learner_steps(self, limit: int = 1000) -> list[dict]:
        return self.db.query("select * from learner_steps order by id desc limit ?", (limit,))[::-1]

    # --- learner process status --------------------------------------------------------

    def take_learner_lock(self, wait_s: float = 10.0) -> bool:
        """Become this database's one learner (held until close or exit); False if another
        learner holds the lock."""
        return self.db.learner_lock(wait_s)

    def keep_learner_lock(self) -> bool:
        """Still this database's one learner (the lock taken again after a PostgreSQL restart)?
        False if another learner took over; raises while the database cannot be reached."""
        return self.db.keep_learner_lock()

    def set_learner_status(self, pid: int, state: LearnerState,
                           last_error: str | None = None) -> None:
        stamp = now()
        row = {"id": 1, "pid": pid, "state": state, "heartbeat_at": stamp}
        if state == LearnerState.STARTING:
            row["started_at"] = stamp
            row["last_error"] = None
        if last_error is not None:
            row["last_error"] = last_error
        updates = ", ".join(f"{column} = excluded.{column}" for column in row if column != "id")
        with self.db.transaction() as cur:
            cur.run(f"insert into learner_status ({', '.join(row)}) values ({marks(row)}) "
                    f"on conflict (id) do update set {updates}", list(row.values()))

    def learner_status(self) -> dict | None:
        return self.db.one("select * from learner_status where id = 1")
