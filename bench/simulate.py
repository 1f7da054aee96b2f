"""Play Duet's real loop with a simulated user, in one process, and measure what it learned.

The loop is the product's own: ChatService samples a pair through the PairGenerator (on the
live adapter, via LiveAdapter), the oracle votes, the Store keeps it, the Learner runs a round
every `learn_every` votes and publishes an adapter, and LiveAdapter swaps it in before the
next pair. Only the two processes are folded into one, so runs are repeatable and need no
ports; the `latency` benchmark times the real two-process setup.

The learner's rounds and the evaluations run in a fresh thread each, as the server runs its
torch work (chatbot/sampling.py, "Threads"): a long-lived thread that ran a parallel torch op
keeps its idle OpenMP team, and then every streamed pair (sampled in a thread of its own)
decodes with sleeping workers. With the rounds and evaluations in the caller's thread a pair
took 4.2 s instead of 2.6 s on the base model and 5.2 s instead of 3.6 s on a live version
(48 tokens, float32, 2 cores); what a run learns is the same either way.

An evaluation samples replies for held-out prompts from the live adapter and compares them
with the base model's replies to the same prompts under the oracle (win rate, ties count one
half), and reports the share of replies that satisfy the preference, their mean length, the
per-token log-ratio to the base on the adapter's own replies (KL), and fluency (non-empty,
repeated word trigrams, the base model's per-token log-prob of the reply).

With `correct_every`, the user also rewrites a reply now and then (a correction, sent with the
vote), as bench/api_user.py's users do through the API.

Left out: several simulated users at once, real network traffic, and the preview (a round's
first step served while it takes the others): a round runs here between two votes, so no pair
could be served from it, and the round's candidate is the same without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.oracles import Oracle, corrected, words
from chatbot.config import Config
from chatbot.hotswap import LiveAdapter
from chatbot.model import LoadedModel, load_model
from chatbot.sampling import PairGenerator
from chatbot.service import ChatService
from chatbot.store import SIDES, Store
from chatbot.threads import in_fresh_thread_on_cpu
from learner.batch import Sample, collate, token_logprobs
from learner.worker import Learner

log = logging.getLogger(__name__)

PROMPTS_FILE = Path(__file__).parent / "data" / "prompts.txt"
EVAL_BATCH = 16  # held-out prompts sampled in one batched generate call


def load_prompts(path: Path = PROMPTS_FILE) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def split_prompts(prompts: list[str], n_eval: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(training prompts, held-out evaluation prompts), a fixed shuffle of the file."""
    shuffled = prompts[:]
    random.Random(seed).shuffle(shuffled)
    return shuffled[n_eval:], shuffled[:n_eval]


def sign_test_p(wins: int, losses: int) -> float:
    """One-sided exact binomial p-value of at least `wins` successes out of wins + losses."""
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


def bootstrap_ci(scores: list[float], rng: random.Random, draws: int = 2000) -> tuple[float, float]:
    if not scores:
        return (float("nan"), float("nan"))
    means = sorted(sum(rng.choices(scores, k=len(scores))) / len(scores) for _ in range(draws))
    return means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def repeated_trigram_share(text: str) -> float:
    tokens = text.lower().split()
    grams = [tuple(tokens[i:i + 3]) for i in range(len(tokens) - 2)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


@dataclass
class Evaluation:
    votes: int
    adapter_version: int
    win_rate: float
    win_rate_ci: tuple[float, float]
    wins: int
    ties: int
    losses: int
    p_value: float  # one-sided sign test of wins against losses
    satisfied_share: float
    base_satisfied_share: float
    mean_words: float
    base_mean_words: float
    kl_per_token: float
    nonempty_share: float
    repeated_trigrams: float
    base_logprob_per_token: float
    seconds: float


@contextlib.contextmanager
def base_weights(model) -> Iterator[None]:
    """Run `model` as its base model for a moment: a PeftModel, or a transformers model with
    adapters loaded by the hot-swap code, or a plain model."""
    if hasattr(model, "disable_adapter"):  # peft.PeftModel
        with model.disable_adapter():
            yield
    elif getattr(model, "peft_config", None):
        model.disable_adapters()
        try:
            yield
        finally:
            model.enable_adapters()
    else:
        yield


class Evaluator:
    """Samples replies to the held-out prompts from a model and scores them against the
    base model's replies (the first model evaluated must be the base)."""

    def __init__(self, config: Config, oracle: Oracle, prompts: list[str], tokenizer,
                 device, seed: int = 0) -> None:
        self.config = config
        self.oracle = oracle
        self.prompts = prompts
        self.tokenizer = tokenizer
        self.device = device
        self.seed = seed
        self.rng = random.Random(seed)
        self.base_replies: list[list[str]] | None = None

    def evaluate(self, model, votes: int, adapter_version: int) -> Evaluation:
        started = time.perf_counter()
        loaded = LoadedModel(model, self.tokenizer, "evaluated", "", self.device, "none")
        generator = PairGenerator(loaded, self.config)
        state = torch.random.get_rng_state()
        torch.manual_seed(self.seed + 10_000)  # the same sampling noise at every checkpoint
        pairs = []
        for i in range(0, len(self.prompts), EVAL_BATCH):
            batch = [[{"role": "user", "content": p}] for p in self.prompts[i:i + EVAL_BATCH]]
            pairs += [(pair.prompt_token_ids, list(pair.replies))
                      for pair in generator.sample_many(batch)]
        torch.random.set_rng_state(state)
        texts = [[r.text for r in replies] for _, replies in pairs]
        if self.base_replies is None:
            assert adapter_version == 0, "the first evaluation must be of the base model"
            self.base_replies = texts
        truth = self.oracle.truth  # judge by the clean preference, never the noisy votes
        wins = ties = losses = 0
        scores = []
        for live_pair, base_pair in zip(texts, self.base_replies):
            for live_text, base_text in zip(live_pair, base_pair):
                verdict = truth.prefer(live_text, base_text)
                wins += verdict == "A"
                ties += verdict == "tie"
                losses += verdict == "B"
                scores.append({"A": 1.0, "tie": 0.5, "B": 0.0}[verdict])
        flat = [t for pair in texts for t in pair]
        base_flat = [t for pair in self.base_replies for t in pair]
        kl, base_lp = self._kl_and_fluency(model, pairs)
        return Evaluation(
            votes=votes, adapter_version=adapter_version,
            win_rate=sum(scores) / len(scores), win_rate_ci=bootstrap_ci(scores, self.rng),
            wins=wins, ties=ties, losses=losses, p_value=sign_test_p(wins, losses),
            satisfied_share=sum(map(truth.satisfied, flat)) / len(flat),
            base_satisfied_share=sum(map(truth.satisfied, base_flat)) / len(base_flat),
            mean_words=sum(map(words, flat)) / len(flat),
            base_mean_words=sum(map(words, base_flat)) / len(base_flat),
            kl_per_token=kl, nonempty_share=sum(bool(t.strip()) for t in flat) / len(flat),
            repeated_trigrams=sum(map(repeated_trigram_share, flat)) / len(flat),
            base_logprob_per_token=base_lp, seconds=time.perf_counter() - started)

    def _kl_and_fluency(self, model, pairs) -> tuple[float, float]:
        """Per-token log(pi / pi_base) on the model's own replies, and the base per-token logp."""
        samples = [Sample(reply_id=0, prompt=prompt, reply=reply.token_ids,
                          behaviour=reply.token_logprobs)
                   for prompt, replies in pairs for reply in replies if reply.token_ids]
        if not samples:
            return 0.0, float("nan")
        own = base = 0.0
        tokens = 0
        with torch.no_grad():
            for i in range(0, len(samples), 8):
                batch = collate(samples[i:i + 8], self.tokenizer.pad_token_id, self.device)
                own += token_logprobs(model, batch).sum().item()
                with base_weights(model):
                    base += token_logprobs(model, batch).sum().item()
                tokens += int(batch.mask.sum().item())
        return (own - base) / tokens, base / tokens


@dataclass
class Simulation:
    config: Config
    oracle: Oracle
    train_prompts: list[str]
    eval_prompts: list[str]
    seed: int = 0
    evaluations: list[Evaluation] = field(default_factory=list)
    round_steps: list[dict] = field(default_factory=list)
    votes: int = 0
    # A correction falls due every `correct_every` votes (0: never) and is made at the first
    # vote from then on whose preferred reply lacks the feature: the user sends their rewrite
    # of it (bench/oracles.py `corrected`, with `correction_text`) with the vote.
    correct_every: int = 0
    correction_text: str | None = None
    corrections: int = 0
    corrections_due: int = 0

    def __post_init__(self) -> None:
        torch.manual_seed(self.seed)
        self.rng = random.Random(self.seed)
        self.store = Store(self.config.db_path)
        self.server = load_model(self.config)
        self.live = LiveAdapter(self.server.model, self.server.model_id, self.store,
                                self.config.adapters_dir)
        self.generator = PairGenerator(self.server, self.config, adapter_context=self.live.reading)
        self.service = ChatService(self.config, self.store, self.generator,
                                   model_id=self.server.model_id, live=self.live)
        # No preview: a round runs here between two votes, so no pair is sampled while it
        # runs and its preview would never be served; the round's candidate is the same
        # without it (tests/test_preview.py), and it costs a KL pass a round.
        self.learner = Learner(dataclasses.replace(self.config, preview=False), self.store,
                               load_model(self.config, training=True), seed=self.seed)
        self.evaluator = Evaluator(self.config, self.oracle, self.eval_prompts,
                                   self.server.tokenizer, self.server.device, self.seed)
        self.vote_seconds: list[float] = []

    def vote_once(self, round_every: int | None = None) -> str:
        """One vote; then a learner round once `round_every` votes wait (default
        --learn-every; more plays a learner that falls behind the votes, and its round claims
        all of them, up to --max-batch-votes)."""
        prompt = self.rng.choice(self.train_prompts)
        started = time.perf_counter()
        result = self.service.ask("simulated-user", prompt, "")
        choice = self.oracle.prefer(*result["replies"])
        if self.correct_every and self.votes % self.correct_every == self.correct_every - 1:
            self.corrections_due += 1
        side = "B" if choice == "B" else "A"
        rewrite = (corrected(self.oracle, result["replies"][SIDES.index(side)],
                             self.correction_text) if self.corrections_due else None)
        if rewrite is None:
            self.service.vote("simulated-user", result["pair_id"], choice)
        else:
            self.service.correct("simulated-user", result["pair_id"], rewrite, side=side,
                                 choice=choice)
            self.corrections_due -= 1
            self.corrections += 1
        self.votes += 1
        if self.learner.pending() >= (round_every or self.config.learn_every):
            step = in_fresh_thread_on_cpu(self.learner.round, self.server.device.type,
                                          name="learner-round")
            if step:
                self.round_steps.append(step)
            self.live.sync()
        self.vote_seconds.append(time.perf_counter() - started)
        return choice

    def run(self, votes: int, checkpoints: list[int]) -> list[Evaluation]:
        if 0 in checkpoints and not self.evaluations:
            self.evaluate()
        while self.votes < votes:
            self.vote_once()
            if self.votes in checkpoints:
                self.evaluate()
        return self.evaluations

    def evaluate(self) -> Evaluation:
        with self.live.reading() as version:
            evaluation = in_fresh_thread_on_cpu(
                lambda: self.evaluator.evaluate(self.server.model, self.votes, version),
                self.server.device.type, name="evaluation")
        self.evaluations.append(evaluation)
        log.info("evaluation at %d votes: %s", self.votes, evaluation)
        return evaluation


def as_dict(evaluation: Evaluation) -> dict:
    return dataclasses.asdict(evaluation)
