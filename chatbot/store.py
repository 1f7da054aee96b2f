"""The store: conversations, pairs of replies, votes, ratings, adapters, learner steps.

The verbs every process calls, over SQLite (one file in WAL mode, the default) or PostgreSQL
(several front-ends and a learner on other hosts). The chat's verbs are here; `Store` inherits
the learner's (claims, rounds, learner steps and status: chatbot/learner_store.py), the adapter
registry's (chatbot/registry.py) and people's (keys, users, forgetting: chatbot/user_store.py);
chatbot/db.py holds the connections and the dialects, chatbot/migrations.py the schema. These
modules are the only code that speaks SQL: everyone else names what they want
(`store.votes(choice="both_bad")`), never a query.

Every write is one short transaction, and nothing holds a transaction while a model runs.
On SQLite each is `BEGIN IMMEDIATE`, so writers take turns (busy timeout); on PostgreSQL the
verbs lock the rows they check (`select ... for update`), so two front-ends cannot both vote
on one pair, and two claims never take the same vote (`for update skip locked`).

Feedback (votes and ratings) moves pending -> claimed by a learner round -> used by the
adapter version that round published or rejected. A claim is only a mark; a learner that
dies leaves claims behind, which `release_claims` clears on its next start (one learner per
database: `take_learner_lock`).

A pair has two replies (A, B) and status open -> voted, or open -> corrected when the person
rewrote a reply instead of voting (or discarded when regenerated). A correction (a person's
rewrite of the latest reply, chatbot/store.py `record_correction`) is feedback like a vote:
pending -> claimed -> used, one per pair, and the conversation goes on from its text. The
OpenAI-compatible API's `n=1` stores a "pair" with reply A alone and status `single`: it can
be rated (thumbs on A) but not voted on. API keys are stored as sha256 hashes only.

On PostgreSQL the adapter registry also keeps each published adapter's files
(`adapter_files`), so a front-end on another host needs no shared folder: it fetches them and
checks them against the manifest hashes before loading (chatbot/adapters.py).

Keys, the users list and forgetting a user are chatbot/user_store.py's.

Left out: full-text search.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from chatbot.db import Cursor, Database, connect, json_columns, now
from chatbot.errors import Conflict, InvalidInput, NotFound
from chatbot.learner_store import LearnerVerbs
from chatbot.user_store import UserVerbs

CHOICES = ("A", "B", "tie", "both_bad")
SIDES = ("A", "B")
THUMBS = ("up", "down")


def _check_choice(choice: str) -> None:
    if choice not in CHOICES:
        raise InvalidInput(f"choice must be one of {', '.join(CHOICES)}; got {choice!r}")


class Store(LearnerVerbs, UserVerbs):
    """Small verbs named after the domain, each atomic: the chat's here, the others in the
    classes it inherits."""

    def __init__(self, target: Path | str):
        """`target`: a SQLite file path (or `sqlite:///path`) or a `postgresql://` URL."""
        self.db: Database = connect(target)
        self.path = self.db.path  # the SQLite file; None on PostgreSQL

    @property
    def keeps_adapter_files(self) -> bool:
        """True when published adapter files travel through the database (PostgreSQL)."""
        return self.db.dialect.name == "postgresql"

    def close(self) -> None:
        self.db.close()

    def _owned_pair(self, cur: Cursor, user_id: str | None, pair_id: str, lock: bool = False
                    ) -> dict:
        """The pairs row, or NotFound if there is none or another user owns it (another
        user's pair looks like no pair at all). `user_id=None` skips the ownership check.
        `lock`: hold the row for the rest of the transaction."""
        row = cur.one("select * from pairs where id = ?" + (cur.dialect.for_update if lock
                                                            else ""), (pair_id,))
        if row is None or (user_id is not None and row["user_id"] != user_id):
            raise NotFound(f"no pair {pair_id!r}")
        return row

    def _owned_conversation(self, cur: Cursor, user_id: str, conversation_id: str,
                            lock: bool = False) -> dict:
        row = cur.one("select * from conversations where id = ? and user_id = ?"
                      + (cur.dialect.for_update if lock else ""), (conversation_id, user_id))
        if row is None:
            raise NotFound(f"no conversation {conversation_id!r}")
        return row

    # --- conversations -----------------------------------------------------------------

    def conversation(self, user_id: str, conversation_id: str) -> dict:
        with self.db.read() as cur:
            return self._owned_conversation(cur, user_id, conversation_id)

    def conversations(self, user_id: str, limit: int = 100) -> list[dict]:
        return self.db.query(
            "select * from conversations where user_id = ? order by updated_at desc limit ?",
            (user_id, limit))

    def messages(self, conversation_id: str) -> list[dict]:
        return self.db.query("select * from messages where conversation_id = ? order by position",
                          (conversation_id,))

    def open_pair(self, conversation_id: str) -> dict | None:
        """The pair awaiting a vote at the end of this conversation, if any."""
        with self.db.read() as cur:
            return self._open_pair(cur, conversation_id)

    @staticmethod
    def _open_pair(cur: Cursor, conversation_id: str) -> dict | None:
        return cur.one("select * from pairs where conversation_id = ? and status = 'open' "
                       "order by created_at desc limit 1", (conversation_id,))

    def reply_endings(self, conversation_id: str) -> dict[int, dict]:
        """How each assistant message that came from a stored reply ended: message id ->
        {finish_reason, n_tokens}. The reply is the side record_vote continued with (B on a
        B vote, else A; A of an n=1 reply)."""
        rows = self.db.query(
            "select m.id, r.finish_reason, r.n_tokens from messages m "
            "join replies r on r.pair_id = m.pair_id "
            "left join votes v on v.pair_id = m.pair_id "
            "left join corrections c on c.pair_id = m.pair_id "
            "where m.conversation_id = ? and m.role = 'assistant' and c.id is null "
            "and r.side = case when v.choice = 'B' then 'B' else 'A' end", (conversation_id,))
        return {r["id"]: {"finish_reason": r["finish_reason"], "n_tokens": r["n_tokens"]}
                for r in rows}

    def recent_prompts(self, user_id: str, limit: int = 3) -> list[str]:
        """The first user message of the user's most recently active conversations, distinct,
        newest first."""
        rows = self.db.query(
            "select m.content, max(c.updated_at) as last_at from conversations c "
            "join messages m on m.conversation_id = c.id "
            "where c.user_id = ? and m.role = 'user' and m.position = (select min(position) "
            "from messages where conversation_id = c.id and role = 'user') "
            "group by m.content order by last_at desc, max(m.id) desc limit ?",
            (user_id, limit))
        return [r["content"] for r in rows]

    def corrected_prompts(self, user_id: str, limit: int = 3) -> list[dict]:
        """The turns whose reply the user rewrote, newest edit first, distinct: each as
        `messages` (role and content of the conversation up to and including the turn's user
        message) and `correction` (the rewrite)."""
        found, seen = [], set()
        with self.db.read() as cur:
            places = cur.rows(
                "select c.text, p.conversation_id, m.position from corrections c "
                "join pairs p on p.id = c.pair_id join messages m on m.id = p.message_id "
                "where c.user_id = ? order by c.created_at desc, c.id desc", (user_id,))
            for place in places:
                if len(found) == limit:
                    break
                messages = cur.rows(
                    "select role, content from messages where conversation_id = ? and "
                    "position <= ? order by position", (place["conversation_id"],
                                                        place["position"]))
                key = tuple((m["role"], m["content"]) for m in messages)
                if key not in seen:
                    seen.add(key)
                    found.append({"messages": messages, "correction": place["text"]})
        return found

    def add_turn(self, user_id: str, conversation_id: str | None, message: str,
                 pair: dict, replies: list[dict]) -> tuple[str, str]:
        """Store a user message and the pair of replies to it; start a conversation if needed.

        `pair` holds the pairs columns the sampler knows (prompt tokens, settings, timings);
        `replies` the two replies columns, A first. Returns (conversation_id, pair_id).
        """
        with self.db.transaction() as cur:
            stamp = now()
            if not conversation_id:
                conversation_id = self._new_conversation(cur, user_id, message, stamp)
                position = 0
            else:
                self._owned_conversation(cur, user_id, conversation_id, lock=True)
                if self._open_pair(cur, conversation_id):
                    raise Conflict("vote on the last pair of replies before sending a new message")
                last = cur.value("select max(position) as last from messages "
                                 "where conversation_id = ?", (conversation_id,))
                position = 0 if last is None else last + 1
                cur.run("update conversations set updated_at = ? where id = ?",
                        (stamp, conversation_id))
            message_id = self._add_message(cur, conversation_id, position, "user", message,
                                           None, stamp)
            pair_id = self._insert_pair(cur, user_id, conversation_id, message_id, pair, replies)
        return conversation_id, pair_id

    def add_conversation_turn(self, user_id: str, history: list[dict], message: str,
                              pair: dict, replies: list[dict]) -> tuple[str, str]:
        """Start a conversation with `history` (earlier system/user/assistant messages), the
        user `message`, and its replies: two make an open pair; one makes a `single` pair whose
        reply is already the conversation's next message. Returns (conversation_id, pair_id).
        """
        with self.db.transaction() as cur:
            stamp = now()
            conversation_id = self._new_conversation(cur, user_id, message, stamp)
            for position, turn in enumerate(history):
                self._add_message(cur, conversation_id, position, turn["role"], turn["content"],
                                  None, stamp)
            message_id = self._add_message(cur, conversation_id, len(history), "user", message,
                                           None, stamp)
            status = "open" if len(replies) == 2 else "single"
            pair_id = self._insert_pair(cur, user_id, conversation_id, message_id, pair, replies,
                                        status)
            if status == "single":
                self._add_message(cur, conversation_id, len(history) + 1, "assistant",
                                  replies[0]["text"], pair_id, stamp)
        return conversation_id, pair_id

    def add_regenerated_pair(self, user_id: str, old_pair_id: str, pair: dict,
                             replies: list[dict]) -> str:
        """Replace an open pair by a new one for the same user message."""
        with self.db.transaction() as cur:
            old = self._owned_pair(cur, user_id, old_pair_id, lock=True)
            if old["status"] != "open":
                raise Conflict("only the latest pair, before it is voted on, can be regenerated")
            cur.run("update pairs set status = 'discarded' where id = ?", (old_pair_id,))
            return self._insert_pair(cur, user_id, old["conversation_id"], old["message_id"],
                                     pair, replies)

    @staticmethod
    def _new_conversation(cur: Cursor, user_id: str, message: str, stamp: str) -> str:
        conversation_id = uuid.uuid4().hex
        cur.run("insert into users (id, created_at) values (?, ?) on conflict (id) do nothing",
                (user_id, stamp))
        cur.insert("conversations", {"id": conversation_id, "user_id": user_id,
                                     "title": message.strip()[:80], "created_at": stamp,
                                     "updated_at": stamp})
        return conversation_id

    @staticmethod
    def _add_message(cur: Cursor, conversation_id: str, position: int, role: str,
                     content: str, pair_id: str | None, stamp: str) -> int:
        return cur.insert("messages", {"conversation_id": conversation_id, "position": position,
                                       "role": role, "content": content, "pair_id": pair_id,
                                       "created_at": stamp}, returning="id")

    @staticmethod
    def _insert_pair(cur: Cursor, user_id: str, conversation_id: str, message_id: int,
                     pair: dict, replies: list[dict], status: str = "open") -> str:
        assert len(replies) == (1 if status == "single" else 2)
        pair_id = uuid.uuid4().hex
        cur.insert("pairs", {**pair, "id": pair_id, "conversation_id": conversation_id,
                             "message_id": message_id, "user_id": user_id, "status": status,
                             "prompt_token_ids": json.dumps(pair["prompt_token_ids"]),
                             "created_at": now()})
        for side, reply in zip(SIDES, replies):
            cur.insert("replies", {**reply, "pair_id": pair_id, "side": side,
                                   "token_ids": json.dumps(reply["token_ids"]),
                                   "token_logprobs": json.dumps(reply["token_logprobs"])})
        return pair_id

    # --- pairs, votes, ratings ----------------------------------------------------------

    def pair(self, user_id: str | None, pair_id: str) -> dict:
        """A pair with its two replies; `user_id=None` skips the ownership check (learner)."""
        with self.db.read() as cur:
            row = self._owned_pair(cur, user_id, pair_id)
            row["replies"] = [
                json_columns(r, "token_ids", "token_logprobs", "ref_token_logprobs")
                for r in cur.rows("select * from replies where pair_id = ? order by side",
                                  (pair_id,))]
        return json_columns(row, "prompt_token_ids")

    def record_vote(self, user_id: str, pair_id: str, choice: str) -> dict:
        """Store the vote and continue the conversation from the chosen reply.

        The continuation is reply A on `A` and `tie`, B on `B`, and A on `both_bad` (the
        conversation must go on from something; the vote still says neither was good).
        """
        _check_choice(choice)
        with self.db.transaction() as cur:
            return self._vote(cur, user_id, pair_id, choice)

    def _vote(self, cur: Cursor, user_id: str, pair_id: str, choice: str) -> dict:
        pair = self._owned_pair(cur, user_id, pair_id, lock=True)
        if pair["status"] == "single":
            raise Conflict("this reply was served alone (n=1), so there is nothing to "
                           "compare: rate it with a thumb instead")
        if cur.one("select id from votes where pair_id = ?", (pair_id,)):
            raise Conflict("this pair already has a vote")
        if pair["status"] == "corrected":
            raise Conflict("you rewrote a reply of this pair: your edit is its feedback, and "
                           "the conversation goes on from it")
        if pair["status"] != "open":
            raise Conflict("this pair was replaced by a regenerated one")
        stamp = now()
        vote_id = cur.insert("votes", {"pair_id": pair_id, "user_id": user_id,
                                       "choice": choice, "created_at": stamp}, returning="id")
        side = "B" if choice == "B" else "A"
        text = cur.value("select text from replies where pair_id = ? and side = ?",
                         (pair_id, side))
        self._continue_with(cur, pair, text, stamp)
        cur.run("update pairs set status = 'voted' where id = ?", (pair_id,))
        return {"vote_id": vote_id, "pair_id": pair_id, "choice": choice, "continued_with": side}

    def _continue_with(self, cur: Cursor, pair: dict, text: str, stamp: str) -> None:
        """Add the assistant message that answers the pair's user message."""
        position = cur.value("select position from messages where id = ?", (pair["message_id"],))
        self._add_message(cur, pair["conversation_id"], position + 1, "assistant", text,
                          pair["id"], stamp)
        cur.run("update conversations set updated_at = ? where id = ?",
                (stamp, pair["conversation_id"]))

    def record_correction(self, user_id: str, pair_id: str, text: str, side: str | None = None,
                          choice: str | None = None) -> dict:
        """Store a person's rewrite of a reply of the pair (a demonstration: better than every
        reply sampled for it) and continue the conversation from the rewritten text.

        `side`: the reply the edit started from (A or B; None if not known). `choice`: a vote
        cast in the same request, stored first (the edit then replaces the reply the vote
        continued with). On an open pair the edit is the turn's feedback and closes it (no
        vote can follow); after a vote, or on a reply served alone (n=1), it replaces the
        reply the conversation went on from. Only a conversation's latest reply can be
        rewritten. A second correction of the same pair replaces the first until a learner
        round has taken it; after that it cannot change (Conflict). `text` is checked by the
        caller (ChatService.correct).
        """
        if side is not None and side not in SIDES:
            raise InvalidInput(f"side must be A or B; got {side!r}")
        if choice is not None:
            _check_choice(choice)
        with self.db.transaction() as cur:
            vote = self._vote(cur, user_id, pair_id, choice) if choice is not None else None
            pair = self._owned_pair(cur, user_id, pair_id, lock=True)
            if pair["status"] == "discarded":
                raise Conflict("this pair was replaced by a regenerated one")
            if pair["status"] == "single" and side not in (None, "A"):
                raise InvalidInput("this reply was served alone (n=1): it is side A; there is "
                                   f"no side {side}")
            old = cur.one("select * from corrections where pair_id = ?" + cur.dialect.for_update,
                          (pair_id,))
            if old and old["claimed_by"] is not None:
                raise Conflict("your earlier edit of this reply was already used for learning "
                               "and cannot change")
            stamp = now()
            if pair["status"] == "open":  # the edit answers the turn
                self._continue_with(cur, pair, text, stamp)
                cur.run("update pairs set status = 'corrected' where id = ?", (pair_id,))
            else:
                self._rewrite_last_reply(cur, pair, text, stamp)
            row = {"side": side, "text": text, "token_ids": None, "created_at": stamp}
            if old:
                cur.run("update corrections set side = ?, text = ?, token_ids = ?, "
                        "created_at = ? where id = ?", [*row.values(), old["id"]])
                correction_id = old["id"]
            else:
                correction_id = cur.insert("corrections", {"pair_id": pair_id,
                                                           "user_id": user_id, **row},
                                           returning="id")
        return {"correction_id": correction_id, "pair_id": pair_id, "replaced": old is not None,
                **({"vote_id": vote["vote_id"], "choice": choice} if vote else {})}

    @staticmethod
    def _rewrite_last_reply(cur: Cursor, pair: dict, text: str, stamp: str) -> None:
        """Replace the assistant message that answered the pair, if it is the conversation's
        last message (a later turn was written after the old text)."""
        message = cur.one("select id, position from messages where pair_id = ? and "
                          "role = 'assistant'", (pair["id"],))
        last = cur.value("select max(position) as last from messages where conversation_id = ?",
                         (pair["conversation_id"],))
        if message is None or message["position"] != last:
            raise Conflict("only the latest reply of a conversation can be edited")
        cur.run("update messages set content = ? where id = ?", (text, message["id"]))
        cur.run("update conversations set updated_at = ? where id = ?",
                (stamp, pair["conversation_id"]))

    def correction(self, pair_id: str) -> dict | None:
        """The pair's correction, if it has one."""
        with self.db.read() as cur:
            row = cur.one("select * from corrections where pair_id = ?", (pair_id,))
        return json_columns(row, "token_ids") if row else None

    def record_rating(self, user_id: str, pair_id: str, side: str, thumb: str) -> dict:
        """Thumbs up/down on one reply. A rating not yet used by the learner can be changed."""
        if side not in SIDES:
            raise InvalidInput(f"side must be A or B; got {side!r}")
        if thumb not in THUMBS:
            raise InvalidInput(f"thumb must be up or down; got {thumb!r}")
        with self.db.transaction() as cur:
            self._owned_pair(cur, user_id, pair_id, lock=True)
            if not cur.one("select id from replies where pair_id = ? and side = ?",
                           (pair_id, side)):
                raise InvalidInput(f"this reply was served alone (n=1): it is side A; there is "
                                   f"no side {side}")
            old = cur.one("select * from ratings where pair_id = ? and side = ? and user_id = ?"
                          + cur.dialect.for_update, (pair_id, side, user_id))
            if old and old["claimed_by"] is not None and old["thumb"] != thumb:
                raise Conflict("this rating was already used for learning and cannot change")
            if old:
                cur.run("update ratings set thumb = ?, created_at = ? where id = ?",
                        (thumb, now(), old["id"]))
                return {"rating_id": old["id"], "changed": old["thumb"] != thumb}
            rating_id = cur.insert("ratings", {"pair_id": pair_id, "side": side,
                                               "user_id": user_id, "thumb": thumb,
                                               "created_at": now()}, returning="id")
        return {"rating_id": rating_id, "changed": True}

    def preference_rows(self) -> list[dict]:
        """Pairs with an A or B vote: the choice, the turn's place and both reply texts."""
        return self.db.query(
            "select v.choice, p.conversation_id, m.position, "
            "ra.text as a_text, rb.text as b_text "
            "from votes v join pairs p on p.id = v.pair_id "
            "join messages m on m.id = p.message_id "
            "join replies ra on ra.pair_id = p.id and ra.side = 'A' "
            "join replies rb on rb.pair_id = p.id and rb.side = 'B' "
            "where v.choice in ('A', 'B') order by v.id")

    def correction_rows(self) -> list[dict]:
        """Every correction with the turn's place and the texts of the pair's sampled replies
        (b_text is None for a reply served alone)."""
        return self.db.query(
            "select c.text, c.side, p.conversation_id, m.position, "
            "ra.text as a_text, rb.text as b_text "
            "from corrections c join pairs p on p.id = c.pair_id "
            "join messages m on m.id = p.message_id "
            "join replies ra on ra.pair_id = p.id and ra.side = 'A' "
            "left join replies rb on rb.pair_id = p.id and rb.side = 'B' order by c.id")
