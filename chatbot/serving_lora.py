"""The server's LoRA layer on a CPU: an adapter version on the model's linear layers, float or
4-bit (chatbot/int4.py), at a per-token cost that stays small.

PEFT's own LoRA layer computes B(A(x)) * scaling with two matrix products. At decode time x
has one or two rows (one reply, or the pair), and on this project's 2-core EPYC those tiny
float32 products took ~140 us each inside a decode step: a live adapter made a pair's step
2.5x slower on 4-bit weights and 1.9x on bf16 ones (`bench decode --adapter`). `ServingLora`
computes the same update for a few rows as elementwise products and sums, and with matrix
products for more (a prompt's prefill, training-sized batches), in the adapter's float32.

`lora_config` registers it through PEFT's experimental custom-layer hook
(`LoraConfig._register_custom_module`): on 4-bit layers always (PEFT has no LoRA of its own
for them), and on plain linear layers of a model on a CPU. A GPU, or bitsandbytes' layers,
keep PEFT's own. Its parameters have the names PEFT's Linear has
(`<module>.lora_A.<adapter>.weight`), so a version the learner trained with PEFT loads
unchanged and the hot swap copies into its slot as before (chatbot/hotswap.py); nothing is
derived from them and cached, so a copy is all a swap needs.

Left out: dropout (the server samples in eval mode), merging an adapter into the base
weights, LoRA variants (DoRA, aLoRA), mixed adapter batches. The learner trains with PEFT's
own layers.
"""

from __future__ import annotations

import warnings

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from chatbot.int4 import Int4Linear

SMALL_BATCH = 8  # rows up to which the update is computed elementwise

# PEFT reads a 4-bit layer's in_features and out_features but warns on every layer of a type it
# has no built-in support for; this one it has, through the hook.
warnings.filterwarnings("ignore", message=r"Unsupported layer type .*chatbot\.int4\.Int4Linear")


def lora_config(config, model: nn.Module):
    """The PEFT LoraConfig `config`, set to put ServingLora on `model`'s 4-bit layers, and on
    its plain linear layers when it is on a CPU without bitsandbytes' layers."""
    mapping: dict[type, type] = {Int4Linear: ServingLora}
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    bitsandbytes = any(type(m).__module__.startswith("bitsandbytes") for m in model.modules())
    if on_cpu and not bitsandbytes:
        mapping[nn.Linear] = ServingLora
    config._register_custom_module(mapping)
    return config


class ServingLora(nn.Module, LoraLayer):
    """y = base(x) + B(A(x)) * scaling for each active adapter, computed in the adapter's
    dtype and added in the base layer's."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0,
                 lora_alpha: int = 1, **kwargs) -> None:
        if config.use_dora or getattr(config, "alora_invocation_tokens", None) is not None:
            raise ValueError("the server takes plain LoRA adapters only (no DoRA or aLoRA)")
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        rows = x.reshape(-1, x.shape[-1])
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            a, b = self.lora_A[name].weight, self.lora_B[name].weight  # (r, in), (out, r)
            if rows.shape[0] <= SMALL_BATCH:
                inner = (rows.unsqueeze(-2) * a).sum(-1) * self.scaling[name]  # (rows, r)
                update = (inner.unsqueeze(-2) * b).sum(-1)  # (rows, out)
            else:
                update = (rows.to(a.dtype) @ a.t()) @ b.t() * self.scaling[name]
            result = result + update.view(result.shape).to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise NotImplementedError("the server does not merge adapters into the base weights")

    def unmerge(self) -> None:
        raise NotImplementedError("the server does not merge adapters into the base weights")

    def __repr__(self) -> str:
        return "lora." + super().__repr__()
