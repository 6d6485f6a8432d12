"""The training scripts run as users run them on tiny assets: `python` for one process (kit.launch), `accelerate
launch` for two."""

import filecmp
import re
import shutil

import pytest
import torch
from kit import assert_same_tensors, launch, scalar_events, scalar_tags, summary_of, tiny_args, unet_state
from safetensors.torch import load_file


METRICS = {"loss", "implicit_acc", "reward_margin", "model_mse_w", "model_mse_l", "lr", "grad_norm"}
DPO_METRICS = METRICS | {"ref_mse_w", "ref_mse_l"}
# Validation by reward on two prompts, two images each, judged by toy_ball (no weights)
REWARD_VALIDATION = ["--validation_reward_models", "toy_ball", "--validation_images_per_prompt", 2]
REWARD_VALIDATION_PROMPTS = "a photo of a red ball\na photo of a blue ball\n"


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mapo_lora_run(tiny_assets, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("mapo-lora")
    prompts = tmp_path_factory.mktemp("mapo-lora-prompts") / "prompts.txt"
    prompts.write_text(REWARD_VALIDATION_PROMPTS)
    result = launch(
        "train_mapo_sdxl.py",
        tiny_args(
            tiny_assets,
            output_dir,
            "--lora_rank",
            4,
            "--learning_rate",
            1e-2,
            "--max_train_steps",
            4,
            "--report_to",
            "tensorboard",
            "--beta_mapo",
            8,
            "--validation_prompts",
            "a photo of a red ball",
            "--validation_steps",
            2,
            "--validation_inference_steps",
            2,
            "--checkpointing_steps",
            2,
            "--checkpoints_total_limit",
            1,
            "--preference_eval_split",
            "test",
            "--preference_eval_max_samples",
            8,
            "--preference_eval_timesteps",
            2,
            *REWARD_VALIDATION,
            "--validation_reward_prompts",
            prompts,
            "--keep_best_checkpoint",
        ),
    )
    return output_dir, result.stdout


def test_mapo_lora_run_writes_diffusers_lora_model_card_metrics_and_validation(mapo_lora_run):
    output_dir, log = mapo_lora_run
    weights = load_file(output_dir / "pytorch_lora_weights.safetensors")
    assert weights and all(key.startswith("unet.") and "lora" in key for key in weights)
    assert not (output_dir / "unet").exists()
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-4"]  # --checkpoints_total_limit 1
    card = (output_dir / "README.md").read_text()
    assert "MaPO (beta_mapo = 8, snr_value = 0.5)" in card and "base_model:" in card and "| loss |" in card
    tags = scalar_tags(output_dir / "logs")
    assert METRICS <= set(tags) and len(tags["loss"]) == 4
    assert "ref_mse_w" not in tags  # MaPO never evaluates a reference
    assert "dropped 4 ties" in log  # the tiny dataset's 4 ties, counted
    from PIL import Image

    grids = sorted((output_dir / "validation").glob("step-*.png"))
    assert [p.name for p in grids] == ["step-000002.png", "step-000004.png"]
    assert Image.open(grids[-1]).size == (128, 64)  # base | trained, one row per prompt


def test_heldout_accuracy_before_training_is_logged_at_step_0(mapo_lora_run):
    output_dir, _ = mapo_lora_run
    summary = summary_of(output_dir)
    logged = scalar_events(output_dir / "logs")["heldout_preference_accuracy"]
    assert [step for step, _ in logged] == [0, 2, 4]  # before training, at --validation_steps, at the end
    assert logged[0][1] == pytest.approx(summary["heldout_preference_accuracy_before"])
    assert logged[-1][1] == pytest.approx(summary["heldout_preference_accuracy_after"])


def test_validation_by_reward_logs_the_win_rate_from_step_0_and_keeps_the_best_steps_lora(mapo_lora_run):
    output_dir, log = mapo_lora_run
    summary = summary_of(output_dir)
    logged = scalar_events(output_dir / "logs")
    assert {"validation/win_rate", "validation/win_rate_toy_ball", "validation/reward_toy_ball"} <= set(logged)
    win_rates = dict(logged["validation/win_rate"])
    assert list(win_rates) == [0, 2, 4] and win_rates[0] == 0.5  # the base against itself
    assert {int(step): value for step, value in summary["validation_win_rates"].items()} == pytest.approx(win_rates)
    metrics = summary["validation_reward_metrics"]["4"]
    assert set(metrics) == {"win_rate", "win_rate_toy_ball", "reward_toy_ball", "unscored_toy_ball"}
    assert metrics["unscored_toy_ball"] == 0  # every image scored
    assert summary["best_checkpoint"] == max(win_rates, key=win_rates.get)
    assert re.search(r"Step 4: validation win-rate against the base [0-9.]+: toy_ball [0-9.]+ \(mean reward", log)
    assert (output_dir / "best" / "pytorch_lora_weights.safetensors").is_file() and not (output_dir / "unet").exists()


def test_summary_reports_the_training_loops_peak_and_each_phase_apart(mapo_lora_run):
    output_dir, log = mapo_lora_run
    summary = summary_of(output_dir)
    phases = summary["peak_memory_by_phase_bytes"]
    assert set(phases) == {"training", "validation"} and summary["peak_memory_bytes"] == phases["training"]
    assert re.search(r"peak memory \(rss\): validation [0-9.]+ GiB, training [0-9.]+ GiB", log)
    assert "== MaPO finished: 4 optimizer steps" in log


def test_a_run_prints_none_of_the_deprecation_and_float32_cast_warnings_it_used_to_cause(mapo_lora_run):
    _, log = mapo_lora_run  # loads every model and builds validation pipelines
    assert "`torch_dtype` is deprecated" not in log and "should be kept in float32" not in log


def test_rerunning_a_finished_run_with_resume_latest_trains_nothing_and_keeps_its_outputs(
    tiny_assets, mapo_lora_run, tmp_path
):
    finished, _ = mapo_lora_run
    rerun = tmp_path / "rerun"
    shutil.copytree(finished, rerun)
    before = sorted(str(p.relative_to(rerun)) for p in rerun.rglob("*"))
    args = tiny_args(tiny_assets, rerun, "--lora_rank", 4, "--max_train_steps", 4, "--report_to", "tensorboard")
    result = launch("train_mapo_sdxl.py", [*args, "--checkpointing_steps", 2, "--resume_from_checkpoint", "latest"])
    assert "== Nothing to train: " in result.stdout and "checkpoint-4 is at step 4 of 4" in result.stdout
    assert sorted(str(p.relative_to(rerun)) for p in rerun.rglob("*")) == before  # no new file, no new log
    for name in ("pytorch_lora_weights.safetensors", "training_summary.json", "README.md"):
        assert filecmp.cmp(finished / name, rerun / name, shallow=False), name


def test_saved_lora_loads_into_an_sdxl_pipeline_and_changes_its_output(tiny_assets, mapo_lora_run):
    from diffusers import StableDiffusionXLPipeline

    output_dir, _ = mapo_lora_run
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_assets["model"])
    pipeline.set_progress_bar_config(disable=True)

    def render():
        return pipeline(
            "a photo of a red ball",
            num_inference_steps=2,
            height=64,
            width=64,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images

    before = render()
    pipeline.load_lora_weights(str(output_dir))
    after = render()
    assert abs(after - before).max() > 1e-3


@pytest.mark.parametrize("script", ["train_mapo_sdxl.py", "train_diffusion_dpo_sdxl.py"])
def test_saved_lora_keeps_its_alpha_so_a_pipeline_loads_it_at_alpha_over_rank(tiny_assets, tmp_path, script):
    from diffusers import StableDiffusionXLPipeline

    args = ["--lora_rank", 4, "--lora_alpha", 8, "--learning_rate", 1e-3, "--max_train_steps", 1]
    launch(script, tiny_args(tiny_assets, tmp_path, *args))
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_assets["model"])
    pipeline.load_lora_weights(str(tmp_path))
    (config,) = pipeline.unet.peft_config.values()
    assert (config.r, config.lora_alpha) == (4, 8)  # without the metadata diffusers loads alpha = rank, scale 1


def test_mapo_full_finetuning_saves_a_unet_folder(tiny_assets, tmp_path):
    launch("train_mapo_sdxl.py", tiny_args(tiny_assets, tmp_path, "--learning_rate", 1e-4, "--max_train_steps", 2))
    from diffusers import UNet2DConditionModel

    trained = UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet")
    base = UNet2DConditionModel.from_pretrained(tiny_assets["model"], subfolder="unet")
    assert any(not torch.equal(p, q) for p, q in zip(trained.parameters(), base.parameters()))
    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_dpo_trains_logs_reference_metrics_and_starts_at_log2(tiny_assets, tmp_path, mode):
    # Full fine-tuning also runs 8-bit AdamW and gradient checkpointing together (bitsandbytes runs on the CPU).
    extra = (
        ["--lora_rank", 4, "--learning_rate", 1e-3]
        if mode == "lora"
        else ["--learning_rate", 1e-5, "--use_8bit_adam", "--gradient_checkpointing"]
    )
    if mode == "full":  # validation by reward, keeping the best step's UNet
        (tmp_path / "prompts.txt").write_text(REWARD_VALIDATION_PROMPTS)
        extra += [
            *REWARD_VALIDATION,
            "--validation_reward_prompts",
            tmp_path / "prompts.txt",
            "--keep_best_checkpoint",
        ]
    result = launch(
        "train_diffusion_dpo_sdxl.py",
        tiny_args(
            tiny_assets, tmp_path, "--max_train_steps", 3, "--report_to", "tensorboard", "--beta_dpo", 5000, *extra
        ),
        bitsandbytes=mode == "full",
    )
    tags = scalar_tags(tmp_path / "logs")
    assert DPO_METRICS <= set(tags)
    # Step 1 is computed before any update: policy == reference, so the loss is log 2 (beta = 5000
    # turns float32 rounding between the grad and no-grad kernels, ~1e-8 in the errors, into ~1e-4).
    assert tags["loss"][0] == pytest.approx(0.693147, abs=5e-4)
    assert tags["model_mse_w"][0] == pytest.approx(tags["ref_mse_w"][0], abs=1e-6)
    card = (tmp_path / "README.md").read_text()
    assert "Diffusion-DPO (beta_dpo = 5000)" in card
    assert "`torch_dtype` is deprecated" not in result.stdout and "should be kept in float32" not in result.stdout
    assert (tmp_path / ("pytorch_lora_weights.safetensors" if mode == "lora" else "unet/config.json")).exists()
    if mode == "full":
        summary = summary_of(tmp_path)
        assert list(summary["validation_win_rates"]) == ["0", "3"] and summary["validation_win_rates"]["0"] == 0.5
        assert [step for step, _ in scalar_events(tmp_path / "logs")["validation/win_rate"]] == [0, 3]
        assert summary["best_checkpoint"] in (0, 3) and (tmp_path / "best" / "unet" / "config.json").is_file()


def test_sft_baseline_learns_from_the_winners_alone(tiny_assets, tmp_path):
    # Two runs whose data differ only in the rejected images: SFT must end with the same weights.
    import datasets

    rows = datasets.load_dataset("parquet", data_files=tiny_assets["dataset"] + "/train.parquet", split="train")
    rows = rows.select(range(16)).to_dict()
    swapped = {key: list(values) for key, values in rows.items()}
    for i, label in enumerate(rows["label_0"]):
        loser_column = "jpg_1" if label == 1 else "jpg_0"
        swapped[loser_column][i] = rows[loser_column][(i + 5) % 16]  # another row's image, not the winner
    for name, data in (("original", rows), ("swapped", swapped)):
        (tmp_path / name).mkdir()
        datasets.Dataset.from_dict(data).to_parquet(str(tmp_path / name / "train.parquet"))
    runs = {}
    for name in ("original", "swapped"):
        args = tiny_args(tiny_assets, tmp_path / f"out-{name}", "--sft", "--lora_rank", 4, "--learning_rate", 1e-2)
        args[args.index("--dataset_name") + 1] = tmp_path / name
        runs[name] = launch(
            "train_diffusion_dpo_sdxl.py", [*args, "--max_train_steps", 3, "--report_to", "tensorboard"]
        )
    assert "SFT on chosen finished" in runs["original"].stdout
    original = load_file(tmp_path / "out-original" / "pytorch_lora_weights.safetensors")
    assert_same_tensors(original, load_file(tmp_path / "out-swapped" / "pytorch_lora_weights.safetensors"), atol=0)
    tags = scalar_tags(tmp_path / "out-original" / "logs")
    assert {"loss", "model_mse_w", "lr", "grad_norm"} <= set(tags) and not {"ref_mse_w", "implicit_acc"} & set(tags)


@pytest.mark.parametrize(
    "script,extra",
    [
        ("train_diffusion_dpo_sdxl.py", ["--learning_rate", 1e-4]),  # full fine-tuning: unet/ + frozen reference copy
        ("train_mapo_sdxl.py", ["--lora_rank", 4, "--learning_rate", 1e-2]),  # LoRA: adapter-only checkpoints
    ],
)
def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tiny_assets, tmp_path, script, extra):
    common = [
        "--max_train_steps",
        7,
        "--random_crop",
        "--dataloader_num_workers",
        2,
        "--max_train_samples",
        20,
        *extra,
    ]
    uninterrupted = tmp_path / "uninterrupted"
    launch(script, tiny_args(tiny_assets, uninterrupted, "--checkpointing_steps", 3, *common))
    # A run killed after step 4 leaves checkpoint-3 behind; that is what the second run resumes from.
    # 20 pairs / 4 per step = 5 steps an epoch, so the resumed run also crosses an epoch boundary.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(uninterrupted / "checkpoint-3", resumed / "checkpoint-3")
    # A checkpoint's name resolves against --output_dir, as in diffusers' scripts.
    result = launch(
        script,
        tiny_args(
            tiny_assets, resumed, "--checkpointing_steps", 3, "--resume_from_checkpoint", "checkpoint-3", *common
        ),
    )
    assert f"Resuming from {resumed / 'checkpoint-3'}" in result.stdout
    if "--lora_rank" in extra:
        assert_same_tensors(
            load_file(uninterrupted / "pytorch_lora_weights.safetensors"),
            load_file(resumed / "pytorch_lora_weights.safetensors"),
        )
    else:
        assert_same_tensors(unet_state(uninterrupted), unet_state(resumed))


def test_two_process_cpu_run_leaves_identical_weights_on_both_ranks(tiny_assets, tmp_path):
    (tmp_path / "prompts.txt").write_text(REWARD_VALIDATION_PROMPTS)  # validation by reward: a prompt per process
    validation = [*REWARD_VALIDATION, "--validation_reward_prompts", tmp_path / "prompts.txt"]
    result = launch(
        "train_mapo_sdxl.py",
        tiny_args(
            tiny_assets,
            tmp_path / "out",
            "--lora_rank",
            4,
            "--learning_rate",
            1e-2,
            "--max_train_steps",
            3,
            *validation,
        ),
        num_processes=2,
    )
    assert (
        "Distributed environment: DistributedType.MULTI_CPU" in result.stdout
        and "total batch (parallel, accumulation) = 8" in result.stdout
    )
    assert "weights identical on all processes: yes" in result.stdout
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()
    assert summary_of(tmp_path / "out")["validation_win_rates"]["0"] == 0.5  # both prompts' scores, gathered


def heldout_accuracies(log):
    match = re.search(r"held-out preference accuracy \(test\): ([0-9.]+) before -> ([0-9.]+) after", log)
    assert match, log[-3000:]
    return float(match.group(1)), float(match.group(2))


@pytest.mark.parametrize(
    "script,extra",
    [
        ("train_diffusion_dpo_sdxl.py", ["--beta_dpo", 5000, "--learning_rate", 1e-4]),
        ("train_mapo_sdxl.py", ["--beta_mapo", 8, "--learning_rate", 1e-3]),
    ],
)
def test_training_raises_heldout_preference_accuracy(tiny_assets, tmp_path, script, extra):
    result = launch(
        script,
        tiny_args(
            tiny_assets,
            tmp_path,
            "--train_batch_size",
            8,
            "--max_train_steps",
            60,
            "--preference_eval_split",
            "test",
            "--preference_eval_timesteps",
            8,
            *extra,
        ),
    )
    before, after = heldout_accuracies(result.stdout)
    assert 0.3 < before < 0.7  # the tiny dataset is balanced: an untrained model prefers neither image
    assert after >= 0.85 and after - before >= 0.25
