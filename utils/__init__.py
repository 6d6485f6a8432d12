"""Math every training script needs identically: noising, targets, timesteps, log-SNR, weightings, and the win-rate
of validation by reward (which examples/eval/compare.py shares)."""

from .diffusion import (
    DDPM_PREDICTION_TYPES,
    FLOW_TIMESTEP_SAMPLINGS,
    flow_matching_log_snr,
    flow_matching_noisy_and_target,
    flow_matching_sigmas,
    log_snr,
    noisy_latents_and_target,
    per_sample_mse,
    preconditioned_outputs,
    sample_flow_matching_u,
    sample_generators,
    sample_noise,
    sample_timesteps,
    shift_sigmas,
    sigmoid_loss_weight,
    unshift_sigmas,
)
from .validation import best_validation_step, reward_validation_metrics, validation_image_seed, win_rate


__all__ = [
    "DDPM_PREDICTION_TYPES",
    "FLOW_TIMESTEP_SAMPLINGS",
    "flow_matching_log_snr",
    "flow_matching_noisy_and_target",
    "flow_matching_sigmas",
    "log_snr",
    "noisy_latents_and_target",
    "per_sample_mse",
    "preconditioned_outputs",
    "sample_flow_matching_u",
    "sample_generators",
    "sample_noise",
    "sample_timesteps",
    "shift_sigmas",
    "sigmoid_loss_weight",
    "unshift_sigmas",
    "best_validation_step",
    "reward_validation_metrics",
    "validation_image_seed",
    "win_rate",
]
