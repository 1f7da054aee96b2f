"""The learning rule as pure functions over tensors: advantages, the clipped policy-gradient
loss with a KL penalty, DPO, and the adaptive KL coefficient.

The seed objective is J(theta) = E[R(s, a)] with gradient E[grad log pi(a|s) * R(s, a)], where
log pi(a|s) = sum_t log p(w_t | w_<t, s). Everything here is that estimator plus the standard
guards around it:

* Advantages. A pair vote A > B gives rewards (1, 0); with k = 2 samples the leave-one-out
  (RLOO) baseline of each is the other's reward, so the advantages are exactly (+1, -1)
  (Ahmadian et al. 2024, "Back to Basics"; TRL's RLOOTrainer computes r_i - mean_{j!=i} r_j).
  A tie gives (0, 0): no policy-gradient term. Absolute feedback (thumbs, "both bad") has no
  sibling to compare with, so it uses reward +-1 minus a running baseline of earlier absolute
  rewards, shrunk toward 0 so that "both bad" still teaches while the baseline is young.
* A trust region. Each token's ratio rho = pi_theta / pi_anchor is PPO-clipped to
  [1 - eps, 1 + eps] (Schulman et al. 2017). The worker passes as anchor the log-probs at the
  round's first step (the live weights), so a round moves each token's probability by at
  most ~eps whatever version sampled the reply (see steps.PolicyGradient.accumulate for why not the
  sampler's). At rho = 1 the gradient is exactly the seed's.
* KL penalty to the reference (the base model), per token, with the k3 estimator
  exp(ref - logp) - (ref - logp) - 1 (Schulman 2020, "Approximating KL divergence"), weighted
  by beta, which a proportional controller raises when the KL passes a budget (Ziegler et
  al. 2019's controller, with the initial beta as its floor).
* Bounds on the two terms that have none: a ratio past the clip on a negative advantage
  (the dual clip, Ye et al. 2020) and the k3 of a token pushed far below the reference
  (linear past a point). One AdamW step can move a token by several nats, past where the
  PPO clip stops its gradient, and with the step's gradient norm clipped at 1 a single such
  token then takes the whole step. Off here by default (0: the plain estimator); the
  product's config turns both on (chatbot/config.py, docs/learning.md).
* A correction (a person's rewrite, learner/data.py) trains with -A log pi, no ratio and no
  clip: see `policy_gradient_loss`.
* Length-neutral votes (optional, `--length-neutral`): a pair vote's advantages less what
  the replies' lengths alone predict (`length_neutral`), so that a person who breaks ties
  toward the shorter reply does not teach brevity in place of what they prefer.
* Token sums are divided by a constant (sequences x longest reply), not by each reply's own
  length, so long and short replies are not re-weighted (Liu et al. 2025, "Dr. GRPO").
* DPO (Rafailov et al. 2023) on the same pairs, as a second objective for comparison.

Left out on purpose: a value network (RLOO needs none), entropy bonuses, importance weights
to the sampling version (the pairwise contrast needs none to point the right way), and
per-token rewards. The reward model of learner/reward.py only adds samples; the votes
themselves keep their +-1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantages: r_i minus the mean of the other samples' rewards.

    rewards: (G, k) rewards of k samples for each of G prompts, k >= 2.
    """
    k = rewards.shape[-1]
    assert k >= 2, "leave-one-out needs at least two samples"
    baseline = (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)
    return rewards - baseline


def damp_negative(advantage: float, negative_weight: float) -> float:
    """Scale a negative pair advantage by `negative_weight` (1 = plain RLOO, 0 = the chosen
    reply only). Pushing a sampled reply's tokens down spreads its mass over the rest of the
    vocabulary, which raises entropy and tends to lengthen replies; with two samples the
    rejected reply's term is the baseline, whose expectation is zero, so damping it keeps the
    direction of the seed's estimator in expectation (REINFORCE with rewards (1, 0) and no
    baseline at weight 0) and trades some variance for less of that drift."""
    return advantage if advantage >= 0 else advantage * negative_weight


def reply_words(text: str) -> int:
    """A reply's length as its reader sees it."""
    return len(text.split())


def shorter_reply_won(choice: str, a: str, b: str) -> bool | None:
    """Did the shorter reply win the pair vote `choice` ("A" or "B") between replies with
    texts `a` and `b`? None where they are of the same length."""
    if reply_words(a) == reply_words(b):
        return None
    return (choice == "A") == (reply_words(a) < reply_words(b))


def shorter_win_rate(outcomes: list[bool], prior_count: float = 4.0) -> float:
    """The share of pair votes the shorter reply won (`outcomes`: True where it did, one per
    vote between replies of different lengths), counting `prior_count` extra votes split
    evenly, so that a few votes do not read as a rule."""
    return (sum(outcomes) + prior_count / 2) / (len(outcomes) + prior_count)


def trailing_shorter_win_rate(outcomes: list[tuple[int, bool]], vote_id: int | None,
                              window: int) -> float:
    """The shorter-won rate (`shorter_win_rate`) a pair vote's length-neutral shift reads.

    `outcomes`: (vote id, did the shorter reply win) of the used votes between replies of
    different lengths, oldest first. With `window` 0, over all of them: one rate for every
    vote. Otherwise over the `window` newest of those cast before vote `vote_id` (before any
    for None: a vote no round has used yet is newer than those): the rate at the time the
    vote was cast. The share of votes that length decides drifts as the policy learns (once
    most replies have the feature a person wants, their ties to the shorter reply decide
    more votes), and a rate over all votes then lags the newest ones; a vote's own outcome is
    never in its rate.
    """
    if window <= 0:
        return shorter_win_rate([won for _, won in outcomes])
    before = [won for other, won in outcomes if vote_id is None or other < vote_id]
    return shorter_win_rate(before[-window:])


RESCALE_MAX = 4.0  # the most a length-neutral vote's advantages are multiplied by


def length_neutral(advantages: tuple[float, float], words: tuple[int, int],
                   shorter_wins: float, strength: float = 1.0,
                   rescale: bool = False) -> tuple[float, float]:
    """A pair vote's advantages (A, B) less what the replies' lengths alone predict.

    A model that knows only which reply is shorter expects it to win `shorter_wins` of the
    votes: reward p for the shorter, 1 - p for the longer. Subtracting those expectations
    from the rewards (1, 0) before the leave-one-out step moves the shorter reply's advantage
    by -(2p - 1) and the longer one's by +(2p - 1). Averaged over votes, the gradient then has
    no component along "shorter" (or "longer") that length alone explains, while a vote the
    longer reply won for what it says counts more (a length-controlled reward, as in Dubois
    et al. 2024's length-controlled win rate; R-DPO, Park et al. 2024, regularises DPO's
    margin by length to the same end). `strength` scales the shift: 0 leaves the advantages
    as they are. Replies of equal length keep theirs.

    The shift also shrinks the votes: with advantages +-1 and shift s, a vote's mean |advantage|
    is 1 - s (2p - 1), which is 4p(1 - p) at full strength (0.29 where the shorter reply wins
    92% of the votes), while the KL penalty keeps its weight: the policy of a person whose
    votes length mostly explains is held closer to the base than anyone else's. `rescale`
    divides the shifted advantages by that mean (at most RESCALE_MAX times), so every voter's
    votes pull against the KL penalty as hard as unshifted votes would (at strength 1 still
    with no push along "shorter" on average; below 1 the push left is scaled up with them).
    """
    if words[0] == words[1]:
        return advantages
    taste = 2.0 * shorter_wins - 1.0
    shift = strength * taste
    scale = 1.0 / max(1.0 - shift * taste, 1.0 / RESCALE_MAX) if rescale else 1.0
    if words[0] < words[1]:
        return (advantages[0] - shift) * scale, (advantages[1] + shift) * scale
    return (advantages[0] + shift) * scale, (advantages[1] - shift) * scale


def pair_rewards(choice: str) -> tuple[float, float] | None:
    """Rewards of replies (A, B) for a pairwise vote; None when the vote is not pairwise."""
    return {"A": (1.0, 0.0), "B": (0.0, 1.0), "tie": (0.5, 0.5)}.get(choice)


def running_baseline_advantages(rewards: list[float], window: int = 64,
                                prior_count: float = 4.0) -> list[float]:
    """Advantage of each absolute reward: itself minus the mean of the ones before it.

    The mean covers the last `window` earlier rewards and counts `prior_count` extra rewards
    of 0, so the first "both bad" still gets -1 and a run of them fades rather than vanishes.
    """
    advantages = []
    for i, reward in enumerate(rewards):
        recent = rewards[max(0, i - window):i]
        baseline = sum(recent) / (len(recent) + prior_count)
        advantages.append(reward - baseline)
    return advantages


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor,
          linear_beyond: float = 0.0) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref); >= 0, differentiable through logp.
    `linear_beyond` > 0: where logp is more than that many nats below ref_logp, the estimate
    continues along its tangent there (value and slope continuous), so its gradient is at most
    e^linear_beyond - 1 per token instead of growing as e^(ref - logp)."""
    log_ratio = ref_logp - logp
    if linear_beyond <= 0:
        return torch.exp(log_ratio) - log_ratio - 1.0
    capped = torch.clamp(log_ratio, max=linear_beyond)
    return (torch.exp(capped) - capped - 1.0
            + (math.exp(linear_beyond) - 1.0) * (log_ratio - capped))


def policy_gradient_loss(logp: torch.Tensor, anchor_logp: torch.Tensor,
                         ref_logp: torch.Tensor | None, advantages: torch.Tensor,
                         mask: torch.Tensor, *, beta: float = 0.0, clip_eps: float = 0.2,
                         normalizer: float = 1.0, dual_clip: float = 0.0,
                         kl_linear_beyond: float = 0.0,
                         demonstration: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped policy-gradient loss with a per-token KL penalty. Minimise it.

    logp, anchor_logp, ref_logp, mask: (B, T) per-token values for B replies (mask 1 on
    reply tokens); advantages: (B,). `anchor_logp`: the log-probs the ratio rho is taken to
    (the worker passes those at the round's first step: see the module's docstring). Returns
    the loss and detached stats: kl (the plain k3 per token), clip_fraction (the share of
    tokens where a clip binds and passes no gradient; dual_clip_fraction, the dual clip's
    share of them), kl_loss (the KL penalty's part of the loss) and largest (`largest_term`).
    The loss is sum over replies and tokens of -min(rho A, clip(rho) A) + beta k3, divided by
    `normalizer`; at rho = 1 and beta = 0 its gradient is -sum_b A_b grad log pi(a_b)/normalizer.
    `demonstration`: (B,) True for rows a person wrote (a correction): their term is
    -A log pi, the seed's estimator itself, with no ratio and no clip. A trust region bounds
    how far a round moves the policy's own samples; a person's text is a target, and clipped
    at 1 + eps a token the policy gives 1% would need ~25 rounds to reach 10%. At rho = 1 the
    two terms have the same gradient.
    `dual_clip` c > 1: a negative advantage's token term is at most -c A (Ye et al. 2020), so a
    token of a rejected reply whose ratio rose past c passes no gradient; 0: unbounded.
    `kl_linear_beyond`: see `k3_kl`.
    """
    assert logp.shape == anchor_logp.shape == mask.shape and advantages.shape == logp.shape[:1]
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - anchor_logp)  # (B, T): to where the trust region is centred
    adv = advantages[:, None]  # (B, 1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    per_token = -torch.minimum(unclipped, clipped)  # (B, T)
    stopped = (clipped < unclipped).to(mask.dtype)  # the clip is binding: no gradient there
    dual = torch.zeros_like(stopped)
    if dual_clip > 0:
        bound = (-dual_clip * adv).expand_as(per_token)
        binds = (adv < 0) & (per_token > bound)
        per_token = torch.where(binds, bound, per_token)
        dual = binds.to(mask.dtype)
        stopped = torch.maximum(stopped, dual)
    sampled = mask  # the policy's own replies, not a person's rewrite
    if demonstration is not None:
        rows = demonstration[:, None]  # (B, 1)
        per_token = torch.where(rows, -adv * logp, per_token)
        stopped = torch.where(rows, torch.zeros_like(stopped), stopped)
        dual = torch.where(rows, torch.zeros_like(dual), dual)
        sampled = mask * (~rows).to(mask.dtype)
    tokens = max(mask.sum().item(), 1.0)
    stats = {"clip_fraction": (stopped * mask).sum().item() / tokens,
             "dual_clip_fraction": (dual * mask).sum().item() / tokens}
    kl_part = torch.zeros_like(per_token)
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp, kl_linear_beyond)
        kl_part = beta * kl
        per_token = per_token + kl_part
        plain = kl if kl_linear_beyond <= 0 else k3_kl(logp.detach(), ref_logp)
        stats["kl"] = ((plain * mask).sum() / mask.sum().clamp(min=1)).item()
    loss = (per_token * mask).sum() / normalizer
    stats["kl_loss"] = (kl_part.detach() * mask).sum().item() / normalizer
    stats["largest"] = largest_term(per_token.detach(), kl_part.detach(), logp.detach(),
                                    anchor_logp, ref_logp, adv, sampled)
    return loss, stats


def largest_term(per_token: torch.Tensor, kl_part: torch.Tensor, logp: torch.Tensor,
                 anchor_logp: torch.Tensor, ref_logp: torch.Tensor | None, adv: torch.Tensor,
                 mask: torch.Tensor) -> dict | None:
    """Where the loss is largest: among the tokens of `mask` (the policy's own replies: a
    person's rewrite has a term -A log pi that is large by nature, with a gradient of only A),
    the one with the largest term (before the normalizer), its KL share, its log-ratio to the
    trust region's anchor and its log-prob below the reference's, and its reply's advantage
    and row. A diagnostic for loss spikes: a term far above the rest is either the k3 KL of a
    token pushed far below the reference (kl close to term) or a ratio outside the clip's
    reach on a negative advantage."""
    if not mask.any():
        return None
    flat = torch.where(mask > 0, per_token, torch.full_like(per_token, -math.inf)).flatten()
    index = int(flat.argmax())
    row, col = divmod(index, per_token.shape[1])
    return {"term": float(flat[index]), "kl": float(kl_part[row, col]), "row": row,
            "token": int(col - (per_token.shape[1] - int(mask[row].sum().item()))),
            "log_ratio": float(logp[row, col] - anchor_logp[row, col]),
            "below_ref": (float(ref_logp[row, col] - logp[row, col])
                          if ref_logp is not None else None),
            "advantage": float(adv[row, 0])}


def larger(a: dict | None, b: dict | None) -> dict | None:
    """The larger of two `largest_term`s (None: none seen)."""
    return a if b is None or (a is not None and a["term"] >= b["term"]) else b


def dpo_loss(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor,
             chosen_ref_logp: torch.Tensor, rejected_ref_logp: torch.Tensor,
             beta: float = 0.1) -> torch.Tensor:
    """Mean DPO loss -log sigmoid(beta * delta) over pairs of summed sequence log-probs (P,).

    delta = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)); at
    delta = 0 the loss is ln 2.
    """
    delta = (chosen_logp - chosen_ref_logp) - (rejected_logp - rejected_ref_logp)
    return -F.logsigmoid(beta * delta).mean()


class AdaptiveKLController:
    """Proportional control of beta toward a target KL (Ziegler et al. 2019, section 2.2).

    beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon)
    """

    def __init__(self, beta: float, target: float, horizon: float = 10.0,
                 bounds: tuple[float, float] = (1e-4, 10.0)) -> None:
        self.beta = beta
        self.target = target
        self.horizon = horizon
        self.bounds = bounds

    def update(self, kl: float, n_steps: int = 1) -> float:
        if self.target > 0 and math.isfinite(kl):
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.beta *= 1.0 + error * n_steps / self.horizon
            self.beta = min(max(self.beta, self.bounds[0]), self.bounds[1])
        return self.beta

    def tripped(self, factor: float) -> float:
        """The KL passed the tripwire: beta jumps by `factor` on top of the proportional step
        (a few percent a round), within its bounds."""
        self.beta = min(max(self.beta * factor, self.bounds[0]), self.bounds[1])
        return self.beta
