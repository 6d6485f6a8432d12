"""Reward models by name: the names are the score-table columns of examples/eval/score.py."""

import importlib.util

import torch

from .base import RewardInputError
from .clip_rewards import CLIPScore, LaionAesthetic, PickScore
from .hps import HPSv21
from .image_reward import ImageReward
from .vqascore import MISSING_T2V_METRICS, VQAScore


REWARD_MODELS = {model.name: model for model in (PickScore, HPSv21, ImageReward, LaionAesthetic, CLIPScore, VQAScore)}


def check_reward_model_names(names):
    """Unknown names and missing optional packages fail here, before any model is loaded."""
    unknown = [name for name in names if name not in REWARD_MODELS]
    if unknown:
        raise RewardInputError(f"Unknown reward model(s) {unknown}; expected names from {sorted(REWARD_MODELS)}.")
    for name in names:
        dependency = getattr(REWARD_MODELS[name], "optional_dependency", None)
        if dependency is not None and importlib.util.find_spec(dependency) is None:
            raise RewardInputError(
                MISSING_T2V_METRICS if name == "vqascore" else f"{name} needs the optional package {dependency!r}."
            )


def load_reward_model(name, path=None, device=None, dtype=torch.float32, batch_size=16, **kwargs):
    """Build the reward model `name` from its published weights (path=None) or from a local path.

    `device`: None picks CUDA when available. `dtype`: torch dtype or "fp32"/"fp16"/"bf16".
    Extra keyword arguments go to the model's class (e.g. `processor_path`, `head_path`, `weight`).
    """
    check_reward_model_names([name])
    return REWARD_MODELS[name](path=path, device=device, dtype=dtype, batch_size=batch_size, **kwargs)
