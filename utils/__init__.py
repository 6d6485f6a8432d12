"""Math every training script needs identically: noising, targets, timesteps, log-SNR, weightings."""

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
]
