"""How a token is drawn from a decode step's logits: the server's temperature, then top-p,
then a draw from what is left - the rule of `generate(do_sample=True, top_k=0)`, for every
engine in this process (chatbot/sampling.py's `generate` calls, chatbot/graph_decode.py's
loop), computed without sorting the whole vocabulary. The temperature may be one per row (a
pair whose second reply explores at --explore-temperature, `row_temperatures`).

Left out: top-k, min-p and the other warpers transformers has (the server sets temperature
and top-p only), and vLLM's sampler (a vLLM server samples with its own).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from chatbot.config import Config

TOP_P_CANDIDATES = 512  # the most likely tokens top-p looks among before it sorts them all


Temperature = float | torch.Tensor  # one for every row, or (n, 1): one per row


def warp(logits: torch.Tensor, temperature: Temperature, top_p: float) -> torch.Tensor:
    """Raw logits (n, V) as `generate(do_sample=True, top_k=0)` warps them: divided by the
    temperature (a row's own, given (n, 1)); then, below top-p 1, every token but the most
    likely ones whose probabilities reach top_p (at least one) set to -inf.

    transformers sorts the whole vocabulary for top-p: 5.5 ms a step for a pair over the
    embedded model's 49,152 tokens on this project's 2-core EPYC (9.6 ms on one thread),
    where a whole 4-bit pair step took about 70 ms (`bench decode`). The tokens top-p keeps
    are almost always among the few hundred most likely (353 and 369 of 49,152 on random
    logits at top-p 0.95), so it ranks those (`topk`, 0.26 ms) and sorts the whole
    vocabulary only for a row where they fall short of top_p: the same tokens kept."""
    scores = _scaled(logits, temperature)
    if top_p >= 1.0:
        return scores
    probs = scores.softmax(dim=-1)
    _, order, dropped = _top_p_ranking(probs, top_p)
    drop = torch.ones_like(probs, dtype=torch.bool)  # a token outside `order` is dropped
    drop.scatter_(-1, order, dropped)
    return scores.masked_fill(drop, float("-inf"))


def _scaled(logits: torch.Tensor, temperature: Temperature) -> torch.Tensor:
    plain = not isinstance(temperature, torch.Tensor) and temperature == 1.0
    return logits if plain else logits / temperature


def _top_p_ranking(probs: torch.Tensor, top_p: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the most likely tokens' probabilities, their ids, whether top-p drops each), highest
    first, for rows of probabilities (n, V) and top_p < 1: the few hundred most likely
    (`topk`), or the whole row sorted where those fall short of top_p. A token is dropped
    when the tokens ranked before it already reach top_p (the most likely never is)."""
    ranked, order = probs.topk(min(TOP_P_CANDIDATES, probs.shape[-1]), dim=-1)
    if bool((ranked.sum(dim=-1) < top_p).any()):
        ranked, order = probs.sort(dim=-1, descending=True)
    return ranked, order, ranked.cumsum(dim=-1) - ranked >= top_p


def sample_tokens(logits: torch.Tensor, temperature: Temperature, top_p: float) -> torch.Tensor:
    """One token per row of raw logits (n, V), drawn as `generate(do_sample=True, top_k=0)`
    draws it: from the softmax of the warped logits (`warp`)."""
    return torch.multinomial(warp(logits, temperature, top_p).softmax(dim=-1), 1)[:, 0]


def draw_tokens(logits: torch.Tensor, temperature: Temperature, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """`sample_tokens`' draw (the same distribution: temperature, then top-p, then a draw),
    made among the tokens top-p keeps instead of over the whole vocabulary, with `generator`'s
    random numbers. torch's multinomial over the embedded model's 49,152 tokens took 1.4 ms a
    pair's step on the AVX-512 EPYC, where the whole llama.cpp step took 13 ms; over the few
    hundred kept it is a few microseconds. Its random numbers are not `generate`'s: the
    engines that must match `generate` token for token (the CUDA graphs) use
    `sample_tokens`."""
    probs = _scaled(logits, temperature).softmax(dim=-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    ranked, order, dropped = _top_p_ranking(probs, top_p)
    kept = ranked.masked_fill(dropped, 0.0)
    return order.gather(-1, torch.multinomial(kept, 1, generator=generator))[:, 0]


class _Warp(LogitsProcessor):
    """The server's temperature and top-p inside `generate`, as `warp` computes them: the
    same tokens kept as transformers' own warpers, without sorting the vocabulary."""

    def __init__(self, temperature: Temperature, top_p: float) -> None:
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return warp(scores, self.temperature, self.top_p)


def sampling_kwargs(config: Config, temperature: Temperature | None = None) -> dict:
    """How every `generate` call here samples: --temperature (or the rows' own, `temperature`)
    and --top-p through `_Warp`, and none of transformers' own warpers (temperature 1, top-p
    1, top-k 0 switch them off)."""
    temperature = config.temperature if temperature is None else temperature
    return dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                logits_processor=LogitsProcessorList([_Warp(temperature, config.top_p)]))


def row_temperatures(config: Config, explore_first: bool) -> tuple[float, float]:
    """The temperatures of a pair's two replies: both --temperature, or, with
    --explore-temperature, one of them (the first if `explore_first`) at that."""
    if not config.explore_temperature:
        return (config.temperature, config.temperature)
    if explore_first:
        return (config.explore_temperature, config.temperature)
    return (config.temperature, config.explore_temperature)


def as_rows(temperatures: tuple[float, ...], device) -> Temperature:
    """Row temperatures as `warp` takes them: one float when they are all the same."""
    if len(set(temperatures)) == 1:
        return temperatures[0]
    return torch.tensor(temperatures, device=device, dtype=torch.float32)[:, None]
