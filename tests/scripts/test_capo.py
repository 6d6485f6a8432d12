"""train_capo.py: the objectives against docs/METHODS.md, bad input, and the script end to end on tiny SD1.x and
SDXL pipelines, alone and after generate.py -> score.py -> select_pairs.py."""

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from kit import (
    launch,
    launch_with_config,
    max_abs_diff,
    parse_args_refusal,
    png_bytes,
    run_python,
    summary_of,
    tiny_args,
    unet_weights,
)
from safetensors.torch import load_file

import train_capo
from examples.tiny_world import world
from train_capo import beta_range_warning, capo_loss


LOG2 = math.log(2.0)
GAP = 0.6  # reward_pos - reward_neg of every pair of the tiny CaPO data (conftest `capo_pairs`)


# ----------------------------------------------------------------------------------------------
# The objectives
# ----------------------------------------------------------------------------------------------
def at_initialisation(objective, reward_pos, reward_neg, weights=(1.0, 1.0, 1.0)):
    """capo_loss with the policy equal to the reference: the same errors for both."""
    losses_pos, losses_neg = torch.tensor([0.3, 0.02, 1.5]), torch.tensor([0.1, 0.4, 0.9])
    weight = torch.tensor(weights)
    return capo_loss(
        losses_pos,
        losses_neg,
        losses_pos.clone(),
        losses_neg.clone(),
        weight,
        weight,
        torch.tensor(reward_pos),
        torch.tensor(reward_neg),
        beta=500.0,
        objective=objective,
    )


def test_capo_loss_at_initialisation_is_the_mean_squared_calibrated_gap():
    loss, metrics = at_initialisation("capo", [0.9, 0.7, 0.5], [0.1, 0.4, 0.5], weights=(0.2, 0.9, 0.5))
    assert loss.item() == pytest.approx((0.8**2 + 0.3**2 + 0.0) / 3, abs=1e-7)
    assert metrics["target_margin"].item() == pytest.approx((0.8 + 0.3) / 3)
    assert metrics["reward_margin"].item() == 0 and metrics["implicit_acc"].item() == 0.5


@pytest.mark.parametrize("objective,expected", [("dpo", LOG2), ("ipo", 1.0)])
def test_dpo_is_log2_and_ipo_is_one_at_initialisation(objective, expected):
    loss, _ = at_initialisation(objective, [0.9, 0.7, 0.5], [0.1, 0.4, 0.5])
    assert loss.item() == pytest.approx(expected, abs=1e-7)


def test_capo_loss_matches_a_hand_computed_weighted_case():
    model_pos, model_neg = torch.tensor([0.10, 0.30]), torch.tensor([0.20, 0.25])
    ref_pos, ref_neg = torch.tensor([0.12, 0.30]), torch.tensor([0.20, 0.20])
    weight_pos, weight_neg = torch.tensor([0.5, 1.0]), torch.tensor([0.5, 1.0])
    reward_pos, reward_neg = torch.tensor([0.8, 0.6]), torch.tensor([0.2, 0.5])
    inputs = (model_pos, model_neg, ref_pos, ref_neg, weight_pos, weight_neg, reward_pos, reward_neg)
    # R_theta = -w * (model - ref): pos (0.01, 0), neg (0, -0.05); logit = 10 * (R_pos - R_neg) = (0.1, 0.5)
    logit = torch.tensor([0.1, 0.5])
    loss, metrics = capo_loss(*inputs, beta=10.0, objective="capo")
    torch.testing.assert_close(loss, ((torch.tensor([0.6, 0.1]) - logit) ** 2).mean())
    torch.testing.assert_close(metrics["reward_margin"], logit.mean())
    assert metrics["implicit_acc"].item() == 1.0
    torch.testing.assert_close(
        capo_loss(*inputs, beta=10.0, objective="dpo")[0], -torch.nn.functional.logsigmoid(logit).mean()
    )
    torch.testing.assert_close(capo_loss(*inputs, beta=10.0, objective="ipo")[0], ((1 - logit) ** 2).mean())


def test_the_implicit_reward_grows_when_the_policy_denoises_the_positive_better_than_the_reference():
    ones, ref = torch.ones(1), torch.tensor([0.2])
    better, _ = capo_loss(torch.tensor([0.1]), ref, ref, ref, ones, ones, ones, ones * 0, beta=1.0, objective="dpo")
    worse, _ = capo_loss(torch.tensor([0.3]), ref, ref, ref, ones, ones, ones, ones * 0, beta=1.0, objective="dpo")
    assert better < LOG2 < worse


def test_a_beta_from_another_objectives_sweep_is_named_with_the_papers_sweeps():
    assert beta_range_warning("capo", 500) is None and beta_range_warning("dpo", 3000) is None
    assert beta_range_warning("capo", 20) is None  # outside every sweep (the tiny world's setting): nothing to say
    warning = beta_range_warning("capo", 3000)
    assert "sweep for dpo (2000, 3000, 4000)" in warning and "SDXL (300, 500, 1000)" in warning


def capo_flags(tmp_path, *extra):
    """train_capo.parse_args for flags that pass its checks (the models are hub ids, never loaded here)."""
    (tmp_path / "data").mkdir(exist_ok=True)
    argv = ["--dataset_name", tmp_path / "data", "--output_dir", tmp_path / "out", "--seed", 0, *extra]
    return train_capo.parse_args([str(arg) for arg in argv])


def test_default_beta_is_the_middle_of_each_objectives_sdxl_sweep(tmp_path):
    for objective, beta in {"capo": 500, "ipo": 1000, "dpo": 3000}.items():
        assert capo_flags(tmp_path, "--objective", objective).beta_capo == beta


def test_the_optimizer_defaults_are_the_papers_adam_without_weight_decay_or_clipping(tmp_path):
    args = capo_flags(tmp_path)
    assert (args.adam_weight_decay, args.max_grad_norm) == (0, 0)  # AdamW without decay is Adam; no clipping
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon) == (0.9, 0.999, 1e-8)  # Adam's own defaults
    assert (args.learning_rate, args.lr_warmup_steps, args.lr_scheduler) == (1e-5, 1000, "constant_with_warmup")


def test_without_dataset_name_the_run_asks_for_calibrated_pairs(tmp_path, capsys):
    # Its old default, Pick-a-Pic v2, has labels, not the calibrated rewards CaPO regresses onto.
    line = parse_args_refusal("train_capo", ["--output_dir", tmp_path / "out"], capsys)
    assert "--dataset_name is required: the calibrated pairs to train on (examples/capo/select_pairs.py" in line


def test_pairs_are_not_flipped_unless_random_flip_is_given(tmp_path):
    import datasets

    left_half_dark = np.zeros((16, 16, 3))
    left_half_dark[:, 8:] = 255
    rows = {"caption": ["a ball on the left"] * 16, "reward_pos": [0.8] * 16, "reward_neg": [0.2] * 16}
    rows |= {"jpg_pos": [png_bytes(left_half_dark)] * 16, "jpg_neg": [png_bytes(255 - left_half_dark)] * 16}
    flipped = {}
    for name, extra in (("default", []), ("random_flip", ["--random_flip"])):
        args = capo_flags(tmp_path, "--resolution", 16, *extra)
        pairs = train_capo.CaPOPairs(train_capo.prepare_rows(datasets.Dataset.from_dict(rows), args, "train")[0], args)
        positives_left = [pairs[i]["pixel_values"][0, :, :, :8].mean().item() for i in range(16)]
        flipped[name] = sum(left < 0 for left in positives_left) < 16  # a flip puts the bright half on the left
    assert flipped == {"default": False, "random_flip": True}


# ----------------------------------------------------------------------------------------------
# End to end on tiny data
# ----------------------------------------------------------------------------------------------
METRICS = {"loss", "implicit_acc", "reward_margin", "target_margin", "grad_norm"}
METRICS |= {"model_mse_pos", "model_mse_neg", "ref_mse_pos", "ref_mse_neg"}


FIRST_STEP_RUNS = {  # name: (pipeline, objective, flags); each a one-step run on capo_pairs
    "sdxl-capo": ("sdxl", "capo", ["--lora_rank", 4, "--learning_rate", 1e-3]),
    "sdxl-dpo": ("sdxl", "dpo", ["--learning_rate", 1e-4, "--cache_latents", "--shared_noise"]),
    "sd_v-ipo": ("sd_v", "ipo", ["--lora_rank", 4, "--validation_prompts", "a red ball"]),
    "sd_v-capo": ("sd_v", "capo", ["--learning_rate", 1e-4, "--loss_weighting", "constant", "--cache_latents"]),
    # sdxl-capo's flags with one noise draw for both images of a pair
    "sdxl-capo-shared-noise": ("sdxl", "capo", ["--lora_rank", 4, "--learning_rate", 1e-3, "--shared_noise"]),
}


@pytest.fixture(scope="module")
def first_step_run(tiny_assets, tiny_sd, capo_pairs, tmp_path_factory):
    """run(name): FIRST_STEP_RUNS[name] launched once for the module (several tests read one run): its output
    folder, its output and its flags."""
    runs = {}

    def run(name):
        if name not in runs:
            pipeline, objective, extra = FIRST_STEP_RUNS[name]
            output_dir = tmp_path_factory.mktemp(name)
            model = tiny_assets["model"] if pipeline == "sdxl" else tiny_sd("v_prediction")
            args = tiny_args({"model": model, "dataset": capo_pairs}, output_dir, "--max_train_steps", 1)
            if "--validation_prompts" in extra:  # and validation by reward, keeping the best step's LoRA
                (output_dir / "prompts.txt").write_text("a photo of a red ball\na photo of a blue ball\n")
                extra = [*extra, "--validation_inference_steps", 2, "--validation_reward_models", "toy_ball"]
                extra += ["--validation_images_per_prompt", 2, "--validation_reward_prompts"]
                extra += [output_dir / "prompts.txt", "--keep_best_checkpoint"]
            result = launch("train_capo.py", [*args, "--objective", objective, *extra])
            runs[name] = {"dir": output_dir, "stdout": result.stdout, "extra": extra}
        return runs[name]

    return run


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,expected",
    [("sdxl-capo", GAP**2), ("sdxl-dpo", LOG2), ("sd_v-ipo", 1.0), ("sd_v-capo", GAP**2)],
)
def test_first_step_loss_is_each_objectives_value_at_initialisation(first_step_run, name, expected):
    pipeline, objective, _ = FIRST_STEP_RUNS[name]
    run = first_step_run(name)
    output_dir, extra = run["dir"], run["extra"]
    assert f"Found an {'SDXL' if pipeline == 'sdxl' else 'SD1.x/SD2.x'} pipeline" in run["stdout"]
    summary = summary_of(output_dir)
    first = summary["last_step_metrics"]  # one step: the metrics at initialisation
    assert set(first) == METRICS
    assert first["loss"] == pytest.approx(expected, abs=1e-6) and first["reward_margin"] == pytest.approx(0, abs=1e-6)
    assert first["target_margin"] == pytest.approx(GAP, abs=1e-6)
    assert first["model_mse_pos"] == pytest.approx(first["ref_mse_pos"], abs=1e-6)
    assert summary["skipped_rows"] == {"non_finite_reward": 1, "identical_images": 1}
    assert summary["objective"] == objective
    card = (output_dir / "README.md").read_text()
    assert (
        f"tags: [stable-diffusion{'-xl' if pipeline == 'sdxl' else ''}, text-to-image, diffusers, capo, {objective}]"
        in card
    )
    if "--validation_prompts" in extra:
        assert (output_dir / "validation" / "step-000001.png").is_file()
        assert list(summary["validation_win_rates"]) == ["0", "1"] and summary["validation_win_rates"]["0"] == 0.5
        assert "Step 1: validation win-rate against the base" in run["stdout"]
        assert summary["best_checkpoint"] in (0, 1)
        assert (output_dir / "best" / "pytorch_lora_weights.safetensors").is_file()
    weights = (
        "pytorch_lora_weights.safetensors" if "--lora_rank" in extra else "unet/diffusion_pytorch_model.safetensors"
    )
    assert (output_dir / weights).is_file()


@pytest.mark.slow
def test_independent_noise_by_default_and_shared_noise_on_request(first_step_run):
    # With one noise draw for both images of a pair the reference's errors are those of Diffusion-DPO's recipe; with
    # independent draws they differ. Seen through the reference's mean errors of the first step (the reference's
    # errors do not depend on the objective or the learning rate).
    errors = {}
    for name, run in (("independent", "sdxl-capo"), ("shared", "sdxl-capo-shared-noise")):
        first = summary_of(first_step_run(run)["dir"])["last_step_metrics"]
        errors[name] = first["ref_mse_pos"], first["ref_mse_neg"]
    assert errors["independent"][0] == pytest.approx(errors["shared"][0], abs=1e-7)  # the positive's draw is the same
    assert errors["independent"][1] != pytest.approx(errors["shared"][1], abs=1e-5)


@pytest.mark.slow
def test_two_processes_reach_the_weights_of_one_process_with_the_same_global_batch(tiny_assets, capo_pairs, tmp_path):
    common = ["--max_train_steps", 3, "--learning_rate", 1e-4, "--adam_epsilon", 1e-3, "--max_train_samples", 24]
    assets = {"model": tiny_assets["model"], "dataset": capo_pairs}
    launch("train_capo.py", tiny_args(assets, tmp_path / "one", "--train_batch_size", 4, *common))
    log = launch_with_config(
        "multi_gpu_ddp.yaml",
        "train_capo.py",
        tiny_args(assets, tmp_path / "two", "--train_batch_size", 2, *common),
        ["--num_processes", "2"],
        {"ACCELERATE_USE_CPU": "1"},
    )
    assert "total batch (parallel, accumulation) = 4" in log and "weights identical on all processes: yes" in log
    one, two = unet_weights(tmp_path / "one"), unet_weights(tmp_path / "two")
    base = unet_weights(tiny_assets["model"])
    assert max_abs_diff(one, base) > 1e-4
    assert max_abs_diff(one, two) < 5e-6


@pytest.mark.slow
def test_resumed_run_ends_with_the_lora_weights_of_an_uninterrupted_one(tiny_assets, capo_pairs, tmp_path, capsys):
    import shutil

    common = ["--max_train_steps", 5, "--lora_rank", 4, "--learning_rate", 1e-2, "--max_train_samples", 12]
    common += ["--checkpointing_steps", 2]
    assets = {"model": tiny_assets["model"], "dataset": capo_pairs}
    launch("train_capo.py", tiny_args(assets, tmp_path / "uninterrupted", *common))
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "uninterrupted" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    launch("train_capo.py", tiny_args(assets, tmp_path / "resumed", *common, "--resume_from_checkpoint", "latest"))
    first = load_file(tmp_path / "uninterrupted" / "pytorch_lora_weights.safetensors")
    second = load_file(tmp_path / "resumed" / "pytorch_lora_weights.safetensors")
    assert max_abs_diff(first, second) == 0
    # the rank is read from the checkpoint the run saved: another --lora_rank is refused before anything loads
    argv = tiny_args(assets, tmp_path / "resumed", *common, "--resume_from_checkpoint", "latest", "--lora_rank", 8)
    line = parse_args_refusal("train_capo", argv, capsys)
    assert "checkpoint-4 holds LoRA weights of rank 4, and this run has --lora_rank 8" in line


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra,message",
    [
        (["--beta_capo", 0], "--beta_capo must be positive"),
        (["--loss_weighting", "linear"], "invalid choice: 'linear'"),
        (["--objective", "kto"], "invalid choice: 'kto'"),
    ],
)
def test_bad_flags_stop_with_one_line_before_any_model_loads(tmp_path, extra, message, capsys):
    # in parse_args, before torch is imported (test_errors.py runs each script's refusal as users see it)
    assert message in parse_args_refusal("train_capo", ["--output_dir", tmp_path, *extra], capsys)


def test_a_beta_from_another_objectives_range_is_warned_about_before_any_model_loads(tmp_path):
    result = run_python(
        "train_capo.py", ["--output_dir", tmp_path, "--beta_capo", 3000, "--dataset_name", tmp_path / "x"]
    )
    assert "warning: --beta_capo 3000 lies in the paper's SDXL sweep for dpo" in result.stdout
    assert result.returncode == 2 and "no such file or folder" in result.stdout  # and the run still checks the rest


def write_rows(folder, **columns):
    folder.mkdir(parents=True, exist_ok=True)
    image = world.encode_png(np.zeros((8, 8, 3), np.uint8))
    other = world.encode_png(np.full((8, 8, 3), 255, np.uint8))
    rows = {"caption": ["a photo of a red ball"] * 2, "jpg_pos": [image] * 2, "jpg_neg": [other] * 2, **columns}
    pq.write_table(
        pa.table({key: value for key, value in rows.items() if value is not None}), folder / "train.parquet"
    )
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(
    "columns,message",
    [
        ({"reward_pos": [0.9, 0.8], "reward_neg": None}, "no column(s) ['reward_neg']"),
        ({"reward_pos": [0.9, 27.5], "reward_neg": [0.1, 0.2]}, "1 row(s) have a calibrated reward outside [0, 1]"),
        (
            {"reward_pos": [float("nan"), None], "reward_neg": [0.1, 0.2]},
            "2 reward_pos or reward_neg missing or not finite",
        ),
    ],
    ids=["missing_column", "not_calibrated", "nothing_finite"],
)
def test_bad_reward_columns_are_one_line_before_any_model_loads(tiny_assets, tmp_path, columns, message):
    folder = write_rows(tmp_path / "data", **columns)
    result = launch(
        "train_capo.py", tiny_args({"model": tiny_assets["model"], "dataset": folder}, tmp_path / "o"), check=False
    )
    assert result.returncode != 0 and message in result.stdout
    assert 'train_capo.py", line' not in result.stdout  # accelerate's own traceback only
    assert "Found an" not in result.stdout
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------
# The whole pipeline: generate -> score -> select_pairs -> train, each objective
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def selected_pairs(tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("capo-pipeline")
    (root / "prompts.txt").write_text("a photo of a red ball\na photo of a blue ball\na photo of a green ball\n")
    args = ["--pretrained_model_name_or_path", tiny_assets["model"], "--prompts", root / "prompts.txt"]
    args += [
        "--images_per_prompt",
        4,
        "--seed",
        0,
        "--resolution",
        64,
        "--num_inference_steps",
        2,
        "--scheduler",
        "ddim",
    ]
    args += ["--output_dir", root / "generated", "--model_name", "base"]
    for script, script_args in (
        ("examples/eval/generate.py", args),
        ("examples/eval/score.py", ["--run_dirs", root / "generated" / "base", "--reward_models", "toy_ball"]),
        (
            "examples/capo/select_pairs.py",
            ["--run_dirs", root / "generated" / "base", "--reward_models", "toy_ball", "--output_dir", root / "pairs"],
        ),
    ):
        result = run_python(script, [str(arg) for arg in script_args])
        assert result.returncode == 0, result.stdout[-3000:]
    return root / "pairs"


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["capo", "dpo", "ipo"])
def test_pairs_selected_from_generated_and_scored_images_train_with_each_objective(
    tiny_assets, selected_pairs, tmp_path, objective
):
    pairs = pq.read_table(selected_pairs / "train.parquet").to_pylist()
    assert len(pairs) == 3 and all(pair["reward_pos"] > pair["reward_neg"] for pair in pairs)
    args = tiny_args({"model": tiny_assets["model"], "dataset": selected_pairs}, tmp_path, "--max_train_steps", 2)
    result = launch("train_capo.py", [*args, "--objective", objective, "--train_batch_size", 3, "--lora_rank", 4])
    assert "Num pairs = 3" in result.stdout
    metrics = summary_of(tmp_path)["last_step_metrics"]
    expected_gap = sum(pair["reward_pos"] - pair["reward_neg"] for pair in pairs) / 3
    assert metrics["target_margin"] == pytest.approx(expected_gap, abs=1e-6)


def test_identical_images_are_found_by_bytes_or_by_path_without_decoding():
    import datasets

    encoded = datasets.Dataset.from_dict({"pos": [b"xx", b"yy", b"zz", None], "neg": [b"xx", b"yz", b"zzz", None]})
    assert train_capo.identical_image_rows(encoded, "pos", "neg") == {0}  # equal length alone is not enough
    assert train_capo.identical_image_rows(encoded.select([2, 0]), "pos", "neg") == {1}  # rows after a select
    cells = {
        "pos": [{"bytes": None, "path": "a.png"}, {"bytes": b"q", "path": None}, {"bytes": None, "path": "b.png"}],
        "neg": [{"bytes": None, "path": "a.png"}, {"bytes": b"q", "path": None}, {"bytes": None, "path": "c.png"}],
    }
    images = datasets.Dataset.from_dict(cells)
    for column in cells:
        images = images.cast_column(column, datasets.Image(decode=False))
    assert train_capo.identical_image_rows(images, "pos", "neg") == {0, 1}
