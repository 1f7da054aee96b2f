"""Copy a deployment - its database and its adapter versions - into an empty database: a
backup (a SQLite file in a new folder, the adapters beside it), its restore, or the move from
SQLite to PostgreSQL when a team outgrows one machine.

    python app.py backup --out backups/2026-12-03/duet.db     # while it serves
    python app.py --data-dir fresh restore --from backups/2026-12-03/duet.db
    python app.py migrate --to postgresql://duet@db.example/duet

The rows come from one commit of the source (`Database.snapshot`), so a server and a learner
may keep running while it copies; the copy then counts each table's rows in the target
against the source's. The adapter files go where the target keeps them: its adapters folder
(SQLite), or its `adapter_files` table (PostgreSQL), where front-ends on other hosts fetch
them. Each version's files are checked against its manifest's hashes before they are written;
a version whose files are gone or fail the check is copied without a folder (its path empty),
like a version the learner deleted, so the copy never names files it does not hold.

Left out: incremental backups, merging into a database that has rows, the learner's status
(a process of the source's), checking files between two PostgreSQL databases (`pg_dump` is
the tool there; this copy carries their files as they are).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from chatbot import adapters
from chatbot.db import POSTGRES, Database, is_postgres_url
from chatbot.errors import AdapterError, Conflict, DuetError, InvalidInput
from chatbot.store import Store

# The store's tables in an order their references allow (a row after the rows it names), and
# those whose `id` the database numbers. learner_status is left out: it describes a process of
# the database copied from.
TABLES = ("users", "conversations", "messages", "pairs", "replies", "votes", "ratings",
          "corrections", "adapters", "adapter_files", "learner_steps", "api_keys")
NUMBERED = ("messages", "replies", "votes", "ratings", "corrections", "learner_steps",
            "api_keys")
BATCH_ROWS = 500  # rows read and written at a time


def copy_tables(source: Database, target: Database, tables: tuple[str, ...] = TABLES
                ) -> dict[str, int]:
    """Copy every row of `tables` from `source` (as of one commit: `snapshot`) into `target`,
    ids kept, in one transaction of the target's. The target must be migrated and hold none
    of these rows (ValueError otherwise, and nothing is written). Returns the rows per table.
    On PostgreSQL the id counters then continue after the copied ids."""
    counts = {}
    with source.snapshot() as read, target.transaction() as write:
        full = [t for t in tables if write.value(f"select count(*) as n from {t}")]
        if full:
            raise ValueError(f"the target database is not empty ({', '.join(full)} have rows)")
        for table in tables:
            key = "version, name" if table == "adapter_files" else (
                "version" if table == "adapters" else "id")
            counts[table] = 0
            for rows in read.batches(f"select * from {table} order by {key}", (), BATCH_ROWS):
                for row in rows:
                    write.insert(table, row)
                counts[table] += len(rows)
        if target.dialect is POSTGRES:
            for table in NUMBERED:
                write.value(f"select setval(pg_get_serial_sequence('{table}', 'id'), "
                            f"coalesce(max(id), 0) + 1, false) from {table}")
    return counts


def copy_deployment(source: Store, adapters_dir: Path, target: str,
                    target_adapters_dir: Path | None = None, new_file: bool = True) -> dict:
    """Copy `source` (its adapters in `adapters_dir`) into the empty database `target` (a
    SQLite path or a postgresql:// URL; a SQLite target's adapters go to
    `target_adapters_dir`, by default the `adapters` folder beside its file). Returns the
    rows copied per table, the versions whose files were copied, and those copied without
    them. `new_file`: a SQLite target must not exist yet (a backup never writes into a file
    it did not make); a restore may go into an empty deployment's file."""
    to_postgres = is_postgres_url(target)
    if not to_postgres:
        path = Path(target.removeprefix("sqlite:///"))
        if source.path is not None and path.resolve() == Path(source.path).resolve():
            raise InvalidInput("the copy must go to another database than the one it copies")
        if new_file and path.exists() and path.stat().st_size:
            raise Conflict(f"{path} exists: a copy goes into a new file")
    elif source.db.target == target:
        raise InvalidInput("the copy must go to another database than the one it copies")
    copy = Store(target)
    try:
        # SQLite keeps its adapters as folders, not in the database (chatbot/store.py).
        tables = TABLES if to_postgres else tuple(t for t in TABLES if t != "adapter_files")
        try:
            rows = copy_tables(source.db, copy.db, tables)
        except ValueError as exc:
            raise Conflict(str(exc)) from None
        counted = copy.db.row_counts(tables)
        if counted != rows:
            raise DuetError(f"the copy holds {counted} rows where {rows} were copied")
        with_files, without = [], []
        for row in copy.adapters():
            if not row["path"]:
                continue
            if source.keeps_adapter_files and copy.keeps_adapter_files:
                with_files.append(row["version"])  # copied with the rows
                continue
            files = _checked_files(source, adapters_dir, row)
            if files is None:
                copy.set_adapter_path(row["version"], None)
                without.append(row["version"])
            elif copy.keeps_adapter_files:
                copy.keep_adapter_files(row["version"], files)
                with_files.append(row["version"])
            else:
                adapters.install(target_adapters_dir or Path(copy.path).parent / "adapters",
                                 row["path"], files)
                with_files.append(row["version"])
        return {"rows": rows, "versions_with_files": with_files,
                "versions_without_files": without}
    finally:
        copy.close()


def _checked_files(source: Store, adapters_dir: Path, row: dict) -> dict[str, bytes] | None:
    """A version's files from the source's folder (or, failing that, its database), checked
    against the version's manifest; None if there are none that pass."""
    with tempfile.TemporaryDirectory() as scratch:
        try:
            adapters.verified_copy(
                scratch, row, base_model=row["base_model"],
                fetch=lambda version: _folder_or_database(source, adapters_dir, row))
        except AdapterError:
            return None
        return adapters.folder_files(Path(scratch) / row["path"])


def _folder_or_database(source: Store, adapters_dir: Path, row: dict) -> dict[str, bytes]:
    folder = Path(adapters_dir) / row["path"]
    if folder.is_dir():
        return adapters.folder_files(folder)
    return source.adapter_files(row["version"])
