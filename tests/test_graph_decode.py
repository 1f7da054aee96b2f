"""The static-cache decode loop of chatbot/graph_decode.py, run eagerly on the tiny model on a
CPU (its CUDA graphs are tested in tests/test_cuda.py): the same draws as `generate` under the
same seed, stops, cancelling, stored log-probs, and the model state a graph is keyed on."""

from __future__ import annotations

import copy
import dataclasses
import threading

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from chatbot.graph_decode import (
    StaticDecoder,
    for_generator,
    model_state,
    unsupported_generation_settings,
)
from chatbot.sampling import PairGenerator
from tests.test_hotswap import publish_random_adapter, wired
from tests.test_sampling import MESSAGES, sequence_logprobs


def decoder_for(loaded, max_len: int = 96) -> StaticDecoder:
    return StaticDecoder(loaded.model, loaded.device, max_len, capture=False)


def prompt_of(loaded) -> list[int]:
    return list(loaded.tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False))


def generated(loaded, prompt: list[int], n: int, tokens: int, temperature: float,
              top_p: float, seed: int):
    """transformers' own `generate` with its own warpers, forced to `tokens` new tokens."""
    ids = torch.tensor([prompt])
    torch.manual_seed(seed)
    with torch.inference_mode():
        return loaded.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
            temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=tokens,
            min_new_tokens=tokens, num_return_sequences=n, output_logits=True,
            return_dict_in_generate=True, pad_token_id=loaded.tokenizer.pad_token_id)


def test_the_static_loop_draws_what_generate_draws(tiny_loaded):
    """Same seed, same prompt, same settings: the same tokens, and the same raw logits."""
    prompt = prompt_of(tiny_loaded)
    expected = generated(tiny_loaded, prompt, 2, 10, temperature=0.8, top_p=0.95, seed=3)
    torch.manual_seed(3)
    decoded = decoder_for(tiny_loaded).decode(prompt, 2, 10, temperature=0.8, top_p=0.95,
                                              stop_ids=set(), pad_id=0)
    assert torch.equal(decoded.sequences, expected.sequences)
    assert torch.allclose(torch.stack(decoded.logits, 1), torch.stack(expected.logits, 1),
                          atol=1e-4)


def test_rows_stop_at_their_stop_token_and_are_padded_after_it(tiny_loaded):
    prompt = prompt_of(tiny_loaded)
    decoder = decoder_for(tiny_loaded)
    torch.manual_seed(5)
    free = decoder.decode(prompt, 2, 12, temperature=1.0, top_p=1.0, stop_ids=set(), pad_id=0)
    rows = free.sequences[:, len(prompt):].tolist()
    stop = rows[0][2]  # row 0 ends at its third token, row 1 wherever it meets that token
    steps = []
    torch.manual_seed(5)
    cut = decoder.decode(prompt, 2, 12, temperature=1.0, top_p=1.0, stop_ids={stop},
                         pad_id=0, on_step=steps.append)
    new = cut.sequences[:, len(prompt):].tolist()
    ends = [row.index(stop) + 1 if stop in row else len(row) for row in rows]
    assert len(new[0]) == len(steps) == len(cut.logits) == max(ends)
    for row, full, end in zip(new, rows, ends):
        assert row[:end] == full[:end] and set(row[end:]) <= {0}
    assert [list(step) for step in zip(*new)] == steps


def test_cancel_and_the_limit_end_the_decode(tiny_loaded):
    prompt = prompt_of(tiny_loaded)
    decoder = decoder_for(tiny_loaded)
    cancel = threading.Event()
    cancel.set()
    decoded = decoder.decode(prompt, 2, 12, temperature=1.0, top_p=1.0, stop_ids=set(),
                             pad_id=0, cancel=cancel)
    assert decoded.sequences.shape == (2, len(prompt) + 1)
    # a static cache of the prompt + 3 takes 4 new tokens: the last is sampled, never cached
    short = decoder_for(tiny_loaded, max_len=len(prompt) + 3)
    decoded = short.decode(prompt, 1, 12, temperature=1.0, top_p=1.0, stop_ids=set(), pad_id=0)
    assert decoded.sequences.shape == (1, len(prompt) + 4)
    with pytest.raises(ValueError, match="does not fit"):
        decoder_for(tiny_loaded, max_len=len(prompt) - 1).decode(
            prompt, 1, 4, temperature=1.0, top_p=1.0, stop_ids=set(), pad_id=0)


def test_a_short_prompt_after_a_long_one_reads_nothing_of_it(tiny_loaded):
    """The buffers are reused from pair to pair: a short prompt decoded after a long one on the
    same decoder draws what `generate` draws for it alone."""
    decoder = decoder_for(tiny_loaded)
    long_prompt = prompt_of(tiny_loaded) * 2
    short_prompt = long_prompt[:7]
    decoder.decode(long_prompt, 2, 10, temperature=1.0, top_p=1.0, stop_ids=set(), pad_id=0)
    expected = generated(tiny_loaded, short_prompt, 2, 6, temperature=1.0, top_p=1.0, seed=4)
    torch.manual_seed(4)
    decoded = decoder.decode(short_prompt, 2, 6, temperature=1.0, top_p=1.0, stop_ids=set(),
                             pad_id=0)
    assert torch.equal(decoded.sequences, expected.sequences)


def test_a_generation_config_the_loop_cannot_follow_keeps_generate(tiny_loaded):
    config = copy.deepcopy(tiny_loaded.model.generation_config)
    assert unsupported_generation_settings(config) == []
    config.repetition_penalty = 1.3
    assert unsupported_generation_settings(config) == ["repetition_penalty"]


def test_graphs_only_on_cuda(tiny_loaded, tiny_config):
    assert for_generator(tiny_loaded.model, tiny_loaded.device, "auto", 64) is None
    assert for_generator(tiny_loaded.model, torch.device("cuda"), "off", 64) is None
    with pytest.raises(ValueError, match="CUDA"):
        StaticDecoder(tiny_loaded.model, tiny_loaded.device, 64, capture=True)
    assert PairGenerator(tiny_loaded, tiny_config).decoder is None


@pytest.fixture
def served(tiny_config):
    """A fresh tiny model with its LiveAdapter and a generator that decodes through the static
    loop, as a GPU server does (eagerly here)."""
    config = dataclasses.replace(tiny_config, max_new_tokens=12)
    store, loaded, live, generator = wired(config)
    generator.decoder = StaticDecoder(loaded.model, loaded.device,
                                      config.max_prompt_tokens + config.max_new_tokens,
                                      capture=False)
    return config, store, loaded, live, generator


def test_stored_logprobs_through_the_static_loop_are_the_models_own(served):
    config, store, loaded, live, generator = served
    publish_random_adapter(config, store, 1, seed=1)
    assert live.sync()
    torch.manual_seed(2)
    pair = generator.sample(MESSAGES)
    assert pair.adapter_version == 1
    assert [len(r.token_ids) for r in pair.replies] != [0, 0]
    for reply in pair.replies:
        fresh = sequence_logprobs(loaded.model, pair.prompt_token_ids, reply.token_ids)
        assert torch.allclose(torch.tensor(reply.token_logprobs), fresh, atol=1e-4)


def test_a_graph_is_keyed_on_the_slot_and_the_adapter_switch(served):
    """A version copied into the slot keeps the state (the captured graph reads the slot); a
    rebuilt slot or the adapter switched off for base replies is another state."""
    config, store, loaded, live, _ = served
    publish_random_adapter(config, store, 1, seed=1)
    live.sync()
    first = model_state(loaded.model)
    publish_random_adapter(config, store, 2, seed=2)
    live.sync()
    assert model_state(loaded.model) == first
    with live.base():
        assert model_state(loaded.model) != first
    assert model_state(loaded.model) == first
    publish_random_adapter(config, store, 3, seed=3, rank=8)  # another shape: a new slot
    live.sync()
    assert model_state(loaded.model) != first
    rebuilt = model_state(loaded.model)
    layer = next(m for m in loaded.model.modules() if isinstance(m, BaseTunerLayer))
    name = next(iter(layer.scaling))
    layer.scaling[name] *= 2  # a scaling is baked into a captured graph
    assert model_state(loaded.model) != rebuilt
