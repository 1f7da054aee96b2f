"""The learner's passes that train nothing: the reference (base model) log-probs of each reply,
the exact KL of the weights as they are to the base, the summed log-prob of a reply, and the
per-token margins the gate and the Learning tab read.

Reference log-probs are computed once per reply and cached in the store; the reference's full
distributions over the next round's KL replies are kept in memory between rounds (up to
KEEP_REFERENCE_BYTES), so the round's KL check needs a pass of the policy alone.

Left out: anything that changes the weights (learner/steps.py, learner/step_loop.py).
"""

from __future__ import annotations

import torch

from learner.batch import Sample, collate, distributions, right_aligned_rows, taken, token_logprobs
from learner.clock import RoundClock
from learner.data import PreferencePair, RoundBuilder, RoundData

MICRO_BATCH = 8  # replies per forward/backward; gradients are accumulated across them
KL_REPLIES = 16  # replies the candidate's exact KL to the base is measured on, per round
# The reference's full distributions over the next round's KL replies, computed between rounds
# and kept until it runs, up to this many bytes (16 replies of 64 tokens of the embedded
# model's 49,152-word vocabulary in float32: 200 MB); beyond it the round computes them.
KEEP_REFERENCE_BYTES = 512 * 2**20


def kl_replies(data: RoundData) -> list[Sample]:
    """The replies a round measures its candidate's KL on: those most like the candidate's own,
    the round's newest (a full-vocabulary pass per reply is the round's most expensive
    scoring, so KL_REPLIES at most), each reply once: the judged replies are the new ones
    unless --judge-new. Sampled replies only: a person's rewrite is what the policy is taught
    to move toward, and the KL at its positions would say how far it moved there, not how far
    its own replies are from the base's."""
    replies = {s.reply_id: s for s in data.new_samples + data.replay_samples
               + data.judged_samples if s.behaviour is not None}
    return list(replies.values())[:KL_REPLIES]


def by_prompt(samples: list[Sample]) -> list[Sample]:
    """Samples grouped by prompt, shorter prompts first, then shorter replies: a pair's replies
    fall in one micro batch, which reads their prompt once (learner/batch.py), and rows are
    padded to lengths near their own. For passes where the order changes no result."""
    return sorted(samples, key=lambda s: (len(s.prompt), s.prompt, len(s.reply)))


class Scorer:
    def __init__(self, model, store, builder: RoundBuilder, clock: RoundClock, *,
                 pad_id: int, vocab_size: int, device: torch.device) -> None:
        self.model = model  # the learner's PeftModel: the adapter off is the reference
        self.store = store
        self.builder = builder
        self.clock = clock
        self.pad_id = pad_id
        self.vocab_size = vocab_size
        self.device = device
        # reply id -> the reference's log-probs over the vocabulary at each of its tokens, for
        # the next round's KL check (computed between rounds; see kl_replies)
        self.reference_distributions: dict[int, torch.Tensor] = {}

    def fill_reference(self, samples: list[Sample], keep: list[Sample] = ()) -> None:
        """Compute (once, then cached in the DB) each reply's log-probs under the base model.
        `keep`: replies whose full reference distributions to keep for the next KL check, in
        the same pass (`reference_distributions`, up to KEEP_REFERENCE_BYTES)."""
        kept = self.reference_distributions
        budget = KEEP_REFERENCE_BYTES - sum(t.numel() * t.element_size() for t in kept.values())
        keep_ids = set()
        for sample in keep:
            size = len(sample.reply) * self.vocab_size * 4  # float32
            if sample.reply_id not in kept and sample.reply_id not in keep_ids and size <= budget:
                keep_ids.add(sample.reply_id)
                budget -= size
        every = list(samples) + list(keep)
        unknown = {s.reply_id for s in every if s.ref is None}
        todo = {s.reply_id: s for s in every if s.reply_id in unknown | keep_ids}
        by_reply: dict[int, list[float]] = {}
        with torch.no_grad(), self.model.disable_adapter():
            for micro in self.clock.micro_batches(by_prompt(list(todo.values())), MICRO_BATCH):
                batch = collate(micro, self.pad_id, self.device)
                everything = distributions(self.model, batch)
                logp = taken(everything, batch)
                for row, sample in enumerate(micro):
                    n = len(sample.reply)
                    by_reply[sample.reply_id] = logp[row, -n:].tolist()
                    if sample.reply_id in keep_ids:
                        kept[sample.reply_id] = everything[row, -n:].clone()
        for reply_id in unknown:
            values = by_reply[reply_id]
            if reply_id > 0:  # not the learner's own samples, nor a person's rewrite
                self.store.cache_ref_logprobs(reply_id, values)
            self.builder.remember_reference(reply_id, values)
        for sample in every:
            if sample.ref is None:
                sample.ref = by_reply[sample.reply_id]

    def keep_only(self, samples: list[Sample]) -> None:
        """Drop the kept reference distributions of replies other than `samples`."""
        wanted = {s.reply_id for s in samples}
        for reply_id in set(self.reference_distributions) - wanted:
            del self.reference_distributions[reply_id]

    def score(self, samples: list[Sample]) -> list[float]:
        """Summed log-prob of each sample's reply under the weights as they are now."""
        totals = []
        with torch.no_grad():
            for micro in self.clock.micro_batches(samples, MICRO_BATCH):
                batch = collate(micro, self.pad_id, self.device)
                totals += token_logprobs(self.model, batch).sum(-1).tolist()
        return totals

    def exact_kl(self, samples: list[Sample]) -> tuple[float, int]:
        """KL(pi(.|prefix) || ref(.|prefix)) summed over the whole vocabulary at each reply
        position, summed over positions; and the number of positions. The reference's
        distributions come from `reference_distributions` where they were kept (a pass of the
        policy alone), else from a reference pass here.

        Exact at each position, whichever token was sampled there, unlike k3 on the stored
        tokens: after training, the rejected replies' tokens are unlikely under the policy,
        and k3 on them would report a large KL that the policy's own samples do not have.
        """
        kept = self.reference_distributions
        total, tokens = 0.0, 0
        with torch.no_grad():
            for group in ([s for s in samples if s.reply_id in kept],
                          [s for s in samples if s.reply_id not in kept]):
                for micro in self.clock.micro_batches(by_prompt(group), MICRO_BATCH):
                    batch = collate(micro, self.pad_id, self.device)
                    logp = distributions(self.model, batch)
                    if micro[0].reply_id in kept:  # the whole group is
                        ref = right_aligned_rows([kept[s.reply_id] for s in micro], logp)
                    else:
                        with self.model.disable_adapter():
                            ref = distributions(self.model, batch)
                    kl = (logp.exp() * (logp - ref)).sum(-1)  # (B, R)
                    total += (kl * batch.mask).sum().item()
                    tokens += int(batch.mask.sum().item())
        return total, tokens

    def judged_margins(self, pairs: list[PreferencePair],
                       known: dict[int, float] | None = None) -> list[float]:
        """Margin per pair under the weights as they are now: the chosen reply's per-token
        log-ratio to the reference minus the rejected one's. `known`: summed log-probs by
        reply id already computed at these weights; the other replies are scored here.

        Per token, not summed: a summed log-ratio favours the shorter reply whatever the user
        chose (every token of a longer reply adds its own shift), so the gate would reward
        length for its own sake. The base model scores every margin exactly 0.
        """
        totals = dict(known or {})
        unknown = list({s.reply_id: s for p in pairs for s in (p.chosen, p.rejected)
                        if s.reply_id not in totals}.values())
        totals.update(zip([s.reply_id for s in unknown], self.score(unknown)))

        def per_token(s: Sample) -> float:
            return (totals[s.reply_id] - sum(s.ref)) / len(s.reply)

        return [per_token(p.chosen) - per_token(p.rejected) for p in pairs]
