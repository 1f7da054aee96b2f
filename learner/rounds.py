"""One round, top to bottom: claim the pending feedback -> build the batch -> add the objective's
own samples -> reference log-probs -> steps (the preview after the first) -> check -> publish.

A round starts from the live adapter's weights (so a rejected candidate or a rollback never
leaks into the next one), scores the live adapter - and under --judge-new the candidate - on
the round's new votes, publishes the candidate as `adapters/v{N}` and registers it as live or
rejected (with PostgreSQL, together with the folder's files, for front-ends on other hosts) -
and only then marks the feedback used, in the same commit. If anything fails before that
commit, the claims are released and the feedback stays pending; a crash at any moment loses
no vote.

The preview (--preview, on by default): after a round's first optimizer step the learner checks
those weights as it checks the round's candidate (the same KL tripwire, on the newest half of
its KL replies, and under --judge-new the same gate) and, if they pass, publishes them live
while it takes the round's other steps, so a vote is served after one step instead of all of
them. A preview uses no feedback and moves no KL coefficient, and the round's candidate is
computed as without it; when the round ends its version replaces the preview, and if that one
is rejected (or the round fails, or the learner dies during it: checked at start), the version
the round started from is live again. The cost: one more pass of the policy over
PREVIEW_KL_REPLIES replies.

Under --kl-backtrack (on by default) a candidate over the KL tripwire is not rejected
outright, which drops the first look at its round's votes: like TRPO's line search (Schulman
et al. 2015), the learner moves its weights back to half, then a quarter of the round's step
and checks each in turn; the first to pass goes live, and the round's metrics say which
(`step_fraction`, `kl_full_step`). The KL coefficient follows the whole step's KL, as without
it (and jumps by --kl-trip-factor, steps.PolicyGradient.after_round). The cost: a KL check
per fraction tried, only in such rounds.

Left out: what happens between rounds (learner/worker.py `prepare`, learner/loop.py), and a
way out for a live version that itself sits at the tripwire, from which every fraction of a
step passes it too (docs/learning.md).
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from dataclasses import dataclass, field

from chatbot.states import AdapterStatus, RoundOutcome
from learner import gate
from learner.data import RoundData
from learner.scoring import KL_REPLIES, kl_replies

log = logging.getLogger(__name__)

# The preview's check reads the first half of the KL replies: the newest votes' replies, the
# ones its one step trained on (in a round that fell behind, its first slice's). That pass is
# most of the time between its step and its going live.
PREVIEW_KL_REPLIES = 8
# Under --kl-backtrack: the fractions of a round's step tried, in turn, when the whole of it
# passes the KL tripwire.
BACKTRACK_FRACTIONS = (0.5, 0.25)


@dataclass
class RoundResult:
    """What a round computed: the source of both its adapter's metrics and its step row."""
    version: int
    parent: int
    objective: str
    data: RoundData
    claimed: dict
    stats: dict  # take_steps'
    kl: float
    decision: gate.GateDecision
    live_acc: float | None
    candidate_acc: float | None
    beta: float
    preview: dict = field(default_factory=dict)
    reward_stats: dict = field(default_factory=dict)
    backtrack: dict = field(default_factory=dict)  # step_fraction, kl_full_step
    phase_seconds: dict = field(default_factory=dict)
    micro_batches_by_threads: dict = field(default_factory=dict)

    def metrics(self) -> dict:
        return {"loss": self.stats["loss"], "kl": self.kl, "train_k3": self.stats["kl"],
                "kl_loss": self.stats.get("kl_loss"),
                "largest_term": self.stats.get("largest_term"),
                "clip_fraction": self.stats.get("clip_fraction"),
                "heldout_acc": self.candidate_acc, "live_heldout_acc": self.live_acc,
                "judged_pairs": len(self.data.judged), "beta": self.beta,
                "objective": self.objective, "steps": self.stats["steps"],
                "phase_seconds": {k: round(v, 3) for k, v in self.phase_seconds.items()},
                "micro_batches_by_threads": {str(k): v for k, v in
                                             sorted(self.micro_batches_by_threads.items())},
                **({"preview": self.preview} if self.preview else {}),
                **({"shorter_wins": round(self.data.shorter_wins, 3)}
                   if self.data.shorter_wins is not None else {}), **self.backtrack,
                **self.reward_stats}

    def step(self, seconds: float) -> dict:
        """The learner_steps row, as the gate decided (the registry may still refuse to
        promote: LearnerStore.finish_round)."""
        rewards = self.data.rewards
        status = RoundOutcome.PROMOTED if self.decision.promote else RoundOutcome.REJECTED
        return {"adapter_version": self.version, "parent_version": self.parent,
                "objective": self.objective, "status": status,
                "loss": self.stats["loss"], "kl": self.kl,
                "reward": sum(rewards) / len(rewards) if rewards else None, "beta": self.beta,
                "votes_used": sum(map(len, self.claimed.values())),
                "new_votes": len(rewards), "replayed_votes": self.data.replayed_items,
                "skipped_steps": self.stats["skipped_steps"], "heldout_acc": self.candidate_acc,
                "live_heldout_acc": self.live_acc, "judged_pairs": len(self.data.judged),
                "seconds": seconds, "note": self.decision.reason}


def run_round(learner) -> dict | None:
    """Run one round over the feedback pending now (`learner`: a learner.worker.Learner).
    Returns the learner_steps row, or None when nothing is pending."""
    round_id = uuid.uuid4().hex
    config, store = learner.config, learner.store
    claimed = store.claim_feedback(round_id, config.max_batch_votes, config.max_user_share)
    if not any(claimed.values()):
        return None
    started = time.perf_counter()
    learner.live_preview = None
    try:
        return _round(learner, round_id, claimed, started)
    except BaseException as exc:
        store.release_claims(round_id)
        if learner.live_preview is not None:  # the round's outcome stands, and it has none
            store.withdraw_preview(*learner.live_preview, reason="withdrawn: its round failed")
        learner.adapter.version = None  # weights may be half-trained: reload the live ones
        if isinstance(exc, Exception):
            store.log_failed_round(round_id, {
                "objective": config.objective, "note": str(exc)[:500],
                "seconds": time.perf_counter() - started})
        raise


def _round(learner, round_id: str, claimed: dict, started: float) -> dict:
    clock, scorer, objective, adapter = (learner.clock, learner.scorer, learner.objective,
                                         learner.adapter)
    clock.reset()
    with clock.phase("sync_to_live"):
        adapter.sync_to_live()
    parent = adapter.version
    start = adapter.snapshot() if learner.config.kl_backtrack else None
    data = learner.builder.build(claimed)
    reward_stats = objective.add_samples(data)
    judged_samples = data.judged_samples
    with clock.phase("reference"):
        # the KL check's reference distributions in the same pass, where not kept yet
        scorer.fill_reference(data.samples + judged_samples, kl_replies(data))
    # The live weights' log-probs of the judged replies: the first training step computes
    # those it trains on; the others are scored before training.
    first_step = set() if data.judge_only else objective.first_step_replies(data)
    with clock.phase("margins"):
        before = [s for s in judged_samples if s.reply_id not in first_step]
        scored = dict(zip([s.reply_id for s in before], scorer.score(before)))
    head, learner.head_start = learner.head_start, None
    preview: dict = {}
    with clock.phase("train"):
        stats = learner.train(
            data, head,
            after_first_step=(lambda first: preview.update(
                run_preview(learner, round_id, data, {**scored, **first}, parent)))
            if learner.config.preview else None)
    live_totals = {**scored, **stats["live_totals"]}  # the live weights' summed log-probs
    with clock.phase("margins"):
        live_list = live_margins(learner, data, live_totals, stepped=bool(stats["steps"]))
    with clock.phase("kl_check"):
        kl, candidate_list, decision = check(learner, data, live_list)
        full_kl, backtrack = kl, {}
        if start is not None and stats["steps"] and kl > learner.config.kl_tripwire:
            kl, candidate_list, decision, backtrack = shorten_step(
                learner, data, live_list, start, (kl, candidate_list, decision))
    scorer.reference_distributions.clear()
    objective.after_round(full_kl, stats["steps"])
    if learner.live_preview is not None:  # the preview is live: it is this version's parent
        parent = learner.live_preview[0]
    result = RoundResult(
        version=learner.store.next_adapter_version(), parent=parent, objective=objective.name,
        data=data, claimed=claimed, stats=stats, kl=kl, decision=decision,
        live_acc=gate.preference_accuracy(live_list),
        candidate_acc=gate.preference_accuracy(candidate_list),
        beta=learner.kl_control.beta, preview=preview, reward_stats=reward_stats,
        backtrack=backtrack,
        phase_seconds=clock.seconds, micro_batches_by_threads=clock.micro_batches_by_threads)
    metrics = result.metrics()
    with clock.phase("publish"):  # in the log line; the metrics are written before it
        row, files = adapter.publish(result.version, parent, metrics)
    step = result.step(time.perf_counter() - started)
    status = learner.store.finish_round(
        round_id, {**row, "status": (AdapterStatus.LIVE if decision.promote
                                     else AdapterStatus.REJECTED),
                   "reason": decision.reason},
        step, files=files,
        preview_parent=learner.live_preview[1] if learner.live_preview else None)
    learner.live_preview = None
    if status == AdapterStatus.LIVE:
        adapter.went_live(result.version)
    else:  # rejected, or a rollback came first (finish_round stores the step so too)
        step["status"] = RoundOutcome.REJECTED
        adapter.version = None  # the weights are the rejected candidate's
    log.info("round %s: v%d %s (%s) in %.1f s (%s; micro batches by threads %s), loss %s, "
             "KL %.4f, %d new + %d replayed; largest token term %s", round_id[:8],
             result.version, step["status"], decision.reason, step["seconds"],
             ", ".join(f"{k} {v:.1f} s" for k, v in clock.seconds.items()),
             metrics["micro_batches_by_threads"], stats["loss"], kl,
             step["new_votes"], step["replayed_votes"], stats.get("largest_term"))
    retire_old_versions(learner.store, learner.config)
    return step


def live_margins(learner, data: RoundData, live_totals: dict[int, float],
                 stepped: bool) -> list[float]:
    """The live adapter's margins on the round's judged votes, from the log-probs at the live
    weights. Without an optimizer step (nothing to train on) the weights are still the live
    ones, and judged_margins scores what is missing; after one, nothing may be."""
    missing = {s.reply_id for s in data.judged_samples} - live_totals.keys()
    assert not (missing and stepped), f"live log-probs missing for {missing}"
    return learner.scorer.judged_margins(data.judged, live_totals)


def check(learner, data: RoundData, live_list: list[float], replies: int = KL_REPLIES
          ) -> tuple[float, list[float], gate.GateDecision]:
    """The gate on the weights as they are now: their exact per-token KL to the base over the
    first `replies` of the round's KL replies, and (under --judge-new) their margins on the
    votes they have not trained on, against the live adapter's `live_list`."""
    scorer, config = learner.scorer, learner.config
    # Only votes the candidate has not trained on can judge it.
    candidate_list = scorer.judged_margins(data.judged) if data.judge_only else []
    kl_sum, tokens = scorer.exact_kl(kl_replies(data)[:replies])
    kl = kl_sum / tokens if tokens else 0.0
    return kl, candidate_list, gate.decide(candidate_list, live_list, kl, config.kl_tripwire,
                                           config.gate_z)


def shorten_step(learner, data: RoundData, live_list: list[float], start: list,
                 full: tuple[float, list[float], gate.GateDecision]
                 ) -> tuple[float, list[float], gate.GateDecision, dict]:
    """The line search of --kl-backtrack (see the module's docstring): the weights moved back
    to each of BACKTRACK_FRACTIONS of the round's step from `start`, checked in turn; the
    first that passes the gate stays. If none does, the whole step's weights and check `full`
    stand (the candidate is rejected as before). Also returns the round's metrics of it."""
    end = learner.adapter.snapshot()
    full_kl = full[0]
    for fraction in BACKTRACK_FRACTIONS:
        learner.adapter.move_between(start, end, fraction)
        kl, candidate_list, decision = check(learner, data, live_list)
        if decision.promote:
            reason = (f"KL {full_kl:.3f} per token over the tripwire "
                      f"{learner.config.kl_tripwire}; {fraction} of the step: {decision.reason}")
            return kl, candidate_list, gate.GateDecision(True, reason), {
                "step_fraction": fraction, "kl_full_step": full_kl}
    learner.adapter.move_between(start, end, 1.0)
    return (*full, {"step_fraction": 0.0, "kl_full_step": full_kl})


def run_preview(learner, round_id: str, data: RoundData, live_totals: dict[int, float],
                parent: int) -> dict:
    """After the round's first optimizer step: gate the weights as they are and, if they pass,
    publish them live (see the module's docstring). The weights, the optimizer and the KL
    coefficient are left as they are. Returns what it did, for the round's metrics: the
    version (None if not live), its KL and the gate's reason."""
    with learner.clock.phase("preview"):
        try:
            return _preview(learner, round_id, data, live_totals, parent)
        except Exception as exc:  # noqa: BLE001 - the round goes on without its preview
            log.exception("round %s: its first step could not be published", round_id[:8])
            return {"version": None, "kl": None, "note": f"failed: {exc}"[:300]}


def _preview(learner, round_id: str, data: RoundData, live_totals: dict[int, float],
             parent: int) -> dict:
    live_list = live_margins(learner, data, live_totals, stepped=True)
    kl, candidate_list, decision = check(learner, data, live_list, PREVIEW_KL_REPLIES)
    done = {"version": None, "kl": kl, "note": decision.reason}
    if not decision.promote:
        log.info("round %s: its first step is not published: %s", round_id[:8],
                 decision.reason)
        return done
    version = learner.store.next_adapter_version()
    row, files = learner.adapter.publish(version, parent, {
        "steps": 1, "kl": kl, "beta": learner.kl_control.beta,
        "objective": learner.objective.name,
        "heldout_acc": gate.preference_accuracy(candidate_list),
        "live_heldout_acc": gate.preference_accuracy(live_list),
        "judged_pairs": len(data.judged)})
    status = learner.store.publish_preview(
        {**row, "preview_of": round_id, "status": AdapterStatus.LIVE,
         "reason": f"preview: round {round_id[:8]} after its first step"}, files=files)
    if status == AdapterStatus.LIVE:
        learner.live_preview = (version, parent)
        done["version"] = version
    log.info("round %s: its first step published as v%d (%s), KL %.4f", round_id[:8],
             version, status, kl)
    return done


def retire_old_versions(store, config) -> None:
    """Unregister the folders the registry's retention rule lets go (`old_folders`: all but
    the newest `keep_versions` rounds' versions and the live one), then delete them. In that
    order a kill between the two leaves a folder the registry does not know, which the next
    start deletes (`adapters.remove_stale`), never a registered path with no folder."""
    for row in store.old_folders(config.keep_versions):
        store.set_adapter_path(row["version"], None)
        shutil.rmtree(config.adapters_dir / row["path"], ignore_errors=True)
