"""The adapter registry: which versions exist, which one is live, and the moves between them.

A version is registered once its folder is published (chatbot/adapters.py): `live` (the
previous live one retired) only if the live version is still its parent, else `rejected`, so a
rollback that came first always wins. A round's preview (learner/rounds.py) is a version with
`preview_of` set to its round: live while the round goes on, withdrawn (its parent live again)
if the round fails or is rejected, and skipped by `round_origin`, which names the version a
whole round started from (rollback's and forget's target). `old_folders` is the retention
rule. Every move takes the registry lock (`Cursor.lock_registry`: a table lock on PostgreSQL;
SQLite's one writer already serializes them).

On PostgreSQL the registry also keeps each version's files (`adapter_files`) for front-ends
on other hosts; SQLite keeps the table empty.

`Store` (chatbot/store.py) inherits these verbs, and the learner's (chatbot/learner_store.py)
use `_register` and `_withdraw` inside the transaction that finishes a round.

Left out: versions of several base models side by side.
"""

from __future__ import annotations

import json

from chatbot.db import Cursor, Database, json_columns, now
from chatbot.errors import NotFound
from chatbot.states import AdapterStatus


class RegistryVerbs:
    db: Database

    def live_adapter(self) -> dict | None:
        row = self.db.one("select * from adapters where status = ?", (AdapterStatus.LIVE,))
        return json_columns(row, "metrics") if row else None

    def live_adapter_version(self) -> int:
        row = self.live_adapter()
        return row["version"] if row else 0

    def adapter(self, version: int) -> dict | None:
        row = self.db.one("select * from adapters where version = ?", (version,))
        return json_columns(row, "metrics") if row else None

    def adapters(self) -> list[dict]:
        return [json_columns(r, "metrics")
                for r in self.db.query("select * from adapters order by version")]

    def round_origin(self, version: int, cur: Cursor | None = None) -> int:
        """The version the round that published `version` started from (0: the base model):
        its parent, or its preview's parent when the round published a preview first
        (learner/rounds.py). `cur`: read inside that transaction."""
        if cur is None:
            with self.db.read() as cur:
                return self.round_origin(version, cur)

        def adapter(v: int) -> dict | None:
            row = cur.one("select * from adapters where version = ?", (v,))
            return json_columns(row, "metrics") if row else None

        row = adapter(version)
        if row is None:
            raise NotFound(f"no adapter version {version}")
        parent = row["parent_version"] or 0
        above = adapter(parent) if parent else None
        if above and above["preview_of"]:  # the round's first step
            return above["parent_version"] or 0
        return parent

    def next_adapter_version(self) -> int:
        return (self.db.one("select max(version) as v from adapters")["v"] or 0) + 1

    @staticmethod
    def _live_version(cur: Cursor) -> int:
        """The live version inside a transaction (0: the base model)."""
        return cur.value("select version from adapters where status = ?",
                         (AdapterStatus.LIVE,)) or 0

    @staticmethod
    def _register(cur: Cursor, adapter: dict, files: dict[str, bytes] | None,
                  stamp: str) -> dict:
        """Insert a published adapter (and its files); `live` only if the live version is still
        its parent (else rejected: someone rolled back meanwhile), retiring that one. Returns
        the row as inserted."""
        adapter = dict(adapter)
        if adapter["status"] == AdapterStatus.LIVE and \
                RegistryVerbs._live_version(cur) != adapter["parent_version"]:
            adapter["status"] = AdapterStatus.REJECTED
            adapter["reason"] = "the live version changed while this candidate trained"
        if adapter["status"] == AdapterStatus.LIVE:
            cur.run("update adapters set status = ?, updated_at = ? where status = ?",
                    (AdapterStatus.RETIRED, stamp, AdapterStatus.LIVE))
        cur.insert("adapters", {**adapter, "metrics": json.dumps(adapter.get("metrics", {})),
                                "created_at": stamp, "updated_at": stamp})
        for name, data in (files or {}).items():
            cur.insert("adapter_files", {"version": adapter["version"], "name": name,
                                         "data": data})
        return adapter

    @staticmethod
    def _withdraw(cur: Cursor, preview: int, parent: int, reason: str, stamp: str) -> bool:
        """If `preview` is live: retire it and make `parent` (0: the base model) live again."""
        if RegistryVerbs._live_version(cur) != preview:
            return False
        cur.run("update adapters set status = ?, reason = ?, updated_at = ? where version = ?",
                (AdapterStatus.RETIRED, reason, stamp, preview))
        if parent:
            cur.run("update adapters set status = ?, updated_at = ? where version = ?",
                    (AdapterStatus.LIVE, stamp, parent))
        return True

    def publish_preview(self, adapter: dict, files: dict[str, bytes] | None = None) -> str:
        """Register a round's preview (its weights after the first optimizer step; see
        learner/rounds.py; `adapter["preview_of"]` names the round) while the round goes on:
        live if its parent still is, else rejected. It uses no feedback: the round's own
        version does, when it finishes. Returns the status."""
        with self.db.transaction() as cur:
            cur.lock_registry()
            return self._register(cur, adapter, files, now())["status"]

    def withdraw_preview(self, preview: int, parent: int, reason: str) -> bool:
        """A preview whose round failed: if it is live, put its parent back. True if it was."""
        with self.db.transaction() as cur:
            cur.lock_registry()
            return self._withdraw(cur, preview, parent, reason, now())

    def withdraw_unfinished_preview(self) -> int | None:
        """At the learner's start and before each round: a live preview whose round did not
        finish (the learner died during it, or the round failed and so did the withdrawal)
        goes, and its parent is live again, so the round's votes, still pending, train from
        where that round started. Returns the withdrawn version."""
        with self.db.transaction() as cur:
            cur.lock_registry()
            row = cur.one("select version, parent_version, preview_of from adapters "
                          "where status = ?", (AdapterStatus.LIVE,))
            round_id = row["preview_of"] if row else None
            if not round_id or cur.one("select id from learner_steps where round_id = ? and "
                                       "status != ?", (round_id, "failed")):
                return None
            self._withdraw(cur, row["version"], row["parent_version"] or 0,
                           "its round never finished (the learner stopped)", now())
            return row["version"]

    def keep_adapter_files(self, version: int, files: dict[str, bytes]) -> None:
        """Keep a registered version's files in the database (PostgreSQL; see
        chatbot/backup.py for the copy that fills them in)."""
        with self.db.transaction() as cur:
            cur.run("delete from adapter_files where version = ?", (version,))
            for name, data in files.items():
                cur.insert("adapter_files", {"version": version, "name": name, "data": data})

    def adapter_files(self, version: int) -> dict[str, bytes]:
        """The files kept for a version (name -> bytes); empty when none are kept (SQLite)."""
        return {row["name"]: bytes(row["data"]) for row in self.db.query(
            "select name, data from adapter_files where version = ? order by name", (version,))}

    def set_live(self, version: int) -> None:
        """Make `version` the live adapter (0 = the base model). Used by rollback."""
        with self.db.transaction() as cur:
            cur.lock_registry()
            if version and not cur.one("select version from adapters where version = ?",
                                       (version,)):
                raise NotFound(f"no adapter version {version}")
            self._set_live(cur, version, now())

    @staticmethod
    def _set_live(cur: Cursor, version: int, stamp: str) -> None:
        """Inside a registry transaction: retire the live version, make `version` live."""
        cur.run("update adapters set status = ?, updated_at = ? where status = ?",
                (AdapterStatus.RETIRED, stamp, AdapterStatus.LIVE))
        if version:
            cur.run("update adapters set status = ?, updated_at = ? where version = ?",
                    (AdapterStatus.LIVE, stamp, version))

    def set_adapter_path(self, version: int, path: str | None) -> None:
        """Record where a version's folder is; None: its folder is gone, and so are its kept
        files."""
        with self.db.transaction() as cur:
            cur.run("update adapters set path = ?, updated_at = ? where version = ?",
                    (path, now(), version))
            if path is None:
                cur.run("delete from adapter_files where version = ?", (version,))


    def old_folders(self, keep_versions: int) -> list[dict]:
        """The versions whose folders may go: all but the newest `keep_versions` rounds'
        versions and the live one. A preview's folder goes once it is no longer live (its
        round's version replaced it, or it was withdrawn)."""
        on_disk = [a for a in self.adapters() if a["path"]]
        rounds = [a for a in on_disk if not a["preview_of"]]
        keep = {a["version"] for a in rounds[-keep_versions:]}
        return [a for a in on_disk
                if a["version"] not in keep and a["status"] != AdapterStatus.LIVE]
