"""Noise, targets, timesteps, log-SNR and loss weightings (docs/METHODS.md, "Notation shared by all scripts").

DDPM family (SD1.x, SDXL): x_t = alpha_t x0 + sigma_t eps with alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t).
Flow matching (SD3, SANA):  x_t = (1 - s) x0 + s eps, target eps - x0.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F


DDPM_PREDICTION_TYPES = ("epsilon", "v_prediction")


def sample_generators(seed, epoch, sample_ids, device="cpu"):
    """One torch.Generator per sample, seeded from (seed, epoch, sample id).

    Every random draw of a training sample (timestep, noise) then depends only on which sample it
    is and in which epoch, not on the RNG history, the batch it landed in or the number of
    processes: a resumed run and an uninterrupted one, or a 2-process and a 1-process run with
    the same global batch, draw the same numbers.
    """
    generators = []
    for sample_id in sample_ids:
        state = np.random.SeedSequence([int(seed), int(epoch), int(sample_id)]).generate_state(2, dtype=np.uint32)
        generator = torch.Generator(device=device)
        generator.manual_seed(int(state[0]) << 31 ^ int(state[1]))
        generators.append(generator)
    return generators


def sample_timesteps(num_train_timesteps, generators, device="cpu"):
    """t ~ U{0, ..., T-1}, one per generator, shape (B,)."""
    return torch.cat(
        [torch.randint(0, num_train_timesteps, (1,), generator=g, device=device) for g in generators]
    ).long()


def sample_noise(shape, generators, device="cpu", dtype=torch.float32):
    """Standard normal noise of per-sample `shape`, one sample per generator, shape (B, *shape)."""
    return torch.stack([torch.randn(shape, generator=g, device=device, dtype=dtype) for g in generators])


def noisy_latents_and_target(noise_scheduler, latents, noise, timesteps):
    """DDPM-family forward process and the regression target in the model's output space.

    Returns `(x_t, target)`: target is `eps` for `epsilon` and `alpha_t eps - sigma_t x0` for `v_prediction`.
    """
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in DDPM_PREDICTION_TYPES:
        raise ValueError(
            f"Expected a scheduler whose prediction_type is one of {DDPM_PREDICTION_TYPES}, "
            f"found {prediction_type!r}; pass --prediction_type epsilon or v_prediction."
        )
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
    return noisy_latents, target


def flow_matching_noisy_and_target(latents, noise, sigmas):
    """Rectified-flow forward process: x_t = (1 - s) x0 + s eps; target (velocity) eps - x0. `sigmas` (B,)."""
    s = sigmas.to(latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
    return (1.0 - s) * latents + s * noise, noise - latents


def per_sample_mse(pred, target):
    """err(pred, target): mean squared error over all non-batch dimensions, in float32, shape (B,)."""
    return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(dim=1)


def log_snr(noise_scheduler, timesteps):
    """lambda_t = log(alpha_t^2 / sigma_t^2) = log(abar_t / (1 - abar_t)) for a DDPM-family scheduler, shape (B,)."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float64)[timesteps]
    return (torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod)).float()


def flow_matching_log_snr(sigmas):
    """lambda = 2 log((1 - s) / s) for flow matching, shape (B,)."""
    sigmas = sigmas.double()
    return (2.0 * (torch.log1p(-sigmas) - torch.log(sigmas))).float()


def sigmoid_loss_weight(log_snr_values, bias):
    """w = sigmoid(bias - lambda): decreasing in lambda (CaPO Sec. 4.4 / Eq. 26; docs/METHODS.md fixes the sign)."""
    return torch.sigmoid(bias - log_snr_values)


def sample_uniform_log_snr(generators, low=-10.0, high=10.0, device="cpu"):
    """lambda ~ U[low, high], one per generator, shape (B,): CaPO's flow-model timestep draw (App. A.3, U[-10, 10]).

    The noise level is then s = sigmoid(-lambda / 2), the inverse of `flow_matching_log_snr`, continuous rather than
    taken from the scheduler's table (`flow_sigma_from_log_snr`).
    """
    return torch.cat([low + (high - low) * torch.rand((1,), generator=g, device=device) for g in generators])


def flow_sigma_from_log_snr(log_snr_values):
    """s = sigmoid(-lambda / 2): the flow noise level of a log-SNR, the inverse of `flow_matching_log_snr`."""
    return torch.sigmoid(-0.5 * log_snr_values.double()).float()


def flow_sigmoid_loss_weight(log_snr_values, bias):
    """w = 1 / (exp((lambda - b) / 2) + exp(-(lambda - b) / 2)): CaPO's weight on the flow loss (App. A.3, Eq. 26
    shifted by b), computed as sigmoid(b - lambda) * exp((lambda - b) / 2) without overflow, so |lambda - b| may be
    large. docs/METHODS.md, "CaPO on a flow model", says how it relates to sigmoid(b - lambda) on the epsilon loss.
    """
    half = 0.5 * (log_snr_values.double() - bias)
    return torch.exp(-half.abs() - torch.log1p(torch.exp(-2.0 * half.abs()))).float()


FLOW_TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode")


def sample_flow_matching_u(sampling, generators, logit_mean=0.0, logit_std=1.0, mode_scale=1.29, device="cpu"):
    """u in (0, 1), one per generator, shape (B,): the timestep density of SD3 training (Esser et al. 2024, Sec. 3.1).

    The formulas of diffusers' `training_utils.compute_density_for_timestep_sampling`, drawn as it draws them (one
    `torch.normal` or `torch.rand` of size 1 per generator), so that u depends on (seed, epoch, sample) only:
    `uniform` u ~ U(0, 1); `logit_normal` u = sigmoid(n), n ~ N(logit_mean, logit_std²); `mode`
    u = 1 − v − mode_scale·(cos²(πv/2) − 1 + v), v ~ U(0, 1). diffusers' `none`, `sigma_sqrt` and `cosmap`
    weighting schemes draw u as `uniform` does (they weight the loss instead).
    """
    if sampling not in FLOW_TIMESTEP_SAMPLINGS:
        raise ValueError(
            f"Expected a timestep sampling in {FLOW_TIMESTEP_SAMPLINGS}, found {sampling!r}; "
            "pass --weighting_scheme logit_normal, mode or uniform."
        )
    draws = []
    for generator in generators:
        if sampling == "logit_normal":
            normal = torch.normal(mean=logit_mean, std=logit_std, size=(1,), device=device, generator=generator)
            draws.append(torch.sigmoid(normal))
            continue
        v = torch.rand(size=(1,), device=device, generator=generator)
        if sampling == "mode":
            draws.append(1 - v - mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v))
        else:
            draws.append(v)
    return torch.cat(draws)


def shift_sigmas(sigmas, shift):
    """σ ← s·σ / (1 + (s − 1)·σ): FlowMatchEulerDiscreteScheduler's static shift (its `shift`; SD3 uses 3.0).

    s > 1 moves σ towards 1 (more noise); s = 1 leaves it unchanged. The SD3 paper's resolution-dependent shift
    (Esser et al. 2024) with s = sqrt(m/n) for m and n pixels.
    """
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def unshift_sigmas(shifted_sigmas, shift):
    """The inverse of `shift_sigmas`: σ = σ' / (s − (s − 1)·σ')."""
    return shifted_sigmas / (shift - (shift - 1) * shifted_sigmas)


def flow_matching_sigmas(u, num_train_timesteps=1000, shift=1.0):
    """The σ of the scheduler's training table that u picks, shape (B,); the transformer's timestep is σ·T.

    As diffusers' SD3 training scripts do (`indices = (u * T).long()`, `sigmas = noise_scheduler.sigmas[indices]`):
    FlowMatchEulerDiscreteScheduler's table is σ_i = shift_sigmas((T − i) / T, shift), i = 0, …, T − 1, so u near 0
    gives σ near 1 (pure noise) and σ ≥ shift_sigmas(1 / T) > 0.
    """
    indices = (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
    return shift_sigmas((num_train_timesteps - indices).double() / num_train_timesteps, shift).float()


def preconditioned_outputs(model_output, noisy_latents, sigmas):
    """x̂0 = x_σ − σ·v: the velocity prediction turned into a clean-latent prediction, compared with x0 instead of v
    with ε − x0 (diffusers' SD3 scripts' `--precondition_outputs`, the DDSPO release's SD3 setting; EDM's
    preconditioning, Karras et al. 2022). Since x0 = x_σ − σ·(ε − x0), the error is σ² times the velocity error."""
    s = sigmas.to(model_output.dtype).view(-1, *([1] * (model_output.ndim - 1)))
    return noisy_latents - s * model_output
