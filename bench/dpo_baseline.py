"""The offline anchor of the learning suite: DPO trained for several epochs on the labelled
pairs themselves (the suite's `dpo` side: `--sides duet,trl,dpo`).

TRL's RLOOTrainer (bench/trl_baseline.py) spends each label once, on a pair it sampled at that
step. An offline trainer given the same labels may look at every labelled pair as often as it
likes; for preference pairs the standard recipe is DPO (Rafailov et al., 2023). For each
checkpoint k: the simulated user's first k prompts (the sequence Duet's simulation asks, same
seed) each get a pair sampled from the base model, the oracle labels it (a noisy oracle flips
votes, as it does for Duet), and a fresh LoRA of Duet's shape trains on those k pairs for
EPOCHS epochs of BATCH pairs, then the same Evaluator judges it. A tie is a label that gives
DPO nothing.

The loop is this file's own, on the exact sampled token ids (re-tokenised text would add an
end-of-turn token to every reply the length limit cut): loss = -log sigmoid(beta * ((log pi(c)
- log ref(c)) - (log pi(r) - log ref(r)))) with log-probs summed over each reply, the
reference being the base model (the LoRA switched off).

Left out: tuning. LR, BETA and EPOCHS are one setting, the usual ones for DPO on a LoRA, not a
sweep per oracle: the anchor is as strong as that setting is good.
"""

from __future__ import annotations

import logging
import random

import torch
import torch.nn.functional as F

from bench.oracles import Oracle
from bench.simulate import EVAL_BATCH, Evaluation, Evaluator
from chatbot.config import Config
from chatbot.model import load_model
from chatbot.replies import SampledPair
from chatbot.sampling import PairGenerator

log = logging.getLogger(__name__)

EPOCHS = 4
BATCH = 4
LR = 5e-4
BETA = 0.1


def labelled_pairs(config: Config, oracle: Oracle, train_prompts: list[str], labels: int,
                   seed: int) -> list[tuple[SampledPair, str]]:
    """`labels` pairs from the base model on the prompts Duet's simulation would ask, in its
    order (bench/simulate.py's Simulation: random.Random(seed).choice per vote), with the
    oracle's vote on each."""
    rng = random.Random(seed)
    prompts = [rng.choice(train_prompts) for _ in range(labels)]
    loaded = load_model(config)
    generator = PairGenerator(loaded, config)
    torch.manual_seed(seed)
    pairs = []
    for i in range(0, len(prompts), EVAL_BATCH):
        batch = [[{"role": "user", "content": p}] for p in prompts[i:i + EVAL_BATCH]]
        pairs += generator.sample_many(batch)
    return [(pair, oracle.prefer(pair.replies[0].text, pair.replies[1].text))
            for pair in pairs]


def reply_logprobs(model, pairs: list[tuple[list[int], list[int]]], pad_id: int,
                   device) -> torch.Tensor:
    """Summed log-prob of each (prompt, reply) under `model` as it is now."""
    from learner.batch import Sample, collate, token_logprobs

    batch = collate([Sample(0, prompt, reply, [0.0] * len(reply)) for prompt, reply in pairs],
                    pad_id, device)
    return token_logprobs(model, batch).sum(-1)


def train_dpo(config: Config, labelled: list[tuple[SampledPair, str]], seed: int):
    """A fresh LoRA on the base, trained by DPO on the pairs with a winner; returns the
    PeftModel and the number of pairs it trained on."""
    from peft import LoraConfig, get_peft_model

    loaded = load_model(config, training=True)
    torch.manual_seed(seed)
    model = get_peft_model(loaded.model, LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
        target_modules="all-linear", task_type="CAUSAL_LM"))
    pad = loaded.tokenizer.pad_token_id
    # (prompt, chosen, rejected) token ids; replies of no tokens cannot be scored.
    data = [(p.prompt_token_ids, p.replies[i].token_ids, p.replies[1 - i].token_ids)
            for p, vote in labelled if vote in ("A", "B")
            for i in [0 if vote == "A" else 1]
            if p.replies[0].token_ids and p.replies[1].token_ids]
    if not data:
        return model, 0
    ref = []  # (chosen, rejected) under the base, once
    with torch.no_grad(), model.disable_adapter():
        model.eval()
        for start in range(0, len(data), BATCH):
            chunk = data[start:start + BATCH]
            logp = reply_logprobs(model, [(pr, c) for pr, c, _ in chunk]
                                  + [(pr, r) for pr, _, r in chunk], pad, loaded.device)
            ref += list(zip(logp[:len(chunk)].tolist(), logp[len(chunk):].tolist()))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    order = random.Random(seed)
    for _ in range(EPOCHS):
        index = list(range(len(data)))
        order.shuffle(index)
        for start in range(0, len(index), BATCH):
            chunk = index[start:start + BATCH]
            logp = reply_logprobs(model, [(data[i][0], data[i][1]) for i in chunk]
                                  + [(data[i][0], data[i][2]) for i in chunk], pad,
                                  loaded.device)
            chosen, rejected = logp[:len(chunk)], logp[len(chunk):]
            ref_c = torch.tensor([ref[i][0] for i in chunk], device=logp.device)
            ref_r = torch.tensor([ref[i][1] for i in chunk], device=logp.device)
            loss = -F.logsigmoid(BETA * ((chosen - ref_c) - (rejected - ref_r))).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return model, len(data)


def run_dpo(config: Config, oracle: Oracle, train_prompts: list[str], eval_prompts: list[str],
            labels: int, checkpoints: list[int], seed: int = 0) -> list[Evaluation]:
    labelled = labelled_pairs(config, oracle, train_prompts, labels, seed)
    base = load_model(config)
    evaluator = Evaluator(config, oracle, eval_prompts, base.tokenizer, base.device, seed)
    evaluations = [evaluator.evaluate(base.model, 0, 0)]  # the base replies judge the rest
    for k in sorted(c for c in checkpoints if c > 0):
        model, trained = train_dpo(config, labelled[:k], seed)
        evaluation = evaluator.evaluate(model, k, k)
        log.info("DPO on %d labels (%d with a winner): %s", k, trained, evaluation)
        evaluations.append(evaluation)
    return evaluations if 0 in checkpoints else evaluations[1:]
