"""The server's LoRA layer (chatbot/serving_lora.py): the update PEFT's own layer computes, for
a few rows elementwise and for many with matrix products, on float and 4-bit base layers."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from chatbot import int4, serving_lora


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))

    def get_output_embeddings(self) -> None:  # no output layer for quantize_model to keep
        return None


def adapted(model: nn.Module, serving: bool) -> nn.Module:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"],
                        init_lora_weights=False)
    if serving:
        config = serving_lora.lora_config(config, model)
    torch.manual_seed(1)  # the same random LoRA weights either way
    return get_peft_model(model, config).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, serving_lora.SMALL_BATCH, serving_lora.SMALL_BATCH + 5])
def test_the_update_is_peft_s_for_few_rows_and_many(dtype, rows):
    torch.manual_seed(0)
    base = TwoLayers().to(dtype)
    ours, peft_s = adapted(copy.deepcopy(base), True), adapted(copy.deepcopy(base), False)
    assert isinstance(ours.base_model.model.up, serving_lora.ServingLora)
    assert not isinstance(peft_s.base_model.model.up, serving_lora.ServingLora)
    assert ({n: p.shape for n, p in ours.named_parameters()}
            == {n: p.shape for n, p in peft_s.named_parameters()})  # a version loads into both
    x = torch.randn(1, rows, 64).to(dtype)
    with torch.inference_mode():
        out, expected, plain = ours(x), peft_s(x), base(x)
        with ours.disable_adapter():
            assert torch.equal(ours(x), plain)
    assert out.dtype == dtype and out.shape == expected.shape
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(out, expected, atol=tolerance, rtol=tolerance)
    assert not torch.allclose(out, plain, atol=0.1)  # the adapter does something


def test_4bit_layers_take_it_and_gpu_or_bitsandbytes_models_keep_peft_s_own():
    if int4.unavailable():
        pytest.skip(int4.unavailable())
    model = TwoLayers()
    assert int4.quantize_model(model)["layers"] == 2
    assert set(serving_lora.lora_config(LoraConfig(), model)._custom_modules) == {
        int4.Int4Linear, nn.Linear}
    served = adapted(model, True)
    assert isinstance(served.base_model.model.down, serving_lora.ServingLora)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        moved = served(x)
        with served.disable_adapter():
            assert not torch.allclose(moved, served(x), atol=0.1)

    class Linear8bitLt(nn.Linear):  # stands in for bitsandbytes' layer, by its module
        __module__ = "bitsandbytes.nn.modules"

    quantized = TwoLayers()
    quantized.up = Linear8bitLt(64, 128)
    assert set(serving_lora.lora_config(LoraConfig(), quantized)._custom_modules) == {
        int4.Int4Linear}


def counted(kernel, name: str, calls: list[str]):
    def run(*args):
        calls.append(name)
        return kernel(*args)
    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_two_small_batch_forms_give_peft_s_update(dtype, monkeypatch):
    torch.manual_seed(0)
    base = TwoLayers().to(dtype)
    ours, peft_s = adapted(copy.deepcopy(base), True), adapted(copy.deepcopy(base), False)
    x = torch.randn(1, 2, 64).to(dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    outputs = {}
    for form in ("elementwise", "products"):
        for layer in (ours.base_model.model.up, ours.base_model.model.down):
            vars(layer.base_layer)[serving_lora.FORMS] = {4: form}  # as time_small_batch marks
        calls: list[str] = []
        for name in ("elementwise", "products"):
            monkeypatch.setattr(serving_lora, name, counted(getattr(serving_lora, name), name,
                                                            calls))
        with torch.inference_mode():
            outputs[form], expected = ours(x), peft_s(x)
        monkeypatch.undo()
        assert calls == [form, form]  # both layers took the form marked on them
        assert torch.allclose(outputs[form], expected, atol=tolerance, rtol=tolerance)


def test_time_small_batch_marks_each_layer_with_its_shapes_form():
    model = TwoLayers()
    report = serving_lora.time_small_batch(model, r=4)
    assert set(report) == {(64, 128, 4), (128, 64, 4)}
    for (n_in, n_out, r), numbers in report.items():
        assert numbers["elementwise_us"] > 0 and numbers["products_us"] > 0
        faster = numbers["products_us"] < serving_lora.MARGIN * numbers["elementwise_us"]
        assert numbers["form"] == ("products" if faster else "elementwise")
        layer = model.up if (n_in, n_out) == (64, 128) else model.down
        assert vars(layer)[serving_lora.FORMS] == {r: numbers["form"]}
