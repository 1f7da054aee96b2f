"""4-bit weights for sampling on a CPU: a model's linear layers as torch's int4 CPU kernel runs
them, blocks of 32 weights with a scale and a minimum each.

Why: a CPU decode step reads every weight once, and most of it is matrix-vector products
(`aten::mm` was 81% of a float32 pair's time in torch's profiler) that stream weights from
memory at about 10 GB/s on this project's 2-core EPYC, far from the 26-39 GB/s a plain sum
reaches: fewer bytes per weight is what makes a step faster. llama.cpp decodes the embedded
GGUF at 9 ms a token because it keeps the GGUF's 4-bit blocks; transformers dequantizes them
to float on load. The embedded model's blocks are Q4_1 (32 weights, a scale d and a minimum m,
w = m + d q with q in 0..15, and each block's least and greatest weights at q = 0 and 15), so
packing each row back into blocks of 32 from their least and greatest weights recovers the
GGUF's own codes: the only loss is the scales and minimums rounded to bf16, the dtype the
kernel computes in. `bench decode --int4` times it against the float models.

The server samples with these layers under `--quantize int4` (the default on a CPU with
native bf16 that samples in bf16, chatbot/model.py); adapters sit on them through
chatbot/serving_lora.py.

Left out: training through these layers (the kernel has no backward; the learner keeps float
weights), the output layer (the embedded GGUF keeps it in 8 bits, Q8_0), CUDA (bitsandbytes'
4-bit is the path there, `--quantize 4bit`). A float model quantized here is rounded to 16
levels per block: for the embedded GGUF that is what it already was; for another model it is a
change.
"""

from __future__ import annotations

import torch
from torch import nn

GROUP = 32  # weights per block: Q4_1's, and a size the kernel takes
LEVELS = 15  # q in 0..15
ROWS = 16  # the kernel packs output rows in sixteens


def unavailable() -> str | None:
    """Why this torch cannot run the int4 CPU kernel, or None when it can."""
    ops = torch.ops.aten
    for name in ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"):
        if not hasattr(ops, name):
            return f"torch {torch.__version__} has no aten.{name}"
    return None


def fits(linear: nn.Linear, group: int = GROUP) -> bool:
    """Whether the kernel takes this layer's shape: whole blocks per row, rows in sixteens."""
    return linear.in_features % group == 0 and linear.out_features % ROWS == 0


def quantize_blocks(weight: torch.Tensor, group: int = GROUP
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes q (int32, 0..15), and per block a scale and a minimum (float32), such that
    weight ~= minimum + scale * q block by block along each row."""
    rows, columns = weight.shape
    if columns % group:
        raise ValueError(f"a row of {columns} weights is not a whole number of {group}-blocks")
    blocks = weight.detach().float().reshape(rows, columns // group, group)
    minimum = blocks.amin(-1, keepdim=True)
    scale = (blocks.amax(-1, keepdim=True) - minimum) / LEVELS
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant block: q = 0
    codes = torch.round((blocks - minimum) / scale).clamp(0, LEVELS).to(torch.int32)
    return codes.reshape(rows, columns), scale.squeeze(-1), minimum.squeeze(-1)


class Int4Linear(nn.Module):
    """y = x W^T (+ b) with W in 4-bit blocks; computes in `dtype` (bf16: the kernel's fast
    path; it takes float32 too, but as slowly as float weights)."""

    def __init__(self, linear: nn.Linear, group: int = GROUP,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        codes, scale, minimum = quantize_blocks(linear.weight, group)
        self.in_features, self.out_features, self.group = (linear.in_features,
                                                           linear.out_features, group)
        # The kernel's form: w = (q - 8) * scale + zero, scales and zeros as [blocks, rows, 2].
        zero = minimum + 8 * scale
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes, 1))
        self.register_buffer("scale_and_zero", torch.stack([scale, zero], -1).transpose(0, 1)
                             .contiguous().to(dtype))
        self.bias = None if linear.bias is None else nn.Parameter(
            linear.bias.detach().to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.scale_and_zero.dtype).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group,
                                                       self.scale_and_zero)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    @property
    def qweight(self) -> torch.Tensor:
        """The packed codes under the name PEFT looks for a quantized layer's weights by (to
        place an adapter on their device; their integer dtype is not cast to)."""
        return self.packed

    def weight_bytes(self) -> int:
        """Bytes of the packed codes, scales and zeros a step reads (the bias, a parameter,
        is counted with the model's parameters)."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale_and_zero))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"group={self.group}, dtype={self.scale_and_zero.dtype}"


def dequantize_blocks(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor
                      ) -> torch.Tensor:
    """The float32 weights that quantize_blocks' codes, scales and minimums stand for."""
    rows, blocks = scale.shape
    return (minimum[..., None] + scale[..., None] * codes.reshape(rows, blocks, -1).float()
            ).reshape(rows, -1)


def quantize_model(model: nn.Module, group: int = GROUP,
                   dtype: torch.dtype = torch.bfloat16) -> dict:
    """Replace every `nn.Linear` of a model for sampling with an Int4Linear, in place, except
    the output layer (the embedded GGUF keeps its token embedding, tied to the output layer,
    in 8 bits, Q8_0, which 4 bits would change) and layers of a shape the kernel does not take
    (`fits`), which stay as they are. Returns how many layers were replaced, how many were
    left for their shape, and the largest change to a weight that 4-bit blocks made, relative
    to the layer's largest weight (0 for the embedded model's Q4_1 layers)."""
    reason = unavailable()
    if reason:
        raise RuntimeError(f"4-bit CPU weights: {reason}")
    output = model.get_output_embeddings()
    replaced, unfit, change = 0, 0, 0.0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child is output:
                continue
            if not fits(child, group):
                unfit += 1
                continue
            weight = child.weight.detach().float()
            blocks = dequantize_blocks(*quantize_blocks(weight, group))
            change = max(change, ((blocks - weight).abs().max()
                                  / weight.abs().max().clamp(min=1e-30)).item())
            setattr(parent, name, Int4Linear(child, group, dtype))
            replaced += 1
    return {"layers": replaced, "unfit": unfit, "max_relative_change": change}
