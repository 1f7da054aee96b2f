"""ChatService with a fake generator: input checks, turn flow, regenerate, status."""

from __future__ import annotations

import pytest

from chatbot.errors import Conflict, InvalidInput, NotFound
from chatbot.service import clean_message


@pytest.mark.parametrize("message,problem", [
    ("", "empty"), ("   \n\t ", "empty"), ("x" * 201, "201 characters"),
    ("nul\x00byte", "control characters"), ("bad \ud800 surrogate", "invalid Unicode"),
    (None, "must be text"),
])
def test_bad_messages_are_refused_with_a_reason(message, problem):
    with pytest.raises(InvalidInput, match=problem):
        clean_message(message, max_chars=200)


def test_clean_message_keeps_newlines_and_strips_ends():
    assert clean_message("  line one\nline two\t \n", 200) == "line one\nline two"


def test_ask_returns_the_api_shape_and_stores_the_pair(service, store):
    result = service.ask("ann", "Hello there", "")
    assert set(result) == {"conversation_id", "pair_id", "replies", "adapter_version"}
    assert result["replies"] == ["reply A", "reply B"]
    assert result["adapter_version"] == 0
    assert store.pair("ann", result["pair_id"])["status"] == "open"


def test_stream_grows_and_ends_with_the_stored_pair(service):
    updates = list(service.ask_stream("ann", "Hi", ""))
    assert [u["done"] for u in updates] == [False, False, True]
    assert updates[0]["replies"] == ["rep", "rep"]
    assert updates[-1]["pair_id"]


def test_a_conversation_goes_on_from_the_chosen_reply(service, fake_generator):
    first = service.ask("ann", "Hi", "")
    service.vote("ann", first["pair_id"], "B")
    second = service.ask("ann", "And then?", first["conversation_id"])
    assert second["conversation_id"] == first["conversation_id"]
    assert fake_generator.prompts[-1] == [{"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": "reply B"},
                                          {"role": "user", "content": "And then?"}]


def test_asking_again_before_voting_is_refused(service, store):
    first = service.ask("ann", "Hi", "")
    with pytest.raises(Conflict):
        service.ask("ann", "again", first["conversation_id"])
    assert len(store.messages(first["conversation_id"])) == 1


def test_turn_limit(service):
    conversation_id = ""
    for i in range(3):
        result = service.ask("ann", f"turn {i}", conversation_id)
        conversation_id = result["conversation_id"]
        service.vote("ann", result["pair_id"], "A")
    with pytest.raises(Conflict, match="3 turns"):
        service.ask("ann", "one more", conversation_id)


def test_another_users_conversation_cannot_be_continued(service):
    first = service.ask("ann", "Hi", "")
    service.vote("ann", first["pair_id"], "A")
    with pytest.raises(NotFound):
        service.ask("bob", "let me in", first["conversation_id"])
    with pytest.raises(NotFound):
        service.rate("bob", first["pair_id"], "A", "up")


def test_regenerate_replaces_the_open_pair(service, store, fake_generator):
    first = service.ask("ann", "Hi", "")
    fake_generator.replies = ("again A", "again B")
    final = list(service.regenerate_stream("ann", first["pair_id"]))[-1]
    assert final["replies"] == ["again A", "again B"]
    assert fake_generator.prompts[-1] == [{"role": "user", "content": "Hi"}]
    assert store.pair("ann", first["pair_id"])["status"] == "discarded"
    service.vote("ann", final["pair_id"], "A")
    with pytest.raises(Conflict):
        list(service.regenerate_stream("ann", final["pair_id"]))


def test_status_counts_votes(service):
    result = service.ask("ann", "Hi", "")
    before = service.status()
    service.vote("ann", result["pair_id"], "tie")
    after = service.status()
    assert before["votes_total"] == 0 and after["votes_total"] == 1
    assert after["votes_pending"] == 1
    assert after["live_adapter_version"] == 0
    assert after["model"] == "fake"


def test_the_rollback_box_reads_a_version_or_nothing():
    from ui.dashboard import rollback_target

    assert rollback_target("") is None and rollback_target(None) is None
    assert rollback_target(" 3 ") == 3 and rollback_target("v2") == 2
    assert rollback_target("0") == 0
    for bad in ("-1", "two", "1.5"):
        with pytest.raises(InvalidInput, match="not a version number"):
            rollback_target(bad)


def test_running_agreement_weights_rounds_by_their_judged_pairs():
    from ui.dashboard import running_agreement, status_markdown

    assert running_agreement([]) is None
    assert running_agreement([{"judged_pairs": 0, "live_heldout_acc": None}]) is None
    steps = [{"judged_pairs": 30, "live_heldout_acc": 0.0},  # oldest: falls out of the window
             {"judged_pairs": 4, "live_heldout_acc": 0.5},
             {"judged_pairs": 28, "live_heldout_acc": 1.0}]
    assert running_agreement(steps, window=32) == ((0.5 * 4 + 28) / 32, 32)
    text = status_markdown({"live_adapter_version": 2, "votes_total": 62, "votes_pending": 0,
                            "model": "m", "steps": steps})
    assert "94% of the last 32 voted pairs" in text


def test_the_learning_tab_counts_corrections_beside_votes(service):
    from ui.dashboard import status_markdown

    turn = service.ask("ann", "Hi", "")
    service.correct("ann", turn["pair_id"], "Hello there!", side="A", choice="A")
    service.correct("ann", service.ask("ann", "Bye", "")["pair_id"], "Goodbye!")
    status = service.status()
    assert (status["votes_total"], status["corrections_total"],
            status["corrections_pending"]) == (1, 2, 2)
    text = status_markdown({**status, "steps": []})
    assert "**Votes:** 1 total, 1 waiting for the learner" in text
    assert "**corrections:** 2 total, 2 waiting" in text


def test_compare_with_base_prefers_the_turns_the_user_rewrote(service, fake_generator, store):
    from ui.dashboard import compare_heading

    first = service.ask("ann", "plain question", "")
    service.vote("ann", first["pair_id"], "A")
    turn = service.ask("ann", "Name a colour", "")
    service.vote("ann", turn["pair_id"], "A")
    turn = service.ask("ann", "Another one", turn["conversation_id"])
    service.correct("ann", turn["pair_id"], "Green.", side="B")
    service.ask("ann", "newest question", "")  # newer than the rewrite: still comes after it
    store.finish_round("round-1", {"version": 1, "path": "v1", "parent_version": 0,
                                   "base_model": "fake", "sha256": "x", "status": "live"},
                       {"status": "live"})
    fake_generator.adapter_version = 1
    rows = service.compare_with_base("ann", prompts=3)["rows"]
    assert [(r["prompt"], r["earlier_messages"], r["correction"], r["live"]) for r in rows] == [
        ("Another one", 2, "Green.", "v1 on Another one"),
        ("newest question", 0, None, "v1 on newest question"),
        ("Name a colour", 0, None, "v1 on Name a colour")]
    # the rewritten turn is asked with its conversation, as the adapter learnt it
    (conversations, _, _), _ = fake_generator.batches[-2:]
    assert conversations[0] == [{"role": "user", "content": "Name a colour"},
                                {"role": "assistant", "content": "reply A"},
                                {"role": "user", "content": "Another one"}]
    heading = compare_heading(rows[0])
    assert "after 2 earlier messages" in heading and "**Your rewrite of the reply:** Green." \
        in heading
    assert compare_heading(rows[1]) == "**You asked:** newest question"
    # a rewritten first message is asked once, with its rewrite
    service.correct("ann", first["pair_id"], "A plain answer.")
    rows = service.compare_with_base("ann", prompts=3)["rows"]
    assert [(r["prompt"], r["correction"]) for r in rows] == [
        ("plain question", "A plain answer."), ("Another one", "Green."),
        ("newest question", None)]


def test_a_cut_reply_says_so_and_can_be_continued_after_the_vote(service, fake_generator):
    from chatbot.service import CONTINUE_MESSAGE

    fake_generator.finish_reason = "length"
    first = list(service.ask_stream("ann", "Tell me a long story", ""))[-1]
    assert first["cut_at"] == [8, 8]
    conversation_id = first["conversation_id"]
    view = service.conversation("ann", conversation_id)
    assert view["open_pair"]["cut_at"] == [8, 8] and view["can_continue"] is False
    with pytest.raises(Conflict, match="nothing to continue"):  # vote first
        next(service.continue_stream("ann", conversation_id))
    service.vote("ann", first["pair_id"], "B")
    view = service.conversation("ann", conversation_id)
    assert [m["cut_at"] for m in view["messages"]] == [None, 8] and view["can_continue"]
    with pytest.raises(NotFound):
        next(service.continue_stream("bob", conversation_id))
    fake_generator.finish_reason = "stop"
    done = list(service.continue_stream("ann", conversation_id))[-1]
    assert done["cut_at"] == [None, None]
    assert fake_generator.prompts[-1] == [
        {"role": "user", "content": "Tell me a long story"},
        {"role": "assistant", "content": "reply B"},
        {"role": "user", "content": CONTINUE_MESSAGE}]
    service.vote("ann", done["pair_id"], "A")
    view = service.conversation("ann", conversation_id)
    assert view["can_continue"] is False  # the continuation ended on its own
    with pytest.raises(Conflict, match="nothing to continue"):
        next(service.continue_stream("ann", conversation_id))


def test_compare_with_base_samples_the_users_prompts_both_ways(service, fake_generator, store):
    for prompt in ("first question", "second question"):
        turn = service.ask("ann", prompt, "")
        service.vote("ann", turn["pair_id"], "A")
    service.ask("bob", "bob's question", "")
    assert service.compare_with_base("ann") == {"live_adapter_version": 0, "rows": []}
    assert fake_generator.batches == []  # the base model is live: nothing to generate
    store.finish_round("round-1", {"version": 1, "path": "v1", "parent_version": 0,
                                   "base_model": "fake", "sha256": "x", "status": "live"},
                       {"status": "live"})
    fake_generator.adapter_version = 1
    result = service.compare_with_base("ann", prompts=3)
    assert result["live_adapter_version"] == 1
    assert result["rows"] == [
        {"prompt": "second question", "earlier_messages": 0, "correction": None,
         "base": "v0 on second question", "live": "v1 on second question",
         "base_cut_at": None, "live_cut_at": None},
        {"prompt": "first question", "earlier_messages": 0, "correction": None,
         "base": "v0 on first question", "live": "v1 on first question",
         "base_cut_at": None, "live_cut_at": None}]
    assert sorted((n, base) for _, n, base in fake_generator.batches) == [(1, False), (1, True)]
    assert service.compare_with_base("carol")["rows"] == []
    fake_generator.finish_reason = "length"
    assert {(r["base_cut_at"], r["live_cut_at"]) for r in service.compare_with_base("ann")[
        "rows"]} == {(8, 8)}


def test_the_conversation_names_the_pair_of_its_last_reply(service):
    first = service.ask("ann", "Hi", "")
    view = service.conversation("ann", first["conversation_id"])
    assert view["last_pair_id"] is None  # the last message is the user's: a pair waits
    service.vote("ann", first["pair_id"], "B")
    view = service.conversation("ann", first["conversation_id"])
    assert view["last_pair_id"] == first["pair_id"]
    second = service.ask("ann", "And then?", first["conversation_id"])
    assert service.conversation("ann", first["conversation_id"])["last_pair_id"] is None
    service.correct("ann", second["pair_id"], "my own answer", side="A")
    view = service.conversation("ann", first["conversation_id"])
    assert view["last_pair_id"] == second["pair_id"]
    assert view["messages"][-1]["content"] == "my own answer"
