"""Model loading: clear one-line errors for unusable models, device and quantization choice."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatbot import int4
from chatbot import model as model_module
from chatbot.config import Config, add_model_args
from chatbot.errors import ModelLoadError
from chatbot.model import (
    NATIVE_BF16_FLAGS,
    cpu_flags,
    cpu_has_native_bf16,
    load_model,
    resolve_dtype,
    resolve_quantization,
)
from chatbot.sampling import PairGenerator
from chatbot.service import ChatService
from chatbot.store import Store

ROOT = Path(__file__).resolve().parent.parent


def test_auto_quantization_is_4bit_on_cuda_int4_for_bf16_sampling_on_a_cpu(monkeypatch):
    from chatbot import model as model_module

    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    assert resolve_quantization("auto", torch.device("cuda")) == "4bit"
    assert resolve_quantization("auto", torch.device("cuda"), training=True) == "4bit"  # QLoRA
    assert resolve_quantization("auto", cpu) == "none"  # float32 sampling
    assert resolve_quantization("8bit", cpu) == "8bit"
    monkeypatch.setattr(int4, "unavailable", lambda: None)
    for native in (True, False):
        monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda n=native: n)
        assert resolve_quantization("auto", cpu, bf16) == ("int4" if native else "none")
        assert resolve_quantization("auto", cpu, bf16, training=True) == "none"
        assert resolve_quantization("int4", cpu, torch.float32) == "int4"  # asked for: given
        assert resolve_quantization("int4", cpu, bf16, training=True) == "none"  # learner
    monkeypatch.setattr(int4, "unavailable", lambda: "torch 9 has no aten.x")
    assert resolve_quantization("auto", cpu, bf16) == "none"
    with pytest.raises(ModelLoadError, match="torch 9 has no aten.x; use --quantize none"):
        resolve_quantization("int4", cpu, bf16)


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu sse2 avx2 avx512f {extra}
bugs\t\t: sysret_ss_attrs
"""


def test_native_bf16_is_read_from_the_cpu_flags():
    assert "avx512_bf16" in cpu_flags(CPUINFO.format(extra="avx512_bf16"))
    assert not cpu_flags(CPUINFO.format(extra="avx512_vnni")) & NATIVE_BF16_FLAGS
    assert cpu_flags(CPUINFO.format(extra="amx_tile amx_bf16")) & NATIVE_BF16_FLAGS
    assert cpu_flags("no flags here") == set()


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="no /proc/cpuinfo")
def test_torchs_bf16_check_agrees_with_proc_cpuinfo():
    assert cpu_has_native_bf16() == bool(cpu_flags() & NATIVE_BF16_FLAGS)


def test_auto_dtype_is_bf16_only_on_cuda_or_a_cpu_with_native_bf16(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu, native_bf16=True) == torch.bfloat16
    assert resolve_dtype("auto", cpu, native_bf16=False) == torch.float32
    assert resolve_dtype("auto", cuda, native_bf16=False) == torch.bfloat16  # as before
    for native in (True, False):  # without the argument, the CPU is asked
        monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda n=native: n)
        assert resolve_dtype("auto", cpu) == (torch.bfloat16 if native else torch.float32)


def test_the_learner_trains_in_float32_on_a_cpu_unless_told_otherwise():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu, native_bf16=True, training=True) == torch.float32
    assert resolve_dtype("auto", cuda, training=True) == torch.bfloat16
    assert resolve_dtype("bfloat16", cpu, native_bf16=True, training=True) == torch.bfloat16


def test_an_explicit_dtype_wins_over_the_cpu():
    cpu = torch.device("cpu")
    assert resolve_dtype("float32", cpu, native_bf16=True) == torch.float32
    assert resolve_dtype("bfloat16", cpu, native_bf16=False) == torch.bfloat16
    assert resolve_dtype("float32", torch.device("cuda")) == torch.float32


def test_an_unknown_dtype_is_a_clear_error(capsys):
    with pytest.raises(ModelLoadError, match="unknown dtype 'float16': use one of auto, "
                                             "float32, bfloat16"):
        resolve_dtype("float16", torch.device("cpu"))
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_weights_load_in_the_dtype_asked_for(tiny_config, dtype):
    loaded = load_model(dataclasses.replace(tiny_config, dtype=dtype))
    assert loaded.dtype == getattr(torch, dtype)
    assert {p.dtype for p in loaded.model.parameters()} == {getattr(torch, dtype)}


def test_a_quantized_load_keeps_its_own_compute_dtype(tiny_config):
    loaded = load_model(dataclasses.replace(tiny_config, quantize="8bit", dtype="bfloat16"))
    assert loaded.dtype == torch.float32  # bitsandbytes' CPU compute dtype, not --dtype


@pytest.mark.skipif(not cpu_has_native_bf16(),
                    reason="this CPU has no native bf16 (avx512_bf16 / amx_bf16): auto never "
                           "picks bfloat16 here")
def test_bf16_serving_and_learning_on_a_native_bf16_cpu(tiny_config):
    """What --dtype auto runs on this CPU: pairs sampled in bf16 (on 4-bit layers where torch
    has the int4 kernel, --quantize auto), and a learner in float32 whose fresh log-probs of
    those replies agree with the stored behaviour log-probs to within bf16 rounding; with an
    explicit --dtype bfloat16 the learner trains on bf16 weights and keeps its LoRA weights in
    float32. Both rounds train and publish."""
    from learner.batch import Sample
    from learner.worker import Learner

    config = dataclasses.replace(tiny_config, dtype="auto", steps_per_round=1, replay=0,
                                 judge_new=False, kl_tripwire=100.0)
    store = Store(config.db_path)
    loaded = load_model(config)
    assert loaded.dtype == torch.bfloat16
    assert loaded.quantize == ("none" if int4.unavailable() else "int4")
    service = ChatService(config, store, PairGenerator(loaded, config), model_id=loaded.model_id)

    def vote_four(start: int) -> str:
        torch.manual_seed(start)
        for i, choice in enumerate(["A", "B", "A", "B"]):
            turn = service.ask("ann", f"Say something about {start + i}.", "")
            service.vote("ann", turn["pair_id"], choice)
        return turn["pair_id"]

    def parameter_dtypes(learner) -> tuple[set, set]:
        named = list(learner.model.named_parameters())
        return ({p.dtype for n, p in named if "lora_" in n},
                {p.dtype for n, p in named if "lora_" not in n})

    def trains(learner) -> None:
        before = {n: p.detach().clone() for n, p in learner.model.named_parameters()
                  if "lora_" in n}
        step = learner.round()
        assert step["status"] == "promoted" and math.isfinite(step["loss"])
        assert any(not torch.equal(p, before[n])
                   for n, p in learner.model.named_parameters() if "lora_" in n)

    pair_id = vote_four(0)
    learner = Learner(config, store, load_model(config, training=True), seed=0)
    assert parameter_dtypes(learner) == ({torch.float32}, {torch.float32})
    pair = store.pair(None, pair_id)
    for reply in pair["replies"]:
        sample = Sample(reply["id"], pair["prompt_token_ids"], reply["token_ids"],
                        reply["token_logprobs"])
        fresh = learner.scorer.score([sample])[0]
        assert fresh == pytest.approx(sum(reply["token_logprobs"]),
                                      abs=0.05 * len(reply["token_ids"]))
    trains(learner)

    vote_four(4)
    bf16 = dataclasses.replace(config, dtype="bfloat16")
    learner = Learner(bf16, store, load_model(bf16, training=True), seed=0)
    assert parameter_dtypes(learner) == ({torch.float32}, {torch.bfloat16})
    trains(learner)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no model folder"):
        load_model(Config(model=str(tmp_path / "nothing-here"), device="cpu"))


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(Config(model=str(tmp_path), device="cpu"))


def test_model_without_chat_template_is_refused(tiny_model_dir, tmp_path):
    copy = tmp_path / "no-template"
    copy.mkdir()
    for path in tiny_model_dir.iterdir():
        if path.name != "chat_template.jinja":
            (copy / path.name).write_bytes(path.read_bytes())
    settings = json.loads((copy / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (copy / "tokenizer_config.json").write_text(json.dumps(settings))
    with pytest.raises(ModelLoadError, match="no chat template"):
        load_model(Config(model=str(copy), device="cpu"))


def test_unknown_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="could not load"):
        load_model(Config(model="no-such-org/no-such-model", device="cpu"))


@pytest.mark.processes
def test_cli_prints_one_line_not_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "app.py", "--model", str(tmp_path / "missing"), "--no-learner",
         "--data-dir", str(tmp_path / "data")],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: no model folder at {tmp_path / 'missing'}"]


@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_bitsandbytes_quantization_loads_on_cpu(tiny_config, quantize):
    loaded = load_model(dataclasses.replace(tiny_config, quantize=quantize))
    kinds = {type(m).__name__ for m in loaded.model.modules()}
    assert ("Linear4bit" if quantize == "4bit" else "Linear8bitLt") in kinds
    assert loaded.quantize == quantize
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(loaded.model(ids).logits).all()


def test_4bit_on_cpu_refuses_widths_the_cpu_kernel_cannot_run(tmp_path, tiny_model_dir):
    """bitsandbytes' 4-bit CPU kernel (AVX-512 BF16 CPUs) needs widths in blocks of 32: a model
    with a 16-wide layer is refused with one line on every CPU, not an assertion on some."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "narrow"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(ModelLoadError, match="multiples of 32") as error:
        load_model(Config(model=str(folder), device="cpu", quantize="4bit"))
    assert "\n" not in str(error.value)
