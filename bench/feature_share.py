"""feature-share: how often the base model's replies have a feature, to pick a simulated user.

    python -m bench feature-share --pattern 're:\bwith\b' --pattern numbers --max-new-tokens 48

Samples a pair of base replies for each of the first --prompts-used prompts (shuffled by
--seed, which also seeds the sampling; default 0) and reports, per oracle, the share of
replies it is satisfied with and the share of pairs whose two replies differ in it: only
those pairs let the feature decide a vote, the others go to the tie-break. The learning claim
is about features in a fifth to a half of the base model's replies; a user nobody tuned for
is a `re:PATTERN` that passes this check.

With `--candidates K` (K > 2) it samples K replies per prompt and also reports, per oracle,
the share of pairs that differ in it when the pair is the one the server's
`--pair-candidates K` would show (chatbot/pair_choice.py), beside the first two
candidates (a plain pair) and the share of prompts where some two candidates differ (the most
any choice of two could reach); and the mean word-count gap of each kind of pair.

With `--explore-temperature X` it also samples one more reply per prompt at X and reports,
per oracle, the share of such replies with the feature and the share of pairs that differ in
it when the pair is a reply at --temperature beside the one at X (the pair the server's
`--explore-temperature X` shows), beside the plain pair of the same prompts; and the mean
word-count gap of each. Drawn apart, the two replies of a pair are as the server's one batch
draws them: each row's tokens depend only on its own temperature.

Left out: prompts other than bench/data/prompts.txt (use --prompts), the adapter.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import replace
from pathlib import Path

import torch

from bench.common import RESULTS, write_result
from bench.oracles import make_oracle
from bench.simulate import load_prompts
from chatbot.config import Config, add_model_args, add_sampling_args


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pattern", action="append", required=True,
                        help="an oracle name or re:PATTERN; give it once per feature")
    parser.add_argument("--prompts-used", type=int, default=96,
                        help="prompts to sample a pair for (default: 96)")
    parser.add_argument("--candidates", type=int, default=2,
                        help="replies sampled per prompt; above 2, also compare the pair of "
                             "the most different candidates with a plain pair (default: 2)")
    parser.add_argument("--batch", type=int, default=16,
                        help="prompts per generate call (default: 16)")
    parser.add_argument("--prompts", default=None,
                        help="a file of prompts, one per line (default: bench/data/prompts.txt)")
    parser.add_argument("--out", default=None, help="result folder (default: bench/results)")
    add_model_args(parser)
    add_sampling_args(parser)


def shares(oracle, pairs: list[tuple[str, str]]) -> dict:
    """Share of replies the oracle is satisfied with, and of pairs that differ in it."""
    marks = [(oracle.truth.satisfied(a), oracle.truth.satisfied(b)) for a, b in pairs]
    return {"reply_share": sum(a + b for a, b in marks) / (2 * len(marks)),
            "differing_pair_share": sum(a != b for a, b in marks) / len(marks)}


def chosen_pair_shares(oracle, candidates: list[list[str]]) -> dict:
    """Per prompt's candidates: the share of plain pairs (the first two), of most-different
    pairs and of prompts with any two candidates that differ in the oracle's feature, and the
    mean word-count gap of the plain and the most-different pairs."""
    from bench.oracles import words
    from chatbot.pair_choice import most_different

    plain = chosen = possible = 0
    plain_gap = chosen_gap = 0
    for texts in candidates:
        marks = [oracle.truth.satisfied(text) for text in texts]
        i, j = most_different(texts)
        plain += marks[0] != marks[1]
        chosen += marks[i] != marks[j]
        possible += len(set(marks)) > 1
        plain_gap += abs(words(texts[0]) - words(texts[1]))
        chosen_gap += abs(words(texts[i]) - words(texts[j]))
    n = len(candidates)
    return {"plain_pair_differs": plain / n, "most_different_pair_differs": chosen / n,
            "some_pair_differs": possible / n, "plain_pair_word_gap": plain_gap / n,
            "most_different_pair_word_gap": chosen_gap / n}


def exploring_pair_shares(oracle, plain: list[tuple[str, str]], explored: list[str]) -> dict:
    """Per prompt: its plain pair (two replies at --temperature) and a reply at the exploring
    temperature. The share of exploring replies with the feature, of exploring pairs (the
    plain pair's first reply beside the exploring one) and of plain pairs that differ in it,
    and the mean word-count gap of both kinds of pair."""
    from bench.oracles import words

    n = len(plain)
    marks = [(oracle.truth.satisfied(a), oracle.truth.satisfied(b), oracle.truth.satisfied(x))
             for (a, b), x in zip(plain, explored)]
    return {"explore_reply_share": sum(x for _, _, x in marks) / n,
            "exploring_pair_differs": sum(a != x for a, _, x in marks) / n,
            "plain_pair_differs": sum(a != b for a, b, _ in marks) / n,
            "exploring_pair_word_gap": sum(abs(words(a) - words(x))
                                           for (a, _), x in zip(plain, explored)) / n,
            "plain_pair_word_gap": sum(abs(words(a) - words(b)) for a, b in plain) / n}


def shuffled_prompts(args: argparse.Namespace) -> tuple[list[str], int]:
    """The first --prompts-used prompts (of --prompts, else bench/data/prompts.txt), shuffled
    by --seed, and the seed (0 if none was given)."""
    prompts = load_prompts(Path(args.prompts)) if args.prompts else load_prompts()
    seed = 0 if args.seed is None else args.seed
    random.Random(seed).shuffle(prompts)
    return prompts[:args.prompts_used], seed


def sample_batched(generator, prompts: list[str], n: int, batch: int) -> list:
    """`n` replies to each prompt (a one-message conversation), `batch` prompts per
    generate call, in the prompts' order."""
    sampled = []
    for i in range(0, len(prompts), batch):
        sampled += generator.sample_many(
            [[{"role": "user", "content": p}] for p in prompts[i:i + batch]], n=n)
    return sampled


def run(args: argparse.Namespace) -> Path:
    from chatbot.model import load_model
    from chatbot.sampling import PairGenerator

    if args.candidates < 2:
        raise SystemExit("--candidates must be at least 2")
    if args.pair_candidates != 2:
        raise SystemExit("--pair-candidates is the server's; here, --candidates K samples K "
                         "replies per prompt and reports both kinds of pair")
    oracles = {name: make_oracle(name) for name in args.pattern}  # bad patterns fail first
    prompts, seed = shuffled_prompts(args)
    config = Config.from_args(args)
    torch.manual_seed(seed)
    loaded = load_model(config)
    generator = PairGenerator(loaded, config)
    batch = max(1, args.batch * 2 // args.candidates)  # rows per generate call as with pairs
    candidates = [[r.text for r in pair.replies]
                  for pair in sample_batched(generator, prompts, args.candidates, batch)]
    pairs = [(texts[0], texts[1]) for texts in candidates]
    explored = []
    if config.explore_temperature:
        exploring = PairGenerator(loaded, replace(config, temperature=config.explore_temperature))
        explored = [pair.replies[0].text
                    for pair in sample_batched(exploring, prompts, 1, args.batch)]
    results = {name: shares(oracle, pairs) for name, oracle in oracles.items()}
    for name, row in results.items():
        print(f"{row['reply_share']:.2f} of replies, {row['differing_pair_share']:.2f} of pairs "
              f"differ: {name}")
        if args.candidates > 2:
            row.update(chosen_pair_shares(oracles[name], candidates))
            print(f"  of {args.candidates} candidates: the most different pair differs in "
                  f"{row['most_different_pair_differs']:.2f}, some pair in "
                  f"{row['some_pair_differs']:.2f}; word gap {row['plain_pair_word_gap']:.1f} "
                  f"-> {row['most_different_pair_word_gap']:.1f}")
        if explored:
            row.update(exploring_pair_shares(oracles[name], pairs, explored))
            print(f"  one reply at {config.explore_temperature:g}: "
                  f"{row['explore_reply_share']:.2f} of them, and the pair differs in "
                  f"{row['exploring_pair_differs']:.2f} (plain {row['plain_pair_differs']:.2f}); "
                  f"word gap {row['plain_pair_word_gap']:.1f} -> "
                  f"{row['exploring_pair_word_gap']:.1f}")
    settings = {**config.as_dict(), "patterns": args.pattern, "prompts_used": len(prompts),
                "seed": seed, "candidates": args.candidates}
    # with candidates, a file of its own: the API-level suite reads feature-share.json's shares
    name = "feature-share" if args.candidates == 2 else f"feature-share-candidates{args.candidates}"
    if explored:
        name += f"-explore{config.explore_temperature:g}"
    return write_result(name, settings, {"features": results, "pairs": len(pairs)},
                        Path(args.out) if args.out else RESULTS)
