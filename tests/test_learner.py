"""A learner round on the tiny model: what moves, what is published, what is kept safe."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from chatbot import adapters
from chatbot.model import load_model
from chatbot.sampling import PairGenerator
from chatbot.service import ChatService
from chatbot.store import Store
from learner.step_loop import RoundFailed
from learner.steps import steps_for
from learner.worker import Learner

PROMPTS = ["Tell me a joke.", "What is rain?", "Name a colour.", "How are you?",
           "Give me a word.", "Count to three.", "Say hi.", "What is two plus two?"]


def collect_votes(config, store, choices) -> list[str]:
    """Chat through the real service and the tiny model, voting `choices` in turn."""
    torch.manual_seed(len(store.votes()))
    loaded = load_model(config)
    service = ChatService(config, store, PairGenerator(loaded, config), model_id=loaded.model_id)
    pair_ids = []
    for i, choice in enumerate(choices):
        result = service.ask("ann", PROMPTS[i % len(PROMPTS)], "")
        service.vote("ann", result["pair_id"], choice)
        pair_ids.append(result["pair_id"])
    return pair_ids


@pytest.fixture
def learner_config(tiny_config):
    return dataclasses.replace(tiny_config, lr=3e-3, steps_per_round=3, judge_new=False, replay=0,
                               kl_tripwire=100.0)


def make_learner(config, store, **kwargs):
    return Learner(config, store, load_model(config, training=True), seed=0, **kwargs)


def reply_logprob(learner, store, pair_id, side) -> float:
    pair = store.pair(None, pair_id)
    reply = pair["replies"][0 if side == "A" else 1]
    from learner.batch import Sample

    sample = Sample(reply["id"], pair["prompt_token_ids"], reply["token_ids"],
                    reply["token_logprobs"])
    return learner.scorer.score([sample])[0]


def test_one_round_moves_lora_not_base_and_prefers_the_chosen(learner_config):
    store = Store(learner_config.db_path)
    pair_ids = collect_votes(learner_config, store, ["A", "B", "A", "B"])
    learner = make_learner(learner_config, store)
    lora_before = {n: p.detach().clone() for n, p in learner.model.named_parameters()
                   if "lora_" in n}
    base_before = {n: p.detach().clone() for n, p in learner.model.named_parameters()
                   if "lora_" not in n}
    chosen = [("A", "B"), ("B", "A"), ("A", "B"), ("B", "A")]
    before = [(reply_logprob(learner, store, p, c), reply_logprob(learner, store, p, r))
              for p, (c, r) in zip(pair_ids, chosen)]

    step = learner.round()

    assert step["status"] == "promoted" and step["adapter_version"] == 1
    # the new votes trained at once; they judged the live adapter (the base: all ties) first
    assert (step["judged_pairs"], step["live_heldout_acc"], step["heldout_acc"]) == (4, 0.5, None)
    moved = [n for n, p in learner.model.named_parameters()
             if "lora_" in n and not torch.equal(p, lora_before[n])]
    assert moved, "no LoRA weight changed"
    assert all(torch.equal(p, base_before[n]) for n, p in learner.model.named_parameters()
               if "lora_" not in n)
    after = [(reply_logprob(learner, store, p, c), reply_logprob(learner, store, p, r))
             for p, (c, r) in zip(pair_ids, chosen)]
    for (chosen_before, rejected_before), (chosen_after, rejected_after) in zip(before, after):
        assert chosen_after > chosen_before
        assert rejected_after < rejected_before
    assert store.pending_counts()["votes_pending"] == 0
    assert {v["used_by_version"] for v in store.votes()} == {1}
    assert store.live_adapter_version() == 1


def test_published_adapter_is_peft_format_with_a_matching_manifest(learner_config):
    from peft import PeftModel

    store = Store(learner_config.db_path)
    collect_votes(learner_config, store, ["A", "B"])
    learner = make_learner(learner_config, store)
    learner.round()
    row = store.adapter(1)
    folder = learner_config.adapters_dir / row["path"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["base_model"] == learner.loaded.model_id
    assert manifest["parent_version"] == 0
    assert set(manifest["files"]) >= {"adapter_config.json", "adapter_model.safetensors"}
    verified = adapters.read_verified(folder, base_model=learner.loaded.model_id,
                                      manifest_sha256=row["sha256"])
    assert verified.config["r"] == learner_config.lora_r
    fresh = load_model(learner_config).model
    peft_model = PeftModel.from_pretrained(fresh, folder)  # loads unchanged
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(peft_model(ids).logits, learner.model(ids).logits, atol=1e-5)


def test_non_finite_steps_change_nothing_and_fail_the_round(learner_config):
    store = Store(learner_config.db_path)
    collect_votes(learner_config, store, ["A", "B"])
    learner = make_learner(learner_config, store, max_bad_steps=2)
    lora_before = {n: p.detach().clone() for n, p in learner.model.named_parameters()
                   if "lora_" in n}
    layer = learner.model.base_model.model.model.layers[0]
    hook = layer.register_forward_hook(lambda m, i, out: out * float("nan")
                                       if torch.is_grad_enabled() else out)
    try:
        with pytest.raises(RoundFailed, match="non-finite"):
            learner.round()
    finally:
        hook.remove()
    assert all(torch.equal(p, lora_before[n]) for n, p in learner.model.named_parameters()
               if "lora_" in n)
    assert store.adapters() == []
    assert store.pending_counts()["votes_pending"] == 2
    assert [v["claimed_by"] for v in store.votes()] == [None, None]
    assert store.learner_steps()[-1]["status"] == "failed"


def test_kl_tripwire_rejects_and_the_live_version_stays(learner_config):
    store = Store(learner_config.db_path)
    collect_votes(learner_config, store, ["A", "B", "A"])
    config = dataclasses.replace(learner_config, lr=1.0, kl_tripwire=1e-6, beta=0.0)
    learner = make_learner(config, store)
    step = learner.round()
    assert step["status"] == "rejected"
    assert "tripwire" in step["note"]
    assert store.live_adapter_version() == 0
    assert store.adapter(1)["status"] == "rejected"
    assert store.pending_counts()["votes_pending"] == 0  # used by the rejected version
    learner.adapter.sync_to_live()  # the next round starts again from the live weights
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(learner.model)
    assert all(torch.equal(state[k], learner.adapter.initial_lora[k]) for k in state)


def test_rollback_during_a_round_is_not_overridden(learner_config):
    store = Store(learner_config.db_path)
    collect_votes(learner_config, store, ["A", "B"])
    learner = make_learner(learner_config, store)
    learner.round()  # v1 live
    collect_votes(learner_config, store, ["B"])
    original = learner.train

    def train_then_rollback(data, head=None, **kwargs):
        stats = original(data, head, **kwargs)
        store.set_live(0)  # someone runs `app.py rollback` meanwhile
        return stats

    learner.train = train_then_rollback
    step = learner.round()
    assert step["status"] == "rejected"
    assert store.live_adapter_version() == 0


def test_new_votes_judge_first_then_train(learner_config):
    """Test-then-train: the first votes train at once (nothing earlier to train on); later new
    votes judge the candidate against the live adapter, then train in the next round."""
    config = dataclasses.replace(learner_config, judge_new=True, replay=8)
    store = Store(config.db_path)
    first_ids = collect_votes(config, store, ["A", "B", "A", "B"])
    learner = make_learner(config, store)
    first = learner.round()
    # nothing earlier to train on: the first votes train at once; they judge only the live
    # adapter (the base model, which ties every pair), not the candidate
    assert first["judged_pairs"] == 4 and first["live_heldout_acc"] == 0.5
    assert first["heldout_acc"] is None
    assert first["new_votes"] == 4 and first["status"] == "promoted"

    second_ids = collect_votes(config, store, ["A", "B", "tie"])
    claimed = store.claim_feedback("look", 10)
    data = learner.builder.build(claimed)
    store.release_claims("look")
    judged = {p.chosen.reply_id for p in data.judged}
    assert len(data.judged) == 2  # the A and B votes; a tie judges nothing
    new_reply_ids = {r["id"] for pid in second_ids for r in store.pair(None, pid)["replies"]}
    old_reply_ids = {r["id"] for pid in first_ids for r in store.pair(None, pid)["replies"]}
    trained = {s.reply_id for s in data.samples}
    assert judged <= new_reply_ids and not trained & new_reply_ids  # judged, not trained on
    assert trained == old_reply_ids  # the votes judged before, never seen by the live line

    second = learner.round()
    assert second["judged_pairs"] == 2
    assert 0.0 <= second["live_heldout_acc"] <= 1.0 and 0.0 <= second["heldout_acc"] <= 1.0
    assert store.pending_counts()["votes_pending"] == 0
    collect_votes(config, store, ["B"])
    claimed = store.claim_feedback("look-again", 10)
    third_data = learner.builder.build(claimed)
    assert {s.reply_id for s in third_data.samples} >= new_reply_ids - {
        r["id"] for r in store.pair(None, second_ids[2])["replies"]}  # now they train


def test_gate_margin_is_per_token_so_length_alone_wins_nothing(learner_config):
    """The base model scores every judged pair a tie, whatever the replies' lengths."""
    config = dataclasses.replace(learner_config, judge_new=True)
    store = Store(config.db_path)
    collect_votes(config, store, ["A", "B"])
    learner = make_learner(config, store)
    data = learner.builder.build(store.claim_feedback("r", 10))
    learner.scorer.fill_reference(data.samples)
    from learner.data import PreferencePair

    pairs = [PreferencePair(s, s) for s in data.samples]
    learner.scorer.fill_reference([p.chosen for p in pairs])
    assert learner.scorer.judged_margins(pairs) == pytest.approx([0.0] * len(pairs), abs=1e-5)


def test_dpo_objective_runs_a_round(learner_config):
    config = dataclasses.replace(learner_config, objective="dpo")
    store = Store(config.db_path)
    collect_votes(config, store, ["A", "B", "tie", "both_bad"])
    step = make_learner(config, store).round()
    assert step["objective"] == "dpo"
    assert step["loss"] is not None and step["loss"] < torch.log(torch.tensor(2.0)).item()


def test_thumbs_and_both_bad_become_samples(learner_config):
    store = Store(learner_config.db_path)
    pair_ids = collect_votes(learner_config, store, ["both_bad", "tie"])
    store.record_rating("ann", pair_ids[1], "A", "up")
    learner = make_learner(learner_config, store)
    claimed = store.claim_feedback("r", 10)
    data = learner.builder.build(claimed)
    advantages = sorted(s.advantage for s in data.new_samples)
    assert len(data.new_samples) == 3  # two from both_bad, one from the thumb; none from the tie
    assert advantages[0] < 0 and advantages[1] < 0 and advantages[2] > 0
    assert data.rewards == [-1.0, 0.0, 1.0]


def test_a_round_on_a_4bit_base(learner_config):
    """QLoRA: the same round on a bitsandbytes 4-bit NF4 base (on the CPU here)."""
    config = dataclasses.replace(learner_config, quantize="4bit")
    store = Store(config.db_path)
    collect_votes(config, store, ["A", "B"])
    learner = make_learner(config, store)
    assert any(type(m).__name__ == "Linear4bit" for m in learner.model.modules())
    lora_before = {n: p.detach().clone() for n, p in learner.model.named_parameters()
                   if "lora_" in n}
    step = learner.round()
    assert step["status"] in ("promoted", "rejected") and step["loss"] is not None
    assert any(not torch.equal(p, lora_before[n]) for n, p in learner.model.named_parameters()
               if "lora_" in n)


def test_reward_model_learns_a_feature_and_knows_when_it_knows_nothing():
    import random

    from learner.reward import fit_reward_model

    gen = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(40, 6, generator=gen), torch.randn(40, 6, generator=gen)
    chosen[:, 0] += 2.0  # the chosen reply has more of feature 0
    rm = fit_reward_model(chosen, rejected, random.Random(0))
    assert rm.cv_accuracy > 0.8 and rm.pairs == 40 and rm.knows_something
    probe = torch.zeros(2, 6)
    probe[0, 0] = 1.0
    assert rm.score(probe)[0] > rm.score(probe)[1]
    assert rm.prefers(chosen[:1], rejected[:1]).item() > 0.5
    knows = []
    for seed in range(10):  # votes that say nothing about the features
        gen = torch.Generator().manual_seed(seed)
        noise = fit_reward_model(torch.randn(40, 6, generator=gen),
                                 torch.randn(40, 6, generator=gen), random.Random(0))
        knows.append(noise.knows_something)
    assert sum(knows) <= 2
    assert fit_reward_model(chosen[:3], rejected[:3]) is None  # too few votes


def test_self_samples_join_the_round_with_the_reward_models_advantages(learner_config,
                                                                       monkeypatch):
    import learner.reward as reward

    monkeypatch.setattr(reward.RewardModel, "knows_something", True)  # the tiny model's
    # features know nothing
    monkeypatch.setattr(reward, "MIN_PAIRS", 4)
    config = dataclasses.replace(learner_config, self_samples=3, judge_new=True)
    store = Store(config.db_path)
    collect_votes(config, store, ["A", "B", "A", "B"])
    learner = make_learner(config, store)
    learner.round()  # the first votes train at once
    collect_votes(config, store, ["A", "B"])
    step = learner.round()
    metrics = store.adapter(step["adapter_version"])["metrics"]
    assert metrics["self_samples"] == 6 and metrics["reward_model_pairs"] == 4
    assert 0.0 <= metrics["reward_model_new_acc"] <= 1.0
    sampled = learner.self_sampler.samples(learner.builder.voted_pairs(), [])[0]
    assert len(sampled) == 6 and all(s.reply_id < 0 for s in sampled)
    for a, b in zip(sampled[0::2], sampled[1::2]):
        assert a.prompt == b.prompt and a.advantage == pytest.approx(-b.advantage)
        assert -1.0 <= a.advantage <= 1.0
    assert all(len(s.behaviour) == len(s.reply) for s in sampled)
    assert all(r["ref_token_logprobs"] is None or len(r["ref_token_logprobs"]) == r["n_tokens"]
               for p in [store.pair(None, v["pair_id"]) for v in store.votes()]
               for r in p["replies"])


def test_a_round_with_more_new_votes_takes_more_steps(learner_config):
    """Votes that pile up while a round runs still get the steps rounds of their own give."""
    config = dataclasses.replace(learner_config, learn_every=2, steps_per_round=3)
    store = Store(config.db_path)
    collect_votes(config, store, ["A", "B", "A", "B", "A"])
    learner = make_learner(config, store)
    assert [steps_for(learner.config, n) for n in (0, 1, 2, 3, 5)] == [3, 3, 3, 6, 9]
    beats = []
    learner.on_step = lambda: beats.append(1)  # run_forever's heartbeat hangs here
    step = learner.round()
    assert step["new_votes"] == 5
    assert store.adapter(step["adapter_version"])["metrics"]["steps"] == 9
    assert len(beats) == 9, "a long round must beat once per step, or it looks dead"


@pytest.mark.parametrize("kls, fraction, status, factor", [
    ((0.9, 0.6, 0.3), 0.25, "promoted", 1.0),  # half the step is still over: a quarter goes
    ((0.9, 0.8, 0.7), 0.0, "rejected", 2.0),  # none passes: rejected, as without the switch
    ((0.3,), None, "promoted", 2.0),  # the whole step passes: one check, as without it
])
def test_kl_backtrack_shortens_a_step_over_the_tripwire(learner_config, monkeypatch, kls,
                                                        fraction, status, factor):
    """Under --kl-backtrack a candidate over the tripwire is moved back to half, then a quarter
    of its step; the first to pass goes live with those weights. Beta follows the whole step's
    KL, times --kl-trip-factor. The KL each check reads is set here (the real check runs, and
    so does the real gate on it)."""
    from learner import gate, rounds

    config = dataclasses.replace(learner_config, kl_backtrack=True, kl_tripwire=0.5,
                                 kl_trip_factor=factor, preview=False)
    store = Store(config.db_path)
    collect_votes(config, store, ["A", "B", "A"])
    learner = make_learner(config, store)
    read = iter(kls)
    real_check = rounds.check

    def check(learner, data, live_list, replies=rounds.KL_REPLIES):
        _, candidate_list, _ = real_check(learner, data, live_list, replies)
        kl = next(read)
        return kl, candidate_list, gate.decide(candidate_list, live_list, kl,
                                               config.kl_tripwire, config.gate_z)

    monkeypatch.setattr(rounds, "check", check)
    snapshots = []  # the weights at the round's start, then its whole step's
    real_snapshot = learner.adapter.snapshot
    monkeypatch.setattr(learner.adapter, "snapshot",
                        lambda: snapshots.append(real_snapshot()) or snapshots[-1])
    beta = learner.kl_control.beta
    step = learner.round()
    assert next(read, None) is None, "every fraction up to the one that passed is checked"
    assert step["status"] == status
    metrics = store.adapter(step["adapter_version"])["metrics"]
    assert step["kl"] == (0.3 if status == "promoted" else 0.9)
    start, end = snapshots[0], [p.detach() for p in learner.adapter.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(start, end)), "the round took a step"
    if fraction is None:  # nothing to search: no second snapshot, no metrics of it, no jump
        assert len(snapshots) == 1 and "step_fraction" not in metrics
    else:
        assert (metrics["step_fraction"], metrics["kl_full_step"]) == (fraction, 0.9)
        end = snapshots[1]
        kept = fraction or 1.0  # a rejected candidate keeps its whole step, for the record
        for param, a, b in zip(learner.adapter.parameters(), start, end):
            assert torch.allclose(param, a + kept * (b - a), atol=1e-7)
    # the proportional step on the whole step's KL (0.3 or 0.9: its error clipped to +0.2),
    # jumped where it passed the tripwire
    jump = 1.0 if fraction is None else factor
    assert learner.kl_control.beta == pytest.approx(
        beta * (1 + 0.2 * metrics["steps"] / learner.kl_control.horizon) * jump)
    assert store.live_adapter_version() == (step["adapter_version"]
                                            if status == "promoted" else 0)


def test_a_round_that_fell_behind_trains_slice_by_slice(learner_config, monkeypatch):
    """Five votes at learn_every=2 are three slices (1, 2, 2 votes in the order they came),
    each with a trust region of its own, sharing one round's replay: a late round that
    replayed as much per slice as a round of its own would fell further behind."""
    config = dataclasses.replace(learner_config, learn_every=2, steps_per_round=2, replay=3)
    store = Store(config.db_path)
    collect_votes(config, store, ["A", "B", "A", "B"])
    learner = make_learner(config, store)
    learner.round()  # four earlier votes to replay
    new_ids = collect_votes(config, store, ["A", "B", "A", "B", "A"])
    claimed = store.claim_feedback("look", 10)
    data = learner.builder.build(claimed)
    store.release_claims("look")
    assert (data.slices, data.replayed_items) == (3, 3)
    parts = data.sliced_samples()
    new_reply = {r["id"]: i for i, pid in enumerate(new_ids)
                 for r in store.pair(None, pid)["replies"]}
    assert [sorted({new_reply[s.reply_id] for s in part if s.reply_id in new_reply})
            for part in parts] == [[0], [1, 2], [3, 4]]
    assert [sum(s.reply_id not in new_reply for s in part) for part in parts] == [2, 2, 2]

    seen = []  # (slice, anchors present when its step began)
    accumulate = learner.objective.accumulate

    def spy(samples, anchors, **kwargs):
        seen.append((tuple(s.reply_id for s in samples), len(anchors)))
        return accumulate(samples, anchors, **kwargs)

    monkeypatch.setattr(learner.objective, "accumulate", spy)
    train, trained = learner.train, []
    monkeypatch.setattr(learner, "train", lambda *args, **kwargs: trained.append(
        train(*args, **kwargs)) or trained[-1])
    step = learner.round()
    assert step["new_votes"] == 5 and step["replayed_votes"] == 3
    # each slice anchors at its first step: every one of its replies
    assert [n for _, n in seen] == [0, 4, 0, 6, 0, 6]
    assert len({key for key, _ in seen}) == 3
    # Only the first step runs at the live weights: the live margins take its log-probs.
    assert set(trained[0]["live_totals"]) == set(seen[0][0])


def test_a_round_on_time_is_one_slice():
    """learn_every new items (or fewer) are one slice: every sample, in the order it came."""
    from learner.batch import Sample
    from learner.data import RoundData

    def item(i):
        return [Sample(i, [1], [2], [0.0]), Sample(-i, [1], [2], [0.0])]

    data = RoundData(new_items=[item(1), item(2)], replay_items=[item(3)],
                     scored_samples=item(4))
    assert [[s.reply_id for s in part] for part in data.sliced_samples()] == [
        [s.reply_id for s in data.samples]]
    data.slices = 2
    assert [[s.reply_id for s in part] for part in data.sliced_samples()] == [
        [1, -1, 4], [2, -2, 3, -3, -4]]


def test_the_kl_check_scores_each_reply_once(learner_config, monkeypatch):
    """Without --judge-new the judged replies are the round's new ones: the exact KL (two
    full-vocabulary passes per reply) must not pay for them twice."""
    store = Store(learner_config.db_path)
    collect_votes(learner_config, store, ["A", "B", "A"])
    learner = make_learner(learner_config, store)
    measured = []
    exact_kl = learner.scorer.exact_kl
    monkeypatch.setattr(learner.scorer, "exact_kl",
                        lambda samples: measured.append([s.reply_id for s in samples])
                        or exact_kl(samples))
    step = learner.round()
    assert step["judged_pairs"] == 3
    assert len(measured) == 1 and sorted(measured[0]) == sorted(
        r["id"] for v in store.votes() for r in store.pair(None, v["pair_id"])["replies"])


def _round_spying_on_margins(learner, monkeypatch) -> tuple[dict, list]:
    """Run a round; return its step and the live margins it gave the gate."""
    from learner import rounds

    decide, seen = rounds.gate.decide, []

    def spy(candidate, live, *args, **kwargs):
        seen.append(list(live))
        return decide(candidate, live, *args, **kwargs)

    monkeypatch.setattr(rounds.gate, "decide", spy)
    return learner.round(), seen[0]


# One slice: the first step sees every judged reply. Three slices of 1, 2 and 2 votes (the
# learner fell behind): the replies of the last 4 votes are scored before training.
@pytest.mark.parametrize(("learn_every", "scored_first"), [(8, 0), (2, 8)])
def test_the_live_margins_from_the_first_step_equal_scoring_before_training(
        learner_config, monkeypatch, learn_every, scored_first):
    """The live adapter's margins on the judged votes come from the first training step's
    log-probs (its trust-region anchors) and from scoring, before training, only the judged
    replies that step does not see: the same numbers as scoring every one beforehand."""
    config = dataclasses.replace(learner_config, learn_every=learn_every, replay=2)
    store = Store(config.db_path)
    collect_votes(config, store, ["A", "B", "A", "B"])
    learner = make_learner(config, store)
    learner.round()  # v1 live: margins that are not all 0
    collect_votes(config, store, ["B", "A", "A", "B", "A"])
    claimed = store.claim_feedback("look", 10)
    data = learner.builder.build(claimed)
    store.release_claims("look")
    learner.scorer.fill_reference([s for p in data.judged for s in (p.chosen, p.rejected)])
    expected = learner.scorer.judged_margins(data.judged)  # at v1, every reply scored
    assert any(abs(m) > 1e-4 for m in expected)

    scored = []
    score = learner.scorer.score
    monkeypatch.setattr(learner.scorer, "score", lambda samples: scored.append(len(samples))
                        or score(samples))
    step, live = _round_spying_on_margins(learner, monkeypatch)
    assert step["judged_pairs"] == 5
    assert live == pytest.approx(expected, abs=1e-5)
    assert scored[0] == scored_first  # only what the first step does not see


def test_replayed_replies_keep_their_reference_log_probs(learner_config):
    """A reply's reference log-probs are computed once: a later round that replays its vote
    finds them (they were computed again each time it was replayed)."""
    config = dataclasses.replace(learner_config, replay=4)
    store = Store(config.db_path)
    collect_votes(config, store, ["A", "B"])
    learner = make_learner(config, store)
    learner.round()
    new_ids = collect_votes(config, store, ["B", "A"])
    new_replies = {r["id"] for pid in new_ids for r in store.pair(None, pid)["replies"]}
    computed = []
    fill = learner.scorer.fill_reference
    learner.scorer.fill_reference = lambda samples, keep=(): computed.append(
        {s.reply_id for s in samples if s.ref is None}) or fill(samples, keep)
    step = learner.round()
    assert step["replayed_votes"] == 2
    assert computed == [new_replies]


def test_prepare_computes_the_pending_replies_reference_before_the_round(learner_config):
    """Between rounds the learner computes the reference log-probs of each pending vote's
    replies as it comes in (ties teach nothing and are skipped), so the round that claims
    them starts with them known."""
    config = dataclasses.replace(learner_config, learn_every=4)
    store = Store(config.db_path)
    pair_ids = collect_votes(config, store, ["A", "tie", "B"])
    learner = make_learner(config, store)
    learner.prepare()
    refs = {pid: [r["ref_token_logprobs"] for r in store.pair(None, pid)["replies"]]
            for pid in pair_ids}
    assert all(ref is not None for pid in (pair_ids[0], pair_ids[2]) for ref in refs[pid])
    assert refs[pair_ids[1]] == [None, None]
    expected = learner.builder.draft().new_samples[0]
    by_hand = expected.ref
    expected.ref = None
    learner.scorer.fill_reference([expected])  # computed again, from scratch
    assert by_hand == pytest.approx(expected.ref, abs=1e-6)

    collect_votes(config, store, ["A"])
    computed = []
    fill = learner.scorer.fill_reference
    learner.scorer.fill_reference = lambda samples, keep=(): computed.append(
        len({s.reply_id for s in samples if s.ref is None})) or fill(samples, keep)
    step = learner.round()
    assert step["new_votes"] == 4
    assert computed == [2]  # the vote that completed the batch: its two replies


def _lora_state(learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.model.named_parameters() if "lora_" in n}


def test_a_round_begun_between_rounds_takes_the_same_steps(learner_config, monkeypatch):
    """The head start (the first step's terms of the replayed votes, drawn when the last round
    ended, and of each pending vote as it came in) leaves the round only the last vote's
    replies to compute for its first step, and gives the same weights, live margins and loss
    as a round that computes the whole step."""
    import copy

    config = dataclasses.replace(learner_config, learn_every=4, replay=2, steps_per_round=2)
    store = Store(config.db_path)
    collect_votes(config, store, ["A", "B", "A", "B"])
    learner = make_learner(config, store)
    learner.round()  # v1 live, with optimizer moments; four votes to replay
    learner.prepare()  # nothing pending: the replay's terms
    assert sum(learner.head_start.done.values()) == 4  # two replayed votes, two replies each
    collect_votes(config, store, ["B", "A", "A"])
    learner.prepare()
    head = learner.head_start
    assert sum(head.done.values()) == 10 and head.version == 1
    last = collect_votes(config, store, ["B"])
    last_replies = {r["id"] for r in store.pair(None, last[0])["replies"]}

    claimed = store.claim_feedback("look", 10)
    data = learner.builder.build(claimed)
    store.release_claims("look")
    assert data.replayed_items == 2  # the draw the head start was computed on
    learner.scorer.fill_reference(data.samples)
    start = (_lora_state(learner), copy.deepcopy(learner.adapter.optimizer.state_dict()))

    computed = []
    terms = learner.objective.terms
    monkeypatch.setattr(learner.objective, "terms", lambda samples, *args: computed.append(
        {s.reply_id for s in samples}) or terms(samples, *args))
    with_head = learner.train(data, head)
    live_head = with_head["live_totals"]
    weights_head = _lora_state(learner)
    assert computed[0] == last_replies and len(computed[1]) == 12

    with torch.no_grad():  # back to v1 and its moments, then the whole step
        for n, p in learner.model.named_parameters():
            if n in start[0]:
                p.copy_(start[0][n])
    learner.adapter.optimizer.load_state_dict(start[1])
    whole = learner.train(data)
    live_whole = whole["live_totals"]
    assert len(computed[2]) == 12  # the first step computed every reply

    assert live_head.keys() == live_whole.keys() and len(live_head) == 12
    assert [live_head[k] for k in live_whole] == pytest.approx(list(live_whole.values()),
                                                               abs=1e-4)
    assert with_head["loss"] == pytest.approx(whole["loss"], rel=1e-4, abs=1e-6)
    assert with_head["kl"] == pytest.approx(whole["kl"], rel=1e-4, abs=1e-7)
    assert with_head["kl_loss"] == pytest.approx(whole["kl_loss"], rel=1e-4, abs=1e-7)
    head_big, whole_big = with_head["largest_term"], whole["largest_term"]
    assert (head_big["reply_id"], head_big["token"], head_big["step"]) == (
        whole_big["reply_id"], whole_big["token"], whole_big["step"])
    assert head_big["term"] == pytest.approx(whole_big["term"], rel=1e-4)
    for name, value in _lora_state(learner).items():
        torch.testing.assert_close(weights_head[name], value, rtol=1e-4, atol=1e-6)
    moved = max((weights_head[n] - start[0][n]).abs().max().item() for n in start[0])
    assert moved > 1e-4  # the steps moved the weights: the comparison is not of no-ops


def test_a_head_start_for_other_samples_or_weights_is_not_used(learner_config, monkeypatch):
    """A head start that summed a sample the round does not train on (a vote another round
    took), or computed at weights that are no longer live, is dropped: the round computes its
    whole first step."""
    config = dataclasses.replace(learner_config, learn_every=2, replay=0, steps_per_round=1)
    store = Store(config.db_path)
    collect_votes(config, store, ["A"])
    learner = make_learner(config, store)
    learner.prepare()
    assert sum(learner.head_start.done.values()) == 2
    computed = []
    terms = learner.objective.terms
    monkeypatch.setattr(learner.objective, "terms", lambda samples, *args: computed.append(
        len(samples)) or terms(samples, *args))
    second = collect_votes(config, store, ["B"])[0]
    data = learner.builder.build({"votes": [v["id"] for v in store.votes()
                                            if v["pair_id"] == second], "ratings": []})
    learner.train(data, learner.head_start)
    assert computed == [2]  # the head start's vote is not in this round: the whole step

    learner.head_start.version = 7  # as if another version had gone live since
    computed.clear()
    learner.round()
    assert computed == [4]
    assert learner.head_start is None  # a round takes it, used or not


def test_the_kl_check_reads_the_reference_distributions_kept_between_rounds(learner_config,
                                                                           monkeypatch):
    """prepare keeps the reference's distributions over the next round's KL replies (the
    pending and replayed ones), the round adds those of the vote that completed it in its
    reference pass, and its KL check then runs the policy alone: the same KL as with a
    reference pass."""
    from learner.scoring import kl_replies

    config = dataclasses.replace(learner_config, learn_every=4, replay=2)
    store = Store(config.db_path)
    collect_votes(config, store, ["A", "B", "A", "B"])
    learner = make_learner(config, store)
    learner.round()
    collect_votes(config, store, ["B", "A", "A"])
    learner.prepare()
    draft = learner.builder.draft()
    assert set(learner.scorer.reference_distributions) == {s.reply_id for s in kl_replies(draft)}
    assert len(learner.scorer.reference_distributions) == 10  # 3 pending + 2 replayed votes

    collect_votes(config, store, ["B"])
    measured = []
    exact_kl = learner.scorer.exact_kl

    def spy(samples):
        kept = dict(learner.scorer.reference_distributions)
        assert {s.reply_id for s in samples} <= kept.keys()
        with_kept = exact_kl(samples)
        learner.scorer.reference_distributions.clear()  # now with a reference pass
        with_pass = exact_kl(samples)
        learner.scorer.reference_distributions.update(kept)
        measured.append((len(samples), with_kept, with_pass))
        return with_kept

    monkeypatch.setattr(learner.scorer, "exact_kl", spy)
    learner.round()
    (n, (kl_kept, tokens_kept), (kl_pass, tokens_pass)), = measured
    assert n == 12 and tokens_kept == tokens_pass
    assert kl_pass > 1e-4  # v1 differs from the base: not 0 against 0
    assert kl_kept == pytest.approx(kl_pass, rel=1e-4)
    assert learner.scorer.reference_distributions == {}  # not held past the round


def test_the_builder_keeps_the_pairs_it_used_last_and_reads_the_others_again(tmp_path,
                                                                             monkeypatch):
    """A long-lived learner must not hold every stored pair a replay ever drew: the builder
    keeps the last PAIRS_KEPT, and a pair it dropped is read again, with the reference
    log-probs cached in the store since."""
    from learner import data

    monkeypatch.setattr(data, "PAIRS_KEPT", 2)
    store = Store(tmp_path / "duet.db")
    pair_ids = []
    for i in range(3):
        replies = [{"text": t, "token_ids": [5, 6], "token_logprobs": [-1.0, -2.0],
                    "behaviour_logprob": -3.0, "adapter_version": 0, "finish_reason": "stop",
                    "n_tokens": 2} for t in ("a", "b")]
        pair = {"prompt_token_ids": [1, 2, 3], "adapter_version": 0, "temperature": 0.8,
                "top_p": 0.95, "max_new_tokens": 2, "seconds": 0.0, "first_token_seconds": 0.0}
        pair_ids.append(store.add_turn("ann", None, f"prompt {i}", pair, replies)[1])
    reads = []
    read = store.pair
    monkeypatch.setattr(store, "pair", lambda *args: reads.append(args[1]) or read(*args))
    builder = data.RoundBuilder(store, replay=0)

    first = builder._sample(pair_ids[0], "A")
    store.cache_ref_logprobs(first.reply_id, [-0.5, -0.25])
    builder.remember_reference(first.reply_id, [-0.5, -0.25])
    assert builder._sample(pair_ids[0], "A").ref == [-0.5, -0.25]  # kept: not read again
    builder._sample(pair_ids[1], "B")
    builder._sample(pair_ids[2], "B")  # the third: the least recently used one goes
    assert reads == pair_ids
    again = builder._sample(pair_ids[0], "A")
    assert reads == pair_ids + [pair_ids[0]]
    assert again.ref == [-0.5, -0.25] and again.reply == [5, 6]
    assert len(builder._pairs) == 2 and len(builder._replies) == 4


def test_length_neutral_votes_lose_what_length_alone_predicts(tmp_path):
    """Four votes a finished round used: the shorter reply won 3 (A twice, B once) and lost
    1, (3 + 2) / (4 + 4) = 5/8 with the prior, a shift of 2 * 5/8 - 1 = 1/4. Under
    --length-neutral 1 each new vote's shorter reply, A or B, loses 1/4 of advantage and the
    longer gains 1/4; off, the votes keep (+1, -1). Pending votes do not count toward the
    rate, and the rate is counted again once more votes are used."""
    from learner import data

    store = Store(tmp_path / "duet.db")
    short, long = "short", "a longer reply"

    def vote(choice, text_a, text_b) -> int:
        replies = [{"text": t, "token_ids": [5, 6], "token_logprobs": [-1.0, -2.0],
                    "behaviour_logprob": -3.0, "adapter_version": 0, "finish_reason": "stop",
                    "n_tokens": 2} for t in (text_a, text_b)]
        pair = {"prompt_token_ids": [1, 2, 3], "adapter_version": 0, "temperature": 0.8,
                "top_p": 0.95, "max_new_tokens": 2, "seconds": 0.0, "first_token_seconds": 0.0}
        _, pair_id = store.add_turn("ann", None, f"prompt {text_a} {choice}", pair, replies)
        return store.record_vote("ann", pair_id, choice)["vote_id"]

    def use(ids) -> None:  # as a finished round marks them
        store.db.execute(f"update votes set used_by_version = 1 where id in "
                         f"({', '.join(map(str, ids))})")

    used = [vote("A", short, long), vote("A", short, long), vote("B", short, long),
            vote("B", long, short)]
    use(used)
    new = [vote("B", short, long),  # the longer won
           vote("A", long, short),  # the longer won
           vote("B", long, short)]  # the shorter won
    claimed = {"votes": new, "ratings": [], "corrections": []}

    def advantages(round_data):
        return [[s.advantage for s in item] for item in round_data.new_items]

    plain = data.RoundBuilder(store, replay=0).build(claimed)
    assert plain.shorter_wins is None
    assert advantages(plain) == [[-1, 1], [1, -1], [-1, 1]]
    builder = data.RoundBuilder(store, replay=0, length_neutral=1.0)
    neutral = builder.build(claimed)
    assert neutral.shorter_wins == pytest.approx(5 / 8)
    assert advantages(neutral) == [pytest.approx([-1.25, 1.25]), pytest.approx([1.25, -1.25]),
                                   pytest.approx([-0.75, 0.75])]
    half = data.RoundBuilder(store, replay=0, length_neutral=0.5).build(claimed)
    assert advantages(half)[0] == pytest.approx([-1.125, 1.125])
    rescaled = data.RoundBuilder(store, replay=0, length_neutral=1.0,
                                 length_neutral_rescale=True).build(claimed)
    assert advantages(rescaled)[0] == pytest.approx([-1.25 / (1 - 0.25 ** 2),
                                                     1.25 / (1 - 0.25 ** 2)])
    use(new[:2])  # two more votes the longer reply won: 3 of 6, (3 + 2) / (6 + 4) = 1/2
    assert builder.build({"votes": new[2:], "ratings": [], "corrections": []}
                         ).shorter_wins == pytest.approx(0.5)
    # --length-window 2: each vote reads the two newest used votes cast before it. The new
    # vote reads new[0] and new[1] (both won by the longer): (0 + 2) / (2 + 4) = 1/3, a shift
    # of -1/3; a replayed vote, the third used, reads the first two, which the shorter won:
    # (2 + 2) / (2 + 4) = 2/3, a shift of +1/3, where the rate over all six (1/2) shifts none.
    windowed = data.RoundBuilder(store, replay=8, length_neutral=1.0, length_window=2)
    round_data = windowed.build({"votes": new[2:], "ratings": [], "corrections": []})
    assert round_data.shorter_wins == pytest.approx(1 / 3)
    assert advantages(round_data) == [pytest.approx([-1 - 1 / 3, 1 + 1 / 3])]
    replayed = {item[0].reply_id: [s.advantage for s in item]
                for item in round_data.replay_items}
    third = store.pair(None, store.feedback_by_id("votes", [used[2]])[0]["pair_id"])
    # the third used vote: B, the longer, won between ("short", "a longer reply")
    assert replayed[third["replies"][0]["id"]] == pytest.approx([-1 - 1 / 3, 1 + 1 / 3])
    assert len(replayed) == 6  # every used vote, each with its own rate


def test_the_learner_command_seeds_the_learner_with_seed(tmp_path, monkeypatch, capsys):
    import learner.__main__ as command
    import learner.worker

    seen = {}

    class Recorder:
        def __init__(self, config, store, loaded, *, seed=None, **kwargs):
            seen["seed"], seen["draw"] = seed, torch.rand(1).item()

        def round(self):
            return None

    monkeypatch.setattr(learner.worker, "Learner", Recorder)
    monkeypatch.setattr("chatbot.model.load_model", lambda *args, **kwargs: None)
    draws = []
    for _ in range(2):
        assert command.main(["--data-dir", str(tmp_path), "--seed", "7", "--once"]) == 0
        draws.append(seen["draw"])
    assert seen["seed"] == 7 and draws[0] == draws[1]  # torch seeded too
    assert "nothing pending" in capsys.readouterr().out


def test_fewer_votes_than_learn_every_are_learnt_once_nothing_new_comes(learner_config):
    """A person who votes twice and pauses: with --learn-every 4 their two votes wait for
    --learn-after-seconds of quiet, then make a round of their own."""
    import threading
    import time

    config = dataclasses.replace(learner_config, learn_every=4, learn_after_seconds=1.0,
                                 learner_poll_seconds=0.05)
    store = Store(config.db_path)
    collect_votes(config, store, ["A", "B"])
    learner = make_learner(config, store)
    stop = threading.Event()
    thread = threading.Thread(target=learner.run_forever, args=(stop,), daemon=True)
    started = time.monotonic()
    thread.start()
    deadline = started + 120
    while store.live_adapter_version() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join(60)
    (step,) = store.learner_steps()
    assert step["new_votes"] == 2 and store.pending_counts()["votes_pending"] == 0
    assert time.monotonic() - started >= 1.0  # not before the quiet second


def test_the_loss_bounds_reach_the_policy_gradient(learner_config, monkeypatch):
    """--dual-clip and --kl-linear-beyond are the round's: every pass of the policy gradient
    takes them from the config."""
    from learner import steps

    config = dataclasses.replace(learner_config, dual_clip=3.0, kl_linear_beyond=2.5)
    store = Store(config.db_path)
    collect_votes(config, store, ["A", "B", "A", "B"])
    seen = []
    loss = steps.policy_gradient_loss

    def spy(*args, **kwargs):
        seen.append((kwargs["dual_clip"], kwargs["kl_linear_beyond"]))
        return loss(*args, **kwargs)

    monkeypatch.setattr(steps, "policy_gradient_loss", spy)
    step = make_learner(config, store).round()
    assert step["status"] == "promoted" and seen and set(seen) == {(3.0, 2.5)}
