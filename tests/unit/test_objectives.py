"""The objectives against docs/METHODS.md: hand-computed cases and the listed invariants."""

import math

import pytest
import torch

from train_diffusion_dpo_sdxl import diffusion_dpo_loss, sft_loss
from train_mapo_sdxl import log_u_over_expm1, mapo_loss


def test_dpo_loss_is_log2_when_policy_equals_reference():
    errors_w, errors_l = torch.tensor([0.3, 1.2, 0.01]), torch.tensor([0.5, 0.2, 3.0])
    loss, metrics = diffusion_dpo_loss(errors_w, errors_l, errors_w.clone(), errors_l.clone(), beta_dpo=5000.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert metrics["implicit_acc"].item() == 0.5  # every logit is 0: ties count half
    assert metrics["reward_margin"].item() == 0.0


def test_dpo_loss_matches_hand_computation_with_the_half_factor():
    # Asymmetric on purpose: a loss with its sign flipped, or without the reference term, gives other numbers.
    model_w, model_l = torch.tensor([0.10, 0.40]), torch.tensor([0.30, 0.35])
    ref_w, ref_l = torch.tensor([0.25, 0.30]), torch.tensor([0.15, 0.30])
    beta = 10.0
    # pair 1: inside = -0.5*10*((0.10-0.30) - (0.25-0.15)) = 1.5 ; pair 2: -0.5*10*((0.40-0.35) - 0) = -0.25
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731  -log(sigmoid(z)) = softplus(-z)
    expected = (softplus(-1.5) + softplus(0.25)) / 2
    loss, metrics = diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, beta)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["implicit_acc"].item() == 0.5
    assert metrics["reward_margin"].item() == pytest.approx((1.5 - 0.25) / 2, rel=1e-6)
    assert metrics["model_mse_w"].item() == pytest.approx(0.25)
    assert metrics["ref_mse_l"].item() == pytest.approx(0.225)


def test_dpo_loss_rewards_a_policy_that_improves_the_winner_more_than_the_reference():
    ref_w, ref_l = torch.tensor([0.5]), torch.tensor([0.5])
    better, _ = diffusion_dpo_loss(torch.tensor([0.4]), torch.tensor([0.6]), ref_w, ref_l, 100.0)
    worse, metrics = diffusion_dpo_loss(torch.tensor([0.6]), torch.tensor([0.4]), ref_w, ref_l, 100.0)
    assert better.item() < math.log(2) < worse.item()
    assert metrics["implicit_acc"].item() == 0.0


def test_sft_loss_is_the_mean_winner_error():
    loss, metrics = sft_loss(torch.tensor([0.2, 0.4]))
    assert loss.item() == pytest.approx(0.3)
    assert set(metrics) == {"loss", "model_mse_w"}


def naive_mapo_loss(losses_w, losses_l, beta, s, T):
    """MaPO Appendix A, written out in float64 exactly as the paper prints it."""
    losses_w, losses_l = losses_w.double(), losses_l.double()
    score_w = ((s * losses_w) / (torch.exp(s * losses_w) - 1)) ** beta
    score_l = ((s * losses_l) / (torch.exp(s * losses_l) - 1)) ** beta
    margin = torch.nn.functional.logsigmoid(T * (score_w - score_l))
    return losses_w.mean() - margin.mean() / beta


@pytest.mark.parametrize("beta", [1.0, 8.0, 64.0])
def test_mapo_loss_matches_the_papers_formula_where_it_is_representable(beta):
    losses_w, losses_l = torch.tensor([0.30, 0.80, 0.05]), torch.tensor([0.32, 0.70, 0.20])
    loss, _ = mapo_loss(losses_w, losses_l, beta, 0.5, 1000)
    assert loss.item() == pytest.approx(naive_mapo_loss(losses_w, losses_l, beta, 0.5, 1000).item(), rel=1e-5)


def test_mapo_hand_computed_case():
    # beta = 1, s = 1, T = 1: phi(l) = l / (e^l - 1)
    phi = lambda x: x / math.expm1(x)  # noqa: E731
    logit = phi(1.0) - phi(2.0)
    expected = 1.0 - math.log(1 / (1 + math.exp(-logit)))
    loss, metrics = mapo_loss(torch.tensor([1.0]), torch.tensor([2.0]), 1.0, 1.0, 1)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["reward_margin"].item() == pytest.approx(logit, rel=1e-6)
    assert metrics["implicit_acc"].item() == 1.0


@pytest.mark.parametrize("beta", [1.0, 8.0, 64.0, 1024.0])
def test_mapo_loss_is_never_below_the_mean_winner_error(beta):
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        losses_w = torch.rand(8, generator=generator) * 2
        losses_l = torch.rand(8, generator=generator) * 2
        loss, _ = mapo_loss(losses_w, losses_l, beta, 0.5, 1000)
        assert loss.item() >= losses_w.mean().item()


@pytest.mark.parametrize("beta", [1.0, 8.0, 32.0, 64.0, 1024.0])
def test_mapo_loss_and_gradients_are_finite_for_all_betas_and_error_scales(beta):
    scales = torch.tensor([1e-6, 1e-4, 1e-3, 1e-2, 0.1, 0.5, 1.0, 3.0, 10.0])
    losses_w = scales.repeat_interleave(len(scales)).requires_grad_(True)
    losses_l = scales.repeat(len(scales)).requires_grad_(True)
    loss, metrics = mapo_loss(losses_w, losses_l, beta, 0.5, 1000)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(losses_w.grad).all() and torch.isfinite(losses_l.grad).all()
    assert all(torch.isfinite(torch.as_tensor(value)).all() for value in metrics.values())


def test_mapo_phi_does_not_underflow_where_the_naive_power_does():
    # beta = 1024, s*l = 0.1: the naive float32 power is 0 for both images, so the margin is lost.
    losses_w, losses_l = torch.tensor([0.20]), torch.tensor([0.21])
    naive_w = ((0.5 * losses_w) / torch.expm1(0.5 * losses_w)) ** 1024
    assert naive_w.item() < 1e-20  # float32 cannot separate the two scores
    _, metrics = mapo_loss(losses_w, losses_l, 1024.0, 0.5, 1000)
    assert metrics["reward_margin"].item() > 0  # the winner still scores higher


@pytest.mark.parametrize("beta", [1.0, 8.0, 64.0, 1024.0])
def test_mapo_margin_gradient_at_equal_vanishing_errors_is_T_s_over_4_whatever_beta(beta):
    T, s = 1000, 0.5
    for error in (1e-9, 1e-11):  # the limit needs beta * s * error -> 0
        losses_w = torch.tensor([error], dtype=torch.float64, requires_grad=True)
        losses_l = torch.tensor([error], dtype=torch.float64)
        loss, _ = mapo_loss(losses_w, losses_l, beta, s, T)
        loss.backward()
        margin_gradient = losses_w.grad.item() - 1.0  # minus the d(mean l_w)/d l_w term
        assert margin_gradient == pytest.approx(T * s / 4, rel=1e-3)


def test_log_u_over_expm1_is_continuous_at_the_series_switch():
    u = torch.tensor([0.0, 1e-4 * (1 - 1e-9), 1e-4, 1e-4 * (1 + 1e-9), 1.0, 50.0, 800.0], dtype=torch.float64)
    values = log_u_over_expm1(u)
    exact = torch.log(u[1:] / torch.expm1(u[1:].clamp(max=700)))
    assert values[0].item() == 0.0
    assert torch.allclose(values[1:5], exact[:4], rtol=1e-9, atol=1e-15)
    assert values[-1].item() == pytest.approx(math.log(800.0) - 800.0, rel=1e-12)
