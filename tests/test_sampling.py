"""Paired sampling on the tiny model: one batched generate call, faithful behaviour log-probs,
streaming, and the end-of-turn token kept in the reply."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from chatbot.errors import InvalidInput
from chatbot.replies import decode_reply
from chatbot.sampling import PairGenerator
from chatbot.store import Store

MESSAGES = [{"role": "user", "content": "Say something nice."}]


def sequence_logprobs(model, prompt: list[int], reply: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + reply])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(reply)[:, None])[:, 0]


def stored_turn(config, generator, loaded, db_target) -> dict:
    """One turn asked through the service with `generator`: its pair as the store keeps it."""
    from chatbot.service import ChatService

    store = Store(db_target)
    try:
        service = ChatService(config, store, generator, model_id=loaded.model_id)
        turn = service.ask("ann", "Say something nice.")
        return store.pair("ann", turn["pair_id"])
    finally:
        store.close()


@pytest.fixture
def generator(tiny_loaded, tiny_config):
    return PairGenerator(tiny_loaded, dataclasses.replace(tiny_config, max_new_tokens=12))


def record_generate_calls(generator, monkeypatch) -> list[dict]:
    """The keyword arguments of every `generate` call the generator makes from now on."""
    calls = []
    original = generator.model.generate

    def counting_generate(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(generator.model, "generate", counting_generate)
    return calls


def test_both_replies_come_from_one_generate_call(generator, monkeypatch):
    calls = record_generate_calls(generator, monkeypatch)
    pair = generator.sample(MESSAGES)
    assert len(calls) == 1
    assert calls[0]["num_return_sequences"] == 2
    assert calls[0]["input_ids"].shape[0] == 1  # the prompt is encoded once
    assert len(pair.replies) == 2
    assert pair.adapter_version == 0
    assert (pair.temperature, pair.top_p, pair.max_new_tokens) == (0.8, 0.95, 12)


def test_behaviour_logprob_matches_a_fresh_forward_pass(generator, tiny_loaded):
    torch.manual_seed(1)
    pair = generator.sample(MESSAGES)
    for reply in pair.replies:
        fresh = sequence_logprobs(tiny_loaded.model, pair.prompt_token_ids, reply.token_ids)
        assert len(reply.token_logprobs) == len(reply.token_ids) > 0
        assert torch.allclose(torch.tensor(reply.token_logprobs), fresh, atol=1e-4)
        assert reply.behaviour_logprob == pytest.approx(fresh.sum().item(), abs=1e-4)


def test_stream_yields_growing_texts_then_the_result(generator):
    stream = generator.stream(MESSAGES)
    chunks = list(stream)
    assert len(chunks) >= 2
    final = stream.result
    assert final is not None
    assert chunks[-1] == (final.replies[0].text, final.replies[1].text)
    assert final.first_token_seconds is not None and final.first_token_seconds <= final.seconds


def test_a_reply_stops_at_the_end_of_turn_token_and_keeps_it(generator, tiny_loaded):
    eos = tiny_loaded.tokenizer.eos_token_id
    bias = torch.zeros(len(tiny_loaded.tokenizer))
    bias[eos] = 50.0  # make the end-of-turn token all but certain from the first step
    handle = tiny_loaded.model.lm_head.register_forward_hook(lambda m, i, out: out + bias)
    try:
        pair = generator.sample(MESSAGES)
    finally:
        handle.remove()
    for reply in pair.replies:
        assert reply.token_ids == [eos]
        assert reply.finish_reason == "stop"
        assert reply.text == ""


def test_long_history_drops_the_oldest_turns(generator, tiny_loaded):
    config = dataclasses.replace(generator.config, max_prompt_tokens=80)
    gen = PairGenerator(tiny_loaded, config)
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"question {i} " * 5},
                    {"role": "assistant", "content": f"answer {i} " * 5}]
    ids = gen.prompt_ids(history + [{"role": "user", "content": "last one"}])
    text = tiny_loaded.tokenizer.decode(ids)
    assert len(ids) <= 80
    assert "last one" in text and "question 0" not in text
    with pytest.raises(InvalidInput, match="too long"):
        gen.prompt_ids([{"role": "user", "content": "word " * 200}])


def test_abandoned_stream_stops_generation(generator):
    stream = generator.stream(MESSAGES)
    next(iter(stream))
    stream._chunks.close()  # what Gradio does when the browser goes away
    assert stream.cancel.is_set()
    assert stream.result is None


def test_one_reply_and_a_request_limit_that_never_exceeds_the_servers(generator, monkeypatch):
    calls = record_generate_calls(generator, monkeypatch)
    stream = generator.stream(MESSAGES, n=1, max_new_tokens=3)
    chunks = list(stream)
    assert calls[-1]["num_return_sequences"] == 1 and calls[-1]["max_new_tokens"] == 3
    assert all(len(chunk) == 1 for chunk in chunks)
    (reply,) = stream.result.replies
    assert 0 < len(reply.token_ids) <= 3 and stream.result.max_new_tokens == 3
    assert chunks[-1] == (reply.text,)
    big = generator.stream(MESSAGES, max_new_tokens=10_000)
    list(big)
    assert calls[-1]["max_new_tokens"] == 12 and big.result.max_new_tokens == 12
    assert len(big.result.replies) == 2
    hello = generator.tokenizer.encode("Hello world", add_special_tokens=False)
    assert generator.token_texts(hello) == ["Hello", " world"]


def test_a_reply_that_sampled_the_nul_byte_is_stored_on_both_databases(tiny_loaded, db_target):
    """Byte-level vocabularies have a token for the byte 0, which PostgreSQL's text columns
    refuse: such a reply is stored with U+FFFD in its text and the token in its ids."""
    tokenizer = tiny_loaded.tokenizer
    nul = next(i for i in range(len(tokenizer)) if tokenizer.decode([i]) == "\0")
    ids = tokenizer.encode("a", add_special_tokens=False) + [nul]
    text = decode_reply(tokenizer, ids)
    assert text == "a\ufffd"
    reply = {"text": text, "token_ids": ids, "token_logprobs": [-1.0] * len(ids),
             "behaviour_logprob": -2.0, "adapter_version": 0, "finish_reason": "length",
             "n_tokens": len(ids)}
    pair = {"prompt_token_ids": [1, 2], "adapter_version": 0, "temperature": 0.8,
            "top_p": 0.95, "max_new_tokens": 2, "seconds": 0.1, "first_token_seconds": 0.01}
    store = Store(db_target)
    try:
        _, pair_id = store.add_turn("ann", None, "hello", pair, [reply, dict(reply)])
        stored = store.pair("ann", pair_id)
    finally:
        store.close()
    assert [r["token_ids"] for r in stored["replies"]] == [ids, ids]
    assert [r["text"] for r in stored["replies"]] == [text, text]


def test_a_pair_chosen_from_candidates_is_the_two_that_differ_most(tiny_loaded, tiny_config,
                                                                   monkeypatch):
    """--pair-candidates 4: one generate call draws four replies, the stream shows nothing
    until they are done, and the pair is the two whose words differ most, each with its own
    exact log-probs. A single reply (n=1) is sampled as it is; a consumer that leaves while
    the candidates grow stops them."""
    from chatbot.pair_choice import most_different

    config = dataclasses.replace(tiny_config, max_new_tokens=12, pair_candidates=4)
    generator = PairGenerator(tiny_loaded, config)
    calls = record_generate_calls(generator, monkeypatch)
    drafted = []
    original = generator._replies
    monkeypatch.setattr(generator, "_replies",
                        lambda *a: drafted.append(original(*a)) or drafted[-1])
    torch.manual_seed(3)
    stream = generator.stream(MESSAGES)
    chunks = list(stream)
    assert [c["num_return_sequences"] for c in calls] == [4]
    (candidates,) = drafted
    assert len(candidates) == 4
    i, j = most_different([reply.text for reply in candidates])
    pair = stream.result
    drawn_at = dataclasses.replace  # each reply carries the temperature it was drawn at
    assert pair.replies == (drawn_at(candidates[i], temperature=0.8),
                            drawn_at(candidates[j], temperature=0.8))
    assert pair.candidates == 4
    assert chunks[-1] == (candidates[i].text, candidates[j].text)
    assert set(chunks[:-1]) == {("", "")}  # drafting: nothing shown until the choice
    assert pair.first_token_seconds == pair.seconds
    for reply in pair.replies:
        fresh = sequence_logprobs(tiny_loaded.model, pair.prompt_token_ids, reply.token_ids)
        assert torch.allclose(torch.tensor(reply.token_logprobs), fresh, atol=1e-4)

    single = generator.stream(MESSAGES, n=1)
    list(single)
    assert calls[-1]["num_return_sequences"] == 1
    assert len(single.result.replies) == 1 and single.result.candidates is None

    left = generator.stream(MESSAGES)  # a consumer that leaves while the candidates grow
    assert next(iter(left)) == ("", "")
    left._chunks.close()
    assert left.cancel.is_set() and left.result is None


def test_a_pair_chosen_from_candidates_is_stored_with_their_count(tiny_loaded, tiny_config,
                                                                  monkeypatch, db_target):
    from chatbot.pair_choice import most_different

    config = dataclasses.replace(tiny_config, max_new_tokens=6, pair_candidates=3)
    generator = PairGenerator(tiny_loaded, config)
    drafted = []
    original = generator._replies
    monkeypatch.setattr(generator, "_replies",
                        lambda *a: drafted.append(original(*a)) or drafted[-1])
    stored = stored_turn(config, generator, tiny_loaded, db_target)
    assert stored["candidates"] == 3
    i, j = most_different([reply.text for reply in drafted[-1]])
    assert [r["token_ids"] for r in stored["replies"]] == [drafted[-1][i].token_ids,
                                                            drafted[-1][j].token_ids]


def test_an_exploring_pair_draws_one_reply_at_the_other_temperature_and_stores_it(
        tiny_loaded, tiny_config, db_target):
    """--explore-temperature: one reply of each pair, on a random side, is drawn at that
    temperature (here near zero: the same tokens every time, where the other reply's vary),
    and each reply is stored with its own. Log-probs stay the policy's own; a single reply
    (n=1) keeps --temperature."""
    config = dataclasses.replace(tiny_config, max_new_tokens=8, temperature=1.0,
                                 explore_temperature=1e-6, seed=5)
    generator = PairGenerator(tiny_loaded, config)
    torch.manual_seed(0)
    pairs = [generator.sample(MESSAGES) for _ in range(8)]
    sides = [[r.temperature for r in pair.replies].index(1e-6) for pair in pairs]
    assert set(sides) == {0, 1}  # the exploring reply is on either side
    for pair in pairs:
        assert sorted(r.temperature for r in pair.replies) == [1e-6, 1.0]
        assert pair.temperature == 1.0
    greedy = {tuple(p.replies[s].token_ids) for p, s in zip(pairs, sides)}
    sampled = {tuple(p.replies[1 - s].token_ids) for p, s in zip(pairs, sides)}
    assert len(greedy) == 1 and len(sampled) > 1
    pair = pairs[0]
    for reply in pair.replies:
        fresh = sequence_logprobs(tiny_loaded.model, pair.prompt_token_ids, reply.token_ids)
        assert torch.allclose(torch.tensor(reply.token_logprobs), fresh, atol=1e-4)
    single = generator.stream(MESSAGES, n=1)
    list(single)
    assert single.result.replies[0].temperature == 1.0

    stored = stored_turn(config, generator, tiny_loaded, db_target)
    assert sorted(r["temperature"] for r in stored["replies"]) == [1e-6, 1.0]
    assert stored["temperature"] == 1.0


def test_on_a_gpu_streamed_pairs_share_one_long_lived_sampler_thread(generator, monkeypatch):
    """A GPU generator samples every streamed pair in one thread of its own (a thread per pair
    kept host memory there); a pair whose reader leaves early frees it for the next."""
    from concurrent.futures import ThreadPoolExecutor

    assert generator.sampler is None  # on a CPU: a fresh thread per pair
    generator.sampler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pair-sampler")
    threads = []
    original = generator._generate

    def recording(*args, **kwargs):
        threads.append(threading.current_thread())
        return original(*args, **kwargs)

    monkeypatch.setattr(generator, "_generate", recording)
    stream = generator.stream(MESSAGES)
    next(iter(stream))  # the reader leaves after the first step
    stream._chunks.close()
    pairs = [generator.sample(MESSAGES) for _ in range(2)]
    assert all(len(pair.replies) == 2 for pair in pairs)
    assert len(threads) == 3 and len(set(threads)) == 1
    assert threads[0] is not threading.main_thread() and threads[0].name.startswith("pair-sampler")
    generator.close()


def test_on_a_gpu_a_failed_pair_reaches_its_reader_and_the_next_one_waits_its_turn(
        generator, monkeypatch):
    """The sampler thread's failures reach the reader and leave the thread serving; a pair
    asked while the thread is busy waits for it, then is sampled."""
    from concurrent.futures import ThreadPoolExecutor

    generator.sampler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pair-sampler")
    original = generator._generate
    calls = []

    def failing_once(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("the GPU said no")
        return original(*args, **kwargs)

    monkeypatch.setattr(generator, "_generate", failing_once)
    with pytest.raises(RuntimeError, match="the GPU said no"):
        generator.sample(MESSAGES)
    assert len(generator.sample(MESSAGES).replies) == 2
    busy = threading.Event()
    blocker = generator.sampler.submit(busy.wait)  # the thread is busy with another pair
    result = {}
    waiting = threading.Thread(target=lambda: result.update(pair=generator.sample(MESSAGES)))
    waiting.start()
    waiting.join(timeout=0.5)
    assert waiting.is_alive() and len(calls) == 2  # queued behind the busy thread
    busy.set()
    waiting.join(timeout=60)
    blocker.result()
    assert len(result["pair"].replies) == 2 and len(calls) == 3
    generator.close()


def test_work_for_a_request_runs_where_the_generators_sampling_runs(generator):
    """A request thread hands its sampling (the base-vs-live replies) to another thread: a new
    one on a CPU, the GPU's one sampler thread there; an error comes back to the caller."""
    from concurrent.futures import ThreadPoolExecutor

    here = threading.current_thread()
    assert generator.in_sampling_thread(threading.current_thread) is not here
    generator.sampler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pair-sampler")
    first = generator.in_sampling_thread(threading.current_thread)
    assert first is not here and first.name.startswith("pair-sampler")
    assert generator.in_sampling_thread(threading.current_thread) is first

    def failing():
        raise RuntimeError("no replies")

    with pytest.raises(RuntimeError, match="no replies"):
        generator.in_sampling_thread(failing)
    generator.close()
