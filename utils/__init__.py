"""Math every training script needs identically, in two modules that the scripts import by name:

- utils.diffusion: noising, targets, timesteps, log-SNR and weightings, for DDPM and flow-matching models (torch);
- utils.validation: the win-rate of validation by reward and the best validation step (numpy only), which
  examples/eval/compare.py shares, so that a tool that only compares score tables does not import torch.
"""
