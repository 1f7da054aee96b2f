"""The pair's decode-step kernels (chatbot/pair_kernels.py): same numbers, chosen per shape."""

import pytest
import torch
import torch.nn.functional as F

from chatbot import pair_kernels
from chatbot.config import Config, learner_parser
from chatbot.model import load_model
from chatbot.pair_kernels import PairLinear


def switched(linear: torch.nn.Linear) -> torch.nn.Linear:
    linear.__class__ = PairLinear
    return linear


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(2, 1, 48), (1, 2, 48), (2, 48)])
def test_two_rows_give_the_matrix_product(bias, shape):
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 80, bias=bias)
    x = torch.randn(*shape)
    expected = F.linear(x, layer.weight, layer.bias)
    switched(layer)
    with torch.inference_mode():
        got = layer(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_other_inputs_take_torchs_own_kernel_exactly():
    torch.manual_seed(0)
    layer = switched(torch.nn.Linear(48, 80))
    for rows in (1, 3, 4):
        x = torch.randn(rows, 1, 48)
        with torch.inference_mode():
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    # with gradients on (training), two rows too: and the gradient flows
    x = torch.randn(2, 1, 48, requires_grad=True)
    out = layer(x)
    assert torch.equal(out, F.linear(x, layer.weight, layer.bias))
    out.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def fresh_model(tiny_model_dir):
    return load_model(Config(model=str(tiny_model_dir), device="cpu", dtype="float32",
                             pair_kernels="off")).model


def test_install_switches_the_shapes_chosen_and_keeps_the_outputs(tiny_model_dir):
    model = fresh_model(tiny_model_dir)
    ids = torch.tensor([[5, 17, 99], [7, 3, 42]])
    with torch.inference_mode():
        before = model(ids).logits
        step_before = model(ids[:, :1]).logits  # two rows: what a pair's decode step sends
    report = pair_kernels.install(model, choose=lambda weight: weight.shape[0] == 128)
    assert report == {(64, 64): {"batched": False}, (128, 64): {"batched": True},
                      (64, 128): {"batched": False},
                      (model.config.vocab_size, 64): {"batched": False}}
    kinds = {name: type(m).__name__ for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear)}
    assert kinds["model.layers.0.mlp.gate_proj"] == kinds["model.layers.1.mlp.up_proj"] \
        == "PairLinear"
    assert kinds["model.layers.0.mlp.down_proj"] == kinds["lm_head"] == "Linear"
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)  # 6 rows
        torch.testing.assert_close(model(ids[:, :1]).logits, step_before, rtol=1e-5,
                                   atol=1e-5)


def test_install_times_both_kernels_and_switches_only_the_faster(tiny_model_dir):
    report = pair_kernels.install(fresh_model(tiny_model_dir))
    assert len(report) == 4
    for numbers in report.values():
        assert numbers["torch_ms"] > 0 and numbers["batched_ms"] > 0
        assert numbers["batched"] == (numbers["batched_ms"]
                                      < pair_kernels.MARGIN * numbers["torch_ms"])


def test_a_lora_adapter_on_a_switched_layer_gives_the_same_reply_scores(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    def with_lora(install: bool):
        model = fresh_model(tiny_model_dir)
        if install:
            pair_kernels.install(model, choose=lambda weight: True)
        torch.manual_seed(1)
        peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False))
        with torch.inference_mode():
            return peft(torch.tensor([[5], [7]])).logits

    torch.testing.assert_close(with_lora(True), with_lora(False), rtol=1e-5, atol=1e-5)


def test_the_server_model_is_switched_by_default_and_the_learners_never(tiny_model_dir,
                                                                          monkeypatch):
    monkeypatch.setattr(pair_kernels, "time_kernels", lambda weight: (1.0, 0.5))
    base = Config(model=str(tiny_model_dir), device="cpu", dtype="float32")

    def kinds(model) -> set[str]:
        return {type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear)}

    assert kinds(load_model(base).model) == {"PairLinear"}
    assert kinds(load_model(base, training=True).model) == {"Linear"}
    off = Config(model=str(tiny_model_dir), device="cpu", dtype="float32", pair_kernels="off")
    assert kinds(load_model(off).model) == {"Linear"}
    args = learner_parser().parse_args(["--pair-kernels", "off"])
    assert Config.from_args(args).pair_kernels == "off"
