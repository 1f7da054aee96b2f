"""4-bit CPU weights (chatbot/int4.py): blocks that recover Q4_1 weights exactly, a layer that
computes what its blocks stand for, and a model that samples with them."""

from __future__ import annotations

import pytest
import torch

from chatbot import int4

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
    from chatbot.model import load_model
    from chatbot.sampling import PairGenerator

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
    assert report["layers"] == 2 * 7 and report["max_relative_change"] < 1e-6
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)  # tied, untouched
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with torch.no_grad():
        after = model(prompt).logits
    assert torch.allclose(after, before, atol=0.05, rtol=0.05)  # bf16 compute, same weights
    pair = PairGenerator(loaded, tiny_config).sample([{"role": "user", "content": "hi"}])
    assert len(pair.replies) == 2 and all(r.token_ids for r in pair.replies)
