"""Copying a deployment into an empty database (chatbot/backup.py): a backup to a SQLite file
from either database, the move from SQLite to PostgreSQL, refusals that write nothing, and the
command."""

from __future__ import annotations

import json

import pytest

import app
from chatbot import adapters
from chatbot.backup import TABLES, copy_deployment
from chatbot.errors import Conflict, InvalidInput
from chatbot.store import Store
from tests.test_forget import two_users
from tests.test_store import add_turn

COMPARED = [t for t in TABLES if t not in ("adapter_files", "adapters")]


def fake_adapter(adapters_dir, version):
    """A published folder with a manifest (its files need only match their hashes here)."""
    def save(folder):
        (folder / adapters.CONFIG).write_text(json.dumps({"r": 4, "version": version}))
        (folder / adapters.WEIGHTS).write_bytes(bytes([version]) * 64)

    return adapters.publish(adapters_dir, version, save, base_model="tiny",
                            parent_version=version - 1, metrics={})


def deployment(store, adapters_dir):
    """ann and bob's feedback (tests/test_forget.py), and the registry's v1 and v2 with
    folders; v2's weights are then damaged, so only v1's files are sound."""
    two_users(store)
    for version in (1, 2):
        folder, sha = fake_adapter(adapters_dir, version)
        store.db.execute("update adapters set sha256 = ?, base_model = ? where version = ?",
                         (sha, "tiny", version))
        if store.keeps_adapter_files:
            store.keep_adapter_files(version, adapters.folder_files(folder))
    (adapters_dir / "v2" / adapters.WEIGHTS).write_bytes(b"damaged")
    if store.keeps_adapter_files:
        files = store.adapter_files(2)
        store.keep_adapter_files(2, {**files, adapters.WEIGHTS: b"damaged"})


def table_rows(store, table):
    return store.db.query(f"select * from {table} order by id")


def test_a_backup_to_a_new_sqlite_file_holds_every_row_and_the_sound_adapters(db_target,
                                                                             tmp_path):
    source = Store(db_target)
    deployment(source, tmp_path / "adapters")
    backup = tmp_path / "backup" / "duet.db"

    result = copy_deployment(source, tmp_path / "adapters", str(backup))

    copy = Store(backup)
    for table in COMPARED:
        assert table_rows(copy, table) == table_rows(source, table), table
    assert result["rows"]["votes"] == 3 and result["rows"]["corrections"] == 1
    assert result["versions_with_files"] == [1] and result["versions_without_files"] == [2]
    (v1, v2) = copy.adapters()
    assert v1["path"] == "v1" and v2["path"] is None and copy.live_adapter_version() == 2
    adapters.read_verified(backup.parent / "adapters" / "v1", base_model="tiny",
                           manifest_sha256=v1["sha256"])
    assert copy.adapter_files(1) == {}  # SQLite keeps folders, not files in the database
    # the copy serves on: new rows get new ids
    _, pair = add_turn(copy, "carol")
    copy.record_vote("carol", pair, "A")
    assert len(copy.votes()) == 4


def test_a_move_from_sqlite_to_postgresql_carries_the_adapter_files(tmp_path, postgres_url):
    source = Store(tmp_path / "data" / "duet.db")
    deployment(source, tmp_path / "data" / "adapters")

    result = copy_deployment(source, tmp_path / "data" / "adapters", postgres_url)

    target = Store(postgres_url)
    for table in COMPARED:
        assert table_rows(target, table) == table_rows(source, table), table
    assert result["versions_with_files"] == [1] and result["versions_without_files"] == [2]
    assert target.adapter_files(1) == adapters.folder_files(tmp_path / "data" / "adapters"
                                                            / "v1")
    _, pair = add_turn(target, "carol")  # the id counters go on after the copied ids
    target.record_vote("carol", pair, "B")
    assert max(v["id"] for v in target.votes()) == 4
    target.close()


def test_a_copy_into_a_database_with_rows_or_onto_itself_writes_nothing(tmp_path):
    source = Store(tmp_path / "data" / "duet.db")
    deployment(source, tmp_path / "data" / "adapters")
    with pytest.raises(InvalidInput, match="another database"):
        copy_deployment(source, tmp_path / "data" / "adapters", str(tmp_path / "data"
                                                                   / "duet.db"))
    other = tmp_path / "other" / "duet.db"
    busy = Store(other)
    add_turn(busy, "dora")
    busy.close()
    with pytest.raises(Conflict, match="new file"):
        copy_deployment(source, tmp_path / "data" / "adapters", str(other))
    assert [c["user_id"] for c in Store(other).db.query("select * from conversations")] == [
        "dora"]


def test_backup_restore_and_their_refusals_on_the_command_line(tmp_path, capsys):
    data = tmp_path / "data"
    deployment(Store(data / "duet.db"), data / "adapters")
    backup = tmp_path / "backup" / "duet.db"
    assert app.main(["--data-dir", str(data), "backup", "--out", str(backup)]) == 0
    out = capsys.readouterr().out
    assert "3 votes" in out and "with their files, checked against their manifests: 1" in out
    assert "v2" in out
    assert app.main(["--data-dir", str(data), "backup", "--out", str(backup)]) == 2
    assert "exists" in capsys.readouterr().err
    assert app.main(["--data-dir", str(data), "migrate", "--to", str(tmp_path / "x.db")]) == 2
    assert "postgresql://" in capsys.readouterr().err

    restored = tmp_path / "restored"
    assert app.main(["--data-dir", str(restored), "restore", "--from", str(backup)]) == 0
    store = Store(restored / "duet.db")
    assert len(store.votes()) == 3 and store.live_adapter_version() == 2
    assert (restored / "adapters" / "v1" / adapters.MANIFEST).exists()
    assert app.main(["--data-dir", str(restored), "restore", "--from", str(backup)]) == 2
    assert "not empty" in capsys.readouterr().err  # nothing is merged into a used database
    assert app.main(["--data-dir", str(restored), "restore", "--from",
                     str(tmp_path / "nothing.db")]) == 2
    assert "no backup" in capsys.readouterr().err
