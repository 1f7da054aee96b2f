"""Kill -9 the learner at random moments of its rounds, 6 times: no acknowledged vote or
correction is lost, the live adapter always matches its manifest, the server never loads a
partial adapter, and the learner picks up where it left off. On SQLite and on PostgreSQL;
there the server side has its own adapters folder and fetches each version from the database.

The kill moments are stratified over the first KILL_WINDOW seconds after the learner is up (one
random moment in each of KILLS equal slices, in a random order): kills spread over a round,
from its claims to its publishing, where independent draws could bunch. SQLite and PostgreSQL
draw their moments from different seeds, so the two runs kill at 12 different moments (with 8
kills each from one seed they had killed at the same 8). Each kill costs a learner process's
start, ~5 s of imports (the test took ~21 s a kill, 425-475 s with 20). The two windows a
random kill rarely hits are hit on purpose by `test_a_kill_inside_publish_loses_nothing`.

The learners that are killed are forked from a fork server that imported the learner's
modules once (multiprocessing's forkserver): each then runs `python -m learner`'s own `main`
from its first line, so a kill still lands in a real learner process, but its ~5 s of imports
(torch, transformers, peft) are paid once instead of at every kill. The learner that recovers
after the last kill is a `python -m learner` of its own, as the server starts it."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from chatbot import adapters
from chatbot.config import Config
from chatbot.hotswap import LiveAdapter
from chatbot.model import load_model
from chatbot.sampling import PairGenerator
from chatbot.service import ChatService
from chatbot.store import Store
from learner.__main__ import remove_stale_folders
from tests.serving import ROOT

KILLS = 6
KILL_WINDOW = 2.0  # seconds after the learner reports it is up: its first round, idle after


def kill_delays(rng: random.Random, kills: int = KILLS, window: float = KILL_WINDOW
                ) -> list[float]:
    """One uniform moment in each of `kills` equal slices of [0, window), shuffled."""
    delays = [(i + rng.random()) * window / kills for i in range(kills)]
    rng.shuffle(delays)
    return delays


def learner_argv(config: Config, model_dir) -> list[str]:
    db_args = ["--db", config.db] if config.db else []
    return ["--data-dir", str(config.data_dir), *db_args, "--model", str(model_dir),
            "--max-new-tokens", str(config.max_new_tokens), "--learn-every", "1",
            "--max-batch-votes", "2", "--judge-new", "--keep-versions", "3",
            "--steps-per-round", "2"]


def start_learner(config: Config, model_dir, log):
    """`python -m learner` in a process of its own."""
    return subprocess.Popen(
        [sys.executable, "-m", "learner", *learner_argv(config, model_dir)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})


def run_learner(argv: list[str], log_path: str) -> None:
    """A forked learner's life: its output into the log, then `python -m learner`'s main."""
    from learner.__main__ import main

    os.chdir(ROOT)
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.stdout.reconfigure(line_buffering=True)  # as PYTHONUNBUFFERED for a `python -m learner`
    sys.exit(main(argv))


@pytest.fixture(scope="module")
def learner_forks():
    """Forks learners from a process that has imported their modules (no torch work done
    there, so a fork is safe: no OpenMP team exists yet)."""
    from multiprocessing import forkserver

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["learner.__main__", "learner.worker", "chatbot.model",
                                    "chatbot.store", "peft", "transformers", __name__])
    with contextlib.chdir(ROOT):  # its imports find the project from its working folder
        forkserver.ensure_running()
    return context


def fork_learner(forks, config: Config, model_dir, log_path) -> multiprocessing.Process:
    """A learner forked from `learner_forks`; a daemon, so that a test that fails before
    killing it does not leave pytest waiting for it at exit."""
    learner = forks.Process(target=run_learner, daemon=True,
                            args=(learner_argv(config, model_dir), str(log_path)))
    learner.start()
    return learner


def wait_until_running(store: Store, pid: int, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = store.learner_status()
        if status and status["pid"] == pid and status["state"] in ("idle", "preparing", "training"):
            return
        time.sleep(0.05)
    raise AssertionError("the learner did not start")


def check_invariants(store: Store, config: Config, model_id: str, acked: set[str],
                     live: LiveAdapter, corrected: set[str] = frozenset()) -> None:
    if store.db.dialect.name == "sqlite":
        assert store.db.query("pragma integrity_check")[0]["integrity_check"] == "ok"
    votes = {v["pair_id"]: v for v in store.votes()}
    assert acked <= set(votes), "an acknowledged vote is missing"
    corrections = {c["pair_id"]: c for c in store.corrections()}
    assert corrected <= set(corrections), "an acknowledged correction is missing"
    versions = {a["version"]: a for a in store.adapters()}
    for row in [*votes.values(), *corrections.values()]:
        if row["used_by_version"] is not None:  # used by exactly one registered adapter
            assert versions[row["used_by_version"]]["status"] in ("live", "rejected", "retired")
    row = store.live_adapter()
    if row:  # the live version's files always match its manifest
        adapters.read_verified(config.adapters_dir / row["path"], base_model=model_id,
                               manifest_sha256=row["sha256"])
    before = live.version
    live.sync()  # what the server's poller does
    assert live.version in (before, store.live_adapter_version())
    if live.version != store.live_adapter_version():
        assert live.last_error  # refused, and said why
    with torch.no_grad():
        assert torch.isfinite(live.model(torch.tensor([[1, 2, 3]])).logits).all()


def db_of(db_target: str) -> str | None:
    """--db for the learner: None on SQLite (the data folder's file), else the URL."""
    return db_target if "://" in db_target else None


def test_kill_the_learner_at_random_moments(tiny_model_dir, tmp_path, db_target, learner_forks):
    config = Config(model=str(tiny_model_dir), data_dir=tmp_path / "data", device="cpu",
                    max_new_tokens=8, max_votes_per_minute=0, db=db_of(db_target))
    store = Store(config.db_url)
    loaded = load_model(config)
    # PostgreSQL: the server shares no folder with the learner (another host, in effect)
    server_adapters = tmp_path / "server-adapters" if config.db else config.adapters_dir
    live = LiveAdapter(loaded.model, loaded.model_id, store, server_adapters)
    service = ChatService(config, store, PairGenerator(loaded, config,
                                                       adapter_context=live.reading),
                          model_id=loaded.model_id, live=live)
    rng = random.Random(1 if config.db else 0)  # other moments on each database
    acked: set[str] = set()
    corrected: set[str] = set()  # every third turn, the vote comes with a rewrite of a reply
    seen = {"training": 0, "idle": 0, "tmp_folder_left": 0, "unregistered_folder_left": 0}
    log = open(tmp_path / "learner.log", "ab")
    for delay in kill_delays(rng):
        for turn_number in range(3):
            turn = service.ask("ann", f"question {len(acked)}", "")
            choice = rng.choice(["A", "B", "tie"])
            if turn_number == 2:
                if service.correct("ann", turn["pair_id"], f"my answer {len(acked)}",
                                   choice=choice)["ok"]:
                    acked.add(turn["pair_id"])
                    corrected.add(turn["pair_id"])
            elif service.vote("ann", turn["pair_id"], choice)["ok"]:
                acked.add(turn["pair_id"])
        learner = fork_learner(learner_forks, config, tiny_model_dir, tmp_path / "learner.log")
        wait_until_running(store, learner.pid)
        time.sleep(delay)
        seen[store.learner_status()["state"]] = seen.get(store.learner_status()["state"], 0) + 1
        os.kill(learner.pid, signal.SIGKILL)
        learner.join()
        assert learner.exitcode == -signal.SIGKILL
        names = [p.name for p in config.adapters_dir.iterdir()] if config.adapters_dir.exists() \
            else []
        registered = {a["path"] for a in store.adapters()}
        seen["tmp_folder_left"] += any(n.startswith(adapters.TMP_PREFIX) for n in names)
        seen["unregistered_folder_left"] += any(n.startswith("v") and n not in registered
                                                for n in names)
        check_invariants(store, config, loaded.model_id, acked, live, corrected)

    # after the last kill the learner recovers and uses every vote and correction
    learner = start_learner(config, tiny_model_dir, log)
    try:
        deadline, pending = time.monotonic() + 120, None  # 120 s without progress: stuck

        def waiting() -> int:
            counts = store.pending_counts()
            return counts["votes_pending"] + counts["corrections_pending"]

        while waiting() and time.monotonic() < deadline:
            if waiting() != pending:
                deadline = time.monotonic() + 120
                pending = waiting()
            time.sleep(0.2)
        assert waiting() == 0
    finally:
        learner.terminate()
        code = learner.wait(30)
    assert code == 143, "SIGTERM must end the learner as a SIGTERM, with 143"
    check_invariants(store, config, loaded.model_id, acked, live, corrected)
    assert {c["used_by_version"] for c in store.corrections()} <= {
        a["version"] for a in store.adapters()}
    # the live version is a round's, or the preview of a round that finished (the learner
    # withdraws the preview of a round it died in when it starts again)
    preview_of = (store.live_adapter() or {}).get("preview_of")
    assert not preview_of or preview_of in {s["round_id"] for s in store.learner_steps()}
    names = [p.name for p in config.adapters_dir.iterdir()]
    assert not [n for n in names if n.startswith(adapters.TMP_PREFIX)]
    registered = {a["path"] for a in store.adapters() if a["path"]}
    assert {n for n in names if n.startswith("v")} == registered
    print(f"\n{KILLS} kills: {seen}; {len(acked)} votes ({len(corrected)} with a correction); "
          f"{len(store.adapters())} versions")
    assert seen["training"] > 0, "no kill landed inside a round"
    if config.db:  # the server's copies came from the database, and the live one is there
        assert live.version == store.live_adapter_version() > 0
        assert (server_adapters / f"v{live.version}").is_dir()


@pytest.mark.parametrize("stage", ["after_save", "after_rename"])
def test_a_kill_inside_publish_loses_nothing(tiny_model_dir, tmp_path, stage, monkeypatch,
                                             db_target):
    """The two windows a random kill rarely hits, hit on purpose: after the files are written
    but before the rename, and after the rename but before the registry commit."""
    from learner.worker import Learner

    # The round's own publishing (the preview's goes through the same adapters.publish; its
    # withdrawal after a kill: tests/test_preview.py)
    config = Config(model=str(tiny_model_dir), data_dir=tmp_path / "data", device="cpu",
                    max_new_tokens=8, judge_new=False, db=db_of(db_target), preview=False)
    store = Store(config.db_url)
    loaded = load_model(config)
    service = ChatService(config, store, PairGenerator(loaded, config), model_id=loaded.model_id)
    for i in range(2):
        turn = service.ask("ann", f"q{i}", "")
        service.vote("ann", turn["pair_id"], "A")
    learner = Learner(config, store, load_model(config, training=True))

    class Killed(BaseException):
        pass

    if stage == "after_save":
        original = learner.model.save_pretrained

        def save_then_die(folder):
            original(folder)
            raise Killed

        monkeypatch.setattr(learner.model, "save_pretrained", save_then_die)
    else:
        def die(*args, **kwargs):
            raise Killed

        monkeypatch.setattr(store, "finish_round", die)
    with pytest.raises(Killed):
        learner.round()
    removed = remove_stale_folders(store, config)  # what a restarted learner does first
    assert store.adapters() == [] and store.live_adapter_version() == 0
    assert store.adapter_files(1) == {}
    assert store.pending_counts()["votes_pending"] == 2
    assert [v["claimed_by"] for v in store.votes()] == [None, None]
    if stage == "after_rename":
        assert [p.name for p in removed] == ["v1"]
    assert not list(config.adapters_dir.iterdir())
