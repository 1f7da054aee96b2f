"""The learner: rounds of claim -> train the LoRA adapter -> gate -> publish (when a round
runs, and what it does between rounds, is learner/loop.py's).

A round claims the pending feedback, starts from the live adapter's weights (so a rejected
candidate or a rollback never leaks into the next one), takes `steps_per_round` optimizer
steps over the new and replayed samples (and, with --self-samples, pairs it sampled itself
and scored with a reward model fitted on the votes), scores the live adapter - and under
--judge-new the candidate - on the round's new votes, publishes the candidate as
`adapters/v{N}` and registers it as live or rejected (with PostgreSQL, together with the
folder's files, for front-ends on other hosts) - and only then marks the feedback used,
in the same commit. If anything fails before that commit, the claims are released and the
feedback stays pending; a crash at any moment loses no vote.

The preview (--preview, on by default): after a round's first optimizer step the learner checks
those weights as it checks the round's candidate (the same KL tripwire, on the newest half of
its KL replies, and under --judge-new the same gate) and, if they pass, publishes them live
while it takes the round's other steps, so a vote is served after one step instead of all of
them. A preview uses no feedback and moves no KL coefficient, and the round's candidate is
computed as without it; when the round ends its version replaces the preview, and if that one
is rejected (or the round fails, or the learner dies during it: checked at start), the version
the round started from is live again. The cost: one more pass of the policy over
PREVIEW_KL_REPLIES replies.

Between rounds (`prepare`: when a round ends, and as each vote comes in) the learner does what
the next round would do first: the new replies' reference log-probs, the reference's
distributions for its KL check, and its first step's terms for the samples known so far
(learner/head_start.py), so a round that a vote completes starts with the others' done.

Guards: gradient norm clipped to 1.0; a step whose loss or gradient is not finite is skipped
(no parameter or optimizer change), and `max_bad_steps` such steps in a round fail the round
with nothing published; the KL tripwire (and under --judge-new the paired gate on unseen
votes) stops a collapsing candidate.

The learner keeps its AdamW moments from round to round (a fresh Adam's first steps are sign
steps: every LoRA weight moves by the full learning rate, signal or noise), also across a
rejected candidate, whose weights it drops for the live ones. Only when it loads a version
that is not on its own line - at start, after a rollback - does it start a fresh optimizer.
Nothing else lives only in memory: the KL coefficient is read back from the last
learner_steps row, so a killed learner restarts from the DB and the adapters folder and
carries on.

Left out: multi-GPU training, saving optimizer moments to disk, gradient checkpointing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import shutil
import time
import uuid
from collections.abc import Callable, Iterator

import torch

from chatbot import adapters
from chatbot.config import Config
from chatbot.errors import AdapterError, DuetError
from chatbot.model import LoadedModel
from chatbot.sampling import end_of_turn_id, reply_token_ids
from chatbot.states import AdapterStatus, RoundOutcome
from chatbot.store import Store
from learner import gate
from learner.batch import (
    Sample,
    collate,
    distributions,
    ref_to_tensor,
    right_aligned_rows,
    taken,
    token_logprobs,
)
from learner.data import PreferencePair, RoundBuilder, RoundData
from learner.head_start import HeadStart, sample_key
from learner.loop import LearnerLoop
from learner.objectives import (
    AdaptiveKLController,
    damp_negative,
    dpo_loss,
    k3_kl,
    policy_gradient_loss,
    rloo_advantages,
)
from learner.reward import SelfSampler

log = logging.getLogger(__name__)

MICRO_BATCH = 8  # replies per forward/backward; gradients are accumulated across them
# Replies the learner samples on a replayed correction's prompt to compare its rewrite with: a
# pair, as the turn had (SelfSampler.sample).
FRESH_REPLIES = 2
KL_REPLIES = 16  # replies the candidate's exact KL to the base is measured on, per round
# The preview's check reads the first half of them: the newest votes' replies, the ones its one
# step trained on (in a round that fell behind, its first slice's). That pass is most of the
# time between its step and its going live.
PREVIEW_KL_REPLIES = 8
# The reference's full distributions over the next round's KL replies, computed between rounds
# and kept until it runs, up to this many bytes (16 replies of 64 tokens of the embedded
# model's 49,152-word vocabulary in float32: 200 MB); beyond it the round computes them.
KEEP_REFERENCE_BYTES = 512 * 2**20


class RoundFailed(DuetError):
    """Too many non-finite steps, or another reason to publish nothing this round."""


def chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


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


def replayed_rewrites(data: RoundData) -> list[list[Sample]]:
    """The round's replayed corrections still without fresh replies: items of one rewrite."""
    return [item for item in data.replay_items if len(item) == 1 and item[0].behaviour is None]


def by_prompt(samples: list[Sample]) -> list[Sample]:
    """Samples grouped by prompt, shorter prompts first, then shorter replies: a pair's replies
    fall in one micro batch, which reads their prompt once (learner/batch.py), and rows are
    padded to lengths near their own. For passes where the order changes no result."""
    return sorted(samples, key=lambda s: (len(s.prompt), s.prompt, len(s.reply)))


class Learner:
    def __init__(self, config: Config, store: Store, loaded: LoadedModel, *,
                 max_bad_steps: int = 3, seed: int | None = None) -> None:
        from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

        self.config = config
        self.store = store
        self.loaded = loaded
        self.max_bad_steps = max_bad_steps
        model = loaded.model
        if loaded.quantize != "none":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        self.model = get_peft_model(model, lora)
        self.model.train()
        self.initial_lora = {k: v.detach().clone()
                             for k, v in get_peft_model_state_dict(self.model).items()}
        self.adapter_version: int | None = None  # whose weights the trainable adapter holds
        steps = store.learner_steps(limit=1)
        beta = steps[-1]["beta"] if steps and steps[-1].get("beta") else config.beta
        # A budget, not a target: beta never drops below --beta, and rises only while the KL
        # is over --kl-budget (a low target pulls the policy back just as it starts to learn).
        self.kl_control = AdaptiveKLController(beta, config.kl_budget,
                                               bounds=(config.beta, 10.0))
        self.builder = RoundBuilder(store, config.replay, judge_new=config.judge_new,
                                    max_user_share=config.max_user_share,
                                    rng=random.Random(seed),
                                    negative_weight=config.negative_weight,
                                    learn_every=config.learn_every,
                                    encode_reply=functools.partial(
                                        reply_token_ids, loaded.tokenizer,
                                        end_of_turn_id(loaded.model, loaded.tokenizer)))
        self.pad_id = loaded.tokenizer.pad_token_id
        self.vocab_size = loaded.model.config.vocab_size
        self.self_sampler = SelfSampler(self.model, loaded.tokenizer, config, loaded.device,
                                        self.pad_id, random.Random(seed))
        self.head_start: HeadStart | None = None  # the next round's first step, begun
        # (live version, {rewrite's reply id -> replies sampled on its prompt at that version})
        self._fresh: tuple[int | None, dict[int, list[Sample]]] = (None, {})
        # reply id -> the reference's log-probs over the vocabulary at each of its tokens, for
        # the next round's KL check (computed between rounds; see kl_replies)
        self.reference_distributions: dict[int, torch.Tensor] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.optimizer_origin: int | None = None  # the version the moments grew from
        self._clip_fraction = 0.0
        self.on_step = lambda: None  # called after every optimizer step (heartbeats)
        self.pace = lambda: None  # called before every micro batch (learner/cores.py)
        # Where the current round's time goes, and the torch threads its micro batches ran on
        # (the CPU share changes them): in the round's metrics and log line.
        self.phase_seconds: dict[str, float] = {}
        self._open_phase: list | None = None  # [name, since] of the phase being timed
        self.micro_batches_by_threads: dict[int, int] = {}
        self._preview: tuple[int, int] | None = None  # (version, parent) of a live preview

    # --- weights -----------------------------------------------------------------------

    def sync_to_live(self) -> None:
        """Load the live adapter's weights into the trainable adapter (v0: fresh LoRA)."""
        from peft import set_peft_model_state_dict

        live = self.store.live_adapter()
        version = live["version"] if live else 0
        if version == self.adapter_version:
            return
        if version == 0:
            state = self.initial_lora
        else:
            verified = adapters.verified_copy(self.config.adapters_dir, live,
                                              base_model=self.loaded.model_id,
                                              fetch=self.store.adapter_files)
            if verified.config.get("r") != self.config.lora_r:
                raise AdapterError(f"the live adapter v{version} has rank "
                                   f"{verified.config.get('r')}, the learner was started with "
                                   f"--lora-r {self.config.lora_r}")
            state = adapters.load_state_dict(verified)
        result = set_peft_model_state_dict(self.model, state)
        if version != self.optimizer_origin:
            # Moments gathered on another line of versions (start, rollback) do not apply.
            # After a rejected candidate the live version is the one the moments grew from,
            # and a fresh Adam's first sign-steps would only add noise: keep them.
            self.optimizer = None
            self.optimizer_origin = version
        if getattr(result, "unexpected_keys", None):
            raise AdapterError(f"v{version} has weights this model lacks: "
                               f"{result.unexpected_keys[:3]}")
        self.adapter_version = version

    def _lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _micro_batches(self, items: list, size: int) -> Iterator[list]:
        """`chunks`, with a call to `pace` before each: the learner's CPU share may change."""
        for micro in chunks(items, size):
            self.pace()
            threads = torch.get_num_threads()
            self.micro_batches_by_threads[threads] = \
                self.micro_batches_by_threads.get(threads, 0) + 1
            yield micro

    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        """Add the block's seconds to `phase_seconds[name]`; a phase inside another one counts
        for itself only (the preview inside training)."""
        outer = self._open_phase
        if outer is not None:
            self._add_phase_time(outer)
        self._open_phase = [name, time.perf_counter()]
        try:
            yield
        finally:
            self._add_phase_time(self._open_phase)
            self._open_phase = outer
            if outer is not None:  # the outer phase goes on from here
                outer[1] = time.perf_counter()

    def _add_phase_time(self, phase: list) -> None:
        """Add the time since `phase` = [name, since] to its name, and restart it from now."""
        if self.loaded.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.phase_seconds[phase[0]] = self.phase_seconds.get(phase[0], 0.0) + now - phase[1]
        phase[1] = now

    # --- scoring -----------------------------------------------------------------------

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
            for micro in self._micro_batches(by_prompt(list(todo.values())), MICRO_BATCH):
                batch = collate(micro, self.pad_id, self.loaded.device)
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

    def prepare(self) -> None:
        """While the next round waits for a full batch, what it would otherwise do first: the
        pending feedback's reference log-probs, the reference distributions of its KL check,
        and (policy gradient) its first step's terms for the samples known so far - the
        replayed votes, then each pending vote (learner/head_start.py)."""
        started = time.perf_counter()
        draft = self.builder.draft()
        if self.config.objective == "pg":
            self.sync_to_live()
            self.add_fresh_replies(draft)
        keep = kl_replies(draft)
        wanted = {s.reply_id for s in keep}
        for reply_id in set(self.reference_distributions) - wanted:
            del self.reference_distributions[reply_id]
        self.fill_reference(draft.samples + draft.judged_samples, keep)
        if self.config.objective == "pg":
            self._start_next_round(draft)
        log.info("next round prepared in %.1f s: %d new and %d replayed items, first-step terms "
                 "of %d samples, %d reference distributions kept", time.perf_counter() - started,
                 len(draft.new_items), len(draft.replay_items),
                 sum(self.head_start.done.values()) if self.head_start else 0,
                 len(self.reference_distributions))

    def _start_next_round(self, draft: RoundData) -> None:
        """Add the terms of the next round's known samples (`draft`) to the head start."""
        self.sync_to_live()
        slices = draft.sliced_samples()
        if draft.slices != 1 or not slices:
            return
        head = self.head_start
        if head is None or not head.fits(self.adapter_version, self.kl_control.beta):
            head = HeadStart(self.adapter_version, self.kl_control.beta)
        todo = head.rest_of(slices[0])
        if todo is None:  # a sample it summed is no longer in the draft: start again
            head = HeadStart(self.adapter_version, self.kl_control.beta)
            todo = slices[0]
        self.head_start = head
        if not todo:  # (prepare has filled in the draft's reference log-probs)
            return
        params = self._lora_parameters()
        for p in params:
            p.grad = None
        try:
            loss, kl_tokens, clipped = self._pg_terms(by_prompt(todo), head.anchors,
                                                      head.live_totals, normalizer=1.0)
            head.add_grads(params)
        except BaseException:
            self.head_start = None  # half-summed: the round computes its first step whole
            raise
        head.loss_sum += loss
        head.kl_tokens += kl_tokens
        head.clipped_tokens += clipped
        head.done.update(map(sample_key, todo))

    def add_fresh_replies(self, data: RoundData) -> None:
        """Give each replayed correction (its rewrite alone, see learner/data.py) FRESH_REPLIES
        replies the live weights sample on its prompt, and make the item DITTO's comparison
        (Shaikh et al. 2025): the rewrite better than what the policy says now, the leave-one-
        out advantages of rewards (1, 0, 0), +1 for the rewrite and -1/2 for each fresh reply
        (damped like any negative advantage). The turn's own replies were the policy's a round
        or more ago and are not pushed down again; these are its own, so their trust region
        and KL start where the policy is. Sampled once per live version and kept, so the
        round and the head start begun before it (`prepare`) train on the same replies.
        Policy gradient only: DPO keeps its pairs against the turn's replies."""
        version, kept = self._fresh
        if version != self.adapter_version:
            kept = {}
            self._fresh = (self.adapter_version, kept)
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

    def score(self, samples: list[Sample]) -> list[float]:
        """Summed log-prob of each sample's reply under the weights as they are now."""
        totals = []
        with torch.no_grad():
            for micro in self._micro_batches(samples, MICRO_BATCH):
                batch = collate(micro, self.pad_id, self.loaded.device)
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
                for micro in self._micro_batches(by_prompt(group), MICRO_BATCH):
                    batch = collate(micro, self.pad_id, self.loaded.device)
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

    def _first_step_replies(self, data: RoundData) -> set[int]:
        """The replies the round's first optimizer step computes log-probs of, at the live
        weights (its trust-region anchors): the live margins take those from it."""
        if data.judge_only:
            return set()
        if self.config.objective == "dpo":
            return {s.reply_id for p in data.pairs for s in (p.chosen, p.rejected)}
        slices = data.sliced_samples()
        return {s.reply_id for s in slices[0]} if slices else set()

    # --- training ----------------------------------------------------------------------

    def _accumulate_pg(self, samples: list[Sample], anchors: dict[int, torch.Tensor],
                       live_totals: dict[int, float] | None = None,
                       head: HeadStart | None = None) -> tuple[float, float]:
        """One step's gradient. The clipped ratio is taken against `anchors` (reply id ->
        per-token log-probs at the round's first step, the live weights, filled in on that
        step): a trust region around where the round started, not around the version that
        sampled the reply. Against the stored behaviour log-probs, 31-65% of the tokens were
        clipped at a round's last step in a run where votes trained a round late, and a stale
        vote could be clipped from the first step on; anchored at the round's start, every
        round's first step has the full gradient on every sample.
        `live_totals` (given while no optimizer step has been taken this round: the weights
        are the live ones) gets each sample's summed log-prob, for the live margins.
        `head`: the first step's terms already summed for some of the samples, between rounds
        (learner/head_start.py); only the rest are computed here.
        Same idea as the proximal policy of decoupled PPO (Hilton et al. 2021); the pairwise
        contrast (chosen up, rejected down on one prompt) needs no importance weight to the
        sampler to point the right way."""
        width = max(len(s.reply) for s in samples)
        normalizer = float(len(samples) * width)  # a constant, not each reply's length
        todo, loss_sum, kl_tokens, clipped = samples, 0.0, 0.0, 0.0
        if head is not None:
            todo = head.rest_of(samples)
            assert todo is not None, "the head start has samples this step does not"
            head.put_grads(self._lora_parameters(), normalizer)
            anchors.update(head.anchors)
            if live_totals is not None:
                live_totals.update(head.live_totals)
            loss_sum, kl_tokens, clipped = (head.loss_sum / normalizer, head.kl_tokens,
                                            head.clipped_tokens)
        if todo:
            more = self._pg_terms(todo, anchors, live_totals, normalizer)
            loss_sum, kl_tokens, clipped = (loss_sum + more[0], kl_tokens + more[1],
                                            clipped + more[2])
        tokens = max(sum(len(s.reply) for s in samples), 1)
        self._clip_fraction = clipped / tokens
        return loss_sum, kl_tokens / tokens

    def _pg_terms(self, samples: list[Sample], anchors: dict[int, torch.Tensor],
                  live_totals: dict[int, float] | None,
                  normalizer: float) -> tuple[float, float, float]:
        """Backpropagate the samples' policy-gradient loss terms (gradients add up in the
        parameters' .grad); a sample not in `anchors` is anchored at this pass's log-probs.
        Returns the loss, and the KL and the clipped tokens summed over the samples' tokens."""
        loss_sum, kl_tokens, clipped = 0.0, 0.0, 0.0
        for micro in self._micro_batches(samples, MICRO_BATCH):
            batch = collate(micro, self.pad_id, self.loaded.device)
            logp = token_logprobs(self.model, batch)
            fresh = logp.detach()
            anchor = right_aligned_rows(
                [anchors.setdefault(s.reply_id, fresh[row, -len(s.reply):])
                 for row, s in enumerate(micro)], fresh)
            if live_totals is not None:
                live_totals.update(zip([s.reply_id for s in micro], fresh.sum(-1).tolist()))
            ref = ref_to_tensor(micro, batch.reply_width, self.loaded.device)
            written = [s.behaviour is None for s in micro]  # a person's rewrite
            loss, stats = policy_gradient_loss(
                logp, anchor, ref, batch.advantages, batch.mask,
                beta=self.kl_control.beta, clip_eps=self.config.clip_eps, normalizer=normalizer,
                demonstration=torch.tensor(written, device=logp.device) if any(written)
                else None)
            loss.backward()
            micro_tokens = batch.mask.sum().item()
            loss_sum += loss.item()
            kl_tokens += stats["kl"] * micro_tokens
            clipped += stats["clip_fraction"] * micro_tokens
        return loss_sum, kl_tokens, clipped

    def _accumulate_dpo(self, pairs: list[PreferencePair],
                        live_totals: dict[int, float] | None = None) -> tuple[float, float]:
        loss_sum, kl_sum, tokens = 0.0, 0.0, 0
        for micro in self._micro_batches(pairs, MICRO_BATCH // 2):
            samples = [p.chosen for p in micro] + [p.rejected for p in micro]
            batch = collate(samples, self.pad_id, self.loaded.device)
            logp = token_logprobs(self.model, batch)
            ref = ref_to_tensor(samples, batch.reply_width, self.loaded.device)
            seq, seq_ref = logp.sum(-1), (ref * batch.mask).sum(-1)
            if live_totals is not None:
                live_totals.update(zip([s.reply_id for s in samples], seq.detach().tolist()))
            n = len(micro)
            loss = dpo_loss(seq[:n], seq[n:], seq_ref[:n], seq_ref[n:],
                            beta=self.config.dpo_beta) * n / len(pairs)
            loss.backward()
            loss_sum += loss.item()
            kl_sum += (k3_kl(logp.detach(), ref) * batch.mask).sum().item()
            tokens += int(batch.mask.sum().item())
        return loss_sum, kl_sum / max(tokens, 1)

    def steps_for(self, new_items: int) -> int:
        """`steps_per_round` for every `learn_every` new votes in the round: when votes come in
        faster than rounds finish, a round takes a bigger batch, and each vote must still get
        the optimizer steps it would have had in rounds of its own (through the API, 64 quick
        votes made 5 rounds of up to 16 and 10 steps in all, where 16 rounds make 32). The
        policy gradient takes them slice by slice (see `train`)."""
        return self.config.steps_per_round * max(1, math.ceil(new_items
                                                              / self.config.learn_every))

    def train(self, data: RoundData, live_totals: dict[int, float] | None = None,
              head: HeadStart | None = None,
              after_first_step: Callable[[], None] | None = None) -> dict:
        """The round's optimizer steps. Returns step stats.

        Policy gradient: `steps_per_round` steps on each of the round's slices in turn (one
        slice per `learn_every` new votes, each with its replayed share; see
        RoundData.sliced_samples), the trust region anchored afresh at each slice's first
        step. A learner that fell behind thus does what the rounds it missed would have done
        (one batch under one anchor learned far less through the API: docs/results.md).
        DPO: `steps_for` steps over all the round's pairs.
        `live_totals`: filled with the summed log-prob of each reply the first step saw at the
        live weights (see _accumulate_pg).
        `head`: the first step's terms summed between rounds (learner/head_start.py), used if
        it was for these weights and every sample in it is in the first slice.
        `after_first_step`: called once the first optimizer step is taken, if more follow (the
        preview); it must leave the weights as they are."""
        params = self._lora_parameters()
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=0.0)
        optimizer = self.optimizer
        use_dpo = self.config.objective == "dpo"
        if (use_dpo and not data.pairs) or (not use_dpo and not data.samples):
            return {"loss": None, "kl": None, "skipped_steps": 0, "steps": 0}
        if use_dpo:
            schedule = [(None, self.steps_for(len(data.rewards)))]
        else:
            schedule = [(by_prompt(part), self.config.steps_per_round)
                        for part in data.sliced_samples()]
        if use_dpo or not (head and head.fits(self.adapter_version, self.kl_control.beta)
                           and head.rest_of(schedule[0][0]) is not None):
            head = None
        losses, kls, skipped, bad_in_a_row = [], [], 0, 0
        planned, tried = sum(steps for _, steps in schedule), 0
        for part, steps in schedule:
            anchors: dict[int, torch.Tensor] = {}  # reply id -> log-probs at the slice's start
            for _ in range(steps):
                tried += 1
                optimizer.zero_grad(set_to_none=True)
                live = live_totals if not losses else None  # no step taken: live weights
                if use_dpo:
                    loss, kl = self._accumulate_dpo(data.pairs, live)
                elif head is not None:  # the first step, begun between rounds
                    loss, kl = self._accumulate_pg(part, anchors, live, head=head)
                else:
                    loss, kl = self._accumulate_pg(part, anchors, live)
                head = None
                grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
                if not (math.isfinite(loss) and torch.isfinite(grad_norm)):
                    skipped += 1
                    bad_in_a_row += 1
                    log.warning("skipped a step: loss %s, grad norm %s", loss, grad_norm.item())
                    optimizer.zero_grad(set_to_none=True)
                    anchors.clear()  # taken from a broken forward pass: take them again
                    if bad_in_a_row >= self.max_bad_steps:
                        raise RoundFailed(f"{bad_in_a_row} steps in a row had a non-finite loss "
                                          "or gradient; nothing was published")
                    continue
                bad_in_a_row = 0
                optimizer.step()
                losses.append(loss)
                kls.append(kl)
                self.on_step()
                if after_first_step is not None and len(losses) == 1 and tried < planned:
                    after_first_step()
        return {"loss": sum(losses) / len(losses) if losses else None,
                "kl": kls[-1] if kls else None, "skipped_steps": skipped, "steps": len(losses),
                "clip_fraction": None if use_dpo else self._clip_fraction}

    # --- one round ---------------------------------------------------------------------

    def _live_margins(self, data: RoundData, live_totals: dict[int, float],
                      stepped: bool) -> list[float]:
        """The live adapter's margins on the round's judged votes, from the log-probs at the
        live weights. Without an optimizer step (nothing to train on) the weights are still
        the live ones, and judged_margins scores what is missing; after one, nothing may be."""
        missing = {s.reply_id for s in data.judged_samples} - live_totals.keys()
        assert not (missing and stepped), f"live log-probs missing for {missing}"
        return self.judged_margins(data.judged, live_totals)

    def _check(self, data: RoundData, live_list: list[float], replies: int = KL_REPLIES
               ) -> tuple[float, list[float], gate.GateDecision]:
        """The gate on the weights as they are now: their exact per-token KL to the base over
        the first `replies` of the round's KL replies, and (under --judge-new) their margins
        on the votes they have not trained on, against the live adapter's `live_list`."""
        # Only votes the candidate has not trained on can judge it.
        candidate_list = self.judged_margins(data.judged) if data.judge_only else []
        kl_sum, tokens = self.exact_kl(kl_replies(data)[:replies])
        kl = kl_sum / tokens if tokens else 0.0
        return kl, candidate_list, gate.decide(candidate_list, live_list, kl,
                                               self.config.kl_tripwire, self.config.gate_z)

    def preview(self, round_id: str, data: RoundData, live_totals: dict[int, float],
                parent: int) -> dict:
        """After the round's first optimizer step: gate the weights as they are and, if they
        pass, publish them live (see the module's docstring). The weights, the optimizer and
        the KL coefficient are left as they are. Returns what it did, for the round's metrics:
        the version (None if not live), its KL and the gate's reason."""
        with self._phase("preview"):
            try:
                return self._preview_now(round_id, data, live_totals, parent)
            except Exception as exc:  # noqa: BLE001 - the round goes on without its preview
                log.exception("round %s: its first step could not be published", round_id[:8])
                return {"version": None, "kl": None, "note": f"failed: {exc}"[:300]}

    def _preview_now(self, round_id: str, data: RoundData, live_totals: dict[int, float],
                     parent: int) -> dict:
        live_list = self._live_margins(data, live_totals, stepped=True)
        kl, candidate_list, decision = self._check(data, live_list, PREVIEW_KL_REPLIES)
        done = {"version": None, "kl": kl, "note": decision.reason}
        if not decision.promote:
            log.info("round %s: its first step is not published: %s", round_id[:8],
                     decision.reason)
            return done
        version = self.store.next_adapter_version()
        row, files = self._publish(version, parent, {
            "preview_of": round_id, "steps": 1, "kl": kl, "beta": self.kl_control.beta,
            "objective": self.config.objective,
            "heldout_acc": gate.preference_accuracy(candidate_list),
            "live_heldout_acc": gate.preference_accuracy(live_list),
            "judged_pairs": len(data.judged)})
        status = self.store.publish_preview(
            {**row, "status": AdapterStatus.LIVE,
             "reason": f"preview: round {round_id[:8]} after its first step"}, files=files)
        if status == AdapterStatus.LIVE:
            self._preview = (version, parent)
            done["version"] = version
        log.info("round %s: its first step published as v%d (%s), KL %.4f", round_id[:8],
                 version, status, kl)
        return done

    def _publish(self, version: int, parent: int, metrics: dict
                 ) -> tuple[dict, dict[str, bytes] | None]:
        """Write the trainable adapter as `v{version}` (adapters.publish). Returns its registry
        row, less its status and reason, and the files the store keeps with it (PostgreSQL)."""
        folder, sha = adapters.publish(
            self.config.adapters_dir, version, self.model.save_pretrained,
            base_model=self.loaded.model_id, parent_version=parent, metrics=metrics)
        row = {"version": version, "path": folder.name, "parent_version": parent,
               "base_model": self.loaded.model_id, "sha256": sha, "metrics": metrics}
        return row, adapters.folder_files(folder) if self.store.keeps_adapter_files else None

    def pending(self) -> int:
        counts = self.store.pending_counts()
        return (counts["votes_pending"] + counts["ratings_pending"]
                + counts["corrections_pending"])

    def round(self) -> dict | None:
        """Run one round over the feedback pending now. Returns the learner_steps row."""
        round_id = uuid.uuid4().hex
        claimed = self.store.claim_feedback(round_id, self.config.max_batch_votes,
                                            self.config.max_user_share)
        if not any(claimed.values()):
            return None
        started = time.perf_counter()
        self._preview = None
        try:
            return self._round(round_id, claimed, started)
        except BaseException as exc:
            self.store.release_claims(round_id)
            if self._preview is not None:  # the round's outcome stands, and it has none
                self.store.withdraw_preview(*self._preview, reason="withdrawn: its round failed")
            self.adapter_version = None  # weights may be half-trained: reload the live ones
            if isinstance(exc, Exception):
                self.store.log_failed_round(round_id, {
                    "objective": self.config.objective, "note": str(exc)[:500],
                    "seconds": time.perf_counter() - started})
            raise

    def _round(self, round_id: str, claimed: dict, started: float) -> dict:
        self.phase_seconds, self.micro_batches_by_threads = {}, {}
        with self._phase("sync_to_live"):
            self.sync_to_live()
        parent = self.adapter_version
        data = self.builder.build(claimed)
        if self.config.objective == "pg" and replayed_rewrites(data):
            with self._phase("fresh_replies"):
                self.add_fresh_replies(data)
        reward_stats = {}
        if self.config.objective == "pg" and self.config.self_samples > 0:
            with self._phase("self_samples"):
                data.scored_samples, reward_stats = self.self_sampler.samples(
                    self.builder.voted_pairs(), data.judged)
        judged_samples = data.judged_samples
        with self._phase("reference"):
            # the KL check's reference distributions in the same pass, where not kept yet
            self.fill_reference(data.samples + judged_samples, kl_replies(data))
        # The live weights' log-probs of the judged replies: the first training step computes
        # those it trains on; the others are scored before training.
        first_step = self._first_step_replies(data)
        with self._phase("margins"):
            before = [s for s in judged_samples if s.reply_id not in first_step]
            live_totals = dict(zip([s.reply_id for s in before], self.score(before)))
        head, self.head_start = self.head_start, None
        preview: dict = {}
        with self._phase("train"):
            stats = self.train(
                data, live_totals, head,
                after_first_step=(lambda: preview.update(self.preview(round_id, data,
                                                                      live_totals, parent)))
                if self.config.preview else None)
        with self._phase("margins"):
            live_list = self._live_margins(data, live_totals, stepped=bool(stats["steps"]))
        with self._phase("kl_check"):
            kl, candidate_list, decision = self._check(data, live_list)
        self.reference_distributions.clear()
        if self.config.objective == "pg" and stats["steps"]:
            self.kl_control.update(kl, n_steps=stats["steps"])
        live_acc = gate.preference_accuracy(live_list)
        candidate_acc = gate.preference_accuracy(candidate_list)
        if self._preview is not None:  # the preview is live: it is this version's parent
            parent = self._preview[0]
        version = self.store.next_adapter_version()
        metrics = {"loss": stats["loss"], "kl": kl, "train_k3": stats["kl"],
                   "clip_fraction": stats.get("clip_fraction"),
                   "heldout_acc": candidate_acc, "live_heldout_acc": live_acc,
                   "judged_pairs": len(data.judged), "beta": self.kl_control.beta,
                   "objective": self.config.objective, "steps": stats["steps"],
                   "phase_seconds": {k: round(v, 3) for k, v in self.phase_seconds.items()},
                   "micro_batches_by_threads": {str(k): v for k, v in
                                                sorted(self.micro_batches_by_threads.items())},
                   **({"preview": preview} if preview else {}), **reward_stats}
        with self._phase("publish"):  # in the log line; the metrics are written before it
            row, files = self._publish(version, parent, metrics)
        reward = sum(data.rewards) / len(data.rewards) if data.rewards else None
        step = {"adapter_version": version, "parent_version": parent,
                "objective": self.config.objective,
                "status": RoundOutcome.PROMOTED if decision.promote else RoundOutcome.REJECTED,
                "loss": stats["loss"], "kl": kl, "reward": reward, "beta": self.kl_control.beta,
                "votes_used": sum(map(len, claimed.values())),
                "new_votes": len(data.rewards), "replayed_votes": data.replayed_items,
                "skipped_steps": stats["skipped_steps"], "heldout_acc": candidate_acc,
                "live_heldout_acc": live_acc, "judged_pairs": len(data.judged),
                "seconds": time.perf_counter() - started,
                "note": decision.reason}
        status = self.store.finish_round(
            round_id, {**row, "status": (AdapterStatus.LIVE if decision.promote
                                         else AdapterStatus.REJECTED),
                       "reason": decision.reason}, step, files=files,
            preview_parent=self._preview[1] if self._preview else None)
        self._preview = None
        step["status"] = (RoundOutcome.PROMOTED if status == AdapterStatus.LIVE
                          else RoundOutcome.REJECTED)
        if status == AdapterStatus.LIVE:
            self.adapter_version = version
            self.optimizer_origin = version
        else:
            self.adapter_version = None  # the weights are the rejected candidate's
        log.info("round %s: v%d %s (%s) in %.1f s (%s; micro batches by threads %s), loss %s, "
                 "KL %.4f, %d new + %d replayed", round_id[:8], version, step["status"],
                 decision.reason, step["seconds"],
                 ", ".join(f"{k} {v:.1f} s" for k, v in self.phase_seconds.items()),
                 metrics["micro_batches_by_threads"], stats["loss"], kl, step["new_votes"],
                 step["replayed_votes"])
        self.retire_old_versions()
        return step

    def retire_old_versions(self) -> None:
        """Keep the folders of the newest `keep_versions` rounds' versions (and always the live
        one's); a preview's folder goes once it is no longer live: its round's version
        replaced it, or it was withdrawn."""
        on_disk = [a for a in self.store.adapters() if a["path"]]
        rounds = [a for a in on_disk if not (a["metrics"] or {}).get("preview_of")]
        keep = {a["version"] for a in rounds[-self.config.keep_versions:]}
        for row in on_disk:
            if row["version"] not in keep and row["status"] != AdapterStatus.LIVE:
                shutil.rmtree(self.config.adapters_dir / row["path"], ignore_errors=True)
                self.store.set_adapter_path(row["version"], None)

    # --- the loop ----------------------------------------------------------------------

    def run_forever(self, stop=None) -> None:
        """Rounds as feedback comes in, until `stop` is set (learner/loop.py)."""
        LearnerLoop(self).run(stop)
