"""Reward models by name: the names are the score-table columns of examples/eval/score.py.

REWARD_MODELS is the one list of reward models: score.py's choices and help, the tiny stand-ins
(examples/tiny_world/tiny_rewards.py checks it has one for each) and the tests all read it.
"""

import importlib.util

import torch

from .base import RewardInputError
from .clip_rewards import CLIPScore, LaionAesthetic, PickScore
from .hps import HPSv21
from .image_reward import ImageReward
from .mps import MPS
from .toy_ball import ToyBall
from .vqascore import VQAScore


REWARD_MODELS = {
    model.name: model for model in (PickScore, HPSv21, ImageReward, MPS, LaionAesthetic, CLIPScore, VQAScore, ToyBall)
}


def check_reward_model_names(names):
    """Unknown names and missing optional packages fail here, before any model is loaded."""
    unknown = [name for name in names if name not in REWARD_MODELS]
    if unknown:
        raise RewardInputError(f"Unknown reward model(s) {unknown}; expected names from {sorted(REWARD_MODELS)}.")
    for name in names:
        model = REWARD_MODELS[name]
        dependency = getattr(model, "optional_dependency", None)
        if dependency is not None and importlib.util.find_spec(dependency) is None:
            raise RewardInputError(
                getattr(model, "missing_dependency_message", f"{name} needs the optional package {dependency!r}.")
            )


def reward_weights_source(name, path=None):
    """Which weights `load_reward_model(name, path)` would load, found without loading them (see
    `RewardModel.weights_source`); weights that cannot be reached are a RewardInputError."""
    check_reward_model_names([name])
    return REWARD_MODELS[name].weights_source(path)


def load_reward_model(name, path=None, device=None, dtype=torch.float32, batch_size=16, **kwargs):
    """Build the reward model `name` from its published weights (path=None) or from a local path.

    `device`: None picks CUDA when available. `dtype`: torch dtype or "fp32"/"fp16"/"bf16".
    Extra keyword arguments go to the model's class (e.g. `processor_path`, `head_path`, `weight`).
    """
    check_reward_model_names([name])
    return REWARD_MODELS[name](path=path, device=device, dtype=dtype, batch_size=batch_size, **kwargs)
