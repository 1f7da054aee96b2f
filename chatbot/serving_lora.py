"""The server's LoRA layer on a CPU: an adapter version on the model's linear layers, float or
4-bit (chatbot/int4.py), at a per-token cost that stays small.

PEFT's own LoRA layer computes B(A(x)) * scaling with two matrix products. At decode time x
has one or two rows (one reply, or the pair), and on this project's 2-core EPYC those tiny
float32 products took ~140 us each inside a decode step: a live adapter made a pair's step
2.5x slower on 4-bit weights and 1.9x on bf16 ones (`bench decode --adapter`). `ServingLora`
computes the same update for a few rows as elementwise products and sums, and with matrix
products for more (a prompt's prefill, training-sized batches), in the adapter's float32.

Which is faster for a few rows depends on the CPU: on an AMX Xeon two matrix products
(`F.linear`) took 89 us for a whole 576->1536 layer against 127-132 us elementwise.
`time_small_batch` times both on each of a model's layer shapes when the server loads it on a
CPU with `--pair-kernels auto` (chatbot/model.py, beside the pair kernels) and marks each
layer with the faster for the rank timed; a layer not marked keeps the elementwise form.

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

import logging
import warnings

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn

from chatbot.int4 import Int4Linear
from chatbot.pair_kernels import MARGIN, median_seconds

log = logging.getLogger(__name__)

SMALL_BATCH = 8  # rows up to which the update takes the small-batch form
# A base layer's small-batch forms by rank, {r: "products" or "elementwise"}, as
# time_small_batch marks them; a rank not there takes the elementwise form.
FORMS = "lora_small_batch_forms"
CALLS = 20  # calls of a form in one timed pass

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
            if rows.shape[0] <= SMALL_BATCH and vars(self.base_layer).get(
                    FORMS, {}).get(a.shape[0]) != "products":
                update = elementwise(rows, a, b, self.scaling[name])
            else:
                update = products(rows, a, b, self.scaling[name])
            result = result + update.view(result.shape).to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise NotImplementedError("the server does not merge adapters into the base weights")

    def unmerge(self) -> None:
        raise NotImplementedError("the server does not merge adapters into the base weights")

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def elementwise(rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float
                ) -> torch.Tensor:
    """B(A(rows)) * scaling for rows (n, in) as elementwise products and sums: (n, out)."""
    inner = (rows.unsqueeze(-2) * a).sum(-1) * scaling  # (n, r)
    return (inner.unsqueeze(-2) * b).sum(-1)


def products(rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float
             ) -> torch.Tensor:
    """The same with two matrix products, in the adapter's dtype."""
    return F.linear(F.linear(rows.to(a.dtype), a), b) * scaling


def _calls(form, *args):
    """CALLS calls of `form` on `args`, as one callable to time."""
    def run() -> None:
        for _ in range(CALLS):
            form(*args, 2.0)
    return run


def time_small_batch(model: nn.Module, r: int, rows: int = 2) -> dict[tuple[int, int, int], dict]:
    """Time both forms of a `rows`-row update of rank `r` on each shape of `model`'s plain and
    4-bit linear layers (the output layer left out: no adapter goes there), in float32 like
    an adapter's weights, and mark each layer with the faster (FORMS). Returns, per shape, the
    form and the microseconds of a call of each; nothing off the CPU. Call it where torch work
    belongs in a fresh thread (chatbot/threads.py)."""
    if any(p.device.type != "cpu" for p in model.parameters()):
        return {}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    by_shape: dict[tuple[int, int], list[nn.Module]] = {}
    for m in model.modules():
        if isinstance(m, (nn.Linear, Int4Linear)) and m is not output:
            by_shape.setdefault((m.in_features, m.out_features), []).append(m)
    report = {}
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for (n_in, n_out), layers in sorted(by_shape.items()):
            x = torch.randn(rows, n_in, generator=generator)
            a = torch.randn(r, n_in, generator=generator)
            b = torch.randn(n_out, r, generator=generator)
            elementwise_s, products_s = median_seconds(_calls(elementwise, x, a, b),
                                                       _calls(products, x, a, b))
            form = "products" if products_s < MARGIN * elementwise_s else "elementwise"
            for layer in layers:
                vars(layer).setdefault(FORMS, {})[r] = form
            report[(n_in, n_out, r)] = {"form": form, "elementwise_us": 1e6 * elementwise_s / CALLS,
                                        "products_us": 1e6 * products_s / CALLS}
    log.info("LoRA update for %d rows: %s", rows, ", ".join(
        f"{i}x{o} {v['form']} ({v['products_us']:.1f} vs {v['elementwise_us']:.1f} us)"
        for (i, o, _), v in report.items()))
    return report
