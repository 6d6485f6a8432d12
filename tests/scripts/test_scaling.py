"""Scale and speed: data-parallel runs match one process, the accelerate configs run, the benchmark fills its table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from kit import (
    ACCELERATE_CONFIGS,
    OFFLINE_ENV,
    REPO,
    launch,
    launch_with_config,
    max_abs_diff,
    tiny_args,
    unet_weights,
)


# ----------------------------------------------------------------------------------------------
# Data parallelism
# ----------------------------------------------------------------------------------------------
# --adam_epsilon 1e-3: with the default 1e-8, Adam's first steps divide by |g| + eps and turn the
# ~1e-9 round-off of the few near-zero gradient entries into 1e-5 weight differences (lr x dg / eps);
# a larger eps keeps Adam's normalisation elsewhere and makes a wrong shard or a missing all-reduce
# (differences ~1e-4) stand out from float noise (~1e-7).
DATA_PARALLEL = ["--max_train_steps", 3, "--learning_rate", 1e-4, "--adam_epsilon", 1e-3]


@pytest.fixture(scope="module")
def two_cpu_processes(tiny_assets, tmp_path_factory):
    """`two_cpu_processes(script)`: (output folder, log) of a run of `script` in 2 CPU processes x 2 pairs launched
    with multi_gpu_ddp.yaml, as a user would on GPUs; launched once and shared by the tests that read it."""
    runs = {}

    def run(script):
        if script not in runs:
            output_dir = tmp_path_factory.mktemp(f"two-processes-{Path(script).stem}")
            # ACCELERATE_USE_CPU turns the config's MULTI_GPU into MULTI_CPU (gloo); `--cpu` would start one process.
            log = launch_with_config(
                "multi_gpu_ddp.yaml",
                script,
                tiny_args(tiny_assets, output_dir, "--train_batch_size", 2, *DATA_PARALLEL),
                ["--num_processes", "2"],
                {"ACCELERATE_USE_CPU": "1"},
            )
            runs[script] = output_dir, log
        return runs[script]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_mapo_sdxl.py", "train_diffusion_dpo_sdxl.py"])
def test_two_processes_reach_the_weights_of_one_process_with_the_same_global_batch(
    tiny_assets, tmp_path, two_cpu_processes, script
):
    # 2 processes x 2 pairs and 1 process x 4 pairs: the same 4 pairs per step (the sampler is seeded
    # and sharded by accelerate), the same flips and noise (keyed by seed, epoch and pair index), and
    # gradients averaged over processes equal to the gradient of the mean over the 4 pairs.
    launch(script, tiny_args(tiny_assets, tmp_path / "one", "--train_batch_size", 4, *DATA_PARALLEL))
    two_dir, log = two_cpu_processes(script)
    assert "total batch (parallel, accumulation) = 4" in log and "weights identical on all processes: yes" in log

    one, two = unet_weights(tmp_path / "one"), unet_weights(two_dir)
    base = unet_weights(tiny_assets["model"])
    assert max_abs_diff(one, base) > 1e-4  # the runs trained: equality below is not the starting point's
    difference = max_abs_diff(one, two)
    print(f"{script}: max |one process - two processes| = {difference:.3g}")
    assert difference < 5e-6


# ----------------------------------------------------------------------------------------------
# accelerate configs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config,distributed_type,num_processes",
    [
        ("single_gpu.yaml", "NO", 1),
        ("multi_gpu_ddp.yaml", "MULTI_GPU", 8),
        ("deepspeed_zero2.yaml", "DEEPSPEED", 8),
        ("fsdp.yaml", "FSDP", 8),
        ("fsdp_sd3.yaml", "FSDP", 8),
    ],
)
def test_accelerate_configs_load_and_say_what_they_run(config, distributed_type, num_processes):
    from accelerate.commands.config.config_args import ClusterConfig

    ClusterConfig.from_yaml_file(str(ACCELERATE_CONFIGS / config))  # accelerate reads it (unknown keys would raise)
    text = (ACCELERATE_CONFIGS / config).read_text()
    loaded = yaml.safe_load(text)
    assert loaded["distributed_type"] == distributed_type
    assert loaded["num_processes"] == num_processes and loaded["mixed_precision"] == "bf16"
    assert text.startswith("#") and "accelerate launch --config_file examples/accelerate_configs/" + config in text
    if num_processes > 1:
        assert "num_processes" in text.split("compute_environment")[0]  # the comment says to change it
    if distributed_type == "DEEPSPEED":
        assert loaded["deepspeed_config"]["zero_stage"] == 2


@pytest.mark.slow
def test_single_gpu_config_trains_on_the_cpu(tiny_assets, tmp_path):
    log = launch_with_config(
        "single_gpu.yaml",
        "train_mapo_sdxl.py",
        tiny_args(tiny_assets, tmp_path, "--lora_rank", 4, "--max_train_steps", 2),
        ["--cpu"],
    )
    assert "MaPO finished: 2 optimizer steps" in log
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.slow
def test_multi_gpu_ddp_config_trains_two_cpu_processes(two_cpu_processes):
    # The Diffusion-DPO run of the data-parallel test above (the same launch: multi_gpu_ddp.yaml, 2 CPU processes).
    output_dir, log = two_cpu_processes("train_diffusion_dpo_sdxl.py")
    assert "Distributed environment: DistributedType.MULTI_CPU" in log and "Num processes: 2" in log
    assert "weights identical on all processes: yes" in log and (output_dir / "unet" / "config.json").exists()


@pytest.mark.slow
def test_deepspeed_zero2_config_trains_one_cpu_process(tiny_assets, tmp_path):
    # DeepSpeed runs on the CPU in one process only: with ACCELERATE_USE_CPU accelerate drops DeepSpeed,
    # and without it accelerate sets up a single process while DeepSpeed sees two (its batch check fails).
    pytest.importorskip("deepspeed", reason="DeepSpeed is optional (pip install deepspeed, after torch)")
    log = launch_with_config(
        "deepspeed_zero2.yaml",
        "train_mapo_sdxl.py",
        tiny_args(tiny_assets, tmp_path, "--train_batch_size", 2, "--max_train_steps", 2, "--learning_rate", 1e-4),
        ["--num_processes", "1"],
    )
    assert "DistributedType.DEEPSPEED" in log and "MaPO finished: 2 optimizer steps" in log
    assert (tmp_path / "unet" / "config.json").exists()


# ----------------------------------------------------------------------------------------------
# Efficiency benchmark
# ----------------------------------------------------------------------------------------------
def test_max_batch_estimate_is_intercept_plus_slope():
    from examples.benchmark.benchmark_efficiency import estimate_max_batch_cpu

    # 1000 bytes at 2 pairs, 1600 at 8: 100 per pair on top of 800; a 2050-byte budget holds 12 pairs.
    assert estimate_max_batch_cpu(1000, 2, 1600, 8, 2050) == (12, 100.0, 800.0)
    assert estimate_max_batch_cpu(1000, 2, 1000, 8, 2050)[0] is None  # memory that does not grow gives no estimate


def test_max_batch_search_finds_the_largest_fitting_batch_and_stops_at_the_dataset_size():
    from examples.benchmark.benchmark_efficiency import fmt_max_batch, search_max_batch

    def counted(limit, cap):
        """A stand-in for a short training run: batches up to `limit` fit. It fails the test (instead of letting a
        search without an end hang it) when asked about a batch the dataset cannot fill, or too often."""
        asked = []

        def fits(batch):
            asked.append(batch)
            assert 0 < batch <= cap, f"asked about batch {batch}, beyond the dataset's {cap} pairs: {asked[:12]}"
            assert len(asked) <= 2 * cap.bit_length() + 4, f"no end after {len(asked)} runs: {asked[:12]}"
            return batch <= limit

        return fits, asked

    # Memory that never runs out within the dataset (a batch beyond it stops growing): the search ends at the
    # dataset's size and says that the true limit may be larger.
    fits, asked = counted(limit=float("inf"), cap=10)
    assert search_max_batch(fits, 4, 10) == (10, True)
    assert asked == [4, 8, 10]
    # A limit inside the dataset: doubling, then bisection.
    fits, asked = counted(limit=7, cap=384)
    assert search_max_batch(fits, 2, 384) == (7, False)
    assert asked == [2, 4, 8, 6, 7]
    # Every start, limit and dataset size (a start beyond the dataset starts at its size).
    for cap in range(1, 20):
        for start in range(1, 24):
            for limit in range(0, 24):
                fits, _ = counted(limit, cap)
                assert search_max_batch(fits, start, cap) == (min(limit, cap), limit >= cap), (start, limit, cap)

    assert fmt_max_batch({"max_batch": 10, "max_batch_capped": True}) == "≥ 10 (dataset size)"
    assert fmt_max_batch({"max_batch": 7, "max_batch_capped": False}) == "7"
    assert fmt_max_batch({"max_batch": None, "max_batch_capped": False}) == "n/a"


@pytest.mark.slow
def test_benchmark_in_its_reduced_setting_fills_every_column_for_every_method(tiny_assets, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "examples.benchmark.benchmark_efficiency",
            "--quick",
            "--output_dir",
            str(tmp_path),
            "--pretrained_model_name_or_path",
            tiny_assets["model"],
            "--dataset_name",
            tiny_assets["dataset"],
            "--resolution",
            "64",
            # Cached latents only: the cached rows are the ones the issues' targets read, and an uncached row differs
            # only in the script's --cache_latents (the scripts' own tests run both); the uncached rows' 8 runs
            # (timed and memory probe) were a third of this test's time.
            "--latents",
            "cached",
        ],
        cwd=REPO,
        env={**os.environ, **OFFLINE_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,  # against a hang only: how long it takes is the benchmark's business, not a test's
    )
    assert result.returncode == 0, result.stdout[-6000:]

    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert {(row["method"], row["latents"]) for row in report["rows"]} == {
        (method, "cached") for method in ("MaPO", "Diffusion-DPO", "DDSPO", "CaPO")
    }
    for row in report["rows"]:
        for column in (
            "seconds_per_step",
            "floor_seconds_per_step",
            "time_ratio_to_floor",
            "peak_memory_bytes",
            "floor_peak_memory_bytes",
            "memory_ratio_to_floor",
            "max_batch",
            "memory_per_sample_bytes",
        ):
            assert row[column] is not None and row[column] > 0, (row["method"], row["latents"], column, row[column])
        assert row["time_ratio_to_floor"] == pytest.approx(row["seconds_per_step"] / row["floor_seconds_per_step"])
        assert row["peak_memory_kind"] == "rss"
    assert set(report["mapo_vs_dpo"]) == set(report["ddspo_vs_dpo"]) == set(report["capo_vs_dpo"]) == {"cached"}
    # Reported, met or not: no wall-clock assertion.
    assert "DDSPO within 1.10x of its floor" in report["targets"]
    assert "CaPO time within 1.10x of Diffusion-DPO" in report["targets"]
    # Every training run passed --skip_final_save: summaries written, no weights (10 GB a run on SDXL).
    runs = tmp_path / "runs"
    assert list(runs.rglob("training_summary.json"))
    written = [p for p in runs.rglob("*") if p.name == "unet" or p.suffix == ".safetensors"]
    assert not [p for p in written if "checkpoint-" not in str(p)], written
    # DDSPO trained on rows derived from the Pick-a-Pic dataset, in their own folder: the pairs Diffusion-DPO
    # trained on (ties dropped), each with a rand-removal of its caption as negative caption.
    from examples.benchmark.benchmark_efficiency import train_pairs_in_log

    ddspo_dataset = Path(report["setting"]["ddspo_dataset"])
    assert ddspo_dataset.parent == tmp_path / "assets" and ddspo_dataset != Path(tiny_assets["dataset"])
    ddspo_rows = pq.read_table(ddspo_dataset / "train.parquet").to_pylist()
    pairs = {
        run: train_pairs_in_log((runs / run / "train.log").read_text())
        for run in ("ddspo-cached-0", "diffusion-dpo-cached-0")
    }
    assert pairs == {"ddspo-cached-0": len(ddspo_rows), "diffusion-dpo-cached-0": len(ddspo_rows)}
    for row in ddspo_rows:
        words, negative_words = row["caption"].split(), row["negative_caption"].split()
        assert 0 < len(negative_words) < len(words) and all(word in words for word in negative_words), row["caption"]
        assert row["jpg_w"] != row["jpg_l"]
    # CaPO trained on the same pairs, in a folder of its own: the preferred image as jpg_pos, the other as jpg_neg,
    # with calibrated rewards in [0, 1] that rank them so.
    capo_dataset = Path(report["setting"]["capo_dataset"])
    assert capo_dataset.parent == tmp_path / "assets" and capo_dataset != ddspo_dataset
    capo_rows = pq.read_table(capo_dataset / "train.parquet").to_pylist()
    assert train_pairs_in_log((runs / "capo-cached-0" / "train.log").read_text()) == len(capo_rows) == len(ddspo_rows)
    for capo_row, ddspo_row in zip(capo_rows, ddspo_rows):
        assert [capo_row[c] for c in ("caption", "jpg_pos", "jpg_neg")] == [
            ddspo_row[c] for c in ("caption", "jpg_w", "jpg_l")
        ]
        assert 0 <= capo_row["reward_neg"] < capo_row["reward_pos"] <= 1
    for comparison in ("mapo_vs_dpo", "ddspo_vs_dpo", "capo_vs_dpo"):
        assert all(value > 0 for ratios in report[comparison].values() for value in ratios.values())

    markdown = (tmp_path / "benchmark.md").read_text()
    assert markdown.strip() in result.stdout  # what it prints is what it writes
    labels = ("| MaPO |", "| Diffusion-DPO |", "| DDSPO |", "| CaPO |")
    table = [line for line in markdown.splitlines() if line.startswith(labels)]
    assert len(table) == 4
    for line in table:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == 9 and all(cells) and "n/a" not in cells, line
