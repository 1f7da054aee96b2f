"""Generation in llama.cpp (`--engine llama-cpp`): PairGenerator's interface on llama.cpp's C
library, through llama-cpp-python's low-level bindings, on the embedded GGUF itself, with the
live adapter version converted to llama.cpp's LoRA format at each swap.

On a CPU llama.cpp decodes the embedded model about 3x faster than the transformers engine's
4-bit layers (docs/performance.md): its matrix-vector kernels read the GGUF's own Q4_1 blocks
at close to the memory's speed, where eager PyTorch pays per op. What stays Duet's:

* The prompt: Duet's chat template and truncation (`replies.encode_prompt`), as token ids; the
  GGUF's vocabulary is the tokenizer's.
* The draw: each step's raw logits come back from llama.cpp and `chatbot.warp.draw_tokens`
  draws the token from them (the server's temperature, a row's own under
  --explore-temperature, then top-p), the rule of every engine in this process. Behaviour
  log-probs are the raw logits' log-softmax at the drawn token: log pi(w_t | w_<t, s) at
  temperature 1 under what served the pair (llama.cpp's kernels on its weights, with
  the adapter), as the store wants.
* The pair: the prompt is decoded once as sequence 0, its cache copied to the other rows
  (`llama_memory_seq_cp`), and every step decodes one token of each unfinished row in one
  batch.
* The live adapter: `LlamaCppLiveAdapter` follows the registry and verifies each version as
  LiveAdapter does, writes it as a llama.cpp LoRA GGUF (chatbot/gguf_lora.py) to a temporary
  file, loads it (`llama_adapter_lora_init`) and, between pairs, sets it on the context in
  place of the old one, which is freed. Version 0 is the context without adapters.

One context serves one pair at a time: a second pair waits for the first (on two cores they
would share the cores anyway), and every pair of every engine in the process is decoded in one
thread (`decode_thread`), so llama.cpp's OpenMP team is the process's only one. Its threads
follow the host as the transformers engine's do (every core while the host is quiet, one while
another process keeps it busy; `--threads N` fixes them). The weights are the GGUF's own 4-bit
blocks, or, under --quantize none, the same weights unquantized in --dtype
(chatbot/gguf_weights.py), which llama.cpp computes in float32 or bf16 as the learner does.
Left out: models other than the embedded GGUF (a Hugging Face folder would need converting
first), GPUs (the GPU path is the transformers engine's CUDA graphs, or vLLM), and llama.cpp's
own samplers.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import logging
import os
import queue
import random
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from chatbot.config import Config
from chatbot.errors import AdapterError, EngineError, ModelLoadError
from chatbot.gguf_lora import write_gguf_lora
from chatbot.hotswap import LiveAdapter
from chatbot.replies import PairStream, Reply, SampledPair, StreamingGenerator, decode_reply
from chatbot.sampling import row_temperatures
from chatbot.store import Store
from chatbot.threads import CpuShare, one_torch_thread
from chatbot.warp import draw_tokens

log = logging.getLogger(__name__)

MISSING = ("--engine llama-cpp needs llama-cpp-python: `make llama` compiles it for this CPU "
           "(about six minutes on two cores)")


def bindings():
    """llama-cpp-python's low-level module, or ModelLoadError saying how to install it."""
    try:
        from llama_cpp import llama_cpp as lib
    except (ImportError, OSError) as exc:  # not installed, or its library will not load
        raise ModelLoadError(f"{MISSING}: {exc}") from None
    return lib


_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}  # ggml_log_level: WARN, ERROR
_log_callback = None  # kept alive: llama.cpp holds the pointer


def _quiet(lib) -> None:
    """llama.cpp's own logging into this module's logger: errors and warnings only."""
    global _log_callback
    if _log_callback is None:
        def forward(level, text, _user):
            if level in _LOG_LEVELS:
                log.log(_LOG_LEVELS[level], "llama.cpp: %s", text.decode(errors="replace").strip())
        _log_callback = lib.llama_log_callback(forward)
        lib.llama_log_set(_log_callback, ctypes.c_void_p(0))


class LlamaCppModel:
    """The GGUF loaded in llama.cpp with one context of `rows` sequences, each up to
    `max_prompt + max_new` tokens. `lock` is held by whoever uses the context."""

    def __init__(self, gguf_path: Path, *, rows: int, max_prompt: int, max_new: int,
                 threads: int) -> None:
        self.lib = lib = bindings()
        _quiet(lib)
        lib.llama_backend_init()
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        params.use_mmap = True
        # No weights repacked into llama.cpp's "extra" buffers: on a CPU with AMX (Sapphire
        # Rapids) the GGUF's Q4_1 blocks went to its AMX buffer and the first decode crashed
        # the process in ggml_backend_amx_mul_mat (llama.cpp issue 20824, still open). The
        # other repacks are for block types this GGUF does not use.
        params.use_extra_bufts = False
        self.model = lib.llama_model_load_from_file(str(gguf_path).encode(), params)
        if not self.model:
            raise ModelLoadError(f"llama.cpp could not load {gguf_path}")
        self.vocab_size = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.heads = lib.llama_model_n_head(self.model)
        self.kv_heads = lib.llama_model_n_head_kv(self.model)
        self.rows = rows
        self.batch_size = min(512, max_prompt)
        ctx = lib.llama_context_default_params()
        ctx.n_ctx = max_prompt + rows * max_new
        ctx.n_batch = ctx.n_ubatch = max(self.batch_size, rows)
        ctx.n_seq_max = rows
        ctx.kv_unified = True  # the prompt's cells are shared by every row, not copied
        ctx.n_threads = ctx.n_threads_batch = threads
        ctx.no_perf = True
        self.context = lib.llama_init_from_model(self.model, ctx)
        if not self.context:
            raise ModelLoadError("llama.cpp could not create a context for the model")
        self.memory = lib.llama_get_memory(self.context)
        self.batch = lib.llama_batch_init(ctx.n_batch, 0, 1)
        self.lock = threading.Lock()
        self._adapter = None  # the LoRA set on the context (a pointer), None: the base model
        self.threads = threads

    def set_threads(self, threads: int) -> None:
        """Decode on `threads` threads from the next decode on; the caller holds `lock`."""
        if threads != self.threads:
            self.lib.llama_set_n_threads(self.context, threads, threads)
            self.threads = threads

    def load_adapter(self, path: Path):
        """A LoRA GGUF loaded for this model (not yet used); AdapterError if llama.cpp refuses
        it."""
        adapter = self.lib.llama_adapter_lora_init(self.model, str(path).encode())
        if not adapter:
            raise AdapterError("llama.cpp refused the adapter (its log says why)")
        return adapter

    def free_adapter(self, adapter) -> None:
        self.lib.llama_adapter_lora_free(adapter)

    def use(self, adapter) -> None:
        """Decode with `adapter` (None: the base model); the caller holds `lock`."""
        if adapter is self._adapter:
            return
        lib = self.lib
        if adapter is None:
            status = lib.llama_set_adapters_lora(self.context, None, 0, None)
        else:
            adapters = (lib.llama_adapter_lora_p_ctypes * 1)(adapter)
            scales = (ctypes.c_float * 1)(1.0)
            status = lib.llama_set_adapters_lora(self.context, adapters, 1, scales)
        if status != 0:
            raise EngineError("llama.cpp could not set the adapter on its context")
        self._adapter = adapter

    def decode(self, tokens: list[int], positions: list[int], rows: list[int],
               logits: list[bool]) -> None:
        """One llama_decode of these tokens (each at its position, in its row's sequence);
        the caller holds `lock`."""
        batch = self.batch
        batch.n_tokens = len(tokens)
        for i, (token, position, row, wanted) in enumerate(zip(tokens, positions, rows,
                                                               logits, strict=True)):
            batch.token[i] = token
            batch.pos[i] = position
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = row
            batch.logits[i] = wanted
        status = self.lib.llama_decode(self.context, batch)
        if status != 0:
            raise EngineError(f"llama.cpp could not decode the batch (status {status})")

    def logits(self, indices: list[int]) -> torch.Tensor:
        """The raw logits (len(indices), V) after the last decode's tokens at these places in
        its batch (-1: the last), each of which asked for them (a copy)."""
        rows = [np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.context, i),
                                      shape=(self.vocab_size,)) for i in indices]
        return torch.from_numpy(np.stack(rows))

    def prefill(self, prompt: list[int], rows: int) -> torch.Tensor:
        """Clear the context, decode the prompt as sequence 0, share its cache with rows 1..;
        returns the prompt's last logits (1, V)."""
        self.lib.llama_memory_clear(self.memory, True)
        for start in range(0, len(prompt), self.batch_size):
            chunk = prompt[start:start + self.batch_size]
            last = start + len(chunk) == len(prompt)
            self.decode(chunk, list(range(start, start + len(chunk))), [0] * len(chunk),
                        [last and i == len(chunk) - 1 for i in range(len(chunk))])
        for row in range(1, rows):
            self.lib.llama_memory_seq_cp(self.memory, 0, row, -1, -1)
        return self.logits([-1])

    def close(self) -> None:
        lib = self.lib
        lib.llama_batch_free(self.batch)
        lib.llama_free(self.context)
        lib.llama_model_free(self.model)


class LlamaCppLiveAdapter(LiveAdapter):
    """The live adapter version as a llama.cpp LoRA on the model's context (see the module
    docstring). Registry polling, verification and error reporting are LiveAdapter's."""

    def __init__(self, engine: LlamaCppModel, base_model: str, store: Store,
                 adapters_dir: Path) -> None:
        super().__init__(None, base_model, store, adapters_dir)
        self.engine = engine
        self._serving: tuple[int, object] = (0, None)  # (version, its llama.cpp adapter)

    def serving(self) -> tuple[int, object]:
        """(the live version, its llama.cpp adapter; None: the base model). Read it under the
        engine's lock: a swap changes it under the same lock."""
        return self._serving

    @contextlib.contextmanager
    def reading(self) -> Iterator[int]:
        yield self._serving[0]  # the generator holds the engine's lock for the whole pair

    @contextlib.contextmanager
    def base(self) -> Iterator[int]:
        yield 0

    def _load(self, row: dict | None) -> None:
        adapter, version = None, 0
        if row is not None:
            _, verified, state = self._verified(row)  # manifest hashes, shapes, finite
            with tempfile.TemporaryDirectory(prefix="duet-lora-") as tmp:
                path = write_gguf_lora(Path(tmp) / "adapter.gguf", verified.config, state,
                                       heads=self.engine.heads, kv_heads=self.engine.kv_heads)
                adapter = self.engine.load_adapter(path)
            version = row["version"]
        with self.engine.lock:  # between pairs
            started = time.perf_counter()
            try:
                self.engine.use(adapter)
            except EngineError as exc:  # the old version stays set and keeps serving
                if adapter is not None:
                    self.engine.free_adapter(adapter)
                raise AdapterError(str(exc)) from None
            old = self._serving[1]
            self._serving = (version, adapter)
            if old is not None:
                self.engine.free_adapter(old)
            self.version = version
            self.swaps += 1
            self.last_blocking_ms = 1000 * (time.perf_counter() - started)
        log.info("llama.cpp now serves adapter v%d, %.1f ms between pairs", version,
                 self.last_blocking_ms)


_DECODER: concurrent.futures.ThreadPoolExecutor | None = None
_DECODER_LOCK = threading.Lock()


def decode_thread() -> concurrent.futures.ThreadPoolExecutor:
    """The process's one thread that runs llama.cpp's decodes, for every engine in it.
    llama.cpp's threads are an OpenMP team that lives as long as the thread that started it;
    with two teams in a process libgomp finds more OpenMP threads than cores and makes every
    team sleep at each of ggml's barriers: a streamed pair with an adapter took 3x as long
    after one decoded in another thread, and six engines with a thread each (a benchmark)
    3-6x."""
    global _DECODER
    with _DECODER_LOCK:
        if _DECODER is None:
            _DECODER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llama")
        return _DECODER


class LlamaCppGenerator(StreamingGenerator):
    """PairGenerator's interface on llama.cpp (see the module docstring)."""

    def __init__(self, engine: LlamaCppModel, live: LlamaCppLiveAdapter, tokenizer,
                 config: Config, stop_ids: set[int], cpu_share: CpuShare | None = None
                 ) -> None:
        self.engine = engine
        self.cpu_share = cpu_share
        self.live = live
        self.tokenizer = tokenizer
        self.config = config
        self.stop_ids = set(stop_ids)
        self._sides = random.Random(config.seed)  # which reply explores (--explore-temperature)
        self._draws = torch.Generator().manual_seed(
            config.seed if config.seed is not None else random.SystemRandom().getrandbits(62))
        self._decoder = decode_thread()

    def sample_many(self, conversations: list[list[dict]], n: int = 2, base: bool = False
                    ) -> list[SampledPair]:
        """`n` replies to each conversation, one after another (not streamed); `base=True`
        samples the base model (no adapter)."""
        pairs = []
        for messages in conversations:
            prompt = self.prompt_ids(messages)
            started = time.perf_counter()
            version, replies = self._sample(prompt, n, self.config.max_new_tokens,
                                            (self.config.temperature,) * n, base=base)
            pairs.append(SampledPair(
                prompt_token_ids=prompt, replies=replies, adapter_version=version,
                temperature=self.config.temperature, top_p=self.config.top_p,
                max_new_tokens=self.config.max_new_tokens,
                seconds=time.perf_counter() - started, first_token_seconds=None))
        return pairs

    def _run(self, prompt: list[int], stream: PairStream, n: int,
             max_new_tokens: int) -> Iterator[tuple[str, ...]]:
        if n > self.engine.rows:
            raise EngineError(f"llama.cpp's context holds {self.engine.rows} rows, not {n}")
        temperatures = (row_temperatures(self.config, self._sides.random() < 0.5) if n == 2
                        else (self.config.temperature,) * n)
        steps: queue.SimpleQueue = queue.SimpleQueue()
        outcome: dict = {}
        started = time.perf_counter()

        def work() -> None:
            try:
                outcome["version"], outcome["replies"] = self._decode_replies(
                    prompt, n, max_new_tokens, temperatures, on_step=steps.put,
                    cancel=stream.cancel)
            except BaseException as exc:  # re-raised in the consuming thread
                outcome["error"] = exc
            finally:
                steps.put(None)

        worker = self._decoder.submit(work)
        first_token = None
        try:
            while (tokens := steps.get()) is not None:
                first_token = first_token or time.perf_counter() - started
                yield tuple(decode_reply(self.tokenizer, row) for row in tokens)
        finally:  # also reached when the consumer stops early: end the sampling with it
            stream.cancel.set()
            worker.result()  # `work` keeps its own errors
        if "error" in outcome:
            raise outcome["error"]
        stream.result = SampledPair(
            prompt_token_ids=prompt, replies=outcome["replies"],
            adapter_version=outcome["version"], temperature=self.config.temperature,
            top_p=self.config.top_p, max_new_tokens=max_new_tokens,
            seconds=time.perf_counter() - started, first_token_seconds=first_token)

    def _sample(self, prompt: list[int], n: int, max_new_tokens: int,
                temperatures: tuple[float, ...], *, base: bool = False
                ) -> tuple[int, tuple[Reply, ...]]:
        """`_decode_replies` in the process's decode thread (`decode_thread`), waited for."""
        return self._decoder.submit(self._decode_replies, prompt, n, max_new_tokens,
                                    temperatures, base=base).result()

    def _decode_replies(self, prompt: list[int], n: int, max_new_tokens: int,
                        temperatures: tuple[float, ...], *, base: bool = False, on_step=None,
                        cancel: threading.Event | None = None) -> tuple[int, tuple[Reply, ...]]:
        """(the adapter version, `n` replies to `prompt`), decoded in one batch a step, in the
        decode thread. `on_step(tokens)` gets every row's tokens so far after each step."""
        engine = self.engine
        rows_temperature = (torch.tensor(temperatures, dtype=torch.float32)[:, None]
                            if len(set(temperatures)) > 1 else temperatures[0])
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        # torch only draws here (a few rows of 49,152 logits): on one thread, or its OpenMP
        # workers spin beside llama.cpp's and beside a neighbour's
        with one_torch_thread(), engine.lock:
            version, adapter = (0, None) if base else self.live.serving()
            engine.use(adapter)
            if self.cpu_share:
                engine.set_threads(self.cpu_share.threads())
            logits = engine.prefill(prompt, n).expand(n, -1)
            alive = list(range(n))
            for step in range(max_new_tokens):
                row_t = (rows_temperature if not isinstance(rows_temperature, torch.Tensor)
                         else rows_temperature[alive])
                drawn = draw_tokens(logits, row_t, self.config.top_p, self._draws)
                raw = (logits.gather(-1, drawn[:, None])[:, 0]
                       - torch.logsumexp(logits, dim=-1))  # log-softmax at the drawn tokens
                for i, row in enumerate(alive):
                    tokens[row].append(int(drawn[i]))
                    logprobs[row].append(float(raw[i]))
                if on_step:
                    on_step([list(row) for row in tokens])
                alive = [row for row in alive if tokens[row][-1] not in self.stop_ids]
                if not alive or step == max_new_tokens - 1 or (cancel and cancel.is_set()):
                    break
                position = len(prompt) + step
                if self.cpu_share:  # looks at the host at most twice a second (CpuShare)
                    engine.set_threads(self.cpu_share.threads())
                engine.decode([tokens[row][-1] for row in alive], [position] * len(alive),
                              alive, [True] * len(alive))
                logits = engine.logits(list(range(len(alive))))
        replies = tuple(
            Reply(text=decode_reply(self.tokenizer, ids), token_ids=ids,
                  token_logprobs=values, temperature=t,
                  finish_reason="stop" if ids and ids[-1] in self.stop_ids else "length")
            for ids, values, t in zip(tokens, logprobs, temperatures, strict=True))
        return version, replies


def engine_gguf(config: Config) -> Path:
    """The GGUF llama.cpp loads: the embedded model's own file (its Q4_1 blocks) under
    --quantize auto or int4; under --quantize none the same weights unquantized in --dtype
    (chatbot/gguf_weights.py; auto: bfloat16 on a CPU with native bf16, float32 on others), so
    the log-probs are the learner's float32 model's. Other models are refused."""
    from chatbot.gguf_weights import unquantized_gguf
    from chatbot.model import EMBEDDED_GGUF, EMBEDDED_MODEL, embedded_gguf_dir, resolve_dtype

    if config.model != EMBEDDED_MODEL:
        raise ModelLoadError(f"--engine llama-cpp serves the embedded model only, not "
                             f"{config.model!r}: run it with --engine transformers")
    if config.quantize in ("4bit", "8bit"):
        raise ModelLoadError(f"--quantize {config.quantize} is bitsandbytes', for --engine "
                             "transformers; llama.cpp computes on the GGUF's own 4-bit blocks "
                             "(--quantize auto) or on its weights unquantized (--quantize none "
                             "with --dtype)")
    source = embedded_gguf_dir() / EMBEDDED_GGUF
    if config.quantize == "none":
        dtype = resolve_dtype(config.dtype, torch.device("cpu"))
        return unquantized_gguf(source, str(dtype).removeprefix("torch."),
                                Path(config.cache_dir))
    return source


def connect(config: Config, store: Store, cpu_share: CpuShare | None = None
            ) -> tuple[LlamaCppGenerator, LlamaCppLiveAdapter, str]:
    """The llama.cpp engine: (generator, live adapter, the model id adapter manifests
    record). The tokenizer comes from the model's converted checkpoint, as the learner's.
    `cpu_share`, if given, sets llama.cpp's threads at each pair and step, as it sets the
    transformers engine's (app.py's server_share: every core while the host is quiet, one
    while another process keeps it busy); without one, --threads or every core."""
    from chatbot.model import load_tokenizer
    from chatbot.vllm_engine import end_of_turn_ids

    gguf_path = engine_gguf(config)
    tokenizer, path, model_id = load_tokenizer(config)
    engine = LlamaCppModel(gguf_path, rows=max(2, config.pair_candidates),
                           max_prompt=config.max_prompt_tokens,
                           max_new=config.max_new_tokens,
                           threads=config.threads or os.cpu_count() or 1)
    live = LlamaCppLiveAdapter(engine, model_id, store, config.adapters_dir)
    generator = LlamaCppGenerator(engine, live, tokenizer, config,
                                  stop_ids=end_of_turn_ids(path, tokenizer), cpu_share=cpu_share)
    return generator, live, model_id
