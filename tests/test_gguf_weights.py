"""chatbot/gguf_weights.py: a GGUF's quantized tensors written unquantized, metadata kept.

Checked on a small GGUF built here (a Q4_1 and a Q8_0 projection, a float32 norm, string,
number and array metadata): every quantized tensor reads back as its dequantized values (exactly
in float32; rounded to nearest even in bf16), the norm stays float32, every metadata field is
copied but the file type, which names the new dtype; the file is written once and reused; an
unknown dtype is refused before anything is written.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from chatbot.errors import ModelLoadError
from chatbot.gguf_weights import unquantized_gguf


@pytest.fixture
def quantized(tmp_path):
    """A small llama GGUF in Q4_1 and Q8_0 blocks, and its tensors' dequantized values."""
    rng = np.random.default_rng(0)
    path = tmp_path / "small.Q4_1.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_block_count(1)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_string("tokenizer.chat_template", "{{ messages }}")
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "a", "b"])
    writer.add_float32("llama.rope.freq_base", 100000.0)
    values = {}
    for name, qtype in (("blk.0.attn_q.weight", gguf.GGMLQuantizationType.Q4_1),
                        ("token_embd.weight", gguf.GGMLQuantizationType.Q8_0)):
        blocks = gguf.quants.quantize(rng.standard_normal((8, 64)).astype(np.float32), qtype)
        writer.add_tensor(name, blocks, raw_dtype=qtype)
        values[name] = gguf.quants.dequantize(blocks, qtype)
    norm = rng.standard_normal(64).astype(np.float32)
    writer.add_tensor("blk.0.attn_norm.weight", norm)
    values["blk.0.attn_norm.weight"] = norm
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, values


def fields(reader: gguf.GGUFReader) -> dict:
    return {f.name: f.contents() for f in reader.fields.values()
            if not f.name.startswith("GGUF.") and f.name != "general.file_type"}


@pytest.mark.parametrize("dtype, stored, file_type", [
    ("float32", gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    ("bfloat16", gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16)],
    ids=["float32", "bfloat16"])
def test_quantized_tensors_are_written_dequantized(quantized, tmp_path, dtype, stored,
                                                   file_type):
    source, values = quantized
    path = unquantized_gguf(source, dtype, tmp_path / "cache")
    assert path.parent == tmp_path / "cache" and dtype in path.name
    before, after = gguf.GGUFReader(source), gguf.GGUFReader(path)
    assert fields(after) == fields(before)
    assert after.fields["general.file_type"].contents() == file_type
    tensors = {t.name: t for t in after.tensors}
    assert sorted(tensors) == sorted(values)
    norm = tensors.pop("blk.0.attn_norm.weight")
    assert norm.tensor_type == gguf.GGMLQuantizationType.F32
    np.testing.assert_array_equal(norm.data, values["blk.0.attn_norm.weight"])
    for name, tensor in tensors.items():
        assert tensor.tensor_type == stored
        assert list(tensor.shape) == [64, 8]  # GGUF's order: columns first
        read = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        expected = torch.from_numpy(values[name])
        if dtype == "bfloat16":
            expected = expected.to(torch.bfloat16).float()
        np.testing.assert_array_equal(read, expected.numpy())
        assert np.abs(values[name]).mean() > 0.1  # a tensor of zeros would pass the above


def test_the_file_is_written_once(quantized, tmp_path):
    source, _ = quantized
    cache = tmp_path / "cache"
    first = unquantized_gguf(source, "float32", cache)
    written = first.stat().st_mtime_ns
    assert unquantized_gguf(source, "float32", cache) == first
    assert first.stat().st_mtime_ns == written
    assert [p.name for p in cache.iterdir() if p.suffix == ".gguf"] == [first.name]


def test_an_unknown_dtype_is_refused_before_anything_is_written(quantized, tmp_path):
    source, _ = quantized
    with pytest.raises(ModelLoadError, match="float32 or bfloat16"):
        unquantized_gguf(source, "float16", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
