"""swap: hot-swap latency (median and max over --swaps swaps, ms) against reloading the model,
and the process memory before and after --memory-swaps swaps.

Two times per swap: the whole `sync()` (read the registry, verify the files against the
manifest, parse the weights, copy them in), and the part of it that holds the write lock, the
only part that holds back a reply (`blocking_ms`).

    python -m bench swap [--swaps 20] [--memory-swaps 100]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import torch

from bench.common import RESULTS, device_tag, write_result
from chatbot import adapters
from chatbot.config import Config, add_model_args
from chatbot.hotswap import LiveAdapter
from chatbot.model import load_model
from chatbot.store import Store


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--swaps", type=int, default=20, help="timed swaps (default: 20)")
    parser.add_argument("--memory-swaps", type=int, default=100,
                        help="swaps between the two memory readings (default: 100)")
    parser.add_argument("--versions", type=int, default=4,
                        help="distinct adapter versions to cycle through (default: 4)")
    parser.add_argument("--out", default=None, help="result folder (default: bench/results)")
    add_model_args(parser)


def publish_versions(config: Config, store: Store, count: int) -> None:
    """Publish `count` LoRA adapters with random weights, as a learner would."""
    from peft import LoraConfig, get_peft_model

    for version in range(1, count + 1):
        torch.manual_seed(version)
        peft_model = get_peft_model(load_model(config).model, LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, target_modules="all-linear",
            init_lora_weights=False))
        folder, sha = adapters.publish(config.adapters_dir, version, peft_model.save_pretrained,
                                       base_model="bench", parent_version=version - 1,
                                       metrics={})
        store.finish_round(f"r{version}", {
            "version": version, "path": folder.name, "parent_version": version - 1,
            "base_model": "bench", "sha256": sha, "status": "rejected"}, {"status": "rejected"})
        del peft_model
        gc.collect()


def run(args: argparse.Namespace) -> Path:
    process = psutil.Process()
    with tempfile.TemporaryDirectory(prefix="duet-bench-") as data_dir:
        config = dataclasses.replace(Config.from_args(args), data_dir=Path(data_dir))
        store = Store(config.db_path)
        publish_versions(config, store, args.versions)
        started = time.perf_counter()
        loaded = load_model(config)
        reload_seconds = time.perf_counter() - started
        live = LiveAdapter(loaded.model, "bench", store, config.adapters_dir)

        blocking = []

        def swap(_: int) -> float:
            store.set_live(live.version % args.versions + 1)  # the next version, never the same
            started = time.perf_counter()
            assert live.sync(), live.last_error
            if loaded.device.type == "cuda":
                torch.cuda.synchronize()
            blocking.append(live.last_blocking_ms)
            return time.perf_counter() - started

        for i in range(args.versions):  # warm-up: each version once
            swap(i)
        blocking.clear()
        timings = [swap(i) for i in range(args.swaps)]
        blocked = blocking[:]
        gc.collect()
        rss_before = process.memory_info().rss
        cuda_before = torch.cuda.memory_allocated() if torch.cuda.is_available() else None
        for i in range(args.memory_swaps):
            swap(i)
        gc.collect()
        rss_after = process.memory_info().rss
        cuda_after = torch.cuda.memory_allocated() if torch.cuda.is_available() else None
        tag = device_tag(loaded)
    results = {
        "swap_ms_median": 1000 * statistics.median(timings),
        "swap_ms_max": 1000 * max(timings),
        "blocking_ms_median": statistics.median(blocked),
        "blocking_ms_max": max(blocked),
        "reload_model_seconds": reload_seconds,
        "reload_over_swap": reload_seconds / statistics.median(timings),
        "rss_mb_before": rss_before / 2**20, "rss_mb_after": rss_after / 2**20,
        "rss_mb_growth": (rss_after - rss_before) / 2**20,
        "cuda_mb_before": None if cuda_before is None else cuda_before / 2**20,
        "cuda_mb_after": None if cuda_after is None else cuda_after / 2**20,
        "swap_ms": [1000 * t for t in timings],
        "blocking_ms": blocked,
    }
    settings = {"model": config.model, "swaps": args.swaps, "memory_swaps": args.memory_swaps,
                "versions": args.versions, "lora_r": config.lora_r}
    return write_result(f"swap-{tag}", settings, results,
                        Path(args.out) if args.out else RESULTS)
