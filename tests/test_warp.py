"""The server's sampling rule (chatbot/warp.py): temperature, then top-p without a full sort,
then a draw - the same tokens as transformers' own warpers under the same seed."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from chatbot.warp import sample_tokens, sampling_kwargs


@pytest.mark.parametrize("temperature, top_p, vocabulary, spread", [
    (0.8, 0.95, 500, 3.0), (1.0, 0.5, 500, 3.0), (1.3, 1.0, 500, 3.0),
    (0.8, 0.95, 49152, 4.0),  # the embedded model's vocabulary: top-p found among the top 512
    (1.0, 0.95, 4096, 0.1)])  # nearly flat: the top 512 fall short, the whole row is sorted
def test_draws_follow_generates_rule(temperature, top_p, vocabulary, spread):
    """Temperature, then top-p, then a draw: the same tokens as transformers' warpers under
    the same seed."""
    logits = torch.randn(64, vocabulary) * spread
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)])
    torch.manual_seed(7)
    expected = torch.multinomial(warpers(None, logits.clone()).softmax(-1), 1)[:, 0]
    torch.manual_seed(7)
    assert torch.equal(sample_tokens(logits, temperature, top_p), expected)


def test_top_p_keeps_the_smallest_set_that_reaches_it():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    drawn = {sample_tokens(logits, 1.0, 0.75).item() for _ in range(300)}
    assert drawn == {0, 1}
    assert {sample_tokens(logits, 1.0, 0.1).item() for _ in range(50)} == {0}


def test_generate_keeps_what_transformers_own_warpers_keep(tiny_loaded, tiny_config):
    """The server's generate calls warp with `warp` (no full sort for top-p): the
    same tokens as transformers' temperature and top-p warpers under the same seed."""
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    common = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                  min_new_tokens=12, num_return_sequences=2, return_dict_in_generate=True,
                  pad_token_id=0)
    with torch.inference_mode():
        torch.manual_seed(9)
        theirs = tiny_loaded.model.generate(**common, do_sample=True, temperature=0.8,
                                            top_p=0.95, top_k=0)
        torch.manual_seed(9)
        ours = tiny_loaded.model.generate(**common, **sampling_kwargs(tiny_config))
    assert (tiny_config.temperature, tiny_config.top_p) == (0.8, 0.95)
    assert torch.equal(ours.sequences, theirs.sequences)


def test_a_row_temperature_warps_each_row_as_its_own_temperature_would():
    """A pair whose second reply explores (--explore-temperature) warps each row by its own
    temperature: the same scores as warping the row alone."""
    from chatbot.warp import as_rows, warp

    logits = torch.randn(2, 4096) * 3.0
    rows = as_rows((0.8, 1.3), logits.device)
    assert rows.shape == (2, 1)
    together = warp(logits, rows, 0.95)
    assert torch.equal(together[0], warp(logits[:1], 0.8, 0.95)[0])
    assert torch.equal(together[1], warp(logits[1:], 1.3, 0.95)[0])
    assert as_rows((0.8, 0.8), logits.device) == 0.8  # one temperature: a plain float


def test_a_pair_explores_on_one_side_only_when_asked(tiny_config):
    import dataclasses

    from chatbot.warp import row_temperatures

    assert row_temperatures(tiny_config, True) == row_temperatures(tiny_config, False) == (
        tiny_config.temperature, tiny_config.temperature)
    exploring = dataclasses.replace(tiny_config, explore_temperature=1.2)
    assert row_temperatures(exploring, True) == (1.2, tiny_config.temperature)
    assert row_temperatures(exploring, False) == (tiny_config.temperature, 1.2)


@pytest.mark.parametrize("temperature, top_p, spread", [
    (0.8, 0.95, 3.0), (1.0, 0.5, 3.0), (1.3, 1.0, 3.0), (1.0, 0.95, 0.05)])
def test_the_kept_tokens_draw_has_sample_tokens_distribution(temperature, top_p, spread):
    """draw_tokens (the llama.cpp engine's) draws among the tokens top-p keeps: over many
    draws each token's frequency is its probability after warping, and nothing top-p drops
    is ever drawn (the last case: nearly flat, the whole row sorted)."""
    from chatbot.warp import draw_tokens, warp

    vocabulary, draws = 600, 40_000
    logits = (torch.randn(1, vocabulary) * spread).expand(draws, -1)
    expected = warp(logits[:1], temperature, top_p).softmax(-1)[0]
    drawn = draw_tokens(logits, temperature, top_p, torch.Generator().manual_seed(3))
    counts = torch.bincount(drawn, minlength=vocabulary).double()
    assert counts[expected == 0].sum() == 0
    # within 5 standard errors of each token's expected count
    mean, spread_ = draws * expected.double(), (draws * expected.double() * (1 - expected)).sqrt()
    assert ((counts - mean).abs() <= 5 * spread_ + 1).all()


def test_the_kept_tokens_draw_takes_a_row_temperature_per_row():
    from chatbot.warp import as_rows, draw_tokens

    logits = torch.tensor([[0.0, 1.0, 2.0]]).expand(2, -1)
    rows = as_rows((1e-3, 1e3), logits.device)  # first row: greedy; second: nearly uniform
    generator = torch.Generator().manual_seed(0)
    firsts = {int(draw_tokens(logits, rows, 1.0, generator)[0]) for _ in range(50)}
    seconds = {int(draw_tokens(logits, rows, 1.0, generator)[1]) for _ in range(200)}
    assert firsts == {2} and seconds == {0, 1, 2}
