"""The public API through gradio_client against a real server on a free local port."""

from __future__ import annotations

import pytest
from gradio_client import Client

from chatbot.store import Store
from tests.serving import running_server

pytestmark = pytest.mark.processes  # a real server process


@pytest.fixture(scope="module")
def api(tiny_model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("api-data")
    with running_server("--model", str(tiny_model_dir), "--data-dir", str(data), "--no-learner",
                        "--max-new-tokens", "8", log_path=data / "server.log") as (url, _):
        yield Client(url, verbose=False), data


def test_ask_vote_status_round_trip(api):
    client, data = api
    before = client.predict(api_name="/status")
    asked = client.predict("Hello, who are you?", "", api_name="/ask")
    assert set(asked) >= {"conversation_id", "pair_id", "replies", "adapter_version"}
    assert len(asked["replies"]) == 2 and all(isinstance(r, str) for r in asked["replies"])
    assert asked["adapter_version"] == 0
    voted = client.predict(asked["pair_id"], "A", api_name="/vote")
    assert (voted["pair_id"], voted["choice"], voted["continued_with"]) == (
        asked["pair_id"], "A", "A")
    rated = client.predict(asked["pair_id"], "B", "down", api_name="/rate")
    assert rated["changed"] is True and rated["rating_id"] > 0
    after = client.predict(api_name="/status")
    assert after["votes_total"] == before["votes_total"] + 1
    assert after["votes_pending"] == before["votes_pending"] + 1
    assert after["live_adapter_version"] == 0
    assert after["model"].endswith("tiny-llama0")
    store = Store(data / "duet.db")
    vote = store.votes(pair_id=asked["pair_id"])
    assert [(v["id"], v["choice"]) for v in vote] == [(voted["vote_id"], "A")]
    assert [r["thumb"] for r in store.ratings(pair_id=asked["pair_id"])] == ["down"]
    followup = client.predict("Tell me more.", asked["conversation_id"], api_name="/ask")
    assert followup["conversation_id"] == asked["conversation_id"]


@pytest.mark.parametrize("args,message", [
    (("no-such-pair", "A"), "no pair"),
    (("PAIR", "maybe"), "choice must be one of"),
])
def test_bad_votes_raise_a_clear_error(api, args, message):
    client, _ = api
    if args[0] == "PAIR":
        args = (client.predict("hi", "", api_name="/ask")["pair_id"], args[1])
    with pytest.raises(Exception, match=message):
        client.predict(*args, api_name="/vote")


def test_second_vote_is_refused(api):
    client, _ = api
    pair_id = client.predict("hi", "", api_name="/ask")["pair_id"]
    client.predict(pair_id, "B", api_name="/vote")
    with pytest.raises(Exception, match="already has a vote"):
        client.predict(pair_id, "A", api_name="/vote")


def test_empty_message_is_refused(api):
    client, _ = api
    with pytest.raises(Exception, match="empty"):
        client.predict("   ", "", api_name="/ask")


def test_correct_rewrites_the_reply_alone_or_with_a_vote(api):
    client, data = api
    store = Store(data / "duet.db")
    before = client.predict(api_name="/status")
    asked = client.predict("Say something kind.", "", api_name="/ask")
    result = client.predict(asked["pair_id"], " You are doing great. ", "", "",
                            api_name="/correct")
    assert (result["pair_id"], result["replaced"]) == (asked["pair_id"], False)
    assert "vote_id" not in result and store.votes(pair_id=asked["pair_id"]) == []
    again = client.predict(asked["pair_id"], "You are doing well.", "B", "",
                           api_name="/correct")
    assert again["replaced"] is True and again["correction_id"] == result["correction_id"]
    (row,) = [c for c in store.corrections() if c["pair_id"] == asked["pair_id"]]
    assert (row["text"], row["side"]) == ("You are doing well.", "B")
    assert store.messages(asked["conversation_id"])[-1]["content"] == "You are doing well."
    after = client.predict(api_name="/status")
    assert after["corrections_total"] == before["corrections_total"] + 1
    assert after["corrections_pending"] == before["corrections_pending"] + 1

    voted = client.predict("Name a colour.", "", api_name="/ask")
    both = client.predict(voted["pair_id"], "Blue.", "A", "A", api_name="/correct")
    assert both["choice"] == "A"
    assert [(v["id"], v["choice"]) for v in store.votes(pair_id=voted["pair_id"])] == [
        (both["vote_id"], "A")]


@pytest.mark.parametrize("pair,text,side,choice,message", [
    ("PAIR", "   ", "", "", "the edited reply is empty"),
    ("PAIR", "fine", "C", "", "side must be A or B"),
    ("PAIR", "fine", "", "maybe", "choice must be one of"),
    ("no-such-pair", "fine", "", "", "no pair"),
])
def test_bad_corrections_raise_a_clear_error(api, pair, text, side, choice, message):
    client, data = api
    pair_id = client.predict("hi", "", api_name="/ask")["pair_id"]
    with pytest.raises(Exception, match=message):
        client.predict(pair_id if pair == "PAIR" else pair, text, side, choice,
                       api_name="/correct")
    store = Store(data / "duet.db")
    assert store.pair(None, pair_id)["status"] == "open"
    assert all(c["pair_id"] != pair_id for c in store.corrections())
