"""The store's schema as numbered migrations, the same on both databases.

Each is a function of a write cursor, run once, in order, inside the transaction that
records it (chatbot/db.py `Database.migrate`). Their DDL names the two types that differ as
`{id}` (an auto-numbered integer primary key) and `{blob}` (chatbot/db.py `Dialect.ddl`). A
new one goes at the end of MIGRATIONS; an applied one is never edited.

Left out: schema rollbacks.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chatbot.db import Cursor


def _ddl(cur: Cursor, *statements: str) -> None:
    for statement in statements:
        cur.run(cur.dialect.ddl(statement))


_FEEDBACK = "claimed_by text, claimed_at text, used_by_version integer, used_at text"


def m001_initial(cur: Cursor) -> None:
    _ddl(
        cur,
        "create table users (id text primary key, created_at text)",
        "create table conversations (id text primary key, user_id text references users(id), "
        "title text, created_at text, updated_at text)",
        "create index idx_conversations_user_id_updated_at on conversations "
        "(user_id, updated_at)",
        "create table messages (id {id}, conversation_id text references conversations(id), "
        "position integer, role text, content text, pair_id text, created_at text)",
        "create unique index idx_messages_conversation_id_position on messages "
        "(conversation_id, position)",
        "create table pairs (id text primary key, conversation_id text references "
        "conversations(id), message_id bigint references messages(id), user_id text, "
        "prompt_token_ids text, adapter_version integer, temperature double precision, "
        "top_p double precision, max_new_tokens integer, status text, "
        "seconds double precision, first_token_seconds double precision, created_at text)",
        "create index idx_pairs_conversation_id on pairs (conversation_id)",
        "create table replies (id {id}, pair_id text references pairs(id), side text, "
        "text text, token_ids text, token_logprobs text, behaviour_logprob double precision, "
        "adapter_version integer, finish_reason text, n_tokens integer, "
        "ref_token_logprobs text)",
        "create unique index idx_replies_pair_id_side on replies (pair_id, side)",
        "create table votes (id {id}, pair_id text references pairs(id), user_id text, "
        f"choice text, split text, created_at text, {_FEEDBACK})",
        "create unique index idx_votes_pair_id on votes (pair_id)",
        "create index idx_votes_used_by_version on votes (used_by_version)",
        "create table ratings (id {id}, pair_id text references pairs(id), side text, "
        f"user_id text, thumb text, created_at text, {_FEEDBACK})",
        "create unique index idx_ratings_pair_id_side_user_id on ratings "
        "(pair_id, side, user_id)",
        "create table adapters (version integer primary key, path text, "
        "parent_version integer, base_model text, sha256 text, status text, metrics text, "
        "reason text, created_at text, updated_at text)",
        "create table learner_steps (id {id}, round_id text, adapter_version integer, "
        "parent_version integer, objective text, status text, loss double precision, "
        "kl double precision, reward double precision, beta double precision, "
        "votes_used integer, new_votes integer, replayed_votes integer, "
        "skipped_steps integer, heldout_acc double precision, "
        "live_heldout_acc double precision, seconds double precision, note text, "
        "created_at text)",
        "create table learner_status (id {id}, pid integer, state text, last_error text, "
        "started_at text, heartbeat_at text)",
    )


def m002_judged_pairs(cur: Cursor) -> None:
    """How many new A/B votes each round scored the live adapter on (and, under --judge-new,
    the candidate)."""
    _ddl(cur, "alter table learner_steps add column judged_pairs integer")


def m003_api_keys(cur: Cursor) -> None:
    """Keys for the OpenAI-compatible API: only a hash of each key is kept."""
    _ddl(cur,
         "create table api_keys (id {id}, user_id text, key_sha256 text, hint text, "
         "created_at text)",
         "create unique index idx_api_keys_key_sha256 on api_keys (key_sha256)",
         "create index idx_api_keys_user_id on api_keys (user_id)")


def m004_adapter_files(cur: Cursor) -> None:
    """The files of each published adapter (PostgreSQL: front-ends on other hosts fetch them
    from here; SQLite keeps the table empty, the folder is on the same disk)."""
    _ddl(cur,
         "create table adapter_files (version integer references adapters(version), "
         "name text, data {blob}, primary key (version, name))")


def m005_corrections(cur: Cursor) -> None:
    """A person's rewrite of a reply (a demonstration): one per pair, tied to its user, with
    the side it started from (A or B; null when unknown), its text, its token ids under the
    chat template (filled by the learner when it first reads it), and the feedback columns:
    pending -> claimed -> used by a version, as votes and ratings."""
    _ddl(cur,
         "create table corrections (id {id}, pair_id text references pairs(id), "
         f"user_id text, side text, text text, token_ids text, created_at text, {_FEEDBACK})",
         "create unique index idx_corrections_pair_id on corrections (pair_id)",
         "create index idx_corrections_used_by_version on corrections (used_by_version)")


def m006_preview_of(cur: Cursor) -> None:
    """A round's preview (its weights after the first step, learner/rounds.py) names its round
    in a column of its own (it was a key of the metrics text), which the registry reads."""
    _ddl(cur, "alter table adapters add column preview_of text")
    for row in cur.rows("select * from adapters"):
        round_id = json.loads(row.get("metrics") or "{}").get("preview_of")
        if round_id:
            cur.run("update adapters set preview_of = ? where version = ?",
                    (round_id, row["version"]))


def m007_drop_votes_split(cur: Cursor) -> None:
    """votes.split was never written (a held-out split was tried and left to --judge-new)."""
    _ddl(cur, "alter table votes drop column split")


def m008_pair_candidates(cur: Cursor) -> None:
    """How many replies were sampled to choose a pair's two from (--pair-candidates); null
    for a pair that was sampled as it is."""
    _ddl(cur, "alter table pairs add column candidates integer")


def m009_reply_temperature(cur: Cursor) -> None:
    """The temperature each reply was drawn at (--explore-temperature draws one of a pair at
    another); null for a reply stored before: its pair's."""
    _ddl(cur, "alter table replies add column temperature double precision")


MIGRATIONS = [m001_initial, m002_judged_pairs, m003_api_keys, m004_adapter_files,
              m005_corrections, m006_preview_of, m007_drop_votes_split, m008_pair_candidates,
              m009_reply_temperature]
