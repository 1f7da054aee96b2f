"""The promotion gate: does a candidate adapter go live, or is it stored as rejected?

By default (`--judge-new` off) the round trains on its new votes at once, so there are no
votes the candidate has not seen: the gate checks the KL tripwire alone, and the live
adapter's accuracy on the new votes is only reported. Under --judge-new (test-then-train) the
evidence is the round's new votes, which neither the live adapter nor the candidate has
trained on (they join training from the next round on). Preference accuracy
is the share of those pairs where an adapter gives the chosen reply the higher per-token
log-ratio to the reference (the worker computes the margins; per token so that length alone
wins nothing). Ties (|margin| <= 1e-3 nats) count one half, so the base model scores 0.5.
The live adapter's accuracy on them is its running agreement with the newest votes: the number
a user can watch rise. A candidate passes if

* its per-token KL to the base is under the tripwire (the guard against collapse), and
* it is not worse than the live adapter on the same pairs. Both are judged pair by pair, so
  the comparison is paired: with d_i = score_candidate_i - score_live_i (each score 0, 1/2 or
  1), the candidate is rejected when sum(d) < -z * sqrt(sum(d^2)) - a one-sided sign test in
  the spirit of McNemar's (z = 1.64: worse at the 5% level). With a handful of pairs one
  flipped pair is not evidence; a candidate that loses on most of them is stopped.

Left out: multiple-comparison corrections across rounds, per-user evidence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Margins this close to 0 are float noise (batches padded differently), not a preference.
TIE_EPS = 1e-3


def pair_scores(margins: list[float]) -> list[float]:
    """1 if the chosen reply wins, 1/2 on a tie, 0 if the rejected one wins."""
    return [0.5 if abs(m) <= TIE_EPS else float(m > 0) for m in margins]


def preference_accuracy(margins: list[float]) -> float | None:
    """Share of pairs where the chosen reply has the higher log-ratio. None without pairs."""
    scores = pair_scores(margins)
    return sum(scores) / len(scores) if scores else None


@dataclass
class GateDecision:
    promote: bool
    reason: str


def decide(candidate_margins: list[float], live_margins: list[float], kl: float,
           kl_tripwire: float, z: float = 1.64) -> GateDecision:
    if not math.isfinite(kl) or kl > kl_tripwire:
        return GateDecision(False, f"KL {kl:.3f} per token is over the tripwire {kl_tripwire}")
    n = len(candidate_margins)
    if n == 0:
        return GateDecision(True, "no unseen votes to judge on; KL under the tripwire")
    assert len(live_margins) == n
    diffs = [c - s for c, s in zip(pair_scores(candidate_margins), pair_scores(live_margins))]
    total, spread = sum(diffs), math.sqrt(sum(d * d for d in diffs))
    candidate_acc = preference_accuracy(candidate_margins)
    live_acc = preference_accuracy(live_margins)
    summary = f"agrees with {candidate_acc:.2f} of the new votes, live {live_acc:.2f} ({n} pairs)"
    if total < 0 and total < -z * spread:
        return GateDecision(False, f"{summary}: significantly worse")
    return GateDecision(True, summary)
