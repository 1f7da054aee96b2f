"""neighbours: a server's pair time when it shares the host - with a second Duet server, and
beside another CPU-bound torch process - against the same server alone.

    python -m bench neighbours                       # alone on the machine (nohup ... &)
    python -m bench neighbours --env OMP_WAIT_POLICY=PASSIVE   # try a setting on all of them

Two servers start with the learner off (`--no-learner`) and the same settings. Each phase
asks `--pairs` pairs of `--max-new-tokens` tokens through /v1 (`n=2`, the `openai` package),
after one pair each to warm up:

* alone: server A asks, B sits idle;
* two servers: A and B ask at once, each in its own thread;
* beside a busy process: A asks while a plain torch process (matrix products on every core,
  torch's default threads: what another ML job on the host looks like) runs beside it.

The headline is each phase's median milliseconds per decode step (a pair's seconds over its
replies' mean length: replies that stop early do not pass for speed), and its ratio to A
alone. On 2 cores the fair share is 2x; the goal is <= 2.5x. `--env K=V` sets a variable
for every process the bench starts (both servers and the busy one), to compare thread
settings.

Left out: the learner (its priority and CPU share are learner/cores.py's, measured by
`bench latency`), more than two servers, the browser.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

from bench.common import RESULTS, write_result

TOPICS = ["rivers", "bridges", "winter", "the printing press", "bees", "trains", "volcanoes",
          "chess", "bread", "lighthouses", "glaciers", "clocks", "maps", "owls", "salt",
          "windmills", "coral reefs"]
BUSY = """
import torch
a = torch.randn(768, 768)
while True:
    a = torch.tanh(a @ a) * 0.5
"""


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", type=int, default=6, choices=range(1, len(TOPICS)),
                        metavar="N",
                        help="pairs timed per server and phase (default: 6)")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="reply length limit (default: 64)")
    parser.add_argument("--model", default="embedded", help="model (default: embedded)")
    parser.add_argument("--env", action="append", default=[], metavar="K=V",
                        help="an environment variable for every process started (repeatable)")
    parser.add_argument("--out", default=None, help="result folder (default: bench/results)")
    parser.add_argument("--tag", default="", help="suffix for the result file name")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="further flags for app.py")


def parse_env(items: list[str]) -> dict[str, str]:
    """K=V items as a dict; an item without '=' is refused with its text."""
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--env takes K=V, not {item!r}")
        env[key] = value
    return env


def ask_pairs(url: str, topics: list[str], count: int, max_new_tokens: int) -> list[dict]:
    """Seconds and tokens of each of `count` pairs asked one after another, after one
    unmeasured pair. The prompts ask for long texts, so most replies run to the limit."""
    from openai import OpenAI

    client = OpenAI(base_url=url + "v1", api_key="local", max_retries=0, timeout=600)
    pairs = []
    for i in range(count + 1):
        started = time.perf_counter()
        completion = client.chat.completions.create(
            model="duet", n=2, max_tokens=max_new_tokens, messages=[{
                "role": "user", "content": f"Write a long, detailed essay about {topics[i]}."}])
        if i:
            pairs.append({"seconds": time.perf_counter() - started,
                          "tokens": completion.usage.completion_tokens})
    return pairs


def step_ms(pair: dict) -> float:
    """Milliseconds per decode step of a pair: its seconds over its replies' mean length (a
    pair decodes both replies in the same steps; a reply that ends early is carried along)."""
    return 1000 * pair["seconds"] / max(1.0, pair["tokens"] / 2)


def phase(pairs: list[dict], alone: float | None) -> dict:
    """A phase's pairs, median seconds and ms per step, and the latter against alone."""
    median = statistics.median(step_ms(p) for p in pairs)
    return {"pairs": [{k: round(v, 3) for k, v in p.items()} for p in pairs],
            "median_seconds": round(statistics.median(p["seconds"] for p in pairs), 3),
            "median_step_ms": round(median, 1),
            "vs_alone": round(median / alone, 2) if alone else None}


def run(args: argparse.Namespace) -> Path:
    from tests.serving import running_server

    env = parse_env(args.env)
    flags = ["--model", args.model, "--no-learner", "--max-new-tokens",
             str(args.max_new_tokens), "--max-votes-per-minute", "0", *args.extra]

    def ask(url: str) -> list[dict]:
        return ask_pairs(url, TOPICS, args.pairs, args.max_new_tokens)

    # The servers and the busy process inherit `env`; it is put back as it was after.
    with mock.patch.dict(os.environ, env), \
            tempfile.TemporaryDirectory(prefix="duet-neighbours-") as folder, ExitStack() as stack:
        a, b = (stack.enter_context(running_server(
            "--data-dir", str(Path(folder) / name), *flags,
            log_path=Path(folder) / f"{name}.log", timeout=600))[0] for name in ("a", "b"))
        alone = ask(a)
        base = statistics.median(step_ms(p) for p in alone)
        with ThreadPoolExecutor(2) as pool:  # both servers asked at once
            both = list(pool.map(ask, (a, b)))
        busy = subprocess.Popen([sys.executable, "-c", BUSY])
        try:
            time.sleep(3)  # its threads are up and spinning
            beside_busy = ask(a)
        finally:
            busy.kill()
            busy.wait()
    results = {"alone": phase(alone, None), "two_servers_a": phase(both[0], base),
               "two_servers_b": phase(both[1], base), "beside_busy": phase(beside_busy, base)}
    results["worst_vs_alone"] = max(results[k]["vs_alone"] for k in (
        "two_servers_a", "two_servers_b", "beside_busy"))
    return write_result("neighbours" + (f"-{args.tag}" if args.tag else ""), {
        "pairs": args.pairs, "max_new_tokens": args.max_new_tokens, "model": args.model,
        "env": env, "extra": args.extra}, results, Path(args.out or RESULTS))
