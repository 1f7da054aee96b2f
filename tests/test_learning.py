"""Does it learn? A simulated user who prefers shorter replies votes through the real store,
learner and hot-swap on the embedded SmolLM2. Afterwards fresh replies to held-out prompts
must beat the base model's under that preference significantly (one-sided sign test), and
the model must not have collapsed. Marked slow: about four minutes on two CPU cores."""

from __future__ import annotations

import dataclasses

import pytest

from bench.oracles import ORACLES
from bench.simulate import Simulation, load_prompts, split_prompts
from chatbot.config import Config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

VOTES = 24
EVAL_PROMPTS = 24


def test_a_shorter_preference_is_learned_without_collapse(tmp_path):
    config = dataclasses.replace(Config(device="cpu"), data_dir=tmp_path / "data",
                                 max_new_tokens=32, seed=0)
    train, held_out = split_prompts(load_prompts(), EVAL_PROMPTS, seed=0)
    sim = Simulation(config, ORACLES["shorter"], train, held_out, seed=0)
    base, after = sim.run(VOTES, checkpoints=[0, VOTES])
    rounds = [(s["adapter_version"], s["status"], round(s["seconds"], 1))
              for s in sim.round_steps]
    print(f"\nbase: {base}\nafter {VOTES} votes: {after}\nrounds: {rounds}")
    assert after.adapter_version > 0
    assert after.wins > after.losses
    assert after.p_value < 0.05, "the preference was not learned significantly"
    assert after.satisfied_share > base.satisfied_share
    assert after.mean_words < base.mean_words
    # no collapse: replies are still text, not empty or looping, and close to the base model
    assert after.nonempty_share == 1.0
    assert after.repeated_trigrams < 0.2
    assert after.kl_per_token < config.kl_tripwire
    assert after.base_logprob_per_token > base.base_logprob_per_token - 1.0
