"""api-user: a simulated user with a hidden preference chats, votes and corrects through the
OpenAI-compatible API of a real `python app.py` (server + learner child, the product's
defaults), and the held-out satisfaction share is measured through the same API before and
after.

    python -m bench api-user --oracle you --votes 64
    python -m bench api-user --oracle can --votes 32 --correct-every 8 \\
        --correction-text "Here is what I can tell you."
    python -m bench api-user --oracle can --votes 32 --correct-every 8 \\
        --correction-text "I can help with that." --correction-text "Anyone can learn this."
    python -m bench api-user --suite corrections     # users x seeds x arms: bench/user_suite.py

A user asks for a pair (`n=2` through the `openai` package), reads it at their pace (`instant`:
votes as soon as it comes; `reader`: --reader-seconds after it came) and votes through
`POST /v1/feedback`. With --correct-every N a correction falls due every N interactions: at
the first interaction from then on whose preferred reply lacks the feature, the user sends the
vote with a rewrite of that reply (bench/oracles.py `corrected`: their own sentence with the
feature first, the rest kept). Given several sentences, the user draws one at random for each
correction (a rng of its own, so the prompts asked are the same as with one sentence): a
person's rewrites vary. An interaction is one pair: a run with corrections has as many as one
without.

Before voting, and again once the learner has used every vote and correction, the user asks
each held-out prompt (never voted on, so never trained on) for a pair and reads both replies:
the share that satisfies the preference, before and after, with a one-sided two-proportion
z-test and (each prompt a stratum: prompts differ in how often any reply has the feature) the
exact one-sided conditional test across the strata (`stratified_p`), and the mean reply
length. `--eval-replies` sets the replies per prompt (2: one pair; a suite fixes its own).

A run with corrections also scores the replies after with the user's correction sentences
taken out (`less_correction`): a model that learns to write a sentence the user put first in
rewrite after rewrite satisfies the preference by copying it.

Each run also reads how much of its change the replies' lengths alone explain
(`share_at_length`): the share the replies after would have at the replies before's rate for
their lengths. Where the replies shorten and the feature comes with longer replies (a long
word, a number), the share falls by that much whatever the model learnt of the feature.

Left out: the browser (tests/test_browser.py drives the page), several users on one server.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import RESULTS, slug, write_result
from bench.oracles import ORACLES, Oracle, corrected, make_oracle, words
from bench.simulate import load_prompts, split_prompts
from chatbot.store import Store
from learner.objectives import shorter_reply_won

# Each round's adapter metrics kept beside its learner_steps row (the run's data folder is
# deleted): where its loss came from, and with --self-samples what the reward model knew.
ROUND_METRICS = ("kl_loss", "largest_term", "shorter_wins", "reward_model_cv_acc",
                 "reward_model_new_acc", "self_samples", "step_fraction", "kl_full_step")


def add_args(parser: argparse.ArgumentParser) -> None:
    from bench.user_suite import SUITES

    parser.add_argument("--oracle", default="you",
                        help="the hidden preference; noisy-NAME flips 20%% of NAME's votes; "
                             "re:PATTERN prefers replies matching a regular expression, else "
                             f"the shorter (one of {', '.join(sorted(ORACLES))}; default: you)")
    parser.add_argument("--votes", type=int, default=64,
                        help="interactions (pairs voted on) (default: 64)")
    parser.add_argument("--correct-every", type=int, default=0,
                        help="a correction falls due every N interactions (default: 0, none)")
    parser.add_argument("--correction-text", action="append", default=None,
                        help="the sentence with the feature the user puts first when they fix "
                             "a reply (needed with --correct-every); given more than once, "
                             "one of them drawn at random for each correction")
    parser.add_argument("--pace", choices=("instant", "reader"), default="instant",
                        help="instant: vote as soon as the pair comes; reader: after "
                             "--reader-seconds (default: instant)")
    parser.add_argument("--reader-seconds", type=float, default=10.0,
                        help="a reader's time per pair (default: 10)")
    parser.add_argument("--suite", choices=sorted(SUITES), default=None,
                        help="run a suite of users x seeds x arms instead of one run")
    parser.add_argument("--suite-users", default=None, metavar="NAME[,NAME...]",
                        help="with --suite: run only these of its users (the table still shows "
                             "every run kept), e.g. to run one user's seeds first")
    parser.add_argument("--summarize", action="store_true",
                        help="with --suite: write its table, plot and JSON from the runs kept "
                             "so far, run nothing")
    parser.add_argument("--read-base", action="store_true",
                        help="with --suite: read the base model's held-out replies of each of "
                             "its seeds again on this machine, learner off, and compare them "
                             "with those its runs were scored on (did the engine or the "
                             "learning change the replies?); run nothing else")
    parser.add_argument("--eval-prompts", type=int, default=32,
                        help="held-out prompts asked before and after (default: 32)")
    parser.add_argument("--eval-replies", type=int, default=2,
                        help="replies per held-out prompt, before and after (default: 2)")
    parser.add_argument("--max-new-tokens", type=int, default=48,
                        help="reply length limit (default: 48)")
    parser.add_argument("--seed", type=int, default=0, help="prompt shuffle seed (default: 0)")
    parser.add_argument("--prompts", default=None,
                        help="a file of prompts, one per line (default: bench/data/prompts.txt)")
    parser.add_argument("--model", default="embedded", help="model (default: embedded)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds to wait for the learner to use everything (default: 900)")
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


def stratified_p(before: list[int], after: list[int], per_prompt: int) -> float:
    """P(the after share is this high or higher by chance), each held-out prompt a stratum:
    the exact one-sided conditional test on per-prompt counts of satisfied replies
    (`per_prompt` replies each, before and after). Prompts differ in how often any reply has
    the feature, and a prompt whose replies all have it (or none do) says nothing about the
    change; the pooled two-proportion test counts that spread as noise. Given each prompt's
    total, its count after is hypergeometric if nothing changed; the p-value is the upper
    tail of their sum, convolved exactly. It never rejects more often than its level: with
    no change, on 32 prompts of 2 replies whose rates range from 0 to 1, it rejected at 5% in
    2.5-3.8% of 2,000 draws, where the Cochran-Mantel-Haenszel normal approximation it
    replaced did in 4.3-5.8% (defaults-instant-64's "you" s0: 0.048 there, 0.075 here) and
    the pooled test in under 1%."""
    n = 2 * per_prompt  # a prompt's replies, before and after
    ways = math.comb(n, per_prompt)
    tail = {0: 1.0}  # distribution of the summed counts after, stratum by stratum
    for b, a in zip(before, after, strict=True):
        total = a + b
        here = {x: math.comb(total, x) * math.comb(n - total, per_prompt - x) / ways
                for x in range(max(0, total - per_prompt), min(total, per_prompt) + 1)}
        summed: dict[int, float] = {}
        for s, p in tail.items():
            for x, q in here.items():
                summed[s + x] = summed.get(s + x, 0.0) + p * q
        tail = summed
    observed = sum(after)
    return min(1.0, sum(p for s, p in tail.items() if s >= observed))


def held_out_texts(client, prompts: list[str], per_prompt: int = 2, pairs: bool = True
                   ) -> list[str]:
    """`per_prompt` replies to each prompt (pairs, then one reply if odd), in prompt order.
    `pairs=False` asks for one reply at a time: a server that chooses its pairs from
    candidates (--pair-candidates) shows two chosen replies, and one that explores
    (--explore-temperature) draws one of the two at another temperature: neither pair is two
    samples of its policy."""
    texts = []
    for prompt in prompts:
        sizes = ([2] * (per_prompt // 2) + [1] * (per_prompt % 2) if pairs
                 else [1] * per_prompt)
        for n in sizes:
            completion = client.chat.completions.create(
                model="duet", messages=[{"role": "user", "content": prompt}], n=n)
            texts += [choice.message.content for choice in completion.choices]
    return texts


def server_flags(model: str, data: Path, max_new_tokens: int, seed: int,
                 extra: list[str]) -> list[str]:
    """app.py's flags for a run: the product's defaults but for the model, a data folder of
    the run's own, the reply length, the sampling seed and no vote rate limit (the simulated
    user votes faster than a person may), then `extra`."""
    return ["--model", model, "--data-dir", str(data), "--max-new-tokens", str(max_new_tokens),
            "--seed", str(seed), "--max-votes-per-minute", "0", *extra]


def read_held_out(*, seed: int, eval_prompts: int, eval_replies: int, max_new_tokens: int,
                  model: str, extra: list[str], prompts_file: str | None = None) -> list[str]:
    """The base model's held-out replies of `seed`, read as a run reads them before its first
    vote (the same server flags, prompts and order), from a server whose learner is off."""
    from openai import OpenAI

    from tests.serving import running_server

    prompts = load_prompts(Path(prompts_file)) if prompts_file else load_prompts()
    _, held_out = split_prompts(prompts, eval_prompts, seed=seed)
    with tempfile.TemporaryDirectory(prefix="duet-api-base-") as data_dir:
        data = Path(data_dir)
        with running_server(*server_flags(model, data, max_new_tokens, seed,
                                          [*extra, "--no-learner"]),
                            log_path=data / "server.log", timeout=600) as (url, _):
            client = OpenAI(base_url=url + "v1", api_key="local", max_retries=0, timeout=600)
            return held_out_texts(client, held_out, eval_replies, not chooses_pairs(extra))


def scored(texts: list[str], oracle, per_prompt: int = 2) -> dict:
    hits = [int(oracle.truth.satisfied(t)) for t in texts]
    return {"satisfied": sum(hits), "replies": len(texts),
            "mean_words": sum(map(words, texts)) / len(texts), "sample": texts[:4],
            "satisfied_by_prompt": [sum(hits[i:i + per_prompt])
                                    for i in range(0, len(hits), per_prompt)]}


def correction_sentences(text: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """The user's correction sentences: one (a str, as runs before the pools stored it) or
    several, of which each correction draws one."""
    if text is None:
        return []
    return [text] if isinstance(text, str) else list(text)


def less_correction(texts: list[str], sentences: str | list[str], oracle,
                    before_satisfied: int) -> dict:
    """The held-out replies after, scored with the user's correction sentences taken out
    wherever they appear. A simulated user puts a sentence of their own first in every
    rewrite, and after several corrections the model writes it verbatim: that satisfies the
    preference by a copied sentence. The share without them, its one-sided p against the share
    before (the base model never wrote them), and how many replies had one."""
    sentences = correction_sentences(sentences)
    stripped = []
    for text in texts:
        for sentence in sentences:
            text = text.replace(sentence, " ")
        stripped.append(" ".join(text.split()))
    satisfied = sum(oracle.truth.satisfied(text) for text in stripped)
    return {"satisfied_share_after_less_correction": satisfied / len(texts),
            "p_value_less_correction": one_sided_p(before_satisfied, satisfied, len(texts)),
            "replies_with_correction_sentence": sum(any(sentence in text for sentence in sentences)
                                                    for text in texts)}


def share_at_length(before_texts: list[str], after_texts: list[str], oracle) -> float:
    """The share of the replies after that would have the feature if only their lengths had
    changed: a logistic regression of the feature on log(1 + words) over the replies before,
    averaged over the replies after. With the same lengths as before it is the share before
    (at the fit, the fitted chances average to the observed share); the share after minus it
    is what the lengths do not explain. Left out: everything but length (the prompt, where
    in the reply the feature sits); the replies before are the fit's only data, and a slope
    kept small (a ridge of 1 on it) where the feature separates short from long replies. The
    fit is learner/reward.py's way: LBFGS on the penalised log-loss."""
    hits = torch.tensor([float(oracle.truth.satisfied(text)) for text in before_texts],
                        dtype=torch.float64)
    share = hits.mean().item()
    if share in (0.0, 1.0):
        return share  # no reply with (or without) the feature: no rate to tell apart by length

    def log_words(texts: list[str]) -> torch.Tensor:
        return torch.tensor([math.log1p(words(text)) for text in texts], dtype=torch.float64)

    x = log_words(before_texts)
    a = torch.tensor(math.log(share / (1 - share)), dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([a, b], max_iter=200, tolerance_grad=1e-10,
                                  tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (F.binary_cross_entropy_with_logits(a + b * x, hits, reduction="sum")
                + b.square() / 2)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return torch.sigmoid(a + b * log_words(after_texts)).mean().item()


def learner_done(status: dict) -> bool:
    """Every vote and correction used, and no round running."""
    return (status["votes_pending"] == 0 and status.get("corrections_pending", 0) == 0
            and (status.get("learner") or {}).get("state") != "training")


def vote_to_live(store: Store) -> list[float]:
    """Seconds from each vote or correction to the first live version trained on it: its
    round's preview where there was one, else the round's own version if promoted."""
    adapters = {a["version"]: a for a in store.adapters()}
    steps = {s["adapter_version"]: s for s in store.learner_steps()}
    previews = {a["preview_of"]: a for a in adapters.values() if a.get("preview_of")}
    seconds = []
    for row in store.votes() + store.corrections():
        step = steps.get(row["used_by_version"])
        if step is None:
            continue
        live = previews.get(step["round_id"])
        if live is None and step["status"] == "promoted":
            live = adapters[step["adapter_version"]]
        if live is not None:
            seconds.append(_stamp(live["created_at"]) - _stamp(row["created_at"]))
    return seconds


def _stamp(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text).timestamp()


def chooses_pairs(extra: list[str]) -> bool:
    """Whether app.py's flags make its pairs other than two samples of its policy: chosen from
    more than two candidates, or one reply drawn at an exploring temperature (read by app.py's
    own parser)."""
    import app

    args = app.build_parser().parse_args(list(extra))
    return args.pair_candidates > 2 or bool(args.explore_temperature)


def run_one(*, oracle_name: str, seed: int, interactions: int, correct_every: int,
            correction_text: str | list[str] | None, pace: str, reader_seconds: float,
            eval_prompts: int, eval_replies: int = 2,
            max_new_tokens: int, model: str, timeout: float, extra: list[str],
            prompts_file: str | None = None, before_texts: list[str] | None = None) -> dict:
    """One user's run; `before_texts`: the base model's held-out replies, read already;
    `correction_text`: the sentence the user's corrections put first, or several to draw
    from."""
    import httpx
    from gradio_client import Client
    from openai import OpenAI

    from tests.serving import running_server

    oracle = make_oracle(oracle_name, seed)
    sentences = correction_sentences(correction_text)
    if correct_every and not sentences:
        raise ValueError("--correct-every needs --correction-text: the sentence the user adds")
    for sentence in sentences:
        corrected(oracle, "", sentence)  # each must have the feature
    prompts = load_prompts(Path(prompts_file)) if prompts_file else load_prompts()
    train, held_out = split_prompts(prompts, eval_prompts, seed=seed)
    rng = random.Random(seed)
    drafts = random.Random(f"{seed}-corrections")  # apart from rng: the same prompts either way
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="duet-api-user-") as data_dir:
        data = Path(data_dir)
        with running_server(*server_flags(model, data, max_new_tokens, seed, extra),
                            log_path=data / "server.log", timeout=600) as (url, _):
            client = OpenAI(base_url=url + "v1", api_key="local", max_retries=0, timeout=600)
            status = Client(url, verbose=False).predict
            read_before = before_texts is None
            plain = not chooses_pairs(extra)  # held-out replies: the policy's own samples
            if read_before:
                before_texts = held_out_texts(client, held_out, eval_replies, plain)
            choices, corrections, due, asked = [], 0, 0, []
            for i in range(interactions):
                if correct_every and i % correct_every == correct_every - 1:
                    due += 1
                completion = client.chat.completions.create(
                    model="duet", n=2, messages=[{"role": "user", "content": rng.choice(train)}])
                shown = time.monotonic()
                a, b = (choice.message.content for choice in completion.choices)
                choice = oracle.prefer(a, b)
                body = {"pair_id": completion.pair_id, "choice": choice}
                side = "B" if choice == "B" else "A"
                rewrite = corrected(oracle, a if side == "A" else b, drafts.choice(sentences)) \
                    if due else None
                if rewrite is not None:
                    body.update(correction=rewrite, side=side)
                    due -= 1
                    corrections += 1
                if pace == "reader":
                    time.sleep(max(0.0, reader_seconds - (time.monotonic() - shown)))
                httpx.post(url + "v1/feedback", json=body, timeout=60).raise_for_status()
                choices.append(choice)
                asked.append(time.monotonic() - shown)
            deadline = time.monotonic() + timeout
            while not learner_done(status(api_name="/status")):
                if time.monotonic() > deadline:
                    print(f"the learner had not used everything after {timeout:.0f} s: "
                          "measuring the adapter live now")
                    break
                time.sleep(2)
            time.sleep(5)  # let the server's swap poll pick up the last version
            final = status(api_name="/status")
            after_texts = held_out_texts(client, held_out, eval_replies, plain)
            store = Store(data / "duet.db")
            steps = store.learner_steps()
            metrics = {a["version"]: a["metrics"] or {} for a in store.adapters()}
            seconds_to_live = vote_to_live(store)
            voted = [row[1:] for row in store.used_vote_texts()]  # (choice, text A, text B)
            store.close()
        learner_lines = learner_log_lines(data / "learner.log")
    if len(before_texts) != len(after_texts):
        raise ValueError(f"{len(before_texts)} held-out replies before, {len(after_texts)} "
                         "after: read the base model's again with the same --eval-replies")
    before = scored(before_texts, oracle, eval_replies)
    after = scored(after_texts, oracle, eval_replies)
    n = before["replies"]
    rounds = [s for s in steps if s.get("adapter_version") is not None]
    return {
        "before": before, "after": after, "before_texts": before_texts,
        "after_texts": after_texts,  # what the user read after: for looking into a run
        "before_read_here": read_before,
        "satisfied_share_before": before["satisfied"] / n,
        "satisfied_share_after": after["satisfied"] / n,
        "p_value_one_sided": one_sided_p(before["satisfied"], after["satisfied"], n),
        "p_value_stratified": stratified_p(before["satisfied_by_prompt"],
                                           after["satisfied_by_prompt"], eval_replies),
        "eval_replies": eval_replies,
        "length_ratio": after["mean_words"] / before["mean_words"],
        "satisfied_share_at_length": share_at_length(before_texts, after_texts, oracle),
        "live_adapter_version": final["live_adapter_version"],
        "votes_pending_when_measured": final["votes_pending"],
        "corrections_pending_when_measured": final.get("corrections_pending"),
        "votes": {c: choices.count(c) for c in sorted(set(choices))},
        "corrections": corrections,
        "kl_last_round": rounds[-1]["kl"] if rounds else None,
        "round_sizes": [s["new_votes"] for s in rounds],
        "rounds": [{**{k: s.get(k) for k in ("adapter_version", "status", "kl", "beta", "loss",
                                             "new_votes", "replayed_votes", "seconds")},
                    **{k: metrics.get(s.get("adapter_version"), {}).get(k)
                       for k in ROUND_METRICS}}
                   for s in steps],
        "shorter_won": shorter_won(voted),
        "feature_decided": feature_decided(voted, oracle),
        "vote_to_live_seconds_median": (statistics.median(seconds_to_live)
                                        if seconds_to_live else None),
        "seconds_total": time.perf_counter() - started,
        "learner_log": learner_lines,
        **(less_correction(after_texts, sentences, oracle, before["satisfied"])
           if correct_every else {}),
    }


def learner_log_lines(path: Path) -> list[str]:
    """The learner log's round summaries and warnings (the rest is per-request noise): what
    a look into a run after the fact needs, since the run's data folder is deleted."""
    if not path.exists():
        return []
    return [line for line in path.read_text(errors="replace").splitlines()
            if (" INFO learner" in line and "round " in line) or " WARNING " in line
            or " ERROR " in line]


def shorter_won(voted: list[tuple[str, str, str]]) -> float | None:
    """The share of A-or-B votes between replies of different lengths that the shorter reply
    won (Store.used_vote_texts): how much of what the user taught was length."""
    outcomes = [won for won in (shorter_reply_won(*vote) for vote in voted) if won is not None]
    return sum(outcomes) / len(outcomes) if outcomes else None


def feature_decided(voted: list[tuple[str, str, str]], oracle: Oracle) -> dict:
    """Of the A-or-B votes the learner used (Store.used_vote_texts), those between a reply with
    the user's feature and one without, judged without annotation noise: how many, how many
    the reply with the feature won, and in how many it was the shorter one (the feature and
    the tie-break agree there, and a length-neutral rule gives the vote little weight). These
    votes can teach the preference; the others teach the tie-break."""
    truth = oracle.truth
    decided = []
    for choice, a, b in voted:
        has_a, has_b = truth.satisfied(a), truth.satisfied(b)
        if has_a != has_b:
            featured, other = (a, b) if has_a else (b, a)
            decided.append((choice == ("A" if has_a else "B"), words(featured) < words(other)))
    return {"votes": len(decided), "won_by_feature": sum(won for won, _ in decided),
            "feature_in_shorter": sum(shorter for _, shorter in decided)}


def summary(result: dict) -> dict:
    return {k: result[k] for k in ("satisfied_share_before", "satisfied_share_after",
                                   "p_value_one_sided", "length_ratio", "corrections",
                                   "round_sizes", "shorter_won", "feature_decided",
                                   "vote_to_live_seconds_median",
                                   "seconds_total")}


def run(args: argparse.Namespace) -> Path:
    if args.suite:
        from bench.user_suite import run_suite

        return run_suite(args)
    if args.read_base:
        raise ValueError("--read-base reads a suite's replies before: give --suite NAME")
    results = run_one(oracle_name=args.oracle, seed=args.seed, interactions=args.votes,
                      correct_every=args.correct_every, correction_text=args.correction_text,
                      pace=args.pace, reader_seconds=args.reader_seconds,
                      eval_prompts=args.eval_prompts, eval_replies=args.eval_replies,
                      max_new_tokens=args.max_new_tokens,
                      model=args.model, timeout=args.timeout, extra=args.extra,
                      prompts_file=args.prompts)
    results.pop("before_texts")
    print(summary(results))
    return write_result(f"api-user-{slug(args.oracle)}", run_settings(args, args.oracle,
                                                                      args.seed),
                        results, Path(args.out) if args.out else RESULTS)


def run_settings(args: argparse.Namespace, oracle: str, seed: int, **changes) -> dict:
    return {"oracle": oracle, "votes": args.votes, "correct_every": args.correct_every,
            "correction_text": args.correction_text, "pace": args.pace,
            "reader_seconds": args.reader_seconds, "eval_prompts": args.eval_prompts,
            "eval_replies": args.eval_replies,
            "max_new_tokens": args.max_new_tokens, "seed": seed, "model": args.model,
            "extra": args.extra, **changes}
