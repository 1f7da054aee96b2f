"""The learner: the parts a round is made of, put together, and what it does between rounds.
When a round runs is learner/loop.py's; what a round does, learner/rounds.py's.

The parts: the adapter it trains and its optimizer (learner/weights.py), the batch builder over
the store (learner/data.py), the passes that train nothing (learner/scoring.py), the objective
and what its steps compute (learner/steps.py), the loop that takes them
(learner/step_loop.py), the reward model's sampler (learner/reward.py) and the
round's clock (learner/clock.py).

Between rounds (`prepare`: when a round ends, and as each vote comes in) the learner does what
the next round would do first: the new replies' reference log-probs, the reference's
distributions for its KL check, and its first step's terms for the samples known so far
(learner/head_start.py), so a round that a vote completes starts with the others' done.

Nothing lives only in memory but the optimizer's moments: the KL coefficient is read back from
the last learner_steps row, so a killed learner restarts from the DB and the adapters folder
and carries on.

Left out: multi-GPU training.
"""

from __future__ import annotations

import functools
import logging
import random
import time

from chatbot.config import Config
from chatbot.model import LoadedModel
from chatbot.replies import end_of_turn_id, reply_token_ids
from chatbot.store import Store
from learner.clock import RoundClock
from learner.data import RoundBuilder, RoundData
from learner.head_start import HeadStart
from learner.loop import LearnerLoop
from learner.objectives import AdaptiveKLController
from learner.reward import SelfSampler
from learner.rounds import run_round
from learner.scoring import Scorer, kl_replies
from learner.step_loop import take_steps
from learner.steps import OBJECTIVES
from learner.weights import TrainableAdapter

log = logging.getLogger(__name__)


class Learner:
    def __init__(self, config: Config, store: Store, loaded: LoadedModel, *,
                 max_bad_steps: int = 3, seed: int | None = None) -> None:
        self.config = config
        self.store = store
        self.loaded = loaded
        self.max_bad_steps = max_bad_steps
        self.adapter = TrainableAdapter(config, store, loaded)
        self.model = self.adapter.model
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
                                    length_neutral=config.length_neutral,
                                    length_neutral_rescale=config.length_neutral_rescale,
                                    length_window=config.length_window,
                                    encode_reply=functools.partial(
                                        reply_token_ids, loaded.tokenizer,
                                        end_of_turn_id(loaded.model, loaded.tokenizer)))
        self.pad_id = loaded.tokenizer.pad_token_id
        self.clock = RoundClock(loaded.device)
        passes = {"pad_id": self.pad_id, "device": loaded.device}
        self.scorer = Scorer(self.model, store, self.builder, self.clock,
                             vocab_size=loaded.model.config.vocab_size, **passes)
        self.self_sampler = SelfSampler(self.model, loaded.tokenizer, config, loaded.device,
                                        self.pad_id, random.Random(seed))
        self.objective = OBJECTIVES[config.objective](
            config, self.adapter, self.builder, self.clock, self.self_sampler, self.kl_control,
            **passes)
        self.head_start: HeadStart | None = None  # the next round's first step, begun
        self.live_preview: tuple[int, int] | None = None  # (version, parent) of a round's
        self.on_step = lambda: None  # called after every optimizer step (heartbeats)

    def pending(self) -> int:
        counts = self.store.pending_counts()
        return (counts["votes_pending"] + counts["ratings_pending"]
                + counts["corrections_pending"])

    def prepare(self) -> None:
        """While the next round waits for a full batch, what it would otherwise do first: the
        pending feedback's reference log-probs, the reference distributions of its KL check,
        and (policy gradient) its first step's terms for the samples known so far - the
        replayed votes, then each pending vote (learner/head_start.py)."""
        started = time.perf_counter()
        draft = self.builder.draft()
        self.adapter.sync_to_live()
        self.objective.add_fresh_replies(draft)  # the round will train on the same ones
        keep = kl_replies(draft)
        self.scorer.keep_only(keep)
        self.scorer.fill_reference(draft.samples + draft.judged_samples, keep)
        head, self.head_start = self.head_start, None  # None if it fails half-way
        self.head_start = self.objective.head_start(draft, head)
        log.info("next round prepared in %.1f s: %d new and %d replayed items, first-step terms "
                 "of %d samples, %d reference distributions kept", time.perf_counter() - started,
                 len(draft.new_items), len(draft.replay_items),
                 sum(self.head_start.done.values()) if self.head_start else 0,
                 len(self.scorer.reference_distributions))

    def train(self, data: RoundData, head: HeadStart | None = None,
              after_first_step=None) -> dict:
        """The round's optimizer steps (step_loop.take_steps with this learner's parts)."""
        return take_steps(self.objective, self.adapter, data, head, after_first_step,
                          max_bad_steps=self.max_bad_steps, on_step=self.on_step)

    def round(self) -> dict | None:
        """Run one round over the feedback pending now (learner/rounds.py). Returns the
        learner_steps row, or None when nothing was pending."""
        return run_round(self)

    def run_forever(self, stop=None) -> None:
        """Rounds as feedback comes in, until `stop` is set (learner/loop.py)."""
        LearnerLoop(self).run(stop)
