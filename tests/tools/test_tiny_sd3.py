"""The tiny SD3 pipeline (examples/tiny_world/world.py's build_tiny_sd3_pipeline, `make_tiny_assets --family sd3`):
built from configs, it loads with the stock StableDiffusion3Pipeline.from_pretrained offline and draws."""

import numpy as np
import pytest
import torch
from kit import error_in_process


pytestmark = pytest.mark.usefixtures("hub_cache_in_a_temporary_folder")


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    """A tiny SD3 pipeline as a user builds it, with a 2-step VAE fit: the folder tiny-sd3."""
    from examples.tiny_world import make_tiny_assets

    output_dir = tmp_path_factory.mktemp("assets")
    argv = ["--output_dir", str(output_dir), "--family", "sd3", "--skip_dataset", "--vae_fit_steps", "2"]
    make_tiny_assets.main(argv)
    return output_dir / "tiny-sd3"


@pytest.fixture(scope="module")
def pipeline(tiny_sd3):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(tiny_sd3)


def test_the_stock_sd3_pipeline_draws_64px_images_that_differ_by_prompt(pipeline):
    images = pipeline(
        prompt=["a photo of a red ball", "a photo of a blue ball"],
        num_inference_steps=2,
        height=64,
        width=64,
        generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)],  # the same noise for both
        output_type="np",
    ).images
    assert images.shape == (2, 64, 64, 3)
    assert np.isfinite(images).all()
    assert np.abs(images[0] - images[1]).max() > 1e-3


def test_it_has_sd3s_parts_a_flow_scheduler_with_shift_3_and_a_16_channel_vae_with_shift_and_scale(pipeline):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import T5EncoderModel

    assert isinstance(pipeline.transformer, SD3Transformer2DModel)
    assert isinstance(pipeline.text_encoder_3, T5EncoderModel)
    assert isinstance(pipeline.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipeline.scheduler.config.shift == 3.0
    assert pipeline.vae.config.latent_channels == pipeline.transformer.config.in_channels == 16
    # The T5 tokenizer made on the spot reads the tiny world's words as words and ends with </s>, as T5's does.
    ids = pipeline.tokenizer_3("a photo of a red ball").input_ids
    assert len(ids) == 7 and ids[-1] == pipeline.tokenizer_3.eos_token_id
    assert pipeline.tokenizer_3.unk_token_id not in ids


def test_its_vae_config_shifts_and_scales_tiny_world_latents_to_zero_mean_and_unit_variance(pipeline):
    from examples.tiny_world.world import COLORS, make_image

    rng = np.random.default_rng(123)
    images = np.stack([make_image(color, half, rng, 64) for color in COLORS for half in ("top", "bottom")])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        latents = pipeline.vae.encode(pixels).latent_dist.mode()
    config = pipeline.vae.config
    model_latents = (latents - config.shift_factor) * config.scaling_factor  # as SD3's training scripts read them
    assert config.shift_factor != 0.0
    assert model_latents.mean().item() == pytest.approx(0.0, abs=0.15)
    assert model_latents.std().item() == pytest.approx(1.0, abs=0.15)


def test_make_tiny_assets_refuses_sd3_with_the_bench_preset(tmp_path, capsys):
    from examples.tiny_world import make_tiny_assets

    argv = ["--family", "sd3", "--unet_preset", "bench", "--output_dir", tmp_path / "bench"]
    assert "--family sd3 has only the tiny preset" in error_in_process(make_tiny_assets, argv, capsys)
