"""The preview: a round's weights after its first optimizer step go live while it takes the
others (learner/rounds.py). It changes nothing the round computes; the round's outcome stands,
whether the round is promoted, rejected, fails, or the learner dies during it."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from chatbot.states import AdapterStatus
from chatbot.store import Store
from learner import rounds
from learner.gate import GateDecision
from learner.rounds import PREVIEW_KL_REPLIES, run_preview
from learner.scoring import kl_replies
from tests.test_learner import collect_votes, make_learner


@pytest.fixture
def preview_config(tiny_config):
    return dataclasses.replace(tiny_config, preview=True, lr=3e-3, steps_per_round=2,
                               judge_new=False, replay=0, kl_tripwire=100.0)


def lora_state(learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.model.named_parameters() if "lora_" in n}


def test_the_first_step_goes_live_then_the_rounds_version_replaces_it(preview_config):
    from chatbot import adapters

    store = Store(preview_config.db_path)
    collect_votes(preview_config, store, ["A", "B", "A", "B"])
    learner = make_learner(preview_config, store)
    during_round = []
    publish = store.publish_preview

    def publish_and_look(adapter, files=None):
        status = publish(adapter, files)
        during_round.append((store.live_adapter_version(),
                             store.pending_counts()["votes_pending"],
                             adapters.load_state_dict(adapters.verified_copy(
                                 preview_config.adapters_dir, store.adapter(adapter["version"]),
                                 base_model=learner.loaded.model_id,
                                 fetch=store.adapter_files))))
        return status

    store.publish_preview = publish_and_look
    step = learner.round()

    # v1 was live during the round, its votes still pending (the round had not finished)
    [(live, pending, first)] = during_round
    assert (live, pending) == (1, 4)
    preview, final = store.adapter(1), store.adapter(2)
    assert preview["status"] == AdapterStatus.RETIRED and preview["parent_version"] == 0
    assert preview["metrics"]["steps"] == 1 and preview["preview_of"]
    assert preview["path"] is None  # its folder went with it
    assert final["status"] == AdapterStatus.LIVE and final["parent_version"] == 1
    assert final["metrics"]["preview"]["version"] == 1
    assert step["status"] == "promoted" and step["adapter_version"] == 2
    assert {v["used_by_version"] for v in store.votes()} == {2}  # the round's version
    assert "preview" in final["metrics"]["phase_seconds"]
    # the preview is the first step, not the round's weights nor the base's
    last = adapters.load_state_dict(adapters.verified_copy(
        preview_config.adapters_dir, final, base_model=learner.loaded.model_id,
        fetch=store.adapter_files))
    lora_b = [k for k in first if "lora_B" in k]
    assert lora_b and all(k in last for k in lora_b)
    assert any(first[k].abs().max() > 0 for k in lora_b)  # B starts at zero: it moved
    assert any(not torch.equal(first[k], last[k]) for k in lora_b)


def test_the_round_computes_the_same_weights_with_or_without_the_preview(preview_config):
    store = Store(preview_config.db_path)
    collect_votes(preview_config, store, ["A", "B", "B"])
    learner = make_learner(preview_config, store)
    claimed = store.claim_feedback("look", 10)
    data = learner.builder.build(claimed)
    store.release_claims("look")
    learner.scorer.fill_reference(data.samples + data.judged_samples, kl_replies(data))
    start = lora_state(learner)

    previews = []
    with_preview = learner.train(data, after_first_step=lambda first: previews.append(
        run_preview(learner, "look", data, first, parent=0)))
    weights_with = lora_state(learner)
    moments_with = copy.deepcopy(learner.adapter.optimizer.state_dict())
    assert [p["version"] for p in previews] == [1] and store.live_adapter_version() == 1

    with torch.no_grad():  # back to the start, with a fresh optimizer, and again without
        for n, p in learner.model.named_parameters():
            if n in start:
                p.copy_(start[n])
    learner.adapter.optimizer = None
    without = learner.train(data)
    assert with_preview == without  # loss, KL, steps, clip fraction: to the last bit
    for name, value in lora_state(learner).items():
        assert torch.equal(weights_with[name], value), name
    moments = learner.adapter.optimizer.state_dict()["state"]
    for key, state in moments_with["state"].items():
        assert all(torch.equal(state[k], moments[key][k]) for k in state)
    assert any(not torch.equal(start[n], weights_with[n]) for n in start)  # not a no-op


def test_a_rejected_round_puts_back_the_version_it_started_from(preview_config, monkeypatch):
    store = Store(preview_config.db_path)
    collect_votes(preview_config, store, ["A", "B"])
    learner = make_learner(preview_config, store)
    checks = []
    check = rounds.check

    def the_second_check_rejects(learner, data, live_list, *replies):
        kl, candidate_list, decision = check(learner, data, live_list, *replies)
        checks.append(decision.promote)
        if len(checks) == 2:  # the round's candidate, after the preview passed
            decision = GateDecision(False, "rejected by the test")
        return kl, candidate_list, decision

    monkeypatch.setattr(rounds, "check", the_second_check_rejects)
    step = learner.round()
    assert checks == [True, True] and step["status"] == "rejected"
    assert store.live_adapter_version() == 0  # the base model, as before the round
    assert store.adapter(1)["status"] == AdapterStatus.RETIRED
    assert "rejected" in store.adapter(1)["reason"]
    assert store.adapter(2)["status"] == AdapterStatus.REJECTED
    assert store.pending_counts()["votes_pending"] == 0  # used by the rejected version
    learner.adapter.sync_to_live()  # the next round starts from the base again, moments kept
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(learner.model)
    assert all(torch.equal(state[k], learner.adapter.initial_lora[k]) for k in state)
    assert learner.adapter.optimizer is not None


def test_a_round_that_fails_after_its_preview_withdraws_it(preview_config, monkeypatch):
    store = Store(preview_config.db_path)
    collect_votes(preview_config, store, ["A", "B"])
    learner = make_learner(preview_config, store)
    check = rounds.check
    calls = []

    def fail_on_the_second(learner, data, live_list, *replies):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the disk is full")
        return check(learner, data, live_list, *replies)

    monkeypatch.setattr(rounds, "check", fail_on_the_second)
    with pytest.raises(RuntimeError):
        learner.round()
    assert store.adapter(1)["status"] == AdapterStatus.RETIRED  # it was live, then withdrawn
    assert store.live_adapter_version() == 0
    assert store.pending_counts()["votes_pending"] == 2  # nothing lost, nothing used


def test_a_preview_that_fails_its_check_is_not_published(preview_config):
    store = Store(preview_config.db_path)
    collect_votes(preview_config, store, ["A", "B"])
    config = dataclasses.replace(preview_config, lr=1.0, kl_tripwire=1e-6, beta=0.0)
    learner = make_learner(config, store)
    step = learner.round()
    assert step["status"] == "rejected" and step["adapter_version"] == 1
    assert [a["version"] for a in store.adapters()] == [1]  # the round's version alone
    assert store.adapter(1)["metrics"]["preview"]["version"] is None
    assert "tripwire" in store.adapter(1)["metrics"]["preview"]["note"]


def test_one_step_rounds_have_no_preview(preview_config):
    store = Store(preview_config.db_path)
    collect_votes(preview_config, store, ["A", "B"])
    learner = make_learner(dataclasses.replace(preview_config, steps_per_round=1), store)
    step = learner.round()
    assert step["adapter_version"] == 1 and len(store.adapters()) == 1
    assert "preview" not in store.adapter(1)["metrics"]


def test_at_start_a_preview_whose_round_never_finished_is_withdrawn(db_target):
    store = Store(db_target)
    try:
        def register(version, parent, status, round_id=None):
            store.publish_preview({"version": version, "path": f"v{version}",
                                   "parent_version": parent, "base_model": "m",
                                   "sha256": "0" * 64, "status": status, "metrics": {},
                                   "preview_of": round_id, "reason": "test"})

        register(1, 0, AdapterStatus.LIVE)
        assert store.withdraw_unfinished_preview() is None  # not a preview
        register(2, 1, AdapterStatus.LIVE, round_id="done")
        store.finish_round("done", {"version": 3, "path": "v3", "parent_version": 2,
                                    "base_model": "m", "sha256": "0" * 64,
                                    "status": AdapterStatus.LIVE, "metrics": {}},
                           {"adapter_version": 3, "status": "promoted"})
        store.set_live(2)  # an admin rolls back to a preview whose round finished: it stays
        assert store.withdraw_unfinished_preview() is None
        assert store.live_adapter_version() == 2
        store.set_live(3)
        register(4, 3, AdapterStatus.LIVE, round_id="died")  # the learner died in its round
        assert store.withdraw_unfinished_preview() == 4
        assert store.live_adapter_version() == 3
        assert store.adapter(4)["status"] == AdapterStatus.RETIRED
        assert store.withdraw_unfinished_preview() is None  # once
        # a round that failed, and whose withdrawal failed too: the learner's next round does it
        register(5, 3, AdapterStatus.LIVE, round_id="failed")
        store.log_failed_round("failed", {"note": "the database went away"})
        assert store.withdraw_unfinished_preview() == 5 and store.live_adapter_version() == 3
    finally:
        store.close()


def test_the_preview_checks_the_newest_half_of_the_rounds_kl_replies(preview_config,
                                                                      monkeypatch):
    store = Store(preview_config.db_path)
    collect_votes(preview_config, store, ["A", "B", "A", "B", "A", "B"])
    learner = make_learner(dataclasses.replace(preview_config, learn_every=6), store)
    checked = []
    exact_kl = learner.scorer.exact_kl
    monkeypatch.setattr(learner.scorer, "exact_kl", lambda samples: checked.append(
        [s.reply_id for s in samples]) or exact_kl(samples))
    learner.round()
    preview, final = checked
    assert len(final) == 12 and preview == final[:PREVIEW_KL_REPLIES] == final[:8]


def test_a_rollback_undoes_the_whole_round_not_its_second_step(preview_config):
    from chatbot.errors import Conflict
    from chatbot.service import rollback

    store = Store(preview_config.db_path)
    collect_votes(preview_config, store, ["A", "B"])
    learner = make_learner(preview_config, store)
    learner.round()
    assert store.live_adapter_version() == 2 and store.adapter(2)["parent_version"] == 1
    assert rollback(store, preview_config)["live_adapter_version"] == 0  # past the preview v1
    with pytest.raises(Conflict, match="deleted"):
        rollback(store, preview_config, to=1)  # its folder went when v2 replaced it

    # during a round, with its preview live: back to where the round started, and the
    # round's version does not go live over the rollback
    store.set_live(2)
    collect_votes(preview_config, store, ["B", "A"])
    publish = store.publish_preview

    def publish_then_roll_back(adapter, files=None):
        status = publish(adapter, files)
        assert rollback(store, preview_config)["live_adapter_version"] == 2
        return status

    store.publish_preview = publish_then_roll_back
    step = learner.round()
    assert step["status"] == "rejected" and store.live_adapter_version() == 2


def test_two_learners_with_and_without_the_preview_take_the_same_rounds(preview_config):
    """Through whole rounds: replayed votes, the head start, the KL coefficient and the gate."""
    config = dataclasses.replace(preview_config, learn_every=2, replay=2)
    steps, weights = {}, {}
    for preview in (True, False):
        folder = config.data_dir.parent / f"preview-{preview}"
        run = dataclasses.replace(config, preview=preview, data_dir=folder)
        store = Store(run.db_path)
        collect_votes(run, store, ["A", "B"])
        torch.manual_seed(0)  # the same LoRA initialisation
        learner = make_learner(run, store)
        learner.round()
        learner.prepare()  # the next round's head start: the replayed votes
        collect_votes(run, store, ["B", "A"])
        learner.prepare()
        learner.round()
        steps[preview] = [{k: s[k] for k in ("loss", "kl", "beta", "new_votes",
                                             "replayed_votes", "status")}
                          for s in store.learner_steps()]
        weights[preview] = lora_state(learner)
        assert len(store.adapters()) == (4 if preview else 2)
    assert steps[True] == steps[False]
    assert all(torch.equal(weights[True][n], weights[False][n]) for n in weights[False])


def test_a_preview_that_cannot_be_published_leaves_the_round_going(preview_config):
    store = Store(preview_config.db_path)
    collect_votes(preview_config, store, ["A", "B"])
    learner = make_learner(preview_config, store)

    def full_disk(adapter, files=None):
        raise OSError("no space left on device")

    store.publish_preview = full_disk
    step = learner.round()
    assert step["status"] == "promoted" and step["adapter_version"] == 1
    assert store.adapter(1)["metrics"]["preview"]["note"].startswith("failed: no space left")
    assert store.pending_counts()["votes_pending"] == 0


def test_a_previews_folder_goes_once_it_is_not_live(preview_config):
    store = Store(preview_config.db_path)
    learner = make_learner(dataclasses.replace(preview_config, keep_versions=2), store)
    for choices in (["A", "B"], ["B", "A"], ["A", "A"]):
        collect_votes(preview_config, store, choices)
        learner.round()
    on_disk = {a["version"] for a in store.adapters() if a["path"]}
    assert on_disk == {4, 6}  # the last two rounds' versions; the previews 1, 3, 5 are gone
    assert sorted(p.name for p in preview_config.adapters_dir.iterdir()) == ["v4", "v6"]


def test_a_stop_while_an_old_folder_goes_leaves_no_registered_path_without_its_folder(
        preview_config, monkeypatch):
    """A SIGTERM (or kill) right after an old version's folder is deleted: the registry no
    longer names that folder, and what the next start tidies leaves folders == registry."""
    from learner.__main__ import remove_stale_folders

    store = Store(preview_config.db_path)
    config = dataclasses.replace(preview_config, keep_versions=2)
    learner = make_learner(config, store)
    for choices in (["A", "B"], ["B", "A"]):
        collect_votes(config, store, choices)
        learner.round()

    class Stopped(BaseException):
        pass

    real_rmtree = rounds.shutil.rmtree

    def delete_then_stop(path, **kwargs):  # a version folder's deletion; others pass
        real_rmtree(path, **kwargs)
        if Path(path).parent == config.adapters_dir and Path(path).name.startswith("v"):
            raise Stopped

    monkeypatch.setattr(rounds.shutil, "rmtree", delete_then_stop)
    collect_votes(config, store, ["A", "A"])
    with pytest.raises(Stopped):
        learner.round()
    monkeypatch.setattr(rounds.shutil, "rmtree", real_rmtree)
    registered = {a["path"] for a in store.adapters() if a["path"]}
    assert all((config.adapters_dir / path).is_dir() for path in registered)
    remove_stale_folders(store, config)
    assert {p.name for p in config.adapters_dir.iterdir()} == registered
