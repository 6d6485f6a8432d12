"""Math every training script needs identically: noising, targets, timesteps, log-SNR, weightings."""

from .diffusion import (
    DDPM_PREDICTION_TYPES,
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


__all__ = [
    "DDPM_PREDICTION_TYPES",
    "flow_matching_log_snr",
    "flow_matching_noisy_and_target",
    "log_snr",
    "noisy_latents_and_target",
    "per_sample_mse",
    "sample_generators",
    "sample_noise",
    "sample_timesteps",
    "sigmoid_loss_weight",
]
