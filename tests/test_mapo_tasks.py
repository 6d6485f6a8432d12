"""MaPO's task pairs (examples/mapo/build_pairs.py), run with plain `python` as a user would, on a tiny SDXL.

The prompt file below has 8 rows: 2 are empty and, under the safety preset's filter, 3 are not about women; with
--shard_size 4 the 3 pairs fall in two shards: rows 1, 3 and row 6. One run is made once per module; the tests that
resume or change it work on a copy.
"""

import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import launch, run_python, tiny_args
from PIL import Image

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


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    from examples.tiny_world import world

    path = tmp_path_factory.mktemp("tiny_pipeline") / "tiny-sdxl"
    world.build_tiny_sdxl_pipeline(path, vae_fit_steps=0)
    return path


def pair_args(model, prompts, output_dir, *extra):
    return [
        "--pretrained_model_name_or_path",
        model,
        "--prompts",
        prompts,
        "--num_inference_steps",
        2,
        "--resolution",
        64,
        "--batch_size",
        2,
        "--shard_size",
        4,
        "--output_dir",
        output_dir,
        *extra,
    ]


def run_tool(args, expect_success=True):
    result = run_python(SCRIPT, args)
    if expect_success and result.returncode != 0:
        raise AssertionError(f"build_pairs.py {' '.join(map(str, args))} failed:\n{result.stdout[-4000:]}")
    return result


def summary_line(result):
    lines = [line for line in result.stdout.splitlines() if line.startswith("== build_pairs finished:")]
    assert len(lines) == 1, result.stdout[-3000:]
    return lines[0]


def one_line_error(result):
    """The error as a user sees it: exit code 2, no traceback, and a single line that says `error:`."""
    assert result.returncode == 2, result.stdout[-3000:]
    assert "Traceback" not in result.stdout, result.stdout[-3000:]
    errors = [line for line in result.stdout.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stdout[-3000:]
    return errors[0]


def shard_files(output_dir):
    return sorted((Path(output_dir) / "shards").glob("shard-*.parquet"))


def read_pairs(output_dir):
    return pa.concat_tables([pq.read_table(path) for path in shard_files(output_dir)]).to_pylist()


def pixels(png_bytes):
    return np.asarray(Image.open(io.BytesIO(png_bytes)).convert("RGB"), dtype=np.int16)


def file_states(output_dir):
    return {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in shard_files(output_dir)}


@pytest.fixture(scope="module")
def safety_run(tiny_sdxl, tmp_path_factory):
    root = tmp_path_factory.mktemp("mapo_tasks")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    result = run_tool(pair_args(tiny_sdxl, prompts, root / "pairs", "--preset", "safety"))
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
    result = run_tool(pair_args(tmp_path / "no-such-model", tmp_path / "p.txt", tmp_path / "out", *flags), False)
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
    line = summary_line(safety_run["result"])
    assert line.startswith("== build_pairs finished: 3 pairs written (this run: 3, already on disk: 0), 2 shards")
    assert SAFETY_SKIP_REPORT in line


@pytest.mark.slow
def test_the_chosen_image_is_the_pipelines_draw_from_the_chosen_prompt_and_the_stored_seed(safety_run, tiny_sdxl):
    import torch

    from examples.lib.sampling import generator_for, load_pipeline

    pipeline = load_pipeline(str(tiny_sdxl), torch.float32, "cpu")
    pair = read_pairs(safety_run["output_dir"])[2]  # row 6, alone in its shard and batch
    for prompt, column in ((pair["chosen_prompt"], "jpg_0"), (pair["rejected_prompt"], "jpg_1")):
        image = pipeline(
            prompt=[prompt],
            num_inference_steps=2,
            guidance_scale=5.0,
            height=64,
            width=64,
            generator=[generator_for(pair["seed"])],
        ).images[0]
        # one grey level of slack: the tool ran with one thread, this process may use more, which rounds differently
        assert np.abs(np.asarray(image, dtype=np.int16) - pixels(pair[column])).max() <= 1, column


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
    output_dir = Path(shutil.copytree(safety_run["output_dir"], tmp_path / "pairs"))
    before = file_states(output_dir)
    result = run_tool(pair_args(tiny_sdxl, safety_run["prompts"], output_dir, "--preset", "safety"))
    assert "3 pairs written (this run: 0, already on disk: 3)" in summary_line(result)
    assert file_states(output_dir) == before


@pytest.mark.slow
def test_a_resumed_run_with_another_prefix_stops_with_one_line(safety_run, tiny_sdxl, tmp_path):
    output_dir = Path(shutil.copytree(safety_run["output_dir"], tmp_path / "pairs"))
    before = file_states(output_dir)
    args = pair_args(tiny_sdxl, safety_run["prompts"], output_dir, "--preset", "safety", "--rejected_prefix", "Ugly.")
    error = one_line_error(run_tool(args, expect_success=False))
    assert "rejected_prefix: 'Sexual, nudity, +19 image.' on disk, 'Ugly.' now" in error
    assert file_states(output_dir) == before


# Other inputs ---


@pytest.mark.slow
def test_custom_prefixes_over_a_parquet_column_make_a_pair_per_non_empty_row(tiny_sdxl, tmp_path):
    pq.write_table(pa.table({"context": ["a cat", None, "a dog"], "other": ["x", "y", "z"]}), tmp_path / "p.parquet")
    args = ["--prompt_column", "context", "--chosen_prefix", "Pixel art.", "--rejected_prefix", ""]
    result = run_tool(pair_args(tiny_sdxl, tmp_path / "p.parquet", tmp_path / "pairs", *args))
    assert "2 pairs written" in summary_line(result) and "1 with a missing or empty context prompt" in result.stdout
    pairs = read_pairs(tmp_path / "pairs")
    assert [(pair["chosen_prompt"], pair["rejected_prompt"]) for pair in pairs] == [
        ("Pixel art. a cat", "a cat"),
        ("Pixel art. a dog", "a dog"),
    ]
