"""DDSPO's image pairs (examples/ddspo/generate_pairs.py), run with plain `python` as a user would, on tiny pipelines.

The degraded-prompt table below has 8 rows, 3 of which cannot make a pair; with --shard_size 4 the 5 pairs fall in two
shards: rows 0, 1, 3 and rows 4, 7. One run on the tiny SDXL pipeline is made once per module; the tests that resume
or change it work on a copy.
"""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from kit import (
    copy_run,
    draw_again,
    file_states,
    finished_line,
    launch,
    one_line_error,
    pair_args,
    pixels,
    read_pairs,
    run_tool,
    shard_files,
)
from PIL import Image

from examples.ddspo.generate_pairs import SHARD_COLUMNS, plan_shards
from examples.lib.sampling import image_seed


SCRIPT = "examples/ddspo/generate_pairs.py"
CAPTIONS = [
    "a photo of a red ball",
    "a photo of a blue ball",
    "a green cone on a table",
    "a photo of a cyan ball",
    "two cats sleeping on a sofa",
    "A red  ball",
    "a yellow cube",
    "a purple ball in the grass",
]
NEGATIVE_CAPTIONS = ["a red", "photo blue ball", None, "a photo ball", "cats sofa", "a red ball", "", "purple grass"]
USABLE_ROWS = [0, 1, 3, 4, 7]  # row 2: no negative; row 5: the caption up to case and spacing; row 6: empty
SKIP_REPORT = (
    "skipped 3 rows (0 with a missing or empty caption, 2 with a missing or empty negative caption, "
    "1 with a negative caption equal to the caption)"
)


@pytest.fixture(scope="module")
def tiny_pipelines(tiny_sdxl, tmp_path_factory):
    """A tiny SDXL (conftest `tiny_sdxl`) and a tiny SD1.x-style pipeline (examples/tiny_world/world.py), VAE
    unfitted."""
    from examples.tiny_world import world

    root = tmp_path_factory.mktemp("tiny_pipelines")
    world.build_tiny_sd_pipeline(root / "tiny-sd", vae_fit_steps=0)
    return {"sdxl": tiny_sdxl, "sd": root / "tiny-sd"}


def write_degraded_prompts(path, negative_captions=NEGATIVE_CAPTIONS):
    """A train.parquet as examples/ddspo/degrade_prompts.py writes it (caption, negative_caption, prompt_index,
    variant)."""
    path.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "caption": pa.array(CAPTIONS, pa.string()),
            "negative_caption": pa.array(negative_captions, pa.string()),
            "prompt_index": pa.array(range(len(CAPTIONS)), pa.int64()),
            "variant": pa.array([0] * len(CAPTIONS), pa.int64()),
        }
    )
    pq.write_table(table, path / "train.parquet")
    return path


def generate_pairs_args(model, dataset, output_dir, *extra):
    return pair_args(model, output_dir, "--dataset", dataset, "--seed", 0, *extra)


@pytest.fixture(scope="module")
def sdxl_run(tiny_pipelines, tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    dataset = write_degraded_prompts(root / "negatives")
    result = run_tool(SCRIPT, generate_pairs_args(tiny_pipelines["sdxl"], dataset, root / "pairs"))
    return {"dataset": dataset, "output_dir": root / "pairs", "result": result}


# Rows to shards, without a model ---


def test_rows_keep_their_shard_whatever_rows_are_skipped():
    shards, skipped, examples = plan_shards(CAPTIONS, NEGATIVE_CAPTIONS, shard_size=4)
    assert shards == {0: [0, 1, 3], 1: [4, 7]}
    assert skipped == {"no_caption": 0, "no_negative_caption": 2, "negative_equals_caption": 1}
    assert len(examples) == 3 and examples[0].startswith("row 2 ")
    shards, skipped, _ = plan_shards(["", "a b", "c d"], ["x", "a", None], shard_size=1)
    assert shards == {1: [1]} and skipped == {"no_caption": 1, "no_negative_caption": 1, "negative_equals_caption": 0}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--shard_size", 0], "--shard_size must be positive"),
        (["--resolution", 60], "--resolution must be a multiple of 8"),
        (["--caption_column", "negative_caption"], "are both 'negative_caption'"),
        (["--negative_caption_column", "c_minus"], "has no column 'c_minus'"),
        (["--output_dir", "DATASET"], "holds --dataset"),
    ],
    ids=["shard_size", "resolution", "same_columns", "missing_column", "output_in_dataset"],
)
def test_bad_flags_and_datasets_stop_with_one_error_line_before_any_model_loads(flags, message, tmp_path):
    dataset = write_degraded_prompts(tmp_path / "negatives")
    flags = [dataset if flag == "DATASET" else flag for flag in flags]  # the last --output_dir counts
    # the model folder does not exist: had the tool tried to load it, the error would name it instead
    result = run_tool(
        SCRIPT,
        generate_pairs_args(tmp_path / "no-such-model", dataset, tmp_path / "pairs", *flags),
        expect_success=False,
    )
    assert message in one_line_error(result)
    assert not (tmp_path / "pairs" / "shards").exists() and not (dataset / "shards").exists()


# One run on the tiny SDXL pipeline ---


@pytest.mark.slow
def test_pairs_are_written_in_shards_with_the_promised_columns_and_png_images_of_the_requested_size(sdxl_run):
    assert [path.name for path in shard_files(sdxl_run["output_dir"])] == [
        "shard-00000.parquet",
        "shard-00001.parquet",
    ]
    assert pq.read_table(shard_files(sdxl_run["output_dir"])[0]).column_names == list(SHARD_COLUMNS)
    pairs = read_pairs(sdxl_run["output_dir"])
    assert [pair["row_index"] for pair in pairs] == USABLE_ROWS
    assert [pair["caption"] for pair in pairs] == [CAPTIONS[row] for row in USABLE_ROWS]
    assert [pair["negative_caption"] for pair in pairs] == [NEGATIVE_CAPTIONS[row] for row in USABLE_ROWS]
    assert [pair["seed"] for pair in pairs] == [image_seed(0, row) for row in USABLE_ROWS]
    for pair in pairs:
        for column in ("jpg_w", "jpg_l"):
            with Image.open(io.BytesIO(pair[column])) as image:
                assert image.format == "PNG" and image.size == (64, 64)


@pytest.mark.slow
def test_both_images_of_a_pair_are_the_reference_models_draws_from_the_stored_seed(sdxl_run, tiny_pipelines):
    pair = read_pairs(sdxl_run["output_dir"])[2]  # row 3
    drawn = draw_again(tiny_pipelines["sdxl"], pair["seed"], [pair["caption"], pair["negative_caption"]])
    for image, column in zip(drawn, ("jpg_w", "jpg_l")):
        # drawn alone here, in a batch of two by the tool: float reductions may move a pixel by one level
        assert np.abs(image - pixels(pair[column])).max() <= 1, column


@pytest.mark.slow
def test_the_winner_differs_from_the_loser_when_the_captions_differ(sdxl_run):
    for pair in read_pairs(sdxl_run["output_dir"]):
        assert np.abs(pixels(pair["jpg_w"]) - pixels(pair["jpg_l"])).mean() > 0.5, pair["row_index"]


@pytest.mark.slow
def test_skipped_rows_are_counted_by_reason_in_the_last_line(sdxl_run):
    line = finished_line(sdxl_run["result"], "generate_pairs")
    assert line.startswith("== generate_pairs finished: 5 pairs written (this run: 5, already on disk: 0)")
    assert SKIP_REPORT in line


@pytest.mark.slow
def test_the_output_folder_reads_as_a_dataset(sdxl_run):
    import datasets

    by_folder = datasets.load_dataset(str(sdxl_run["output_dir"]), split="train")
    by_files = datasets.load_dataset(
        "parquet", data_files=str(sdxl_run["output_dir"] / "shards" / "shard-*.parquet"), split="train"
    )
    for dataset in (by_folder, by_files):
        assert dataset.column_names == list(SHARD_COLUMNS)
        assert dataset["row_index"][:] == USABLE_ROWS


# Resuming ---


@pytest.mark.slow
def test_a_rerun_makes_nothing_and_leaves_the_shards_alone(sdxl_run, tiny_pipelines, tmp_path):
    output_dir = copy_run(sdxl_run["output_dir"], tmp_path / "pairs")
    before = file_states(output_dir)
    result = run_tool(SCRIPT, generate_pairs_args(tiny_pipelines["sdxl"], sdxl_run["dataset"], output_dir))
    assert "0 shards to generate (0 pairs), 2 already" in result.stdout
    assert "5 pairs written (this run: 0, already on disk: 5)" in finished_line(result, "generate_pairs")
    assert file_states(output_dir) == before


@pytest.mark.slow
def test_a_deleted_shard_is_made_again_and_only_it(sdxl_run, tiny_pipelines, tmp_path):
    output_dir = copy_run(sdxl_run["output_dir"], tmp_path / "pairs")
    before = file_states(output_dir)
    (output_dir / "shards" / "shard-00001.parquet").unlink()
    result = run_tool(SCRIPT, generate_pairs_args(tiny_pipelines["sdxl"], sdxl_run["dataset"], output_dir))
    assert "5 pairs written (this run: 2, already on disk: 3)" in finished_line(result, "generate_pairs")
    after = file_states(output_dir)
    assert after["shard-00000.parquet"] == before["shard-00000.parquet"]
    assert after["shard-00001.parquet"][0] != before["shard-00001.parquet"][0]  # written again
    assert read_pairs(output_dir) == read_pairs(sdxl_run["output_dir"])  # same seeds, same batches: same pairs


@pytest.mark.slow
def test_a_resumed_run_with_another_setting_stops_with_one_line(sdxl_run, tiny_pipelines, tmp_path):
    output_dir = copy_run(sdxl_run["output_dir"], tmp_path / "pairs")
    before = file_states(output_dir)
    args = generate_pairs_args(tiny_pipelines["sdxl"], sdxl_run["dataset"], output_dir, "--guidance_scale", 7.5)
    error = one_line_error(run_tool(SCRIPT, args, expect_success=False))
    assert "guidance_scale: 5.0 on disk, 7.5 now" in error and "--output_dir" in error
    assert file_states(output_dir) == before


@pytest.mark.slow
def test_a_resumed_run_whose_negative_caption_changed_for_a_finished_shard_stops_with_one_line(
    sdxl_run, tiny_pipelines, tmp_path
):
    output_dir = copy_run(sdxl_run["output_dir"], tmp_path / "pairs")
    before = file_states(output_dir)
    changed = list(NEGATIVE_CAPTIONS)
    changed[4] = "two cats"
    dataset = write_degraded_prompts(tmp_path / "negatives", negative_captions=changed)
    error = one_line_error(
        run_tool(SCRIPT, generate_pairs_args(tiny_pipelines["sdxl"], dataset, output_dir), expect_success=False)
    )
    assert "shard-00001.parquet" in error
    assert "row 4: negative_caption 'cats sofa' on disk, 'two cats' now" in error
    assert file_states(output_dir) == before


# Other pipelines and processes ---


@pytest.mark.slow
def test_an_sd_pipeline_makes_the_pairs_too_in_one_shard_by_default(sdxl_run, tiny_pipelines, tmp_path):
    args = generate_pairs_args(
        tiny_pipelines["sd"], sdxl_run["dataset"], tmp_path / "sd-pairs", "--scheduler", "euler"
    )
    args[args.index("--shard_size") + 1] = 256
    result = run_tool(SCRIPT, args)
    assert "5 pairs written (this run: 5, already on disk: 0), 1 shards" in finished_line(result, "generate_pairs")
    pairs = read_pairs(tmp_path / "sd-pairs")
    assert [pair["row_index"] for pair in pairs] == USABLE_ROWS
    for pair in pairs:
        assert pixels(pair["jpg_w"]).shape == pixels(pair["jpg_l"]).shape == (64, 64, 3)


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_make_the_same_pairs_as_one(sdxl_run, tiny_pipelines, tmp_path):
    result = launch(
        SCRIPT, generate_pairs_args(tiny_pipelines["sdxl"], sdxl_run["dataset"], tmp_path / "pairs"), num_processes=2
    )
    assert "5 pairs written (this run: 5, already on disk: 0)" in finished_line(result, "generate_pairs")
    two, one = read_pairs(tmp_path / "pairs"), read_pairs(sdxl_run["output_dir"])
    assert [{k: v for k, v in row.items() if k not in ("jpg_w", "jpg_l")} for row in two] == [
        {k: v for k, v in row.items() if k not in ("jpg_w", "jpg_l")} for row in one
    ]
    for row_two, row_one in zip(two, one):
        for column in ("jpg_w", "jpg_l"):
            # the same seeds; two processes draw in smaller batches, which a CPU's kernels may round differently
            assert np.abs(pixels(row_two[column]) - pixels(row_one[column])).max() <= 2, column
