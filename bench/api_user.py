"""api-user: a simulated user with a hidden preference votes through the public API of a real
`python app.py` (server + learner child), and the held-out satisfaction share is measured
through the same API before and after.

    python -m bench api-user --oracle you --votes 64

Before voting, and again once the learner has used every vote, the user asks each held-out
prompt in a new conversation (never voted on, so never trained on) and reads both replies.
The result is the share of those replies that satisfy the preference, before and after, with
a one-sided two-proportion z-test, and the mean reply length (collapse check).

Left out: several users, the browser (tests/test_browser.py drives the page).
"""

from __future__ import annotations

import argparse
import math
import random
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, slug, write_result
from bench.oracles import ORACLES, make_oracle, words
from bench.simulate import load_prompts, split_prompts
from chatbot.store import Store


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--oracle", default="you",
                        help="the hidden preference; noisy-NAME flips 20%% of NAME's votes; "
                             "re:PATTERN prefers replies matching a regular expression, else "
                             f"the shorter (one of {', '.join(sorted(ORACLES))}; default: you)")
    parser.add_argument("--votes", type=int, default=64, help="votes to cast (default: 64)")
    parser.add_argument("--eval-prompts", type=int, default=32,
                        help="held-out prompts asked before and after (default: 32)")
    parser.add_argument("--max-new-tokens", type=int, default=48,
                        help="reply length limit (default: 48)")
    parser.add_argument("--seed", type=int, default=0, help="prompt shuffle seed (default: 0)")
    parser.add_argument("--prompts", default=None,
                        help="a file of prompts, one per line (default: bench/data/prompts.txt)")
    parser.add_argument("--model", default="embedded", help="model (default: embedded)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds to wait for the learner to use every vote (default: 900)")
    parser.add_argument("--out", default=None, help="result folder (default: bench/results)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="further flags for app.py, e.g. --extra --objective dpo")


def one_sided_p(before: int, after: int, n: int) -> float:
    """P(after share > before share by chance): two-proportion z-test, pooled variance."""
    pooled = (before + after) / (2 * n)
    spread = math.sqrt(2 * pooled * (1 - pooled) / n) if 0 < pooled < 1 else 0.0
    if spread == 0:
        return 1.0
    z = (after - before) / n / spread
    return 0.5 * math.erfc(z / math.sqrt(2))


def read_held_out(client, prompts: list[str], oracle) -> dict:
    texts = []
    for prompt in prompts:
        turn = client.predict(prompt, "", api_name="/ask")
        texts += turn["replies"]
    return {"satisfied": sum(map(oracle.truth.satisfied, texts)), "replies": len(texts),
            "mean_words": sum(map(words, texts)) / len(texts), "sample": texts[:4]}


def run(args: argparse.Namespace) -> Path:
    from gradio_client import Client

    from tests.serving import running_server

    oracle = make_oracle(args.oracle, args.seed)
    prompts = load_prompts(Path(args.prompts)) if args.prompts else load_prompts()
    train, held_out = split_prompts(prompts, args.eval_prompts, seed=args.seed)
    rng = random.Random(args.seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="duet-api-user-") as data_dir:
        data = Path(data_dir)
        with running_server("--model", args.model, "--data-dir", str(data),
                            "--max-new-tokens", str(args.max_new_tokens), "--seed",
                            str(args.seed), "--max-votes-per-minute", "0", *args.extra,
                            log_path=data / "server.log", timeout=600) as (url, _):
            client = Client(url, verbose=False)
            before = read_held_out(client, held_out, oracle)
            choices = []
            for _ in range(args.votes):
                turn = client.predict(rng.choice(train), "", api_name="/ask")
                choice = oracle.prefer(*turn["replies"])
                client.predict(turn["pair_id"], choice, api_name="/vote")
                choices.append(choice)
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline:
                status = client.predict(api_name="/status")
                learner = status.get("learner") or {}
                if status["votes_pending"] == 0 and learner.get("state") != "training":
                    break
                time.sleep(2)
            else:
                print(f"the learner had not used every vote after {args.timeout:.0f} s: "
                      "measuring the adapter live now")
            time.sleep(5)  # let the server's swap poll pick up the last version
            status = client.predict(api_name="/status")
            after = read_held_out(client, held_out, oracle)
            steps = Store(data / "duet.db").learner_steps()
    n = before["replies"]
    results = {
        "before": before, "after": after,
        "satisfied_share_before": before["satisfied"] / n,
        "satisfied_share_after": after["satisfied"] / n,
        "p_value_one_sided": one_sided_p(before["satisfied"], after["satisfied"], n),
        "length_ratio": after["mean_words"] / before["mean_words"],
        "live_adapter_version": status["live_adapter_version"],
        "votes_pending_when_measured": status["votes_pending"],
        "votes": {c: choices.count(c) for c in sorted(set(choices))},
        "rounds": [{k: s.get(k) for k in ("adapter_version", "status", "kl", "heldout_acc",
                                          "live_heldout_acc", "judged_pairs", "seconds")}
                   for s in steps],
        "seconds_total": time.perf_counter() - started,
    }
    print({k: v for k, v in results.items() if k not in ("before", "after", "rounds")})
    settings = {"oracle": args.oracle, "votes": args.votes, "eval_prompts": args.eval_prompts,
                "max_new_tokens": args.max_new_tokens, "seed": args.seed, "model": args.model,
                "extra": args.extra}
    return write_result(f"api-user-{slug(args.oracle)}", settings, results,
                        Path(args.out) if args.out else RESULTS)
