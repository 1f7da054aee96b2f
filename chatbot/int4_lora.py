"""PEFT's LoRA on the 4-bit CPU layers (chatbot/int4.py), so the server samples a live adapter
version on 4-bit weights.

`lora_config` registers `LoraInt4Linear` for `Int4Linear` through PEFT's experimental
custom-layer hook (`LoraConfig._register_custom_module`); every other layer gets PEFT's own.
The layer adds B(A(x)) * scaling to the 4-bit layer's output, as PEFT's LoRA does for
bitsandbytes' 4-bit layers: its parameters have the names PEFT's Linear has
(`<module>.lora_A.<adapter>.weight`), so a version the learner trained on float weights loads
unchanged and the hot swap copies into its slot as before (chatbot/hotswap.py).

Left out: merging an adapter into the 4-bit weights, LoRA variants (DoRA, aLoRA), mixed
adapter batches.
"""

from __future__ import annotations

import warnings

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from chatbot.int4 import Int4Linear

# PEFT reads the layer's in_features and out_features but warns on every layer it has no
# built-in support for; this one it has, through the hook.
warnings.filterwarnings("ignore", message=r"Unsupported layer type .*chatbot\.int4\.Int4Linear")

def lora_config(config):
    """A PEFT LoraConfig that puts LoraInt4Linear on the model's Int4Linear layers (PEFT's
    experimental custom-layer hook; its other layers get PEFT's own)."""
    config._register_custom_module({Int4Linear: LoraInt4Linear})
    return config


class LoraInt4Linear(nn.Module, LoraLayer):
    """PEFT's LoRA on an Int4Linear: y = base(x) + B(A(dropout(x))) * scaling for each active
    adapter, computed in the adapter's dtype and added in the base layer's."""

    def __init__(self, base_layer: Int4Linear, adapter_name: str, config, r: int = 0,
                 lora_alpha: int = 1, **kwargs) -> None:
        if config.use_dora or getattr(config, "alora_invocation_tokens", None) is not None:
            raise ValueError("4-bit CPU layers take plain LoRA adapters only (no DoRA or aLoRA)")
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            update = lora_b(lora_a(self.lora_dropout[name](x.to(lora_a.weight.dtype))))
            result = result + (update * self.scaling[name]).to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise NotImplementedError("an adapter is not merged into 4-bit CPU layers")

    def unmerge(self) -> None:
        raise NotImplementedError("an adapter is not merged into 4-bit CPU layers")

    def __repr__(self) -> str:
        return "lora." + super().__repr__()
