"""shared-prompts: forward+backward (a training step's pass) and forward (scoring) over a micro
batch of pairs, with each pair's prompt read once against one row per reply, at several prompt
lengths: where learner/batch.py's SHARE_AT threshold comes from.

    python -m bench shared-prompts [--prompt-tokens 38,64,100,300] [--reply-tokens 64]

The prompts and replies are random tokens of fixed length (±4 for prompts); the adapter is a
fresh LoRA. Left out: the rest of a round (`bench learner`), more than one micro batch.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from pathlib import Path

import torch

from bench.common import RESULTS, device_tag, write_result
from chatbot.config import Config, add_model_args
from chatbot.model import load_model
from learner.batch import Sample, collate, prompt_tokens_saved, token_logprobs
from learner.scoring import MICRO_BATCH


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt-tokens", default="38,64,100,300",
                        help="prompt lengths (default: 38,64,100,300; 38 is a one-line "
                             "question in the embedded model's chat template)")
    parser.add_argument("--reply-tokens", type=int, default=64, help="reply length (default: 64)")
    parser.add_argument("--repeats", type=int, default=4, help="timed passes each (default: 4)")
    parser.add_argument("--out", default=None, help="result folder (default: bench/results)")
    add_model_args(parser)


def pairs(prompt_tokens: int, reply_tokens: int, rng: random.Random) -> list[Sample]:
    samples = []
    for _ in range(MICRO_BATCH // 2):
        prompt = [rng.randrange(1000, 40000)
                  for _ in range(max(1, prompt_tokens + rng.randrange(-4, 5)))]
        for _ in range(2):
            reply = [rng.randrange(1000, 40000) for _ in range(reply_tokens)]
            samples.append(Sample(0, prompt, reply, [0.0] * reply_tokens))
    return samples


def run(args: argparse.Namespace) -> Path:
    from peft import LoraConfig, get_peft_model

    config = Config.from_args(args)
    loaded = load_model(config, training=True)
    model = get_peft_model(loaded.model, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                                    target_modules="all-linear",
                                                    task_type="CAUSAL_LM"))
    pad = loaded.tokenizer.pad_token_id
    rows = []
    for prompt_tokens in [int(n) for n in args.prompt_tokens.split(",")]:
        samples = pairs(prompt_tokens, args.reply_tokens, random.Random(prompt_tokens))
        plain = collate(samples, pad, loaded.device, share_at=math.inf)
        shared = collate(samples, pad, loaded.device, share_at=0.0)
        times = {"rows": ([], []), "shared": ([], [])}
        for _ in range(args.repeats + 1):  # the first of each is a warm-up
            for name, b in (("rows", plain), ("shared", shared)):
                started = time.perf_counter()
                token_logprobs(model, b).sum().backward()
                times[name][0].append(time.perf_counter() - started)
                started = time.perf_counter()
                with torch.no_grad():
                    token_logprobs(model, b)
                times[name][1].append(time.perf_counter() - started)
        model.zero_grad(set_to_none=True)
        med = {name: [statistics.median(t[1:]) for t in pair] for name, pair in times.items()}
        rows.append({"prompt_tokens": prompt_tokens,
                     "tokens_saved_share": prompt_tokens_saved(samples),
                     "forward_backward_seconds": {k: v[0] for k, v in med.items()},
                     "forward_seconds": {k: v[1] for k, v in med.items()},
                     "shared_over_rows_forward_backward": med["shared"][0] / med["rows"][0],
                     "shared_over_rows_forward": med["shared"][1] / med["rows"][1],
                     "shared_by_default": collate(samples, pad).shared is not None})
        print(rows[-1])
    settings = {**config.as_dict(), "reply_tokens": args.reply_tokens,
                "repeats": args.repeats, "micro_batch": MICRO_BATCH,
                "threads": torch.get_num_threads()}
    return write_result(f"shared-prompts-{device_tag(loaded)}", settings, {"rows": rows},
                        Path(args.out) if args.out else RESULTS)
