"""4-bit CPU weights (chatbot/int4.py): blocks that recover Q4_1 weights exactly, a layer that
computes what its blocks stand for, a model that samples with them, and the server under
--quantize int4 serving adapter versions on them (chatbot/serving_lora.py)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from chatbot import int4
from chatbot.config import Config
from chatbot.errors import ModelLoadError
from chatbot.hotswap import LiveAdapter
from chatbot.model import load_model, resolve_quantization
from chatbot.sampling import PairGenerator
from chatbot.store import Store

pytestmark = pytest.mark.skipif(int4.unavailable() is not None,
                                reason=str(int4.unavailable()))


def q4_1_weights(rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    """Weights as a Q4_1 GGUF holds them: per block of 32, m + d q with q in 0..15 and both
    ends used."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows, columns // 32, 32), generator=g)
    codes[..., 0], codes[..., 1] = 0, 15
    scale = torch.rand(rows, columns // 32, 1, generator=g) * 0.01 + 1e-4
    minimum = -torch.rand(rows, columns // 32, 1, generator=g) * 0.08
    return (minimum + scale * codes).reshape(rows, columns)


def test_q4_1_blocks_come_back_exactly():
    weight = q4_1_weights(64, 128)
    codes, scale, minimum = int4.quantize_blocks(weight)
    assert codes.min() == 0 and codes.max() == 15
    assert torch.allclose(int4.dequantize_blocks(codes, scale, minimum), weight, atol=1e-7)
    # a constant block (all one value) is code 0 at its minimum, not a division by zero
    flat = torch.full((2, 32), 0.25)
    assert torch.equal(int4.dequantize_blocks(*int4.quantize_blocks(flat)), flat)
    with pytest.raises(ValueError, match="32-blocks"):
        int4.quantize_blocks(torch.zeros(4, 48))


@pytest.mark.parametrize("bias", [False, True])
def test_a_4bit_layer_computes_what_its_blocks_stand_for(bias):
    linear = torch.nn.Linear(128, 96, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(q4_1_weights(96, 128, seed=1))
    layer = int4.Int4Linear(linear)
    x = torch.randn(2, 3, 128)
    # the reference: the same weights, scales and minimums rounded to bf16 as the kernel has them
    codes, scale, minimum = int4.quantize_blocks(linear.weight)
    zero = (minimum + 8 * scale).bfloat16().float()
    weight = int4.dequantize_blocks(codes - 8, scale.bfloat16().float(), zero)
    expected = torch.nn.functional.linear(x.bfloat16().float(), weight,
                                          None if linear.bias is None
                                          else linear.bias.bfloat16().float())
    out = layer(x)
    assert out.shape == (2, 3, 96) and out.dtype == torch.float32  # the caller's dtype
    assert torch.allclose(out, expected, atol=0.02, rtol=0.02)
    assert torch.allclose(torch.nn.functional.linear(x, linear.weight, linear.bias), out,
                          atol=0.05, rtol=0.05)
    assert layer.weight_bytes() < 96 * 128  # under a byte a weight: codes, scales and zeros


def test_a_model_with_4bit_layers_samples_and_keeps_its_output_layer(tiny_config):
    loaded = load_model(tiny_config)
    model = loaded.model
    with torch.no_grad():  # make the tiny model's layers Q4_1 weights, as the GGUF's are
        for i, linear in enumerate(m for m in model.modules()
                                   if isinstance(m, torch.nn.Linear)
                                   and m is not model.get_output_embeddings()):
            linear.weight.copy_(q4_1_weights(*linear.weight.shape, seed=i))
    prompt = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = model(prompt).logits
    report = int4.quantize_model(model)
    assert report["layers"] == 2 * 7 and report["unfit"] == 0
    assert report["max_relative_change"] < 1e-6
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)  # tied, untouched
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with torch.no_grad():
        after = model(prompt).logits
    assert torch.allclose(after, before, atol=0.05, rtol=0.05)  # bf16 compute, same weights
    pair = PairGenerator(loaded, tiny_config).sample([{"role": "user", "content": "hi"}])
    assert len(pair.replies) == 2 and all(r.token_ids for r in pair.replies)


@pytest.fixture
def q4_1_model_dir(tiny_model_dir, tmp_path) -> Path:
    """The tiny model with every linear layer but the output one in Q4_1 weights, as the
    embedded GGUF's are: 4-bit blocks hold them exactly, so a float load and an int4 load of
    it differ only in the bf16 the kernel computes in."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for i, linear in enumerate(m for m in model.modules()
                                   if isinstance(m, torch.nn.Linear)
                                   and m is not model.get_output_embeddings()):
            linear.weight.copy_(q4_1_weights(*linear.weight.shape, seed=i))
    folder = tmp_path / "tiny-q4_1"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def test_int4_finds_the_blocks_of_the_stored_weights_not_of_their_bf16_rounding(
        tiny_config, q4_1_model_dir, caplog):
    """In bf16 the model's other layers are bf16, but the 4-bit blocks come from the stored
    float32 weights: Q4_1 weights rounded to bf16 first would no longer be whole levels."""
    config = dataclasses.replace(tiny_config, model=str(q4_1_model_dir), dtype="bfloat16",
                                 quantize="int4")
    with caplog.at_level("INFO", logger="chatbot.model"):
        loaded = load_model(config)
    found = re.search(r"14 linear layers in 4-bit blocks \(0 left as they were for their "
                      r"shape\), largest change to a weight (\S+) of", caplog.text)
    assert found and float(found[1]) < 1e-6  # float32 rounding; bf16 first moved them ~3e-3
    assert loaded.model.get_output_embeddings().weight.dtype == torch.bfloat16


def test_the_server_serves_adapter_versions_on_4bit_layers(tiny_config, q4_1_model_dir):
    """--quantize int4: the live adapter loads onto the 4-bit layers (PEFT's LoRA through
    chatbot/serving_lora.py), changes the replies as on float weights, a later version of the same
    shape is copied into the same slot, and version 0 gives back the base exactly; the
    learner's load of the same settings keeps float weights."""
    from chatbot.serving_lora import ServingLora
    from tests.test_hotswap import logits, publish_random_adapter

    config = dataclasses.replace(tiny_config, model=str(q4_1_model_dir))
    store = Store(config.db_path)
    served = load_model(dataclasses.replace(config, quantize="int4"))
    plain = load_model(config)
    assert served.quantize == "int4"
    assert isinstance(served.model.model.layers[0].mlp.down_proj, int4.Int4Linear)
    base = logits(served.model)
    assert torch.allclose(base, logits(plain.model), atol=0.02)  # the same weights, in bf16

    publish_random_adapter(config, store, 1, seed=1)
    live = LiveAdapter(served.model, served.model_id, store, config.adapters_dir)
    plain_live = LiveAdapter(plain.model, plain.model_id, store, config.adapters_dir)
    assert live.sync() and plain_live.sync()
    assert isinstance(served.model.model.layers[0].mlp.down_proj, ServingLora)
    v1 = logits(served.model)
    assert (v1 - base).abs().max() > 0.3  # the adapter moved the logits...
    assert torch.allclose(v1, logits(plain.model), atol=0.03)  # ...as it does on float ones

    slot = {n: p.data_ptr() for n, p in served.model.named_parameters() if "lora_" in n}
    publish_random_adapter(config, store, 2, seed=2)
    assert live.sync() and plain_live.sync()
    assert {n: p.data_ptr() for n, p in served.model.named_parameters() if "lora_" in n} == slot
    assert torch.allclose(logits(served.model), logits(plain.model), atol=0.03)
    with live.base():
        assert torch.equal(logits(served.model), base)
    store.set_live(0)
    live.sync()
    assert torch.equal(logits(served.model), base)

    learner_side = load_model(dataclasses.replace(config, quantize="int4"), training=True)
    assert learner_side.quantize == "none"
    assert not any(isinstance(m, int4.Int4Linear) for m in learner_side.model.modules())


def test_behaviour_logprobs_on_4bit_layers_match_a_fresh_forward_pass(tiny_config):
    """The log-probs stored with a pair sampled on 4-bit layers under a live adapter are the
    model's own: a fresh forward pass over prompt + reply gives them back."""
    from tests.test_hotswap import publish_random_adapter
    from tests.test_sampling import sequence_logprobs

    store = Store(tiny_config.db_path)
    served = load_model(dataclasses.replace(tiny_config, quantize="int4"))
    publish_random_adapter(tiny_config, store, 1, seed=1)
    live = LiveAdapter(served.model, served.model_id, store, tiny_config.adapters_dir)
    live.sync()
    generator = PairGenerator(served, tiny_config, adapter_context=live.reading)
    torch.manual_seed(0)
    pair = generator.sample([{"role": "user", "content": "Hello!"}])
    assert pair.adapter_version == 1
    for reply in pair.replies:
        fresh = sequence_logprobs(served.model, pair.prompt_token_ids, reply.token_ids)
        assert len(reply.token_logprobs) == len(reply.token_ids) > 0
        assert torch.allclose(torch.tensor(reply.token_logprobs), fresh, atol=1e-4)


def test_int4_is_refused_where_it_cannot_run(tiny_model_dir, tmp_path):
    """A model none of whose layers the kernel takes, and a GPU, get one clear line."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    folder = tmp_path / "odd-widths"
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=40, intermediate_size=72, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(ModelLoadError, match="none of its linear layers"):
        load_model(Config(model=str(folder), device="cpu", quantize="int4",
                          cache_dir=tmp_path / "cache", pair_kernels="off"))
    with pytest.raises(ModelLoadError, match="on a GPU use 4bit"):
        resolve_quantization("int4", torch.device("cuda"))


def test_a_learner_handed_4bit_layers_says_to_load_float_weights(tiny_config):
    from learner.worker import Learner

    served = load_model(dataclasses.replace(tiny_config, quantize="int4"))
    with pytest.raises(ModelLoadError, match="training=True"):
        Learner(tiny_config, Store(tiny_config.db_path), served, seed=0)
