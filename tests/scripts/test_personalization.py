"""MaPO personalization (`train_mapo_personalization_sdxl.py`): target images as the chosen side, base-model
samples as the rejected side, with text-encoder LoRA and textual inversion, run as users run it."""

import json
import shutil

import numpy as np
import pytest
import torch
from kit import (
    error_in_process,
    launch,
    one_line_error_under_accelerate,
    parse_args_refusal,
    pixels,
    run_python,
    summary_of,
)
from PIL import Image, ImageDraw
from safetensors.torch import load_file


pytestmark = pytest.mark.slow

SCRIPT = "train_mapo_personalization_sdxl.py"
MODULE = "train_mapo_personalization_sdxl"
CAPTION = "a photo of <sks> ball"
RESOLUTION = 64
SAMPLER = ["--rejected_inference_steps", 3, "--rejected_guidance_scale", 5.0]


def write_targets(folder, count=3, captions=True, extra_files=True):
    """`count` images of one green ball, each with a <name>.txt caption; an unreadable .png and a stray file."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (80, 72), (210, 210, 210))
        ImageDraw.Draw(image).ellipse((20 + 4 * i, 6, 44 + 4 * i, 30), fill=(30, 160, 40))
        image.save(folder / f"subject-{i}.png")
        if captions:
            (folder / f"subject-{i}.txt").write_text(CAPTION + "\n")
    if extra_files:
        (folder / "broken.png").write_bytes(b"not a png")
        (folder / "notes.pdf").write_bytes(b"%PDF-1.4")
    return folder


def personal_args(model, target_dir, output_dir, *extra):
    return [
        "--pretrained_model_name_or_path",
        model,
        "--instance_data_dir",
        target_dir,
        "--resolution",
        RESOLUTION,
        "--train_batch_size",
        3,
        "--seed",
        0,
        "--lr_warmup_steps",
        0,
        "--checkpointing_steps",
        1000,
        "--report_to",
        "none",
        "--beta_mapo",
        1024,
        "--output_dir",
        output_dir,
        *SAMPLER,
        *extra,
    ]


# Text-encoder LoRA and textual inversion together, at learning rates that move a tiny model in two steps.
FULL_RECIPE = ["--lora_rank", 4, "--train_text_encoder", "--placeholder_token", "<sks>", "--initializer_token"]
FULL_RECIPE += ["ball", "--learning_rate", 1e-2, "--text_encoder_lr", 1e-2, "--max_train_steps", 2]
VALIDATION = ["--validation_prompts", CAPTION, "--validation_inference_steps", 3, "--validation_steps", 1000]


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return write_targets(tmp_path_factory.mktemp("targets") / "dog")


@pytest.fixture(scope="module")
def personal_run(tiny_assets, target_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("personal")
    result = launch(SCRIPT, personal_args(tiny_assets["model"], target_dir, output_dir, *FULL_RECIPE, *VALIDATION))
    summary = summary_of(output_dir)
    return output_dir, result.stdout, summary


def base_pipeline(model):
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(model)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_rejected_samples_are_the_base_models_draws_for_the_captions_with_the_initializer(tiny_assets, personal_run):
    import train_mapo_personalization_sdxl

    _, _, summary = personal_run
    rejected = summary["personalization"]["rejected_samples"]
    assert rejected["drawn"] == 3 and rejected["reused"] == 0
    pipeline = base_pipeline(tiny_assets["model"])
    for i in range(3):
        drawn = pipeline(
            "a photo of ball ball",  # the placeholder, which the base model does not know, as its initializer
            num_inference_steps=3,
            guidance_scale=5.0,
            height=RESOLUTION,
            width=RESOLUTION,
            generator=torch.Generator().manual_seed(train_mapo_personalization_sdxl.sample_seed(0, i, 0)),
        ).images[0]
        cached = Image.open(f"{rejected['folder']}/{i:05d}-00.png")
        assert np.abs(pixels(drawn) - pixels(cached)).max() <= 2, i  # one thread in the run, two here
    settings = json.loads(open(f"{rejected['folder']}/settings.json").read())
    assert settings["prompts"] == ["a photo of ball ball"] * 3 and settings["inference_steps"] == 3


def test_unreadable_and_non_image_files_are_skipped_and_named(personal_run):
    _, log, summary = personal_run
    personal = summary["personalization"]
    assert personal["target_images"] == 3
    skipped = sorted(personal["skipped_files"])
    assert len(skipped) == 2 and skipped[0].startswith("broken.png: unreadable image")
    assert skipped[1].startswith("notes.pdf: not an image file")
    assert "3 target images; skipped 2 files" in log and "Skipped broken.png" in log


def test_output_loads_as_the_model_card_says_and_renders_the_validated_model(tiny_assets, personal_run):
    """LoRA (UNet and both text encoders) and the token's embeddings, loaded into a fresh pipeline, draw what the
    run's final validation drew with the model in memory: nothing trained is left out of the files."""
    output_dir, _, _ = personal_run
    card = (output_dir / "README.md").read_text()
    assert "pipeline.load_lora_weights(" in card and 'embeddings["clip_g"], token="<sks>"' in card
    lora = load_file(output_dir / "pytorch_lora_weights.safetensors")
    prefixes = {key.split(".")[0] for key in lora}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}, prefixes
    embeddings = load_file(output_dir / "textual_inversion.safetensors")
    assert embeddings["clip_l"].shape == (1, 32) and embeddings["clip_g"].shape[0] == 1

    pipeline = base_pipeline(tiny_assets["model"])
    ball = pipeline.tokenizer.convert_tokens_to_ids("ball</w>")
    initial = pipeline.text_encoder.get_input_embeddings().weight[ball]
    assert (embeddings["clip_l"][0] - initial).abs().max() > 1e-3  # the token's embedding trained

    def render():
        return pipeline(
            CAPTION,
            num_inference_steps=3,
            guidance_scale=5.0,
            height=RESOLUTION,
            width=RESOLUTION,
            generator=torch.Generator().manual_seed(0),  # the run's validation seed: --seed + prompt index
        ).images[0]

    pipeline.load_lora_weights(str(output_dir))
    for key, suffix in (("clip_l", ""), ("clip_g", "_2")):
        pipeline.load_textual_inversion(
            embeddings[key],
            token="<sks>",
            text_encoder=getattr(pipeline, f"text_encoder{suffix}"),
            tokenizer=getattr(pipeline, f"tokenizer{suffix}"),
        )
    loaded = pixels(render())
    grid = pixels(Image.open(output_dir / "validation" / "step-000002.png"))
    base, trained = grid[:, :RESOLUTION], grid[:, RESOLUTION:]
    assert np.abs(loaded - trained).max() <= 2
    assert np.abs(base - trained).mean() > 5  # the run moved the model far enough for the check to mean something


def test_rerun_reuses_the_rejected_samples_and_a_new_sampler_setting_draws_new_ones(
    tiny_assets, target_dir, personal_run, tmp_path
):
    first_dir, _, summary = personal_run
    folder = summary["personalization"]["rejected_samples"]["folder"]
    before = {p.name: p.stat().st_mtime_ns for p in sorted(first_dir.glob("rejected_samples/*/*.png"))}
    common = ["--lora_rank", 4, "--max_train_steps", 1, "--rejected_cache_dir", first_dir / "rejected_samples"]
    common += ["--placeholder_token", "<sks>", "--initializer_token", "ball"]  # the first run's prompts
    launch(SCRIPT, personal_args(tiny_assets["model"], target_dir, tmp_path / "again", *common))
    again = summary_of(tmp_path / "again")["personalization"]
    assert again["rejected_samples"] == {"folder": folder, "drawn": 0, "reused": 3}
    assert {p.name: p.stat().st_mtime_ns for p in sorted(first_dir.glob("rejected_samples/*/*.png"))} == before

    more_steps = personal_args(
        tiny_assets["model"], target_dir, tmp_path / "new", *common, "--rejected_inference_steps", 4
    )
    launch(SCRIPT, more_steps)
    new = summary_of(tmp_path / "new")["personalization"]
    assert new["rejected_samples"]["drawn"] == 3 and new["rejected_samples"]["folder"] != folder


def test_resumed_run_ends_with_the_text_encoder_lora_and_embeddings_of_an_uninterrupted_one(
    tiny_assets, target_dir, tmp_path
):
    recipe = [arg if arg != 2 else 4 for arg in FULL_RECIPE]  # 4 steps
    uninterrupted = tmp_path / "uninterrupted"
    common = ["--checkpointing_steps", 2, "--rejected_cache_dir", tmp_path / "samples", "--num_rejected_per_image", 2]
    launch(SCRIPT, personal_args(tiny_assets["model"], target_dir, uninterrupted, *recipe, *common))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(uninterrupted / "checkpoint-2", resumed / "checkpoint-2")
    resume = ["--resume_from_checkpoint", "latest"]
    launch(SCRIPT, personal_args(tiny_assets["model"], target_dir, resumed, *recipe, *common, *resume))
    for name in ("pytorch_lora_weights.safetensors", "textual_inversion.safetensors"):
        first, second = load_file(uninterrupted / name), load_file(resumed / name)
        assert first.keys() == second.keys()
        for key in first:
            assert torch.allclose(first[key], second[key], atol=1e-6), (name, key)
    summary = summary_of(uninterrupted)
    assert summary["total_batch_size"] == 3 and summary["personalization"]["rejected_samples"]["drawn"] == 6


def test_two_processes_share_the_drawing_and_train_the_text_encoders_in_step(tiny_assets, target_dir, tmp_path):
    args = personal_args(tiny_assets["model"], target_dir, tmp_path, *FULL_RECIPE, "--train_batch_size", 2)
    result = launch(SCRIPT, args, num_processes=2)
    assert "weights identical on all processes: yes" in result.stdout
    summary = summary_of(tmp_path)
    assert summary["personalization"]["rejected_samples"]["drawn"] == 3 and summary["total_batch_size"] == 4


def test_a_dataset_of_images_without_captions_trains_with_instance_prompt(tiny_assets, tmp_path):
    import datasets

    folder = write_targets(tmp_path / "images", count=2, captions=False, extra_files=False)
    rows = {"image": [str(path) for path in sorted(folder.glob("*.png"))]}
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).save_to_disk(tmp_path / "dataset")
    extra = ["--instance_prompt", CAPTION, "--max_train_steps", 1, "--train_batch_size", 2]
    for source in (folder, tmp_path / "dataset"):
        output_dir = tmp_path / f"out-{source.name}"
        launch(SCRIPT, personal_args(tiny_assets["model"], source, output_dir, *extra))
        personal = summary_of(output_dir)["personalization"]
        assert personal["target_images"] == 2 and personal["rejected_samples"]["drawn"] == 2


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--train_text_encoder"], "--train_text_encoder trains LoRA adapters on the text encoders; give --lora_rank"),
        (["--placeholder_token", "<sks>"], "--placeholder_token and --initializer_token go together"),
        (["--placeholder_token", "<s>", "--initializer_token", "ball", "--cache_latents"], "--cache_latents caches"),
        (["--preference_eval_split", "test"], "unrecognized arguments: --preference_eval_split"),
        (["--num_rejected_per_image", 0], "--num_rejected_per_image must be positive"),
    ],
)
def test_bad_personalization_flags_stop_with_one_line_before_any_model_loads(
    target_dir, tmp_path, flags, message, capsys
):
    # in parse_args, before torch is imported (test_errors.py runs each script's refusal as users see it)
    argv = personal_args("/no/such/model", target_dir, tmp_path, *flags)[2:]
    assert message in parse_args_refusal(MODULE, argv, capsys)


def test_instance_prompt_without_an_instance_folder_is_refused(tmp_path, capsys):
    error = parse_args_refusal(MODULE, ["--instance_prompt", CAPTION, "--output_dir", tmp_path], capsys)
    assert "the following arguments are required: --instance_data_dir" in error


def test_the_text_to_image_script_points_personalization_to_this_script(target_dir, tmp_path, capsys):
    argv = ["--instance_data_dir", target_dir, "--output_dir", tmp_path]
    error = parse_args_refusal("train_mapo_sdxl", argv, capsys)
    assert f"--instance_data_dir is personalization, which {SCRIPT} trains" in error


@pytest.mark.parametrize(
    "case,flags,message",
    [
        ("uncaptioned", [], "2 of 2 target images in"),
        ("empty", [], "has no readable target image"),
        ("captioned", ["--placeholder_token", "<zz>", "--initializer_token", "ball"], "No caption contains"),
        ("captioned", ["--placeholder_token", "<sks>", "--initializer_token", "tennis"], "is 6 tokens in tokenizer 1"),
        ("captioned", ["--placeholder_token", "ball", "--initializer_token", "of"], "'ball' is already a token"),
    ],
)
def test_bad_target_data_stops_with_one_line(tiny_assets, tmp_path, case, flags, message):
    folder = tmp_path / case
    if case == "empty":
        folder.mkdir()
        (folder / "broken.png").write_bytes(b"not a png")
    else:
        write_targets(folder, count=2, captions=case == "captioned", extra_files=False)
    args = personal_args(tiny_assets["model"], folder, tmp_path / "out", "--max_train_steps", 1, *flags)
    result = launch(SCRIPT, args, check=False)
    line = one_line_error_under_accelerate(result, SCRIPT)
    assert message in line, line
    assert not list((tmp_path / "out").glob("rejected_samples/*/*.png"))  # stopped before drawing anything


def test_generate_py_loads_the_new_token_beside_the_lora_weights(tiny_assets, personal_run, tmp_path, capsys):
    """examples/eval/generate.py --lora_path on a personalization output also loads its token, so "<sks>" in an
    evaluation prompt reads the trained embeddings, not four unknown characters."""
    from examples.eval import generate
    from examples.lib.sampling import load_pipeline, textual_inversion_file

    output_dir, _, _ = personal_run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(CAPTION + "\n")
    args = ["--pretrained_model_name_or_path", tiny_assets["model"], "--output_dir", tmp_path / "generated"]
    args += ["--prompts", prompts, "--images_per_prompt", 1, "--resolution", RESOLUTION, "--num_inference_steps", 2]
    result = run_python("examples/eval/generate.py", [*args, "--model_name", "personal", "--lora_path", output_dir])
    assert result.returncode == 0, result.stdout[-3000:]
    config = json.loads((tmp_path / "generated" / "personal" / "generation_config.json").read_text())
    saved = output_dir / "textual_inversion.safetensors"
    assert config["textual_inversion_path"] == str(saved.resolve())
    assert (tmp_path / "generated" / "personal" / "00000_00.png").exists()

    path = textual_inversion_file(None, str(output_dir))
    pipeline = load_pipeline(
        tiny_assets["model"], torch.float32, "cpu", lora_path=str(output_dir), textual_inversion_path=path
    )
    embeddings = load_file(saved)
    for key, suffix in (("clip_l", ""), ("clip_g", "_2")):
        tokenizer, encoder = getattr(pipeline, f"tokenizer{suffix}"), getattr(pipeline, f"text_encoder{suffix}")
        assert tokenizer.tokenize(CAPTION).count("<sks>") == 1
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("<sks>")]
        assert torch.equal(row, embeddings[key][0]), key
    # a folder without the embeddings is refused before any model loads (in this process, as `python -m` runs it)
    error = error_in_process(generate, [*args, "--model_name", "x", "--textual_inversion_path", tmp_path], capsys)
    assert "--textual_inversion_path" in error and "no such file" in error
