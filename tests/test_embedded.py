"""The real embedded SmolLM2-135M-Instruct: it loads offline, chats, and its paired sampling
records faithful behaviour log-probs, in float32, in bf16 and on 4-bit CPU layers (whose
blocks are the GGUF's own). Marked slow; each model is loaded once per session."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from chatbot import int4
from chatbot.config import Config
from chatbot.model import EMBEDDED_ID, cpu_has_native_bf16, load_model
from chatbot.sampling import PairGenerator

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def embedded():
    return load_model(Config(device="cpu", dtype="float32"))


@pytest.fixture(scope="session")
def embedded_bf16():
    if not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16 (avx512_bf16 / amx_bf16): --dtype auto "
                    "samples in float32 here")
    return load_model(Config(device="cpu", dtype="bfloat16", quantize="none"))


@pytest.fixture(scope="session")
def embedded_int4():
    """What --quantize auto samples with on a CPU with native bf16 (asked for explicitly, so it
    runs on any CPU whose torch has the kernel)."""
    if int4.unavailable():
        pytest.skip(int4.unavailable())
    return load_model(Config(device="cpu", dtype="bfloat16", quantize="int4"))


def test_embedded_model_loads_offline_with_a_chat_template(embedded):
    assert embedded.model_id == EMBEDDED_ID
    assert embedded.tokenizer.chat_template
    assert embedded.model.config.num_hidden_layers == 30  # SmolLM2-135M


def fresh_token_logprobs(loaded, prompt: list[int], reply: list[int]) -> torch.Tensor:
    """Each reply token's log-prob at temperature 1 from one forward pass over prompt + reply."""
    ids = torch.tensor([prompt + reply])
    with torch.no_grad():
        logits = loaded.model(ids).logits[0, len(prompt) - 1:-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(reply)[:, None])[:, 0]


def sample_pair(loaded):
    torch.manual_seed(0)
    config = dataclasses.replace(Config(device="cpu"), max_new_tokens=24)
    pair = PairGenerator(loaded, config).sample(
        [{"role": "user", "content": "What is the capital of France?"}])
    texts = [r.text for r in pair.replies]
    assert all(t.strip() for t in texts)
    assert texts[0] != texts[1]  # two samples, not one reply twice
    return pair


def test_embedded_pair_is_two_fluent_replies_with_faithful_logprobs(embedded):
    pair = sample_pair(embedded)
    for reply in pair.replies:
        fresh = fresh_token_logprobs(embedded, pair.prompt_token_ids, reply.token_ids)
        assert reply.behaviour_logprob == pytest.approx(fresh.sum().item(), abs=1e-4)


def test_bf16_sampling_records_logprobs_within_bf16_rounding(embedded_bf16):
    """In bf16 the cached decode and a fresh pass round differently: per token they agree to
    a few hundredths (measured on an AVX-512 BF16 EPYC: mean 0.002 and 0.038, max 0.14, over
    the two replies)."""
    pair = sample_pair(embedded_bf16)
    for reply in pair.replies:
        fresh = fresh_token_logprobs(embedded_bf16, pair.prompt_token_ids, reply.token_ids)
        gap = (torch.tensor(reply.token_logprobs) - fresh).abs()
        print(f"bf16 log-prob gap per token: mean {gap.mean():.4f}, max {gap.max():.4f}")
        assert gap.mean() < 0.1 and gap.max() < 1.0


def test_the_ggufs_layers_come_back_as_their_own_4bit_blocks(embedded):
    """The GGUF's 210 transformer layers are Q4_1: 4-bit blocks of their float32 weights
    change no weight at all (only the scales and minimums are rounded to bf16, in the kernel's
    form); its output layer (Q8_0, tied to the embedding) stays as it is."""
    if int4.unavailable():
        pytest.skip(int4.unavailable())
    model = copy.deepcopy(embedded.model)
    report = int4.quantize_model(model)
    assert report == {"layers": 210, "unfit": 0, "max_relative_change": 0.0}
    assert type(model.get_output_embeddings()) is not int4.Int4Linear


def test_4bit_sampling_records_logprobs_within_bf16_rounding(embedded_int4, embedded):
    """On 4-bit layers a pair's stored log-probs agree with a fresh pass of the same model to
    within bf16 rounding, and with the float32 model's (the same weights) nearly as well."""
    pair = sample_pair(embedded_int4)
    for reply in pair.replies:
        stored = torch.tensor(reply.token_logprobs)
        for loaded in (embedded_int4, embedded):
            fresh = fresh_token_logprobs(loaded, pair.prompt_token_ids, reply.token_ids)
            gap = (stored - fresh).abs()
            print(f"4-bit log-prob gap per token against {loaded.quantize}/{loaded.dtype}: "
                  f"mean {gap.mean():.4f}, max {gap.max():.4f}")
            assert gap.mean() < 0.1 and gap.max() < 1.0
