"""length-shift: how the length-neutral rule weighs a simulated user's votes, in seconds, on
replies sampled once (no model, no server).

    python -m bench length-shift --suite unseen-reader-64-wide
    python -m bench length-shift --user long-word --texts before-s0.json --strength 0,0.5,1

Every two replies to the same held-out prompt (a suite's kept replies before, eight a prompt
in the `-wide` suites) make a pair; each suite user votes on every pair as in a run, without
annotation noise. The pair votes get their leave-one-out advantages (+-1), shifted as the
learner's `learner.objectives.length_neutral` shifts them at each `--strength`, with the
shorter-won rate counted over these votes (`shorter_win_rate`, as the learner counts it over
the votes it used). Per user and strength:

* feature: the mean advantage of the reply with the feature, over the pairs the feature
  decides (these votes can teach the preference);
* tie-break: the mean |advantage| over the other A/B votes (they teach the tie-break, which is
  noise to the preference and spends KL);
* words push: the mean over votes of sum_i A_i * words_i (below 0: the votes push toward
  fewer words); finish push: the same with 1 for a reply that ends its last sentence (below
  0: toward replies cut at the length limit). A reply counts as cut when its text does not
  end a sentence, as the "finished" oracle reads it (bench/oracles.py): a reading of the
  text, as the learner has each reply's finish reason but a kept text does not.

`--measure real` measures a reply's length as what the policy can shorten: its words if it
ended, unbounded if it was cut (two cut replies are then equally long and their vote is not
shifted), where the learner measures words (`words`). At 48 tokens, three quarters of the
suites' base replies are cut, so two cut replies differ in words only by how many tokens their
words take.

Left out: annotation noise (`noisy-` users vote without it here), the KL penalty, the rounds,
and the policy: this weighs the votes the base model's replies would get, not what a run
learns from them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

from bench.common import RESULTS, write_result
from bench.oracles import ORACLES, make_oracle, words
from learner.objectives import length_neutral, shorter_win_rate


def ended(text: str) -> bool:
    """Whether the reply ends its last sentence, read from its text as the "finished" oracle
    reads it (see the module docstring)."""
    return ORACLES["finished"].satisfied(text)


def length(text: str, measure: str) -> float:
    if measure == "words":
        return words(text)
    return words(text) if ended(text) else math.inf


def within_prompt_pairs(texts: list[str], per_prompt: int) -> list[tuple[str, str]]:
    """Every two of each prompt's `per_prompt` consecutive replies."""
    if len(texts) % per_prompt:
        raise ValueError(f"{len(texts)} replies do not split into prompts of {per_prompt}")
    return [pair for i in range(0, len(texts), per_prompt)
            for pair in itertools.combinations(texts[i:i + per_prompt], 2)]


def weigh(oracle_name: str, pairs: list[tuple[str, str]], strength: float,
          measure: str = "words") -> dict:
    """The votes' weights for one user at one strength (see the module docstring)."""
    oracle = make_oracle(oracle_name).truth
    voted = [(a, b, choice) for a, b in pairs if (choice := oracle.prefer(a, b)) in ("A", "B")]
    sized = [(length(a, measure), length(b, measure), choice) for a, b, choice in voted]
    shorter_wins = shorter_win_rate([(choice == "A") == (la < lb) for la, lb, choice in sized
                                     if la != lb])
    feature, tie_break, words_push, finish_push = [], [], 0.0, 0.0
    for (a, b, choice), (la, lb, _) in zip(voted, sized, strict=True):
        advantages = (1.0, -1.0) if choice == "A" else (-1.0, 1.0)
        if la != lb:  # length_neutral compares its lengths only: ranks stand in for inf
            advantages = length_neutral(advantages, (0, 1) if la < lb else (1, 0),
                                        shorter_wins, strength)
        has_a, has_b = oracle.satisfied(a), oracle.satisfied(b)
        if has_a != has_b:
            feature.append(advantages[0] if has_a else advantages[1])
        else:
            tie_break.append(abs(advantages[0]))
        words_push += advantages[0] * words(a) + advantages[1] * words(b)
        finish_push += advantages[0] * ended(a) + advantages[1] * ended(b)
    n = len(voted)
    return {"votes": n, "shorter_wins": shorter_wins, "feature_votes": len(feature),
            "feature": sum(feature) / len(feature) if feature else None,
            "tie_break": sum(tie_break) / len(tie_break) if tie_break else None,
            "words_push": words_push / n if n else None,
            "finish_push": finish_push / n if n else None}


def _signed(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:+.{digits}f}"


def add_args(parser: argparse.ArgumentParser) -> None:
    from bench.user_suite import SUITES

    parser.add_argument("--suite", choices=sorted(SUITES), default=None,
                        help="weigh this API suite's users on its kept replies before, every "
                             "seed's")
    parser.add_argument("--user", action="append", default=None,
                        help="a suite user (bench/user_suite.py USERS) or any oracle (bench "
                             "api-user --oracle's names), with or in place of a suite's users; "
                             "repeatable")
    parser.add_argument("--texts", action="append", default=None,
                        help="a JSON file with the replies under `texts`, --per-prompt "
                             "consecutive replies a prompt, in place of a suite's; repeatable")
    parser.add_argument("--per-prompt", type=int, default=None,
                        help="replies a prompt in --texts (default: the suite's, else 8)")
    parser.add_argument("--strength", default="0,0.5,1",
                        help="length-neutral strengths, comma-separated (default: 0,0.5,1)")
    parser.add_argument("--measure", choices=("words", "real"), default="words",
                        help="a reply's length: words, as the learner measures it, or real: "
                             "unbounded for a cut reply (default: words)")
    parser.add_argument("--out", default=None, help="result folder (default: bench/results)")


def run(args: argparse.Namespace) -> Path:
    from bench.user_suite import SUITES, USERS, baseline_of, suite_folder

    if not args.suite and not (args.user and args.texts):
        raise ValueError("give --suite NAME, or --user NAME with --texts FILE")
    users, files, per_prompt = [], [Path(t) for t in args.texts or []], args.per_prompt
    if args.suite:
        suite = SUITES[args.suite]
        users = list(suite.users)
        folder = suite_folder(argparse.Namespace(out=None), baseline_of(args.suite))
        files = files or [folder / f"before-s{seed}.json" for seed in suite.seeds]
        per_prompt = per_prompt or suite.eval_replies
    users += [name for name in args.user or [] if name not in users]
    per_prompt = per_prompt or 8
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise ValueError(f"no kept replies: {', '.join(missing)}")
    pairs = [pair for f in files
             for pair in within_prompt_pairs(json.loads(f.read_text())["texts"], per_prompt)]
    strengths = [float(s) for s in args.strength.split(",")]
    results = {}
    for name in users:
        base = name.removeprefix("noisy-")
        oracle = USERS[base][0] if base in USERS else base
        make_oracle(oracle)  # a clear error for a name that is neither
        results[name] = {str(s): weigh(oracle, pairs, s, args.measure) for s in strengths}
        for s in strengths:
            r = results[name][str(s)]
            print(f"{name:14s} strength {s:g}: shorter won {r['shorter_wins']:.2f}; feature "
                  f"{_signed(r['feature'])} over {r['feature_votes']} of {r['votes']} votes, "
                  f"tie-break |A| {_signed(r['tie_break']).lstrip('+')}; words push "
                  f"{_signed(r['words_push'])}, finish push {_signed(r['finish_push'], 3)}")
    return write_result(f"length-shift-{args.suite or 'texts'}-{args.measure}",
                        {"suite": args.suite, "users": users, "texts": [str(f) for f in files],
                         "per_prompt": per_prompt, "strengths": strengths,
                         "measure": args.measure, "pairs": len(pairs)},
                        results, Path(args.out or RESULTS))
