"""The pair's decode-step kernels (chatbot/pair_kernels.py): same numbers, chosen per shape."""

import time

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


@pytest.fixture
def batched_calls(monkeypatch) -> list[str]:
    """The names of the batched products called from now on."""
    calls = []
    for name in ("bmm", "baddbmm"):
        original = getattr(torch, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, counted)
    return calls


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(2, 1, 48), (1, 2, 48), (2, 48), "strided"])
def test_two_rows_give_the_matrix_product(bias, shape, dtype, tolerance, batched_calls):
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 80, bias=bias, dtype=dtype)
    # "strided": the last position of two longer rows, as a prefill hands the output layer
    x = (torch.randn(2, 5, 48, dtype=dtype)[:, -1:] if shape == "strided"
         else torch.randn(*shape, dtype=dtype))
    expected = F.linear(x, layer.weight, layer.bias)
    switched(layer)
    with torch.inference_mode():
        got = layer(x)
    assert batched_calls == ["baddbmm" if bias else "bmm"]
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def test_other_inputs_take_torchs_own_kernel_exactly(batched_calls):
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
    assert batched_calls == []


def fresh_model(tiny_model_dir):
    return load_model(Config(model=str(tiny_model_dir), device="cpu", dtype="float32",
                             pair_kernels="off")).model


def test_install_switches_the_shapes_chosen_and_keeps_the_outputs(tiny_model_dir):
    model = fresh_model(tiny_model_dir)
    ids = torch.tensor([[5, 17, 99], [7, 3, 42]])
    with torch.inference_mode():
        before = model(ids).logits
        step_before = model(ids[:, :1]).logits  # two rows: what a pair's decode step sends
    report = pair_kernels.install(model, choose=lambda layer: layer.out_features == 128)
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


def test_install_times_every_shape_and_reports_the_times(tiny_model_dir):
    model = fresh_model(tiny_model_dir)
    report = pair_kernels.install(model)
    assert set(report) == {(64, 64), (128, 64), (64, 128), (model.config.vocab_size, 64)}
    for numbers in report.values():
        assert numbers["torch_ms"] > 0 and numbers["batched_ms"] > 0
        assert numbers["batched"] == (numbers["batched_ms"]
                                      < pair_kernels.MARGIN * numbers["torch_ms"])
    for layer in model.modules():  # each layer as its shape's timing decided
        if isinstance(layer, torch.nn.Linear):
            assert (type(layer) is PairLinear) == report[tuple(layer.weight.shape)]["batched"]


def test_a_timing_that_fails_leaves_torchs_kernels(tiny_model_dir, monkeypatch, caplog):
    def broken(layers):
        raise RuntimeError("no timer here")

    monkeypatch.setattr(pair_kernels, "time_kernels", broken)
    model = fresh_model(tiny_model_dir)
    assert pair_kernels.install(model) == {}
    assert not any(isinstance(m, PairLinear) for m in model.modules())
    assert "could not time the kernels (no timer here)" in caplog.text


def test_a_pair_sampled_through_the_switched_layers_keeps_faithful_logprobs(tiny_model_dir,
                                                                          batched_calls):
    from chatbot.sampling import PairGenerator

    loaded = load_model(Config(model=str(tiny_model_dir), device="cpu", dtype="float32",
                               pair_kernels="off"))
    pair_kernels.install(loaded.model, choose=lambda layer: True)
    generator = PairGenerator(loaded, Config(model=str(tiny_model_dir), max_new_tokens=6))
    torch.manual_seed(1)
    pair = generator.sample([{"role": "user", "content": "Say something nice."}])
    assert batched_calls  # the decode steps took the batched kernel
    for reply in pair.replies:  # against one forward pass over prompt + reply (torch's kernel)
        ids = torch.tensor([pair.prompt_token_ids + reply.token_ids])
        with torch.no_grad():
            logits = loaded.model(ids).logits[0, len(pair.prompt_token_ids) - 1:-1]
        fresh = torch.log_softmax(logits, -1).gather(
            -1, torch.tensor(reply.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(reply.token_logprobs), fresh, rtol=0,
                                   atol=1e-4)


def test_a_lora_adapter_on_a_switched_layer_gives_the_same_scores(tiny_model_dir,
                                                                    batched_calls):
    from peft import LoraConfig, get_peft_model

    def with_lora(install: bool):
        model = fresh_model(tiny_model_dir)
        if install:
            pair_kernels.install(model, choose=lambda layer: True)
        torch.manual_seed(1)
        peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False))
        base = peft.base_model.model.model.layers[0].self_attn.q_proj.base_layer
        assert type(base) is (PairLinear if install else torch.nn.Linear)
        with torch.inference_mode():
            return peft(torch.tensor([[5], [7]])).logits

    plain = with_lora(False)
    assert batched_calls == []
    torch.testing.assert_close(with_lora(True), plain, rtol=1e-5, atol=1e-5)
    assert batched_calls


def test_the_server_model_is_switched_by_default_and_the_learners_never(tiny_model_dir,
                                                                          monkeypatch):
    monkeypatch.setattr(pair_kernels, "time_kernels", lambda layers: (1.0, 0.5))
    base = Config(model=str(tiny_model_dir), device="cpu", dtype="float32")

    def kinds(model) -> set[str]:
        return {type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear)}

    assert kinds(load_model(base).model) == {"PairLinear"}
    assert kinds(load_model(base, training=True).model) == {"Linear"}
    off = Config(model=str(tiny_model_dir), device="cpu", dtype="float32", pair_kernels="off")
    assert kinds(load_model(off).model) == {"Linear"}
    args = learner_parser().parse_args(["--pair-kernels", "off"])
    assert Config.from_args(args).pair_kernels == "off"


def test_a_kernel_clearly_slower_on_its_first_timed_pass_is_decided_there(monkeypatch):
    layers = [torch.nn.Linear(64, 32) for _ in range(3)]
    calls = {"torch": 0, "batched": 0}
    real_linear, real_two_rows = F.linear, pair_kernels.two_rows

    def counted_linear(*args):
        calls["torch"] += 1
        return real_linear(*args)

    def slow_two_rows(*args):  # 10 ms a layer: far past CLEARLY_SLOWER times torch's
        calls["batched"] += 1
        time.sleep(0.01)
        return real_two_rows(*args)

    monkeypatch.setattr(pair_kernels.F, "linear", counted_linear)
    monkeypatch.setattr(pair_kernels, "two_rows", slow_two_rows)
    torch_s, batched_s = pair_kernels.time_kernels(layers)
    assert batched_s > pair_kernels.CLEARLY_SLOWER * torch_s
    # the warm-up and one timed pass of each, not REPEATS + 1
    assert calls == {"torch": 2 * len(layers), "batched": 2 * len(layers)}
