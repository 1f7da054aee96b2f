"""The pair's decode step on a CPU: its linear layers as two matrix-vector products, where the
CPU computes those faster than one two-row matrix product.

A decode step of the pair multiplies every weight matrix by two rows, one per reply. torch
hands a two-row product to its BLAS as a general matrix product; on the AMD EPYC (AVX2,
MKL) this project runs on, that took 1.5-2.5x the time of a single row in float32 (the
output layer: 36 ms against 14 ms), so the pair's step cost 1.6x one reply's. The same
product as a batch of two one-row products (`torch.bmm` over the weight, expanded, not
copied) took what one row takes: the second read of a layer's weights comes from the cache.
In bf16 without native bf16 arithmetic it was the other way round (1.0-1.3x slower).

So nothing is assumed: `install` times both kernels on each of the model's own weight shapes
(a few hundred ms for the 135M model, in a fresh thread) and switches a layer only where the
batched one is clearly faster, and `--pair-kernels off` leaves every layer alone. A switched
layer takes the other kernel only for an input of exactly two rows with gradients off: the
prefill, training and every other batch size run torch's own. The results agree to float
rounding (~1e-5), not bit for bit.

Left out: GPUs (their matrix products have no such gap), quantized layers, batches of more
than two rows (four rows gained 3-18% in float32 here, too little to calibrate for).
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# The batched kernel must beat torch's by this factor on a shape to be used for it.
MARGIN = 0.9
REPEATS = 5


class PairLinear(torch.nn.Linear):
    """nn.Linear whose two-row products, without gradients, are two matrix-vector products."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != 2 * self.in_features or torch.is_grad_enabled():
            return super().forward(x)
        out = torch.bmm(x.reshape(2, 1, self.in_features), self.weight.t().expand(2, -1, -1))
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)


def _plain_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in model.modules() if type(m) is torch.nn.Linear]


def _median_seconds(run: Callable[[], object]) -> float:
    run()
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def time_kernels(weight: torch.Tensor) -> tuple[float, float]:
    """Median seconds of a two-row product with `weight` by torch's kernel and by the
    batched one (PairLinear's), interleaved."""
    x = torch.randn(2, 1, weight.shape[1], dtype=weight.dtype, device=weight.device)
    batched = weight.t().expand(2, -1, -1)
    with torch.inference_mode():
        return (_median_seconds(lambda: F.linear(x, weight)),
                _median_seconds(lambda: torch.bmm(x, batched)))


def _in_fresh_thread(work: Callable[[], object]) -> object:
    """work() in a thread of its own: a thread that ran a parallel torch op keeps an idle
    OpenMP team, which slows every other thread's (chatbot/sampling.py, "Threads")."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = work()
        except Exception as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=run, name="pair-kernels")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def install(model: torch.nn.Module, choose: Callable[[torch.Tensor], bool] | None = None
            ) -> dict[tuple[int, int], dict]:
    """Switch the model's plain linear layers to PairLinear where the batched kernel is faster
    for their weight's shape. `choose(weight)` decides for a shape (default: time both).
    Returns, per shape, whether it was switched and the times that decided it."""
    layers = _plain_linears(model)
    if not layers or layers[0].weight.device.type != "cpu":
        return {}
    weights = {tuple(m.weight.shape): m.weight for m in layers}

    def decide() -> dict[tuple[int, int], dict]:
        report = {}
        for shape, weight in weights.items():
            if choose is not None:
                report[shape] = {"batched": bool(choose(weight))}
                continue
            torch_s, batched_s = time_kernels(weight.detach())
            report[shape] = {"batched": batched_s < MARGIN * torch_s,
                             "torch_ms": 1000 * torch_s, "batched_ms": 1000 * batched_s}
        return report

    started = time.perf_counter()
    report = _in_fresh_thread(decide)
    seconds = time.perf_counter() - started
    switched = 0
    for layer in layers:
        if report[tuple(layer.weight.shape)]["batched"]:
            layer.__class__ = PairLinear
            switched += 1
    log.info("pair decode: %d of %d linear layers take two matrix-vector products (timed in "
             "%.2f s: %s)", switched, len(layers), seconds, ", ".join(
                 f"{s[0]}x{s[1]} " + (f"{r['batched_ms']:.2f} vs {r['torch_ms']:.2f} ms"
                                     if "torch_ms" in r else "chosen")
                 + (" switched" if r["batched"] else "") for s, r in report.items()))
    return report
