"""What a sampled reply and pair are, and what every engine shares to make them.

`Reply` and `SampledPair` are what the store keeps of a turn: each reply's text, token ids,
behaviour log-probs and temperature, and the pair's adapter version and sampling settings.
`PairStream` is a pair as it grows. `Generator` is what the service asks of an engine:
chatbot/sampling.py's `PairGenerator` (transformers, in this process) or
chatbot/vllm_engine.py's `VllmGenerator` (a vLLM server). Both derive from
`StreamingGenerator`, which encodes the conversation in the chat template (`encode_prompt`: the
oldest turns dropped until it fits), caps a request's reply length at the server's, and, with
--pair-candidates K, shows the two of K drafts that differ most (`_choose_pair`,
chatbot/pair_choice.py). The chat template's other edges live here too: a reply's text from its
tokens, a person's rewrite as tokens (`reply_token_ids`, for the learner), the end-of-turn
token.

Left out: any torch work; sampling itself is the engines'.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from chatbot.config import Config
from chatbot.errors import InvalidInput
from chatbot.pair_choice import most_different

T = TypeVar("T")


@dataclass
class Reply:
    text: str
    token_ids: list[int]
    token_logprobs: list[float]
    finish_reason: str  # "stop" (end-of-turn token) or "length" (hit max_new_tokens)
    # the temperature it was drawn at; None: its pair's (--explore-temperature draws one
    # reply of a pair at another)
    temperature: float | None = None

    @property
    def behaviour_logprob(self) -> float:
        return float(sum(self.token_logprobs))


@dataclass
class SampledPair:
    prompt_token_ids: list[int]
    replies: tuple[Reply, ...]  # two (A, B); one when sampled with n=1
    adapter_version: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seconds: float
    first_token_seconds: float | None
    # how many replies were sampled to choose these from (--pair-candidates); None: no choice
    candidates: int | None = None


@dataclass
class PairStream:
    """Iterate for (text_a, text_b) as they grow (one text with n=1); `result` is set once
    iteration ends."""

    _chunks: Iterator[tuple[str, ...]]
    cancel: threading.Event = field(default_factory=threading.Event)
    result: SampledPair | None = None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return self._chunks


class Generator(Protocol):
    """What the service asks of a generation engine: PairGenerator here (transformers, in this
    process) or chatbot.vllm_engine.VllmGenerator (a vLLM server)."""

    def stream(self, messages: list[dict], n: int = 2,
               max_new_tokens: int | None = None) -> PairStream: ...

    def sample_many(self, conversations: list[list[dict]], n: int = 2, base: bool = False
                    ) -> list[SampledPair]: ...

    def token_texts(self, token_ids: list[int]) -> list[str]: ...

    def in_sampling_thread(self, work: Callable[[], T]) -> T: ...

    def close(self) -> None: ...


def encode_prompt(tokenizer, messages: list[dict], max_prompt_tokens: int) -> list[int]:
    """The conversation in the chat template, ready for the reply; the oldest turns are
    dropped until it fits in `max_prompt_tokens` (InvalidInput if the last message alone
    does not). Shared by both engines, so a pair's stored prompt is the same either way."""
    start = 0
    while True:
        ids = tokenizer.apply_chat_template(
            messages[start:], add_generation_prompt=True, tokenize=True, return_dict=False)
        if len(ids) <= max_prompt_tokens:
            return list(ids)
        if start >= len(messages) - 1:
            raise InvalidInput(f"the message is too long for the model: {len(ids)} tokens, "
                               f"at most {max_prompt_tokens}")
        start += 2 if len(messages) - start > 2 else 1  # drop a user+assistant turn


def decode_reply(tokenizer, token_ids: list[int]) -> str:
    """A reply's text: its tokens without the special ones (the end-of-turn token).

    A NUL character becomes U+FFFD: byte-level vocabularies have a token for the byte 0
    (SmolLM2's 190), PostgreSQL's text columns refuse NUL, and a pair whose reply sampled it
    would be lost with an error instead of stored. The token ids keep the token itself.
    """
    return tokenizer.decode(token_ids, skip_special_tokens=True).replace("\0", "\ufffd").strip()


def end_of_turn_id(model, tokenizer) -> int:
    """The token a finished reply ends with: the first of the generation config's end ids."""
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    return tokenizer.eos_token_id if eos is None else eos


def reply_token_ids(tokenizer, end_id: int, text: str) -> list[int]:
    """A reply written by a person (a correction) as the model would have sampled it under
    the chat template: its text's tokens, then the end-of-turn token (it is finished).
    The inverse of `decode_reply` for a reply that stopped on its own."""
    return list(tokenizer.encode(text.strip(), add_special_tokens=False)) + [end_id]


def token_texts(tokenizer, token_ids: list[int]) -> list[str]:
    """Each token's own text (special tokens give "")."""
    return [tokenizer.decode([t], skip_special_tokens=True) for t in token_ids]


class StreamingGenerator:
    """What both engines share: the prompt encoding, the per-request cap, and a whole pair
    from the stream. A subclass has `tokenizer` and `config` and implements `_run(prompt,
    stream, n, max_new_tokens)`, an iterator of partial texts that sets `stream.result`."""

    tokenizer: Any
    config: Config

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Encode the conversation with the chat template, dropping the oldest turns to fit."""
        return encode_prompt(self.tokenizer, messages, self.config.max_prompt_tokens)

    def stream(self, messages: list[dict], n: int = 2,
               max_new_tokens: int | None = None) -> PairStream:
        """Start sampling `n` replies (2: a pair; 1: a single reply) of at most
        `max_new_tokens` (capped at the server's limit); iterate the stream for partial texts.

        A pair with --pair-candidates K > 2 samples K replies and shows the two that differ
        most (chatbot/pair_choice.py): nothing streams until all K are done."""
        assert n in (1, 2)
        limit = min(max_new_tokens or self.config.max_new_tokens, self.config.max_new_tokens)
        prompt = self.prompt_ids(messages)
        stream = PairStream(iter(()))
        candidates = self.config.pair_candidates if n == 2 else n
        chunks = self._run(prompt, stream, max(n, candidates), limit)
        stream._chunks = chunks if candidates <= n else _choose_pair(chunks, stream)
        return stream

    def token_texts(self, token_ids: list[int]) -> list[str]:
        """Each token's own text (special tokens give ""), for per-token log-probabilities."""
        return token_texts(self.tokenizer, token_ids)

    def sample(self, messages: list[dict]) -> SampledPair:
        stream = self.stream(messages)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    def in_sampling_thread(self, work: Callable[[], T]) -> T:
        """work(), which samples, run where this engine's sampling belongs; here the caller's
        thread (an engine whose sampling is a request to another process runs no torch)."""
        return work()

    def close(self) -> None:
        """Let go of what the engine holds for sampling, at the server's end (nothing here)."""

    def _run(self, prompt: list[int], stream: PairStream, n: int,
             max_new_tokens: int) -> Iterator[tuple[str, str]]:
        raise NotImplementedError


def _choose_pair(chunks: Iterator[tuple[str, ...]], stream: PairStream
                 ) -> Iterator[tuple[str, str]]:
    """Draft every candidate, then yield the two that differ most; `stream.result` keeps only
    those two, and says how many they were chosen from. While the candidates grow it yields
    empty texts, one per step: nothing to show yet, but a consumer that leaves (a closed page,
    an API client gone) stops the drafting there. The pair was first shown when the
    candidates were done: that is its first-token time."""
    try:
        for _ in chunks:
            yield ("", "")
    finally:  # also when the consumer stops early: the drafting stops with it
        chunks.close()
    drafted = stream.result
    assert drafted is not None
    i, j = most_different([reply.text for reply in drafted.replies])
    stream.result = replace(
        drafted, replies=(drafted.replies[i], drafted.replies[j]),
        first_token_seconds=drafted.seconds, candidates=len(drafted.replies))
    yield tuple(reply.text for reply in stream.result.replies)
