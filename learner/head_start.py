"""The next round's first optimizer step, begun between rounds.

A round's first step runs at the live weights, which do not change until the round publishes:
its gradient is a sum of one term per sample, and the terms of the samples known before the
round - the replayed votes (drawn as soon as the last round ended), then each pending vote as
it comes in - can be computed while the learner would otherwise wait. A `HeadStart` holds
what those terms give: the sum of their gradients, each sample's per-token log-probs at the
live weights (the step's trust-region anchors, and the live margins' log-probs) and the loss
and KL sums the round logs. The round that follows adds the terms of the samples that came
last and takes the step: the same sum in another order.

The gradients are summed with a normalizer of 1 and divided by the round's own (samples x
longest reply) when the round takes them, since that depends on the samples still to come.
A head start is for one live version and one KL coefficient; the round uses it only if every
sample in it is one of the round's first slice (`rest_of`), and otherwise computes the whole
step as before.

Left out: DPO (its step is over pairs, not samples), the later steps of a round (they run at
weights only the round itself produces), the reward model's samples (--self-samples).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from learner.batch import Sample


def sample_key(sample: Sample) -> tuple[int, float]:
    """What makes two samples the same term of a step: the reply and its advantage (a reply
    can be in a round twice: voted on, and rated)."""
    return (sample.reply_id, sample.advantage)


@dataclass
class HeadStart:
    version: int  # the live adapter version whose weights the terms were computed at
    beta: float  # the KL coefficient they were computed with
    done: Counter = field(default_factory=Counter)  # sample_key of each sample summed in
    grads: list[torch.Tensor | None] = field(default_factory=list)  # per trainable parameter
    anchors: dict[int, torch.Tensor] = field(default_factory=dict)  # reply id -> log-probs
    live_totals: dict[int, float] = field(default_factory=dict)  # reply id -> summed log-prob
    loss_sum: float = 0.0  # of the summed terms, normalizer 1
    kl_tokens: float = 0.0  # the k3 KL summed over their tokens
    clipped_tokens: float = 0.0  # tokens where the clip binds (none at the live weights)
    kl_loss_sum: float = 0.0  # the KL penalty's part of loss_sum
    largest: dict | None = None  # the largest token term (objectives.largest_term)

    def fits(self, version: int | None, beta: float) -> bool:
        return self.version == version and self.beta == beta

    def rest_of(self, samples: list[Sample]) -> list[Sample] | None:
        """The samples whose terms are still to compute, in their order; None if a sample
        summed in here is not among `samples` (its term cannot be taken back out)."""
        have = Counter(map(sample_key, samples))
        if any(have[key] < n for key, n in self.done.items()):
            return None
        skip, rest = Counter(self.done), []
        for sample in samples:
            key = sample_key(sample)
            if skip[key]:
                skip[key] -= 1
            else:
                rest.append(sample)
        return rest

    def add_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Move the parameters' gradients into the sum, leaving them empty."""
        if not self.grads:
            self.grads = [None] * len(params)
        for i, p in enumerate(params):
            if p.grad is not None:
                self.grads[i] = p.grad if self.grads[i] is None else self.grads[i] + p.grad
            p.grad = None

    def put_grads(self, params: list[torch.nn.Parameter], normalizer: float) -> None:
        """Set the parameters' gradients to the sum divided by the round's normalizer."""
        for p, g in zip(params, self.grads or [None] * len(params)):
            p.grad = None if g is None else g / normalizer
