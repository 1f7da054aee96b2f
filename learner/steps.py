"""What a round's optimizer steps compute: the two objectives behind one interface.

`PolicyGradient` (the default) is the seed's estimator with its guards (learner/objectives.py):
each step sums -min(rho A, clip(rho) A) + beta k3 over a slice's samples, the trust region
anchored at the slice's first step; it also brings the samples a round adds to its feedback
(fresh replies for replayed corrections, the reward model's self-samples) and begins the next
round's first step between rounds (learner/head_start.py). `DirectPreference` trains DPO on
the same pairs, for comparison. Both answer the same questions: what to step on and how often
(`schedule`), which replies the first step scores at the live weights, the gradient of one
step (`accumulate`), what to do once the round's KL is known.

Left out: the loop that takes the steps (learner/step_loop.py), the round around them
(learner/rounds.py), the passes that train nothing (learner/scoring.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from chatbot.config import Config
from learner.batch import (
    Sample,
    collate,
    ref_to_tensor,
    right_aligned_rows,
    sample_kind,
    token_logprobs,
)
from learner.clock import RoundClock
from learner.data import PreferencePair, RoundBuilder, RoundData
from learner.head_start import HeadStart, sample_key
from learner.objectives import (
    AdaptiveKLController,
    damp_negative,
    dpo_loss,
    k3_kl,
    larger,
    policy_gradient_loss,
    rloo_advantages,
)
from learner.reward import SelfSampler
from learner.scoring import MICRO_BATCH, by_prompt
from learner.weights import TrainableAdapter

# Replies the learner samples on a replayed correction's prompt to compare its rewrite with: a
# pair, as the turn had (SelfSampler.sample).
FRESH_REPLIES = 2

Schedule = list[tuple[list, int]]  # (what one step trains on, steps), in order


@dataclass
class Terms:
    """What a pass over samples computed beside their gradients (which it added to the
    parameters' .grad): its loss, the k3 KL and the clipped tokens summed over the samples'
    tokens, and, at the weights it ran at, each new reply's per-token log-probs (its trust-
    region anchor) and each reply's summed log-prob."""
    loss: float = 0.0
    kl_tokens: float = 0.0
    clipped: float = 0.0
    anchors: dict[int, torch.Tensor] = field(default_factory=dict)
    totals: dict[int, float] = field(default_factory=dict)
    kl_loss: float = 0.0  # the KL penalty's part of `loss`
    largest: dict | None = None  # the largest token term (objectives.largest_term)


@dataclass
class Step:
    """One step's gradient's by-products: its loss, its per-token KL estimate, the anchors it
    took (reply id -> per-token log-probs) and the summed log-prob of each reply it saw."""
    loss: float
    kl: float
    anchors: dict[int, torch.Tensor] = field(default_factory=dict)
    totals: dict[int, float] = field(default_factory=dict)
    kl_loss: float = 0.0
    largest: dict | None = None


def steps_for(config: Config, new_items: int) -> int:
    """`steps_per_round` for every `learn_every` new votes in the round: when votes come in
    faster than rounds finish, a round takes a bigger batch, and each vote must still get the
    optimizer steps it would have had in rounds of its own (through the API, 64 quick votes
    made 5 rounds of up to 16 and 10 steps in all, where 16 rounds make 32). The policy
    gradient takes them slice by slice (RoundData.sliced_samples)."""
    return config.steps_per_round * max(1, math.ceil(new_items / config.learn_every))


def replayed_rewrites(data: RoundData) -> list[list[Sample]]:
    """The round's replayed corrections still without fresh replies: items of one rewrite."""
    return [item for item in data.replay_items if len(item) == 1 and item[0].behaviour is None]


class Objective:
    """What an objective answers for a round: what it adds to the feedback (`add_samples`,
    `add_fresh_replies`), what to step on and how often (`schedule`), which replies the first
    step scores at the live weights, one step's gradient (`accumulate`), whether a head start
    begun between rounds serves (`usable`, `head_start`), and what follows the round's KL
    (`after_round`). The defaults here are an objective that adds nothing, has no head start
    and leaves the KL coefficient alone."""
    name: str
    clip_fraction: float | None = None  # of the last step's tokens

    def __init__(self, config: Config, adapter: TrainableAdapter, builder: RoundBuilder,
                 clock: RoundClock, self_sampler: SelfSampler, kl_control: AdaptiveKLController,
                 *, pad_id: int, device: torch.device) -> None:
        self.config = config
        self.adapter = adapter
        self.builder = builder
        self.clock = clock
        self.self_sampler = self_sampler
        self.kl_control = kl_control
        self.pad_id = pad_id
        self.device = device

    def add_samples(self, data: RoundData) -> dict:
        return {}

    def add_fresh_replies(self, data: RoundData) -> None:
        pass

    def schedule(self, data: RoundData) -> Schedule:
        raise NotImplementedError

    def first_step_replies(self, data: RoundData) -> set[int]:
        raise NotImplementedError

    def usable(self, head: HeadStart | None, first: list) -> HeadStart | None:
        return None

    def head_start(self, draft: RoundData, head: HeadStart | None) -> HeadStart | None:
        return None

    def accumulate(self, items: list, anchors: dict[int, torch.Tensor],
                   head: HeadStart | None = None) -> Step:
        raise NotImplementedError

    def after_round(self, kl: float, steps: int) -> None:
        pass


class PolicyGradient(Objective):
    name = "pg"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.clip_fraction = 0.0
        # (live version, {rewrite's reply id -> replies sampled on its prompt at that version})
        self._fresh: tuple[int | None, dict[int, list[Sample]]] = (None, {})

    # --- what a round trains on --------------------------------------------------------

    def add_samples(self, data: RoundData) -> dict:
        """The samples a round adds to its feedback: fresh replies for its replayed
        corrections, and with --self-samples the reward model's pairs. Returns the reward
        model's stats, for the round's metrics."""
        if replayed_rewrites(data):
            with self.clock.phase("fresh_replies"):
                self.add_fresh_replies(data)
        if self.config.self_samples <= 0:
            return {}
        with self.clock.phase("self_samples"):
            data.scored_samples, stats = self.self_sampler.samples(self.builder.voted_pairs(),
                                                                   data.judged)
        return stats

    def add_fresh_replies(self, data: RoundData) -> None:
        """Give each replayed correction (its rewrite alone, see learner/data.py) FRESH_REPLIES
        replies the live weights sample on its prompt, and make the item DITTO's comparison
        (Shaikh et al. 2025): the rewrite better than what the policy says now, the leave-one-
        out advantages of rewards (1, 0, 0), +1 for the rewrite and -1/2 for each fresh reply
        (damped like any negative advantage). The turn's own replies were the policy's a round
        or more ago and are not pushed down again; these are its own, so their trust region
        and KL start where the policy is. Sampled once per live version and kept, so the
        round and the head start begun before it (`Learner.prepare`) train on the same
        replies. DPO keeps its pairs against the turn's replies."""
        version, kept = self._fresh
        if version != self.adapter.version:
            kept = {}
            self._fresh = (self.adapter.version, kept)
        items = replayed_rewrites(data)
        todo = [item[0] for item in items if item[0].reply_id not in kept]
        if todo:
            samples = self.self_sampler.sample([s.prompt for s in todo])
            rewards = torch.tensor([[1.0] + [0.0] * FRESH_REPLIES])
            _, *rest = rloo_advantages(rewards)[0].tolist()
            for i, rewrite in enumerate(todo):
                fresh = samples[FRESH_REPLIES * i:FRESH_REPLIES * (i + 1)]
                for sample, advantage in zip(fresh, rest):
                    sample.advantage = damp_negative(advantage, self.config.negative_weight)
                kept[rewrite.reply_id] = fresh
        for item in items:
            item.extend(kept[item[0].reply_id])

    def schedule(self, data: RoundData) -> Schedule:
        """`steps_per_round` steps on each of the round's slices in turn (one slice per
        `learn_every` new votes, each with its replayed share; RoundData.sliced_samples), the
        trust region anchored afresh at each slice's first step. A learner that fell behind
        thus does what the rounds it missed would have done (one batch under one anchor
        learned far less through the API: docs/results.md)."""
        if not data.samples:
            return []
        return [(by_prompt(part), self.config.steps_per_round)
                for part in data.sliced_samples()]

    def first_step_replies(self, data: RoundData) -> set[int]:
        """The replies the round's first step computes log-probs of at the live weights."""
        slices = data.sliced_samples()
        return {s.reply_id for s in slices[0]} if slices else set()

    # --- the head start ----------------------------------------------------------------

    def usable(self, head: HeadStart | None, first: list) -> HeadStart | None:
        """`head` if it was begun at these weights and every sample in it is in the round's
        first slice `first`; else None (the step is computed whole)."""
        if head and head.fits(self.adapter.version, self.kl_control.beta) \
                and head.rest_of(first) is not None:
            return head
        return None

    def head_start(self, draft: RoundData, head: HeadStart | None) -> HeadStart | None:
        """Add the terms of the next round's known samples (`draft`, its reference log-probs
        filled in) to `head`, or to a new head start if `head` no longer fits; returns it."""
        slices = draft.sliced_samples()
        if draft.slices != 1 or not slices:
            return head
        version, beta = self.adapter.version, self.kl_control.beta
        if head is None or not head.fits(version, beta):
            head = HeadStart(version, beta)
        todo = head.rest_of(slices[0])
        if todo is None:  # a sample it summed is no longer in the draft: start again
            head = HeadStart(version, beta)
            todo = slices[0]
        if not todo:
            return head
        params = self.adapter.parameters()
        for p in params:
            p.grad = None
        terms = self.terms(by_prompt(todo), head.anchors, normalizer=1.0)
        head.add_grads(params)
        head.anchors.update(terms.anchors)
        head.live_totals.update(terms.totals)
        head.loss_sum += terms.loss
        head.kl_loss_sum += terms.kl_loss
        head.largest = larger(head.largest, terms.largest)
        head.kl_tokens += terms.kl_tokens
        head.clipped_tokens += terms.clipped
        head.done.update(map(sample_key, todo))
        return head

    # --- one step's gradient -----------------------------------------------------------

    def accumulate(self, samples: list[Sample], anchors: dict[int, torch.Tensor],
                   head: HeadStart | None = None) -> Step:
        """One step's gradient. The clipped ratio is taken against `anchors` (reply id ->
        per-token log-probs at the slice's first step; empty on that step, which anchors every
        reply where it computes it and returns the anchors in its Step): a trust region around
        where the round started, not around the version that sampled the reply. Against the
        stored behaviour log-probs, 31-65% of the tokens were clipped at a round's last step in
        a run where votes trained a round late, and a stale vote could be clipped from the
        first step on; anchored at the round's start, every round's first step has the full
        gradient on every sample. The Step's `totals` are the samples' summed log-probs at the
        weights the step ran at (on a round's first step the live ones: the live margins take
        them).
        `head`: the first step's terms already summed for some of the samples, between rounds
        (learner/head_start.py); only the rest are computed here.
        Same idea as the proximal policy of decoupled PPO (Hilton et al. 2021); the pairwise
        contrast (chosen up, rejected down on one prompt) needs no importance weight to the
        sampler to point the right way."""
        width = max(len(s.reply) for s in samples)
        normalizer = float(len(samples) * width)  # a constant, not each reply's length
        todo, done = samples, Terms()
        if head is not None:
            todo = head.rest_of(samples)
            assert todo is not None, "the head start has samples this step does not"
            head.put_grads(self.adapter.parameters(), normalizer)
            done = Terms(head.loss_sum / normalizer, head.kl_tokens, head.clipped_tokens,
                         dict(head.anchors), dict(head.live_totals),
                         head.kl_loss_sum / normalizer, head.largest)
        if todo:
            more = self.terms(todo, {**anchors, **done.anchors}, normalizer)
            done = Terms(done.loss + more.loss, done.kl_tokens + more.kl_tokens,
                         done.clipped + more.clipped, {**done.anchors, **more.anchors},
                         {**done.totals, **more.totals}, done.kl_loss + more.kl_loss,
                         larger(done.largest, more.largest))
        tokens = max(sum(len(s.reply) for s in samples), 1)
        self.clip_fraction = done.clipped / tokens
        return Step(done.loss, done.kl_tokens / tokens, done.anchors, done.totals,
                    done.kl_loss, done.largest)

    def terms(self, samples: list[Sample], anchors: dict[int, torch.Tensor],
              normalizer: float) -> Terms:
        """Backpropagate the samples' policy-gradient loss terms (gradients add up in the
        parameters' .grad); a sample not in `anchors` is anchored at this pass's log-probs
        (and the anchor is in the returned Terms)."""
        model = self.adapter.model
        loss_sum, kl_tokens, clipped, kl_loss, largest = 0.0, 0.0, 0.0, 0.0, None
        found: dict[int, torch.Tensor] = {}
        totals: dict[int, float] = {}
        for micro in self.clock.micro_batches(samples, MICRO_BATCH):
            batch = collate(micro, self.pad_id, self.device)
            logp = token_logprobs(model, batch)
            fresh = logp.detach()
            anchor = right_aligned_rows(
                [anchors[s.reply_id] if s.reply_id in anchors
                 else found.setdefault(s.reply_id, fresh[row, -len(s.reply):])
                 for row, s in enumerate(micro)], fresh)
            totals.update(zip([s.reply_id for s in micro], fresh.sum(-1).tolist()))
            ref = ref_to_tensor(micro, batch.reply_width, self.device)
            written = [s.behaviour is None for s in micro]  # a person's rewrite
            loss, stats = policy_gradient_loss(
                logp, anchor, ref, batch.advantages, batch.mask,
                beta=self.kl_control.beta, clip_eps=self.config.clip_eps, normalizer=normalizer,
                dual_clip=self.config.dual_clip,
                kl_linear_beyond=self.config.kl_linear_beyond,
                demonstration=torch.tensor(written, device=logp.device) if any(written)
                else None)
            loss.backward()
            micro_tokens = batch.mask.sum().item()
            loss_sum += loss.item()
            kl_loss += stats["kl_loss"]
            if stats["largest"] is not None:
                found_at = dict(stats["largest"])
                sample = micro[found_at.pop("row")]
                largest = larger(largest, {**found_at, "reply_id": sample.reply_id,
                                           "kind": sample_kind(sample)})
            kl_tokens += stats["kl"] * micro_tokens
            clipped += stats["clip_fraction"] * micro_tokens
        return Terms(loss_sum, kl_tokens, clipped, found, totals, kl_loss, largest)

    def after_round(self, kl: float, steps: int) -> None:
        """The round's exact KL is known (its whole step's): the KL coefficient follows it (a
        budget), and jumps by --kl-trip-factor where it passed the tripwire."""
        if steps:
            self.kl_control.update(kl, n_steps=steps)
            if kl > self.config.kl_tripwire:
                self.kl_control.tripped(self.config.kl_trip_factor)


class DirectPreference(Objective):
    """DPO (Rafailov et al. 2023) on the round's pairs: `steps_for` steps over all of them.
    It adds no samples of its own (a correction trains against its turn's replies,
    learner/data.py) and has no head start."""
    name = "dpo"

    def schedule(self, data: RoundData) -> Schedule:
        return [(data.pairs, steps_for(self.config, len(data.rewards)))] if data.pairs else []

    def first_step_replies(self, data: RoundData) -> set[int]:
        return {s.reply_id for p in data.pairs for s in (p.chosen, p.rejected)}

    def accumulate(self, pairs: list[PreferencePair], anchors: dict,
                   head: HeadStart | None = None) -> Step:
        """One step's gradient over every pair; its Step's totals as the policy gradient's."""
        loss_sum, kl_sum, tokens, totals = 0.0, 0.0, 0, {}
        for micro in self.clock.micro_batches(pairs, MICRO_BATCH // 2):
            samples = [p.chosen for p in micro] + [p.rejected for p in micro]
            batch = collate(samples, self.pad_id, self.device)
            logp = token_logprobs(self.adapter.model, batch)
            ref = ref_to_tensor(samples, batch.reply_width, self.device)
            seq, seq_ref = logp.sum(-1), (ref * batch.mask).sum(-1)
            totals.update(zip([s.reply_id for s in samples], seq.detach().tolist()))
            n = len(micro)
            loss = dpo_loss(seq[:n], seq[n:], seq_ref[:n], seq_ref[n:],
                            beta=self.config.dpo_beta) * n / len(pairs)
            loss.backward()
            loss_sum += loss.item()
            kl_sum += (k3_kl(logp.detach(), ref) * batch.mask).sum().item()
            tokens += int(batch.mask.sum().item())
        return Step(loss_sum, kl_sum / max(tokens, 1), totals=totals)


OBJECTIVES = {o.name: o for o in (PolicyGradient, DirectPreference)}  # by --objective
