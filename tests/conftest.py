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
# One torch thread in every pytest process, as in every process the tests start (kit.OFFLINE_ENV), set before
# anything imports torch. The suite runs in parallel across processes (three xdist workers and their children
# on two cores); a second thread per process only adds OpenMP threads that spin while they wait for a core,
# which on these tiny models cost more CPU than the work: an in-process test that takes 10 s of CPU alone took
# 37 s in a full run with two threads a worker.
os.environ["OMP_NUM_THREADS"] = "1"
# Every process the suite starts, its xdist workers included, runs as in an environment without bitsandbytes
# (harness/sitecustomize.py, found first on PYTHONPATH): diffusers imports it whenever it is installed, and it imports
# torch's inductor, 3 of the 11 to 14 s that a script took to start on this project's 2-core machine. The tests of
# --use_8bit_adam launch with it (kit.launch(..., bitsandbytes=True)).
os.environ["SUITE_WITHOUT_BITSANDBYTES"] = "1"
os.environ["PYTHONPATH"] = os.pathsep.join(
    part for part in (str(Path(__file__).parent / "harness"), os.environ.get("PYTHONPATH")) if part
)


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
def tiny_sd3(tmp_path_factory):
    """A tiny SD3 pipeline (make_tiny_assets --family sd3, 20-step VAE fit): the folder, for the flow scripts."""
    from examples.tiny_world import world

    build = lambda folder: world.build_tiny_sd3_pipeline(folder / "tiny-sd3", vae_fit_steps=20)  # noqa: E731
    return built_once(tmp_path_factory, "tiny_sd3", build) / "tiny-sd3"


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


@pytest.fixture(scope="session")
def base_verdicts(tiny_world, tmp_path_factory):
    """The shipped tiny-world base's images of kit.PROMPTS (kit.generate_and_judge, seed 0), judged by toy_ball: drawn
    once for all workers, the baseline of every learning test on that base."""
    from kit import generate_and_judge

    from examples.tiny_world.report import judge_run

    folder = built_once(tmp_path_factory, "base-generated", lambda path: generate_and_judge(tiny_world, path, "base"))
    return judge_run(folder / "base")


@pytest.fixture(scope="session")
def tiny_sana(tmp_path_factory):
    """A tiny SANA pipeline as a user builds it (`make_tiny_assets --family sana`; its VAE is not fitted): the folder,
    for the SANA tools and train_ddspo_sana.py."""
    from examples.tiny_world import make_tiny_assets

    build = lambda folder: make_tiny_assets.main(  # noqa: E731
        ["--output_dir", str(folder), "--family", "sana", "--skip_dataset"]
    )
    return built_once(tmp_path_factory, "tiny_sana", build) / "tiny-sana"


@pytest.fixture(scope="session")
def ddspo_pairs(tiny_assets, tmp_path_factory):
    """The tiny Pick-a-Pic pairs as DDSPO rows (caption, negative_caption, jpg_w, jpg_l) plus two bad rows (an empty
    negative caption, and one equal to its caption): the folder, for train_ddspo.py and its flow siblings."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def build(folder):
        folder.mkdir(parents=True)
        table = pq.read_table(Path(tiny_assets["dataset"]) / "train.parquet").to_pydict()
        rows = {"caption": [], "negative_caption": [], "jpg_w": [], "jpg_l": []}
        for caption, first, second, label in zip(table["caption"], table["jpg_0"], table["jpg_1"], table["label_0"]):
            if label == 0.5:
                continue
            winner, loser = (first, second) if label == 1.0 else (second, first)
            rows["caption"].append(caption)
            rows["negative_caption"].append(caption.replace("photo of a ", ""))
            rows["jpg_w"].append(winner)
            rows["jpg_l"].append(loser)
        for negative in ("", rows["caption"][0]):
            for column in ("caption", "jpg_w", "jpg_l"):
                rows[column].append(rows[column][0])
            rows["negative_caption"].append(negative)
        pq.write_table(pa.table(rows), folder / "train.parquet")

    return str(built_once(tmp_path_factory, "ddspo_pairs", build))


@pytest.fixture(scope="session")
def capo_pairs(tiny_assets, tmp_path_factory):
    """The tiny Pick-a-Pic pairs as CaPO rows (reward_pos 0.8, reward_neg 0.2: a gap of 0.6), plus a row whose reward
    is NaN and one whose two images are the same file, each to be skipped and counted: the folder, for
    train_capo.py and train_capo_sd3.py."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def build(folder):
        folder.mkdir(parents=True)
        table = pq.read_table(Path(tiny_assets["dataset"]) / "train.parquet").to_pydict()
        rows = {"caption": [], "jpg_pos": [], "jpg_neg": [], "reward_pos": [], "reward_neg": []}
        for caption, first, second, label in zip(table["caption"], table["jpg_0"], table["jpg_1"], table["label_0"]):
            if label == 0.5:
                continue
            positive, negative = (first, second) if label == 1.0 else (second, first)
            for column, value in zip(rows, (caption, positive, negative, 0.8, 0.2)):
                rows[column].append(value)
        for pos, neg, reward in (
            (rows["jpg_pos"][0], rows["jpg_neg"][0], float("nan")),
            (rows["jpg_pos"][1],) * 2 + (0.8,),
        ):
            for column, value in zip(rows, (rows["caption"][0], pos, neg, reward, 0.2)):
                rows[column].append(value)
        pq.write_table(pa.table(rows), folder / "train.parquet")

    return str(built_once(tmp_path_factory, "capo_pairs", build))


@pytest.fixture(scope="session")
def tiny_world_sd3(tiny_assets):
    """The tiny-world SD3 base (TINY_WORLD_BASES/tiny-world-sd3), with the tiny Pick-a-Pic dataset. `sampling`: the
    flags kit.generate_and_judge draws its images with, T5's 77 tokens, the length train_diffusion_dpo_sd3.py trains
    with (the pipeline's default, 256, makes the joint attention over text and 16 image tokens three times as slow
    here, 35 s against 11 s for the learning tests' 192 images, and the base draws the same: found 0.969 / 0.974,
    colour 0.958 / 0.964, top half 0.448 / 0.438)."""
    return {
        "model": str(TINY_WORLD_BASES / "tiny-world-sd3"),
        "dataset": tiny_assets["dataset"],
        "sampling": ["--max_sequence_length", 77],
    }


@pytest.fixture(scope="session")
def sd3_base_verdicts(tiny_world_sd3, tmp_path_factory):
    """The SD3 base's images of kit.PROMPTS, judged by toy_ball: drawn once for all workers, as base_verdicts."""
    from kit import generate_and_judge

    from examples.tiny_world.report import judge_run

    build = lambda path: generate_and_judge(tiny_world_sd3, path, "base")  # noqa: E731
    return judge_run(built_once(tmp_path_factory, "sd3-base-generated", build) / "base")


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


# How the suite is shared among pytest-xdist workers (tests/run_tests.sh: --dist loadgroup --no-loadscope-reorder).
# A unit of work is one test, or the tests of a module that share a module- or class-scoped fixture (a training
# run several tests read: they must run on the worker that built it, and it is built once). Units are handed out in
# the order below, the longest first, so no long test starts last and runs alone while the other workers idle.
# xdist's default reorder (modules with the most tests first) would undo that order: run_tests.sh turns it off.
LONGEST_TESTS = [  # single tests of several minutes, started before everything else
    "scripts/test_scaling.py::test_benchmark_in_its_reduced_setting",
    "tools/test_toy2d.py::test_the_default_run_reproduces_the_committed_numbers",
]
LONGEST_FIRST = [  # then the modules whose units take minutes
    "learning/test_learning.py",
    "learning/test_learning_ddspo.py",
    "learning/test_learning_personalization.py",
    "learning/test_learning_sd3.py",
    "scripts/test_end_to_end.py",
    "scripts/test_capo.py",
    "scripts/test_scaling.py",
    "scripts/test_personalization.py",
    "scripts/test_ddspo.py",
    "scripts/test_sd3_dpo.py",
    "scripts/test_mapo_sd3.py",
    "scripts/test_caching.py",
    "tools/test_eval.py",
    "scripts/test_bad_inputs_sdxl.py",
    "tools/test_toy2d.py",
    "unit/test_data.py",
    "tools/test_mapo_tasks.py",
    "tools/test_ddspo_pairs.py",
    "scripts/test_errors.py",
]
# Module-scoped fixtures cheap enough to set up on every worker that runs a test of their module: they do not tie
# that module's tests to one worker.
CHEAP_SHARED_FIXTURES = {"hub_cache_in_a_temporary_folder", "images"}


def shared_fixture_groups(items):
    """{item: group name} for the tests that share an expensive module- or class-scoped fixture: the tests of a
    module joined (transitively) by the fixtures they share form one group, named after the module and one of its
    fixtures. Tests that share none are absent: each is a unit of its own."""
    parent = {}

    def find(key):
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    shared = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        names = [
            (module, name)
            for name, definitions in item._fixtureinfo.name2fixturedefs.items()
            if definitions[-1].scope in ("module", "class") and name not in CHEAP_SHARED_FIXTURES
        ]
        for key in names[1:]:
            parent[find(key)] = find(names[0])
        if names:
            shared[item] = names[0]
    return {item: "{}::{}".format(*find(key)) for item, key in shared.items()}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    root = config.rootpath / "tests"

    def rank(item):
        relative = item.path.relative_to(root).as_posix()
        if any(item.nodeid.split("tests/", 1)[-1].startswith(test) for test in LONGEST_TESTS):
            return -1
        return LONGEST_FIRST.index(relative) if relative in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a module, and of the other modules, stays as collected
    for item, group in shared_fixture_groups(items).items():
        item.add_marker(pytest.mark.xdist_group(group))
