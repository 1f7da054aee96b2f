"""learn: does the model get better from clicks? A simulated user with a hidden preference
plays the real loop; the win rate of the live adapter over the base model on held-out prompts
is measured at checkpoints and plotted.

    python -m bench learn --oracle shorter --votes 64 [--objective pg|dpo] [--seed 0]
    python -m bench learn --oracle shorter --votes 64 --vs trl   # also TRL's RLOOTrainer
    python -m bench learn --suite quick|full [--jobs 2]         # oracles x seeds, vs TRL
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, slug, write_result
from bench.oracles import ORACLES, make_oracle
from bench.simulate import Simulation, as_dict, load_prompts, split_prompts
from bench.suite import SUITES, run_suite, sources_loaded
from chatbot.config import Config, add_learner_args, add_model_args


def _oracle_name(name: str) -> str:
    try:
        make_oracle(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--oracle", type=_oracle_name, default="shorter",
                        help="the simulated user's hidden preference: one of "
                             f"{', '.join(sorted(ORACLES))}; noisy-NAME flips 20%% of NAME's "
                             "votes; re:PATTERN prefers replies matching a regular expression, "
                             "else the shorter (default: shorter)")
    parser.add_argument("--suite", choices=sorted(SUITES), default=None,
                        help="run the learning suite (oracles x seeds, Duet vs TRL) instead of "
                             "one oracle; see bench/suite.py")
    parser.add_argument("--sides", default="duet,trl",
                        help="with --suite: the sides of each run to run where they are "
                             "missing, comma-separated: duet, trl (TRL's RLOOTrainer), dpo "
                             "(DPO trained offline for several epochs on the labelled pairs) "
                             "(default: duet,trl)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="suite runs at once, one torch thread each (default: 1)")
    parser.add_argument("--summarize", action="store_true",
                        help="with --suite: write the suite's JSON from the runs kept so far, "
                             "run nothing")
    parser.add_argument("--votes-cap", type=int, default=None,
                        help="cut every suite run at this many votes (a shorter smoke run)")
    parser.add_argument("--votes", type=int, default=64, help="votes to cast (default: 64)")
    parser.add_argument("--correct-every", type=int, default=0,
                        help="a correction falls due every N votes (default: 0, none); one run "
                             "only, not --suite")
    parser.add_argument("--correction-text", default=None,
                        help="the sentence with the feature the user puts first when they fix "
                             "a reply (needed with --correct-every)")
    parser.add_argument("--checkpoints", default=None,
                        help="comma-separated vote counts to evaluate at "
                             "(default: 0, votes/4, votes/2, votes)")
    parser.add_argument("--eval-prompts", type=int, default=None,
                        help="held-out prompts per evaluation, two replies each (default: 32; "
                             "16 in a suite)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="reply length limit (default: 64; 48 in a suite)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--out", default=None, help="result folder (default: bench/results)")
    parser.add_argument("--tag", default="", help="suffix for the result file name")
    parser.add_argument("--vs", choices=["trl"], default=None,
                        help="also train TRL's RLOOTrainer on the same number of labelled "
                             "pairs and compare (needs bench/requirements.txt)")
    add_model_args(parser)
    add_learner_args(parser)
    # Learning is measured in float32 on every CPU, so runs on AVX2 and AVX-512 machines (and
    # the kept suite runs and TRL cache) compare; --dtype auto measures the bf16 sampling path.
    parser.set_defaults(dtype="float32")


def run(args: argparse.Namespace) -> Path:
    if args.suite:
        args.eval_prompts = args.eval_prompts or 16
        args.max_new_tokens = args.max_new_tokens or 48
        return run_suite(args, Config.from_args(args))
    args.eval_prompts = args.eval_prompts or 32
    args.max_new_tokens = args.max_new_tokens or 64
    checkpoints = ([int(c) for c in args.checkpoints.split(",")] if args.checkpoints
                   else sorted({0, args.votes // 4, args.votes // 2, args.votes}))
    oracle = make_oracle(args.oracle, args.seed)
    train, held_out = split_prompts(load_prompts(), args.eval_prompts, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="duet-bench-") as data_dir:
        config = dataclasses.replace(Config.from_args(args), data_dir=Path(data_dir),
                                     seed=args.seed)
        started = time.perf_counter()
        if args.correct_every and not args.correction_text:
            raise ValueError("--correct-every needs --correction-text")
        sim = Simulation(config, oracle, train, held_out, seed=args.seed,
                         correct_every=args.correct_every,
                         correction_text=args.correction_text)
        evaluations = sim.run(args.votes, checkpoints)
        seconds = time.perf_counter() - started
        trl_evaluations, trl_seconds = None, None
        if args.vs == "trl":
            from bench.trl_baseline import run_trl

            started = time.perf_counter()
            trl_evaluations = run_trl(config, oracle, train, held_out, args.votes,
                                      checkpoints, seed=args.seed)
            trl_seconds = time.perf_counter() - started
    name = (f"learn-{slug(args.oracle, 60)}-{args.objective}" + ("-vs-trl" if args.vs else "")
            + (f"-correct{args.correct_every}" if args.correct_every else "")
            + (f"-{args.tag}" if args.tag else ""))
    results = {
        "oracle": oracle.description,
        "evaluations": [as_dict(e) for e in evaluations],
        "rounds": sim.round_steps,
        "corrections": sim.corrections,
        "seconds_total": seconds,
        "seconds_per_vote_median": sorted(sim.vote_seconds)[len(sim.vote_seconds) // 2]
        if sim.vote_seconds else None,
        "prompts": {"train": len(train), "eval": len(held_out)},
        "sources_loaded": sorted(sources_loaded()),  # what the suite's keys may leave out
    }
    if trl_evaluations is not None:
        results["trl_evaluations"] = [as_dict(e) for e in trl_evaluations]
        results["trl_seconds_total"] = trl_seconds
    # the learner's own settings: the simulation runs it without previews (bench/simulate.py)
    settings = {**sim.learner.config.as_dict(), "votes": args.votes, "checkpoints": checkpoints,
                "oracle": args.oracle, "correct_every": args.correct_every,
                "correction_text": args.correction_text}
    out = Path(args.out) if args.out else RESULTS
    path = write_result(name, settings, results, out)
    plot(evaluations, out / f"{name}.png", title=f"{name}: {oracle.description}",
         baseline=trl_evaluations)
    return path


def plot(evaluations, path: Path, title: str, baseline=None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    votes = [e.votes for e in evaluations]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(votes, [e.win_rate for e in evaluations], "o-", label="Duet")
    axes[0].fill_between(votes, [e.win_rate_ci[0] for e in evaluations],
                         [e.win_rate_ci[1] for e in evaluations], alpha=0.2)
    if baseline:
        axes[0].plot([e.votes for e in baseline], [e.win_rate for e in baseline], "s--",
                     label="TRL RLOOTrainer")
        axes[0].fill_between([e.votes for e in baseline], [e.win_rate_ci[0] for e in baseline],
                             [e.win_rate_ci[1] for e in baseline], alpha=0.15)
    axes[0].legend(loc="lower right")
    axes[0].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[0].set(xlabel="votes (labelled pairs)", ylabel="win rate vs base (ties = 1/2)",
                ylim=(0, 1))
    axes[1].plot(votes, [e.satisfied_share for e in evaluations], "o-", label="adapter")
    axes[1].plot(votes, [e.base_satisfied_share for e in evaluations], "--", label="base")
    axes[1].set(xlabel="votes", ylabel="share satisfying the preference", ylim=(0, 1))
    axes[1].legend()
    axes[2].plot(votes, [e.kl_per_token for e in evaluations], "o-", label="KL / token")
    axes[2].plot(votes, [e.mean_words / 100 for e in evaluations], "s-",
                 label="mean words / 100")
    axes[2].set(xlabel="votes")
    axes[2].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
