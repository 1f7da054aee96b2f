"""One user with a fixed bias casting most of the votes cannot fill a training batch, and
cannot vote faster than the per-user limit."""

from __future__ import annotations

import dataclasses

import pytest
from gradio_client import Client

from chatbot.model import load_model
from chatbot.sampling import PairGenerator
from chatbot.service import ChatService
from chatbot.store import Store
from learner.worker import Learner
from tests.serving import running_server


def test_a_biased_user_gets_a_capped_share_of_every_batch(tiny_config):
    config = dataclasses.replace(tiny_config, judge_new=False, max_batch_votes=8,
                                 max_user_share=0.5, replay=6, max_votes_per_minute=0)
    store = Store(config.db_path)
    loaded = load_model(config)
    service = ChatService(config, store, PairGenerator(loaded, config), model_id=loaded.model_id)

    def vote(user, n, longer):
        for i in range(n):
            turn = service.ask(user, f"{user} {i}", "")
            a, b = (len(r) for r in turn["replies"])
            choice = ("A" if a >= b else "B") if longer else ("A" if a <= b else "B")
            service.vote(user, turn["pair_id"], choice)

    vote("mallory", 24, longer=True)
    vote("alice", 3, longer=False)
    vote("bob", 3, longer=False)
    learner = Learner(config, store, load_model(config, training=True), seed=0)
    original = learner.builder.build
    batches = []

    def spy(claimed):
        data = original(claimed)
        users_new = [v["user_id"] for v in store.votes(ids=claimed["votes"])]
        batches.append((users_new, data))
        return data

    learner.builder.build = spy
    while store.pending_counts()["votes_pending"]:
        learner.round()
    for users_new, _data in batches:
        assert users_new.count("mallory") <= 4  # half of max_batch_votes
    # replay is capped the same way
    pairs_by_id = {}
    for _, data in batches[1:]:
        owners = []
        for sample in data.replay_samples[::2]:
            pair_id = store.db.query("select pair_id from replies where id = ?",
                                     (sample.reply_id,))[0]["pair_id"]
            owners.append(pairs_by_id.setdefault(pair_id, store.pair(None, pair_id)["user_id"]))
        assert owners.count("mallory") <= 3  # half of replay=6
    assert store.pending_counts()["votes_pending"] == 0  # capped, not dropped


def test_the_vote_rate_limit_holds_through_the_api(tiny_model_dir, tmp_path):
    with running_server("--model", str(tiny_model_dir), "--data-dir", str(tmp_path / "d"),
                        "--no-learner", "--max-new-tokens", "4", "--max-votes-per-minute", "5",
                        log_path=tmp_path / "server.log") as (url, _):
        client = Client(url, verbose=False)
        pairs = [client.predict(f"q{i}", "", api_name="/ask")["pair_id"] for i in range(6)]
        for pair_id in pairs[:5]:
            assert client.predict(pair_id, "A", api_name="/vote")["ok"]
        with pytest.raises(Exception, match="too many votes"):
            client.predict(pairs[5], "A", api_name="/vote")
    assert len(Store(tmp_path / "d" / "duet.db").votes()) == 5
