"""The tiny SANA pipeline (examples/tiny_world/world.py's build_tiny_sana_pipeline, `make_tiny_assets --family sana`):
built from configs, it loads with the stock SanaPipeline.from_pretrained offline and draws, and generate.py draws
with it."""

import inspect
import json

import numpy as np
import pytest
import torch
from kit import error_in_process, pixels, run_tool, write_lines
from PIL import Image


pytestmark = pytest.mark.usefixtures("hub_cache_in_a_temporary_folder")

PROMPTS = ["a photo of a red ball", "a photo of a blue ball"]


@pytest.fixture(scope="module")
def pipeline(tiny_sana):
    from diffusers import SanaPipeline

    return SanaPipeline.from_pretrained(tiny_sana)


def call_default(pipeline, name):
    """The default of SanaPipeline.__call__'s argument `name`."""
    return inspect.signature(type(pipeline).__call__).parameters[name].default


def test_the_stock_sana_pipeline_draws_64px_images_that_differ_by_prompt(pipeline):
    images = pipeline(
        prompt=PROMPTS,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)],  # the same noise for both
        use_resolution_binning=False,  # SANA's bins start at 512 px
        output_type="np",
    ).images
    assert images.shape == (2, 64, 64, 3)
    assert np.isfinite(images).all()
    assert np.abs(images[0] - images[1]).max() > 1e-3


def test_it_has_sanas_parts_a_flow_dpm_solver_with_shift_3_and_a_32_channel_dc_ae(pipeline):
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaTransformer2DModel
    from transformers import Gemma2Model, GemmaTokenizer

    assert isinstance(pipeline.transformer, SanaTransformer2DModel)
    assert isinstance(pipeline.vae, AutoencoderDC)
    assert isinstance(pipeline.text_encoder, Gemma2Model)
    assert isinstance(pipeline.tokenizer, GemmaTokenizer)
    assert isinstance(pipeline.scheduler, DPMSolverMultistepScheduler)
    config = pipeline.scheduler.config
    assert config.use_flow_sigmas and config.prediction_type == "flow_prediction" and config.flow_shift == 3.0
    assert pipeline.vae.config.latent_channels == pipeline.transformer.config.in_channels == 32
    assert pipeline.transformer.config.caption_channels == pipeline.text_encoder.config.hidden_size
    # The Gemma tokenizer made on the spot reads the tiny world's words as words after <bos>, as Gemma's does.
    ids = pipeline.tokenizer("a photo of a red ball").input_ids
    assert len(ids) == 7 and ids[0] == pipeline.tokenizer.bos_token_id
    assert pipeline.tokenizer.unk_token_id not in ids


def test_the_complex_human_instruction_is_read_by_default_and_fits_the_text_encoder(pipeline):
    instruction_ids = pipeline.tokenizer("\n".join(call_default(pipeline, "complex_human_instruction"))).input_ids
    assert pipeline.tokenizer.unk_token_id not in instruction_ids
    lengths = []
    hook = pipeline.text_encoder.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    try:
        pipeline(
            PROMPTS[0], num_inference_steps=1, height=64, width=64, use_resolution_binning=False, output_type="latent"
        )
    finally:
        hook.remove()
    max_sequence_length = call_default(pipeline, "max_sequence_length")
    # the prompt behind the instruction (SanaPipeline's instruction tokens + max_sequence_length - 2), then the empty
    # negative prompt without it
    assert lengths == [len(instruction_ids) + max_sequence_length - 2, max_sequence_length]
    assert lengths[0] <= pipeline.text_encoder.config.max_position_embeddings


def test_its_vae_config_scales_tiny_world_latents_to_unit_variance(pipeline):
    from examples.tiny_world.world import COLORS, make_image

    rng = np.random.default_rng(123)
    images = np.stack([make_image(color, half, rng, 64) for color in COLORS for half in ("top", "bottom")])
    with torch.no_grad():
        latents = pipeline.vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1).latent
    assert pipeline.vae.config.scaling_factor != 1.0
    assert (latents * pipeline.vae.config.scaling_factor).std().item() == pytest.approx(1.0, abs=0.15)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--unet_preset", "bench"], "--family sana has only the tiny preset"),
        (["--vae_fit_steps", "2"], "--vae_fit_steps is not used by --family sana"),
        (["--resolution", "48"], "--family sana draws sides that are multiples of 32"),
    ],
    ids=["bench-preset", "vae-fit", "resolution"],
)
def test_make_tiny_assets_refuses_what_the_sana_family_cannot_build(extra, expected, tmp_path, capsys):
    from examples.tiny_world import make_tiny_assets

    argv = ["--family", "sana", *extra, "--output_dir", tmp_path / "sana"]
    assert expected in error_in_process(make_tiny_assets, argv, capsys)


def test_generate_draws_k_images_per_prompt_from_a_sana_folder_at_its_resolution(tiny_sana, tmp_path):
    prompts_file = write_lines(tmp_path / "prompts.txt", PROMPTS)
    argv = ["--pretrained_model_name_or_path", tiny_sana, "--model_name", "sana", "--prompts", prompts_file]
    argv += ["--images_per_prompt", 1, "--num_inference_steps", 2, "--resolution", 64, "--output_dir", tmp_path]
    run_tool("examples/eval/generate.py", argv)
    run_dir = tmp_path / "sana"
    rows = [json.loads(line) for line in (run_dir / "manifest.jsonl").read_text().splitlines()]
    assert [(row["prompt"], row["k"]) for row in rows] == [(prompt, 0) for prompt in PROMPTS]
    for row in rows:
        assert Image.open(run_dir / row["image"]).size == (64, 64)
    assert np.abs(pixels(run_dir / rows[0]["image"]) - pixels(run_dir / rows[1]["image"])).max() > 0
    config = json.loads((run_dir / "generation_config.json").read_text())
    assert "shift" not in config and "max_sequence_length" not in config  # left to the pipeline


@pytest.mark.parametrize("scheduler", ["default", "flow_dpmpp_2m"])
def test_shift_is_sanas_flow_shift_and_defaults_to_the_pipelines(tiny_sana, scheduler):
    from examples.lib.sampling import load_pipeline

    own = load_pipeline(tiny_sana, torch.float32, "cpu", scheduler=scheduler).scheduler.config
    shifted = load_pipeline(tiny_sana, torch.float32, "cpu", scheduler=scheduler, shift=1.5).scheduler.config
    assert own.use_flow_sigmas and own.prediction_type == "flow_prediction" and own.flow_shift == 3.0
    assert shifted.use_flow_sigmas and shifted.flow_shift == 1.5


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--scheduler", "ddim"], "is a sampler of SD1.x, SD2.x and SDXL; SanaPipeline is a flow-matching pipeline"),
        (["--unet_path", "/no/such/unet"], "--unet_path is for UNet pipelines"),
        (["--resolution", 48], "--resolution must be a multiple of 32 for SanaPipeline"),
    ],
    ids=["ddpm-sampler", "unet", "resolution"],
)
def test_generate_refuses_flags_sana_cannot_take_in_one_line(tiny_sana, extra, expected, tmp_path, capsys):
    from examples.eval import generate

    prompts_file = write_lines(tmp_path / "prompts.txt", PROMPTS)
    argv = ["--pretrained_model_name_or_path", tiny_sana, "--model_name", "refused", "--prompts", prompts_file]
    argv += ["--resolution", 64, "--output_dir", tmp_path, *extra]
    assert expected in error_in_process(generate, argv, capsys)
    assert not (tmp_path / "refused").exists()
