"""swap: hot-swap latency (median and max over --swaps swaps, ms) against reloading the model,
the process memory before and after --memory-swaps swaps, and --load-swaps swaps made while
--load-clients users keep asking for pairs through the real ChatService, as the server does
(every request must be served: `failed_requests` counts those that were not).

Two times per swap: the whole `sync()` (read the registry, verify the files against the
manifest, parse the weights, copy them in), and the part of it that holds the write lock, the
only part that holds back a reply (`blocking_ms`).

    python -m bench swap [--swaps 20] [--memory-swaps 100] [--load-swaps 100]

Under load the write lock waits for the pairs in flight (they finish on the version they
started with), so a swap there takes about as long as the rest of a pair: that phase counts
failures and versions served, its times are not the swap's own cost.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from bench.common import RESULTS, device_tag, write_result
from chatbot import adapters
from chatbot.config import Config, add_model_args
from chatbot.hotswap import LiveAdapter
from chatbot.model import load_model
from chatbot.sampling import PairGenerator
from chatbot.service import ChatService
from chatbot.store import Store

LOAD_PROMPTS = ["Hello!", "Name a colour.", "What is rain?", "Tell me a joke."]


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--swaps", type=int, default=20, help="timed swaps (default: 20)")
    parser.add_argument("--memory-swaps", type=int, default=100,
                        help="swaps between the two memory readings (default: 100)")
    parser.add_argument("--versions", type=int, default=4,
                        help="distinct adapter versions to cycle through (default: 4)")
    parser.add_argument("--load-swaps", type=int, default=100,
                        help="swaps made while users keep asking for pairs (default: 100; "
                             "0 skips that phase)")
    parser.add_argument("--load-clients", type=int, default=2,
                        help="users asking for pairs back to back during them (default: 2)")
    parser.add_argument("--load-tokens", type=int, default=8,
                        help="reply length of their pairs, in tokens (default: 8)")
    parser.add_argument("--out", default=None, help="result folder (default: bench/results)")
    add_model_args(parser)


def publish_versions(config: Config, store: Store, count: int) -> None:
    """Publish `count` LoRA adapters with random weights, as a learner would."""
    from peft import LoraConfig, get_peft_model

    config = dataclasses.replace(config, pair_kernels="off")  # nothing here decodes
    for version in range(1, count + 1):
        torch.manual_seed(version)
        peft_model = get_peft_model(load_model(config, training=True).model, LoraConfig(
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
        under_load = (swaps_under_load(config, store, loaded, live, swap, args)
                      if args.load_swaps else None)
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
        "under_load": under_load,
    }
    settings = {"model": config.model, "swaps": args.swaps, "memory_swaps": args.memory_swaps,
                "versions": args.versions, "lora_r": config.lora_r,
                "load_swaps": args.load_swaps, "load_clients": args.load_clients,
                "load_tokens": args.load_tokens}
    return write_result(f"swap-{tag}", settings, results,
                        Path(args.out) if args.out else RESULTS)


def swaps_under_load(config: Config, store: Store, loaded, live: LiveAdapter, swap,
                     args: argparse.Namespace) -> dict:
    """--load-swaps swaps while --load-clients threads ask for pairs through ChatService (the
    server's path: the generator reads under the live adapter's lock, pairs are stored)."""
    config = dataclasses.replace(config, max_new_tokens=args.load_tokens)
    generator = PairGenerator(loaded, config, adapter_context=live.reading,
                              base_context=live.base)
    service = ChatService(config, store, generator, model_id="bench", live=live)
    stop = threading.Event()
    lock = threading.Lock()
    pair_seconds: list[float] = []
    failures: list[str] = []
    versions: collections.Counter = collections.Counter()
    pair_ids: list[str] = []

    def user(index: int) -> None:
        asked = 0
        while not stop.is_set():
            prompt = LOAD_PROMPTS[(index + asked) % len(LOAD_PROMPTS)]
            asked += 1
            started = time.perf_counter()
            try:
                result = service.ask(f"user{index}", prompt)
            except Exception as error:  # noqa: BLE001 - a failed request is what is counted
                with lock:
                    failures.append(f"{type(error).__name__}: {error}")
                continue
            with lock:
                pair_seconds.append(time.perf_counter() - started)
                versions[result["adapter_version"]] += 1
                pair_ids.append(result["pair_id"])

    users = [threading.Thread(target=user, args=(i,), daemon=True)
             for i in range(args.load_clients)]
    gc.collect()
    rss_before = psutil.Process().memory_info().rss
    for thread in users:
        thread.start()
    while not pair_seconds and not failures:  # the users are in the middle of their pairs
        time.sleep(0.05)
    started = time.perf_counter()
    timings, track = [], collections.defaultdict(list)
    for i in range(args.load_swaps):
        timings.append(swap(i))
        if (i + 1) % 10 == 0:  # a leak grows with the swaps (or the pairs); a warm-up settles
            track["rss_mb"].append(psutil.Process().memory_info().rss / 2**20)
            track["threads"].append(psutil.Process().num_threads())
            with lock:
                track["pairs"].append(len(pair_seconds))
            if torch.cuda.is_available():
                track["cuda_mb"].append(torch.cuda.memory_allocated() / 2**20)
    seconds = time.perf_counter() - started
    stop.set()
    for thread in users:
        thread.join()
    gc.collect()
    rss_after = psutil.Process().memory_info().rss
    stored = sum(store.pair(None, pair_id)["id"] == pair_id for pair_id in pair_ids)
    return {
        "swaps": len(timings), "seconds": seconds,
        "swap_ms_median": 1000 * statistics.median(timings),
        "swap_ms_max": 1000 * max(timings),
        "requests_served": len(pair_seconds), "failed_requests": len(failures),
        "failures": failures[:10],
        "pair_seconds_median": statistics.median(pair_seconds) if pair_seconds else None,
        "versions_served": {str(v): n for v, n in sorted(versions.items())},
        "rss_mb_before": rss_before / 2**20, "rss_mb_after": rss_after / 2**20,
        "rss_mb_growth": (rss_after - rss_before) / 2**20,
        "rss_mb_every_10_swaps": track["rss_mb"],
        # what came with the memory: pairs served so far, the process's threads (each pair
        # is sampled in a thread of its own) and, on a GPU, the CUDA memory allocated
        "pairs_every_10_swaps": track["pairs"],
        "threads_every_10_swaps": track["threads"],
        "cuda_mb_every_10_swaps": track["cuda_mb"] or None,
        "pairs_stored": stored,  # of requests_served: each served pair is in the store
    }
