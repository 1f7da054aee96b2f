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
users and seeds is the learning suite's question (bench/suite.py), not one seed's."""

from __future__ import annotations

import dataclasses

import pytest

from bench.api_user import one_sided_p
from bench.oracles import ORACLES
from bench.simulate import Simulation, load_prompts, split_prompts
from chatbot.config import Config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

EVAL_PROMPTS = 24


def simulation(tmp_path, oracle: str, max_new_tokens: int) -> tuple[Config, Simulation]:
    """The real loop on the embedded model, seed 0, with EVAL_PROMPTS held-out prompts, in
    float32 (as the runs that sized these tests): the same computation on every CPU, where
    --dtype auto would sample in bf16 on some and not on others."""
    config = dataclasses.replace(Config(device="cpu"), data_dir=tmp_path / "data",
                                 max_new_tokens=max_new_tokens, seed=0, dtype="float32")
    train, held_out = split_prompts(load_prompts(), EVAL_PROMPTS, seed=0)
    return config, Simulation(config, ORACLES[oracle], train, held_out, seed=0)


FEATURE_VOTES = 24


def test_a_content_preference_moves_the_held_out_share(tmp_path):
    # 48-token replies, as in the learning suite: with 32-token replies (nearly all cut off)
    # a run of 32 votes made the replies shorter and left the share with a number where it
    # was (17/48 -> 12/48); with 48 tokens this run went 11/48 -> 25/48 at 24 votes, and with
    # length-neutral votes (the default since stop 40) 11/48 -> 26/48, p = 0.0008.
    config, sim = simulation(tmp_path, "numbers", max_new_tokens=48)
    base, after = sim.run(FEATURE_VOTES, checkpoints=[0, FEATURE_VOTES])
    replies = 2 * EVAL_PROMPTS
    before_n = round(base.satisfied_share * replies)
    after_n = round(after.satisfied_share * replies)
    p = one_sided_p(before_n, after_n, replies)
    print(f"\nshare with a number: {before_n}/{replies} -> {after_n}/{replies}, p = {p:.4f}; "
          f"words {base.mean_words:.1f} -> {after.mean_words:.1f}, KL {after.kl_per_token:.3f}")
    assert after.adapter_version > 0
    assert p < 0.05, "the preferred feature did not become significantly more common"
    # no collapse: text, not empty or looping, not shrunk to a stub, close to the base model
    assert after.nonempty_share == 1.0
    assert after.repeated_trigrams < 0.2
    assert after.mean_words > 0.3 * base.mean_words
    assert after.kl_per_token < config.kl_tripwire
