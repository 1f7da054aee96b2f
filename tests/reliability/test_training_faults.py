"""Training faults are contained: non-finite steps change nothing, several in a row publish
nothing, and a learning rate 100 times too high trips the KL wire on the real model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from chatbot.config import Config
from chatbot.model import load_model
from chatbot.sampling import PairGenerator
from chatbot.service import ChatService
from chatbot.store import Store
from learner.step_loop import RoundFailed
from learner.steps import Step
from learner.worker import Learner


def voted_store(config, n, choices=("A", "B")):
    store = Store(config.db_path)
    loaded = load_model(config)
    service = ChatService(config, store, PairGenerator(loaded, config), model_id=loaded.model_id)
    prompts = ["What is rain?", "Name a fruit.", "Say hello.", "Why is the sky blue?"]
    torch.manual_seed(0)
    for i in range(n):
        turn = service.ask("ann", prompts[i % len(prompts)], "")
        service.vote("ann", turn["pair_id"], choices[i % len(choices)])
    return store


@pytest.mark.parametrize("fault", ["nan_loss", "inf_grad"])
def test_a_non_finite_step_is_skipped_without_any_change(tiny_config, fault):
    config = dataclasses.replace(tiny_config, judge_new=False, steps_per_round=3)
    store = voted_store(config, 2)
    learner = Learner(config, store, load_model(config, training=True), max_bad_steps=10)
    params = [p for p in learner.model.parameters() if p.requires_grad]
    weights_before = [p.detach().clone() for p in params]
    calls = {"n": 0}
    original = learner.objective.accumulate

    def faulty(samples, anchors, **kwargs):
        calls["n"] += 1
        step = original(samples, anchors, **kwargs)
        if calls["n"] == 1:  # only the first step goes wrong
            if fault == "nan_loss":
                return dataclasses.replace(step, loss=float("nan"))
            params[0].grad.fill_(float("inf"))
        return step

    learner.objective.accumulate = faulty
    step = learner.round()
    assert step["skipped_steps"] == 1
    # The live margins came from the retaken first step, still at the live weights (the base
    # model, which ties every pair).
    assert step["live_heldout_acc"] == 0.5
    state = learner.adapter.optimizer.state[params[0]]
    assert int(state["step"]) == 2  # the optimizer saw the two good steps, not the bad one
    assert any(not torch.equal(p, w) for p, w in zip(params, weights_before))
    assert all(torch.isfinite(p).all() for p in params)


def test_non_finite_steps_in_a_row_publish_nothing(tiny_config):
    config = dataclasses.replace(tiny_config, judge_new=False, steps_per_round=4)
    store = voted_store(config, 2)
    learner = Learner(config, store, load_model(config, training=True), max_bad_steps=3)
    learner.objective.accumulate = lambda samples, anchors, **kwargs: Step(float("nan"), 0.0)
    with pytest.raises(RoundFailed):
        learner.round()
    assert store.adapters() == []
    assert store.pending_counts()["votes_pending"] == 2


@pytest.mark.slow
def test_a_learning_rate_100x_too_high_trips_the_wire(tmp_path):
    config = Config(data_dir=tmp_path / "data", device="cpu", max_new_tokens=24, judge_new=False)
    config = dataclasses.replace(config, lr=config.lr * 100)
    store = voted_store(config, 4)
    step = Learner(config, store, load_model(config, training=True), seed=0).round()
    assert step["status"] == "rejected"
    assert "tripwire" in step["note"]
    assert store.live_adapter_version() == 0
