"""Shared fixtures: tiny assets and models built once per session, and module-scoped set-ups that several test files
use. The helpers the tests call are in kit.py."""

import fcntl
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from kit import TINY_WORLD_BASES
from PIL import Image


# Every Hugging Face cache (datasets' Arrow files, the latents cache under it, hub downloads) goes to a
# folder of this test session, never the user's ~/.cache. Set before anything imports datasets, and
# inherited by every script the tests launch.
HF_HOME = tempfile.mkdtemp(prefix="preference-tests-hf-")
os.environ.update({"HF_HOME": HF_HOME, "HF_DATASETS_CACHE": os.path.join(HF_HOME, "datasets")})


def built_once(tmp_path_factory, name, build):
    """The folder `name`, made by `build(folder)` once per test session: under pytest-xdist the workers share it (the
    first to ask builds it while the others wait on a lock), so a tiny model is not built once per worker. Tests
    only read these folders."""
    shared = os.environ.get("PYTEST_XDIST_WORKER") is not None  # the workers' temporary folders share a parent
    root = tmp_path_factory.getbasetemp().parent if shared else tmp_path_factory.getbasetemp()
    folder, done = Path(root, f"shared-{name}"), Path(root, f"shared-{name}.done")
    with open(Path(root, f"shared-{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """The default tiny SDXL pipeline and tiny Pick-a-Pic dataset (examples/tiny_world/make_tiny_assets.py)."""
    from examples.tiny_world import make_tiny_assets

    root = built_once(tmp_path_factory, "tiny", lambda folder: make_tiny_assets.main(["--output_dir", str(folder)]))
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

    build = lambda folder: world.build_tiny_sdxl_pipeline(folder / "tiny-sdxl", vae_fit_steps=0)  # noqa: E731
    return built_once(tmp_path_factory, "tiny_pipeline", build) / "tiny-sdxl"


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """Tiny SD1.x-style pipelines with a fitted VAE, by prediction type: tiny_sd("epsilon") or
    tiny_sd("v_prediction") is the folder, built the first time a test asks for it (about a minute and a half each
    on 2 cores)."""
    from examples.tiny_world import world

    def folder(prediction_type):
        def build(path):
            world.build_tiny_sd_pipeline(str(path), prediction_type=prediction_type, vae_fit_steps=20)

        return str(built_once(tmp_path_factory, f"tiny-sd-{prediction_type}", build))

    return folder


@pytest.fixture(scope="session")
def tiny_rewards(tmp_path_factory):
    """Every tiny reward stand-in (examples/tiny_world/tiny_rewards.py): {reward name: folder}."""
    from examples.tiny_world.tiny_rewards import STAND_INS, write_tiny_reward_models

    folder = built_once(tmp_path_factory, "tiny_rewards", write_tiny_reward_models)
    return {name: str(folder / name) for name in STAND_INS}  # where write_tiny_reward_models put each one


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


# The modules that take minutes, longest first: pytest-xdist (--dist loadscope) hands modules to the workers in
# collection order, so these start first and the many short modules fill in at the end, instead of one long
# module running alone while the other workers are done.
LONGEST_FIRST = [
    "learning/test_learning.py",
    "scripts/test_scaling.py",
    "scripts/test_capo.py",
    "learning/test_learning_personalization.py",
    "scripts/test_ddspo.py",
    "scripts/test_end_to_end.py",
    "learning/test_learning_ddspo.py",
    "scripts/test_personalization.py",
    "tools/test_eval.py",
    "tools/test_ddspo_pairs.py",
    "scripts/test_errors.py",
]


def pytest_collection_modifyitems(config, items):
    def rank(item):
        relative = item.path.relative_to(config.rootpath / "tests").as_posix()
        return LONGEST_FIRST.index(relative) if relative in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a module, and of the other modules, stays as collected
