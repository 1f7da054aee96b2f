"""Paired sampling: two replies to one prompt from one batched `generate` call, streamed.

The prompt is encoded once and expanded to a batch of two (`num_return_sequences=2`), so the
pair costs about one reply's time on a GPU, and much less than two on a CPU. A streamer
receives both rows' new tokens at each step and hands the partial texts to the caller.

`stream(messages, n=1)` samples a single reply the same way (the OpenAI-compatible API's
`n=1`), and `max_new_tokens` may lower the server's limit for one request, never raise it.
With `--pair-candidates K` a pair is a batch of K, of which two are shown; with
`--explore-temperature X` one row of the pair, on a random side, is drawn at X
(chatbot/warp.py). What a reply and a pair are, the prompt's encoding and the stream's shape
are shared with the vLLM engine (chatbot/replies.py).

For every reply we keep its token ids (up to and including the end-of-turn token, which the
learner must see to learn when to stop) and each token's log-probability under the model's
own distribution at temperature 1 - log pi(w_t | w_<t, s) of the adapter that generated it.
That is the behaviour log-prob of the design: a fresh forward pass of the same adapter over
prompt + reply gives the same numbers. The sampling settings (temperature, top-p) are stored
beside it, so the distribution the tokens were actually drawn from can be recomputed.

Threads. A streamed pair's torch work - `generate` and the log-probs of its replies - all runs
in the pair's own sampler thread (a short-lived one on a CPU; on a GPU one long-lived thread,
below); the reader only turns token ids into text.
libgomp (torch's OpenMP on Linux) lets a team's idle workers spin between parallel regions
only while the process holds no more OpenMP threads than CPUs; past that they sleep almost at
once, and each of a decode step's hundreds of small parallel regions waits for a wake-up. A
thread that ran one parallel torch op keeps its idle team until it exits: when the reader
computed the log-probs itself, its thread kept one, and every later pair decoded with
sleeping workers, about 1.4x the first pair's time on 2 quiet cores; the same held for the
thread that loaded the model (1.7x: chatbot/model.py `load_model`). The spinning has its
price where other processes of the same or a higher priority keep the cores busy: a spinning
worker then holds a core its partner needs, and on this project's shared 2-core machine a
pair took 10x longer or more; `OMP_WAIT_POLICY=PASSIVE` in the environment makes the workers
sleep at once, for such hosts. A lower priority does not keep a process out of this: beside
the niced learner child in a round a team of two took 1.82x its idle time per step. So the
server gives its generator a `CpuShare` (chatbot/threads.py `host_share`): each pair starts on
every core while the rest of the host is quiet and on one thread while another process - its
learner in a round included - keeps the CPU busy, and follows a change within half a second,
at a decode step. `sample_many` runs in the caller's thread: the learner and the
benchmarks call it from the thread that does their other torch work, with the caller's threads.
On a GPU the opposite holds: every new thread that runs the model there kept host memory after
it ended (on an H200, 1.75 MB a pair through CUDA graphs and 11 MB through `generate`, while
the same decode in one thread stayed flat: bench/results/gpu-logs/), so there a generator
samples its streamed pairs in one long-lived thread, one pair after another (through CUDA
graphs or, with --cuda-graphs off, through `generate`).

Left out: batching the turns of different users together, speculative decoding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from chatbot import graph_decode, heap
from chatbot.config import Config
from chatbot.model import LoadedModel
from chatbot.replies import (
    PairStream,
    Reply,
    SampledPair,
    StreamingGenerator,
    decode_reply,
)
from chatbot.threads import CpuShare, in_fresh_thread
from chatbot.warp import as_rows, row_temperatures, sampling_kwargs

T = TypeVar("T")


class _PairStreamer(BaseStreamer):
    """Receives the new token of each row at every generation step."""

    def __init__(self) -> None:
        self.steps: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first passes the prompt itself
            self._prompt_seen = True
            return
        self.steps.put(value.view(-1).tolist())

    def end(self) -> None:
        self.steps.put(None)


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool,
                          device=input_ids.device)


class _FollowShare(StoppingCriteria):
    """Stops nothing: at each decode step, sets this thread's torch threads to the share's."""

    def __init__(self, share: CpuShare) -> None:
        self.share = share

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.share.apply()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _null_adapter() -> contextlib.AbstractContextManager[int]:
    return contextlib.nullcontext(0)


class PairGenerator(StreamingGenerator):
    """Samples pairs of replies from a loaded model.

    `adapter_context` is entered around each generate call and yields the adapter version in
    use; the hot-swap module passes one that also keeps that version in place until the
    pair is complete. Without one, every pair is from the base model (version 0).
    `base_context` is entered instead where the base model's own replies are asked for
    (`base=True`): it switches the adapter off meanwhile and yields 0. It may be left out only
    with `adapter_context`: a model that never carries an adapter is the base model.
    `cpu_share`, if given, sets the torch threads of each streamed pair, at its start and at
    each decode step (see "Threads" above); without one, pairs use the process's threads.
    On a GPU, streamed pairs decode through CUDA graph replays (chatbot/graph_decode.py,
    `--cuda-graphs`); `sample_many` keeps `generate`.
    """

    def __init__(self, loaded: LoadedModel, config: Config,
                 adapter_context: Callable[[], contextlib.AbstractContextManager[int]]
                 = _null_adapter,
                 base_context: Callable[[], contextlib.AbstractContextManager[int]] | None
                 = None, cpu_share: CpuShare | None = None) -> None:
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.config = config
        self.adapter_context = adapter_context
        self.base_context = base_context or (
            _null_adapter if adapter_context is _null_adapter else None)
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos])
        self.stop_ids.discard(None)
        self.cpu_share = cpu_share
        self.sampler = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="pair-sampler")
                        if self.device.type == "cuda" else None)
        self.decoder = graph_decode.for_generator(
            self.model, self.device, config.cuda_graphs,
            config.max_prompt_tokens + config.max_new_tokens)
        self._sides = random.Random(config.seed)  # which reply explores (--explore-temperature)

    def sample_many(self, conversations: list[list[dict]], n: int = 2, base: bool = False
                    ) -> list[SampledPair]:
        """Pairs (n=2) or single replies (n=1) for several conversations from one batched
        `generate` call, not streamed; `base=True` samples the base model, adapter off.

        Rows are padded on the left; each reply is cut at its first end-of-turn token. For
        benchmarks and offline sampling, where many prompts are known at once.
        """
        return self.sample_prompts([self.prompt_ids(messages) for messages in conversations],
                                   n=n, base=base)

    def sample_prompts(self, prompts: list[list[int]], n: int = 2, base: bool = False
                       ) -> list[SampledPair]:
        """`sample_many` for prompts already encoded with the chat template."""
        width = max(map(len, prompts))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts],
                                 device=self.device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                                      device=self.device)
        started = time.perf_counter()
        context = self.base_context if base else self.adapter_context
        if context is None:
            raise ValueError("base replies asked for, but this generator has no base_context")
        with context() as version, torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask,
                max_new_tokens=self.config.max_new_tokens, num_return_sequences=n,
                output_logits=True, return_dict_in_generate=True, pad_token_id=pad,
                **sampling_kwargs(self.config))
        seconds = time.perf_counter() - started
        new_tokens = output.sequences[:, width:]  # (nP, T): rows n*i ... n*i + n-1 answer i
        logits = torch.stack(output.logits, dim=1).float()  # (nP, T, V)
        pairs = []
        for i, prompt in enumerate(prompts):
            rows = slice(n * i, n * i + n)
            replies = self._cut(new_tokens[rows], logits[rows])
            pairs.append(SampledPair(
                prompt_token_ids=prompt, replies=replies, adapter_version=version,
                temperature=self.config.temperature, top_p=self.config.top_p,
                max_new_tokens=self.config.max_new_tokens, seconds=seconds,
                first_token_seconds=None))
        return pairs

    def _run(self, prompt: list[int], stream: PairStream, n: int,
             max_new_tokens: int) -> Iterator[tuple[str, ...]]:
        streamer = _PairStreamer()
        outcome: dict = {}
        started = time.perf_counter()
        temperatures = (row_temperatures(self.config, self._sides.random() < 0.5) if n == 2
                        else (self.config.temperature,) * n)

        def work() -> None:
            try:
                if self.cpu_share:
                    self.cpu_share.apply()
                with self.adapter_context() as version, torch.inference_mode():
                    outcome["version"] = version
                    output = self._generate(prompt, streamer, stream.cancel, n, max_new_tokens,
                                            as_rows(temperatures, self.device))
                # Here, not in the consumer's thread: see "Threads" in the module docstring.
                outcome["replies"] = tuple(
                    dataclasses.replace(reply, temperature=t)
                    for reply, t in zip(self._replies(prompt, output), temperatures))
            except BaseException as exc:  # re-raised in the consuming thread
                outcome["error"] = exc
                streamer.end()

        wait = self._start(work)
        tokens: list[list[int]] = [[] for _ in range(n)]
        done = [False] * n
        first_token = None
        try:
            while (step := streamer.steps.get()) is not None:
                first_token = first_token or time.perf_counter() - started
                for row, token in enumerate(step):
                    if not done[row]:
                        tokens[row].append(token)
                        done[row] = token in self.stop_ids
                yield tuple(self._decode(row) for row in tokens)
        finally:  # also reached when the consumer stops early: end generation with it
            stream.cancel.set()
            wait()
            heap.release()  # the pair's tensors are gone: their pages go back (chatbot/heap.py)
        if "error" in outcome:
            raise outcome["error"]
        stream.result = SampledPair(
            prompt_token_ids=prompt, replies=outcome["replies"],
            adapter_version=outcome["version"],
            temperature=self.config.temperature, top_p=self.config.top_p,
            max_new_tokens=max_new_tokens,
            seconds=time.perf_counter() - started, first_token_seconds=first_token)

    def _start(self, work: Callable[[], None]) -> Callable[[], Any]:
        """Start `work` in the thread this generator's torch work belongs in (see "Threads"):
        on a GPU its one long-lived sampler thread, on a CPU a new one. Returns the wait for
        its end."""
        if self.sampler is not None:
            return self.sampler.submit(work).result
        worker = threading.Thread(target=work, name="pair-sampler", daemon=True)
        worker.start()
        return worker.join

    def in_sampling_thread(self, work: Callable[[], T]) -> T:
        """work() in the thread `_start` picks, for a caller whose own thread must stay free
        of torch work (the server's request threads: see "Threads"); its exception is raised
        here."""
        if self.sampler is not None:
            return self.sampler.submit(work).result()
        return in_fresh_thread(work, name="pair-sampler")

    def close(self) -> None:
        """Drop the pairs still queued for the GPU's sampler thread and let it end (the pair
        it is sampling runs to its end); a CPU generator has nothing to close."""
        if self.sampler is not None:
            self.sampler.shutdown(wait=False, cancel_futures=True)

    def _generate(self, prompt: list[int], streamer: _PairStreamer, cancel: threading.Event,
                  n: int, max_new_tokens: int, temperature):
        """`n` rows after `prompt`, each at its temperature (`warp`'s: one, or (n, 1))."""
        if self.decoder is not None:  # a GPU: CUDA graph replays (chatbot/graph_decode.py)
            output = self.decoder.decode(
                prompt, n, max_new_tokens, temperature=temperature,
                top_p=self.config.top_p, stop_ids=self.stop_ids,
                pad_id=self.tokenizer.pad_token_id, on_step=streamer.steps.put, cancel=cancel)
            streamer.end()
            return output
        input_ids = torch.tensor([prompt], device=self.device)
        criteria = StoppingCriteriaList([_Cancelled(cancel)])
        if self.cpu_share:
            criteria.append(_FollowShare(self.cpu_share))
        return self.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens, num_return_sequences=n,
            streamer=streamer, stopping_criteria=criteria,
            output_logits=True, return_dict_in_generate=True,
            pad_token_id=self.tokenizer.pad_token_id,
            **sampling_kwargs(self.config, temperature))

    def _replies(self, prompt: list[int], output) -> tuple[Reply, ...]:
        new_tokens = output.sequences[:, len(prompt):]  # (n, T)
        logits = torch.stack(output.logits, dim=1).float()  # (n, T, V), raw: temperature 1
        return self._cut(new_tokens, logits)

    def _cut(self, new_tokens: torch.Tensor, logits: torch.Tensor) -> tuple[Reply, ...]:
        """The replies from their rows of new tokens (n, T) and raw logits (n, T, V)."""
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new_tokens[..., None])[..., 0]
        replies = []
        for row in range(new_tokens.shape[0]):
            ids = new_tokens[row].tolist()
            end = next((i + 1 for i, t in enumerate(ids) if t in self.stop_ids), None)
            finish = "stop" if end is not None else "length"
            ids = ids[:end] if end is not None else ids
            replies.append(Reply(text=self._decode(ids), token_ids=ids,
                                 token_logprobs=logprobs[row, :len(ids)].tolist(),
                                 finish_reason=finish))
        return tuple(replies)

    def _decode(self, ids: list[int]) -> str:
        return decode_reply(self.tokenizer, ids)
