"""feature-share: how often the base model's replies have a feature, to pick a simulated user.

    python -m bench feature-share --pattern 're:\bwith\b' --pattern numbers --max-new-tokens 48

Samples a pair of base replies for each of the first --prompts-used prompts (shuffled by
--seed, which also seeds the sampling; default 0) and reports, per oracle, the share of
replies it is satisfied with and the share of pairs whose two replies differ in it: only
those pairs let the feature decide a vote, the others go to the tie-break. The learning claim
is about features in a fifth to a half of the base model's replies; a user nobody tuned for
is a `re:PATTERN` that passes this check.

Left out: prompts other than bench/data/prompts.txt (use --prompts), the adapter.
"""

from __future__ import annotations

import argparse
import random
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


def run(args: argparse.Namespace) -> Path:
    from chatbot.model import load_model
    from chatbot.sampling import PairGenerator

    oracles = {name: make_oracle(name) for name in args.pattern}  # bad patterns fail first
    prompts = load_prompts(Path(args.prompts)) if args.prompts else load_prompts()
    seed = 0 if args.seed is None else args.seed
    random.Random(seed).shuffle(prompts)
    prompts = prompts[:args.prompts_used]
    config = Config.from_args(args)
    torch.manual_seed(seed)
    loaded = load_model(config)
    generator = PairGenerator(loaded, config)
    pairs = []
    for i in range(0, len(prompts), args.batch):
        chunk = prompts[i:i + args.batch]
        sampled = generator.sample_many([[{"role": "user", "content": p}] for p in chunk])
        pairs += [tuple(r.text for r in pair.replies) for pair in sampled]
    results = {name: shares(oracle, pairs) for name, oracle in oracles.items()}
    for name, row in results.items():
        print(f"{row['reply_share']:.2f} of replies, {row['differing_pair_share']:.2f} of pairs "
              f"differ: {name}")
    settings = {**config.as_dict(), "patterns": args.pattern, "prompts_used": len(prompts),
                "seed": seed}
    return write_result("feature-share", settings, {"features": results, "pairs": len(pairs)},
                        Path(args.out) if args.out else RESULTS)
