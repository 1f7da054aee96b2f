"""Store latency per vote and per /ask: SQLite against PostgreSQL, the same verbs.

Times, one call at a time from one thread, what the server stores: `/ask` on a new
conversation (`add_turn`), `/ask` that goes on in a conversation (the service's reads -
conversation, open pair, messages - then `add_turn`), `/vote` (`record_vote`), and the
`/status` / hot-swap poll (`pending_counts` + `live_adapter`). Replies carry `--reply-tokens`
token ids and log-probs each, a prompt `--prompt-tokens` ids, as a real pair does.

PostgreSQL is a throw-away server started from Debian's binaries (tests/postgres.py) on
127.0.0.1 over TCP, with its default, durable settings (fsync, synchronous_commit on: each
commit waits for its WAL flush), unless `--pg-url` names another one; it is run a second time
with `synchronous_commit = off`, which matches SQLite's `synchronous=NORMAL` (a commit
survives a crash of the process, a power cut may lose the last few). SQLite is a file in a
temporary folder on the same disk.

Left out: concurrent clients (the vote storm test covers correctness under load, not speed),
a PostgreSQL on another host (add the network's round trip per statement: an /ask is about
a dozen statements, a vote about ten).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import write_result
from chatbot.store import Store


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=200, help="timed calls per operation")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls first")
    parser.add_argument("--reply-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--pg-url", default=None,
                        help="an existing PostgreSQL database to use (its tables get written); "
                             "default: start a temporary server")
    parser.add_argument("--out", default=None, help="folder for the JSON (default bench/results)")


def turn(args: argparse.Namespace, i: int) -> tuple[dict, list[dict]]:
    pair = {"prompt_token_ids": list(range(args.prompt_tokens)), "adapter_version": 0,
            "temperature": 0.8, "top_p": 0.95, "max_new_tokens": args.reply_tokens,
            "seconds": 1.0, "first_token_seconds": 0.1}
    replies = [{"text": f"reply {side} {i} " + "word " * args.reply_tokens,
                "token_ids": list(range(args.reply_tokens)),
                "token_logprobs": [-1.2345678] * args.reply_tokens,
                "behaviour_logprob": -80.0, "adapter_version": 0, "finish_reason": "length",
                "n_tokens": args.reply_tokens} for side in "AB"]
    return pair, replies


def timed(fn: Callable[[int], float], n: int, warmup: int) -> dict:
    """Run fn(i) warmup + n times; fn returns the seconds its timed part took."""
    for i in range(warmup):
        fn(-1 - i)
    ms = sorted(1000 * fn(i) for i in range(n))
    return {"median_ms": round(statistics.median(ms), 3),
            "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 3),
            "mean_ms": round(statistics.fmean(ms), 3), "n": n}


def measure(store: Store, args: argparse.Namespace) -> dict:
    users = [f"user{k}" for k in range(8)]
    open_pairs: list[str] = []
    conversations: dict[str, str] = {}  # user -> a conversation with no open pair

    def ask_new(i: int) -> float:
        user = users[i % len(users)]
        started = time.perf_counter()
        conversation_id, pair_id = store.add_turn(user, None, f"question {i}", *turn(args, i))
        elapsed = time.perf_counter() - started
        open_pairs.append((user, pair_id, conversation_id))
        return elapsed

    def vote(i: int) -> float:
        user, pair_id, conversation_id = open_pairs.pop()
        started = time.perf_counter()
        store.record_vote(user, pair_id, "AB"[i % 2])
        elapsed = time.perf_counter() - started
        conversations[user] = conversation_id
        return elapsed

    def ask_continue(i: int) -> float:
        user = users[i % len(users)]
        conversation_id = conversations[user]
        started = time.perf_counter()
        store.conversation(user, conversation_id)  # what ChatService._history reads
        store.open_pair(conversation_id)
        store.messages(conversation_id)
        _, pair_id = store.add_turn(user, conversation_id, f"more {i}", *turn(args, i))
        elapsed = time.perf_counter() - started
        store.record_vote(user, pair_id, "A")  # untimed: the next turn needs no open pair
        return elapsed

    def poll(_: int) -> float:
        started = time.perf_counter()
        store.pending_counts()
        store.live_adapter()
        return time.perf_counter() - started

    results = {"ask_new_conversation": timed(ask_new, args.n, args.warmup)}
    results["vote"] = timed(vote, args.n, args.warmup)
    results["ask_in_conversation"] = timed(ask_continue, args.n, args.warmup)
    results["status_poll"] = timed(poll, args.n, args.warmup)
    return results


def run(args: argparse.Namespace) -> Path:
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="duet-bench-store-") as folder:
        store = Store(Path(folder) / "duet.db")
        results["sqlite"] = measure(store, args)
        store.close()
    if args.pg_url:
        store = Store(args.pg_url)
        results["postgresql"] = measure(store, args)
        store.close()
    else:
        from tests.postgres import PostgresServer

        with PostgresServer(durable=True) as server:
            for key, synchronous_commit in (("postgresql", "on"),
                                            ("postgresql_async_commit", "off")):
                name = server.create_database(synchronous_commit=synchronous_commit)
                store = Store(server.url(name))
                results[key] = measure(store, args)
                store.close()
    ratio = {op: round(results["postgresql"][op]["median_ms"]
                       / results["sqlite"][op]["median_ms"], 2) for op in results["sqlite"]}
    results["postgresql_over_sqlite_median"] = ratio
    settings = {k: v for k, v in vars(args).items() if k not in ("func", "pg_url")}
    settings["pg"] = "given --pg-url" if args.pg_url else \
        "temporary server on 127.0.0.1 (TCP), default settings"
    for key, value in results.items():
        if key in ("sqlite", "postgresql", "postgresql_async_commit"):
            print(key, {op: r["median_ms"] for op, r in value.items()})
    return write_result("store-cpu", settings, results, args.out)
