"""latency: vote-to-live. From the vote that completes a --learn-every batch to /status showing
the new adapter version, through the real server and learner processes (python app.py).

    python -m bench latency [--rounds 3] [--learn-every 4]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, write_result
from bench.oracles import ORACLES
from bench.simulate import load_prompts
from chatbot.store import Store


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=3, help="rounds to time (default: 3)")
    parser.add_argument("--learn-every", type=int, default=4,
                        help="votes per round (default: 4)")
    parser.add_argument("--model", default="embedded", help="model (default: embedded)")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="reply length limit (default: 64)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds to wait for a version to go live (default: 300)")
    parser.add_argument("--out", default=None, help="result folder (default: bench/results)")


def run(args: argparse.Namespace) -> Path:
    from gradio_client import Client

    from tests.serving import running_server

    rng = random.Random(0)
    prompts = load_prompts()
    oracle = ORACLES["shorter"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="duet-bench-") as data_dir:
        data = Path(data_dir)
        with running_server("--model", args.model, "--data-dir", str(data),
                            "--learn-every", str(args.learn_every),
                            "--max-new-tokens", str(args.max_new_tokens),
                            log_path=data / "server.log", timeout=600) as (url, _):
            client = Client(url, verbose=False)
            for _ in range(args.rounds):
                live = client.predict(api_name="/status")["registry_live_version"]
                versions_before = len(Store(data / "duet.db").adapters())
                for _ in range(args.learn_every):
                    pair = client.predict(rng.choice(prompts), "", api_name="/ask")
                    client.predict(pair["pair_id"], oracle.prefer(*pair["replies"]),
                                   api_name="/vote")
                voted = time.perf_counter()
                outcome = "timeout"
                while time.perf_counter() - voted < args.timeout:
                    status = client.predict(api_name="/status")
                    if status["live_adapter_version"] != live:
                        outcome = "live"
                        break
                    if len(Store(data / "duet.db").adapters()) > versions_before and \
                            status["registry_live_version"] == live:
                        outcome = "rejected"  # the gate kept the live version
                        break
                    time.sleep(0.25)
                latency = time.perf_counter() - voted
                step = Store(data / "duet.db").learner_steps(limit=1)
                rows.append({"outcome": outcome, "vote_to_live_seconds": latency,
                             "learner_round_seconds": step[-1]["seconds"] if step else None,
                             "version": status["live_adapter_version"]})
                print(json.dumps(rows[-1]))
    live_latencies = [r["vote_to_live_seconds"] for r in rows if r["outcome"] == "live"]
    results = {"rounds": rows,
               "vote_to_live_seconds_median": statistics.median(live_latencies)
               if live_latencies else None,
               "vote_to_live_seconds_max": max(live_latencies) if live_latencies else None}
    settings = {"model": args.model, "learn_every": args.learn_every,
                "max_new_tokens": args.max_new_tokens, "rounds": args.rounds}
    return write_result("latency", settings, results, Path(args.out) if args.out else RESULTS)
