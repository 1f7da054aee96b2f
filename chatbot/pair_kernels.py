"""The pair's decode step on a CPU: its linear layers as two matrix-vector products, where the
CPU computes those faster than one two-row matrix product.

A decode step of the pair multiplies every weight matrix by two rows, one per reply. torch
hands a two-row product to its BLAS as a general matrix product; on the AMD EPYC (AVX2,
MKL) this project runs on, that took 1.5-2.5x the time of a single row in float32 (the
output layer: 36 ms against 14 ms), so the pair's step cost 1.6x one reply's. The same
product as a batch of two one-row products (`torch.bmm` over the weight, expanded, not
copied) took what one row takes: the second read of a layer's weights comes from the cache.
In bf16 without native bf16 arithmetic it was the other way round (1.0-1.3x slower).

So nothing is assumed: `install` times both kernels on the model's own weights, shape by
shape (1.8 s for the 135M model in float32 on that CPU, in a fresh thread), and switches a
layer only where the batched one is clearly faster; `--pair-kernels off` leaves every layer
alone. A timing run goes through every layer of a shape in turn, as a decode step does, so
their weights come from memory, not from a cache the previous run warmed. A switched layer
takes the batched kernel only for an input of exactly two rows with gradients off - a
pair's decode steps, and the output layer at the pair's prefill (transformers keeps only
the last position's logits); other prefills, training and every other batch size run
torch's own. The results agree to float rounding (~1e-5 in float32), not bit for bit. If
the timing fails, the model keeps torch's kernels and the log says why. A shape whose batched
kernel is over 3x slower on the first timed pass is decided there.

Left out: GPUs (`install` does nothing off the CPU; not measured there), quantized layers,
batches of more than two rows (four rows gained 3-18% in float32 here, too little to time
for).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from chatbot.threads import in_fresh_thread

log = logging.getLogger(__name__)

# The batched kernel must beat torch's by this factor on a shape to be used for it.
MARGIN = 0.9
REPEATS = 5  # timed passes of each kernel through the layers of a shape
# A shape whose batched kernel takes more than this many times torch's on the first timed pass
# is decided then: the output layer's in bf16 on an AMX Xeon took 40x (217 against 5.6 ms), and
# its five more passes were 1.1 s of every start.
CLEARLY_SLOWER = 3.0


class PairLinear(torch.nn.Linear):
    """nn.Linear whose two-row products, without gradients, are two matrix-vector products."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.numel() != 2 * self.in_features or x.shape[-1] != self.in_features
                or torch.is_grad_enabled()):
            return super().forward(x)
        return two_rows(x.reshape(2, 1, self.in_features), self.weight,
                        self.bias).view(*x.shape[:-1], self.out_features)


def two_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (2, 1, in) times weight (out, in)^T, plus bias: two matrix-vector products."""
    batched = weight.t().expand(2, -1, -1)
    if bias is None:
        return torch.bmm(x, batched)
    return torch.baddbmm(bias.view(1, 1, -1).expand(2, 1, -1), x, batched)


def _plain_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in model.modules() if type(m) is torch.nn.Linear]


def median_seconds(first: Callable[[], object], second: Callable[[], object]
                   ) -> tuple[float, float]:
    """Median seconds of a call of `first` and of `second`, timed in turn over REPEATS passes
    after a warm-up; where `second` takes over CLEARLY_SLOWER times `first` on the first timed
    pass, that pass decides."""
    times: tuple[list[float], list[float]] = ([], [])
    for repeat in range(REPEATS + 1):  # the first is a warm-up
        for kernel, kept in zip((first, second), times):
            started = time.perf_counter()
            kernel()
            if repeat:
                kept.append(time.perf_counter() - started)
        if repeat and times[1][-1] > CLEARLY_SLOWER * times[0][-1]:
            break  # no median of the rest would make it win
    return statistics.median(times[0]), statistics.median(times[1])


def time_kernels(layers: list[torch.nn.Linear]) -> tuple[float, float]:
    """Median seconds of a two-row product through every one of `layers` (all of one shape)
    by torch's kernel and by the batched one (PairLinear's), the two alternating."""
    weight = layers[0].weight
    x = torch.randn(2, 1, weight.shape[1], dtype=weight.dtype, device=weight.device)

    def through_layers(kernel):
        def run() -> None:
            for layer in layers:
                kernel(layer.weight, layer.bias)
        return run

    with torch.inference_mode():
        return median_seconds(through_layers(lambda w, b: F.linear(x, w, b)),
                              through_layers(lambda w, b: two_rows(x, w, b)))


def install(model: torch.nn.Module, choose: Callable[[torch.nn.Linear], bool] | None = None
            ) -> dict[tuple[int, int], dict]:
    """Switch the model's plain linear layers to PairLinear where the batched kernel is faster
    for their weight's shape. `choose(layer)` decides for a shape (default: time both).
    Returns, per shape, whether it was switched and the times that decided it (per pass
    through the layers of that shape)."""
    layers = _plain_linears(model)
    if not layers or any(layer.weight.device.type != "cpu" for layer in layers):
        return {}
    by_shape: dict[tuple[int, int], list[torch.nn.Linear]] = {}
    for layer in layers:
        by_shape.setdefault(tuple(layer.weight.shape), []).append(layer)

    def decide() -> dict[tuple[int, int], dict]:
        report = {}
        for shape, alike in by_shape.items():
            if choose is not None:
                report[shape] = {"batched": bool(choose(alike[0]))}
                continue
            torch_s, batched_s = time_kernels(alike)
            report[shape] = {"batched": batched_s < MARGIN * torch_s,
                             "torch_ms": 1000 * torch_s, "batched_ms": 1000 * batched_s}
        return report

    started = time.perf_counter()
    try:
        report = in_fresh_thread(decide, name="pair-kernels")
    except Exception as exc:  # noqa: BLE001 - a model that runs slower, never one that fails
        log.warning("pair decode: could not time the kernels (%s); torch's kernels throughout",
                    exc)
        return {}
    seconds = time.perf_counter() - started
    for layer in layers:
        if report[tuple(layer.weight.shape)]["batched"]:
            layer.__class__ = PairLinear
    switched = sum(type(layer) is PairLinear for layer in layers)
    log.info("pair decode: %d of %d linear layers take two matrix-vector products (timed in "
             "%.2f s: %s)", switched, len(layers), seconds, ", ".join(
                 f"{s[0]}x{s[1]} " + (f"{r['batched_ms']:.2f} vs {r['torch_ms']:.2f} ms"
                                     if "torch_ms" in r else "chosen")
                 + (" switched" if r["batched"] else "") for s, r in report.items()))
    return report
