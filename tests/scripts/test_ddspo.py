"""train_ddspo.py: the objective against docs/METHODS.md, and the script end to end on tiny SD1.x and SDXL."""

import math
import re
import shlex

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from kit import REPO, launch, parse_args_refusal, png_bytes, summary_of, tiny_args

import train_ddspo
from examples.tiny_world import world
from train_ddspo import ddspo_loss, rand_removal


LOG2 = math.log(2.0)
SD_VALIDATION = ["--validation_prompts", "a photo of a red ball", "--validation_inference_steps", 2]


# ----------------------------------------------------------------------------------------------
# The objective
# ----------------------------------------------------------------------------------------------
def test_ddspo_loss_is_log2_when_policy_equals_reference():
    ref_losses_l = torch.tensor([0.3, 0.01, 2.0])
    # theta == ref: the policy's errors against the targets are the reference's (0 on the winner's own target)
    loss, metrics = ddspo_loss(torch.zeros(3), ref_losses_l.clone(), None, ref_losses_l, beta_ddspo=16000)
    assert loss.item() == torch.tensor(LOG2).item()  # log 2 in float32, exactly
    assert metrics["implicit_acc"].item() == 0.5 and metrics["reward_margin"].item() == 0.0
    assert "ref_mse_w" not in metrics  # identically 0 with prompt-perturbation targets: not logged


def test_ddspo_loss_matches_a_hand_computed_asymmetric_case_with_the_half_factor():
    model_w, model_l = torch.tensor([0.02, 0.05]), torch.tensor([0.30, 0.10])
    ref_w, ref_l = torch.tensor([0.01, 0.04]), torch.tensor([0.20, 0.12])
    loss, metrics = ddspo_loss(model_w, model_l, ref_w, ref_l, beta_ddspo=20.0)
    # A - B per pair: (0.01 - 0.10) = -0.09 and (0.01 - (-0.02)) = 0.03; inside = -0.5 * 20 * (A - B)
    inside = torch.tensor([0.9, -0.3])
    expected = -torch.nn.functional.logsigmoid(inside).mean()
    torch.testing.assert_close(loss, expected)
    assert metrics["implicit_acc"].item() == 0.5
    torch.testing.assert_close(metrics["reward_margin"], inside.mean())
    assert metrics["ref_mse_w"].item() == pytest.approx(0.025)


def test_ddspo_loss_falls_when_the_policy_moves_away_from_the_degraded_target_on_the_loser():
    ref_l = torch.tensor([0.1])
    farther, _ = ddspo_loss(torch.zeros(1), torch.tensor([0.2]), None, ref_l, beta_ddspo=10.0)
    closer, _ = ddspo_loss(torch.zeros(1), torch.tensor([0.05]), None, ref_l, beta_ddspo=10.0)
    assert farther < LOG2 < closer


def test_ddspo_loss_linear_weighting_scales_each_pairs_loss():
    ref_l = torch.tensor([0.1, 0.1])
    weights = torch.tensor([0.25, 1.0])
    loss, _ = ddspo_loss(torch.zeros(2), ref_l.clone(), None, ref_l, beta_ddspo=1.0, weights=weights)
    assert loss.item() == pytest.approx(LOG2 * 0.625)


def test_rand_removal_used_by_the_script_is_the_one_the_data_tool_uses():
    from examples.ddspo import degrade_prompts

    assert degrade_prompts.rand_removal is rand_removal
    rng = np.random.default_rng(0)
    for _ in range(50):
        kept = rand_removal("a photo of a red ball on the grass", rng).split()
        assert 1 <= len(kept) <= 7


# ----------------------------------------------------------------------------------------------
# The release's recipe: steps, batch, beta, resolution, flips
# ----------------------------------------------------------------------------------------------
def guide_commands():
    """Each `train_ddspo.py` command of examples/ddspo/README.md as {flag: value} (switches map to None)."""
    text = (REPO / "examples" / "ddspo" / "README.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            if "train_ddspo.py" not in command.split("#", 1)[0]:
                continue
            words, flags = shlex.split(command.split("#", 1)[0]), {}
            for index, word in enumerate(words):
                if word.startswith("--"):
                    following = words[index + 1] if index + 1 < len(words) else "--"
                    flags[word] = None if following.startswith("--") else following
            yield flags


def test_the_guides_commands_run_the_releases_steps_and_warmup_at_total_batch_2048():
    steps = {}
    for flags in guide_commands():
        total = int(flags["--num_processes"]) * int(flags["--train_batch_size"])
        total *= int(flags["--gradient_accumulation_steps"])
        family = "SDXL" if "xl" in flags["--pretrained_model_name_or_path"] else "SD1.x"
        assert total == 2048 and flags["--lr_warmup_steps"] == "100", flags
        assert flags["--beta_ddspo"] == "16000" and flags["--learning_rate"] == "2.5e-9" and "--scale_lr" in flags
        steps[family] = int(flags["--max_train_steps"])
    assert steps == {"SD1.x": 200, "SDXL": 500}  # the release's train_ddspo.sh
    doc = " ".join(train_ddspo.__doc__.split())
    assert "--lr_warmup_steps 100 --max_train_steps 200" in doc and "total batch 2048 = 8 processes x 16 pairs" in doc


def ddspo_flags(tmp_path, *extra):
    """train_ddspo.parse_args for flags that pass its checks (the models are hub ids, never loaded here)."""
    (tmp_path / "data").mkdir(exist_ok=True)
    argv = ["--dataset_name", tmp_path / "data", "--output_dir", tmp_path / "out", "--seed", 0, *extra]
    return train_ddspo.parse_args([str(arg) for arg in argv])


def test_beta_defaults_to_the_releases_value_for_each_target_source(tmp_path):
    assert ddspo_flags(tmp_path).beta_ddspo == 16000
    policies = ["--target_source", "policies", "--winning_policy", tmp_path, "--losing_policy", tmp_path]
    assert ddspo_flags(tmp_path, *policies).beta_ddspo == 8000  # the release's train_ddspo_lora_target.sh
    assert ddspo_flags(tmp_path, *policies, "--beta_ddspo", 500).beta_ddspo == 500


def test_resolution_defaults_to_the_native_size_of_the_family_found():
    assert train_ddspo.native_resolution("SD1.x/SD2.x", "epsilon") == 512
    assert train_ddspo.native_resolution("SD1.x/SD2.x", "v_prediction") == 768
    assert train_ddspo.native_resolution("SDXL", "epsilon") == 1024


def test_resolution_is_left_to_the_family_when_not_given(tmp_path):
    assert ddspo_flags(tmp_path).resolution is None  # main() sets it once the pipeline's family is known
    assert ddspo_flags(tmp_path, "--resolution", 256).resolution == 256


def test_pairs_are_not_flipped_unless_random_flip_is_given(tmp_path):
    import datasets

    left_half_dark = np.zeros((16, 16, 3))
    left_half_dark[:, 8:] = 255
    rows = {"caption": ["a ball on the left"] * 16, "negative_caption": ["a ball"] * 16}
    rows |= {"jpg_w": [png_bytes(left_half_dark)] * 16, "jpg_l": [png_bytes(255 - left_half_dark)] * 16}
    flipped = {}
    for name, extra in (("default", []), ("random_flip", ["--random_flip"])):
        args = ddspo_flags(tmp_path, "--resolution", 16, *extra)
        pairs = train_ddspo.DDSPOPairs(
            train_ddspo.prepare_rows(datasets.Dataset.from_dict(rows), args, "train")[0], args
        )
        winners_left = [pairs[i]["pixel_values"][0, :, :, :8].mean().item() for i in range(16)]
        flipped[name] = sum(left < 0 for left in winners_left) < 16  # a flip puts the bright half on the left
    assert flipped == {"default": False, "random_flip": True}


# ----------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------
def ddspo_args(model, dataset, output_dir, *extra):
    assets = {"model": model, "dataset": dataset}
    return tiny_args(assets, output_dir, "--max_train_steps", 1, *extra)


@pytest.mark.slow
@pytest.mark.parametrize(
    "pipeline,mode,extra",
    [
        ("sd_epsilon", "paired", ["--lora_rank", 4, "--learning_rate", 1e-3]),
        ("sd_v_prediction", "not_paired", ["--learning_rate", 1e-4, "--cache_latents", *SD_VALIDATION]),
        ("sdxl", "rand_positive", ["--lora_rank", 4, "--learning_rate", 1e-3, "--independent_noise"]),
        ("sdxl", "paired", ["--learning_rate", 1e-4, "--cache_latents"]),
    ],
)
def test_ddspo_first_step_loss_is_exactly_log2_in_every_mode_and_family(
    tiny_assets, tiny_sd, ddspo_pairs, tmp_path, pipeline, mode, extra
):
    model = tiny_assets["model"] if pipeline == "sdxl" else tiny_sd(pipeline.removeprefix("sd_"))
    if "--validation_prompts" in extra:  # and validation by reward, keeping the best step's UNet
        (tmp_path / "prompts.txt").write_text("a photo of a red ball\na photo of a blue ball\n")
        extra = [*extra, "--validation_reward_models", "toy_ball", "--validation_images_per_prompt", 2]
        extra += ["--validation_reward_prompts", tmp_path / "prompts.txt", "--keep_best_checkpoint"]
    result = launch("train_ddspo.py", ddspo_args(model, ddspo_pairs, tmp_path, "--negative_mode", mode, *extra))
    family = "SDXL" if pipeline == "sdxl" else "SD1.x/SD2.x"
    assert f"Found an {family} pipeline" in result.stdout
    summary = summary_of(tmp_path)
    first = summary["last_step_metrics"]  # one step: the metrics at initialisation
    assert first["loss"] == pytest.approx(LOG2, abs=1e-6) and first["reward_margin"] == pytest.approx(0, abs=1e-5)
    expected = {"loss", "implicit_acc", "reward_margin", "model_mse_w", "model_mse_l", "ref_mse_l", "grad_norm"}
    assert set(first) == expected
    if mode == "paired":
        assert summary["skipped_rows"] == {"empty_negative": 1, "negative_equals_caption": 1, "too_short": 0}
    else:
        assert summary["skipped_rows"] == {"empty_negative": 0, "negative_equals_caption": 0, "too_short": 0}
    if "--validation_prompts" in extra:  # rendered with the pipeline class of the family found
        assert (tmp_path / "validation" / "step-000001.png").is_file()
        assert list(summary["validation_win_rates"]) == ["0", "1"] and summary["validation_win_rates"]["0"] == 0.5
        assert "Step 1: validation win-rate against the base" in result.stdout
        assert summary["best_checkpoint"] in (0, 1) and (tmp_path / "best" / "unet" / "config.json").is_file()
    weights = (
        "pytorch_lora_weights.safetensors" if "--lora_rank" in extra else "unet/diffusion_pytorch_model.safetensors"
    )
    assert (tmp_path / weights).is_file()


@pytest.fixture(scope="module")
def sd_lora_run(tiny_sd, ddspo_pairs, tmp_path_factory):
    """A 4-step LoRA run on the tiny SD1.x pipeline, with --overwrite over an earlier full fine-tune's folder (its
    unet/ and checkpoint-9, and the user's notes.txt); a policy that left the reference, for the two-policies run."""
    output_dir = tmp_path_factory.mktemp("sd-lora")
    (output_dir / "unet").mkdir()
    (output_dir / "unet" / "config.json").write_text("{}")
    (output_dir / "checkpoint-9").mkdir()
    (output_dir / "notes.txt").write_text("mine")
    args = ["--lora_rank", 4, "--learning_rate", 1e-2, "--max_train_steps", 4, "--beta_ddspo", 1000, "--overwrite"]
    launch("train_ddspo.py", tiny_args({"model": tiny_sd("epsilon"), "dataset": ddspo_pairs}, output_dir, *args))
    return output_dir


@pytest.mark.slow
def test_ddspo_lora_trains_and_its_output_loads_into_a_stock_sd_pipeline(tiny_sd, sd_lora_run):
    from diffusers import StableDiffusionPipeline

    # --overwrite over an earlier full fine-tune's folder: its unet/ and checkpoints go, the user's notes stay
    assert not (sd_lora_run / "unet").exists() and not (sd_lora_run / "checkpoint-9").exists()
    assert (sd_lora_run / "notes.txt").read_text() == "mine"
    assert summary_of(sd_lora_run)["last_step_metrics"]["model_mse_w"] > 0  # the policy left the reference
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd("epsilon"), safety_checker=None)
    pipeline.load_lora_weights(str(sd_lora_run))
    assert "ddspo" in (sd_lora_run / "README.md").read_text()


@pytest.mark.slow
def test_ddspo_with_targets_from_two_policies_logs_the_references_error_on_the_winner(
    tiny_sd, ddspo_pairs, sd_lora_run, tmp_path
):
    assets = {"model": tiny_sd("epsilon"), "dataset": ddspo_pairs}
    args = ["--lora_rank", 4, "--learning_rate", 1e-3, "--max_train_steps", 1, "--target_source", "policies"]
    args += ["--winning_policy", sd_lora_run, "--losing_policy", tiny_sd("epsilon") + "/unet"]
    launch("train_ddspo.py", tiny_args(assets, tmp_path / "run", *args))
    first = summary_of(tmp_path / "run")["last_step_metrics"]
    # the winning policy's targets are not the reference's own predictions: 0.04 here, 4e-14 (float noise) with the
    # base UNet as the winning policy, which `> 0` let pass
    assert first["ref_mse_w"] > 1e-4
    assert first["ref_mse_l"] == pytest.approx(0, abs=1e-9)  # the losing policy is the base UNet, i.e. the reference
    assert first["loss"] == pytest.approx(LOG2, abs=1e-6)  # theta == ref at initialisation, whatever the targets


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--negative_mode", "rand_positive", "--train_batch_size", 1], "needs --train_batch_size 2 or more"),
        (["--target_source", "policies"], "needs --winning_policy and --losing_policy"),
        (["--winning_policy", "x"], "only with --target_source policies"),
        (["--beta_ddspo", 0], "--beta_ddspo must be positive"),
        (["--min_removal", 0.8, "--max_removal", 0.5], "0 < min <= max < 1"),
    ],
)
def test_bad_flags_stop_with_one_line_before_any_model_loads(tmp_path, extra, message, capsys):
    # in parse_args, before torch is imported (test_errors.py runs each script's refusal as users see it)
    assert message in parse_args_refusal("train_ddspo", ["--output_dir", tmp_path, *extra], capsys)


@pytest.mark.slow
def test_paired_mode_on_data_without_losing_images_names_the_columns_it_needs(tiny_sd, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = {
        "caption": ["a photo of a red ball"],
        "jpg_w": [world.encode_png(np.zeros((8, 8, 3), np.uint8))],
    }
    pq.write_table(pa.table(rows), folder / "train.parquet")
    result = launch(
        "train_ddspo.py", tiny_args({"model": tiny_sd("epsilon"), "dataset": folder}, tmp_path / "o"), check=False
    )
    assert result.returncode != 0
    assert "no column(s) ['negative_caption', 'jpg_l']" in result.stdout
    assert "rand_positive and not_paired need only" in result.stdout
