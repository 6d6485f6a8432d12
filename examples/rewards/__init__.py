"""Text-to-image reward models behind one interface, for evaluation (examples/eval) and data pipelines.

    from examples.rewards import load_reward_model
    reward = load_reward_model("pickscore", device="cuda", dtype="fp16")
    scores = reward.score(images, prompts)      # float32 tensor (N,)
    reward.kind                                   # "bradley_terry" or "probability"

Each model loads its published weights by default and any local copy by path;
`examples/tiny_world/tiny_rewards.py` writes tiny random stand-ins for offline smoke tests.
"""

from .base import KINDS, RewardInputError, RewardModel, preference_probability, resolve_torch_dtype
from .clip_rewards import CLIPScore, LaionAesthetic, PickScore
from .hps import HPSv21, convert_open_clip_state_dict
from .image_reward import ImageReward, convert_image_reward_state_dict
from .registry import REWARD_MODELS, check_reward_model_names, load_reward_model, reward_weights_source
from .toy_ball import ToyBall
from .vqascore import VQAScore


__all__ = [
    "CLIPScore",
    "HPSv21",
    "ImageReward",
    "KINDS",
    "LaionAesthetic",
    "PickScore",
    "REWARD_MODELS",
    "RewardInputError",
    "RewardModel",
    "ToyBall",
    "VQAScore",
    "check_reward_model_names",
    "convert_image_reward_state_dict",
    "convert_open_clip_state_dict",
    "load_reward_model",
    "preference_probability",
    "resolve_torch_dtype",
    "reward_weights_source",
]
