"""pair-choice: how often the pair a choice rule shows differs in a user's feature, as the
user's votes come in, on the base model's replies.

    python -m bench pair-choice --pattern you --pattern can --candidates 4 --prompts-used 128

A vote teaches what a person wants only when the two replies differ in it; on the embedded
model they seldom do, because whether a reply has a feature depends mostly on the prompt
(bench/results/feature-share*.json). With K candidates per prompt some two differ about
twice as often as a plain pair (the ceiling), but choosing by the replies' words alone
(`--pair-candidates`, chatbot/pair_choice.py) recovers little of it. The literature's answer
(Muldrew et al. 2024; SEA, Liu et al. 2024) is to choose by a reward model fitted on the
person's own votes. This measures, before any of it is built into the server, whether such a
choice would separate more pairs:

for each prompt in turn (K candidates each, sampled once from the base model), every rule
shows its pair and the simulated user votes on it (ties to the shorter; noisy-NAME flips
20%); the reward-model rule refits the learner's reward model (learner/reward.py:
Bradley-Terry on the base model's frozen features, strength by cross-validation) on its own
votes so far every `--refit-every` votes, and while the model's cross-validated accuracy
beats a coin it shows the two candidates of about the same length (pair_choice's length
rule) whose rewards differ most; before that, a plain pair. The reward-model-less-length rule
does the same with the reply's word count (log) as one more feature, left out of the reward
it chooses by: a user who breaks ties toward the shorter reply casts mostly votes that length
explains, and a model of them alone learns length. Reported per user and rule: the
share of pairs that differ in the feature, over all prompts and over the later half (when the
model has votes to learn from), beside a plain pair, the most-different-words pair and the
ceiling (some two candidates differ), all on the same candidates.

Left out: the policy moving (the candidates are the base model's throughout; in the product
the learner changes them round by round), the learning that follows from the votes.
"""

from __future__ import annotations

import argparse
import itertools
import random
from dataclasses import replace
from pathlib import Path

import torch

from bench.common import RESULTS, write_result
from bench.feature_share import sample_batched, shuffled_prompts
from bench.oracles import make_oracle
from chatbot.config import Config, add_model_args, add_sampling_args

RULES = ("plain", "words", "reward_model", "reward_model_less_length", "ceiling")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pattern", action="append", required=True,
                        help="a user: an oracle name, noisy-NAME or re:PATTERN; once per user")
    parser.add_argument("--candidates", type=int, default=4,
                        help="replies sampled per prompt to choose the pair from (default: 4)")
    parser.add_argument("--prompts-used", type=int, default=128,
                        help="prompts, one vote each, in order (default: 128)")
    parser.add_argument("--refit-every", type=int, default=4,
                        help="votes between refits of the reward model, as a learner round "
                             "(default: 4)")
    parser.add_argument("--batch", type=int, default=8,
                        help="prompts per generate call (default: 8)")
    parser.add_argument("--prompts", default=None,
                        help="a file of prompts, one per line (default: bench/data/prompts.txt)")
    parser.add_argument("--out", default=None, help="result folder (default: bench/results)")
    add_model_args(parser)
    add_sampling_args(parser)


def reward_choice(scores: list[float], counts: list[int]) -> tuple[int, int]:
    """The two candidates whose rewards differ most among the pairs of about the same length
    (any pair if none is); the first such pair in index order on a tie."""
    from chatbot.pair_choice import similar_length

    pairs = list(itertools.combinations(range(len(scores)), 2))
    matched = [(i, j) for i, j in pairs if similar_length(counts[i], counts[j])]
    return max(matched or pairs, key=lambda ij: abs(scores[ij[0]] - scores[ij[1]]))


class RewardRule:
    """Shows the pair its reward model, refitted on the rule's own votes, is surest differ;
    with `less_length`, the reply's log word count is a feature of the model and no part of
    the reward it chooses by."""

    def __init__(self, refit_every: int, rng: random.Random, less_length: bool) -> None:
        self.refit_every, self.rng, self.less_length = refit_every, rng, less_length
        self.votes: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.model = None
        self.knows_from: int | None = None

    def rows(self, features: torch.Tensor, counts: list[int]) -> torch.Tensor:
        if not self.less_length:
            return features
        lengths = torch.tensor(counts, dtype=features.dtype)[:, None]
        return torch.cat([features, (lengths + 1).log()], dim=1)

    def choose(self, rows: torch.Tensor, counts: list[int]) -> tuple[int, int]:
        if self.model is None or not self.model.knows_something:
            return 0, 1
        model = self.model
        if self.less_length:  # the length's weight left out of the reward
            model = replace(model, weights=torch.cat([model.weights[:-1],
                                                      model.weights.new_zeros(1)]))
        return reward_choice(model.score(rows).tolist(), counts)

    def vote(self, p: int, rows: torch.Tensor, chosen: int, rejected: int) -> None:
        from learner.reward import MIN_PAIRS, fit_reward_model

        self.votes.append((rows[chosen], rows[rejected]))
        if len(self.votes) >= MIN_PAIRS and len(self.votes) % self.refit_every == 0:
            self.model = fit_reward_model(torch.stack([c for c, _ in self.votes]),
                                          torch.stack([r for _, r in self.votes]), self.rng)
            if self.model.knows_something and self.knows_from is None:
                self.knows_from = p + 1  # it chooses from the next prompt on


def simulate(oracle, texts: list[list[str]], features: list[torch.Tensor],
             refit_every: int, rng: random.Random) -> dict:
    """Each rule's pairs over the prompts in order: 1 where the pair differs in the oracle's
    feature. `features[p]` is (K, F), one row per candidate of prompt p."""
    from chatbot.pair_choice import most_different, words

    differs: dict[str, list[int]] = {rule: [] for rule in RULES}
    rules = {"reward_model": RewardRule(refit_every, random.Random(rng.random()), False),
             "reward_model_less_length": RewardRule(refit_every, random.Random(rng.random()),
                                                    True)}
    for p, (candidates, features_p) in enumerate(zip(texts, features)):
        marks = [oracle.truth.satisfied(text) for text in candidates]
        counts = [len(words(text)) for text in candidates]
        differs["plain"].append(int(marks[0] != marks[1]))
        i, j = most_different(candidates)
        differs["words"].append(int(marks[i] != marks[j]))
        differs["ceiling"].append(int(len(set(marks)) > 1))
        for name, rule in rules.items():
            rows = rule.rows(features_p, counts)
            i, j = rule.choose(rows, counts)
            differs[name].append(int(marks[i] != marks[j]))
            choice = oracle.prefer(candidates[i], candidates[j])
            if choice in ("A", "B"):
                rule.vote(p, rows, *((i, j) if choice == "A" else (j, i)))
    half = len(texts) // 2
    out = {}
    for rule, marks in differs.items():
        out[rule] = {"differs": sum(marks) / len(marks),
                     "differs_later_half": sum(marks[half:]) / len(marks[half:])}
    for name, rule in rules.items():
        out[name].update(knows_from_prompt=rule.knows_from, votes=len(rule.votes))
    return out


def candidate_features(model, pairs, pad_id: int, device) -> list[torch.Tensor]:
    """(K, F) base-model features of each prompt's candidates (learner/reward.py)."""
    from learner.batch import Sample, collate
    from learner.reward import reply_features

    out = []
    with torch.no_grad():
        for pair in pairs:
            samples = [Sample(reply_id=k, prompt=pair.prompt_token_ids, reply=reply.token_ids,
                              behaviour=None) for k, reply in enumerate(pair.replies)]
            out.append(reply_features(model, collate(samples, pad_id, device)))
    return out


def run(args: argparse.Namespace) -> Path:
    from chatbot.model import load_model
    from chatbot.sampling import PairGenerator

    if args.candidates < 3:
        raise SystemExit("--candidates must be at least 3: with two there is nothing to "
                         "choose")
    oracles = {name: make_oracle(name, seed=0) for name in args.pattern}
    prompts, seed = shuffled_prompts(args)
    config = Config.from_args(args)
    torch.manual_seed(seed)
    loaded = load_model(config)
    pairs = sample_batched(PairGenerator(loaded, config), prompts, args.candidates, args.batch)
    pairs = [pair for pair in pairs if all(reply.token_ids for reply in pair.replies)]
    texts = [[reply.text for reply in pair.replies] for pair in pairs]
    features = candidate_features(loaded.model, pairs, loaded.tokenizer.pad_token_id,
                                  loaded.device)
    results = {}
    for name, oracle in oracles.items():
        row = simulate(oracle, texts, features, args.refit_every, random.Random(seed))
        results[name] = row
        print(f"{name}: " + ", ".join(
            f"{rule} {row[rule]['differs']:.2f} (later half {row[rule]['differs_later_half']:.2f})"
            for rule in RULES) + f"; the reward model knew from prompt "
            f"{row['reward_model']['knows_from_prompt']}")
    settings = {**config.as_dict(), "patterns": args.pattern, "prompts_used": len(pairs),
                "seed": seed, "candidates": args.candidates, "refit_every": args.refit_every}
    return write_result(f"pair-choice-candidates{args.candidates}", settings,
                        {"users": results, "prompts": len(pairs)},
                        Path(args.out) if args.out else RESULTS)
