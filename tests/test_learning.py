"""Does it learn? Simulated users vote through the real store, learner and hot-swap on the
embedded SmolLM2, and fresh replies to held-out prompts must show it: a user who wants a
content feature (a number in the reply, in about a third of the base model's replies) and
otherwise picks the shorter reply, as people do, within 24 votes raises the share of held-out
replies with the feature significantly (one-sided two-proportion test) - the claim the
product makes and `python -m bench api-user` checks through the public API - without
collapsing the model. Marked slow: several minutes on two CPU cores.

Left out: a "shorter replies" user at 32-token replies and 24 votes. That test passed
(win rate 0.73, p = 0.0006) and then failed (0.52, p = 0.44) with the same learning code,
after a hot-swap change altered only which random numbers the run drew: at that size the
outcome is the run's luck, not a property of the loop. Whether Duet learns reliably across
users and seeds is the learning suite's question (bench/suite.py), not one seed's.

It runs `python -m bench learn` in a process of its own, as the server and its learner run:
in pytest's process, after earlier tests' torch work had left idle OpenMP teams behind, every
parallel region's workers slept (chatbot/sampling.py, "Threads"): the same run took 258 s
after two test files against 198 s alone (and 313 s at the end of a full run, when the
simulation still computed each round's preview)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.api_user import one_sided_p
from bench.suite import NOT_IN_SIMULATION
from chatbot.config import Config
from tests.serving import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

EVAL_PROMPTS = 24
FEATURE_VOTES = 24


def learn(tmp_path, oracle: str, votes: int, max_new_tokens: int) -> dict:
    """`python -m bench learn` on the embedded model, seed 0, evaluated before and after on
    EVAL_PROMPTS held-out prompts, in float32 (bench learn's default, as the runs that sized
    this test: the same computation on every CPU); its result file's "results"."""
    subprocess.run(
        [sys.executable, "-m", "bench", "learn", "--oracle", oracle, "--votes", str(votes),
         "--checkpoints", f"0,{votes}", "--eval-prompts", str(EVAL_PROMPTS),
         "--max-new-tokens", str(max_new_tokens), "--seed", "0", "--device", "cpu",
         "--out", str(tmp_path)],
        cwd=ROOT, check=True, timeout=1500, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    [path] = tmp_path.glob("learn-*.json")
    return json.loads(path.read_text())["results"]


def test_a_content_preference_moves_the_held_out_share(tmp_path):
    # 48-token replies, as in the learning suite: with 32-token replies (nearly all cut off)
    # a run of 32 votes made the replies shorter and left the share with a number where it
    # was (17/48 -> 12/48); with 48 tokens this run went 11/48 -> 25/48 at 24 votes, and with
    # length-neutral votes (the default since stop 40) 11/48 -> 26/48, p = 0.0008; with the
    # loss's two terms bounded (the default since stop 53) 11/48 -> 24/48, p = 0.0029.
    results = learn(tmp_path, "numbers", FEATURE_VOTES, max_new_tokens=48)
    base, after = results["evaluations"]
    assert (base["votes"], after["votes"]) == (0, FEATURE_VOTES)
    replies = 2 * EVAL_PROMPTS
    before_n = round(base["satisfied_share"] * replies)
    after_n = round(after["satisfied_share"] * replies)
    p = one_sided_p(before_n, after_n, replies)
    print(f"\nshare with a number: {before_n}/{replies} -> {after_n}/{replies}, p = {p:.4f}; "
          f"words {base['mean_words']:.1f} -> {after['mean_words']:.1f}, "
          f"KL {after['kl_per_token']:.3f}; {results['seconds_total']:.0f} s")
    assert after["adapter_version"] > 0
    assert p < 0.05, "the preferred feature did not become significantly more common"
    # no collapse: text, not empty or looping, not shrunk to a stub, close to the base model
    assert after["nonempty_share"] == 1.0
    assert after["repeated_trigrams"] < 0.2
    assert after["mean_words"] > 0.3 * base["mean_words"]
    assert after["kl_per_token"] < Config().kl_tripwire
    # the learning suite's key leaves these files out: a simulated run must not load them
    assert not set(results["sources_loaded"]) & set(NOT_IN_SIMULATION)
    assert {"learner/worker.py", "chatbot/sampling.py"} <= set(results["sources_loaded"])
