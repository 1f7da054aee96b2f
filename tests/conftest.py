"""Shared fixtures: a tiny random Llama with the embedded model's real tokenizer (built once,
offline, in seconds), a fake pair generator for store/UI tests, and per-test configs.

With DUET_TEST_CPU_PATH=avx2 the session takes the code paths of a CPU without AVX-512 (see
force_the_avx2_paths; tests/test_cpu_paths.py runs the tests that depend on them so)."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import threading
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
CPU_PATH = os.environ.get("DUET_TEST_CPU_PATH", "")
if CPU_PATH == "avx2":  # torch, oneDNN and MKL read these at their first use, after this
    os.environ.update(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2",
                      MKL_ENABLE_INSTRUCTIONS="AVX2")

import pytest  # noqa: E402

from chatbot.config import Config  # noqa: E402
from chatbot.replies import PairStream, Reply, SampledPair  # noqa: E402
from tests.postgres import db_target, postgres_server, postgres_url  # noqa: E402, F401


class _BitsandbytesWithoutAvx512Bf16(importlib.abc.MetaPathFinder):
    """Imports bitsandbytes.functional with has_avx512bf16 answering False before the rest of
    bitsandbytes binds it: its CPU backend asks once, at import, whether to register its AVX-512
    BF16 4-bit kernel, so patching the imported modules would be too late for that."""

    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: False

        spec.loader.exec_module = exec_module
        return spec


def force_the_avx2_paths() -> None:
    """Take the code paths of a CPU without AVX-512 for the whole session: torch's AVX2
    kernels and no oneDNN bf16 (the environment set above), bitsandbytes without its AVX-512
    4-bit kernel and weight repacking, and --dtype auto in float32 (no native bf16 in torch's
    checks nor in /proc/cpuinfo's flags). Refuses to start if any of it did not apply."""
    import torch

    from chatbot import model

    if "bitsandbytes" in sys.modules:
        raise pytest.UsageError("DUET_TEST_CPU_PATH=avx2: bitsandbytes was imported before "
                                "tests/conftest.py could hide AVX-512 BF16 from it")
    finder = _BitsandbytesWithoutAvx512Bf16()
    sys.meta_path.insert(0, finder)
    try:
        import bitsandbytes.backends.cpu.ops as bnb_cpu_ops
        import bitsandbytes.functional as bnb_functional
        import bitsandbytes.nn.modules as bnb_modules
    finally:
        sys.meta_path.remove(finder)

    for name in ("_is_avx512_supported", "_is_avx512_bf16_supported", "_is_vnni_supported",
                 "_is_amx_tile_supported", "_is_amx_fp16_supported"):
        if hasattr(torch.cpu, name):
            setattr(torch.cpu, name, lambda: False)
    real_cpu_flags = model.cpu_flags

    def cpu_flags(cpuinfo: str | None = None) -> set[str]:
        flags = real_cpu_flags(cpuinfo)
        if cpuinfo is not None:  # a test's own text, not this CPU's
            return flags
        return {f for f in flags if not f.startswith(("avx512", "amx"))}

    model.cpu_flags = cpu_flags

    applied = {
        "torch dispatches to its AVX2 kernels": torch.backends.cpu.get_cpu_capability() == "AVX2",
        "oneDNN has no bf16": not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
        "bitsandbytes sees no AVX-512 BF16": all(
            m.has_avx512bf16() is False for m in (bnb_functional, bnb_modules, bnb_cpu_ops)),
        "bitsandbytes' CPU backend sees no AVX-512": bnb_cpu_ops._has_avx512 is False,
        "the project sees no native bf16": not model.cpu_has_native_bf16(),
    }
    missed = [what for what, ok in applied.items() if not ok]
    if missed:
        raise pytest.UsageError("DUET_TEST_CPU_PATH=avx2 did not take: not true that "
                                + "; ".join(missed))


def pytest_configure(config):
    if CPU_PATH == "avx2":
        force_the_avx2_paths()
    elif CPU_PATH:
        raise pytest.UsageError(f"DUET_TEST_CPU_PATH={CPU_PATH!r}: the one forced path is avx2")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, hidden-64 LlamaForCausalLM with SmolLM2's tokenizer and chat template.

    Every linear layer's width is a multiple of 64, the shapes bitsandbytes' CPU kernels take
    (its 4-bit path on AVX-512 BF16 CPUs repacks weights in blocks of 32 rows).
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from chatbot.model import EMBEDDED_GGUF, embedded_gguf_dir

    folder = tmp_path_factory.mktemp("tiny-llama")
    # DUET_TEST_TOKENIZER: a folder with SmolLM2's tokenizer saved in it, where the embedded
    # package is not installed (`bash bench/gpu.sh OUT SHAPE` on a GPU machine)
    if os.environ.get("DUET_TEST_TOKENIZER"):
        tokenizer = AutoTokenizer.from_pretrained(os.environ["DUET_TEST_TOKENIZER"])
    else:
        tokenizer = AutoTokenizer.from_pretrained(embedded_gguf_dir(), gguf_file=EMBEDDED_GGUF)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# float32, not --dtype auto: the tests that use these fixtures compute the same numbers on
# every CPU (auto is bfloat16 on CPUs with native bf16); test_model.py tests the bf16 path.
# The pair kernels off: `auto` picks them by timing, which would make these tests take one
# kernel or the other by chance; tests/test_pair_kernels.py runs them switched on.
@pytest.fixture
def tiny_config(tiny_model_dir, tmp_path) -> Config:
    """The tiny model's settings. Without the preview (a version per round's first step):
    tests count versions by rounds; tests/test_preview.py and the process tests take it on."""
    return Config(model=str(tiny_model_dir), data_dir=tmp_path / "data", max_new_tokens=8,
                  cache_dir=tmp_path / "cache", device="cpu", dtype="float32",
                  pair_kernels="off", preview=False)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    """The tiny model loaded once; tests must not leave adapters on it."""
    from chatbot.model import load_model

    return load_model(Config(model=str(tiny_model_dir), device="cpu", dtype="float32",
                             pair_kernels="off"))


class FakeGenerator:
    """Stands in for PairGenerator: instant, deterministic replies, no torch weights."""

    def __init__(self, replies: tuple[str, str] = ("reply A", "reply B"),
                 adapter_version: int = 0, finish_reason: str = "stop") -> None:
        self.replies = replies
        self.adapter_version = adapter_version
        self.finish_reason = finish_reason  # "length": every reply is cut at 8 tokens
        self.prompts: list[list[dict]] = []
        self.batches: list[tuple[list[list[dict]], int, bool]] = []  # sample_many's calls
        self.max_new_tokens: list[int | None] = []
        self.block = threading.Event()
        self.block.set()

    def stream(self, messages: list[dict], n: int = 2,
               max_new_tokens: int | None = None) -> PairStream:
        self.prompts.append(messages)
        self.max_new_tokens.append(max_new_tokens)
        stream = PairStream(iter(()))
        texts = self.replies[:n]

        def chunks():
            yield tuple(t[: len(t) // 2] for t in texts)
            self.block.wait(10)
            yield tuple(texts)
            replies = tuple(self._reply(t, i) for i, t in enumerate(texts))
            stream.result = SampledPair(
                prompt_token_ids=[1, 2, 3], replies=replies,
                adapter_version=self.adapter_version, temperature=0.8, top_p=0.95,
                max_new_tokens=8, seconds=0.01, first_token_seconds=0.001)

        stream._chunks = chunks()
        return stream

    def _reply(self, text: str, i: int) -> Reply:
        if self.finish_reason == "length":  # 8 tokens, no end-of-turn
            return Reply(text=text, token_ids=[10 + i] * 8, token_logprobs=[-1.0] * 8,
                         finish_reason="length")
        return Reply(text=text, token_ids=[10 + i, 2], token_logprobs=[-1.0, -0.5],
                     finish_reason="stop")

    def token_texts(self, token_ids: list[int]) -> list[str]:
        return [f"<{t}>" for t in token_ids]

    def in_sampling_thread(self, work):
        return work()

    def sample_many(self, conversations: list[list[dict]], n: int = 2, base: bool = False
                    ) -> list[SampledPair]:
        """Replies that say which prompt they answer and whether the adapter was off."""
        self.batches.append((conversations, n, base))
        version = 0 if base else self.adapter_version
        return [SampledPair(
            prompt_token_ids=[1], adapter_version=version, temperature=0.8, top_p=0.95,
            max_new_tokens=8, seconds=0.01, first_token_seconds=None,
            replies=tuple(self._reply(f"v{version} on {c[-1]['content']}", i) for i in range(n)))
            for c in conversations]

    def sample(self, messages: list[dict]) -> SampledPair:
        stream = self.stream(messages)
        for _ in stream:
            pass
        return stream.result


@pytest.fixture
def fake_generator() -> FakeGenerator:
    return FakeGenerator()


@pytest.fixture
def store(tmp_path):
    from chatbot.store import Store

    s = Store(tmp_path / "duet.db")
    yield s
    s.close()


@pytest.fixture
def service(store, fake_generator, tmp_path):
    from chatbot.service import ChatService

    config = Config(data_dir=tmp_path, max_message_chars=200, max_turns=3)
    return ChatService(config, store, fake_generator, model_id="fake")

