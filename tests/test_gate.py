"""The promotion gate on hand-made margins."""

from __future__ import annotations

import math

from learner.gate import decide, preference_accuracy


def test_accuracy_counts_ties_as_half():
    assert preference_accuracy([]) is None
    assert preference_accuracy([0.0, 0.0]) == 0.5  # the base model against itself
    assert preference_accuracy([1.0, -1.0, 2.0, 1e-5]) == 0.625


def test_kl_tripwire_rejects_whatever_the_accuracy():
    decision = decide([5.0] * 10, [0.0] * 10, kl=0.9, kl_tripwire=0.5)
    assert not decision.promote and "tripwire" in decision.reason
    assert not decide([1.0], [0.0], kl=math.nan, kl_tripwire=0.5).promote


def test_no_judged_pairs_passes_on_kl_alone():
    assert decide([], [], kl=0.1, kl_tripwire=0.5).promote


def test_one_flipped_pair_is_not_evidence_but_many_are():
    assert decide([-1.0, 1.0], [1.0, 1.0], kl=0.1, kl_tripwire=0.5).promote
    worse = decide([-1.0] * 4 + [1.0] * 6, [1.0] * 10, kl=0.1, kl_tripwire=0.5)
    assert not worse.promote and "significantly worse" in worse.reason
    assert decide([1.0] * 10, [-1.0] * 10, kl=0.1, kl_tripwire=0.5).promote  # better is fine


def test_against_the_base_model_ties():
    # the base scores 1/2 on every pair; a candidate wrong on 2 of 2 is not yet significant,
    # wrong on 6 of 6 is
    assert decide([-1.0, -1.0], [0.0, 0.0], kl=0.1, kl_tripwire=0.5).promote
    assert not decide([-1.0] * 6, [0.0] * 6, kl=0.1, kl_tripwire=0.5).promote
