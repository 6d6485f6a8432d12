"""--cache_latents: the loop trains on cached VAE latents and text embeddings, with the same result."""

import datasets
import pytest
from conftest import launch, tiny_args
from test_end_to_end import assert_same_tensors, scalar_tags, unet_state


def test_cached_run_matches_uncached_run_and_a_second_run_reuses_the_cache(tiny_assets, tmp_path):
    # A large Adam epsilon makes each update linear in the gradient. With the default 1e-8, Adam moves every
    # weight by about +-lr whatever its gradient, so float noise in a near-zero gradient component (the VAE
    # and text encoders see other batch sizes when caching) flips whole updates and hides what is compared.
    common = [
        "--max_train_steps",
        3,
        "--learning_rate",
        1e-2,
        "--adam_epsilon",
        1.0,
        "--report_to",
        "tensorboard",
        "--max_train_samples",
        24,
    ]
    launch("train_diffusion_dpo_sdxl.py", tiny_args(tiny_assets, tmp_path / "uncached", *common))
    cache = ["--cache_latents", "--latents_cache_dir", tmp_path / "cache"]
    first = launch("train_diffusion_dpo_sdxl.py", tiny_args(tiny_assets, tmp_path / "cached", *common, *cache))
    assert "--cache_latents: building" in first.stdout
    # Same batch and noise: the same loss at the first step (before any update) and the same weights after 3 steps.
    uncached_tags, cached_tags = scalar_tags(tmp_path / "uncached" / "logs"), scalar_tags(tmp_path / "cached" / "logs")
    for metric in ("loss", "model_mse_w", "model_mse_l", "ref_mse_w", "ref_mse_l"):
        assert cached_tags[metric][0] == pytest.approx(uncached_tags[metric][0], rel=1e-4), metric
    uncached_weights, cached_weights = unet_state(tmp_path / "uncached"), unet_state(tmp_path / "cached")
    base = unet_state(tiny_assets["model"])
    assert max((uncached_weights[k] - base[k]).abs().max().item() for k in base) > 1e-5  # the runs did train
    assert_same_tensors(
        uncached_weights, cached_weights, atol=1e-6
    )  # seen: 6e-8 (one float32 ulp at 1.0) against changes of 5e-4

    second = launch("train_diffusion_dpo_sdxl.py", tiny_args(tiny_assets, tmp_path / "cached-again", *common, *cache))
    assert "--cache_latents: reusing" in second.stdout and "Caching latents" not in second.stdout
    assert_same_tensors(unet_state(tmp_path / "cached"), unet_state(tmp_path / "cached-again"), atol=0)


def test_changed_resolution_builds_a_new_cache(tiny_assets, tmp_path):
    cache = [
        "--cache_latents",
        "--latents_cache_dir",
        tmp_path / "cache",
        "--max_train_steps",
        1,
        "--max_train_samples",
        8,
        "--lora_rank",
        4,
    ]
    launch("train_mapo_sdxl.py", tiny_args(tiny_assets, tmp_path / "a", *cache))
    result = launch("train_mapo_sdxl.py", tiny_args(tiny_assets, tmp_path / "b", *cache, "--resolution", 32))
    assert "--cache_latents: building" in result.stdout
    assert len(list((tmp_path / "cache").iterdir())) == 2


@pytest.mark.parametrize("caching", [[], ["--cache_latents"]], ids=["on-the-fly", "cached"])
def test_undecodable_image_is_skipped_counted_and_named_in_a_real_run(tiny_assets, tmp_path, caching):
    rows = (
        datasets.load_dataset("parquet", data_files=str(tiny_assets["dataset"] + "/train.parquet"), split="train")
        .select(range(8))
        .to_dict()
    )
    rows["jpg_0"][3] = b"this is not an image"
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "train.parquet"))
    extra = ["--latents_cache_dir", tmp_path / "cache"] if caching else []
    args = tiny_args(tiny_assets, tmp_path / "out", "--max_train_steps", 2, "--lora_rank", 4, *caching, *extra)
    args[args.index("--dataset_name") + 1] = tmp_path / "train.parquet"
    result = launch("train_mapo_sdxl.py", args)
    assert "Skipped pair 3" in result.stdout and "undecodable image" in result.stdout
    assert "skipped undecodable pairs: 1" in result.stdout
