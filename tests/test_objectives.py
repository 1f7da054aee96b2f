"""The learning rule on hand-made tensors, against the seed's worked example and reference
numbers (TRL's RLOO advantage formula, the DPO loss)."""

from __future__ import annotations

import math

import pytest
import torch

from learner.objectives import (
    AdaptiveKLController,
    dpo_loss,
    k3_kl,
    pair_rewards,
    policy_gradient_loss,
    rloo_advantages,
    running_baseline_advantages,
)


def test_seed_worked_example_two_answer_softmax():
    """p = (0.4, 0.6), rewards (1, 2): the estimator is grad log pi(a1)*1 + grad log pi(a2)*2,
    which is (-0.2, +0.2) with respect to the logits."""
    logits = torch.log(torch.tensor([0.4, 0.6])).requires_grad_()
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all[[0, 1]][:, None]  # (B=2 answers, T=1 token each)
    loss, _ = policy_gradient_loss(logp, logp.detach(), None, torch.tensor([1.0, 2.0]),
                                   torch.ones(2, 1), clip_eps=0.2, normalizer=1.0)
    loss.backward()
    ascent = -logits.grad
    assert torch.allclose(ascent, torch.tensor([-0.2, 0.2]), atol=1e-6)


def test_rloo_advantages_for_two_samples_are_plus_minus_one():
    rewards = torch.tensor([pair_rewards("A"), pair_rewards("B"), pair_rewards("tie")])
    assert rloo_advantages(rewards).tolist() == [[1.0, -1.0], [-1.0, 1.0], [0.0, 0.0]]


def test_rloo_matches_trl_formula_for_four_samples():
    # TRL: baseline = (sum of the group - r_i) / (k - 1); advantage = r_i - baseline
    rewards = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    expected = torch.tensor([[-2 / 3, 2 / 3, -2 / 3, 2 / 3]])
    assert torch.allclose(rloo_advantages(rewards), expected)


def test_dpo_loss_is_ln2_at_zero_margin_and_matches_a_hand_value():
    zeros = torch.zeros(3)
    assert dpo_loss(zeros, zeros, zeros, zeros).item() == pytest.approx(math.log(2))
    loss = dpo_loss(torch.tensor([-5.0]), torch.tensor([-7.0]), torch.tensor([-6.0]),
                    torch.tensor([-6.0]), beta=0.1)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.2)), rel=1e-6)


def test_ppo_clip_stops_pushing_past_the_trust_region():
    behaviour = torch.zeros(1, 1)
    advantages = torch.tensor([1.0])
    for log_ratio, expect_grad in [(0.5, False), (0.1, True), (-0.5, True)]:
        logp = torch.full((1, 1), log_ratio, requires_grad=True)
        loss, stats = policy_gradient_loss(logp, behaviour, None, advantages, torch.ones(1, 1))
        loss.backward()
        assert (logp.grad.abs().item() > 0) == expect_grad, log_ratio
        assert stats["clip_fraction"] == (1.0 if log_ratio == 0.5 else 0.0)


def test_masked_tokens_carry_no_loss():
    logp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    loss, _ = policy_gradient_loss(logp, logp.detach(), logp.detach() - 0.1, torch.tensor([1.0]),
                                   mask, beta=0.5)
    loss.backward()
    assert logp.grad[0, 0].item() == 0.0
    assert logp.grad[0, 1].item() != 0.0


def test_k3_is_nonnegative_zero_at_equality_and_close_to_kl():
    p = torch.tensor([0.2, 0.5, 0.3])
    q = torch.tensor([0.25, 0.45, 0.3])
    assert k3_kl(p.log(), p.log()).abs().max().item() == 0.0
    assert (k3_kl(p.log(), q.log()) >= 0).all()
    exact = (p * (p.log() - q.log())).sum()  # KL(p || q), tokens drawn from p
    estimate = (p * k3_kl(p.log(), q.log())).sum()
    assert estimate.item() == pytest.approx(exact.item(), abs=1e-3)


def test_kl_penalty_pulls_toward_the_reference():
    logp = torch.tensor([[-0.5]], requires_grad=True)
    loss, stats = policy_gradient_loss(logp, logp.detach(), torch.tensor([[-1.0]]),
                                       torch.tensor([0.0]), torch.ones(1, 1), beta=1.0)
    loss.backward()
    assert stats["kl"] > 0
    assert logp.grad.item() > 0  # descending lowers logp toward the reference's -1.0


def test_adaptive_kl_controller_moves_beta_toward_the_target():
    control = AdaptiveKLController(beta=0.05, target=0.1, horizon=10)
    assert control.update(1.0) == pytest.approx(0.05 * 1.02)  # error clipped to +0.2
    control = AdaptiveKLController(beta=0.05, target=0.1, horizon=10)
    assert control.update(0.0) == pytest.approx(0.05 * 0.98)
    assert control.update(float("nan")) == pytest.approx(0.05 * 0.98)


def test_a_tripped_kl_controller_jumps_beta_within_its_bounds():
    control = AdaptiveKLController(beta=0.05, target=0.1, bounds=(0.05, 0.15))
    assert control.tripped(1.0) == pytest.approx(0.05)  # the default: no jump
    assert control.tripped(2.0) == pytest.approx(0.1)
    assert control.tripped(2.0) == pytest.approx(0.15)  # the upper bound holds


def test_running_baseline_lets_both_bad_teach():
    advantages = running_baseline_advantages([-1.0] * 5 + [1.0])
    assert advantages[0] == -1.0
    assert all(a < 0 for a in advantages[:5])
    assert advantages[1] > advantages[0]  # the baseline learns that -1 is common
    assert advantages[5] > 1.0  # a thumbs up after a run of bad ones stands out


def test_negative_weight_damps_only_the_rejected_replys_advantage():
    from learner.objectives import damp_negative

    assert damp_negative(1.0, 0.0) == 1.0 and damp_negative(-1.0, 0.0) == 0.0
    assert damp_negative(-1.0, 0.25) == -0.25 and damp_negative(-1.0, 1.0) == -1.0


def test_length_neutral_votes_teach_no_length_on_average():
    """Votes the shorter reply wins 75% of the time: the shorter's advantage moves by -0.5
    and the longer's by +0.5, so over those votes the shorter reply's mean advantage is 0,
    while a vote the longer reply won counts 1.5."""
    from learner.objectives import length_neutral, shorter_win_rate

    assert shorter_win_rate([]) == 0.5  # no votes: no taste for length
    assert shorter_win_rate([True] * 4) == 0.75  # four votes, shrunk toward a half
    assert shorter_win_rate([True] * 3 + [False]) == 0.625
    p = 0.75
    won = length_neutral((1.0, -1.0), (10, 30), p)  # A, the shorter, chosen
    lost = length_neutral((-1.0, 1.0), (10, 30), p)  # B, the longer, chosen
    assert won == pytest.approx((0.5, -0.5)) and lost == pytest.approx((-1.5, 1.5))
    assert p * won[0] + (1 - p) * lost[0] == pytest.approx(0.0)
    assert length_neutral((-1.0, 1.0), (30, 10), p) == pytest.approx((-0.5, 0.5))  # B shorter
    assert length_neutral((1.0, -1.0), (20, 20), p) == (1.0, -1.0)  # equal: unchanged
    assert length_neutral((1.0, -1.0), (10, 30), p, strength=0.0) == (1.0, -1.0)
    assert length_neutral((1.0, -1.0), (10, 30), p, strength=0.5) == pytest.approx((0.75, -0.75))
    assert length_neutral((1.0, -1.0), (10, 30), 0.5) == (1.0, -1.0)  # no taste: unchanged


def test_a_trailing_length_rate_counts_the_newest_votes_cast_before_each_vote():
    """Window 0: one rate over every used vote, as before. A window of 4: for each vote the 4
    newest used votes cast before it (never its own), shrunk like any rate; a vote no round
    used yet (None) reads the 4 newest of all; before any used vote, no taste (a half)."""
    from learner.objectives import shorter_win_rate, trailing_shorter_win_rate

    # the shorter reply lost the first four votes and won the next six: a rising rate
    outcomes = [(vote_id, vote_id > 4) for vote_id in range(1, 11)]
    pooled = shorter_win_rate([won for _, won in outcomes])
    assert pooled == pytest.approx((6 + 2) / (10 + 4))
    assert all(trailing_shorter_win_rate(outcomes, v, 0) == pooled for v in (None, 1, 7))
    assert trailing_shorter_win_rate(outcomes, None, 4) == pytest.approx((4 + 2) / (4 + 4))
    assert trailing_shorter_win_rate(outcomes, 7, 4) == pytest.approx((2 + 2) / (4 + 4))
    assert trailing_shorter_win_rate(outcomes, 3, 4) == pytest.approx((0 + 2) / (2 + 4))
    assert trailing_shorter_win_rate(outcomes, 1, 4) == 0.5
    assert trailing_shorter_win_rate(outcomes, 99, 4) == pytest.approx(6 / 8)  # all before


def test_rescaled_length_neutral_votes_keep_a_votes_usual_weight():
    """At full strength the shift leaves a vote a mean |advantage| of 4p(1 - p) (0.75 at
    p = 0.75); rescaled, it is 1 again, still with no length on average, and never scaled by
    more than RESCALE_MAX."""
    from learner.objectives import RESCALE_MAX, length_neutral

    p = 0.75
    won = length_neutral((1.0, -1.0), (10, 30), p, rescale=True)  # the shorter chosen
    lost = length_neutral((-1.0, 1.0), (10, 30), p, rescale=True)  # the longer chosen
    assert won == pytest.approx((0.5 / 0.75, -0.5 / 0.75))
    assert lost == pytest.approx((-1.5 / 0.75, 1.5 / 0.75))
    assert p * abs(won[0]) + (1 - p) * abs(lost[0]) == pytest.approx(1.0)
    assert p * won[0] + (1 - p) * lost[0] == pytest.approx(0.0)
    half = length_neutral((1.0, -1.0), (10, 30), p, strength=0.5, rescale=True)
    assert half == pytest.approx((0.75 / 0.875, -0.75 / 0.875))  # 1 - 0.25 * 0.5
    assert length_neutral((1.0, -1.0), (20, 20), p, rescale=True) == (1.0, -1.0)  # equal
    assert length_neutral((1.0, -1.0), (10, 30), 0.5, rescale=True) == (1.0, -1.0)
    # a voter who always picks the shorter: scaled by the cap, not by 1 / 0
    assert length_neutral((-1.0, 1.0), (10, 30), 0.99, rescale=True) == pytest.approx(
        (-1.98 * RESCALE_MAX, 1.98 * RESCALE_MAX))


def test_winners_only_gradient_is_the_chosen_replys_score():
    """Rewards (1, 0) with no baseline: the seed's estimator is grad log pi(chosen)."""
    logits = torch.tensor([0.0, 0.4], requires_grad=True)
    logp = torch.log_softmax(logits, -1)
    loss, _ = policy_gradient_loss(logp[None, :1], logp[None, :1].detach(), None,
                                   torch.tensor([1.0]), torch.ones(1, 1))
    loss.backward()
    p = torch.softmax(logits.detach(), -1)
    assert torch.allclose(-logits.grad, torch.tensor([1.0, 0.0]) - p, atol=1e-6)


def test_a_demonstration_row_is_the_seeds_estimator_without_ratio_or_clip():
    """A person's rewrite keeps its full gradient -A grad log pi however far its tokens moved;
    a sampled reply past 1 + eps gets none."""
    logp = torch.tensor([[-1.0, -2.0], [-1.0, -2.0]], requires_grad=True)
    anchor = logp.detach() - 1.0  # every ratio e > 1 + eps
    mask = torch.ones(2, 2)
    advantages = torch.tensor([1.0, 1.0])
    loss, stats = policy_gradient_loss(logp, anchor, None, advantages, mask, clip_eps=0.2,
                                       demonstration=torch.tensor([True, False]))
    loss.backward()
    assert torch.equal(logp.grad[0], torch.tensor([-1.0, -1.0]))  # -A d(log pi)/d(log pi)
    assert torch.equal(logp.grad[1], torch.zeros(2))  # clipped: no gradient
    assert stats["clip_fraction"] == 0.5  # the demonstration's tokens are never clipped
    # at rho = 1 both forms have the same gradient
    fresh = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    grads = []
    for demo in (True, False):
        fresh.grad = None
        loss, _ = policy_gradient_loss(fresh, fresh.detach(), None, torch.tensor([0.5]),
                                       torch.ones(1, 2), demonstration=torch.tensor([demo]))
        loss.backward()
        grads.append(fresh.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_the_largest_token_term_names_a_kl_spike_and_a_ratio_spike_apart():
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    logp = torch.full((2, 4), -2.0)
    ref = torch.full((2, 4), -2.0)
    anchor = logp.clone()
    # row 0, its third reply token: pushed 12 nats below the reference (k3 ~ e^12)
    logp[0, 3] = -14.0
    anchor[0, 3] = -14.0
    loss, stats = policy_gradient_loss(logp, anchor, ref, torch.tensor([1.0, -1.0]), mask,
                                       beta=0.1, normalizer=8.0)
    big = stats["largest"]
    assert (big["row"], big["token"]) == (0, 2)
    assert big["kl"] == pytest.approx(0.1 * (math.exp(12.0) - 12.0 - 1.0), rel=1e-4)
    assert big["term"] == pytest.approx(big["kl"] - 1.0, rel=1e-4)  # -A rho + beta k3
    assert big["below_ref"] == pytest.approx(12.0) and big["log_ratio"] == 0.0
    assert stats["kl_loss"] == pytest.approx(big["kl"] / 8.0, rel=1e-4)
    assert loss.item() == pytest.approx((big["term"] - 2.0 + 4.0) / 8.0, rel=1e-4)

    # a negative advantage on a token whose ratio rose past the clip: unbounded, no KL
    logp = torch.full((2, 4), -2.0)
    logp[1, 1] = 3.0  # ratio e^5 to the anchor, and above the reference: small k3
    loss, stats = policy_gradient_loss(logp, torch.full((2, 4), -2.0), ref,
                                       torch.tensor([1.0, -1.0]), mask, beta=0.1)
    big = stats["largest"]
    assert (big["row"], big["token"], big["advantage"]) == (1, 1, -1.0)
    assert big["log_ratio"] == pytest.approx(5.0)
    assert big["term"] == pytest.approx(math.exp(5.0) + big["kl"], rel=1e-5)
    assert big["kl"] < 0.5


def test_k3_past_its_linear_point_keeps_value_and_slope_and_bounds_the_gradient():
    ref = torch.zeros(4)
    logp = torch.tensor([-1.0, -3.0, -6.0, -12.0], requires_grad=True)
    plain = k3_kl(logp.detach(), ref)
    bounded = k3_kl(logp, ref, linear_beyond=3.0)
    assert torch.allclose(bounded[:2].detach(), plain[:2])  # at or within 3 nats: unchanged
    slope = math.exp(3.0) - 1.0
    assert bounded[2].item() == pytest.approx(plain[1].item() + slope * 3.0, rel=1e-6)
    bounded.sum().backward()
    assert logp.grad[0].item() == pytest.approx(-(math.exp(1.0) - 1.0), rel=1e-6)
    assert logp.grad[2].item() == pytest.approx(-slope, rel=1e-6)  # not -(e^6 - 1)
    assert logp.grad[3].item() == pytest.approx(-slope, rel=1e-6)
    # through the loss: the penalty is the bounded one, the KL reported the plain k3
    rows = logp.detach()[None, :]
    mask = torch.ones_like(rows)
    args = (rows, rows, ref[None, :], torch.tensor([0.0]), mask)
    _, linear = policy_gradient_loss(*args, beta=0.1, kl_linear_beyond=3.0)
    _, exponential = policy_gradient_loss(*args, beta=0.1)
    assert linear["kl_loss"] == pytest.approx(0.1 * bounded.sum().item(), rel=1e-5)
    assert exponential["kl_loss"] == pytest.approx(0.1 * plain.sum().item(), rel=1e-5)
    assert linear["kl"] == exponential["kl"] == pytest.approx(plain.mean().item(), rel=1e-5)


def test_the_dual_clip_bounds_a_rejected_token_whose_ratio_rose():
    anchor = torch.zeros(1, 3)
    mask = torch.ones(1, 3)
    logp = torch.tensor([[0.1, math.log(2.0), math.log(10.0)]], requires_grad=True)
    loss, stats = policy_gradient_loss(logp, anchor, None, torch.tensor([-0.5]), mask,
                                       dual_clip=3.0)
    loss.backward()
    # ratio 1.1: the plain term; ratio 2: still the ratio's (under 3); ratio 10: 3 x 0.5
    assert loss.item() == pytest.approx(0.5 * math.exp(0.1) + 0.5 * 2.0 + 1.5, rel=1e-5)
    assert logp.grad[0, 2].item() == 0.0 and logp.grad[0, 1].item() > 0
    assert stats["clip_fraction"] == stats["dual_clip_fraction"] == pytest.approx(1 / 3)
    unbounded, _ = policy_gradient_loss(logp.detach(), anchor, None, torch.tensor([-0.5]), mask)
    assert unbounded.item() == pytest.approx(0.5 * math.exp(0.1) + 0.5 * 2.0 + 5.0, rel=1e-5)
    # a positive advantage is the PPO clip's alone
    up, _ = policy_gradient_loss(logp.detach(), anchor, None, torch.tensor([0.5]), mask,
                                 dual_clip=3.0)
    plain, _ = policy_gradient_loss(logp.detach(), anchor, None, torch.tensor([0.5]), mask)
    assert up.item() == plain.item()


def test_the_defaults_bound_the_two_spikes_an_instant_voters_round_logged():
    """The tokens that took whole rounds in final-instant-64-wide (docs/results.md): a rejected
    reply's token whose ratio to the round's anchor reached e^8.2 on an advantage of -1.76,
    and one pushed 16.4 nats below the base. Under the product's defaults each term stays
    under 20 (a vote's token term is about |A|); with the bounds off they are in the
    thousands and the hundreds of thousands."""
    from chatbot.config import Config

    config = Config()
    logp = torch.tensor([[8.2 - 20.0, -20.0]])  # the rejected token, then a plain one
    anchor = torch.tensor([[-20.0, -20.0]])
    ref = torch.tensor([[8.2 - 20.0, -20.0 + 16.4]])  # 0 and 16.4 nats above the policy
    mask = torch.ones(1, 2)
    adv = torch.tensor([-1.76])
    _, bounded = policy_gradient_loss(logp, anchor, ref, adv, mask, beta=config.beta,
                                      clip_eps=config.clip_eps, dual_clip=config.dual_clip,
                                      kl_linear_beyond=config.kl_linear_beyond)
    _, unbounded = policy_gradient_loss(logp, anchor, ref, adv, mask, beta=config.beta,
                                        clip_eps=config.clip_eps)
    assert unbounded["largest"]["term"] > 3000  # e^8.2 x 1.76, and 0.05 x e^16.4
    assert bounded["largest"]["term"] < 20  # 0.05 x (e^3 - 4 + (e^3 - 1) x 13.4) + 1.76
    assert bounded["dual_clip_fraction"] == pytest.approx(0.5)


def test_the_largest_token_term_is_the_policys_own_not_a_persons_rewrite():
    logp = torch.tensor([[-15.0, -15.0], [-1.0, -2.0]])  # row 0: a rewrite the policy finds odd
    mask = torch.ones(2, 2)
    _, stats = policy_gradient_loss(logp, logp, None, torch.tensor([1.0, -1.0]), mask,
                                    demonstration=torch.tensor([True, False]))
    assert stats["largest"]["row"] == 1 and stats["largest"]["term"] == pytest.approx(1.0)
    _, alone = policy_gradient_loss(logp[:1], logp[:1], None, torch.tensor([1.0]),
                                    mask[:1], demonstration=torch.tensor([True]))
    assert alone["largest"] is None
