"""The step loop: a round's optimizer steps as its objective lays them out (learner/steps.py),
whatever the objective. The gradient norm is clipped to 1.0; a step whose loss or gradient is
not finite is skipped (no parameter or optimizer change), and `max_bad_steps` such steps in a
row fail the round. Each step's stats are gathered into the round's: the mean loss and its KL
part, the last KL estimate, the largest token term, the live weights' totals.

Left out: what a step computes (learner/steps.py), the round around the steps
(learner/rounds.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from chatbot.errors import DuetError
from learner.data import RoundData
from learner.head_start import HeadStart
from learner.objectives import larger
from learner.steps import Objective
from learner.weights import TrainableAdapter

log = logging.getLogger(__name__)


class RoundFailed(DuetError):
    """Too many non-finite steps, or another reason to publish nothing this round."""


def take_steps(objective: Objective, adapter: TrainableAdapter, data: RoundData,
               head: HeadStart | None = None,
               after_first_step: Callable[[dict[int, float]], None] | None = None, *,
               max_bad_steps: int = 3, on_step: Callable[[], None] = lambda: None) -> dict:
    """The round's optimizer steps, as `objective.schedule(data)` lays them out. Returns step
    stats: the mean loss and the KL penalty's mean part of it, the last step's KL estimate,
    skipped and taken steps, the largest token term of any step taken (`largest_term`, with
    its step and sample: objectives.largest_term), and `live_totals`: the summed log-prob of
    each reply the first step saw, at the live weights.

    `head`: the first step's terms summed between rounds, used if the objective finds it
    usable. `after_first_step`: called with those live totals once the first optimizer step
    is taken, if more follow (the preview); it must leave the weights as they are. `on_step`:
    after every optimizer step (the heartbeat)."""
    params = adapter.parameters()
    optimizer = adapter.the_optimizer()
    schedule = objective.schedule(data)
    if not schedule:
        return {"loss": None, "kl": None, "skipped_steps": 0, "steps": 0, "live_totals": {},
                "kl_loss": None, "largest_term": None, "clip_fraction": None}
    head = objective.usable(head, schedule[0][0])
    losses, kls, skipped, bad_in_a_row, live_totals = [], [], 0, 0, {}
    kl_losses, largest = [], None
    planned, tried = sum(steps for _, steps in schedule), 0
    for part, steps in schedule:
        anchors: dict[int, torch.Tensor] = {}  # reply id -> log-probs at the slice's start
        for _ in range(steps):
            tried += 1
            first_of_slice = not anchors  # its ratios are all 1: only KL makes a term large
            optimizer.zero_grad(set_to_none=True)
            if head is not None:  # the first step, begun between rounds
                step = objective.accumulate(part, anchors, head=head)
            else:
                step = objective.accumulate(part, anchors)
            head = None
            anchors.update(step.anchors)
            if not losses:  # no step taken yet: these are the live weights' log-probs
                live_totals.update(step.totals)
            loss, kl = step.loss, step.kl
            grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            if not (math.isfinite(loss) and torch.isfinite(grad_norm)):
                skipped += 1
                bad_in_a_row += 1
                log.warning("skipped a step: loss %s, grad norm %s", loss, grad_norm.item())
                optimizer.zero_grad(set_to_none=True)
                anchors.clear()  # taken from a broken forward pass: take them again
                if bad_in_a_row >= max_bad_steps:
                    raise RoundFailed(f"{bad_in_a_row} steps in a row had a non-finite loss "
                                      "or gradient; nothing was published")
                continue
            bad_in_a_row = 0
            optimizer.step()
            losses.append(loss)
            kls.append(kl)
            kl_losses.append(step.kl_loss)
            if step.largest is not None:
                largest = larger(largest, {**step.largest, "step": tried,
                                           "first_of_slice": first_of_slice})
            on_step()
            if after_first_step is not None and len(losses) == 1 and tried < planned:
                after_first_step(dict(live_totals))
    return {"loss": sum(losses) / len(losses) if losses else None,
            "kl": kls[-1] if kls else None, "skipped_steps": skipped, "steps": len(losses),
            "clip_fraction": objective.clip_fraction, "live_totals": live_totals,
            "kl_loss": sum(kl_losses) / len(kl_losses) if kl_losses else None,
            "largest_term": largest}
