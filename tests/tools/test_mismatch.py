"""Reference mismatch (examples/mapo/measure_mismatch.py), run with plain `python` as a user would, on a tiny SDXL
and a tiny, randomly initialised DINOv2 stand-in.

The dataset is build_pairs.py's output with an empty chosen prefix: jpg_0 is the tiny SDXL's own draw from the
caption and the stored seed, so measured against the same model it gives 1.0; jpg_1 (drawn with another prefix) is
"another dataset" and gives less.
"""

import json

import pytest
from kit import one_line_error, run_python, run_tool, write_lines, write_tiny_dinov2

from examples.mapo.measure_mismatch import TABLE_3_BETAS, suggest_beta


SCRIPT = "examples/mapo/measure_mismatch.py"
PROMPTS = ["a photo of a red ball", "a blue cube on a table", "", "a green cone in the grass"]


@pytest.fixture(scope="module")
def mismatch_assets(tiny_sdxl, tmp_path_factory):
    """A tiny SDXL (conftest `tiny_sdxl`), a tiny DINOv2 and a pairs dataset drawn by that SDXL (build_pairs.py,
    chosen prefix empty)."""
    root = tmp_path_factory.mktemp("mismatch")
    prompts = write_lines(root / "prompts.txt", PROMPTS)
    pair_args = ["--pretrained_model_name_or_path", tiny_sdxl, "--prompts", prompts]
    pair_args += ["--chosen_prefix", "", "--rejected_prefix", "Realistic 8k image.", "--seed", 3]
    pair_args += ["--num_inference_steps", 2, "--resolution", 64, "--batch_size", 1, "--output_dir", root / "pairs"]
    result = run_python("examples/mapo/build_pairs.py", pair_args)
    assert result.returncode == 0, result.stdout[-3000:]
    return {"model": tiny_sdxl, "dinov2": write_tiny_dinov2(root / "dinov2"), "dataset": root / "pairs"}


def mismatch_args(assets, output_dir, *extra):
    return [
        "--pretrained_model_name_or_path",
        assets["model"],
        "--dataset",
        assets["dataset"],
        "--seed_column",
        "seed",
        "--dinov2_model_name_or_path",
        assets["dinov2"],
        "--num_inference_steps",
        2,
        "--resolution",
        64,
        "--batch_size",
        1,
        "--output_dir",
        output_dir,
        *extra,
    ]


@pytest.fixture(scope="module")
def own_draws(mismatch_assets, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("measured") / "mismatch"
    result = run_tool(SCRIPT, mismatch_args(mismatch_assets, output_dir))
    return {
        "output_dir": output_dir,
        "result": result,
        "report": json.loads((output_dir / "mismatch.json").read_text()),
    }


# The β suggestion, without a model ---


def test_table_3_betas_are_the_papers_in_figure_2s_order():
    assert list(TABLE_3_BETAS.items()) == [
        ("preference_alignment", 8),
        ("cultural_representation", 32),
        ("safe_generation", 64),
        ("style_learning", 64),
        ("personalization", 1024),
    ]


def test_without_task_similarities_no_beta_is_suggested_and_table_3_is_listed():
    low, high, reason = suggest_beta(0.5, {})
    assert (low, high) == (None, None) and "personalization 1024" in reason


def test_a_similarity_between_two_tasks_gets_the_beta_range_between_theirs():
    tasks = {"preference_alignment": 0.8, "style_learning": 0.5, "personalization": 0.3}
    assert suggest_beta(0.6, tasks)[:2] == (8, 64)
    assert suggest_beta(0.4, tasks)[:2] == (64, 1024)
    assert suggest_beta(0.9, tasks)[:2] == (8, 8) and "or lower" in suggest_beta(0.9, tasks)[2]
    assert suggest_beta(0.1, tasks)[:2] == (1024, 1024) and "or higher" in suggest_beta(0.1, tasks)[2]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--task_similarities", "anime=0.4"], "unknown task 'anime'"),
        (["--task_similarities", "style_learning=high"], "expected TASK=SIMILARITY with a number"),
        (["--max_samples", 0], "--max_samples must be positive"),
    ],
    ids=["unknown_task", "not_a_number", "max_samples"],
)
def test_bad_flags_stop_with_one_error_line_before_any_model_loads(flags, message, tmp_path):
    args = ["--dataset", tmp_path / "no-data", "--output_dir", tmp_path / "out", *flags]
    assert message in one_line_error(run_tool(SCRIPT, args, expect_success=False))
    assert not (tmp_path / "out").exists()


# Measured on the tiny models ---


@pytest.mark.slow
def test_a_dataset_of_the_models_own_draws_from_the_same_seeds_measures_one(own_draws):
    report = own_draws["report"]
    assert report["pairs"] == 3 and report["skipped"]["no_caption"] == 0  # build_pairs already skipped the empty row
    assert report["mean_cosine_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert all(value == pytest.approx(1.0, abs=1e-5) for value in report["similarities"].values())
    assert "mean DINOv2 cosine similarity 1.000000" in own_draws["result"].stdout


@pytest.mark.slow
def test_another_dataset_measures_less_and_reuses_the_draws(mismatch_assets, own_draws):
    args = mismatch_args(mismatch_assets, own_draws["output_dir"], "--image_column", "jpg_1")
    args += ["--task_similarities", "preference_alignment=0.9999", "personalization=0.2"]
    result = run_tool(SCRIPT, args)
    assert "0 images to draw, 3 already" in result.stdout
    report = json.loads((own_draws["output_dir"] / "mismatch.json").read_text())
    assert report["mean_cosine_similarity"] < 0.999
    assert report["suggested_beta_mapo"] == [8, 1024]


@pytest.mark.slow
def test_a_resumed_run_with_another_sampler_setting_stops_with_one_line(mismatch_assets, own_draws):
    args = mismatch_args(mismatch_assets, own_draws["output_dir"], "--guidance_scale", 7.5)
    assert "guidance_scale: 5.0 on disk, 7.5 now" in one_line_error(run_tool(SCRIPT, args, expect_success=False))
