"""train_ddspo_sd3.py: DDSPO on a flow model, as the authors' release trains SD3 (logit-normal sigmas, preconditioned
outputs, the reference as the transformer with its LoRA off).

Fast tests: the release's defaults, the other family refused both ways, the objective equal to train_ddspo.py's.
Launches, on the tiny SD3 pipeline (conftest `tiny_sd3`) and the tiny DDSPO rows (conftest `ddspo_pairs`): one-step
runs whose first loss is log 2, and a LoRA run (rand_positive) resumed from its checkpoint, whose LoRA loads in
the stock StableDiffusion3Pipeline. No learning test yet: DDSPO needs a base that follows the word the degraded prompt
drops, and the tiny world has such a base for SDXL only (tests/learning/test_learning_ddspo.py)."""

import math
import shutil

import pytest
import torch
from kit import assert_same_tensors, launch, other_family_refusal, sd3_lora_change, summary_of, tiny_args
from safetensors.torch import load_file

import train_ddspo
import train_ddspo_sd3


SCRIPT = "train_ddspo_sd3.py"
LOG2 = math.log(2.0)
PROMPT = "a photo of a red ball"
METRICS = {"loss", "implicit_acc", "reward_margin", "model_mse_w", "model_mse_l", "ref_mse_l", "grad_norm"}


def test_defaults_are_the_authors_sd3_release(tmp_path):
    (tmp_path / "data").mkdir()
    argv = ["--dataset_name", tmp_path / "data", "--output_dir", tmp_path / "out"]
    args = train_ddspo_sd3.parse_args([str(arg) for arg in argv])
    assert (args.beta_ddspo, args.weighting_scheme, args.precondition_outputs) == (1000, "logit_normal", True)
    assert (args.learning_rate, args.resolution, args.loss_weighting) == (4e-8, 1024, "constant")
    args = train_ddspo_sd3.parse_args([str(arg) for arg in [*argv, "--no-precondition_outputs"]])
    assert args.precondition_outputs is False


@pytest.mark.parametrize(
    "script,found,sibling",
    [
        (SCRIPT, "StableDiffusionXLPipeline", "train_ddspo.py"),
        (SCRIPT, "StableDiffusionPipeline", "train_ddspo.py"),
        ("train_ddspo.py", "StableDiffusion3Pipeline", "train_ddspo_sd3.py"),
    ],
)
def test_a_pipeline_of_the_other_family_names_the_script_that_trains_it(tmp_path, script, found, sibling):
    line = other_family_refusal(script, found, tmp_path)
    assert f"is a {found}" in line and f"train it with {sibling}" in line


def test_the_objective_is_train_ddspos_function():
    """The same pure function as train_ddspo.py's (a copy by design), so tests/unit/test_objectives.py's checks of
    that one hold here: values, metrics and gradients agree, with and without per-pair weights."""
    generator = torch.Generator().manual_seed(0)
    errors = torch.rand(3, 16, generator=generator)
    for weights in (None, torch.rand(16, generator=generator)):
        results = []
        for script in (train_ddspo_sd3, train_ddspo):
            model_losses = errors.clone().requires_grad_(True)
            loss, metrics = script.ddspo_loss(model_losses[0], model_losses[1], None, model_losses[2], 1000.0, weights)
            loss.backward()
            results.append((loss, metrics, model_losses.grad))
        (loss, metrics, grad), (other_loss, other_metrics, other_grad) = results
        assert torch.equal(loss, other_loss) and torch.equal(grad, other_grad) and grad.abs().sum() > 0
        assert metrics.keys() == other_metrics.keys()
        assert all(torch.equal(metrics[name], other_metrics[name]) for name in metrics)


# ----------------------------------------------------------------------------------------------
# Slow: the launches
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "mode,extra",
    [
        ("paired", ["--lora_rank", 4, "--learning_rate", 1e-3]),
        ("not_paired", ["--learning_rate", 1e-4, "--cache_latents", "--no-precondition_outputs"]),
    ],
)
def test_first_step_loss_is_exactly_log2_preconditioned_or_not(tiny_sd3, ddspo_pairs, tmp_path, mode, extra):
    args = tiny_args({"model": str(tiny_sd3), "dataset": ddspo_pairs}, tmp_path, "--max_train_steps", 1)
    log = launch(SCRIPT, [*args, "--negative_mode", mode, *extra]).stdout
    assert "Found a StableDiffusion3Pipeline (SD3 family)" in log
    precondition = ", preconditioned outputs" if "--no-precondition_outputs" not in extra else ""
    assert f"--negative_mode {mode}, sigma ~ logit_normal{precondition}, constant weighting" in log
    summary = summary_of(tmp_path)
    first = summary["last_step_metrics"]  # one step: the metrics at initialisation
    assert first["loss"] == pytest.approx(LOG2, abs=1e-6) and first["reward_margin"] == pytest.approx(0, abs=1e-5)
    assert set(first) == {
        "loss",
        "implicit_acc",
        "reward_margin",
        "model_mse_w",
        "model_mse_l",
        "ref_mse_l",
        "grad_norm",
    }
    assert first["model_mse_w"] == pytest.approx(0, abs=1e-9)  # the policy is the reference: tgt_w is its output
    assert first["model_mse_l"] == pytest.approx(first["ref_mse_l"], rel=1e-5)
    # tgt_l is the reference conditioned on c-, not on c, so the policy (conditioned on c) starts away from it
    assert first["ref_mse_l"] > 1e-7
    skipped = {"empty_negative": 1, "negative_equals_caption": 1} if mode == "paired" else {}
    assert {reason: count for reason, count in summary["skipped_rows"].items() if count} == skipped
    assert "tags: [sd3, stable-diffusion-3, text-to-image, diffusers, ddspo]" in (tmp_path / "README.md").read_text()
    weights = "pytorch_lora_weights.safetensors" if "--lora_rank" in extra else "transformer/config.json"
    assert (tmp_path / weights).is_file()


@pytest.fixture(scope="module")
def lora_runs(tiny_sd3, ddspo_pairs, tmp_path_factory):
    """A 4-step LoRA run (checkpoints at 2 and 4) and its resumption from a copy of checkpoint-2, with the third
    negative mode, rand_positive (the loser and c- of the next pair of the batch), and independent noise."""
    assets = {"model": str(tiny_sd3), "dataset": ddspo_pairs}
    common = ["--max_train_steps", 4, "--lora_rank", 4, "--learning_rate", 5e-2, "--checkpointing_steps", 2]
    common += ["--train_batch_size", 2, "--negative_mode", "rand_positive", "--independent_noise"]
    output_dir = tmp_path_factory.mktemp("ddspo-sd3-lora")
    launch(SCRIPT, tiny_args(assets, output_dir, *common))
    resumed = tmp_path_factory.mktemp("ddspo-sd3-lora-resumed")
    shutil.copytree(output_dir / "checkpoint-2", resumed / "checkpoint-2")
    log = launch(SCRIPT, tiny_args(assets, resumed, *common, "--resume_from_checkpoint", "latest")).stdout
    return {"output_dir": output_dir, "resumed": resumed, "resumed_log": log}


@pytest.mark.slow
def test_resumed_lora_run_ends_with_the_weights_of_the_uninterrupted_one(lora_runs):
    assert f"Resuming from {lora_runs['resumed'] / 'checkpoint-2'}" in lora_runs["resumed_log"]
    assert_same_tensors(
        load_file(lora_runs["output_dir"] / "pytorch_lora_weights.safetensors"),
        load_file(lora_runs["resumed"] / "pytorch_lora_weights.safetensors"),
    )


@pytest.mark.slow
def test_saved_lora_loads_in_the_stock_sd3_pipeline_and_changes_its_images(tiny_sd3, lora_runs):
    rank, change = sd3_lora_change(tiny_sd3, lora_runs["output_dir"], PROMPT)
    assert rank == 4
    # DDSPO's A term distils the policy towards the reference on the winner, so 4 steps move it little: the images
    # changed by 3.4e-3 at most (under a level of an 8-bit image), where an unloaded LoRA changes nothing.
    assert change > 1e-3
