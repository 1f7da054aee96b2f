"""The real embedded SmolLM2-135M-Instruct: it loads offline, chats, and its paired sampling
records faithful behaviour log-probs. Marked slow; the model is loaded once per session."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from chatbot.config import Config
from chatbot.model import EMBEDDED_ID, load_model
from chatbot.sampling import PairGenerator

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def embedded():
    return load_model(Config(device="cpu"))


def test_embedded_model_loads_offline_with_a_chat_template(embedded):
    assert embedded.model_id == EMBEDDED_ID
    assert embedded.tokenizer.chat_template
    assert embedded.model.config.num_hidden_layers == 30  # SmolLM2-135M


def test_embedded_pair_is_two_fluent_replies_with_faithful_logprobs(embedded):
    torch.manual_seed(0)
    config = dataclasses.replace(Config(device="cpu"), max_new_tokens=24)
    pair = PairGenerator(embedded, config).sample(
        [{"role": "user", "content": "What is the capital of France?"}])
    texts = [r.text for r in pair.replies]
    assert all(t.strip() for t in texts)
    assert texts[0] != texts[1]  # two samples, not one reply twice
    for reply in pair.replies:
        ids = torch.tensor([pair.prompt_token_ids + reply.token_ids])
        with torch.no_grad():
            logits = embedded.model(ids).logits[0, len(pair.prompt_token_ids) - 1:-1]
        fresh = torch.log_softmax(logits.float(), -1).gather(
            -1, torch.tensor(reply.token_ids)[:, None]).sum().item()
        assert reply.behaviour_logprob == pytest.approx(fresh, abs=1e-4)
