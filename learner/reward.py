"""A reward model fitted on the votes, to score replies the learner samples for itself.

Votes are scarce: one vote is one comparison. The InstructGPT step (Ouyang et al. 2022)
turns comparisons into a reward model, and the reward model into as many on-policy samples
as the learner can afford: each round the learner samples fresh pairs on earlier prompts from
its own weights, the reward model scores them, and they join the round's policy-gradient
samples beside the votes.

The model is Bradley-Terry, P(chosen > rejected) = sigmoid(r(chosen) - r(rejected)), with a
linear reward r(y) = w . phi(y) on frozen features of the base model: the mean and the max over
the reply's tokens of the last hidden state (the max lets one token - a number, a word - show
up however long the reply). The features come from the base model with the adapter off, so a
reply's reward never drifts as the policy moves. w is fitted from scratch each round by
L2-regularised logistic regression on standardised feature differences, the strength chosen
by cross-validation over the votes; its cross-validated accuracy says whether it knows
anything yet, and until it beats a coin (one-sided 10%) it scores nothing.

Left out: fine-tuning the features, ensembles, per-user reward models.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from learner.objectives import damp_negative

STRENGTHS = (0.01, 0.1, 1.0, 10.0)  # L2 strengths tried
FOLDS = 4
EVIDENCE_Z = 1.28  # how far above a coin its cross-validated accuracy must be (one-sided 10%)


def reply_features(model, batch) -> torch.Tensor:
    """(B, 2H): mean and max of the last hidden state over each row's reply tokens."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, logits_to_keep=1, use_cache=False,
                output_hidden_states=True)
    hidden = out.hidden_states[-1][:, -batch.reply_width:].float()  # (B, R, H)
    mask = batch.mask[..., None]  # (B, R, 1)
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    peak = hidden.masked_fill(mask == 0, float("-inf")).amax(1)
    return torch.cat([mean, peak], dim=-1)


def _fit(diffs: torch.Tensor, strength: float, steps: int = 50) -> torch.Tensor:
    """w minimising mean log(1 + exp(-diffs @ w)) + strength / 2 |w|^2 (LBFGS)."""
    w = torch.zeros(diffs.shape[1], dtype=diffs.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.softplus(-diffs @ w).mean() + 0.5 * strength * w.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach()


@dataclass
class RewardModel:
    weights: torch.Tensor  # (2H,) on standardised features
    centre: torch.Tensor
    scale: torch.Tensor
    strength: float
    cv_accuracy: float  # cross-validated share of vote pairs it orders right
    pairs: int

    @property
    def knows_something(self) -> bool:
        """Its cross-validated accuracy beats a coin at the one-sided 10% level."""
        return self.cv_accuracy > 0.5 + EVIDENCE_Z * 0.5 / self.pairs ** 0.5

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """Reward of each reply (N,) from its features (N, 2H)."""
        return ((features.double() - self.centre) / self.scale) @ self.weights

    def prefers(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """P(a > b) for paired rows of features."""
        return torch.sigmoid(self.score(a) - self.score(b))


def fit_reward_model(chosen: torch.Tensor, rejected: torch.Tensor,
                     rng: random.Random | None = None) -> RewardModel | None:
    """Bradley-Terry on (P, 2H) features of chosen and rejected replies; None under 4 pairs."""
    n = chosen.shape[0]
    if n < 4:
        return None
    both = torch.cat([chosen, rejected]).double()
    centre, scale = both.mean(0), both.std(0).clamp(min=1e-6)
    diffs = (chosen.double() - rejected.double()) / scale  # (P, 2H); the centre cancels
    order = list(range(n))
    (rng or random.Random(0)).shuffle(order)
    folds = [order[i::FOLDS] for i in range(min(FOLDS, n))]
    best = (-1.0, STRENGTHS[0])
    for strength in STRENGTHS:
        right = 0.0
        for fold in folds:
            held = set(fold)
            train = [i for i in order if i not in held]
            w = _fit(diffs[train], strength)
            margins = diffs[fold] @ w
            right += float((margins > 0).sum() + 0.5 * (margins == 0).sum())
        best = max(best, (right / n, strength))
    accuracy, strength = best
    return RewardModel(_fit(diffs, strength), centre, scale, strength, accuracy, n)


MIN_PAIRS = 8  # votes before a reward model is fitted at all


class SelfSampler:
    """Each round: fit the reward model on the voted pairs, sample `prompts` fresh pairs from
    the policy's current weights on earlier prompts, and return them as samples whose
    advantages are the reward model's preference (RLOO with k = 2 on rewards (p, 1 - p))."""

    def __init__(self, model, tokenizer, config, device, pad_id: int,
                 rng: random.Random) -> None:
        self.model = model  # the learner's PeftModel
        self.tokenizer = tokenizer
        self.config = config
        self.device = device
        self.pad_id = pad_id
        self.rng = rng
        self._features: dict[int, torch.Tensor] = {}  # reply id -> base-model features
        self._next_id = -1  # sampled replies are not in the DB: negative ids

    def features(self, samples: list) -> torch.Tensor:
        from learner.batch import collate

        todo = [s for s in samples if s.reply_id not in self._features]
        with torch.no_grad(), self.model.disable_adapter():
            for i in range(0, len(todo), 8):
                micro = todo[i:i + 8]
                rows = reply_features(self.model, collate(micro, self.pad_id, self.device))
                for sample, row in zip(micro, rows):
                    self._features[sample.reply_id] = row
        return torch.stack([self._features[s.reply_id] for s in samples])

    def samples(self, voted: list, judged: list) -> tuple[list, dict]:
        """(samples, stats). `voted`: the pairs the reward model learns from; `judged`: the
        round's new pairs, on which its accuracy is measured before it has seen them."""
        if self.config.self_samples <= 0 or len(voted) < MIN_PAIRS:
            return [], {}
        rm = fit_reward_model(self.features([p.chosen for p in voted]),
                              self.features([p.rejected for p in voted]), self.rng)
        stats = {"reward_model_cv_acc": rm.cv_accuracy, "reward_model_pairs": rm.pairs}
        if judged:
            p = rm.prefers(self.features([j.chosen for j in judged]),
                           self.features([j.rejected for j in judged]))
            stats["reward_model_new_acc"] = float(((p > 0.5).double()
                                                   + 0.5 * (p == 0.5).double()).mean())
        if not rm.knows_something:
            return [], stats
        prompts = list({tuple(p.chosen.prompt): p.chosen.prompt for p in voted}.values())
        prompts = self.rng.sample(prompts, min(self.config.self_samples, len(prompts)))
        samples = self.sample(prompts)
        feats = self.features(samples)
        preference = rm.prefers(feats[0::2], feats[1::2])  # (K,): reply A over reply B
        for i, p in enumerate(preference.tolist()):
            weight = self.config.negative_weight
            samples[2 * i].advantage = damp_negative(2 * p - 1, weight)
            samples[2 * i + 1].advantage = damp_negative(1 - 2 * p, weight)
        stats["self_samples"] = len(samples)
        return samples, stats

    def sample(self, prompts: list[list[int]]) -> list:
        """A pair of replies to each prompt from the policy's current weights, as samples with
        their behaviour log-probs and ids of their own (negative), in the prompts' order."""
        from chatbot.model import LoadedModel
        from chatbot.sampling import PairGenerator
        from learner.batch import Sample

        loaded = LoadedModel(self.model, self.tokenizer, "learner", "", self.device, "none")
        was_training = self.model.training
        self.model.eval()
        try:
            pairs = PairGenerator(loaded, self.config).sample_prompts(prompts)
        finally:
            self.model.train(was_training)
        samples = []
        for pair in pairs:
            for reply in pair.replies:
                samples.append(Sample(reply_id=self._next_id, prompt=pair.prompt_token_ids,
                                      reply=reply.token_ids, behaviour=reply.token_logprobs))
                self._next_id -= 1
        return samples
