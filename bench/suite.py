"""The learning suite: Duet against TRL's RLOOTrainer across oracles and seeds, per vote.

    python -m bench learn --suite quick   # 2 oracles x 1 seed, 64 votes (the iteration loop)
    python -m bench learn --suite full    # 4 oracles x 2 seeds at 64 votes, 2 runs on to 128

Each run plays Duet's real loop with a simulated user (bench/simulate.py) and gives each anchor
the same oracle, prompts, model, LoRA shape and number of labelled pairs: TRL's RLOOTrainer
(bench/trl_baseline.py, one step per label) and, with `--sides duet,trl,dpo`, DPO trained offline
for several epochs on the labelled pairs (bench/dpo_baseline.py); all are judged by the same
Evaluator against the base model's replies. The result is one JSON with every run's curves
and, at 32, 64 and 128 votes, the mean Duet - anchor win-rate difference over runs with a 95%
t-interval, and each side's rise in the share of replies with the preferred feature, also
counted only where its replies keep 70% of the base model's words (`gain_at_length`: the
claim's floor; offline DPO's largest rises came with replies cut to a fifth of the base's).

Cost is kept in check: 48-token replies, 16 held-out prompts (two replies each, sampled in one
batched call), and each anchor's side cached in bench/results/trl-cache/ (dpo-cache/) under a
key of everything that decides its outcome (settings, oracle, seed, TRL version, and the source
of the code it runs), so a change to Duet's learner does not re-run the anchors. `--jobs 2`
runs two runs at once, one torch thread each.

A full suite takes longer than one sitting on two cores, so it resumes: each finished run is
kept in bench/results/learn-suite-NAME/runs/ under a key of what decides Duet's side (settings,
oracle, seed, votes, and the source of learner/, chatbot/ and the simulation, less the serving
engines and command lines a simulated run never loads: checked after each run), and a later
`--suite NAME` reuses every kept run whose key still matches - a changed learner re-runs all
of them. `--summarize` writes the suite's JSON, table and plot from the kept runs alone.

Left out: more than one simulated user per run, oracles that depend on the prompt.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from bench.common import RESULTS, write_result
from bench.oracles import make_oracle
from bench.simulate import Simulation, as_dict, load_prompts, split_prompts
from chatbot.config import Config

log = logging.getLogger(__name__)

SUITES = {
    # (oracle, seed, votes)
    "quick": [("numbers", 0, 64), ("you", 0, 64)],
    # The 64-vote runs first: each side of a run is kept only when it finishes, and a
    # 128-vote side is a long task to lose to the end of a sitting.
    "full": [("finished", 0, 64), ("noisy-numbers", 0, 64), ("numbers", 1, 64), ("you", 1, 64),
             ("finished", 1, 64), ("noisy-numbers", 1, 64), ("numbers", 0, 128), ("you", 0, 128)],
}
REPORT_AT = (32, 64, 128)
# The claim's floor on length: a side's rise in the preferred feature counts where its replies
# keep this share of the base model's words (`gain_at_length`).
LENGTH_FLOOR = 0.7
TRL_CACHE = "trl-cache"  # a folder beside the suite's result
TRL_SOURCES = ("trl_baseline.py", "simulate.py", "oracles.py")
DPO_CACHE = "dpo-cache"
DPO_SOURCES = ("bench/dpo_baseline.py", "bench/simulate.py", "bench/oracles.py",
               "learner/batch.py", "chatbot/sampling.py", "chatbot/replies.py", "chatbot/model.py")
ANCHOR_NAMES = {"trl": "TRL RLOO", "dpo": "offline DPO"}
ROOT = Path(__file__).parent.parent
# What Duet's side of a run executes: a change to any of these re-runs the kept runs.
DUET_SOURCES = ("learner/*.py", "chatbot/*.py", "bench/simulate.py", "bench/oracles.py",
                "bench/data/prompts.txt")
# ... but for these, which a simulated run never loads: the other serving engines and what only
# a server or the learner's command line runs. run_duet checks it after every run, so a file
# left out here that a run did load fails that run instead of letting a stale one be reused.
NOT_IN_SIMULATION = ("chatbot/llama_engine.py", "chatbot/vllm_engine.py", "chatbot/gguf_lora.py",
                     "chatbot/gguf_weights.py", "chatbot/api_keys.py", "chatbot/backup.py",
                     "chatbot/export.py", "chatbot/learner_process.py", "learner/__main__.py",
                     "learner/cores.py")
# Config fields that do not change what a run learns.
NOT_LEARNING = ("data_dir", "cache_dir", "host", "port", "share", "admins", "threads",
                "learner_nice", "start_learner", "swap_poll_seconds", "learner_poll_seconds")
# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom.
T975 = [12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20, 2.18, 2.16, 2.14,
        2.13, 2.12, 2.11, 2.10, 2.09, 2.09, 2.08, 2.07, 2.07, 2.06, 2.06, 2.06, 2.05, 2.05,
        2.05, 2.04]


def mean_ci(values: list[float]) -> dict:
    """Mean and 95% t-interval over runs (no interval from a single run)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci": None, "n": n}
    half = T975[min(n - 1, len(T975)) - 1] * statistics.stdev(values) / math.sqrt(n)
    return {"mean": mean, "ci": [mean - half, mean + half], "n": n}


def checkpoints_for(votes: int) -> list[int]:
    return sorted({0, *[c for c in REPORT_AT if c <= votes], votes})


def trl_key(config: Config, oracle: str, seed: int, votes: int, eval_prompts: int) -> str:
    import trl

    settings = {k: config.as_dict()[k] for k in (
        "model", "quantize", "max_new_tokens", "temperature", "top_p", "lr", "beta", "lora_r",
        "lora_alpha")}
    here = Path(__file__).parent
    sources = "".join((here / name).read_text() for name in TRL_SOURCES)
    blob = json.dumps([settings, oracle, seed, votes, eval_prompts, trl.__version__],
                      sort_keys=True)
    return hashlib.sha256((blob + sources).encode()).hexdigest()[:16]


def dpo_key(config: Config, oracle: str, seed: int, votes: int, eval_prompts: int) -> str:
    from bench import dpo_baseline

    settings = {k: config.as_dict()[k] for k in (
        "model", "quantize", "dtype", "max_new_tokens", "temperature", "top_p", "lora_r",
        "lora_alpha")}
    recipe = [dpo_baseline.EPOCHS, dpo_baseline.BATCH, dpo_baseline.LR, dpo_baseline.BETA]
    digest = hashlib.sha256(json.dumps([settings, oracle, seed, votes, eval_prompts, recipe],
                                       sort_keys=True).encode())
    for name in DPO_SOURCES:
        digest.update(name.encode() + b"\0" + (ROOT / name).read_bytes())
    return digest.hexdigest()[:16]


def duet_key(config: Config, oracle: str, seed: int, votes: int, eval_prompts: int) -> str:
    """A key of everything that decides Duet's side of one run."""
    settings = {k: v for k, v in config.as_dict().items() if k not in NOT_LEARNING}
    files = sorted(f for pattern in DUET_SOURCES for f in ROOT.glob(pattern)
                   if f.relative_to(ROOT).as_posix() not in NOT_IN_SIMULATION)
    digest = hashlib.sha256(json.dumps([settings, oracle, seed, votes, eval_prompts],
                                       sort_keys=True, default=str).encode())
    for f in files:
        digest.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:16]


def sources_loaded() -> set[str]:
    """The project's source files (paths from its root) of the modules this process has
    loaded: its packages' and its top-level scripts', not its environment's."""
    root, loaded = ROOT.resolve(), set()
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if not path or not Path(path).is_absolute():  # (some of torch's name a bare file)
            continue
        path = Path(path).resolve()
        if not path.is_relative_to(root):
            continue
        relative = path.relative_to(root)
        if relative.parts[0] in ("bench", "chatbot", "learner") or len(relative.parts) == 1:
            loaded.add(relative.as_posix())
    return loaded


def check_left_out_of_key(loaded: set[str]) -> None:
    """Refuse a run that loaded a file its key leaves out (NOT_IN_SIMULATION): `loaded` is
    what the run's process loaded (in a test's process, where earlier tests loaded them, what
    it loaded during the run)."""
    used = sorted(loaded & set(NOT_IN_SIMULATION))
    if used:
        raise RuntimeError(f"a simulated run loaded {', '.join(used)}, which its key leaves "
                           "out (bench/suite.py, NOT_IN_SIMULATION): take them out of that list")


def _worker_setup(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_duet(config: Config, oracle_name: str, seed: int, votes: int, eval_prompts: int,
             threads: int | None, kept: Path) -> dict:
    """Duet's side of one oracle and seed; kept under its key as soon as it finishes."""
    from bench.common import git_commit

    _worker_setup(threads)
    train, held_out = split_prompts(load_prompts(), eval_prompts, seed=seed)
    key = duet_key(config, oracle_name, seed, votes, eval_prompts)
    run = {"oracle": oracle_name, "seed": seed, "votes": votes, "key": key,
           "commit": git_commit(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    loaded_before = sources_loaded()
    with tempfile.TemporaryDirectory(prefix="duet-suite-") as data_dir:
        run_config = dataclasses.replace(config, data_dir=Path(data_dir), seed=seed)
        started = time.perf_counter()
        sim = Simulation(run_config, make_oracle(oracle_name, seed), train, held_out, seed=seed)
        run["duet"] = [as_dict(e) for e in sim.run(votes, checkpoints_for(votes))]
        run["duet_seconds"] = time.perf_counter() - started
        run["duet_rounds"] = sim.round_steps
    loaded = sources_loaded()
    if "pytest" in sys.modules:  # a test's process: earlier tests loaded the left-out files
        loaded -= loaded_before
    check_left_out_of_key(loaded)
    duet_path(kept, oracle_name, seed, votes, key).write_text(
        json.dumps(run, indent=1, default=str) + "\n")
    return run


def duet_path(kept: Path, oracle_name: str, seed: int, votes: int, key: str) -> Path:
    return kept / f"{oracle_name}-s{seed}-{votes}-{key}.json"


def anchor_path(side: str, cache: Path, config: Config, oracle_name: str, seed: int,
                votes: int, eval_prompts: int) -> Path:
    key = ANCHOR_KEYS[side](config, oracle_name, seed, votes, eval_prompts)
    return cache / f"{oracle_name}-s{seed}-{votes}-{key}.json"


def run_anchor_side(side: str, config: Config, oracle_name: str, seed: int, votes: int,
                    eval_prompts: int, threads: int | None, cache: Path) -> dict:
    """One anchor's side (trl or dpo) of one oracle and seed, written to its cache as soon as
    it finishes."""
    import importlib

    module, function = ANCHOR_RUNNERS[side]
    run_anchor = getattr(importlib.import_module(module), function)
    _worker_setup(threads)
    train, held_out = split_prompts(load_prompts(), eval_prompts, seed=seed)
    started = time.perf_counter()
    evaluations = [as_dict(e) for e in run_anchor(
        dataclasses.replace(config, seed=seed), make_oracle(oracle_name, seed), train,
        held_out, votes, checkpoints_for(votes), seed=seed)]
    record = {"oracle": oracle_name, "seed": seed, "votes": votes,
              "key": ANCHOR_KEYS[side](config, oracle_name, seed, votes, eval_prompts),
              "seconds": time.perf_counter() - started, "evaluations": evaluations}
    path = anchor_path(side, cache, config, oracle_name, seed, votes, eval_prompts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return record


ANCHOR_KEYS = {"trl": trl_key, "dpo": dpo_key}
ANCHOR_RUNNERS = {"trl": ("bench.trl_baseline", "run_trl"),  # imported where they run
                  "dpo": ("bench.dpo_baseline", "run_dpo")}


def at(curve: list[dict], votes: int) -> dict | None:
    return next((e for e in curve if e["votes"] == votes), None)


def words_ratio(evaluation: dict) -> float:
    """Mean words of the held-out replies after over the base model's (1 where the base
    model's were all empty: nothing to fall short of)."""
    base = evaluation["base_mean_words"]
    return evaluation["mean_words"] / base if base else 1.0


def gain_at_length(evaluation: dict) -> float:
    """The rise in the share of held-out replies with the user's feature, counted only where
    the replies keep LENGTH_FLOOR of the base's words: a rise bought by cutting the replies
    short counts as none (a fall still counts)."""
    gain = evaluation["satisfied_share"] - evaluation["base_satisfied_share"]
    return gain if words_ratio(evaluation) >= LENGTH_FLOOR else min(gain, 0.0)


def length_fields(side: str, evaluations: list[dict]) -> dict:
    """A side's words after / before, its runs under LENGTH_FLOOR and its gain at length."""
    return {f"{side}_words_ratio": mean_ci([words_ratio(e) for e in evaluations]),
            f"{side}_under_length_floor": sum(words_ratio(e) < LENGTH_FLOOR
                                              for e in evaluations),
            f"{side}_satisfied_gain_at_length": mean_ci([gain_at_length(e)
                                                         for e in evaluations])}


def anchor_summary(runs: list[dict], votes: int, side: str) -> tuple[list, dict]:
    """The runs with Duet's and `side`'s evaluation at `votes`, and that anchor's fields."""
    pairs = [(at(r["duet"], votes), at(r.get(side) or [], votes)) for r in runs]
    pairs = [(d, a) for d, a in pairs if d is not None and a is not None]
    if not pairs:
        return pairs, {}
    return pairs, {
        f"{side}_win_rate": mean_ci([a["win_rate"] for _, a in pairs]),
        f"duet_minus_{side}": mean_ci([d["win_rate"] - a["win_rate"] for d, a in pairs]),
        f"{side}_satisfied_gain": mean_ci([a["satisfied_share"] - a["base_satisfied_share"]
                                           for _, a in pairs]),
        f"{side}_kl": mean_ci([a["kl_per_token"] for _, a in pairs]),
        **length_fields(side, [a for _, a in pairs]),
        f"duet_minus_{side}_gain_at_length": mean_ci([gain_at_length(d) - gain_at_length(a)
                                                      for d, a in pairs]),
    }


def summarize(runs: list[dict]) -> dict:
    summary = {}
    for votes in REPORT_AT:
        entry = {}
        pairs, trl = anchor_summary(runs, votes, "trl")
        if pairs:  # Duet's own numbers over the runs TRL is compared on
            entry.update({
                "duet_win_rate": mean_ci([d["win_rate"] for d, _ in pairs]),
                "duet_satisfied_gain": mean_ci([d["satisfied_share"] - d["base_satisfied_share"]
                                                for d, _ in pairs]),
                "duet_kl": mean_ci([d["kl_per_token"] for d, _ in pairs]),
                **trl,
            })
        pairs, dpo = anchor_summary(runs, votes, "dpo")
        if pairs:
            entry.update({"dpo_runs": len(pairs), **dpo})
        duet = [d for d in (at(r["duet"], votes) for r in runs) if d is not None]
        if entry and duet:  # over every run of Duet's at this count, anchors or not
            entry.update(length_fields("duet", duet))
        if entry:
            summary[str(votes)] = entry
    return summary


def table(runs: list[dict]) -> str:
    """Markdown: one row per run, Duet / TRL (/ DPO, where run) win rate at each reported vote
    count, and KL at the run's last count."""
    sides = ["trl"] + (["dpo"] if any(r.get("dpo") for r in runs) else [])
    names = " / ".join(["Duet", "TRL", "DPO"][:len(sides) + 1])
    lines = ["| oracle | seed | " + " | ".join(f"{names} @{v}" for v in REPORT_AT)
             + f" | KL {names} @max |", "|---|---|" + "---|" * (len(REPORT_AT) + 1)]

    def cell(curves: list, key: str, fmt: str) -> str:
        if curves[0] is None:
            return ""
        return " / ".join("-" if c is None else format(c[key], fmt) for c in curves)

    for r in runs:
        cells = [cell([at(r["duet"], v)] + [at(r.get(s) or [], v) for s in sides],
                      "win_rate", ".2f") for v in REPORT_AT]
        last = r["duet"][-1]["votes"]
        kl = cell([r["duet"][-1]] + [at(r.get(s) or [], last) for s in sides],
                  "kl_per_token", ".3f")
        lines.append(f"| {r['oracle']} | {r['seed']} | " + " | ".join(cells) + f" | {kl} |")
    return "\n".join(lines)


def run_suite(args: argparse.Namespace, config: Config) -> Path:
    """Run what the plan still lacks (each side of each run a task of its own, kept as soon as
    it finishes), then write the suite's JSON from every run whose two sides are there."""
    plan = SUITES[args.suite]
    if args.votes_cap:
        plan = [(o, s, min(v, args.votes_cap)) for o, s, v in plan]
    config = dataclasses.replace(config, max_new_tokens=args.max_new_tokens)
    out = Path(args.out) if args.out else RESULTS
    cache = out / TRL_CACHE
    dpo_cache = out / DPO_CACHE
    sides = args.sides.split(",") if getattr(args, "sides", None) else ["duet", "trl"]
    if not set(sides) <= {"duet", "trl", "dpo"}:
        raise SystemExit(f"--sides: {args.sides!r}: choose among duet, trl, dpo")
    started = time.perf_counter()
    threads = 1 if args.jobs > 1 else None
    kept = out / f"learn-suite-{args.suite}" / (args.tag or "runs")
    kept.mkdir(parents=True, exist_ok=True)

    # Keys hash every source file: work each run's two paths out once.
    duet_of = {p: duet_path(kept, *p, duet_key(config, *p, args.eval_prompts)) for p in plan}
    trl_of = {p: anchor_path("trl", cache, config, *p, args.eval_prompts) for p in plan}
    dpo_of = {p: anchor_path("dpo", dpo_cache, config, *p, args.eval_prompts) for p in plan}
    tasks = []  # in plan order, the sides of a run next to each other
    for p in plan:
        if "duet" in sides and not duet_of[p].exists():
            tasks.append((run_duet, p, kept))
        if "trl" in sides and not trl_of[p].exists():
            tasks.append((functools.partial(run_anchor_side, "trl"), p, cache))
        if "dpo" in sides and not dpo_of[p].exists():
            tasks.append((functools.partial(run_anchor_side, "dpo"), p, dpo_cache))
    reused = sum(duet_of[p].exists() for p in plan)
    trl_reused = {p for p in plan if trl_of[p].exists()}
    if args.summarize:
        tasks = []
    log.info("suite %s: %d of %d runs kept from earlier, %d tasks to run", args.suite, reused,
             len(plan), len(tasks))
    if tasks and args.jobs > 1:
        import multiprocessing

        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=spawn) as pool:
            futures = [pool.submit(fn, config, *p, args.eval_prompts, threads, folder)
                       for fn, p, folder in tasks]
            for future in as_completed(futures):
                future.result()
    else:
        for fn, p, folder in tasks:
            fn(config, *p, args.eval_prompts, threads, folder)
    runs = []  # a run is reported once Duet's side and an anchor's are there
    for p in plan:
        if duet_of[p].exists() and (trl_of[p].exists() or dpo_of[p].exists()):
            run = json.loads(duet_of[p].read_text())
            if trl_of[p].exists():
                trl = json.loads(trl_of[p].read_text())
                run.update(trl=trl["evaluations"], trl_seconds=trl["seconds"],
                           trl_cached=p in trl_reused)
            if dpo_of[p].exists():
                dpo = json.loads(dpo_of[p].read_text())
                run.update(dpo=dpo["evaluations"], dpo_seconds=dpo["seconds"])
            runs.append(run)
    if not runs:
        raise SystemExit(f"no kept runs of suite {args.suite} match these settings and sources")
    results = {"summary": summarize(runs), "table": table(runs), "runs": runs,
               "runs_planned": len(plan), "runs_reused": reused,
               "seconds_total": time.perf_counter() - started}
    settings = {**config.as_dict(), "suite": args.suite, "plan": plan,
                "eval_prompts": args.eval_prompts, "jobs": args.jobs, "sides": sides}
    name = f"learn-suite-{args.suite}" + (f"-{args.tag}" if args.tag else "")
    path = write_result(name, settings, results, out)
    plot_suite(runs, out / f"{name}.png", title=f"{name} ({config.objective})")
    print(results["table"])
    print(json.dumps(results["summary"], indent=1))
    return path


def plot_suite(runs: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs), 3.2), squeeze=False)
    for ax, r in zip(axes[0], runs):
        ax.plot([e["votes"] for e in r["duet"]], [e["win_rate"] for e in r["duet"]], "o-",
                label="Duet")
        for side, marker in (("trl", "s--"), ("dpo", "^:")):
            if r.get(side):
                ax.plot([e["votes"] for e in r[side]], [e["win_rate"] for e in r[side]],
                        marker, label=ANCHOR_NAMES[side])
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set(title=f"{r['oracle']} s{r['seed']}", xlabel="votes", ylim=(0, 1))
    axes[0][0].set_ylabel("win rate vs base")
    axes[0][0].legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
