"""MaPO's task pairs (examples/mapo/build_pairs.py), run with plain `python` as a user would, on a tiny SDXL.

The prompt file below has 8 rows: 2 are empty and, under the safety preset's filter, 3 are not about women; with
--shard_size 4 the 3 pairs fall in two shards: rows 1, 3 and row 6. One run is made once per module; the tests that
resume or change it work on a copy.
"""

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
    tiny_args,
    write_lines,
)

from examples.lib.sampling import image_seed
from examples.mapo.build_pairs import PRESETS, SHARD_COLUMNS, is_about_women, plan_shards, with_prefix


SCRIPT = "examples/mapo/build_pairs.py"
PROMPTS = [
    "a photo of a red ball",
    "a woman holding a blue ball",
    "",
    "The Queen of cats on a sofa",
    "a green cone on a table",
    "   ",
    "a red hat on her head",
    "a womanizer in a bar",  # "woman" only inside a longer word: not about women by the filter
]
SAFETY_ROWS = [1, 3, 6]
SAFETY_SKIP_REPORT = "skipped 5 rows (2 with a missing or empty context prompt, 3 dropped by the prompt filter)"


def build_pairs_args(model, prompts, output_dir, *extra):
    return pair_args(model, output_dir, "--prompts", prompts, *extra)


@pytest.fixture(scope="module")
def safety_run(tiny_sdxl, tmp_path_factory):
    root = tmp_path_factory.mktemp("mapo_tasks")
    prompts = write_lines(root / "prompts.txt", PROMPTS)
    result = run_tool(SCRIPT, build_pairs_args(tiny_sdxl, prompts, root / "pairs", "--preset", "safety"))
    return {"prompts": prompts, "output_dir": root / "pairs", "result": result}


# Prompts and rows, without a model ---


def test_presets_hold_the_papers_prefixes():
    assert PRESETS["cartoon"][:2] == ("Disney style animated image.", "Realistic 8k image.")
    assert PRESETS["pixel_art"][:2] == ("Pixel art style image.", "Realistic 8k image.")
    assert PRESETS["safety"] == ("", "Sexual, nudity, +19 image.", "women")
    assert PRESETS["culture"][0] == "East-Asian art style images."
    assert with_prefix("Realistic 8k image.", "a cat") == "Realistic 8k image. a cat"
    assert with_prefix("", "a cat") == "a cat"


def test_the_women_filter_matches_whole_words_in_any_case():
    assert is_about_women("A WOMAN's portrait") and is_about_women("two girls") and is_about_women("her hat")
    assert not is_about_women("a womanizer") and not is_about_women("a red ball") and not is_about_women("shell")


def test_rows_keep_their_shard_and_every_skipped_row_is_counted_by_reason():
    shards, skipped, examples = plan_shards(PROMPTS, "women", shard_size=4)
    assert shards == {0: [1, 3], 1: [6]}
    assert skipped == {"no_prompt": 2, "filtered_out": 3}
    assert examples[0] == "row 0 (dropped by the prompt filter): 'a photo of a red ball'"
    shards, skipped, _ = plan_shards(PROMPTS, "none", shard_size=4)
    assert shards == {0: [0, 1, 3], 1: [4, 6, 7]} and skipped == {"no_prompt": 2, "filtered_out": 0}


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--preset", "anime"],
            "--preset 'anime' does not exist; the presets are cartoon, culture, pixel_art, safety",
        ),
        (["--chosen_prefix", "Pixel art."], "No prefixes: give --preset"),
        (["--preset", "cartoon", "--rejected_prefix", "disney  style animated image."], "are the same"),
        (["--preset", "cartoon", "--shard_size", 0], "--shard_size must be positive"),
    ],
    ids=["unknown_preset", "one_prefix", "same_prefixes", "shard_size"],
)
def test_bad_flags_stop_with_one_error_line_before_any_model_loads(flags, message, tmp_path):
    # the model folder does not exist: had the tool tried to load it, the error would name it instead
    result = run_tool(
        SCRIPT, build_pairs_args(tmp_path / "no-such-model", tmp_path / "p.txt", tmp_path / "out", *flags), False
    )
    assert message in one_line_error(result)
    assert not (tmp_path / "out").exists()


# One safety run on the tiny SDXL pipeline ---


@pytest.mark.slow
def test_pairs_are_written_in_the_pick_a_pic_schema_with_the_prefixed_prompts_and_seeds(safety_run):
    assert [path.name for path in shard_files(safety_run["output_dir"])] == [
        "shard-00000.parquet",
        "shard-00001.parquet",
    ]
    assert pq.read_table(shard_files(safety_run["output_dir"])[0]).column_names == list(SHARD_COLUMNS)
    pairs = read_pairs(safety_run["output_dir"])
    assert [pair["row_index"] for pair in pairs] == SAFETY_ROWS
    assert [pair["caption"] for pair in pairs] == [PROMPTS[row] for row in SAFETY_ROWS]
    assert [pair["chosen_prompt"] for pair in pairs] == [PROMPTS[row] for row in SAFETY_ROWS]
    assert [pair["rejected_prompt"] for pair in pairs] == [
        f"Sexual, nudity, +19 image. {PROMPTS[row]}" for row in SAFETY_ROWS
    ]
    assert [pair["seed"] for pair in pairs] == [image_seed(0, row) for row in SAFETY_ROWS]
    assert all(pair["label_0"] == 1.0 for pair in pairs)
    for pair in pairs:
        assert pixels(pair["jpg_0"]).shape == pixels(pair["jpg_1"]).shape == (64, 64, 3)
        assert np.abs(pixels(pair["jpg_0"]) - pixels(pair["jpg_1"])).mean() > 0.5, pair["row_index"]


@pytest.mark.slow
def test_the_last_line_counts_the_empty_and_the_filtered_prompts(safety_run):
    line = finished_line(safety_run["result"], "build_pairs")
    assert line.startswith("== build_pairs finished: 3 pairs written (this run: 3, already on disk: 0), 2 shards")
    assert SAFETY_SKIP_REPORT in line


@pytest.mark.slow
def test_the_chosen_image_is_the_pipelines_draw_from_the_chosen_prompt_and_the_stored_seed(safety_run, tiny_sdxl):
    pair = read_pairs(safety_run["output_dir"])[2]  # row 6, alone in its shard and batch
    drawn = draw_again(tiny_sdxl, pair["seed"], [pair["chosen_prompt"], pair["rejected_prompt"]])
    for image, column in zip(drawn, ("jpg_0", "jpg_1")):
        # one grey level of slack: the tool ran with one thread, this process may use more, which rounds differently
        assert np.abs(image - pixels(pair[column])).max() <= 1, column


@pytest.mark.slow
def test_the_output_folder_reads_as_a_dataset_and_trains_mapo_for_a_step(safety_run, tiny_sdxl, tmp_path):

    # As the training scripts read a folder (train_mapo_sdxl.load_split names its data files): a plain
    # load_dataset(folder) of a card with `configs:` is cached under the folder's name and the card's file pattern
    # only, so another folder called "pairs" with the same pattern (generate_pairs.py's) would be read instead.
    import train_mapo_sdxl

    dataset = train_mapo_sdxl.load_split(str(safety_run["output_dir"]), "train")
    assert dataset.column_names == list(SHARD_COLUMNS)
    assert dataset["row_index"][:] == SAFETY_ROWS
    assets = {"model": str(tiny_sdxl), "dataset": str(safety_run["output_dir"])}
    result = launch(
        "train_mapo_sdxl.py", tiny_args(assets, tmp_path / "mapo", "--max_train_steps", 1, "--train_batch_size", 2)
    )
    assert "Num pairs = 3," in result.stdout, result.stdout[-3000:]
    assert (tmp_path / "mapo" / "training_summary.json").is_file()


# Resuming ---


@pytest.mark.slow
def test_a_rerun_makes_nothing_and_leaves_the_shards_alone(safety_run, tiny_sdxl, tmp_path):
    output_dir = copy_run(safety_run["output_dir"], tmp_path / "pairs")
    before = file_states(output_dir)
    result = run_tool(SCRIPT, build_pairs_args(tiny_sdxl, safety_run["prompts"], output_dir, "--preset", "safety"))
    assert "3 pairs written (this run: 0, already on disk: 3)" in finished_line(result, "build_pairs")
    assert file_states(output_dir) == before


@pytest.mark.slow
def test_a_resumed_run_with_another_prefix_stops_with_one_line(safety_run, tiny_sdxl, tmp_path):
    output_dir = copy_run(safety_run["output_dir"], tmp_path / "pairs")
    before = file_states(output_dir)
    args = build_pairs_args(
        tiny_sdxl, safety_run["prompts"], output_dir, "--preset", "safety", "--rejected_prefix", "Ugly."
    )
    error = one_line_error(run_tool(SCRIPT, args, expect_success=False))
    assert "rejected_prefix: 'Sexual, nudity, +19 image.' on disk, 'Ugly.' now" in error
    assert file_states(output_dir) == before


# Other inputs ---


@pytest.mark.slow
def test_custom_prefixes_over_a_parquet_column_make_a_pair_per_non_empty_row(tiny_sdxl, tmp_path):
    pq.write_table(pa.table({"context": ["a cat", None, "a dog"], "other": ["x", "y", "z"]}), tmp_path / "p.parquet")
    args = ["--prompt_column", "context", "--chosen_prefix", "Pixel art.", "--rejected_prefix", ""]
    result = run_tool(SCRIPT, build_pairs_args(tiny_sdxl, tmp_path / "p.parquet", tmp_path / "pairs", *args))
    assert (
        "2 pairs written" in finished_line(result, "build_pairs")
        and "1 with a missing or empty context prompt" in result.stdout
    )
    pairs = read_pairs(tmp_path / "pairs")
    assert [(pair["chosen_prompt"], pair["rejected_prompt"]) for pair in pairs] == [
        ("Pixel art. a cat", "a cat"),
        ("Pixel art. a dog", "a dog"),
    ]
