"""HeadStart's bookkeeping: which of a step's samples are left to compute, and its gradients
summed apart from the parameters' and divided by the round's normalizer."""

from __future__ import annotations

from collections import Counter

import torch

from learner.batch import Sample
from learner.head_start import HeadStart, sample_key


def sample(reply_id: int, advantage: float) -> Sample:
    return Sample(reply_id, [1], [2], [0.0], advantage)


def test_rest_of_leaves_what_is_not_summed_and_refuses_what_is_not_in_the_step():
    head = HeadStart(version=1, beta=0.05)
    a, b, c = sample(1, 1.0), sample(2, -1.0), sample(3, 1.0)
    head.done.update(map(sample_key, [a, b]))
    assert head.rest_of([c, a, b]) == [c]
    # the same reply twice (voted on, and rated): one copy summed, one left
    rated = sample(1, 0.5)
    head.done.update([sample_key(rated)])
    assert head.rest_of([a, b, rated, sample(1, 0.5)]) == [sample(1, 0.5)]
    # a sample it summed that the step lacks, or with another advantage: cannot be used
    assert head.rest_of([a, c, rated]) is None
    assert head.rest_of([a, sample(2, -0.5), rated]) is None
    assert head.fits(1, 0.05) and not head.fits(2, 0.05) and not head.fits(1, 0.1)


def test_gradients_are_summed_apart_and_given_back_divided():
    weight = torch.nn.Parameter(torch.zeros(3))
    bias = torch.nn.Parameter(torch.zeros(1))
    head = HeadStart(version=0, beta=0.0, done=Counter())
    for scale in (1.0, 2.0):
        (scale * weight.sum()).backward()
        head.add_grads([weight, bias])
        assert weight.grad is None and bias.grad is None
    head.put_grads([weight, bias], normalizer=6.0)
    assert torch.equal(weight.grad, torch.full((3,), 0.5))
    assert bias.grad is None  # no term reached it
