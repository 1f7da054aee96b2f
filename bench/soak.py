"""soak: a server and its learner under long chat, votes and rounds, and whether what they
hold stays flat: each process's memory and open files, the database's size, the adapter
folders on disk.

    python -m bench soak --minutes 180        # alone on the machine (nohup ... &)
    python -m bench soak --minutes 5          # a short look

A user chats through /v1 (`n=2`, the `openai` package) at a reader's pace, votes on every pair
for a `re:` preference (so the rounds learn and publish versions), sometimes rates a reply, and
starts a new conversation every --turns turns; a vote the server answered and the
database does not hold at the end counts as lost. Every --sample-seconds the harness records, for
the server and for its learner child: RSS, open file descriptors and threads; the SQLite file
with its WAL; the version folders in the adapters folder; the live version and the rounds so
far. A plot of them over the minutes goes beside the result (soak.png).

The headline is each quantity's growth per hour over the run's second half (a least-squares
slope; the first half is warm-up: the model's caches, the first adapters, the WAL's first
checkpoint), with its first and last value; a flat process grows by little more than noise.

Left out: several users at once, PostgreSQL (--extra --db URL runs on it, but the size read here
is the SQLite file's), the vLLM engine.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, write_result
from bench.oracles import make_oracle
from bench.simulate import load_prompts

QUANTITIES = ("server_rss_mb", "learner_rss_mb", "server_fds", "learner_fds",
              "server_threads", "learner_threads", "db_mb", "adapter_folders")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=60.0,
                        help="how long the user chats (default: 60)")
    parser.add_argument("--sample-seconds", type=float, default=30.0,
                        help="time between two readings (default: 30)")
    parser.add_argument("--reader-seconds", type=float, default=10.0,
                        help="a reader's time per pair (default: 10)")
    parser.add_argument("--turns", type=int, default=6,
                        help="turns per conversation before a new one (default: 6)")
    parser.add_argument("--oracle", default="numbers",
                        help="the user's preference (bench/oracles.py; default: numbers)")
    parser.add_argument("--max-new-tokens", type=int, default=48,
                        help="reply length limit (default: 48)")
    parser.add_argument("--model", default="embedded", help="model (default: embedded)")
    parser.add_argument("--seed", type=int, default=0, help="prompt and vote seed (default: 0)")
    parser.add_argument("--out", default=None, help="result folder (default: bench/results)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="further flags for app.py")


def slope_per_hour(times: list[float], values: list[float]) -> float | None:
    """The least-squares slope of `values` against `times` (seconds), per hour; None if the
    times do not spread."""
    n = len(times)
    if n < 2:
        return None
    mean_t, mean_v = sum(times) / n, sum(values) / n
    spread = sum((t - mean_t) ** 2 for t in times)
    if spread == 0:
        return None
    return 3600.0 * sum((t - mean_t) * (v - mean_v) for t, v in zip(times, values)) / spread


def summary(readings: list[dict]) -> dict:
    """Per quantity: its first and last reading, its maximum, its growth per hour over the
    second half of the readings, and each half's median and maximum (a learner's memory is a
    saw: high while it trains, low between rounds; a slope through a saw says little, a
    second half whose median and peak are not above the first's says flat)."""
    middle = len(readings) // 2
    out = {}
    for key in QUANTITIES:
        present = [r for r in readings if r.get(key) is not None]
        if not present:
            continue
        early = [r[key] for r in readings[:middle] if r.get(key) is not None]
        late = [r for r in readings[middle:] if r.get(key) is not None]
        late_values = [r[key] for r in late]
        out[key] = {"first": present[0][key], "last": present[-1][key],
                    "max": max(r[key] for r in present),
                    "growth_per_hour_second_half": slope_per_hour(
                        [r["seconds"] for r in late], late_values),
                    "halves": [_spread(early), _spread(late_values)]}
    return out


def _spread(values: list[float]) -> dict | None:
    return {"median": statistics.median(values), "max": max(values)} if values else None


def reading(server, data: Path, started: float, status: dict) -> dict:
    """One reading of the server process (a psutil.Process), its learner child and the data
    folder."""
    import psutil

    def proc(process) -> tuple[float | None, int | None, int | None]:
        try:
            return process.memory_info().rss / 2**20, process.num_fds(), process.num_threads()
        except psutil.Error:
            return None, None, None

    learners = [p for p in server.children(recursive=True) if "learner" in " ".join(
        p.cmdline() if p.is_running() else [])]
    server_rss, server_fds, server_threads = proc(server)
    learner_rss, learner_fds, learner_threads = (proc(learners[0]) if learners
                                                 else (None, None, None))
    db_bytes = sum(p.stat().st_size for p in data.glob("duet.db*") if p.is_file())
    folders = [p for p in (data / "adapters").glob("v*") if p.is_dir()]
    return {"seconds": time.monotonic() - started, "server_rss_mb": server_rss,
            "learner_rss_mb": learner_rss, "server_fds": server_fds, "learner_fds": learner_fds,
            "server_threads": server_threads, "learner_threads": learner_threads,
            "db_mb": db_bytes / 2**20, "adapter_folders": len(folders),
            "live_version": status.get("live_adapter_version"),
            "votes_total": status.get("votes_total"),
            "learner_state": (status.get("learner") or {}).get("state")}


def plot(readings: list[dict], path: Path) -> None:
    """Memory (RSS of both processes) over the run's minutes, and below it their open files,
    threads and the adapter folders on disk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [r["seconds"] / 60 for r in readings]
    fig, (memory, counts) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for key, label in (("server_rss_mb", "server"), ("learner_rss_mb", "learner")):
        memory.plot(minutes, [r.get(key) for r in readings], label=label)
    memory.set_ylabel("RSS, MB")
    memory.legend()
    for key in ("server_fds", "learner_fds", "server_threads", "learner_threads",
                "adapter_folders"):
        counts.plot(minutes, [r.get(key) for r in readings], label=key.replace("_", " "))
    counts.set_ylabel("count")
    counts.set_xlabel("minutes")
    counts.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> Path:
    import httpx
    import psutil
    from gradio_client import Client
    from openai import OpenAI

    from tests.serving import running_server

    oracle = make_oracle(args.oracle, args.seed)
    prompts = load_prompts()
    rng = random.Random(args.seed)
    readings, pairs, votes, errors = [], 0, 0, []
    with tempfile.TemporaryDirectory(prefix="duet-soak-") as folder:
        data = Path(folder)
        with running_server("--model", args.model, "--data-dir", str(data),
                            "--max-new-tokens", str(args.max_new_tokens), "--seed",
                            str(args.seed), "--max-votes-per-minute", "0", *args.extra,
                            log_path=data / "server.log", timeout=600) as (url, process):
            client = OpenAI(base_url=url + "v1", api_key="local", max_retries=0, timeout=600)
            status = Client(url, verbose=False).predict
            server = psutil.Process(process.pid)
            started = time.monotonic()
            end = started + 60 * args.minutes
            next_reading = started
            history: list[dict] = []
            while time.monotonic() < end:
                if time.monotonic() >= next_reading:
                    readings.append(reading(server, data, started, status(api_name="/status")))
                    next_reading += args.sample_seconds
                if len(history) >= 2 * args.turns:
                    history = []  # a new conversation
                message = {"role": "user", "content": rng.choice(prompts)}
                try:
                    completion = client.chat.completions.create(
                        model="duet", n=2, messages=[*history, message])
                    pairs += 1
                    a, b = (choice.message.content for choice in completion.choices)
                    shown = time.monotonic()
                    choice = oracle.prefer(a, b)
                    body = {"pair_id": completion.pair_id, "choice": choice}
                    time.sleep(max(0.0, args.reader_seconds - (time.monotonic() - shown)))
                    httpx.post(url + "v1/feedback", json=body, timeout=60).raise_for_status()
                    votes += 1
                    if rng.random() < 0.1:  # now and then a thumb on the kept reply
                        httpx.post(url + "v1/feedback", timeout=60, json={
                            "pair_id": completion.pair_id, "side": "A" if choice != "B" else "B",
                            "thumb": "up"})
                    history = [*history, message, {"role": "assistant",
                                                   "content": b if choice == "B" else a}]
                except Exception as exc:  # noqa: BLE001 - a soak counts failures, goes on
                    errors.append(f"{type(exc).__name__}: {exc}"[:300])
                    history = []
            readings.append(reading(server, data, started, status(api_name="/status")))
    out = Path(args.out or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    plot(readings, out / "soak.png")
    return write_result("soak", {
        "minutes": args.minutes, "sample_seconds": args.sample_seconds,
        "reader_seconds": args.reader_seconds, "turns": args.turns, "oracle": args.oracle,
        "max_new_tokens": args.max_new_tokens, "model": args.model, "seed": args.seed,
        "extra": args.extra},
        {"pairs": pairs, "votes": votes, "errors": len(errors), "first_errors": errors[:5],
         "votes_lost": votes - (readings[-1]["votes_total"] or 0),
         "summary": summary(readings), "readings": readings}, out)
