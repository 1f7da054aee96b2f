"""A streamed reply's decode steps on a GPU, replayed as CUDA graphs over a static KV cache.

On a GPU the embedded 135M model's decode step is bound by the host, not the device:
transformers' `generate` launches hundreds of small kernels a token from Python, and a token
took 45-48 ms on an H200 (4-bit NF4, bench/results/gpu-logs/gpu-h200.log) where reading the
weights takes well under a millisecond. A CUDA graph records one step's kernels once and
replays them with one launch. Every tensor the step touches must then stay at one address:
the KV cache is transformers' `StaticCache`, sized once per batch for the server's longest
prompt plus its longest reply, and the step's inputs (the new tokens, their positions and the
attention mask over the cache) are tensors the loop writes in place before each replay.

`StaticDecoder.decode` is what `PairGenerator` runs instead of `generate` for a streamed
reply or pair when `--cuda-graphs auto` finds a GPU: the prompt's prefill runs eagerly, then
one replay per token. Sampling runs outside the graph with `generate`'s rule
(chatbot/warp.py), and the raw logits of every step are kept, as
`generate(output_logits=True)` keeps them, for the stored log-probs.

A graph belongs to a batch size and a model state: which parameter tensors the model holds
(addresses and shapes), which adapters are switched on and their LoRA scalings
(`model_state`). A hot swap that copies a version into the resident LoRA slot keeps the
graph, which reads the slot's memory; a swap that rebuilds the slot, or the base model's
replies with the adapter switched off, meet another state and capture another graph (the
first pair of a state pays ~1 s for it). At most `MAX_GRAPHS` are
kept. One decode runs at a time per model, which keeps a capture free of its own model's
other work; a capture that fails anyway (another thread's work on the GPU can break one)
decodes eagerly, logs why once, and is not tried again for that state.

Off the GPU (`capture=False`: the tests on a CPU) the same loop runs the step eagerly, so the
static cache, the masks and the sampling rule are tested where CI runs.

Left out: batches of different prompts (`sample_many` keeps `generate`), the prefill in a
graph, sampling inside the graph, the rest of a model's generation config (a repetition
penalty, say: `for_generator` refuses a model whose config sets one, as the server passes
only temperature and top-p), and CPUs, where an own loop was not worth it against
`generate`: 1.00x (one reply) and 0.94x (pair) with a growing cache, 0.94x and 0.89x with a
static one sized to the reply, and 1.25x slower sized for the longest prompt and reply as
here (docs/performance.md).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import StaticCache

from chatbot.warp import Temperature, sample_tokens

log = logging.getLogger(__name__)

MAX_GRAPHS = 4  # captured (batch size, model state) pairs kept; the oldest goes first
WARM_UP_STEPS = 2  # eager steps on a side stream before a capture, as torch asks


@dataclass
class Decoded:
    """What `generate(return_dict_in_generate=True, output_logits=True)` returns, as far as
    PairGenerator reads it."""
    sequences: torch.Tensor  # (n, prompt + T): the prompt, then each row's tokens
    logits: tuple[torch.Tensor, ...]  # T float32 tensors (n, vocabulary), raw


def model_state(model: torch.nn.Module) -> tuple[tuple, tuple]:
    """What a captured step depends on beyond its inputs: the addresses and shapes of the
    model's parameters (a rebuilt LoRA slot has new ones, though the allocator may hand it
    an earlier slot's addresses; a version copied into the slot keeps them), and, per LoRA
    layer, which adapters are switched on and their scalings (a float the graph bakes in)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    switches = tuple((m.disable_adapters, tuple(m.active_adapters),
                      tuple(sorted(getattr(m, "scaling", {}).items())))
                     for m in model.modules() if isinstance(m, BaseTunerLayer))
    return tuple((p.data_ptr(), tuple(p.shape)) for p in model.parameters()), switches


class _Buffers:
    """One batch size's static tensors: the KV cache and a decode step's inputs."""

    def __init__(self, model: torch.nn.Module, n: int, max_len: int,
                 device: torch.device) -> None:
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.tokens = torch.zeros(n, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, 1, dtype=torch.long, device=device)
        self.mask = torch.zeros(n, 1, 1, max_len, dtype=torch.bool, device=device)

    def step(self, model: torch.nn.Module) -> torch.Tensor:
        """One decode step on the static inputs: the logits (n, 1, V)."""
        return model(input_ids=self.tokens, position_ids=self.positions,
                     attention_mask=self.mask, past_key_values=self.cache,
                     use_cache=True).logits


class StaticDecoder:
    """Decodes a prompt into n sampled rows over a static cache, replaying a CUDA graph per
    step where `capture` (on a GPU), else running the same step eagerly."""

    def __init__(self, model: torch.nn.Module, device: torch.device, max_len: int,
                 capture: bool) -> None:
        if capture and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.model = model
        self.device = device
        self.max_len = max_len
        self.capture = capture
        self._buffers: dict[int, _Buffers] = {}
        self._graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = \
            OrderedDict()
        self._lock = threading.Lock()
        self._eager: set[tuple] = set()  # states whose capture failed: decoded eagerly

    def decode(self, prompt: list[int], n: int, max_new_tokens: int, *, temperature: Temperature,
               top_p: float, stop_ids: set[int], pad_id: int,
               on_step: Callable[[list[int]], None] | None = None,
               cancel: threading.Event | None = None) -> Decoded:
        """Sample n rows of at most `max_new_tokens` after `prompt` (at one temperature, or a
        row's own: chatbot/warp.py). A row ends at its first
        stop id, and is padded with `pad_id` while others go on; the decode ends when every
        row has ended, at `cancel`, or at the limit. `on_step` gets each step's tokens."""
        length = len(prompt)
        if length > self.max_len:
            raise ValueError(f"a prompt of {length} tokens does not fit a static cache of "
                             f"{self.max_len}")
        # the last token is sampled, never written to the cache
        steps = min(max_new_tokens, self.max_len - length + 1)
        with self._lock, torch.inference_mode():
            if n not in self._buffers:
                self._buffers[n] = _Buffers(self.model, n, self.max_len, self.device)
            buffers = self._buffers[n]
            step = self._step(buffers, n)
            buffers.cache.reset()
            buffers.mask.zero_()
            buffers.mask[..., :length] = True
            logits = self._prefill(buffers, prompt, n)
            done = [False] * n
            rows, kept = [], []
            for t in range(steps):
                kept.append(logits.to(torch.float32, copy=True))  # a replay overwrites
                token = sample_tokens(kept[-1], temperature, top_p)
                if any(done):
                    token = token.masked_fill(torch.tensor(done, device=self.device), pad_id)
                rows.append(token)
                step_tokens = token.tolist()  # the step's one wait for the GPU
                if on_step:
                    on_step(step_tokens)
                done = [d or token_id in stop_ids for d, token_id in zip(done, step_tokens)]
                if t == steps - 1 or all(done) or (cancel and cancel.is_set()):
                    break
                buffers.tokens.copy_(token[:, None])
                buffers.positions.fill_(length + t)
                buffers.mask[..., length + t] = True
                logits = step()[:, -1]
        head = torch.tensor(prompt, device=self.device).expand(n, -1)
        return Decoded(sequences=torch.cat([head, torch.stack(rows, dim=1)], dim=1),
                       logits=tuple(kept))

    def _prefill(self, buffers: _Buffers, prompt: list[int], n: int) -> torch.Tensor:
        """The prompt into the cache, eagerly: the logits of its last position (n, V)."""
        length = len(prompt)
        ids = torch.tensor([prompt], device=self.device).expand(n, -1)
        causal = torch.ones(length, length, dtype=torch.bool, device=self.device).tril()
        mask = torch.zeros(n, 1, length, self.max_len, dtype=torch.bool, device=self.device)
        mask[..., :length] = causal
        out = self.model(input_ids=ids, position_ids=torch.arange(length, device=self.device)[
            None], attention_mask=mask, past_key_values=buffers.cache, use_cache=True,
            logits_to_keep=1)
        return out.logits[:, -1]

    def _step(self, buffers: _Buffers, n: int) -> Callable[[], torch.Tensor]:
        """The decode step for this batch and the model's state: a graph's replay, captured
        now if it is new, or the eager step."""
        if not self.capture:
            return lambda: buffers.step(self.model)
        key = (n, model_state(self.model))
        if key in self._eager:
            return lambda: buffers.step(self.model)
        if key not in self._graphs:
            try:
                self._graphs[key] = self._captured(buffers)
            except RuntimeError as exc:
                log.warning("no CUDA graph for a batch of %d (%s): this model state decodes "
                            "eagerly", n, exc)
                self._eager.add(key)
                return lambda: buffers.step(self.model)
            while len(self._graphs) > MAX_GRAPHS:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        graph, logits = self._graphs[key]

        def replay() -> torch.Tensor:
            graph.replay()
            return logits

        return replay

    def _captured(self, buffers: _Buffers) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Record one decode step on the buffers (the cache is reset before the pair's own
        prefill). The warm-up steps run first, on a side stream, as torch asks: they also
        allocate the cache, which must exist before the capture; they write from the cache's
        start, wherever the last pair left it."""
        buffers.cache.reset()
        buffers.mask.zero_()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARM_UP_STEPS):
                buffers.step(self.model)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            logits = buffers.step(self.model)
        return graph, logits


def for_generator(model: torch.nn.Module, device: torch.device, setting: str,
                  max_len: int) -> StaticDecoder | None:
    """The decoder `--cuda-graphs` asks for: on a CUDA device unless off; else none. A model
    whose generation config asks for more than temperature and top-p (which `generate` would
    apply and this loop does not) keeps `generate`, and the log says why."""
    if setting == "off" or device.type != "cuda":
        return None
    extra = unsupported_generation_settings(model.generation_config)
    if extra:
        log.warning("decoding through generate, not CUDA graphs: the model's generation "
                    "config sets %s", ", ".join(extra))
        return None
    return StaticDecoder(model, device, max_len, capture=True)


# generation-config settings that change which token is drawn, and their neutral values
_NEUTRAL = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_repetition_penalty":
            1.0, "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
            "sequence_bias": None, "min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0,
            "eta_cutoff": 0.0, "forced_bos_token_id": None, "forced_eos_token_id": None}


def unsupported_generation_settings(generation_config) -> list[str]:
    """The settings of a generation config that `generate` would apply and this loop
    does not (it applies the server's temperature and top-p only)."""
    return [name for name, neutral in _NEUTRAL.items()
            if getattr(generation_config, name, neutral) not in (neutral, None)]
