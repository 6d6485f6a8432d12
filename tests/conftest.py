"""Shared fixtures: tiny assets and models built once per session, and module-scoped set-ups that several test files
use. The helpers the tests call are in kit.py."""

import os
import tempfile

import numpy as np
import pytest
from kit import TINY_WORLD_BASES
from PIL import Image


# Every Hugging Face cache (datasets' Arrow files, the latents cache under it, hub downloads) goes to a
# folder of this test session, never the user's ~/.cache. Set before anything imports datasets, and
# inherited by every script the tests launch.
HF_HOME = tempfile.mkdtemp(prefix="preference-tests-hf-")
os.environ.update({"HF_HOME": HF_HOME, "HF_DATASETS_CACHE": os.path.join(HF_HOME, "datasets")})


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """The default tiny SDXL pipeline and tiny Pick-a-Pic dataset (examples/tiny_world/make_tiny_assets.py)."""
    from examples.tiny_world import make_tiny_assets

    root = tmp_path_factory.mktemp("tiny")
    make_tiny_assets.main(["--output_dir", str(root)])
    return {"model": str(root / "tiny-sdxl"), "dataset": str(root / "tiny-pickapic"), "root": root}


@pytest.fixture(scope="session")
def tiny_world(tiny_assets):
    """The tiny pipeline pre-trained to draw the tiny world's balls (TINY_WORLD_BASES/tiny-world-sdxl, README
    command 1's base), with the tiny Pick-a-Pic dataset."""
    return {"model": str(TINY_WORLD_BASES / "tiny-world-sdxl"), "dataset": tiny_assets["dataset"]}


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A tiny SDXL pipeline with its VAE unfitted (examples/tiny_world/world.py): for tools that only need one that
    runs."""
    from examples.tiny_world import world

    path = tmp_path_factory.mktemp("tiny_pipeline") / "tiny-sdxl"
    world.build_tiny_sdxl_pipeline(path, vae_fit_steps=0)
    return path


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """Tiny SD1.x-style pipelines with a fitted VAE, by prediction type: tiny_sd("epsilon") or
    tiny_sd("v_prediction") is the folder, built the first time a test asks for it (about a minute and a half each
    on 2 cores)."""
    from examples.tiny_world import world

    root, folders = tmp_path_factory.mktemp("tiny-sd"), {}

    def folder(prediction_type):
        if prediction_type not in folders:
            path = str(root / prediction_type)
            world.build_tiny_sd_pipeline(path, prediction_type=prediction_type, vae_fit_steps=20)
            folders[prediction_type] = path
        return folders[prediction_type]

    return folder


@pytest.fixture(scope="session")
def tiny_rewards(tmp_path_factory):
    """Every tiny reward stand-in (examples/tiny_world/tiny_rewards.py): {reward name: folder}."""
    from examples.tiny_world.tiny_rewards import write_tiny_reward_models

    return write_tiny_reward_models(tmp_path_factory.mktemp("tiny_rewards"))


@pytest.fixture(scope="module")
def hub_cache_in_a_temporary_folder(tmp_path_factory):
    """Nothing in the module may read or fill ~/.cache: an empty hub cache, offline. A module asks for it with
    `pytestmark = pytest.mark.usefixtures("hub_cache_in_a_temporary_folder")`."""
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hub_cache")))
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def images(request):
    """One random RGB image per prompt of the test module's PROMPTS, each of another height (48, 56, ... by 40)."""
    rng = np.random.default_rng(0)
    count = len(request.module.PROMPTS)
    return [Image.fromarray(rng.integers(0, 256, size=(48 + 8 * i, 40, 3), dtype=np.uint8)) for i in range(count)]
