"""DDSPO's image pairs (examples/ddspo/generate_pairs.py), run with plain `python` as a user would, on tiny pipelines;
its refusals (those of a resumed run too) and its plan of the rows are checked in this process.

The degraded-prompt table below has 8 rows, 3 of which cannot make a pair; with --shard_size 4 the 5 pairs fall in two
shards: rows 0, 1, 3 and rows 4, 7. One run on the tiny SDXL pipeline is made once per module; the tests that resume
or change it work on a copy.
"""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from kit import (
    copy_run,
    draw_again,
    error_in_process,
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

from examples.ddspo import generate_pairs
from examples.ddspo.generate_pairs import SHARD_COLUMNS, check_prompt_indices, plan_shards, read_prompt_pairs
from examples.lib.cli import InputError
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
    "1 with a negative caption equal to the caption, 0 not drawn (another negative of the same prompt_index makes "
    "its pair))"
)


@pytest.fixture(scope="module")
def tiny_pipelines(tiny_sdxl, tmp_path_factory):
    """A tiny SDXL (conftest `tiny_sdxl`) and a tiny SD1.x-style pipeline (examples/tiny_world/world.py), VAE
    unfitted."""
    from examples.tiny_world import world

    root = tmp_path_factory.mktemp("tiny_pipelines")
    world.build_tiny_sd_pipeline(root / "tiny-sd", vae_fit_steps=0)
    return {"sdxl": tiny_sdxl, "sd": root / "tiny-sd"}


def write_degraded_prompts(path, negative_captions=NEGATIVE_CAPTIONS, captions=CAPTIONS, prompt_indices=None):
    """A train.parquet as examples/ddspo/degrade_prompts.py writes it (caption, negative_caption, prompt_index,
    variant); by default each row is a prompt of its own."""
    path.mkdir(parents=True, exist_ok=True)
    prompt_indices = list(range(len(captions))) if prompt_indices is None else prompt_indices
    variants = [prompt_indices[:row].count(prompt_index) for row, prompt_index in enumerate(prompt_indices)]
    table = pa.table(
        {
            "caption": pa.array(captions, pa.string()),
            "negative_caption": pa.array(negative_captions, pa.string()),
            "prompt_index": pa.array(prompt_indices, pa.int64()),
            "variant": pa.array(variants, pa.int64()),
        }
    )
    pq.write_table(table, path / "train.parquet")
    return path


def generate_pairs_args(model, dataset, output_dir, *extra):
    # guidance 5, as kit.draw_again draws (the tool's default is the release's 7.5)
    return pair_args(model, output_dir, "--dataset", dataset, "--seed", 0, "--guidance_scale", 5, *extra)


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
    assert skipped == {"no_caption": 0, "no_negative_caption": 2, "negative_equals_caption": 1, "not_drawn": 0}
    assert len(examples) == 3 and examples[0].startswith("row 2 ")
    shards, skipped, _ = plan_shards(["", "a b", "c d"], ["x", "a", None], shard_size=1)
    assert shards == {1: [1]}
    assert skipped == {"no_caption": 1, "no_negative_caption": 1, "negative_equals_caption": 0, "not_drawn": 0}


def test_one_negative_is_drawn_per_prompt_among_its_usable_rows_whatever_the_shards():
    # 300 prompts with 5 negatives each, as degrade_prompts.py writes them; the first negative of each is empty
    prompt_indices = [prompt for prompt in range(300) for _ in range(5)]
    captions = [f"prompt {prompt}" for prompt in prompt_indices]
    negatives = ["" if row % 5 == 0 else f"negative {row}" for row in range(len(captions))]
    shards, skipped, _ = plan_shards(captions, negatives, 7, prompt_indices, seed=0)
    drawn = [row for shard in sorted(shards) for row in shards[shard]]
    assert [prompt_indices[row] for row in drawn] == list(range(300))  # one row per prompt, in order
    assert skipped["no_negative_caption"] == 300 and skipped["not_drawn"] == 300 * 3
    variants = np.bincount([row % 5 for row in drawn], minlength=5)
    assert variants[0] == 0 and all(45 <= count <= 105 for count in variants[1:]), variants  # uniform: 75 each
    by_shard_size = [plan_shards(captions, negatives, size, prompt_indices, seed=0)[0] for size in (1, 5000)]
    for other in by_shard_size:
        assert sorted(row for rows in other.values() for row in rows) == drawn
    again = plan_shards(captions, negatives, 7, prompt_indices, seed=0)[0]
    other_seed = plan_shards(captions, negatives, 7, prompt_indices, seed=1)[0]
    assert again == shards and other_seed != shards


def test_prompt_indices_must_be_non_negative_integers_shared_by_rows_of_one_caption():
    check_prompt_indices("negatives", ["a b", "a b", "c d"], [0, 0, 1])
    for captions, prompt_indices, message in (
        (["a b", "c d"], [0, -1], "row 1 has prompt_index -1"),
        (["a b", "c d"], [0, None], "row 1 has prompt_index None"),
        (["a b", "c d"], [0, 0], "rows 0 and 1 share prompt_index 0 but not their caption"),
    ):
        with pytest.raises(InputError, match=message):
            check_prompt_indices("negatives", captions, prompt_indices)


def test_defaults_follow_the_authors_release_25_steps_guidance_7_5_one_negative_per_prompt(tmp_path):
    dataset = write_degraded_prompts(tmp_path / "negatives")
    args = generate_pairs.parse_args(["--dataset", str(dataset), "--output_dir", str(tmp_path / "pairs")])
    assert (args.num_inference_steps, args.guidance_scale, args.negatives_per_prompt) == (25, 7.5, "one")


def truncated_pipeline(folder):
    """A pipeline folder whose UNet weights were cut short in copying."""
    from safetensors.numpy import save_file

    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({"weight": np.zeros(1000, np.float32)}, str(weights))
    weights.write_bytes(weights.read_bytes()[:2000])
    return folder


BAD_INPUTS = {  # name: (flags, what the one line says); MODEL, DATASET, A_FILE are filled in
    "shard_size": (["--shard_size", 0], "--shard_size must be positive"),
    "resolution": (["--resolution", 60], "--resolution must be a multiple of 8"),
    "guidance_nan": (["--guidance_scale", "nan"], "--guidance_scale: 'nan' is not a finite number"),
    "guidance_inf": (["--guidance_scale", "inf"], "--guidance_scale: 'inf' is not a finite number"),
    "same_columns": (["--caption_column", "negative_caption"], "are both 'negative_caption'"),
    "output_in_dataset": (["--output_dir", "DATASET"], "holds --dataset"),
    "output_is_a_file": (["--output_dir", "A_FILE"], "is a file"),
    "output_cannot_be_written": (["--output_dir", "A_FILE/pairs"], "cannot be written"),
    "truncated_weights": (["--pretrained_model_name_or_path", "TRUNCATED"], "is truncated"),
    "truncated_vae": (["--pretrained_vae_model_name_or_path", "TRUNCATED/unet"], "is truncated"),
    "missing_unet": (["--unet_path", "./no-such-unet"], "--unet_path './no-such-unet' does not exist"),
    "unet_without_config": (["--unet_path", "TRUNCATED"], "unet/config.json nor config.json"),
    "unet_and_lora": (["--unet_path", "TRUNCATED", "--lora_path", "A_FILE"], "Give one of --lora_path, --unet_path"),
}


@pytest.mark.parametrize("flags, message", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_flags_and_inputs_stop_with_one_error_line_before_any_model_loads(flags, message, tmp_path, capsys):
    dataset = write_degraded_prompts(tmp_path / "negatives")
    (tmp_path / "a-file").write_text("not a folder")
    places = {
        "DATASET": dataset,
        "A_FILE": tmp_path / "a-file",
        "A_FILE/pairs": tmp_path / "a-file" / "pairs",
        "TRUNCATED": truncated_pipeline(tmp_path / "truncated"),
        "TRUNCATED/unet": tmp_path / "truncated" / "unet",
    }
    flags = [places.get(flag, flag) for flag in flags]  # the last --output_dir counts
    # the model folder does not exist: had the tool tried to load it, the error would name it instead
    args = generate_pairs_args(tmp_path / "no-such-model", dataset, tmp_path / "pairs", *flags)
    assert message in error_in_process(generate_pairs, args, capsys)
    assert not (tmp_path / "pairs" / "shards").exists() and not (dataset / "shards").exists()
    assert (tmp_path / "a-file").read_text() == "not a folder"


def test_a_missing_column_is_named_before_any_model_loads(tmp_path):
    dataset = write_degraded_prompts(tmp_path / "negatives")
    args = generate_pairs_args(
        tmp_path / "no-such-model", dataset, tmp_path / "pairs", "--negative_caption_column", "c"
    )
    with pytest.raises(InputError, match="has no column 'c'"):
        read_prompt_pairs(generate_pairs.parse_args([str(arg) for arg in args]))


def test_the_readme_hub_command_offline_ends_with_one_line(tmp_path):
    # the README's SD-1.4 command, on degraded prompts made here; offline (the tests' HF_HUB_OFFLINE=1) the model
    # cannot be downloaded
    dataset = write_degraded_prompts(tmp_path / "diffusiondb-rand-removal")
    args = ["--pretrained_model_name_or_path", "CompVis/stable-diffusion-v1-4", "--dataset", dataset]
    args += ["--resolution", 512, "--mixed_precision", "fp16", "--batch_size", 16]
    result = run_tool(SCRIPT, [*args, "--output_dir", tmp_path / "diffusiondb-pairs-sd14"], expect_success=False)
    assert "--pretrained_model_name_or_path 'CompVis/stable-diffusion-v1-4' could not be loaded" in one_line_error(
        result
    )


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
def test_a_fine_tuned_reference_given_as_unet_path_draws_the_pairs(sdxl_run, tiny_pipelines, tmp_path):
    """`--unet_path`: the pairs are the draws of the pipeline with that UNet in place of the base's (here the tiny
    base's UNet with its weights moved), not the base's, and the settings file names it."""
    import shutil

    import torch
    from diffusers import UNet2DConditionModel

    fine_tuned = tmp_path / "fine-tuned"
    shutil.copytree(tiny_pipelines["sdxl"], fine_tuned)  # a whole pipeline, so that draw_again can load it
    unet = UNet2DConditionModel.from_pretrained(fine_tuned / "unet")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    unet.save_pretrained(fine_tuned / "unet")
    output_dir = tmp_path / "pairs"
    args = generate_pairs_args(tiny_pipelines["sdxl"], sdxl_run["dataset"], output_dir, "--unet_path", fine_tuned)
    run_tool(SCRIPT, args)
    pair, base_pair = read_pairs(output_dir)[2], read_pairs(sdxl_run["output_dir"])[2]  # row 3, the same seed
    assert pair["seed"] == base_pair["seed"]
    drawn = draw_again(fine_tuned, pair["seed"], [pair["caption"], pair["negative_caption"]])
    for image, column in zip(drawn, ("jpg_w", "jpg_l")):
        assert np.abs(image - pixels(pair[column])).max() <= 1, column
        assert np.abs(pixels(pair[column]) - pixels(base_pair[column])).mean() > 0.5, column
    config = json.loads((output_dir / "pairs_config.json").read_text())
    assert config["unet_path"] == str(fine_tuned.resolve()) and "lora_path" not in config


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
def test_a_resumed_run_with_another_setting_stops_with_one_line(sdxl_run, tiny_pipelines, tmp_path, capsys):
    output_dir = copy_run(sdxl_run["output_dir"], tmp_path / "pairs")
    before = file_states(output_dir)
    args = generate_pairs_args(tiny_pipelines["sdxl"], sdxl_run["dataset"], output_dir, "--guidance_scale", 7.5)
    error = error_in_process(generate_pairs, args, capsys)  # before the model loads
    assert "guidance_scale: 5.0 on disk, 7.5 now" in error and "--output_dir" in error
    assert file_states(output_dir) == before


@pytest.mark.slow
def test_a_resumed_run_whose_negative_caption_changed_for_a_finished_shard_stops_with_one_line(
    sdxl_run, tiny_pipelines, tmp_path, capsys
):
    output_dir = copy_run(sdxl_run["output_dir"], tmp_path / "pairs")
    before = file_states(output_dir)
    changed = list(NEGATIVE_CAPTIONS)
    changed[4] = "two cats"
    dataset = write_degraded_prompts(tmp_path / "negatives", negative_captions=changed)
    error = error_in_process(generate_pairs, generate_pairs_args(tiny_pipelines["sdxl"], dataset, output_dir), capsys)
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
def test_a_prompts_negatives_make_one_pair_drawn_from_them_with_the_releases_sampler_by_default(
    tiny_pipelines, tmp_path
):
    captions = ["a photo of a red ball"] * 3 + ["two cats sleeping on a sofa"] * 2 + ["a yellow cube"]
    negatives = ["a red", "photo ball", "", "cats sofa", "two cats", "a cube"]
    dataset = write_degraded_prompts(tmp_path / "negatives", negatives, captions, prompt_indices=[0, 0, 0, 1, 1, 2])
    args = ["--pretrained_model_name_or_path", tiny_pipelines["sdxl"], "--dataset", dataset, "--resolution", 64]
    result = run_tool(SCRIPT, [*args, "--output_dir", tmp_path / "pairs"])
    line = finished_line(result, "generate_pairs")
    assert "3 pairs written" in line and "1 with a missing or empty negative caption" in line
    assert "2 not drawn (another negative of the same prompt_index makes its pair)" in line
    pairs = read_pairs(tmp_path / "pairs")
    expected_shards, _, _ = plan_shards(captions, negatives, 256, [0, 0, 0, 1, 1, 2], seed=0)
    assert [pair["row_index"] for pair in pairs] == expected_shards[0]
    assert [pair["caption"] for pair in pairs] == [
        "a photo of a red ball",
        "two cats sleeping on a sofa",
        "a yellow cube",
    ]
    config = json.loads((tmp_path / "pairs" / "pairs_config.json").read_text())
    assert (config["num_inference_steps"], config["guidance_scale"], config["negatives_per_prompt"]) == (
        25,
        7.5,
        "one",
    )


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
