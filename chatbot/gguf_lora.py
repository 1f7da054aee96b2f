"""A published adapter version as llama.cpp reads a LoRA: one GGUF file.

The learner publishes PEFT's files (`adapter_config.json`, `adapter_model.safetensors`);
llama.cpp's `llama_adapter_lora_init` reads a GGUF whose tensors are each layer's two LoRA
factors under llama.cpp's own names. The conversion is a renaming and one permutation:

* `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` becomes
  `blk.{i}.attn_q.weight.lora_a` (and `lora_B` becomes `.lora_b`); the shapes stay, since
  both store a factor as (rows, columns) = (r, in) for A and (out, r) for B.
* The query and key projections' output rows are permuted as llama.cpp's converter permutes
  the base model's own q and k weights (its rotary embedding pairs neighbouring dimensions,
  transformers' pairs the two halves of each head), so B's rows must follow: `permute_rows`.
* The scale: llama.cpp multiplies B·A by alpha / r, PEFT by lora_alpha / r (rsLoRA's
  alpha / sqrt(r) and DoRA are refused: llama.cpp has neither).

Only llama-architecture models (the embedded SmolLM2 among them) are mapped; another
architecture's adapter is refused with the reason. Left out: LoRA on the embeddings or the
output layer (the learner's "all-linear" leaves both alone).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from chatbot.errors import AdapterError

PROJECTIONS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
FACTORS = {"lora_A": "lora_a", "lora_B": "lora_b"}


def permute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q or k projection (or of its LoRA B factor) in llama.cpp's order: within each
    head, the first and second halves interleaved, as its converter does to the base model."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_name(key: str) -> tuple[str, str, str]:
    """(llama.cpp's tensor name, the projection's transformers name, "lora_A" or "lora_B") of
    a PEFT key; AdapterError for a module llama.cpp's llama architecture has no LoRA for."""
    name = key.removeprefix("base_model.model.").removesuffix(".weight")
    module, _, factor = name.rpartition(".")
    parts = module.split(".")
    if (factor not in FACTORS or len(parts) != 5 or parts[:2] != ["model", "layers"]
            or not parts[2].isdigit() or ".".join(parts[3:]) not in PROJECTIONS):
        raise AdapterError(f"llama.cpp cannot load this adapter: no llama.cpp tensor for {key}")
    projection = ".".join(parts[3:])
    return f"blk.{parts[2]}.{PROJECTIONS[projection]}.weight.{FACTORS[factor]}", projection, \
        factor


def write_gguf_lora(path: Path, config: dict, state: dict[str, torch.Tensor], *,
                    heads: int, kv_heads: int) -> Path:
    """Write the adapter (its adapter_config.json as `config`, its tensors as `state`) as a
    llama.cpp LoRA GGUF at `path`, for a llama model with `heads` query heads and `kv_heads`
    key/value heads."""
    import gguf  # a dependency of transformers' GGUF loading, which reads the embedded model

    if config.get("use_rslora") or config.get("use_dora"):
        raise AdapterError("llama.cpp cannot load this adapter: rsLoRA and DoRA scale it "
                           "in ways llama.cpp's LoRA does not")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise AdapterError("llama.cpp cannot load this adapter: it has per-module ranks")
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config["lora_alpha"]))
    for key in sorted(state):
        name, projection, factor = gguf_name(key)
        weight = state[key].detach().to(torch.float32).cpu().numpy()
        if factor == "lora_B" and projection in ("self_attn.q_proj", "self_attn.k_proj"):
            weight = permute_rows(weight, heads if projection == "self_attn.q_proj"
                                  else kv_heads)
        writer.add_tensor(name, np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
