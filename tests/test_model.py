"""Model loading: clear one-line errors for unusable models, device and quantization choice."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatbot.config import Config
from chatbot.errors import ModelLoadError
from chatbot.model import load_model, resolve_quantization

ROOT = Path(__file__).resolve().parent.parent


def test_auto_quantization_is_4bit_on_cuda_and_none_on_cpu():
    assert resolve_quantization("auto", torch.device("cuda")) == "4bit"
    assert resolve_quantization("auto", torch.device("cpu")) == "none"
    assert resolve_quantization("8bit", torch.device("cpu")) == "8bit"


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
