"""train_mapo_sd3.py runs as users run it: `accelerate launch` on the tiny SD3 pipeline (conftest `tiny_sd3`) and the
tiny Pick-a-Pic dataset. Two launches, shared by the tests (module fixture `lora_runs`): a LoRA run of one pair per
step, so that every logged metric is one pair's and the objective can be recomputed from the logged errors, and its
resumption from checkpoint-2. Full fine-tuning runs in tests/learning/test_learning_sd3.py."""

import json
import math
import re
import shutil

import pytest
import torch
from kit import (
    assert_same_tensors,
    launch,
    one_line_error,
    run_python,
    scalar_events,
    scalar_tags,
    sd3_lora_change,
    summary_of,
    tiny_args,
)
from safetensors.torch import load_file


SCRIPT = "train_mapo_sd3.py"
BETA = 2  # the script's default
MAPO_METRICS = {"loss", "implicit_acc", "reward_margin", "model_mse_w", "model_mse_l"}
LORA = ["--lora_rank", 4, "--learning_rate", 1e-2, "--max_train_steps", 4, "--checkpointing_steps", 2]
LORA += ["--train_batch_size", 1, "--beta_mapo", BETA]
PROMPT = "a photo of a red ball"


@pytest.fixture(scope="module")
def sd3_assets(tiny_sd3, tiny_assets):
    """kit.tiny_args' assets with the tiny SD3 pipeline as the model."""
    return {"model": str(tiny_sd3), "dataset": tiny_assets["dataset"]}


def mapo_args(sd3_assets, output_dir, *extra):
    """kit.tiny_args with LORA; LORA's --train_batch_size replaces tiny_args' (argparse keeps the last)."""
    return tiny_args(sd3_assets, output_dir, *LORA, *extra)


# Fast: no launch
def test_an_sdxl_folder_given_to_the_mapo_sd3_script_names_the_mapo_sdxl_script(tmp_path):
    model = tmp_path / "sdxl"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    result = run_python(SCRIPT, ["--pretrained_model_name_or_path", model, "--output_dir", tmp_path / "out"])
    line = one_line_error(result)
    assert "is a StableDiffusionXLPipeline" in line and "train it with train_mapo_sdxl.py" in line


def test_the_objective_is_train_mapo_sdxls_on_velocity_errors():
    """The same pure function as the SDXL script's (a copy by design, docs/METHODS.md "MaPO on a flow model"), so
    tests/unit/test_objectives.py's checks of that one hold for this one: values, metrics and gradients agree."""
    import train_mapo_sd3
    import train_mapo_sdxl

    generator = torch.Generator().manual_seed(0)
    errors = torch.rand(2, 64, generator=generator, dtype=torch.float64) * 4  # velocity errors reach a few units
    errors[:, :4] = torch.tensor([[0.0, 1e-6, 0.2, 9.0], [0.0, 2e-6, 0.21, 10.0]], dtype=torch.float64)
    for beta in (1, 2, 8, 32, 1024):
        results = []
        for script in (train_mapo_sd3, train_mapo_sdxl):
            model_losses = errors.float().clone().requires_grad_(True)
            loss, metrics = script.mapo_loss(model_losses[0], model_losses[1], beta, 0.5, 1000)
            loss.backward()
            results.append((loss, metrics, model_losses.grad))
        (loss, metrics, grad), (sdxl_loss, sdxl_metrics, sdxl_grad) = results
        assert torch.equal(loss, sdxl_loss) and torch.equal(grad, sdxl_grad), beta
        assert metrics.keys() == sdxl_metrics.keys()
        assert all(torch.equal(metrics[name], sdxl_metrics[name]) for name in metrics), beta
        assert loss >= errors[0].float().mean() and torch.isfinite(grad).all()


# Slow: the launches
@pytest.fixture(scope="module")
def lora_runs(sd3_assets, tmp_path_factory):
    """The LoRA run (4 steps, checkpoints at 2 and 4, held-out accuracy and validation images at 2 and 4) and its
    resumption from a copy of checkpoint-2: {"output_dir", "log", "resumed", "resumed_log"}."""
    output_dir = tmp_path_factory.mktemp("mapo-sd3-lora")
    extra = ["--report_to", "tensorboard", "--validation_prompts", PROMPT, "--validation_steps", 2]
    extra += ["--validation_inference_steps", 2, "--preference_eval_split", "test"]
    extra += ["--preference_eval_max_samples", 8, "--preference_eval_timesteps", 2]
    log = launch(SCRIPT, mapo_args(sd3_assets, output_dir, *extra)).stdout
    resumed = tmp_path_factory.mktemp("mapo-sd3-lora-resumed")
    shutil.copytree(output_dir / "checkpoint-2", resumed / "checkpoint-2")
    resumed_log = launch(SCRIPT, mapo_args(sd3_assets, resumed, "--resume_from_checkpoint", "checkpoint-2")).stdout
    return {"output_dir": output_dir, "log": log, "resumed": resumed, "resumed_log": resumed_log}


def app_a_mapo(error_w, error_l):
    """MaPO Eq. 5-7 with Appendix A's s = 0.5 and T = 1000 (the flow scheduler's num_train_timesteps) for one pair,
    written naively in float64, which represents phi at these errors: (loss, logit)."""

    def phi(error):
        u = 0.5 * error
        return (u / math.expm1(u)) ** BETA

    logit = 1000 * (phi(error_w) - phi(error_l))
    return error_w + math.log1p(math.exp(-logit)) / BETA, logit


@pytest.mark.slow
def test_each_logged_loss_is_the_mapo_loss_of_the_logged_errors_and_never_below_the_winners_error(lora_runs):
    tags = scalar_tags(lora_runs["output_dir"] / "logs")
    assert MAPO_METRICS <= set(tags) and len(tags["loss"]) == 4
    for step in range(4):  # one pair per step: each logged value is that pair's
        loss, logit = app_a_mapo(tags["model_mse_w"][step], tags["model_mse_l"][step])
        assert tags["loss"][step] >= tags["model_mse_w"][step]  # MaPO's bound: the margin term is not negative
        assert tags["loss"][step] == pytest.approx(loss, rel=1e-6, abs=1e-6), step
        assert tags["reward_margin"][step] == pytest.approx(logit, rel=1e-4, abs=1e-3), step
        assert tags["implicit_acc"][step] == (logit > 0), step
    print(f"MaPO on tiny SD3: loss {tags['loss']}, l_w {tags['model_mse_w']}, l_l {tags['model_mse_l']}")


@pytest.mark.slow
def test_no_reference_is_built_or_evaluated(lora_runs):
    import train_mapo_sd3

    tags = scalar_tags(lora_runs["output_dir"] / "logs")
    assert not {"ref_mse_w", "ref_mse_l"} & set(tags)
    assert "No reference model: one transformer pass (with gradient)" in lora_runs["log"]
    assert not hasattr(train_mapo_sd3, "reference_prediction")


@pytest.mark.slow
def test_lora_run_writes_card_summary_heldout_accuracy_and_validation(lora_runs):
    output_dir, log = lora_runs["output_dir"], lora_runs["log"]
    weights = load_file(output_dir / "pytorch_lora_weights.safetensors")
    assert weights and all(key.startswith("transformer.") and "lora" in key for key in weights)
    assert any(".attn.add_q_proj." in key for key in weights)  # the context stream's projections are trained too
    card = (output_dir / "README.md").read_text()
    assert f"MaPO (beta_mapo = {BETA}, snr_value = 0.5)" in card and "mapo]" in card and SCRIPT in card
    summary = summary_of(output_dir)
    assert (
        summary["method"] == "mapo" and summary["global_step"] == 4 and summary["weighting_scheme"] == "logit_normal"
    )
    assert f"Method = MaPO, beta_mapo = {BETA}, snr_value = 0.5, T = 1000, LoRA rank 4" in log
    assert "== MaPO finished: 4 optimizer steps" in log and "dropped ties: 4" in log
    logged = scalar_events(output_dir / "logs")["heldout_preference_accuracy"]
    assert [step for step, _ in logged] == [0, 2, 4]
    assert logged[0][1] == pytest.approx(summary["heldout_preference_accuracy_before"])
    assert re.search(r"held-out preference accuracy \(test\): [0-9.]+ before -> [0-9.]+ after", log)
    grids = sorted((output_dir / "validation").glob("step-*.png"))
    assert [path.name for path in grids] == ["step-000002.png", "step-000004.png"]


@pytest.mark.slow
def test_resumed_lora_run_ends_with_the_weights_of_the_uninterrupted_one(lora_runs):
    resumed = lora_runs["resumed"]
    assert f"Resuming from {resumed / 'checkpoint-2'}" in lora_runs["resumed_log"]
    assert_same_tensors(
        load_file(lora_runs["output_dir"] / "pytorch_lora_weights.safetensors"),
        load_file(resumed / "pytorch_lora_weights.safetensors"),
    )


@pytest.mark.slow
def test_saved_lora_loads_in_the_stock_sd3_pipeline_and_changes_its_images(sd3_assets, lora_runs):
    rank, change = sd3_lora_change(sd3_assets["model"], lora_runs["output_dir"], PROMPT)
    assert rank == 4 and change > 1e-3


def test_an_sd3_folder_given_to_the_mapo_sdxl_script_names_the_mapo_sd3_script(tmp_path):
    model = tmp_path / "sd3"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    args = ["--pretrained_model_name_or_path", model, "--output_dir", tmp_path / "o"]
    result = run_python("train_mapo_sdxl.py", args)
    line = one_line_error(result)
    assert "is a StableDiffusion3Pipeline" in line and "train it with train_mapo_sd3.py" in line
