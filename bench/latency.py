"""latency: vote-to-live and chat during a round, through the real server and learner processes
(python app.py).

    python -m bench latency [--rounds 6] [--learn-every 4]

Vote-to-live: from the vote that completes a --learn-every batch to /status showing a new
adapter version, in rounds where nobody chats meanwhile and the round's version goes live: the
round's preview (its first step, learner/rounds.py) where there is one, else the round's own
version; and to the round's own version (vote_to_round_live_seconds: what vote-to-live was
before the preview). Chat during a round: in every other round the user asks for up to
--chat-pairs pairs while the learner trains, then waits for the version; a pair counts when the
learner was training when it was asked and still when it came back, and its time per decode
step (seconds ÷ the longer reply's tokens: replies that stop early make a pair quicker) is
compared with a pair asked while the learner was idle (one before each round). So is each pair
the user asks for while voting (the learner starts on the next round as each vote comes in:
learner/head_start.py). The user votes as soon as a pair is there, or after --read-seconds: the
learner's start on the next round runs at its low priority, so it gets little done while
the server samples the next pair. The first pair (warm-up) is not counted. Non-stop chat
(--chat-pairs 0) starves the learner, which runs at a lower priority: such a round may not
go live within --timeout.

Left out: several users at once (tests/reliability/test_storm.py), the browser.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

from bench.common import RESULTS, write_result
from bench.oracles import ORACLES
from bench.simulate import load_prompts
from chatbot.states import LearnerState
from chatbot.store import Store


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=6, help="rounds to time (default: 6)")
    parser.add_argument("--no-chat-during-rounds", dest="chat_during_rounds",
                        action="store_false",
                        help="time vote-to-live only (default: every other round chats)")
    parser.add_argument("--learn-every", type=int, default=4,
                        help="votes per round (default: 4)")
    parser.add_argument("--model", default="embedded", help="model (default: embedded)")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="reply length limit (default: 64)")
    parser.add_argument("--chat-pairs", type=int, default=8,
                        help="pairs the user asks for during a chatting round, then waits "
                             "(default: 8; 0 = until the version is live)")
    parser.add_argument("--learner-threads", type=int, default=None,
                        help="the server's --learner-threads (default: the server's own)")
    parser.add_argument("--learner-idle-threads", type=int, default=None,
                        help="the server's --learner-idle-threads (default: the server's own)")
    parser.add_argument("--engine", choices=["transformers", "llama-cpp"], default=None,
                        help="the server's --engine (default: the server's own)")
    parser.add_argument("--pair-kernels", choices=["auto", "off"], default=None,
                        help="the server's --pair-kernels (default: the server's own)")
    parser.add_argument("--preview", action=argparse.BooleanOptionalAction, default=None,
                        help="the server's --preview / --no-preview (default: the server's own)")
    parser.add_argument("--read-seconds", type=float, default=0.0,
                        help="seconds the user takes to read a pair before voting (default: 0, "
                             "votes at once: the server is never idle while they vote)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds to wait for a version to go live (default: 300)")
    parser.add_argument("--out", default=None, help="result folder (default: bench/results)")


def run(args: argparse.Namespace) -> Path:
    from gradio_client import Client

    from tests.serving import running_server, wait_for

    rng = random.Random(0)
    prompts = load_prompts()
    oracle = ORACLES["shorter"]
    # (seconds, decode steps) per pair: the learner idle, training, or (while the user votes)
    # starting on the next round as each vote comes in
    rows, idle_asks, round_asks, voting_asks = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="duet-bench-") as data_dir:
        data = Path(data_dir)
        with running_server("--model", args.model, "--data-dir", str(data),
                            "--learn-every", str(args.learn_every),
                            "--max-new-tokens", str(args.max_new_tokens),
                            *(["--learner-threads", str(args.learner_threads)]
                              if args.learner_threads else []),
                            *(["--learner-idle-threads", str(args.learner_idle_threads)]
                              if args.learner_idle_threads else []),
                            *(["--pair-kernels", args.pair_kernels] if args.pair_kernels else []),
                            *(["--engine", args.engine] if args.engine else []),
                            *([] if args.preview is None else
                              ["--preview" if args.preview else "--no-preview"]),
                            log_path=data / "server.log", timeout=600) as (url, _), \
                contextlib.closing(Store(data / "duet.db")) as store:
            client = Client(url, verbose=False)

            def learner() -> str:
                return client.predict(api_name="/status")["learner"]["state"]

            def served() -> int:
                """The adapter version the server samples from, by /v1/models: a plain GET.
                Gradio's /status through its queue cost the host ~0.2 of a core at four
                looks a second, enough for the learner to count the host busy and keep to
                its share while nobody chats (learner/cores.py)."""
                with urllib.request.urlopen(url.rstrip("/") + "/v1/models", timeout=30) as r:
                    return json.load(r)["data"][0]["adapter_version"]

            def ask() -> tuple[dict, tuple[float, int]]:
                """A pair, with its seconds and decode steps (the longer reply's tokens)."""
                started = time.perf_counter()
                pair = client.predict(rng.choice(prompts), "", api_name="/ask")
                seconds = time.perf_counter() - started
                replies = store.pair(None, pair["pair_id"])["replies"]
                return pair, (seconds, max(r["n_tokens"] for r in replies))

            def timed_ask() -> tuple[float, int]:
                return ask()[1]

            timed_ask()  # the first pair warms the model up; not counted
            for round_no in range(args.rounds):
                chatting = args.chat_during_rounds and round_no % 2 == 1
                # Idle: after the round and after the learner's start on the next one (it
                # says "preparing" within moments of saying "idle" after a round).
                for _ in range(2):
                    wait_for(lambda: learner() == LearnerState.IDLE, args.timeout, every=0.5)
                    time.sleep(1.0)
                print(f"{time.strftime('%H:%M:%S')} asking the idle pair of round {round_no}")
                idle_asks.append(timed_ask())
                live = store.live_adapter_version()
                steps_before = [s["id"] for s in store.learner_steps(limit=1)]
                for _ in range(args.learn_every):
                    pair, timed = ask()
                    voting_asks.append(timed)
                    time.sleep(args.read_seconds)
                    client.predict(pair["pair_id"], oracle.prefer(*pair["replies"]),
                                   api_name="/vote")
                voted = time.perf_counter()
                outcome, asked, first_live, first_version = "timeout", 0, None, None
                while time.perf_counter() - voted < args.timeout:
                    # Read the round's row first: a version promoted after /status answered
                    # would look not yet served.
                    step = store.learner_steps(limit=1)
                    done = step if step and [step[-1]["id"]] != steps_before else None
                    serving = served()
                    if first_live is None and serving != live:  # the preview, or the round's
                        first_live = time.perf_counter() - voted
                        first_version = serving
                    if done and done[-1]["status"] != "promoted" and \
                            serving == store.live_adapter_version():
                        outcome = done[-1]["status"]  # rejected (or failed): the version the
                        break  # round started from is served (its preview withdrawn)
                    if done and serving == done[-1]["adapter_version"]:
                        outcome = "live"
                        break
                    if chatting and (not args.chat_pairs or asked < args.chat_pairs) and \
                            learner() == LearnerState.TRAINING:
                        timed = timed_ask()
                        asked += 1
                        if learner() == LearnerState.TRAINING:  # the round ran all along
                            round_asks.append(timed)
                    else:
                        time.sleep(0.25)
                round_latency = time.perf_counter() - voted
                step = store.learner_steps(limit=1)
                registered = store.adapters()
                # How long the learner took to start the round after the last vote (finishing
                # what it was preparing): the round ends at its row's time.
                last_vote = max((datetime.fromisoformat(v["created_at"]) for v in store.votes()),
                                default=None)
                start_gap = ((datetime.fromisoformat(step[-1]["created_at"]) - last_vote)
                             .total_seconds() - step[-1]["seconds"]
                             if step and last_vote else None)
                metrics = registered[-1]["metrics"] or {} if registered else {}
                rows.append({"outcome": outcome, "chat_during_round": chatting,
                             "vote_to_live_seconds": first_live,
                             "first_live_version": first_version,
                             "vote_to_round_live_seconds":
                                 round_latency if outcome == "live" else None,
                             "learner_round_seconds": step[-1]["seconds"] if step else None,
                             "vote_to_round_start_seconds": start_gap,
                             "version": serving,
                             "new_votes": step[-1]["new_votes"] if step else None,
                             "replayed_votes": step[-1]["replayed_votes"] if step else None,
                             # where the round's time went, and the threads it ran on
                             "phase_seconds": metrics.get("phase_seconds"),
                             "micro_batches_by_threads":
                                 metrics.get("micro_batches_by_threads"),
                             "preview": metrics.get("preview")})
                print(json.dumps(rows[-1]))
            # The server's changes of thread count (chatbot/threads.py logs each), to read
            # beside the rounds: which pairs ran on one thread and why.
            thread_changes = [line.strip() for line in
                              (data / "server.log").read_text(errors="replace").splitlines()
                              if "torch threads" in line and "->" in line]
    quiet = [r["vote_to_live_seconds"] for r in rows
             if r["outcome"] == "live" and not r["chat_during_round"]]
    quiet_round = [r["vote_to_round_live_seconds"] for r in rows
                   if r["outcome"] == "live" and not r["chat_during_round"]]
    idle_ms = [1000 * t / n for t, n in idle_asks]
    round_ms = [1000 * t / n for t, n in round_asks]
    voting_ms = [1000 * t / n for t, n in voting_asks]
    results = {"rounds": rows, "server_thread_changes": thread_changes,
               "vote_to_live_seconds_median": statistics.median(quiet) if quiet else None,
               "vote_to_live_seconds_max": max(quiet) if quiet else None,
               "vote_to_round_live_seconds_median":
                   statistics.median(quiet_round) if quiet_round else None,
               "vote_to_round_live_seconds_max": max(quiet_round) if quiet_round else None,
               "pair_seconds_idle": [t for t, _ in idle_asks],
               "pair_seconds_during_round": [t for t, _ in round_asks],
               "pair_steps_idle": [n for _, n in idle_asks],
               "pair_steps_during_round": [n for _, n in round_asks],
               # A pair's time depends on how long its replies ran: compare per decode step.
               "ms_per_step_idle_median": statistics.median(idle_ms) if idle_ms else None,
               "ms_per_step_during_round_median":
                   statistics.median(round_ms) if round_ms else None,
               "pair_seconds_while_voting": [t for t, _ in voting_asks],
               "pair_steps_while_voting": [n for _, n in voting_asks],
               "ms_per_step_while_voting_median":
                   statistics.median(voting_ms) if voting_ms else None}
    if idle_ms and round_ms:
        results["during_round_over_idle"] = (results["ms_per_step_during_round_median"]
                                             / results["ms_per_step_idle_median"])
    if idle_ms and voting_ms:
        results["while_voting_over_idle"] = (results["ms_per_step_while_voting_median"]
                                             / results["ms_per_step_idle_median"])
    settings = {"model": args.model, "learn_every": args.learn_every,
                "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
                "chat_during_rounds": args.chat_during_rounds, "chat_pairs": args.chat_pairs,
                "read_seconds": args.read_seconds, "learner_threads": args.learner_threads,
                "learner_idle_threads": args.learner_idle_threads,
                "pair_kernels": args.pair_kernels, "preview": args.preview,
                "engine": args.engine}
    return write_result("latency", settings, results, Path(args.out) if args.out else RESULTS)

