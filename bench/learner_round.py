"""learner: seconds per learner round for 4, 16 and 64 voted pairs, against its floor - one
forward+backward of the policy plus one forward of the reference over the same tokens, timed
in the same run - and where a round's time goes, phase by phase (reference log-probs, the
live adapter's margins, training, the KL check, writing the adapter). The replies are the
worst case: every one is --reply-tokens long.

    python -m bench learner [--pairs 4,16,64] [--reply-tokens 64]

Left out: rounds with replayed votes (the first round has none to replay), the server's share
of vote-to-live (`bench latency` times that end to end).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import RESULTS, device_tag, write_result
from bench.simulate import load_prompts
from chatbot.config import Config, add_learner_args, add_model_args
from chatbot.model import load_model
from chatbot.store import Store
from learner.batch import Sample, collate, token_logprobs
from learner.clock import chunks
from learner.scoring import MICRO_BATCH
from learner.worker import Learner


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", default="4,16,64", help="round sizes (default: 4,16,64)")
    parser.add_argument("--reply-tokens", type=int, default=64,
                        help="length of every reply (default: 64)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed floors per size (default: 3)")
    parser.add_argument("--out", default=None, help="result folder (default: bench/results)")
    add_model_args(parser)
    add_learner_args(parser)


def fill_store(store: Store, loaded, n_pairs: int, reply_tokens: int, rng: random.Random):
    """n voted pairs with replies of fixed length and their true behaviour log-probs."""
    tokenizer, model = loaded.tokenizer, loaded.model
    prompts = load_prompts()
    vocab = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]
    for i in range(n_pairs):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": rng.choice(prompts)}], add_generation_prompt=True,
            tokenize=True, return_dict=False)
        replies = []
        for _ in range(2):
            ids = rng.sample(vocab, reply_tokens - 1) + [tokenizer.eos_token_id]
            batch = collate([Sample(0, prompt, ids, [0.0] * len(ids))], tokenizer.pad_token_id,
                            loaded.device)
            with torch.no_grad():
                logprobs = token_logprobs(model, batch)[0].tolist()
            replies.append({"text": tokenizer.decode(ids), "token_ids": ids,
                            "token_logprobs": logprobs, "behaviour_logprob": sum(logprobs),
                            "adapter_version": 0, "finish_reason": "stop",
                            "n_tokens": len(ids)})
        pair = {"prompt_token_ids": prompt, "adapter_version": 0, "temperature": 0.8,
                "top_p": 0.95, "max_new_tokens": reply_tokens, "seconds": 0.0,
                "first_token_seconds": 0.0}
        _, pair_id = store.add_turn("bench", None, f"prompt {i}", pair, replies)
        store.record_vote("bench", pair_id, "A" if i % 2 == 0 else "B")


def floor_seconds(learner: Learner, samples: list[Sample]) -> float:
    """One forward+backward of the policy and one reference forward over the samples."""
    device = learner.loaded.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    with torch.no_grad(), learner.model.disable_adapter():
        for micro in chunks(samples, MICRO_BATCH):
            token_logprobs(learner.model, collate(micro, learner.pad_id, device))
    for micro in chunks(samples, MICRO_BATCH):
        logp = token_logprobs(learner.model, collate(micro, learner.pad_id, device))
        logp.sum().backward()
    sync()
    learner.model.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def run(args: argparse.Namespace) -> Path:
    base = Config.from_args(args)
    rows, tag = [], None
    for n_pairs in [int(n) for n in args.pairs.split(",")]:
        with tempfile.TemporaryDirectory(prefix="duet-bench-") as data_dir:
            config = dataclasses.replace(base, data_dir=Path(data_dir),
                                         max_batch_votes=n_pairs)
            store = Store(config.db_path)
            loaded = load_model(config, training=True)
            tag = device_tag(loaded)
            fill_store(store, loaded, n_pairs, args.reply_tokens, random.Random(n_pairs))
            learner = Learner(config, store, loaded, seed=0)
            step = learner.round()
            phases = dict(learner.clock.seconds)
            samples = [Sample(r["id"], p["prompt_token_ids"], r["token_ids"], r["token_logprobs"])
                       for v in store.votes() for p in [store.pair(None, v["pair_id"])]
                       for r in p["replies"]]
            floors = [floor_seconds(learner, samples) for _ in range(args.repeats)]
            floor = statistics.median(floors)
            rows.append({"pairs": n_pairs, "round_seconds": step["seconds"],
                         "floor_seconds": floor, "round_over_floor": step["seconds"] / floor,
                         "steps_per_round": config.steps_per_round,
                         "trained_pairs": step["new_votes"],
                         "judged_pairs": step["judged_pairs"], "floors": floors,
                         "phase_seconds": phases,
                         "other_seconds": step["seconds"] - sum(phases.values())})
    settings = {**base.as_dict(), "reply_tokens": args.reply_tokens}
    return write_result(f"learner-{tag}", settings, {"rounds": rows},
                        Path(args.out) if args.out else RESULTS)
