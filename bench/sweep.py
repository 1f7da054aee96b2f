"""sweep: learning-rule variants side by side on the same simulated users, many runs at once.

    python -m bench sweep --variant default= --variant replay16="--replay 16" \\
        --oracle numbers --oracle 're:\\bsuch as\\b' --seeds 0,1 --votes 64 --jobs 8

Each (variant, oracle, seed) is one run of Duet's real loop (bench/simulate.py) with the
variant's learner flags on top of the common ones; every variant meets the same simulated user
on the same prompts. A run writes its curve after every checkpoint, so a run cut by
`--time-limit` keeps what it measured. The summary gives, per variant and checkpoint, the mean
win rate against the base model, the mean gain in the share of held-out replies with the
preferred feature, KL and length, and for each later variant the paired difference to the
first one (same oracle and seed) with a 95% t-interval.

This is for choosing between rules quickly (on a GPU, `--jobs` runs share one card); the
claim against TRL and DPO is `bench learn --suite`'s.

Left out: the TRL and DPO anchors, caching of finished runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import shlex
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from bench.common import RESULTS, slug, write_result
from bench.oracles import make_oracle
from bench.simulate import Simulation, as_dict, load_prompts, split_prompts
from bench.suite import at, mean_ci
from chatbot.config import Config, add_learner_args, add_model_args

log = logging.getLogger(__name__)


def _variant(text: str) -> tuple[str, str]:
    name, sep, flags = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME=FLAGS, e.g. replay16='--replay 16'")
    return name, flags


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", type=_variant, action="append", required=True,
                        help="NAME=FLAGS: learner flags of one variant (repeat; the first is "
                             "the one the others are compared with; NAME= for the defaults)")
    parser.add_argument("--oracle", action="append", required=True,
                        help="a simulated user (repeat): a name of bench/oracles.py, "
                             "noisy-NAME or re:PATTERN")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    parser.add_argument("--votes", type=int, default=64, help="votes per run (default: 64)")
    parser.add_argument("--checkpoints", default=None,
                        help="comma-separated vote counts to evaluate at "
                             "(default: 0, votes/2, votes)")
    parser.add_argument("--eval-prompts", type=int, default=16,
                        help="held-out prompts per evaluation, two replies each (default: 16)")
    parser.add_argument("--max-new-tokens", type=int, default=48,
                        help="reply length limit (default: 48, as in bench learn --suite)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (default: 1)")
    parser.add_argument("--round-every", type=int, default=None,
                        help="start a learner round only once this many votes wait, however "
                             "small --learn-every is: a learner that falls behind the votes, "
                             "as one sharing its CPU does (default: --learn-every)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds after which every run stops voting and keeps the "
                             "checkpoints it reached (default: none)")
    parser.add_argument("--out", default=None,
                        help="result folder; runs go under sweep-NAME/ there "
                             "(default: bench/results)")
    parser.add_argument("--tag", default="sweep", help="name of the sweep (default: sweep)")
    add_model_args(parser)
    add_learner_args(parser)
    parser.set_defaults(dtype="float32")  # as in bench learn: comparable on every CPU


def variant_config(args: argparse.Namespace, flags: str) -> Config:
    """The common settings with one variant's learner flags on top."""
    parser = argparse.ArgumentParser(prog=f"variant {flags!r}")
    add_model_args(parser)
    add_learner_args(parser)
    parser.set_defaults(**{k: v for k, v in vars(args).items()
                           if any(a.dest == k for a in parser._actions)})
    config = Config.from_args(parser.parse_args(shlex.split(flags)))
    return dataclasses.replace(config, max_new_tokens=args.max_new_tokens)


def run_one(config: Config, variant: str, oracle_name: str, seed: int, votes: int,
            checkpoints: list[int], eval_prompts: int, deadline: float | None,
            threads: int | None, path: Path, round_every: int | None = None) -> dict:
    """One run; its JSON is rewritten after every checkpoint (complete: false until the end)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s {variant} {oracle_name} s{seed} %(message)s")
    train, held_out = split_prompts(load_prompts(), eval_prompts, seed=seed)
    run = {"variant": variant, "oracle": oracle_name, "seed": seed, "votes": votes,
           "round_every": round_every, "complete": False, "curve": []}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="duet-sweep-") as data_dir:
        sim = Simulation(dataclasses.replace(config, data_dir=Path(data_dir), seed=seed),
                         make_oracle(oracle_name, seed), train, held_out, seed=seed)

        def keep() -> None:
            run.update(curve=[as_dict(e) for e in sim.evaluations], rounds=sim.round_steps,
                       seconds=time.perf_counter() - started)
            path.write_text(json.dumps(run, indent=1, default=str) + "\n")

        if 0 in checkpoints:
            sim.evaluate()
            keep()
        while sim.votes < votes and (deadline is None or time.time() < deadline):
            sim.vote_once(round_every)
            if sim.votes in checkpoints:
                sim.evaluate()
                keep()
        run["complete"] = sim.votes >= votes
        keep()
    return run


def summarize(runs: list[dict], variants: list[str]) -> dict:
    """Per variant and checkpoint: means over runs; per later variant: paired differences."""
    counts = sorted({e["votes"] for r in runs for e in r["curve"] if e["votes"] > 0})
    summary: dict = {}
    for votes in counts:
        entry = {}
        for v in variants:
            points = [e for r in runs if r["variant"] == v and (e := at(r["curve"], votes))]
            if points:
                entry[v] = {
                    "runs": len(points),
                    "win_rate": mean_ci([e["win_rate"] for e in points]),
                    "share_gain": mean_ci([e["satisfied_share"] - e["base_satisfied_share"]
                                           for e in points]),
                    "kl": mean_ci([e["kl_per_token"] for e in points]),
                    "length_ratio": mean_ci([e["mean_words"] / e["base_mean_words"]
                                             for e in points]),
                }
        first = variants[0]
        for v in variants[1:]:
            pairs = []
            for r in runs:
                if r["variant"] != v or (e := at(r["curve"], votes)) is None:
                    continue
                twin = next((t for t in runs if t["variant"] == first
                             and (t["oracle"], t["seed"]) == (r["oracle"], r["seed"])), None)
                if twin and (f := at(twin["curve"], votes)):
                    pairs.append((e, f))
            if pairs:
                entry[f"{v}_minus_{first}"] = {
                    "runs": len(pairs),
                    "win_rate": mean_ci([e["win_rate"] - f["win_rate"] for e, f in pairs]),
                    "share_gain": mean_ci([e["satisfied_share"] - f["satisfied_share"]
                                           for e, f in pairs]),
                }
        summary[str(votes)] = entry
    return summary


def table(runs: list[dict]) -> str:
    lines = ["| variant | oracle | seed | votes | win rate | share base → now | words base → now "
             "| KL/token |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if len(r["curve"]) < 2:
            continue
        e = r["curve"][-1]
        lines.append(f"| {r['variant']} | {r['oracle'][:40]} | {r['seed']} | {e['votes']} | "
                     f"{e['win_rate']:.2f} | {e['base_satisfied_share']:.2f} → "
                     f"{e['satisfied_share']:.2f} | {e['base_mean_words']:.0f} → "
                     f"{e['mean_words']:.0f} | {e['kl_per_token']:.3f} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> Path:
    variants = dict(args.variant)
    if len(variants) != len(args.variant):
        raise SystemExit("--variant: every variant needs a name of its own")
    for oracle in args.oracle:
        make_oracle(oracle)  # a bad name or pattern fails here, not in a worker
    configs = {name: variant_config(args, flags) for name, flags in variants.items()}
    seeds = [int(s) for s in args.seeds.split(",")]
    checkpoints = ([int(c) for c in args.checkpoints.split(",")] if args.checkpoints
                   else sorted({0, args.votes // 2, args.votes}))
    out = Path(args.out) if args.out else RESULTS
    folder = out / f"sweep-{args.tag}"
    folder.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.time_limit if args.time_limit else None
    tasks = [dict(config=configs[name], variant=name, oracle_name=oracle, seed=seed,
                  votes=args.votes, checkpoints=checkpoints, eval_prompts=args.eval_prompts,
                  deadline=deadline, threads=1 if args.jobs > 1 else None,
                  path=folder / f"{name}-{slug(oracle, 40)}-s{seed}.json",
                  round_every=args.round_every)
             for seed in seeds for oracle in args.oracle for name in variants]
    started = time.perf_counter()
    if args.jobs > 1:
        import multiprocessing

        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=spawn) as pool:
            for future in as_completed([pool.submit(run_one, **t) for t in tasks]):
                future.result()
    else:
        for t in tasks:
            run_one(**t)
    runs = [json.loads(t["path"].read_text()) for t in tasks if t["path"].exists()]
    results = {"summary": summarize(runs, list(variants)), "table": table(runs),
               "runs": runs, "seconds_total": time.perf_counter() - started}
    settings = {"variants": variants, "oracles": args.oracle, "seeds": seeds,
                "votes": args.votes, "checkpoints": checkpoints,
                "eval_prompts": args.eval_prompts, "jobs": args.jobs,
                "time_limit": args.time_limit, "round_every": args.round_every,
                "common": configs[next(iter(variants))].as_dict()}
    print(results["table"])
    print(json.dumps(results["summary"], indent=1))
    return write_result(f"sweep-{args.tag}", settings, results, out)
