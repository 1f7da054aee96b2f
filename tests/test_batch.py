"""Batches of replies: the pass that reads a shared prompt once gives the same log-probs and
the same LoRA gradients as one row per reply."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from chatbot.model import load_model
from learner.batch import Sample, collate, distributions, token_logprobs


@pytest.fixture
def lora_model(tiny_config):
    """The tiny model with a LoRA adapter whose B matrices are not zero (a fresh adapter is
    the identity, under which a mistake in the adapter's path would not show)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(tiny_config, training=True).model,
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                      task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    return model


def replies() -> list[Sample]:
    """Two pairs (each pair's replies of different lengths), a reply whose prompt no other row
    has, and a one-token reply after a prompt of its own length."""
    rng = random.Random(0)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(10, 40000) for _ in range(n)]

    def sample(prompt: list[int], n: int) -> Sample:
        return Sample(0, prompt, tokens(n), [0.0] * n, advantage=rng.choice([1.0, -1.0]))

    first, second, alone = tokens(9), tokens(5), tokens(7)
    return [sample(first, 6), sample(first, 3), sample(second, 8), sample(second, 8),
            sample(alone, 4), sample(second, 1)]


def without_sharing(batch):
    return dataclasses.replace(batch, shared=None)


def test_collate_shares_a_prompt_only_when_rows_repeat_it():
    samples = replies()
    batch = collate(samples, pad_id=0)
    assert batch.shared is not None
    assert batch.shared.prompt_ids.shape[0] == 3
    assert batch.shared.row_prompt.tolist() == [0, 0, 1, 1, 2, 1]
    assert collate([samples[0], samples[2], samples[4]], pad_id=0).shared is None
    # A short prompt before long replies: two passes would cost more than they save.
    short = [Sample(0, [5], [7] * 20, [0.0] * 20), Sample(0, [5], [8] * 20, [0.0] * 20)]
    assert collate(short, pad_id=0).shared is None


def test_a_shared_prompt_gives_the_same_distributions(lora_model):
    batch = collate(replies(), pad_id=0)
    with torch.no_grad():
        shared = distributions(lora_model, batch)
        rows = distributions(lora_model, without_sharing(batch))
    on_replies = batch.mask.bool()
    assert shared.shape == rows.shape
    assert torch.allclose(shared[on_replies], rows[on_replies], atol=1e-5)
    assert torch.isfinite(shared).all()  # padding positions too: they are masked, not NaN


def test_a_shared_prompt_gives_the_same_lora_gradients(lora_model):
    batch = collate(replies(), pad_id=0)
    params = [p for p in lora_model.parameters() if p.requires_grad]

    def gradients(b) -> list[torch.Tensor]:
        loss = (token_logprobs(lora_model, b) * b.advantages[:, None]).sum()
        return torch.autograd.grad(loss, params)

    shared, rows = gradients(batch), gradients(without_sharing(batch))
    assert any(g.abs().sum() > 0 for g in rows)
    for a, b in zip(shared, rows):  # float32 sums in another order: relative error ~1e-6
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-7
