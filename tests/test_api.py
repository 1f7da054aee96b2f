"""The public API through gradio_client against a real server on a free local port."""

from __future__ import annotations

import pytest
from gradio_client import Client

from chatbot.store import Store
from tests.serving import running_server


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
