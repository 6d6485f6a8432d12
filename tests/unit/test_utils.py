"""utils/: targets, log-SNR and weightings against closed forms from the scheduler's alphas_cumprod."""

import pytest
import torch
from diffusers import DDPMScheduler

from utils.diffusion import (
    flow_matching_log_snr,
    flow_matching_noisy_and_target,
    log_snr,
    noisy_latents_and_target,
    per_sample_mse,
    sample_generators,
    sample_noise,
    sample_timesteps,
    sigmoid_loss_weight,
)


def sdxl_scheduler(prediction_type="epsilon"):
    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type=prediction_type,
    )


def test_epsilon_target_is_the_noise_and_x_t_is_the_forward_process():
    scheduler = sdxl_scheduler("epsilon")
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([0, 500, 999])
    noisy, target = noisy_latents_and_target(scheduler, latents, noise, timesteps)
    abar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    assert torch.allclose(noisy, abar.sqrt() * latents + (1 - abar).sqrt() * noise, atol=1e-5)
    assert torch.equal(target, noise)


def test_v_prediction_target_is_alpha_eps_minus_sigma_x0():
    scheduler = sdxl_scheduler("v_prediction")
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([10, 400, 990])
    _, target = noisy_latents_and_target(scheduler, latents, noise, timesteps)
    abar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    assert torch.allclose(target, abar.sqrt() * noise - (1 - abar).sqrt() * latents, atol=1e-5)


def test_unknown_prediction_type_is_refused_with_the_fix():
    scheduler = sdxl_scheduler("sample")
    with pytest.raises(ValueError, match="--prediction_type"):
        noisy_latents_and_target(scheduler, torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.tensor([1]))


def test_log_snr_is_log_abar_over_one_minus_abar():
    scheduler = sdxl_scheduler()
    timesteps = torch.tensor([0, 1, 250, 999])
    abar = scheduler.alphas_cumprod[timesteps].double()
    assert torch.allclose(log_snr(scheduler, timesteps).double(), torch.log(abar / (1 - abar)), rtol=1e-5)
    assert (log_snr(scheduler, torch.arange(1000)).diff() < 0).all()  # decreasing in t


def test_flow_matching_interpolates_and_targets_velocity():
    latents, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    sigmas = torch.tensor([0.25, 0.9])
    noisy, target = flow_matching_noisy_and_target(latents, noise, sigmas)
    assert torch.allclose(noisy[0], 0.75 * latents[0] + 0.25 * noise[0])
    assert torch.allclose(target, noise - latents)
    assert torch.allclose(flow_matching_log_snr(sigmas), 2 * torch.log((1 - sigmas) / sigmas))


def test_sigmoid_weight_decreases_with_log_snr_and_is_half_at_the_bias():
    lam = torch.tensor([-5.0, 1.5, 8.0])
    weights = sigmoid_loss_weight(lam, bias=1.5)
    assert weights[1].item() == pytest.approx(0.5)
    assert weights[0] > weights[1] > weights[2]


def test_per_sample_mse_is_float32_mean_over_non_batch_dims():
    pred = torch.zeros(2, 3, 4, dtype=torch.float16)
    target = torch.ones(2, 3, 4, dtype=torch.float16)
    target[1] *= 2
    errors = per_sample_mse(pred, target)
    assert errors.dtype == torch.float32 and errors.tolist() == [1.0, 4.0]


def test_draws_depend_on_seed_epoch_and_sample_only():
    first = sample_generators(7, 3, [11, 12, 13])
    again = sample_generators(7, 3, [13, 11])  # other batch composition and order
    noise_first = sample_noise((4, 2, 2), first)
    noise_again = sample_noise((4, 2, 2), again)
    assert torch.equal(noise_first[2], noise_again[0]) and torch.equal(noise_first[0], noise_again[1])
    next_epoch = sample_noise((4, 2, 2), sample_generators(7, 4, [11]))
    assert not torch.equal(next_epoch[0], noise_first[0])
    timesteps = sample_timesteps(1000, sample_generators(0, 0, range(2000)))
    assert timesteps.min() >= 0 and timesteps.max() <= 999 and len(timesteps.unique()) > 800
