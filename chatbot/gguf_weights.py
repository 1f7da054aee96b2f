"""The embedded GGUF with unquantized weights, for the llama.cpp engine under --quantize none.

The embedded file stores the projections in Q4_1 blocks and the embeddings in Q8_0. llama.cpp
computes on such blocks with 8-bit activations, which puts its log-probs 0.05-0.08 nats from
the learner's float32 model. `unquantized_gguf` writes the same model with every quantized
tensor dequantized (the very weights the learner's float32 checkpoint holds: both read the
GGUF's blocks) and stored in float32 or bfloat16, so llama.cpp computes what the learner
computes, in that dtype. Metadata and tokenizer are copied as they are; the norms stay float32.

The file is written once into --cache-dir (float32 ~540 MB, bfloat16 ~270 MB), under a lock
and with an atomic rename, like the float32 checkpoint the learner loads. Left out: other
block types (llama.cpp's `llama-quantize` makes those) and models other than the embedded one.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from chatbot.errors import ModelLoadError

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16")


def unquantized_gguf(source: Path, dtype: str, cache_dir: Path) -> Path:
    """The GGUF at `source` with its quantized tensors in `dtype` ("float32" or "bfloat16"),
    written on first use into `cache_dir` and reused after."""
    from chatbot.model import file_lock

    if dtype not in DTYPES:
        raise ModelLoadError(f"llama.cpp's weights can be unquantized to {' or '.join(DTYPES)}, "
                             f"not {dtype!r}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    size = source.stat().st_size  # a new version of the package writes a new file
    target = cache_dir / f"{source.stem}-{size}.{dtype}.gguf"
    if target.is_file():
        return target
    with file_lock(cache_dir / ".gguf.lock"):
        if target.is_file():
            return target
        log.info("writing %s's weights in %s once to %s", source.name, dtype, target)
        handle, tmp = tempfile.mkstemp(prefix=".gguf-", dir=cache_dir)
        os.close(handle)
        try:
            write_unquantized(source, Path(tmp), dtype)
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return target


def write_unquantized(source: Path, path: Path, dtype: str) -> None:
    """Write `source` to `path` with every quantized tensor dequantized to `dtype`."""
    import gguf

    reader = gguf.GGUFReader(source)
    architecture = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(str(path), arch=architecture)
    alignment = reader.fields.get(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    skipped = {gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE}
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in skipped:
            continue  # the reader's own entries (version, counts); the two set here
        kind = field.types[0]
        sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "float32"
                         else gguf.LlamaFileType.MOSTLY_BF16)
    for tensor in reader.tensors:
        if tensor.tensor_type == gguf.GGMLQuantizationType.F32 and len(tensor.shape) == 1:
            writer.add_tensor(tensor.name, np.asarray(tensor.data))  # norms: kept float32
            continue
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if dtype == "float32":
            writer.add_tensor(tensor.name, weights)
        else:  # round to nearest even, as torch casts; GGUF stores bf16 as its raw 16 bits
            bits = torch.from_numpy(weights).to(torch.bfloat16).view(torch.int16).numpy()
            writer.add_tensor(tensor.name, bits.view(np.uint16),
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
