"""The OpenAI-compatible API (/v1) driven by the real `openai` client: in-process servers over
the fake generator for the shapes and rules, and one real `python app.py` with the tiny model
and its learner for the whole way from a streamed pair to a vote the learner used."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request

import openai
import pytest

import app
from chatbot.config import Config
from chatbot.service import ChatService
from chatbot.store import Store
from tests.serving import free_port, running_server, wait_for
from ui.app import build_ui
from ui.common import LOCAL_USER
from ui.openai_api import openai_routes

MESSAGES = [{"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": [{"type": "text", "text": "How are you?"}]}]


@contextlib.contextmanager
def serving(service: ChatService, logins: bool = False):
    """The page plus the /v1 routes on a free port, launched the way app.py launches them."""
    demo = build_ui(service)
    demo.queue(default_concurrency_limit=2, max_size=8)
    demo.launch(server_port=free_port(), prevent_thread_lock=True, quiet=True,
                auth=[("alice", "wonderland")] if logins else None,
                app_kwargs={"routes": openai_routes(service, logins=logins)})
    try:
        yield demo.local_url.rstrip("/")
    finally:
        demo.close()


def client_for(url: str, key: str = "anything") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


def raw_post(url: str, body: bytes, key: str = "x") -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def feedback(client: openai.OpenAI, **body) -> dict:
    return client.post("/feedback", body=body, cast_to=object)


@pytest.fixture
def server(service):
    with serving(service) as url:
        yield url


@pytest.fixture
def client(server):
    return client_for(server)


def test_models_lists_the_live_adapter_of_the_base_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["duet"]
    assert models[0].base_model == "fake"
    assert models[0].adapter_version == 0


def test_n2_returns_a_stored_pair_with_its_id(client, store, fake_generator):
    completion = client.chat.completions.create(model="duet", messages=MESSAGES, n=2)
    assert [c.message.content for c in completion.choices] == ["reply A", "reply B"]
    assert [c.index for c in completion.choices] == [0, 1]
    assert completion.adapter_version == 0
    assert completion.usage.prompt_tokens == 3 and completion.usage.completion_tokens == 4
    pair = store.pair(LOCAL_USER, completion.pair_id)
    assert pair["status"] == "open"
    assert [r["text"] for r in pair["replies"]] == ["reply A", "reply B"]
    expected = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "How are you?"}]
    assert fake_generator.prompts[-1] == expected
    assert [{"role": m["role"], "content": m["content"]}
            for m in store.messages(pair["conversation_id"])] == expected


def test_n2_streams_both_replies_and_the_pair_id_at_the_end(client, store):
    stream = client.chat.completions.create(model="duet", messages=MESSAGES, n=2, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    texts = ["", ""]
    for chunk in chunks:
        assert chunk.object == "chat.completion.chunk"
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == ["reply A", "reply B"]
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].pair_id is None and chunks[0].choices[0].delta.role == "assistant"
    finished = [c for c in chunks if any(choice.finish_reason for choice in c.choices)]
    assert len(finished) == 1
    assert sorted((c.index, c.finish_reason) for c in finished[0].choices) == [
        (0, "stop"), (1, "stop")]
    assert finished[0].adapter_version == 0
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].pair_id
    pair = store.pair(LOCAL_USER, finished[0].pair_id)
    assert [r["text"] for r in pair["replies"]] == texts


def test_a_vote_through_feedback_is_stored_once(client, store):
    pair_id = client.chat.completions.create(model="duet", messages=MESSAGES, n=2).pair_id
    voted = feedback(client, pair_id=pair_id, choice="B")
    assert (voted["kind"], voted["choice"], voted["continued_with"]) == ("vote", "B", "B")
    votes = store.votes(pair_id=pair_id)
    assert [(v["id"], v["choice"], v["user_id"]) for v in votes] == [
        (voted["vote_id"], "B", LOCAL_USER)]
    with pytest.raises(openai.ConflictError) as refused:
        feedback(client, pair_id=pair_id, choice="A")
    assert refused.value.body["message"] == "this pair already has a vote"
    assert [v["choice"] for v in store.votes(pair_id=pair_id)] == ["B"]


def test_a_correction_through_feedback_answers_the_turn_and_replaces_itself(client, store):
    pair_id = client.chat.completions.create(model="duet", messages=MESSAGES, n=2).pair_id
    corrected = feedback(client, pair_id=pair_id, correction="  I am well, thank you.  ",
                         side="B")
    assert (corrected["kind"], corrected["pair_id"], corrected["replaced"]) == (
        "correction", pair_id, False)
    assert "vote_id" not in corrected and store.votes() == []
    conversation_id = store.pair(LOCAL_USER, pair_id)["conversation_id"]
    assert store.messages(conversation_id)[-1]["content"] == "I am well, thank you."
    again = feedback(client, pair_id=pair_id, correction="Fine, thanks!")
    assert again["replaced"] is True and again["correction_id"] == corrected["correction_id"]
    assert [(c["text"], c["side"]) for c in store.corrections()] == [("Fine, thanks!", None)]
    assert store.messages(conversation_id)[-1]["content"] == "Fine, thanks!"
    with pytest.raises(openai.ConflictError, match="your edit is its feedback"):
        feedback(client, pair_id=pair_id, choice="A")  # the rewrite was the turn's feedback
    store.claim_feedback("round-1", limit=10)
    with pytest.raises(openai.ConflictError, match="already used for learning"):
        feedback(client, pair_id=pair_id, correction="Third try")
    assert [c["text"] for c in store.corrections()] == ["Fine, thanks!"]


def test_a_correction_with_a_choice_is_a_vote_too(client, store):
    pair_id = client.chat.completions.create(model="duet", messages=MESSAGES, n=2).pair_id
    result = feedback(client, pair_id=pair_id, choice="B", side="B", correction="reply B, better")
    assert (result["kind"], result["choice"]) == ("correction", "B")
    assert [(v["id"], v["choice"]) for v in store.votes(pair_id=pair_id)] == [
        (result["vote_id"], "B")]
    assert [(c["id"], c["side"], c["text"]) for c in store.corrections()] == [
        (result["correction_id"], "B", "reply B, better")]
    conversation_id = store.pair(LOCAL_USER, pair_id)["conversation_id"]
    assert store.messages(conversation_id)[-1]["content"] == "reply B, better"


def test_n1_is_one_stored_reply_that_takes_a_thumb_but_not_a_vote(client, store):
    completion = client.chat.completions.create(model="duet", messages=MESSAGES)
    assert [c.message.content for c in completion.choices] == ["reply A"]
    pair = store.pair(LOCAL_USER, completion.pair_id)
    assert pair["status"] == "single" and [r["side"] for r in pair["replies"]] == ["A"]
    assert store.messages(pair["conversation_id"])[-1]["content"] == "reply A"
    rated = feedback(client, pair_id=completion.pair_id, side="A", thumb="up")
    assert rated["kind"] == "rating" and rated["changed"] is True
    assert [r["thumb"] for r in store.ratings(pair_id=completion.pair_id)] == ["up"]
    with pytest.raises(openai.ConflictError, match="served alone"):
        feedback(client, pair_id=completion.pair_id, choice="A")
    with pytest.raises(openai.BadRequestError, match="no side B"):
        feedback(client, pair_id=completion.pair_id, side="B", thumb="down")
    assert store.votes(pair_id=completion.pair_id) == []


def test_logprobs_per_token_when_asked(client):
    plain = client.chat.completions.create(model="duet", messages=MESSAGES)
    assert plain.choices[0].logprobs is None
    asked = client.chat.completions.create(model="duet", messages=MESSAGES, n=2, logprobs=True)
    for i, choice in enumerate(asked.choices):  # the end-of-turn token is left out
        assert [(t.token, t.logprob) for t in choice.logprobs.content] == [(f"<{10 + i}>", -1.0)]
        assert choice.logprobs.content[0].bytes == list(f"<{10 + i}>".encode())
    streamed = list(client.chat.completions.create(model="duet", messages=MESSAGES,
                                                   logprobs=True, stream=True))
    last = [c for c in streamed if c.choices and c.choices[0].finish_reason][0]
    assert [t.token for t in last.choices[0].logprobs.content] == ["<10>"]


def test_max_tokens_reaches_the_generator(client, fake_generator):
    client.chat.completions.create(model="duet", messages=MESSAGES, max_tokens=5)
    client.chat.completions.create(model="duet", messages=MESSAGES, max_completion_tokens=3)
    assert fake_generator.max_new_tokens[-2:] == [5, 3]


@pytest.mark.parametrize("body,status,words", [
    ({"n": 3}, 400, "n must be 1"),
    ({"messages": []}, 400, "non-empty"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "last message"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, 400, "role must be one of"),
    ({"messages": [{"role": "user", "content": "  "}]}, 400, "empty"),
    ({"max_tokens": 0}, 400, "at least 1"),
    ({"messages": "hello"}, 400, "messages"),
])
def test_bad_completion_requests_get_openai_errors(server, client, store, body, status, words):
    before = store.pending_counts()
    request = {"model": "duet", "messages": MESSAGES, **body}
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as error:
            client.chat.completions.create(**request, stream=stream)
        assert error.value.status_code == status
        assert words in error.value.body["message"]
        assert set(error.value.body) == {"message", "type", "param", "code"}
    assert raw_post(f"{server}/v1/chat/completions", json.dumps(request).encode())[0] == status
    assert store.conversations(LOCAL_USER) == [] and store.pending_counts() == before


@pytest.mark.parametrize("body,error,words", [
    ({"pair_id": "no-such-pair", "choice": "A"}, openai.NotFoundError, "no pair"),
    ({"pair_id": "PAIR", "choice": "maybe"}, openai.BadRequestError, "choice must be one of"),
    ({"pair_id": "PAIR", "choice": "A", "side": "A", "thumb": "up"}, openai.BadRequestError,
     "either choice"),
    ({"pair_id": "PAIR"}, openai.BadRequestError, "either choice"),
    ({"choice": "A"}, openai.BadRequestError, "pair_id"),
    ({"pair_id": "PAIR", "correction": "   "}, openai.BadRequestError, "edited reply is empty"),
    ({"pair_id": "PAIR", "correction": 7}, openai.BadRequestError, "correction"),
    ({"pair_id": "PAIR", "correction": "x", "side": "A", "thumb": "up"}, openai.BadRequestError,
     "cannot come with a thumb"),
    ({"pair_id": "PAIR", "correction": "x", "side": "C"}, openai.BadRequestError,
     "side must be A or B"),
    ({"pair_id": "PAIR", "correction": "x", "choice": "maybe"}, openai.BadRequestError,
     "choice must be one of"),
    ({"pair_id": "no-such-pair", "correction": "x"}, openai.NotFoundError, "no pair"),
])
def test_bad_feedback_gets_openai_errors(client, store, body, error, words):
    if body.get("pair_id") == "PAIR":
        body["pair_id"] = client.chat.completions.create(model="duet", messages=MESSAGES,
                                                         n=2).pair_id
    with pytest.raises(error, match=words) as raised:
        feedback(client, **body)
    assert raised.value.body["type"] == "invalid_request_error"
    assert store.votes() == [] and store.ratings() == [] and store.corrections() == []
    if body.get("pair_id", "no-such-pair") != "no-such-pair":
        assert store.pair(LOCAL_USER, body["pair_id"])["status"] == "open"


def test_invalid_json_is_a_400_in_openai_shape(server):
    status, body = raw_post(f"{server}/v1/feedback", b"{not json")
    assert status == 400
    assert body == {"error": {"message": "the body is not valid JSON",
                              "type": "invalid_request_error", "param": None, "code": None}}


def test_feedback_over_the_rate_limit_is_429(store, fake_generator, tmp_path):
    config = Config(data_dir=tmp_path, max_votes_per_minute=1)
    service = ChatService(config, store, fake_generator, model_id="fake")
    with serving(service) as url:
        client = client_for(url)
        pair_id = client.chat.completions.create(model="duet", messages=MESSAGES, n=2).pair_id
        feedback(client, pair_id=pair_id, side="A", thumb="up")
        with pytest.raises(openai.RateLimitError, match="too many votes"):
            feedback(client, pair_id=pair_id, choice="A")
        with pytest.raises(openai.RateLimitError, match="too many votes"):
            feedback(client, pair_id=pair_id, correction="better")  # the same limit
    assert store.votes() == [] and store.corrections() == []


def test_a_client_that_leaves_a_stream_frees_its_generation_slot(store, fake_generator,
                                                                 tmp_path):
    config = Config(data_dir=tmp_path, concurrency=1, queue_size=1)
    service = ChatService(config, store, fake_generator, model_id="fake")
    with serving(service) as url:
        client = client_for(url)
        fake_generator.block.clear()  # the reply stops half-way until set
        left = client.chat.completions.create(model="duet", messages=MESSAGES, n=2,
                                              stream=True)
        chunks = iter(left)
        assert next(chunks).choices[0].delta.role == "assistant"
        assert next(chunks).choices[0].delta.content == "rep"
        left.close()
        fake_generator.block.set()
        started = time.monotonic()
        after = client_for(url).with_options(timeout=20).chat.completions.create(
            model="duet", messages=MESSAGES)  # waits for the only slot, then gets it
        assert after.choices[0].message.content == "reply A"
        assert time.monotonic() - started < 15


def test_with_logins_a_key_from_the_keys_command_is_the_identity(store, fake_generator,
                                                                  tmp_path, capsys):
    config = Config(data_dir=tmp_path)
    assert config.db_path == store.path
    service = ChatService(config, store, fake_generator, model_id="fake")
    assert app.main(["--data-dir", str(tmp_path), "keys", "add", "alice"]) == 0
    alice = capsys.readouterr().out.split()[-1]
    assert app.main(["--data-dir", str(tmp_path), "keys", "add", "bob"]) == 0
    bob = capsys.readouterr().out.split()[-1]
    assert alice.startswith("duet-") and alice != bob
    assert alice not in store.path.read_bytes().decode("latin-1")  # only a hash is stored
    with serving(service, logins=True) as url:
        for key in ("anything", alice[:-1] + "?"):
            with pytest.raises(openai.AuthenticationError) as refused:
                client_for(url, key).models.list()
            assert refused.value.body["code"] == "invalid_api_key"
        status, body = raw_post(f"{url}/v1/chat/completions",
                                json.dumps({"messages": MESSAGES}).encode(), key="")
        assert status == 401 and set(body["error"]) == {"message", "type", "param", "code"}
        assert urllib.request.urlopen(f"{url}/", timeout=10).status == 200  # the login page
        with pytest.raises(urllib.error.HTTPError) as page:
            urllib.request.urlopen(f"{url}/config", timeout=10)  # Gradio's own login still on
        assert page.value.code in (401, 403)
        completion = client_for(url, alice).chat.completions.create(
            model="duet", messages=MESSAGES, n=2, user="bob")  # the body's user is ignored
        assert store.pair("alice", completion.pair_id)["user_id"] == "alice"
        with pytest.raises(openai.NotFoundError):
            feedback(client_for(url, bob), pair_id=completion.pair_id, choice="A")
        with pytest.raises(openai.NotFoundError, match="no pair"):  # as if there were none
            feedback(client_for(url, bob), pair_id=completion.pair_id, correction="mine now")
        assert store.corrections() == [] and store.pair("alice", completion.pair_id)[
            "status"] == "open"
        feedback(client_for(url, alice), pair_id=completion.pair_id, choice="A")
        assert [v["user_id"] for v in store.votes()] == ["alice"]
    assert app.main(["--data-dir", str(tmp_path), "keys", "remove", "alice"]) == 0
    assert store.api_keys()[0]["user_id"] == "bob" and len(store.api_keys()) == 1


@pytest.mark.processes
def test_real_server_pair_to_vote_to_learner(tiny_model_dir, tmp_path):
    """`python app.py` with the tiny model and its learner: the vote and the rating sent
    through /v1 are used by the adapters the learner publishes."""
    data = tmp_path / "data"
    with running_server("--model", str(tiny_model_dir), "--data-dir", str(data),
                        "--max-new-tokens", "6", "--learn-every", "1",
                        log_path=tmp_path / "server.log") as (url, _):
        client = client_for(url.rstrip("/"), "local-any-token")
        assert client.models.list().data[0].adapter_version == 0
        chunks = list(client.chat.completions.create(
            model="duet", messages=[{"role": "user", "content": "Hello!"}], n=2, stream=True))
        texts = ["", ""]
        for chunk in chunks:
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
        pair_id = chunks[-1].pair_id
        store = Store(data / "duet.db")
        pair = store.pair(LOCAL_USER, pair_id)
        assert [r["text"] for r in pair["replies"]] == texts
        assert pair["max_new_tokens"] == 6
        single = client.chat.completions.create(
            model="duet", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert store.pair(LOCAL_USER, single.pair_id)["replies"][0]["n_tokens"] <= 2
        vote_id = feedback(client, pair_id=pair_id, choice="A")["vote_id"]
        rating_id = feedback(client, pair_id=single.pair_id, side="A", thumb="down")["rating_id"]
        deadline = time.monotonic() + 240
        while (used := store.votes(ids=[vote_id])[0]["used_by_version"]) is None or \
                store.ratings(ids=[rating_id])[0]["used_by_version"] is None:
            assert time.monotonic() < deadline, "the learner never used the vote and rating"
            time.sleep(0.2)
        assert used >= 1 and store.adapter(used) is not None
        wait_for(lambda: client.models.list().data[0].adapter_version
                 == store.live_adapter_version(), 30, every=0.2)
