"""--cache_latents: the loop trains on cached VAE latents and text embeddings, with the same result."""

import shutil

import datasets
import pytest
from kit import assert_same_tensors, launch, scalar_tags, summary_of, tiny_args, unet_state


# A large Adam epsilon makes each update linear in the gradient. With the default 1e-8, Adam moves every weight by
# about +-lr whatever its gradient, so float noise in a near-zero gradient component (the VAE and text encoders see
# other batch sizes when caching) flips whole updates and hides what is compared.
COMMON = [
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


@pytest.fixture(scope="module")
def caching_runs(tiny_assets, tmp_path_factory):
    """One uncached run, one that builds the latents cache and one that reuses it (same flags otherwise), shared
    by the tests below: each launch costs seconds of start-up, the training itself a fraction of one."""
    root = tmp_path_factory.mktemp("caching")
    cache = ["--cache_latents", "--latents_cache_dir", root / "cache"]
    launch("train_diffusion_dpo_sdxl.py", tiny_args(tiny_assets, root / "uncached", *COMMON))
    first = launch("train_diffusion_dpo_sdxl.py", tiny_args(tiny_assets, root / "cached", *COMMON, *cache))
    second = launch("train_diffusion_dpo_sdxl.py", tiny_args(tiny_assets, root / "cached-again", *COMMON, *cache))
    return {"root": root, "first": first.stdout, "second": second.stdout}


@pytest.mark.slow
def test_cached_run_matches_uncached_run(tiny_assets, caching_runs):
    root = caching_runs["root"]
    assert "--cache_latents: building" in caching_runs["first"]
    # Same batch and noise: the same loss at the first step (before any update) and the same weights after 3 steps.
    uncached_tags, cached_tags = scalar_tags(root / "uncached" / "logs"), scalar_tags(root / "cached" / "logs")
    for metric in ("loss", "model_mse_w", "model_mse_l", "ref_mse_w", "ref_mse_l"):
        assert cached_tags[metric][0] == pytest.approx(uncached_tags[metric][0], rel=1e-4), metric
    uncached_weights, cached_weights = unet_state(root / "uncached"), unet_state(root / "cached")
    base = unet_state(tiny_assets["model"])
    assert max((uncached_weights[k] - base[k]).abs().max().item() for k in base) > 1e-5  # the runs did train
    assert_same_tensors(
        uncached_weights, cached_weights, atol=1e-6
    )  # seen: 6e-8 (one float32 ulp at 1.0) against changes of 5e-4


@pytest.mark.slow
def test_a_second_run_reuses_the_cache(caching_runs):
    root, second = caching_runs["root"], caching_runs["second"]
    assert "--cache_latents: reusing" in second and "Caching latents" not in second
    assert_same_tensors(unet_state(root / "cached"), unet_state(root / "cached-again"), atol=0)


@pytest.mark.slow
def test_changed_resolution_builds_a_new_cache(tiny_assets, caching_runs, tmp_path):
    # The cached run's flags but the resolution, on a copy of its cache (the other tests read the original).
    shutil.copytree(caching_runs["root"] / "cache", tmp_path / "cache")
    cache = ["--cache_latents", "--latents_cache_dir", tmp_path / "cache"]
    result = launch(
        "train_diffusion_dpo_sdxl.py", tiny_args(tiny_assets, tmp_path / "b", *COMMON, *cache, "--resolution", 32)
    )
    assert "--cache_latents: building" in result.stdout
    assert len(list((tmp_path / "cache").iterdir())) == 2


@pytest.mark.slow
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


@pytest.mark.slow
def test_summary_reports_the_cache_builds_peak_apart_from_the_training_loops(caching_runs):
    builder = summary_of(caching_runs["root"] / "cached")
    reuser = summary_of(caching_runs["root"] / "cached-again")
    assert set(builder["peak_memory_by_phase_bytes"]) == {"cache_build", "training"}
    assert builder["peak_memory_bytes"] == builder["peak_memory_by_phase_bytes"]["training"]
    assert "peak memory (rss): cache_build" in caching_runs["first"]
    assert set(reuser["peak_memory_by_phase_bytes"]) == {"cache_build", "training"}  # reading the cache counts too
