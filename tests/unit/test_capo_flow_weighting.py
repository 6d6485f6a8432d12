"""CaPO App. A on a flow model: the change of variables between the ε loss weighted by σ(b − λ) and the flow loss
weighted by w_λ^b = 1 / (e^{(λ−b)/2} + e^{−(λ−b)/2}), checked numerically on random inputs (docs/METHODS.md, "CaPO on
a flow model", its App. A change of variables).

Flow: x_s = (1 − s)·x0 + s·ε, v = ε − x0, λ = 2·log((1 − s)/s), s = sigmoid(−λ/2). A velocity prediction v̂ at x_s
implies ε̂ = x_s + (1 − s)·v̂.
"""

import math

import pytest
import torch

from utils.diffusion import (
    flow_matching_log_snr,
    flow_matching_noisy_and_target,
    flow_sigma_from_log_snr,
    flow_sigmoid_loss_weight,
    sample_generators,
    sample_uniform_log_snr,
    sigmoid_loss_weight,
)


BIASES = (-1.0, 0.0, 1.5)  # SD3-M's, none, SDXL's (App. B.2)
LAMBDA_MIN, LAMBDA_MAX = -10.0, 10.0  # App. A.3
NUM_NODES = 200_000  # midpoint rule
DIM = 6  # size of one random "latent" in the quadrature tests


def implied_eps(noisy, sigmas, velocity):
    """ε̂ = x_s + (1 − s)·v̂: the noise prediction that a velocity prediction at x_s implies."""
    s = sigmas.view(-1, *([1] * (noisy.ndim - 1)))
    return noisy + (1.0 - s) * velocity


def squared_error(a, b):
    return (a - b).pow(2).flatten(1).sum(dim=1)


def sigma_of(lam):
    """s = sigmoid(−λ/2) in float64 (`flow_sigma_from_log_snr` returns float32; it is tested against this below)."""
    return torch.sigmoid(-0.5 * lam.double())


def midpoints(low, high, n=NUM_NODES):
    h = (high - low) / n
    return low + h * (torch.arange(n, dtype=torch.float64) + 0.5)


def eps_and_velocity_errors(sigmas, amplitude, seed):
    """‖ε̂ − ε‖² and ‖v̂ − v‖² at each s of `sigmas` for one random (x0, ε, z), with v̂ = v + amplitude(s)·z."""
    generator = torch.Generator().manual_seed(seed)
    x0, eps, z = (torch.randn(1, DIM, generator=generator, dtype=torch.float64) for _ in range(3))
    n = sigmas.numel()
    noisy, velocity = flow_matching_noisy_and_target(x0.expand(n, DIM), eps.expand(n, DIM), sigmas)
    predicted = velocity + amplitude(sigmas).view(-1, 1) * z
    return squared_error(implied_eps(noisy, sigmas, predicted), eps.expand(n, DIM)), squared_error(predicted, velocity)


def random_amplitude(seed):
    """A smooth random a(s) = c0 + c1·s + c2·sin(k·π·s) + c3·cos(k·π·s), not vanishing identically."""
    generator = torch.Generator().manual_seed(seed)
    c = torch.randn(4, generator=generator, dtype=torch.float64)
    k = 1 + int(torch.randint(0, 4, (1,), generator=generator))
    return lambda s: c[0] + c[1] * s + c[2] * torch.sin(k * math.pi * s) + c[3] * torch.cos(k * math.pi * s)


def test_eps_error_is_one_minus_s_times_velocity_error():
    generator = torch.Generator().manual_seed(0)
    x0, eps, predicted = (torch.randn(16, 4, 8, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    sigmas = torch.rand(16, generator=generator, dtype=torch.float64)
    noisy, velocity = flow_matching_noisy_and_target(x0, eps, sigmas)
    torch.testing.assert_close(implied_eps(noisy, sigmas, velocity), eps, rtol=0, atol=1e-12)  # v̂ = v gives ε
    s = sigmas.view(-1, 1, 1, 1)
    torch.testing.assert_close(implied_eps(noisy, sigmas, predicted) - eps, (1 - s) * (predicted - velocity))


@pytest.mark.parametrize("bias", BIASES)
def test_pointwise_identity(bias):
    """σ(b − λ)·‖ε̂ − ε‖² = e^{b/2}·w_λ^b·s(1 − s)·‖v̂ − v‖², and e^{−λ/2}‖ε̂ − ε‖² = s(1 − s)‖v̂ − v‖²."""
    generator = torch.Generator().manual_seed(1)
    lam = LAMBDA_MIN + (LAMBDA_MAX - LAMBDA_MIN) * torch.rand(64, generator=generator, dtype=torch.float64)
    x0, eps, predicted = (torch.randn(64, 3, 5, generator=generator, dtype=torch.float64) for _ in range(3))
    sigmas = sigma_of(lam)
    noisy, velocity = flow_matching_noisy_and_target(x0, eps, sigmas)
    eps_error = squared_error(implied_eps(noisy, sigmas, predicted), eps)
    velocity_error = squared_error(predicted, velocity)
    torch.testing.assert_close(torch.exp(-lam / 2) * eps_error, sigmas * (1 - sigmas) * velocity_error)
    left = sigmoid_loss_weight(lam, bias) * eps_error
    weight = flow_sigmoid_loss_weight(lam, bias).double()
    right = math.exp(bias / 2) * weight * sigmas * (1 - sigmas) * velocity_error
    torch.testing.assert_close(left, right, rtol=1e-6, atol=0)
    # Eq. 26 read pointwise (σ(b − λ)‖ε̂ − ε‖² = w_λ^b‖v̂ − v‖²) is off by the non-constant e^{b/2}·s(1 − s).
    ratio = left / (weight * velocity_error)
    assert ratio.max() / ratio.min() > 2


def test_flow_sigmoid_loss_weight_formula_and_range():
    lam = torch.linspace(-30, 30, 601, dtype=torch.float64)
    for bias in BIASES:
        weight = flow_sigmoid_loss_weight(lam, bias).double()
        half = (lam - bias) / 2
        torch.testing.assert_close(weight, 1 / (torch.exp(half) + torch.exp(-half)), rtol=1e-6, atol=0)
        torch.testing.assert_close(weight, torch.sigmoid(bias - lam) * torch.exp(half), rtol=1e-6, atol=0)
        assert weight.max() <= 0.5 + 1e-7  # ½ at λ = b, its maximum
        far = flow_sigmoid_loss_weight(torch.tensor([bias - 1000.0, bias + 1000.0], dtype=torch.float64), bias)
        assert torch.isfinite(far).all() and (far >= 0).all() and far[0] == far[1]
    # Symmetric in λ − b.
    torch.testing.assert_close(flow_sigmoid_loss_weight(1.5 + lam, 1.5), flow_sigmoid_loss_weight(1.5 - lam, 1.5))


def test_flow_sigma_from_log_snr_inverts_flow_matching_log_snr():
    generator = torch.Generator().manual_seed(2)
    sigmas = 0.001 + 0.998 * torch.rand(1000, generator=generator, dtype=torch.float64)
    back = flow_sigma_from_log_snr(flow_matching_log_snr(sigmas)).double()
    torch.testing.assert_close(back, sigmas, rtol=1e-5, atol=0)
    lam = LAMBDA_MIN + (LAMBDA_MAX - LAMBDA_MIN) * torch.rand(1000, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(flow_sigma_from_log_snr(lam).double(), sigma_of(lam), rtol=1e-6, atol=0)
    torch.testing.assert_close(flow_matching_log_snr(flow_sigma_from_log_snr(lam)).double(), lam, rtol=0, atol=1e-4)


@pytest.mark.parametrize("bias", BIASES)
@pytest.mark.parametrize("seed", [3, 4])
def test_eq25_change_of_measure_with_t_uniform(bias, seed):
    """E_{λ~U}[σ(b − λ)‖ε̂ − ε‖²] = e^{b/2}·2(t_hi − t_lo)/(λmax − λmin)·E_{t~U[t_lo, t_hi]}[w_λ^b‖v̂ − v‖²], where
    [t_lo, t_hi] = [s(λmax), s(λmin)] (Eq. 25 with its constant), and the same with b dropped and e^{−λ/2} in place
    of σ(b − λ)."""
    amplitude = random_amplitude(seed)
    t_lo, t_hi = (float(sigma_of(torch.tensor(x))) for x in (LAMBDA_MAX, LAMBDA_MIN))
    assert t_hi - t_lo == pytest.approx(math.tanh(LAMBDA_MAX / 4))  # symmetric range: tanh(λmax/4)
    measure = 2 * (t_hi - t_lo) / (LAMBDA_MAX - LAMBDA_MIN)  # 0.098661 for [−10, 10]

    # Flow side: t uniform on [t_lo, t_hi].
    t = midpoints(t_lo, t_hi)
    _, velocity_error_t = eps_and_velocity_errors(t, amplitude, seed)
    lam_t = flow_matching_log_snr(t).double()
    flow_plain = velocity_error_t.mean()
    flow_weighted = (flow_sigmoid_loss_weight(lam_t, bias).double() * velocity_error_t).mean()

    # ε side: λ uniform on [λmin, λmax].
    lam = midpoints(LAMBDA_MIN, LAMBDA_MAX)
    eps_error, velocity_error = eps_and_velocity_errors(sigma_of(lam), amplitude, seed)
    eps_plain = (torch.exp(-lam / 2) * eps_error).mean()
    eps_weighted = (sigmoid_loss_weight(lam, bias).double() * eps_error).mean()

    assert float(eps_plain) == pytest.approx(measure * float(flow_plain), rel=1e-4)  # Eq. 25
    assert float(eps_weighted) == pytest.approx(math.exp(bias / 2) * measure * float(flow_weighted), rel=1e-4)

    # App. A.3's practice, λ uniform with w_λ^b on the flow loss, is the flow loss with t uniform and weight
    # w_λ^b / (s(1 − s)) = 1 / (e^{−b/2}(1 − s)² + e^{b/2}s²) ...
    practice = (flow_sigmoid_loss_weight(lam, bias).double() * velocity_error).mean()
    s = t
    effective = 1 / (math.exp(-bias / 2) * (1 - s) ** 2 + math.exp(bias / 2) * s**2)
    via_weight = flow_sigmoid_loss_weight(lam_t, bias).double() / (s * (1 - s))
    torch.testing.assert_close(effective, via_weight, rtol=1e-6, atol=0)
    assert float(practice) == pytest.approx(measure * float((effective * velocity_error_t).mean()), rel=1e-4)
    # ... which tends to e^{b/2} as s → 0 and e^{−b/2} as s → 1, with its maximum 2·cosh(b/2) at λ = 2b.
    assert float(effective.max()) == pytest.approx(2 * math.cosh(bias / 2), rel=1e-6)
    assert float(lam_t[effective.argmax()]) == pytest.approx(2 * bias, abs=1e-3)


def bump_in_log_snr(center):
    """a(s) = exp(−(λ(s) − center)²/2): a model whose velocity error sits around the log-SNR `center`."""
    return lambda s: torch.exp(-0.5 * (2 * (torch.log1p(-s) - torch.log(s)) - center) ** 2)


@pytest.mark.parametrize("bias", BIASES)
def test_app_a3_practice_is_not_the_eps_loss_up_to_a_constant(bias):
    """λ ~ U[−10, 10] with w_λ^b on the flow loss is the ε loss with weight σ(b − λ)·e^{−b/2}/(s(1 − s)) under the
    same λ. The integrands' ratio e^{−b/2}/(s(1 − s)) = e^{−b/2}(2 + 2cosh(λ/2)) runs from 4e^{−b/2} at λ = 0 to
    150e^{−b/2} at |λ| = 10, so the ratio of the two losses depends on where the model errs."""
    lam = midpoints(LAMBDA_MIN, LAMBDA_MAX)
    sigmas = sigma_of(lam)
    torch.testing.assert_close(1 / (sigmas * (1 - sigmas)), 2 + 2 * torch.cosh(lam / 2))
    flow_weight, eps_weight = flow_sigmoid_loss_weight(lam, bias).double(), sigmoid_loss_weight(lam, bias).double()
    ratio = math.exp(-bias / 2) / (sigmas * (1 - sigmas))
    torch.testing.assert_close(flow_weight / (eps_weight * (1 - sigmas) ** 2), ratio, rtol=1e-5, atol=0)
    assert ratio.max() / ratio.min() > 2
    ratios = []
    for seed, amplitude in enumerate([random_amplitude(5), bump_in_log_snr(0.0), bump_in_log_snr(6.0)]):
        eps_error, velocity_error = eps_and_velocity_errors(sigmas, amplitude, seed)
        practice, eps_loss = flow_weight * velocity_error, eps_weight * eps_error
        torch.testing.assert_close(practice, ratio * eps_loss, rtol=1e-5, atol=1e-10)
        ratios.append(float(practice.mean() / eps_loss.mean()))
    assert max(ratios) / min(ratios) > 2, ratios


def test_sample_uniform_log_snr():
    draws = sample_uniform_log_snr(sample_generators(0, 0, range(4096)))
    assert draws.shape == (4096,) and draws.min() >= LAMBDA_MIN and draws.max() <= LAMBDA_MAX
    assert abs(float(draws.mean())) < 0.4  # standard error 20/sqrt(12·4096) = 0.09
    torch.testing.assert_close(draws, sample_uniform_log_snr(sample_generators(0, 0, range(4096))), rtol=0, atol=0)
    assert not torch.equal(draws, sample_uniform_log_snr(sample_generators(0, 1, range(4096))))
    narrow = sample_uniform_log_snr(sample_generators(1, 0, range(256)), low=-2.0, high=3.0)
    assert narrow.min() >= -2.0 and narrow.max() <= 3.0
