"""The llama.cpp engine (`--engine llama-cpp`) on the embedded GGUF, and the adapter conversion
it loads versions through.

Checked without llama.cpp: PEFT's names map to llama.cpp's, the q/k rows are permuted exactly as
the embedded GGUF's own q and k weights are (against transformers' checkpoint converted from
it), and adapters llama.cpp cannot apply are refused with the reason.

Checked with llama.cpp (llama-cpp-python, `make llama`): a streamed pair's behaviour log-probs
are llama.cpp's own, replaying the same batches (within 1e-3), and near the
learner's float32 model's (the same Q4_1 weights, computed another way: a mean gap of 0.05-0.08
nats a token measured here; the transformers engine's 4-bit layers are 0.06 off); n=1 and the
length cap; a stream closed early stops its sampling; a published version is verified,
converted and served (its effect on the log-probs follows the learner's PEFT model's:
correlation 0.999 measured here), replaced by the next and dropped by a rollback; a version
that fails its manifest, or that llama.cpp cannot set, is never served; llama.cpp's threads
follow the host's share; `python app.py --engine llama-cpp` through the openai client; a model
other than the embedded one, bitsandbytes' quantization, or no llama-cpp-python, is a one-line
error. Under --quantize none (the GGUF's weights unquantized) the log-probs are the learner's
float32 model's, with a published version on it too: a mean gap of 0.001-0.002 nats a token
in float32 and 0.02 in bf16, measured here.

In CI (CI or DUET_REQUIRE_LLAMA set) a llama-cpp-python that will not import fails these
tests; elsewhere they are skipped with the reason.
"""

from __future__ import annotations

import dataclasses
import os
import threading

import numpy as np
import pytest
import torch

from chatbot.config import Config
from chatbot.errors import AdapterError, EngineError, ModelLoadError
from chatbot.gguf_lora import gguf_name, permute_rows, write_gguf_lora
from chatbot.model import EMBEDDED_GGUF, embedded_checkpoint, embedded_gguf_dir, load_model
from chatbot.service import rollback
from chatbot.store import Store
from tests.serving import a_pair_through_the_app
from tests.test_hotswap import publish_random_adapter

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
MAX_NEW_TOKENS = 12
REQUIRED = os.environ.get("CI", "").lower() not in ("", "0", "false") or bool(
    os.environ.get("DUET_REQUIRE_LLAMA"))


def test_peft_names_map_to_llama_cpps():
    key = "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"
    assert gguf_name(key) == ("blk.7.attn_q.weight.lora_a", "self_attn.q_proj", "lora_A")
    assert gguf_name("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight")[0] == \
        "blk.0.ffn_down.weight.lora_b"
    for bad in ("base_model.model.lm_head.lora_A.weight",
                "base_model.model.model.layers.0.self_attn.rotary.lora_A.weight",
                "base_model.model.model.layers.0.mlp.up_proj.lora_embedding_A"):
        with pytest.raises(AdapterError, match="llama.cpp cannot load this adapter"):
            gguf_name(bad)


@pytest.mark.parametrize("field", ["use_rslora", "use_dora"])
def test_an_adapter_llama_cpp_cannot_scale_is_refused(tmp_path, field):
    with pytest.raises(AdapterError, match="rsLoRA and DoRA"):
        write_gguf_lora(tmp_path / "a.gguf", {"r": 4, "lora_alpha": 8, field: True}, {},
                        heads=9, kv_heads=3)
    assert not (tmp_path / "a.gguf").exists()


@pytest.mark.slow
def test_q_and_k_rows_are_permuted_as_the_embedded_gguf_permutes_its_own():
    """transformers undoes llama.cpp's permutation when it converts the GGUF; permute_rows must
    redo it exactly, or every LoRA B factor of q and k lands on the wrong rotary dimensions."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    checkpoint = embedded_checkpoint(Config().cache_dir)
    model_config = AutoConfig.from_pretrained(checkpoint)
    state = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        state.update(load_file(file))
    reader = gguf.GGUFReader(embedded_gguf_dir() / EMBEDDED_GGUF)
    tensors = {t.name: t for t in reader.tensors}
    for name, heads in (("q", model_config.num_attention_heads),
                        ("k", model_config.num_key_value_heads)):
        ours = state[f"model.layers.0.self_attn.{name}_proj.weight"].float().numpy()
        tensor = tensors[f"blk.0.attn_{name}.weight"]
        theirs = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(ours.shape)
        assert np.allclose(permute_rows(ours, heads), theirs, atol=1e-6)
        assert not np.allclose(ours, theirs, atol=1e-3)  # the permutation is not the identity


def test_without_llama_cpp_python_the_engine_says_how_to_get_it(monkeypatch):
    import sys

    from chatbot import llama_engine

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    with pytest.raises(ModelLoadError, match="make llama") as error:
        llama_engine.bindings()
    assert "\n" not in str(error.value)


# --- with llama.cpp ------------------------------------------------------------------------

# Every test below is slow: the real embedded model, in llama.cpp and in transformers.

@pytest.fixture(scope="module")
def bindings():
    from chatbot import llama_engine

    try:
        return llama_engine.bindings()
    except ModelLoadError as exc:
        if REQUIRED:
            pytest.fail(f"llama-cpp-python is required here (CI / DUET_REQUIRE_LLAMA): {exc}")
        pytest.skip(str(exc))


LEARNER = Config(device="cpu", dtype="float32", quantize="none")  # the learner's model


@pytest.fixture
def config(bindings, tmp_path) -> Config:
    """The engine as `--engine llama-cpp` runs by default: the GGUF's own 4-bit blocks."""
    return Config(data_dir=tmp_path / "data", engine="llama-cpp", seed=0,
                  max_new_tokens=MAX_NEW_TOKENS, device="cpu")


@pytest.fixture
def engine(config):
    from chatbot import llama_engine

    store = Store(config.db_path)
    generator, live, _ = llama_engine.connect(config, store)
    live.sync()
    yield store, generator, live
    store.close()
    generator.engine.close()


@pytest.fixture(scope="module")
def local_base(bindings):
    """The learner's model: float32 weights from the same GGUF."""
    return load_model(LEARNER).model


def publish(config: Config, store: Store, version: int, seed: int):
    """A random rank-8 version published as the learner publishes one (on float32 weights)."""
    return publish_random_adapter(dataclasses.replace(config, dtype="float32", quantize="none"),
                                  store, version, seed=seed, rank=8)


def forward_logprobs(model, prompt: list[int], reply: list[int]) -> torch.Tensor:
    """Each reply token's log-probability under a transformers `model`, one forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + reply])).logits[0, len(prompt) - 1:-1].double()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(reply)[:, None])[:, 0]


def llama_logprobs(generator, prompt: list[int], replies: list[list[int]], base: bool = False
                   ) -> list[torch.Tensor]:
    """Each reply's token log-probs from llama.cpp, with the live adapter (or none), decoded as
    sampling decoded them: the prompt at once, then a token of each unfinished reply a step,
    in one batch. The batch's shape matters: llama.cpp's kernels round a batch of one row
    differently from one of two (by up to 0.3 nats a token with a random adapter of this
    size; both lie a mean 0.08 nats from PEFT's float32 model, measured here), and a prompt
    scored with its reply in one long batch differently again. A row's logits do not depend
    on what the other row holds."""
    engine = generator.engine
    steps: list[list[torch.Tensor]] = [[] for _ in replies]
    with engine.lock:
        engine.use(None if base else generator.live.serving()[1])
        first = engine.prefill(prompt, len(replies))[0]
        for row in steps:
            row.append(first)
        for i in range(max(map(len, replies)) - 1):
            alive = [r for r, reply in enumerate(replies) if i + 1 < len(reply)]
            engine.decode([replies[r][i] for r in alive], [len(prompt) + i] * len(alive), alive,
                          [True] * len(alive))
            for logits, r in zip(engine.logits(list(range(len(alive)))), alive, strict=True):
                steps[r].append(logits)
    return [torch.log_softmax(torch.stack(row).double(), -1).gather(
        -1, torch.tensor(reply)[:, None])[:, 0] for row, reply in zip(steps, replies)]


def stored(reply) -> torch.Tensor:
    return torch.tensor(reply.token_logprobs, dtype=torch.float64)


@pytest.mark.slow
def test_a_streamed_pair_carries_llama_cpps_own_logprobs(engine, local_base):
    _, generator, live = engine
    assert live.serving() == (0, None)
    stream = generator.stream(MESSAGES)
    updates = list(stream)
    pair = stream.result
    assert len(pair.replies) == 2 and pair.adapter_version == 0
    assert pair.prompt_token_ids == generator.prompt_ids(MESSAGES)
    assert len(updates) > 2 and updates[-1] == tuple(r.text for r in pair.replies)  # streamed
    gaps = []
    own = llama_logprobs(generator, pair.prompt_token_ids, [r.token_ids for r in pair.replies])
    for reply, replayed in zip(pair.replies, own, strict=True):
        assert 1 <= len(reply.token_ids) <= MAX_NEW_TOKENS
        assert len(reply.token_logprobs) == len(reply.token_ids)
        assert (reply.finish_reason == "stop") == (reply.token_ids[-1] in generator.stop_ids)
        assert reply.text == generator.tokenizer.decode(reply.token_ids,
                                                        skip_special_tokens=True).strip()
        assert (replayed - stored(reply)).abs().max() < 1e-3
        gaps.append(forward_logprobs(local_base, pair.prompt_token_ids, reply.token_ids)
                    - stored(reply))
    gap = torch.cat(gaps).abs()
    print(f"|llama.cpp - float32 learner| log-prob gap: mean {gap.mean():.3f}, "
          f"max {gap.max():.3f}")
    assert gap.mean() < 0.2


@pytest.mark.slow
@pytest.mark.parametrize("dtype, within", [("float32", 0.005), ("bfloat16", 0.06)])
def test_unquantized_weights_give_the_learners_logprobs(config, local_base, dtype, within):
    """--quantize none: llama.cpp on the GGUF's weights unquantized computes the learner's
    float32 model, with a published version on it too (a wrong dequantization, q/k order or
    LoRA scale would show here as a gap of tenths of a nat)."""
    from peft import PeftModel

    from chatbot import llama_engine

    config = dataclasses.replace(config, quantize="none", dtype=dtype)
    assert llama_engine.engine_gguf(config).name.endswith(f".{dtype}.gguf")
    store = Store(config.db_path)
    generator, live, _ = llama_engine.connect(config, store)
    try:
        live.sync()
        for version in (0, 1):
            model = local_base
            if version:
                folder = publish(config, store, 1, seed=1)
                assert live.sync() is True and live.last_error is None
                model = PeftModel.from_pretrained(load_model(LEARNER).model, folder).eval()
            pair = generator.sample(MESSAGES)
            assert pair.adapter_version == version
            gap = torch.cat([forward_logprobs(model, pair.prompt_token_ids, r.token_ids)
                             - stored(r) for r in pair.replies]).abs()
            print(f"{dtype}, version {version}: |llama.cpp - float32 learner| log-prob gap: "
                  f"mean {gap.mean():.4f}, max {gap.max():.4f}")
            assert gap.mean() < within
    finally:
        store.close()
        generator.engine.close()


@pytest.mark.slow
def test_one_reply_the_length_cap_and_a_stream_closed_early(engine):
    _, generator, _ = engine
    stream = generator.stream(MESSAGES, n=1, max_new_tokens=4)
    list(stream)
    (reply,) = stream.result.replies
    assert len(reply.token_ids) <= 4 and stream.result.max_new_tokens == 4
    stream = generator.stream(MESSAGES, n=1, max_new_tokens=10_000)  # never above the server's
    list(stream)
    assert stream.result.max_new_tokens == MAX_NEW_TOKENS
    generator.stop_ids = set()  # nothing ends it early but the consumer
    generator.config = dataclasses.replace(generator.config, max_new_tokens=400)
    stream = generator.stream([{"role": "user", "content": "Count from 1 to 200."}])
    chunks = iter(stream)
    next(chunks)
    chunks.close()  # what the service does when the page or API client goes away
    assert stream.cancel.is_set() and stream.result is None
    assert generator.engine.lock.acquire(timeout=5)  # the sampling ended and let go
    generator.engine.lock.release()


@pytest.mark.slow
def test_its_threads_follow_the_hosts_share(engine):
    """With a CpuShare (app.py's server_share) each pair decodes on the count it gives: one
    while another process keeps the host busy, every core when it is quiet."""
    _, generator, _ = engine

    class Share:
        count = 1

        def threads(self) -> int:
            return self.count

    generator.cpu_share = share = Share()
    counts = []
    decode = generator.engine.decode
    generator.engine.decode = lambda *a: counts.append(generator.engine.threads) or decode(*a)
    generator.sample(MESSAGES)
    assert counts and set(counts) == {1}
    share.count, counts[:] = 2, []
    generator.sample(MESSAGES)
    assert set(counts) == {2}


@pytest.mark.slow
def test_every_pair_is_decoded_in_one_thread(engine):
    """Streamed or not, every decode runs in the process's one decode thread: llama.cpp's
    OpenMP team lives as long as the thread that started it, and two teams in one process made
    libgomp put both to sleep at every barrier (a streamed pair with an adapter 3x slower after
    one decoded in the caller's thread, measured here)."""
    from chatbot import llama_engine

    _, generator, _ = engine
    threads = set()
    decode = generator.engine.decode
    generator.engine.decode = lambda *a: threads.add(threading.get_ident()) or decode(*a)
    generator.sample(MESSAGES)
    list(generator.stream(MESSAGES))
    generator.sample_many([MESSAGES, MESSAGES], n=1)
    assert len(threads) == 1 and threading.get_ident() not in threads
    assert generator._decoder is llama_engine.decode_thread()  # every engine's, one thread


@pytest.mark.slow
def test_its_draw_leaves_torchs_thread_count_as_it_was(engine):
    """The draw runs torch on one thread; torch's count is the process's, so threads started
    after a pair (a benchmark's next timer, a transformers model beside it) keep theirs."""
    from tests.test_cores import threads_of_a_new_thread

    _, generator, _ = engine
    torch.set_num_threads(2)
    try:
        seen = []
        generator.engine.decode = (lambda decode: lambda *a: seen.append(
            torch.get_num_threads()) or decode(*a))(generator.engine.decode)
        generator.sample(MESSAGES)
        assert seen and set(seen) == {1}  # the sampling thread's draw: one thread
        assert threads_of_a_new_thread() == 2
    finally:
        torch.set_num_threads(os.cpu_count() or 1)


@pytest.mark.slow
def test_a_published_version_is_converted_served_replaced_and_rolled_back(engine, config,
                                                                         local_base):
    from peft import PeftModel

    store, generator, live = engine
    folder = publish(config, store, 1, seed=1)
    assert live.sync() is True and live.last_error is None
    assert live.version == 1 and live.serving()[1] is not None
    pair = generator.sample(MESSAGES)
    assert pair.adapter_version == 1
    with_adapter = PeftModel.from_pretrained(load_model(LEARNER).model, folder).eval()
    effects_torch, effects_llama = [], []
    prompt, replies = pair.prompt_token_ids, [r.token_ids for r in pair.replies]
    replayed = llama_logprobs(generator, prompt, replies)
    without = llama_logprobs(generator, prompt, replies, base=True)
    for reply, own, base in zip(pair.replies, replayed, without, strict=True):
        assert (own - stored(reply)).abs().max() < 1e-3
        effects_torch.append(forward_logprobs(with_adapter, prompt, reply.token_ids)
                             - forward_logprobs(local_base, prompt, reply.token_ids))
        effects_llama.append(stored(reply) - base)
    effect_torch, effect_llama = torch.cat(effects_torch), torch.cat(effects_llama)
    assert effect_torch.abs().mean() > 0.1  # the adapter changed the distribution
    correlation = torch.corrcoef(torch.stack([effect_torch, effect_llama]))[0, 1]
    print(f"the adapter's effect, llama.cpp against PEFT: correlation {correlation:.3f}")
    assert correlation > 0.9

    (base_reply,) = generator.sample_many([MESSAGES], n=1, base=True)
    assert base_reply.adapter_version == 0
    (reply,) = base_reply.replies
    (replayed,) = llama_logprobs(generator, base_reply.prompt_token_ids, [reply.token_ids],
                                 base=True)
    assert (replayed - stored(reply)).abs().max() < 1e-3

    publish(config, store, 2, seed=2)
    assert live.sync() is True and live.version == 2
    assert generator.sample(MESSAGES).adapter_version == 2
    rollback(store, config, 0)
    assert live.sync() is True and live.serving() == (0, None)
    assert generator.sample(MESSAGES).adapter_version == 0


@pytest.mark.slow
def test_a_version_that_fails_its_manifest_is_never_loaded(engine, config):
    store, generator, live = engine
    folder = publish(config, store, 1, seed=3)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64] + bytes(64))  # zeroed tail
    assert live.sync() is False
    assert "does not match its sha256" in live.last_error and live.serving() == (0, None)
    assert generator.sample(MESSAGES).adapter_version == 0  # the base model keeps serving


@pytest.mark.slow
def test_a_version_llama_cpp_cannot_set_leaves_the_old_one_serving(engine, config,
                                                                   monkeypatch):
    store, generator, live = engine
    publish(config, store, 1, seed=4)
    set_adapter = generator.engine.use

    def refuse(adapter):
        if adapter is not None:
            raise EngineError("llama.cpp could not set the adapter on its context")
        set_adapter(adapter)

    monkeypatch.setattr(generator.engine, "use", refuse)
    assert live.sync() is False
    assert "could not set the adapter" in live.last_error and live.serving() == (0, None)
    monkeypatch.setattr(generator.engine, "use", set_adapter)
    assert generator.sample(MESSAGES).adapter_version == 0


@pytest.mark.slow
def test_another_model_is_a_clear_error(bindings, tmp_path):
    from chatbot import llama_engine

    config = Config(data_dir=tmp_path, engine="llama-cpp", model="HuggingFaceTB/other")
    with pytest.raises(ModelLoadError, match="serves the embedded model only"):
        llama_engine.connect(config, Store(config.db_path))
    for quantize in ("4bit", "8bit"):
        config = Config(data_dir=tmp_path, engine="llama-cpp", quantize=quantize)
        with pytest.raises(ModelLoadError, match="bitsandbytes'.*--quantize none"):
            llama_engine.connect(config, Store(config.db_path))


@pytest.mark.slow
def test_the_app_serves_pairs_from_llama_cpp(config, tmp_path):
    """`python app.py --engine llama-cpp`: a streamed pair through the OpenAI-compatible API,
    stored and voted on."""
    a_pair_through_the_app("--engine", "llama-cpp", data_dir=config.data_dir,
                           log_path=tmp_path / "app.log", messages=MESSAGES)
