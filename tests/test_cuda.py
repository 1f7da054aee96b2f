"""The CUDA path, on the tiny model: `--device auto` on a GPU loads the base in 4-bit NF4 with
bf16 compute, samples pairs whose stored log-probs are the model's, trains a QLoRA round, and
swaps adapters into the resident slot on the GPU.

CI has no GPU, so every test here skips on a machine without CUDA; the CPU tests cover the same
logic on the CPU path (test_sampling, test_learner, test_hotswap). Run on a GPU machine with
`python -m pytest tests/test_cuda.py` (bench/gpu.sh does, beside the GPU benchmarks).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from chatbot.model import load_model
from chatbot.sampling import PairGenerator
from chatbot.store import Store

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: the GPU path runs on a GPU machine only")

MESSAGES = [{"role": "user", "content": "Say something nice."}]


@pytest.fixture
def cuda_config(tiny_config):
    """The product's defaults on a GPU: device, quantization and dtype all `auto`."""
    return dataclasses.replace(tiny_config, device="auto", quantize="auto", dtype="auto")


def test_auto_on_a_gpu_is_a_4bit_nf4_base_with_bf16_compute(cuda_config):
    loaded = load_model(cuda_config)
    assert loaded.device.type == "cuda" and loaded.quantize == "4bit"
    layers = [m for m in loaded.model.modules() if type(m).__name__ == "Linear4bit"]
    assert layers, "no bitsandbytes 4-bit layer in the model"
    assert all(m.weight.quant_type == "nf4" for m in layers)
    assert all(m.compute_dtype == torch.bfloat16 for m in layers)
    assert all(m.weight.device.type == "cuda" for m in layers)


def test_stored_logprobs_are_the_models_own_on_a_gpu(cuda_config):
    """The learner's importance ratios start from these numbers: the batched pair's per-token
    log-probs must match a fresh single-sequence forward pass (to bf16/4-bit rounding)."""
    loaded = load_model(cuda_config)
    generator = PairGenerator(loaded, dataclasses.replace(cuda_config, max_new_tokens=12))
    torch.manual_seed(1)
    pair = generator.sample(MESSAGES)
    gaps = []
    for reply in pair.replies:
        ids = torch.tensor([pair.prompt_token_ids + reply.token_ids], device=loaded.device)
        with torch.no_grad():
            logits = loaded.model(ids).logits[0, len(pair.prompt_token_ids) - 1:-1].float()
        target = torch.tensor(reply.token_ids, device=loaded.device)[:, None]
        fresh = torch.log_softmax(logits, -1).gather(-1, target)[:, 0].cpu()
        assert len(reply.token_logprobs) == len(reply.token_ids) > 0
        gaps.append((torch.tensor(reply.token_logprobs) - fresh).abs())
    gaps = torch.cat(gaps)
    # A random token of this vocabulary scores about -10; bf16 rounding moves a log-prob by
    # hundredths (the CPU bf16 test sees a mean of 0.002-0.04).
    assert gaps.mean().item() < 0.05 and gaps.max().item() < 0.5, gaps


def gpu_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 13]], device="cuda")).logits.float()


def test_a_qlora_round_on_the_gpu_trains_lora_only(cuda_config):
    from learner.worker import Learner
    from tests.test_learner import collect_votes

    config = dataclasses.replace(cuda_config, lr=3e-3, steps_per_round=3, judge_new=False,
                                 replay=0, kl_tripwire=100.0)
    store = Store(config.db_path)
    collect_votes(config, store, ["A", "B", "A"])
    learner = Learner(config, store, load_model(config, training=True), seed=0)
    lora = {n: p for n, p in learner.model.named_parameters() if "lora_" in n}
    assert lora and all(p.device.type == "cuda" and p.requires_grad for p in lora.values())
    before = {n: p.detach().clone() for n, p in lora.items()}
    step = learner.round()
    assert step["status"] in ("promoted", "rejected") and step["loss"] is not None
    assert any(not torch.equal(p, before[n]) for n, p in lora.items())
    assert not any(p.requires_grad for n, p in learner.model.named_parameters()
                   if "lora_" not in n)


def test_the_server_swaps_adapters_into_its_resident_slot_on_the_gpu(cuda_config):
    from chatbot.hotswap import LiveAdapter
    from tests.test_hotswap import publish_random_adapter

    store = Store(cuda_config.db_path)
    served = load_model(cuda_config)
    live = LiveAdapter(served.model, served.model_id, store, cuda_config.adapters_dir)
    base = gpu_logits(served.model)
    publish_random_adapter(cuda_config, store, 1, seed=1)
    assert live.sync() and live.version == 1
    slot = {n: p.data_ptr() for n, p in served.model.named_parameters() if "lora_" in n}
    assert slot and all(p.device.type == "cuda" for n, p in served.model.named_parameters()
                        if "lora_" in n)
    v1 = gpu_logits(served.model)
    # 4-bit kernels round differently with a LoRA wrapper around them: compare at bf16 scale.
    assert not torch.allclose(v1, base, atol=0.05)
    publish_random_adapter(cuda_config, store, 2, seed=2)
    assert live.sync() and live.version == 2
    assert {n: p.data_ptr() for n, p in served.model.named_parameters() if "lora_" in n} == slot
    assert not torch.allclose(gpu_logits(served.model), v1, atol=0.05)
    store.set_live(0)
    live.sync()
    assert torch.allclose(gpu_logits(served.model), base, atol=0.05)


def test_pairs_decode_through_cuda_graphs_that_follow_a_hot_swap(cuda_config):
    """The server's GPU path: streamed pairs replay a captured decode step; a version copied
    into the resident slot is read by the same graph (the stored log-probs are the new
    version's), with no second capture."""
    from tests.test_hotswap import publish_random_adapter, wired

    config = dataclasses.replace(cuda_config, max_new_tokens=12)
    store, served, live, generator = wired(config)
    assert generator.decoder is not None and generator.decoder.capture

    def logprob_gaps(pair) -> torch.Tensor:
        gaps = []
        for reply in pair.replies:
            ids = torch.tensor([pair.prompt_token_ids + reply.token_ids], device="cuda")
            with torch.no_grad():
                logits = served.model(ids).logits[0, len(pair.prompt_token_ids) - 1:-1].float()
            target = torch.tensor(reply.token_ids, device="cuda")[:, None]
            fresh = torch.log_softmax(logits, -1).gather(-1, target)[:, 0].cpu()
            gaps.append((torch.tensor(reply.token_logprobs) - fresh).abs())
        return torch.cat(gaps)

    publish_random_adapter(config, store, 1, seed=1)
    assert live.sync()
    torch.manual_seed(1)
    first = generator.sample(MESSAGES)
    assert first.adapter_version == 1 and len(generator.decoder._graphs) == 1
    gaps = logprob_gaps(first)
    assert gaps.mean().item() < 0.05 and gaps.max().item() < 0.5, gaps
    publish_random_adapter(config, store, 2, seed=2)
    assert live.sync()
    second = generator.sample(MESSAGES)
    assert second.adapter_version == 2 and len(generator.decoder._graphs) == 1
    gaps = logprob_gaps(second)
    assert gaps.mean().item() < 0.05 and gaps.max().item() < 0.5, gaps


def test_a_capture_after_a_pair_that_filled_the_cache_stays_inside_it(cuda_config):
    """A new capture (an evicted graph, a rebuilt slot) after a pair that filled the static
    cache: its warm-up steps write from the cache's start, not past its end."""
    from chatbot.graph_decode import StaticDecoder

    loaded = load_model(cuda_config)
    prompt = PairGenerator(loaded, cuda_config).prompt_ids(MESSAGES)
    decoder = StaticDecoder(loaded.model, loaded.device, len(prompt) + 3, capture=True)
    for _ in range(2):
        decoded = decoder.decode(prompt, 2, 8, temperature=1.0, top_p=1.0, stop_ids=set(),
                                 pad_id=0)
        assert decoded.sequences.shape == (2, len(prompt) + 4)
        decoder._graphs.clear()  # the next pair captures again on the same buffers
    torch.cuda.synchronize()
