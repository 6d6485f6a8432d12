"""utils/ for flow matching: timestep densities, the shift and preconditioning, against direct computations."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

from utils.diffusion import (
    flow_matching_log_snr,
    flow_matching_noisy_and_target,
    flow_matching_sigmas,
    preconditioned_outputs,
    sample_flow_matching_u,
    sample_generators,
    shift_sigmas,
    unshift_sigmas,
)


NUM_DRAWS = 20000
# Kolmogorov–Smirnov: sup |F_n − F| stays below 1.63 / sqrt(n) with probability 0.99 when the sample follows F.
KS_BOUND = 1.63 / math.sqrt(NUM_DRAWS)


def ks_statistic(samples, cdf):
    """sup_x |F_n(x) − F(x)| of a 1-D sample against a CDF (a function of a float64 tensor)."""
    sorted_samples = samples.double().sort().values
    n = sorted_samples.numel()
    expected = cdf(sorted_samples)
    above = torch.arange(1, n + 1, dtype=torch.float64) / n - expected
    below = expected - torch.arange(0, n, dtype=torch.float64) / n
    return max(above.max().item(), below.max().item())


def many_generators(seed=0, epoch=0):
    return sample_generators(seed, epoch, range(NUM_DRAWS))


def mode_transform(v, mode_scale):
    """The SD3 paper's f_mode (Eq. 20): u = 1 − v − s·(cos²(πv/2) − 1 + v)."""
    return 1 - v - mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)


def test_logit_normal_u_is_a_sigmoid_of_a_normal_with_the_given_mean_and_std():
    u = sample_flow_matching_u("logit_normal", many_generators(), logit_mean=0.5, logit_std=1.3)
    logits = torch.logit(u.double())
    assert 0 < u.min() and u.max() < 1
    assert logits.mean().item() == pytest.approx(0.5, abs=4 * 1.3 / math.sqrt(NUM_DRAWS))
    assert logits.std().item() == pytest.approx(1.3, rel=0.03)
    normal_cdf = lambda x: 0.5 * (1 + torch.erf((x - 0.5) / (1.3 * math.sqrt(2))))  # noqa: E731
    assert ks_statistic(logits, normal_cdf) < KS_BOUND


def test_mode_u_follows_the_sd3_mode_density():
    mode_scale = 1.29
    u = sample_flow_matching_u("mode", many_generators(), mode_scale=mode_scale)

    # f_mode is decreasing for mode_scale < 2 / (pi - 2), so P(u <= x) = 1 - f_mode^{-1}(x): invert by bisection.
    def mode_cdf(x):
        low, high = torch.zeros_like(x), torch.ones_like(x)
        for _ in range(60):
            middle = (low + high) / 2
            above = mode_transform(middle, mode_scale) > x
            low, high = torch.where(above, middle, low), torch.where(above, high, middle)
        return 1 - (low + high) / 2

    assert ks_statistic(u, mode_cdf) < KS_BOUND
    assert ks_statistic(u, lambda x: x) > 5 * KS_BOUND  # and it is not the uniform density


def test_mode_u_is_the_mode_formula_of_the_same_uniform_draw():
    generators = sample_generators(0, 0, range(64))
    u = sample_flow_matching_u("mode", generators, mode_scale=0.8)
    v = sample_flow_matching_u("uniform", sample_generators(0, 0, range(64)))
    assert torch.allclose(u, mode_transform(v, 0.8), atol=1e-6)
    assert torch.allclose(sample_flow_matching_u("mode", sample_generators(0, 0, range(64)), mode_scale=0.0), 1 - v)


def test_uniform_u_is_uniform_on_the_unit_interval():
    u = sample_flow_matching_u("uniform", many_generators())
    assert ks_statistic(u, lambda x: x) < KS_BOUND


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "mode"])
def test_each_draw_equals_diffusers_compute_density_for_timestep_sampling_with_the_same_generator(sampling):
    settings = dict(logit_mean=0.3, logit_std=0.9, mode_scale=1.29)
    ours = sample_flow_matching_u(sampling, sample_generators(3, 1, range(8)), **settings)
    scheme = "none" if sampling == "uniform" else sampling
    diffusers_draws = [
        compute_density_for_timestep_sampling(scheme, batch_size=1, generator=generator, **settings)
        for generator in sample_generators(3, 1, range(8))
    ]
    assert torch.equal(ours, torch.cat(diffusers_draws))


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "mode"])
def test_a_samples_u_depends_on_seed_epoch_and_sample_only_not_on_its_batch(sampling):
    in_a_batch = sample_flow_matching_u(sampling, sample_generators(0, 2, [5, 11, 42]))
    alone = sample_flow_matching_u(sampling, sample_generators(0, 2, [11]))
    in_another_batch = sample_flow_matching_u(sampling, sample_generators(0, 2, [11, 7]))
    assert in_a_batch[1] == alone[0] == in_another_batch[0]
    assert sample_flow_matching_u(sampling, sample_generators(0, 3, [11]))[0] != alone[0]  # another epoch
    assert sample_flow_matching_u(sampling, sample_generators(1, 2, [11]))[0] != alone[0]  # another seed


def test_an_unknown_timestep_sampling_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="logit_normal, mode or uniform"):
        sample_flow_matching_u("cosmap", sample_generators(0, 0, [0]))


def test_shift_is_the_schedulers_and_unshift_is_its_inverse():
    sigmas = torch.linspace(0.001, 1.0, 1000, dtype=torch.float64)
    shifted = shift_sigmas(sigmas, 3.0)
    assert torch.allclose(shifted, 3.0 * sigmas / (1 + 2.0 * sigmas))
    assert (shifted >= sigmas).all() and shifted[-1] == 1.0  # more noise, same end point
    assert torch.allclose(unshift_sigmas(shifted, 3.0), sigmas, atol=1e-12)
    assert torch.allclose(shift_sigmas(unshift_sigmas(sigmas, 3.0), 3.0), sigmas, atol=1e-12)
    assert torch.equal(shift_sigmas(sigmas, 1.0), sigmas)


def test_the_shift_lowers_the_log_snr_by_two_log_shift():
    sigmas = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    shifted_log_snr = flow_matching_log_snr(shift_sigmas(sigmas, 3.0))
    assert torch.allclose(shifted_log_snr, flow_matching_log_snr(sigmas) - 2 * math.log(3.0), atol=1e-5)


def test_u_picks_the_sigma_of_the_schedulers_table_as_diffusers_sd3_scripts_do():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    u = torch.cat([torch.tensor([0.0, 0.0004, 0.5, 0.9995]), sample_flow_matching_u("uniform", many_generators())])
    indices = (u * 1000).long()
    sigmas = flow_matching_sigmas(u, num_train_timesteps=1000, shift=3.0)
    assert torch.allclose(sigmas, scheduler.sigmas[indices], atol=1e-6)
    assert torch.allclose(sigmas * 1000, scheduler.timesteps[indices], atol=1e-3)


def test_preconditioned_output_of_the_true_velocity_is_the_clean_latent():
    latents, noise = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    sigmas = torch.tensor([0.1, 0.5, 0.97])
    noisy, velocity = flow_matching_noisy_and_target(latents, noise, sigmas)
    assert torch.allclose(preconditioned_outputs(velocity, noisy, sigmas), latents, atol=1e-5)
    # Off the true velocity, the x0 error is sigma^2 times the velocity error.
    output = torch.randn_like(latents)
    x0_error = (preconditioned_outputs(output, noisy, sigmas) - latents).pow(2).flatten(1).mean(1)
    velocity_error = (output - velocity).pow(2).flatten(1).mean(1)
    assert torch.allclose(x0_error, sigmas**2 * velocity_error, rtol=1e-4)
