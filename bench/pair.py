"""pair: what do two replies cost? The median time of one two-reply batched generation over
the time of one reply alone (same prompt, same number of new tokens), and the time to the
first streamed token. Sequential generation would be 2.0.

    python -m bench pair [--new-tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from bench.common import RESULTS, device_tag, write_result
from chatbot.config import Config, add_model_args
from chatbot.model import load_model
from chatbot.sampling import PairGenerator
from chatbot.warp import sampling_kwargs

PROMPT = [{"role": "user", "content": "Explain why the sky is blue, in a few sentences."}]


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--new-tokens", type=int, default=64,
                        help="tokens generated per reply, forced (default: 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each (default: 5)")
    parser.add_argument("--out", default=None, help="result folder (default: bench/results)")
    add_model_args(parser)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> Path:
    config = dataclasses.replace(Config.from_args(args), max_new_tokens=args.new_tokens)
    loaded = load_model(config)
    generator = PairGenerator(loaded, config)
    prompt = torch.tensor([generator.prompt_ids(PROMPT)], device=loaded.device)
    model = loaded.model

    def generate(n: int) -> float:
        _sync(loaded.device)
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                           max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, num_return_sequences=n,
                           output_logits=True, return_dict_in_generate=True,
                           pad_token_id=loaded.tokenizer.pad_token_id,
                           **sampling_kwargs(config))
        _sync(loaded.device)
        return time.perf_counter() - started

    generate(1)  # warm-up
    generate(2)
    single, pair = [], []
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits both
        single.append(generate(1))
        pair.append(generate(2))
    first_token = []
    for _ in range(args.repeats):
        stream = generator.stream(PROMPT)
        started = time.perf_counter()
        for _texts in stream:
            first_token.append(time.perf_counter() - started)
            break
        stream._chunks.close()
    results = {
        "single_reply_seconds_median": statistics.median(single),
        "pair_seconds_median": statistics.median(pair),
        "pair_over_single": statistics.median(pair) / statistics.median(single),
        "time_to_first_token_seconds_median": statistics.median(first_token),
        "single_reply_seconds": single, "pair_seconds": pair,
        "time_to_first_token_seconds": first_token,
        "device": str(loaded.device), "quantize": loaded.quantize,
    }
    settings = {"model": loaded.model_id, "new_tokens": args.new_tokens,
                "repeats": args.repeats, "temperature": config.temperature,
                "top_p": config.top_p}
    return write_result(f"pair-{device_tag(loaded)}", settings, results,
                        Path(args.out) if args.out else RESULTS)
