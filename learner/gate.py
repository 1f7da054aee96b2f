"""The promotion gate: does a candidate adapter go live, or is it stored as rejected?

Held-out preference accuracy is the share of held-out voted pairs where the adapter gives the
chosen reply the higher log-ratio to the reference, log pi(chosen)/ref(chosen) versus
log pi(rejected)/ref(rejected). Ties (|margin| <= 1e-3 nats) count one half, so the base
model itself scores 0.5. A candidate passes if

* its per-token KL to the base is under the tripwire (the guard against collapse), and
* its accuracy is not worse than the live adapter's on the same held-out pairs, beyond the
  noise of that many pairs: one standard error of a fair coin, sqrt(0.25 / n), plus an optional
  extra `tolerance`. Without that allowance a handful of held-out pairs would reject good
  candidates by chance early on; with hundreds it shrinks to a few points.

Left out: significance tests across several candidates, per-user held-out sets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Margins this close to 0 are float noise (batches padded differently), not a preference.
TIE_EPS = 1e-3


def preference_accuracy(margins: torch.Tensor) -> float | None:
    """margins: (P,) chosen log-ratio minus rejected log-ratio. None when there are no pairs."""
    if margins.numel() == 0:
        return None
    ties = margins.abs() <= TIE_EPS
    return ((margins > TIE_EPS).float() + 0.5 * ties.float()).mean().item()


@dataclass
class GateDecision:
    promote: bool
    reason: str


def decide(candidate_acc: float | None, live_acc: float | None, n_heldout: int, kl: float,
           kl_tripwire: float, tolerance: float = 0.0) -> GateDecision:
    if not math.isfinite(kl) or kl > kl_tripwire:
        return GateDecision(False, f"KL {kl:.3f} per token is over the tripwire {kl_tripwire}")
    if candidate_acc is None or live_acc is None or n_heldout == 0:
        return GateDecision(True, "no held-out votes yet; KL under the tripwire")
    allowance = math.sqrt(0.25 / n_heldout) + tolerance
    if candidate_acc < live_acc - allowance:
        return GateDecision(False, f"held-out accuracy {candidate_acc:.3f} is worse than the live "
                                   f"adapter's {live_acc:.3f} by more than {allowance:.3f} "
                                   f"({n_heldout} pairs)")
    return GateDecision(True, f"held-out accuracy {candidate_acc:.3f} vs live {live_acc:.3f} "
                              f"({n_heldout} pairs)")
