"""Corrections: a person rewrites a reply; the store keeps it as the turn's feedback, the
conversation goes on from it, and the learner trains on it as a demonstration."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from chatbot.errors import Conflict, InvalidInput, NotFound, TooBusy
from chatbot.model import load_model
from chatbot.replies import decode_reply, end_of_turn_id, reply_token_ids
from chatbot.sampling import PairGenerator
from chatbot.service import ChatService
from chatbot.store import Store
from learner.batch import Sample
from learner.data import CORRECTION_IDS
from learner.head_start import sample_key
from learner.scoring import kl_replies
from learner.step_loop import RoundFailed
from learner.worker import Learner
from tests.test_store import add_turn


@pytest.fixture
def store(db_target):
    s = Store(db_target)
    yield s
    s.close()


def last_message(store, conversation_id) -> dict:
    return store.messages(conversation_id)[-1]


# --- the store, on both databases -----------------------------------------------------------

def test_a_correction_on_an_open_pair_answers_the_turn(store):
    conversation_id, pair_id = add_turn(store)
    result = store.record_correction("ann", pair_id, "my better reply", side="B")
    assert result["replaced"] is False
    assert last_message(store, conversation_id)["content"] == "my better reply"
    assert last_message(store, conversation_id)["role"] == "assistant"
    assert store.open_pair(conversation_id) is None  # the conversation can go on
    (row,) = store.corrections()
    assert (row["pair_id"], row["user_id"], row["side"], row["text"]) == (
        pair_id, "ann", "B", "my better reply")
    assert row["used_by_version"] is None and row["token_ids"] is None
    assert store.pending_counts()["corrections_pending"] == 1
    with pytest.raises(Conflict, match="your edit is its feedback"):
        store.record_vote("ann", pair_id, "A")  # the edit was the turn's feedback
    # the conversation goes on from the rewrite
    add_turn(store, conversation_id=conversation_id, message="next")
    assert [m["content"] for m in store.messages(conversation_id)] == [
        "hello", "my better reply", "next"]


def test_a_correction_after_a_vote_replaces_the_reply_the_conversation_went_on_from(store):
    conversation_id, pair_id = add_turn(store)
    store.record_vote("ann", pair_id, "B")
    store.record_correction("ann", pair_id, "edited", side="B")
    assert [m["content"] for m in store.messages(conversation_id)] == ["hello", "edited"]
    assert store.votes()[0]["choice"] == "B"  # kept beside the correction
    assert len(store.corrections()) == 1


def test_a_vote_and_a_correction_in_one_call(store):
    conversation_id, pair_id = add_turn(store)
    result = store.record_correction("ann", pair_id, "edited A", side="A", choice="A")
    assert result["choice"] == "A" and result["vote_id"]
    assert [m["content"] for m in store.messages(conversation_id)] == ["hello", "edited A"]
    with pytest.raises(InvalidInput):
        store.record_correction("ann", add_turn(store)[1], "x", choice="maybe")


def test_a_second_correction_replaces_the_first_until_the_learner_takes_it(store):
    conversation_id, pair_id = add_turn(store)
    store.record_correction("ann", pair_id, "first try")
    again = store.record_correction("ann", pair_id, "second try", side="A")
    assert again["replaced"] is True
    assert [c["text"] for c in store.corrections()] == ["second try"]
    assert last_message(store, conversation_id)["content"] == "second try"
    assert store.claim_feedback("r1", limit=10)["corrections"] == [again["correction_id"]]
    before = snapshot(store)
    with pytest.raises(Conflict, match="already used for learning"):
        store.record_correction("ann", pair_id, "third try")
    assert snapshot(store) == before


def snapshot(store) -> dict:
    return {t: store.db.query(f"select * from {t} order by id")
            for t in ("messages", "votes", "corrections")}


def test_bad_corrections_change_nothing(store):
    conversation_id, pair_id = add_turn(store)
    add_turn(store, user="bob")
    before = snapshot(store)
    with pytest.raises(NotFound):
        store.record_correction("bob", pair_id, "not your pair")
    with pytest.raises(NotFound):
        store.record_correction("ann", "no-such-pair", "text")
    with pytest.raises(InvalidInput):
        store.record_correction("ann", pair_id, "text", side="C")
    assert snapshot(store) == before
    # only the latest reply: once the conversation went on, an earlier one stays
    store.record_vote("ann", pair_id, "A")
    _, second = add_turn(store, conversation_id=conversation_id, message="again")
    store.record_vote("ann", second, "A")
    before = snapshot(store)
    with pytest.raises(Conflict, match="latest reply"):
        store.record_correction("ann", pair_id, "too late")
    assert snapshot(store) == before


def test_a_regenerated_pair_cannot_be_corrected(store):
    conversation_id, old = add_turn(store)
    store.add_regenerated_pair("ann", old, *_pair_and_replies())
    with pytest.raises(Conflict, match="regenerated"):
        store.record_correction("ann", old, "text")


def _pair_and_replies():
    from tests.test_store import PAIR, replies

    return PAIR, replies("third", "fourth")


def test_a_reply_served_alone_can_be_corrected(store):
    from tests.test_store import PAIR, replies

    conversation_id, pair_id = store.add_conversation_turn(
        "ann", [], "hi", PAIR, replies("only", "unused")[:1])
    with pytest.raises(InvalidInput, match="no side B"):
        store.record_correction("ann", pair_id, "better", side="B")
    store.record_correction("ann", pair_id, "better", side="A")
    assert [m["content"] for m in store.messages(conversation_id)] == ["hi", "better"]
    (row,) = store.correction_rows()
    assert (row["text"], row["a_text"], row["b_text"]) == ("better", "only", None)


def test_corrections_are_claimed_used_and_released_like_votes(store):
    _, first = add_turn(store, message="m1")
    _, second = add_turn(store, message="m2")
    store.record_correction("ann", first, "c1")
    store.record_correction("ann", second, "c2")
    claimed = store.claim_feedback("r1", limit=1)
    assert len(claimed["corrections"]) == 1
    assert store.release_claims("r1") == 1
    claimed = store.claim_feedback("r2", limit=10)
    assert len(claimed["corrections"]) == 2
    store.finish_round("r2", {"version": 1, "path": "v1", "parent_version": 0,
                              "base_model": "m", "sha256": "x", "status": "live"},
                       {"adapter_version": 1, "status": "promoted"})
    assert {c["used_by_version"] for c in store.corrections()} == {1}
    assert store.pending_counts()["corrections_pending"] == 0
    assert store.feedback_users() == 1


def test_a_rewritten_reply_is_not_marked_as_cut(store):
    conversation_id, pair_id = add_turn(store)
    store.db.execute("update replies set finish_reason = 'length' where pair_id = ?", (pair_id,))
    store.record_vote("ann", pair_id, "A")
    assert store.reply_endings(conversation_id)  # the model's reply, cut
    store.record_correction("ann", pair_id, "whole now")
    assert store.reply_endings(conversation_id) == {}


# --- the service -----------------------------------------------------------------------------

def test_the_service_checks_the_text_and_the_rate(service):
    turn = service.ask("ann", "hello")
    for bad, message in [("", "empty"), ("   ", "empty"), ("x" * 201, "201 characters"),
                         ("a\x00b", "control characters"), (None, "must be text")]:
        with pytest.raises(InvalidInput, match=message):
            service.correct("ann", turn["pair_id"], bad)
    with pytest.raises(InvalidInput, match="the edited reply is empty"):
        service.correct("ann", turn["pair_id"], "")
    result = service.correct("ann", turn["pair_id"], "  better  ", side="A")
    assert result["ok"] and service.store.corrections()[0]["text"] == "better"
    view = service.conversation("ann", turn["conversation_id"])
    assert view["messages"][-1]["content"] == "better" and view["open_pair"] is None
    assert service.status()["corrections_pending"] == 1
    limited = dataclasses.replace(service.config, max_votes_per_minute=1)
    busy = ChatService(limited, service.store, service.generator, model_id="fake")
    busy.correct("bob", service.ask("bob", "hi")["pair_id"], "one")
    with pytest.raises(TooBusy):
        busy.correct("bob", service.ask("bob", "hi")["pair_id"], "two")


# --- the learner ---------------------------------------------------------------------------

@pytest.fixture
def learner_config(tiny_config):
    return dataclasses.replace(tiny_config, lr=3e-3, steps_per_round=3, judge_new=False,
                               replay=0, kl_tripwire=100.0, learn_every=1)


REWRITE = "Sure! Here is a short and friendly answer."


def ask_and_correct(config, store, prompts, choice=None) -> list[str]:
    torch.manual_seed(0)
    loaded = load_model(config)
    service = ChatService(config, store, PairGenerator(loaded, config), model_id=loaded.model_id)
    pair_ids = []
    for prompt in prompts:
        turn = service.ask("ann", prompt)
        service.correct("ann", turn["pair_id"], REWRITE, side="A", choice=choice)
        pair_ids.append(turn["pair_id"])
    return pair_ids


def rewrite_and_reply_logprobs(learner, store, pair_id) -> tuple[float, list[float]]:
    pair = store.pair(None, pair_id)
    (row,) = [c for c in store.corrections() if c["pair_id"] == pair_id]
    tokens = reply_token_ids(learner.loaded.tokenizer,
                             end_of_turn_id(learner.loaded.model, learner.loaded.tokenizer),
                             row["text"])
    samples = [Sample(-1, pair["prompt_token_ids"], tokens, None)] + [
        Sample(r["id"], pair["prompt_token_ids"], r["token_ids"], r["token_logprobs"])
        for r in pair["replies"]]
    rewrite, *replies = learner.scorer.score(samples)
    return rewrite / len(tokens), replies


def test_the_rewrite_tokens_are_the_inverse_of_decoding(tiny_loaded):
    tokenizer = tiny_loaded.tokenizer
    end = end_of_turn_id(tiny_loaded.model, tokenizer)
    ids = reply_token_ids(tokenizer, end, "Hello there, how are you?")
    assert ids[-1] == end and decode_reply(tokenizer, ids) == "Hello there, how are you?"


def test_a_round_raises_the_rewrite_over_the_samples_and_uses_the_correction(learner_config):
    store = Store(learner_config.db_path)
    (pair_id,) = ask_and_correct(learner_config, store, ["Tell me a joke."])
    learner = Learner(learner_config, store, load_model(learner_config, training=True), seed=0)
    rewrite_before, replies_before = rewrite_and_reply_logprobs(learner, store, pair_id)

    step = learner.round()

    assert step["status"] == "promoted" and step["new_votes"] == 1
    rewrite_after, replies_after = rewrite_and_reply_logprobs(learner, store, pair_id)
    assert rewrite_after > rewrite_before
    assert all(after < before for after, before in zip(replies_after, replies_before))
    (row,) = store.corrections()
    assert row["used_by_version"] == step["adapter_version"] == 1
    assert row["token_ids"] == reply_token_ids(
        learner.loaded.tokenizer, end_of_turn_id(learner.loaded.model, learner.loaded.tokenizer),
        REWRITE)  # encoded under the chat template once, and kept


def test_the_round_item_of_a_correction_and_its_replay(learner_config):
    store = Store(learner_config.db_path)
    first, second = ask_and_correct(learner_config, store, ["Say hi.", "Name a colour."])
    config = dataclasses.replace(learner_config, replay=1)
    learner = Learner(config, store, load_model(config, training=True), seed=0)
    claimed = store.claim_feedback("r1", limit=1)
    data = learner.builder.build(claimed)
    (item,) = data.new_items
    assert [s.advantage for s in item] == [1.0, -0.5, -0.5]  # rewrite, then the two samples
    assert item[0].reply_id == CORRECTION_IDS - claimed["corrections"][0]
    assert item[0].behaviour is None and item[0].reply[-1] == end_of_turn_id(
        learner.loaded.model, learner.loaded.tokenizer)
    assert [p.chosen.reply_id for p in data.pairs] == [item[0].reply_id] * 2  # for DPO
    # the KL check reads the sampled replies only
    assert [s.reply_id for s in kl_replies(data)] == [s.reply_id for s in item[1:]]
    store.release_claims("r1")
    learner.round()  # the first correction: used by v1
    learner.round()  # the second, with the first replayed
    data = learner.builder.build({"votes": [], "ratings": [], "corrections": []})
    (replayed,) = data.replay_items  # the newest earlier correction: its rewrite alone
    assert [(s.reply_id, s.advantage) for s in replayed] == [
        (CORRECTION_IDS - store.corrections()[-1]["id"], 1.0)]


def test_a_replayed_correction_is_compared_with_fresh_replies_of_the_live_weights(
        learner_config):
    store = Store(learner_config.db_path)
    ask_and_correct(learner_config, store, ["Say hi.", "Name a colour."])
    config = dataclasses.replace(learner_config, replay=1)
    learner = Learner(config, store, load_model(config, training=True), seed=0)
    learner.round()  # the corrections: used by v1
    learner.prepare()  # the next round: the newest correction replayed
    head = learner.head_start
    data = learner.builder.draft()
    learner.adapter.sync_to_live()
    learner.objective.add_fresh_replies(data)
    (replayed,) = data.replay_items
    rewrite, *fresh = replayed
    assert rewrite.advantage == 1.0 and [s.advantage for s in fresh] == [-0.5, -0.5]
    (corrected,) = [c for c in store.corrections()
                    if CORRECTION_IDS - c["id"] == rewrite.reply_id]
    prompt = store.pair(None, corrected["pair_id"])["prompt_token_ids"]
    assert all(s.prompt == prompt and s.reply_id < 0 for s in fresh)
    # sampled by the live weights (v1), with their log-probs: a forward pass gives them back
    assert all(s.behaviour is not None and len(s.behaviour) == len(s.reply) for s in fresh)
    scored = learner.scorer.score(fresh)
    assert scored == pytest.approx([sum(s.behaviour) for s in fresh], rel=1e-3, abs=1e-2)
    # the head start summed the same fresh replies' terms: the round can use it
    assert all(head.done[sample_key(s)] == 1 for s in fresh)
    ask_and_correct(learner_config, store, ["Name a fruit."])  # a new one, for a round
    step = learner.round()
    assert step["status"] == "promoted" and step["replayed_votes"] == 1
    assert "fresh_replies" in learner.clock.seconds


def test_dpo_trains_on_a_correction(learner_config):
    store = Store(learner_config.db_path)
    ask_and_correct(learner_config, store, ["Say hi."])
    config = dataclasses.replace(learner_config, objective="dpo")
    step = Learner(config, store, load_model(config, training=True), seed=0).round()
    assert step["status"] == "promoted" and step["loss"] is not None


def test_a_failed_round_loses_no_correction(learner_config, monkeypatch):
    store = Store(learner_config.db_path)
    ask_and_correct(learner_config, store, ["Say hi."])
    learner = Learner(learner_config, store, load_model(learner_config, training=True), seed=0)

    def broken(*args, **kwargs):
        raise RoundFailed("broken on purpose")

    monkeypatch.setattr(learner, "train", broken)
    with pytest.raises(RoundFailed):
        learner.round()
    (row,) = store.corrections()
    assert row["claimed_by"] is None and row["used_by_version"] is None
    assert store.pending_counts()["corrections_pending"] == 1
