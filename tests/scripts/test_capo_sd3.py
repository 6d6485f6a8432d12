"""train_capo_sd3.py: CaPO and its DPO / IPO baselines on a flow model, as CaPO's App. A.3 trains SD3-medium.

Fast tests: the paper's SD3-M defaults, the draw of lambda and the noise, refusals. Launches, on the tiny SD3 pipeline
(conftest `tiny_sd3`) and the tiny Pick-a-Pic pairs as CaPO rows (reward gap GAP): one-step runs whose first loss is
the objective's value at initialisation (CaPO and DPO; IPO's 1 is the same function's, tested equal to train_capo's),
and an IPO LoRA run resumed from its checkpoint, whose LoRA loads in the stock StableDiffusion3Pipeline. Learning:
tests/learning/test_learning_sd3.py."""

import argparse
import math
import shutil

import pytest
import torch
from kit import (
    assert_same_tensors,
    launch,
    other_family_refusal,
    parse_args_refusal,
    sd3_lora_change,
    summary_of,
    tiny_args,
)
from safetensors.torch import load_file

import train_capo
import train_capo_sd3
from utils.diffusion import flow_matching_log_snr, sample_generators


SCRIPT = "train_capo_sd3.py"
LOG2 = math.log(2.0)
GAP = 0.6  # reward_pos - reward_neg of every pair of capo_sd3_pairs
METRICS = {"loss", "implicit_acc", "reward_margin", "target_margin", "grad_norm"}
METRICS |= {"model_mse_pos", "model_mse_neg", "ref_mse_pos", "ref_mse_neg"}
PROMPT = "a photo of a red ball"


def sd3_flags(tmp_path, *extra):
    """train_capo_sd3.parse_args for flags that pass its checks (the model is a hub id, never loaded here)."""
    (tmp_path / "data").mkdir(exist_ok=True)
    argv = ["--dataset_name", tmp_path / "data", "--output_dir", tmp_path / "out", "--seed", 0, *extra]
    return train_capo_sd3.parse_args([str(arg) for arg in argv])


# ----------------------------------------------------------------------------------------------
# Fast: no launch
# ----------------------------------------------------------------------------------------------
def test_defaults_are_the_papers_sd3_medium_settings(tmp_path):
    for objective, beta in {"capo": 50, "ipo": 100, "dpo": 200}.items():  # the middle of each App. B.2 sweep
        assert sd3_flags(tmp_path, "--objective", objective).beta_capo == beta
    args = sd3_flags(tmp_path)
    assert (args.sigmoid_bias, args.loss_weighting, args.log_snr_range) == (-1.0, "sigmoid", [-10.0, 10.0])
    assert (args.learning_rate, args.lr_warmup_steps, args.adam_weight_decay, args.max_grad_norm) == (
        1.5e-5,
        1000,
        0,
        0,
    )
    assert args.weighting_scheme is None  # no sigma density: lambda is uniform (App. A.3)
    constant = sd3_flags(tmp_path, "--loss_weighting", "constant")  # Table 6's constant row: the same draw
    assert (constant.weighting_scheme, constant.log_snr_range) == (None, [-10.0, 10.0])
    density = sd3_flags(tmp_path, "--loss_weighting", "constant", "--weighting_scheme", "logit_normal")
    assert (density.log_snr_range, density.logit_mean, density.logit_std, density.mode_scale) == (None, 0, 1, 1.29)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--weighting_scheme", "uniform"], "pass --loss_weighting constant with it, or drop it"),
        (["--logit_std", 2], "--logit_std shapes the sigma density of --weighting_scheme, and none is given"),
        (["--loss_weighting", "constant", "--weighting_scheme", "mode", "--log_snr_range", -5, 5], "give one of them"),
        (["--log_snr_range", 3, -3], "--log_snr_range must be LOW HIGH with LOW < HIGH, got 3 -3"),
        (["--beta_capo", 0], "the paper's SD3-M sweep for capo: (30, 50, 100)"),
    ],
)
def test_a_flag_the_chosen_draw_does_not_read_is_refused_not_ignored(tmp_path, extra, message, capsys):
    (tmp_path / "data").mkdir()
    argv = ["--dataset_name", tmp_path / "data", "--output_dir", tmp_path / "out", *extra]
    assert message in parse_args_refusal("train_capo_sd3", argv, capsys)


@pytest.mark.parametrize(
    "script,found,sibling",
    [
        (SCRIPT, "StableDiffusionXLPipeline", "train_capo.py"),
        (SCRIPT, "StableDiffusionPipeline", "train_capo.py"),
        ("train_capo.py", "StableDiffusion3Pipeline", "train_capo_sd3.py"),
    ],
)
def test_a_pipeline_of_the_other_family_names_the_script_that_trains_it(tmp_path, script, found, sibling):
    line = other_family_refusal(script, found, tmp_path)
    assert f"is a {found}" in line and f"train it with {sibling}" in line


def test_the_objective_is_train_capos_function():
    """The same pure function as train_capo.py's (a copy by design), so tests/scripts/test_capo.py's checks of its
    values at initialisation and of a hand-computed case hold here: values, metrics and gradients agree."""
    generator = torch.Generator().manual_seed(0)
    errors = torch.rand(4, 16, generator=generator) * 3
    weights, rewards = torch.rand(2, 16, generator=generator), torch.rand(2, 16, generator=generator)
    for objective in ("capo", "dpo", "ipo"):
        results = []
        for script in (train_capo_sd3, train_capo):
            model_losses = errors.clone().requires_grad_(True)
            loss, metrics = script.capo_loss(*model_losses, *weights, *rewards, beta=50.0, objective=objective)
            loss.backward()
            results.append((loss, metrics, model_losses.grad))
        (loss, metrics, grad), (other_loss, other_metrics, other_grad) = results
        assert torch.equal(loss, other_loss) and torch.equal(grad, other_grad) and grad.abs().sum() > 0
        assert metrics.keys() == other_metrics.keys()
        assert all(torch.equal(metrics[name], other_metrics[name]) for name in metrics), objective


def draw_args(**overrides):
    values = {
        "loss_weighting": "sigmoid",
        "log_snr_range": [-10.0, 10.0],
        "shared_noise": False,
        "weighting_scheme": None,
    }
    values |= {"precondition_outputs": False, "sigmoid_bias": -1.0}
    return argparse.Namespace(**(values | overrides))


def test_lambda_is_uniform_on_its_range_and_sigma_is_its_flow_noise_level():
    latents = torch.randn(2 * 512, 4, 2, 2)  # 512 pairs: positives, then negatives
    generators = sample_generators(0, 0, range(512))
    noisy, sigmas, target = train_capo_sd3.noisy_pair_latents(None, latents, generators, draw_args())
    lam = flow_matching_log_snr(sigmas)
    assert torch.equal(sigmas[:512], sigmas[512:])  # one lambda per pair, shared by its images
    assert lam.min() >= -10.0 - 1e-3 and lam.max() <= 10.0 + 1e-3
    assert abs(lam.mean()) < 0.8 and lam.std().item() == pytest.approx(20 / math.sqrt(12), rel=0.1)  # U[-10, 10]
    assert (lam[:512] < -5).float().mean() == pytest.approx(0.25, abs=0.06)  # a quarter below -5: not clustered
    # x_sigma = (1 - sigma) x0 + sigma eps and the target is the velocity eps - x0
    s = sigmas.view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - s) * latents + s * (target + latents))


def test_independent_noise_by_default_and_one_draw_for_both_images_with_shared_noise():
    latents = torch.randn(2 * 8, 4, 2, 2)
    draws = {}
    for shared in (False, True):
        generators = sample_generators(0, 0, range(8))
        _, _, target = train_capo_sd3.noisy_pair_latents(None, latents, generators, draw_args(shared_noise=shared))
        draws[shared] = (target + latents).chunk(2)  # the noise of the positives and of the negatives
    torch.testing.assert_close(draws[False][0], draws[True][0])  # the positive's draw is the same either way
    torch.testing.assert_close(draws[True][0], draws[True][1])
    assert (draws[False][0] - draws[False][1]).abs().mean() > 0.5  # two standard normal draws


def test_the_weight_is_app_a3s_flow_weight_of_each_images_log_snr():
    sigmas = torch.tensor([0.01, 0.3, 0.5, 0.8, 0.99])
    lam = 2 * torch.log((1 - sigmas) / sigmas)
    expected = 1 / (torch.exp((lam + 1) / 2) + torch.exp(-(lam + 1) / 2))  # b = -1
    torch.testing.assert_close(train_capo_sd3.loss_weights(sigmas, draw_args()), expected)
    assert torch.equal(train_capo_sd3.loss_weights(sigmas, draw_args(loss_weighting="constant")), torch.ones(5))


# ----------------------------------------------------------------------------------------------
# Slow: the launches
# ----------------------------------------------------------------------------------------------
FIRST_STEP_RUNS = {  # name: (objective, flags); each a one-step run on capo_pairs
    "lora-capo": ("capo", ["--lora_rank", 4, "--learning_rate", 1e-3, "--validation_prompts", PROMPT]),
    "full-dpo": ("dpo", ["--learning_rate", 1e-4, "--cache_latents", "--shared_noise"]),
}


@pytest.fixture(scope="module")
def first_step_run(tiny_sd3, capo_pairs, tmp_path_factory):
    """run(name): FIRST_STEP_RUNS[name] launched once for the module: its output folder, output and flags."""
    runs = {}

    def run(name):
        if name not in runs:
            objective, extra = FIRST_STEP_RUNS[name]
            output_dir = tmp_path_factory.mktemp(name)
            args = tiny_args({"model": str(tiny_sd3), "dataset": capo_pairs}, output_dir, "--max_train_steps", 1)
            if "--validation_prompts" in extra:  # and validation by reward, keeping the best step's LoRA
                (output_dir / "prompts.txt").write_text(f"{PROMPT}\na photo of a blue ball\n")
                extra = [*extra, "--validation_inference_steps", 2, "--validation_reward_models", "toy_ball"]
                extra += ["--validation_images_per_prompt", 2, "--validation_reward_prompts"]
                extra += [output_dir / "prompts.txt", "--keep_best_checkpoint"]
            result = launch(SCRIPT, [*args, "--objective", objective, *extra])
            runs[name] = {"dir": output_dir, "stdout": result.stdout, "extra": extra}
        return runs[name]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("name,expected", [("lora-capo", GAP**2), ("full-dpo", LOG2)])
def test_first_step_loss_is_each_objectives_value_at_initialisation(first_step_run, name, expected):
    objective, _ = FIRST_STEP_RUNS[name]
    run = first_step_run(name)
    output_dir, extra, log = run["dir"], run["extra"], run["stdout"]
    summary = summary_of(output_dir)
    first = summary["last_step_metrics"]  # one step: the metrics at initialisation
    assert set(first) == METRICS
    assert first["loss"] == pytest.approx(expected, abs=1e-6) and first["reward_margin"] == pytest.approx(0, abs=1e-6)
    assert first["target_margin"] == pytest.approx(GAP, abs=1e-6)
    assert first["model_mse_pos"] == pytest.approx(first["ref_mse_pos"], abs=1e-6)
    assert summary["skipped_rows"] == {"non_finite_reward": 1, "identical_images": 1}
    assert summary["objective"] == objective and summary["method"] == "capo"
    assert "Found a StableDiffusion3Pipeline (SD3 family)" in log
    assert (
        f"tags: [sd3, stable-diffusion-3, text-to-image, diffusers, capo, {objective}]"
        in (output_dir / "README.md").read_text()
    )
    assert (summary["sigmoid_bias"], summary["log_snr_range"]) == (-1.0, [-10.0, 10.0])
    assert "lambda ~ U[-10, 10] with sigmoid weighting b = -1, " in log
    if "--validation_prompts" in extra:
        assert (output_dir / "validation" / "step-000001.png").is_file()
        assert list(summary["validation_win_rates"]) == ["0", "1"] and summary["validation_win_rates"]["0"] == 0.5
        assert (output_dir / "best" / "pytorch_lora_weights.safetensors").is_file()
    weights = "pytorch_lora_weights.safetensors" if "--lora_rank" in extra else "transformer/config.json"
    assert (output_dir / weights).is_file()


@pytest.mark.slow
def test_shared_noise_changes_the_negatives_draw_only(first_step_run):
    # The reference's errors do not depend on the objective: with independent noise (lora-capo) the positive's
    # error equals the shared-noise run's (full-dpo), the negative's does not.
    independent = summary_of(first_step_run("lora-capo")["dir"])["last_step_metrics"]
    shared = summary_of(first_step_run("full-dpo")["dir"])["last_step_metrics"]
    assert independent["ref_mse_pos"] == pytest.approx(shared["ref_mse_pos"], rel=1e-5)
    assert independent["ref_mse_neg"] != pytest.approx(shared["ref_mse_neg"], rel=1e-3)


@pytest.fixture(scope="module")
def lora_runs(tiny_sd3, capo_pairs, tmp_path_factory):
    """A 4-step LoRA run (checkpoints at 2 and 4) and its resumption from a copy of checkpoint-2, with the IPO
    objective, no weighting and sigma from diffusers' `mode` density (the first-step runs take the defaults' draw)."""
    assets = {"model": str(tiny_sd3), "dataset": capo_pairs}
    common = ["--max_train_steps", 4, "--lora_rank", 4, "--learning_rate", 5e-2, "--checkpointing_steps", 2]
    common += ["--train_batch_size", 2, "--objective", "ipo", "--loss_weighting", "constant"]
    common += ["--weighting_scheme", "mode"]
    output_dir = tmp_path_factory.mktemp("capo-sd3-lora")
    launch(SCRIPT, tiny_args(assets, output_dir, *common))
    resumed = tmp_path_factory.mktemp("capo-sd3-lora-resumed")
    shutil.copytree(output_dir / "checkpoint-2", resumed / "checkpoint-2")
    log = launch(SCRIPT, tiny_args(assets, resumed, *common, "--resume_from_checkpoint", "latest")).stdout
    return {"output_dir": output_dir, "resumed": resumed, "resumed_log": log}


@pytest.mark.slow
def test_resumed_lora_run_ends_with_the_weights_of_the_uninterrupted_one(lora_runs):
    assert f"Resuming from {lora_runs['resumed'] / 'checkpoint-2'}" in lora_runs["resumed_log"]
    assert "IPO (CaPO Eq. 22) (beta = 100, sigma ~ mode with no weighting" in lora_runs["resumed_log"]
    summary = summary_of(lora_runs["resumed"])
    assert (summary["objective"], summary["weighting_scheme"], summary["log_snr_range"]) == ("ipo", "mode", None)
    assert_same_tensors(
        load_file(lora_runs["output_dir"] / "pytorch_lora_weights.safetensors"),
        load_file(lora_runs["resumed"] / "pytorch_lora_weights.safetensors"),
    )


@pytest.mark.slow
def test_saved_lora_loads_in_the_stock_sd3_pipeline_and_changes_its_images(tiny_sd3, lora_runs):
    weights = load_file(lora_runs["output_dir"] / "pytorch_lora_weights.safetensors")
    assert any(".attn.add_q_proj." in key for key in weights)  # the context stream's projections are trained too
    rank, change = sd3_lora_change(tiny_sd3, lora_runs["output_dir"], PROMPT)
    assert rank == 4 and change > 4e-3  # a level of an 8-bit image or more
