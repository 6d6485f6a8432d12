"""train_diffusion_dpo_sd3.py runs as users run it: `accelerate launch` on the tiny SD3 pipeline (conftest `tiny_sd3`)
and the tiny Pick-a-Pic dataset. Four launches, shared by the tests: a LoRA run, its resumption, a full fine-tune and
the same full fine-tune in two processes."""

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from kit import (
    assert_same_tensors,
    launch,
    max_abs_diff,
    one_line_error,
    run_python,
    scalar_events,
    scalar_tags,
    summary_of,
    tiny_args,
)
from safetensors.torch import load_file


SCRIPT = "train_diffusion_dpo_sd3.py"
DPO_METRICS = {"loss", "implicit_acc", "reward_margin", "model_mse_w", "model_mse_l", "ref_mse_w", "ref_mse_l"}
LORA = ["--lora_rank", 4, "--learning_rate", 1e-2, "--max_train_steps", 4, "--checkpointing_steps", 2]
# Full fine-tuning on the latents cache, also run in two processes (which reuse the cache): --adam_epsilon 1e-3 as
# in test_scaling.py, so that float round-off of near-zero gradients (which Adam's first steps divide by |g| + eps)
# does not hide a wrong shard.
FULL = ["--learning_rate", 1e-3, "--adam_epsilon", 1e-3, "--max_train_steps", 3]
FULL += ["--cache_latents", "--max_train_samples", 16]
PROMPT = "a photo of a red ball"
# Validation by reward in the full run: toy_ball judges 2 prompts x 2 images (2 steps, no guidance) at every step, and
# best/ keeps the best step's transformer. Measured: win-rates 0.5, 0.625, 0.375, 0.625 at steps 0 to 3 (best step 1,
# the earliest of equal ones); it adds about 0.5 s to the run.
REWARD_PROMPTS = ["a photo of a red ball", "a photo of a blue ball"]
REWARD_VALIDATION = ["--validation_reward_models", "toy_ball", "--validation_images_per_prompt", 2]
REWARD_VALIDATION += ["--validation_steps", 1, "--validation_inference_steps", 2, "--validation_guidance_scale", 1]
REWARD_VALIDATION += ["--keep_best_checkpoint"]


@pytest.fixture(scope="module")
def sd3_assets(tiny_sd3, tiny_assets):
    """kit.tiny_args' assets with the tiny SD3 pipeline as the model."""
    return {"model": str(tiny_sd3), "dataset": tiny_assets["dataset"]}


# Fast: no launch
def pipeline_folder(folder, class_name):
    """A pipeline folder as far as the family check reads it: model_index.json naming `class_name`."""
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name, "_diffusers_version": "0.42.1"}))
    return folder


def test_an_sdxl_folder_given_to_the_sd3_script_names_the_sdxl_script(tmp_path):
    model = pipeline_folder(tmp_path / "sdxl", "StableDiffusionXLPipeline")
    result = run_python(SCRIPT, ["--pretrained_model_name_or_path", model, "--output_dir", tmp_path / "out"])
    line = one_line_error(result)
    assert "is a StableDiffusionXLPipeline" in line and "train it with train_diffusion_dpo_sdxl.py" in line


def test_an_sd3_folder_given_to_the_sdxl_script_names_the_sd3_script(tmp_path):
    model = pipeline_folder(tmp_path / "sd3", "StableDiffusion3Pipeline")
    args = ["--pretrained_model_name_or_path", model, "--output_dir", tmp_path / "out"]
    line = one_line_error(run_python("train_diffusion_dpo_sdxl.py", args))
    assert "is a StableDiffusion3Pipeline" in line and "train it with train_diffusion_dpo_sd3.py" in line


def test_weighting_schemes_are_utils_timestep_samplings():
    import train_diffusion_dpo_sd3
    from utils.diffusion import FLOW_TIMESTEP_SAMPLINGS

    assert train_diffusion_dpo_sd3.WEIGHTING_SCHEMES == FLOW_TIMESTEP_SAMPLINGS


@pytest.mark.parametrize("precondition", [False, True], ids=["velocity", "preconditioned"])
def test_winner_and_loser_share_sigma_and_noise_and_the_target_is_the_flow_one(precondition):
    from argparse import Namespace

    from diffusers import FlowMatchEulerDiscreteScheduler

    from train_diffusion_dpo_sd3 import noisy_pair_inputs, transformer_prediction
    from utils.diffusion import sample_generators, shift_sigmas

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    args = Namespace(weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
    args.precondition_outputs = precondition
    latents = torch.randn(6, 16, 8, 8)  # 3 winners, then 3 losers
    embeds, pooled = torch.randn(3, 5, 4), torch.randn(3, 2)
    generators = sample_generators(0, 0, [7, 8, 9])
    noisy, sigmas, conditioning, target = noisy_pair_inputs(scheduler, latents, embeds, pooled, generators, args)
    s = sigmas.view(-1, 1, 1, 1)
    noise = (noisy - (1 - s) * latents) / s
    assert torch.equal(sigmas[:3], sigmas[3:]) and torch.allclose(noise[:3], noise[3:], atol=1e-5)
    assert all(any(abs(sigma - table) < 1e-6 for table in scheduler.sigmas.tolist()) for sigma in sigmas.tolist())
    assert sigmas.min() >= shift_sigmas(torch.tensor(1 / 1000), 3.0)  # never 0: the table's last entry at most
    assert torch.equal(conditioning["encoder_hidden_states"], embeds.repeat(2, 1, 1))
    velocity = noise - latents

    def perfect_transformer(hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict):
        assert torch.allclose(timestep, sigmas * 1000)
        return (velocity,)

    prediction = transformer_prediction(perfect_transformer, noisy, sigmas, conditioning, precondition, 1000)
    assert torch.allclose(prediction, target, atol=1e-5)  # a perfect velocity meets the target in either space
    assert torch.allclose(target, latents if precondition else velocity, atol=1e-5)


@pytest.mark.parametrize("with_t5", [True, False], ids=["t5", "no-t5"])
def test_prompt_embeddings_equal_the_stock_pipelines(tiny_sd3, with_t5):
    from diffusers import StableDiffusion3Pipeline

    from train_diffusion_dpo_sd3 import encode_prompts

    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    if not with_t5:
        pipeline.text_encoder_3, pipeline.tokenizer_3 = None, None  # as a pipeline folder saved without T5 loads
    prompts = [PROMPT, "a photo of a blue ball at the top"]
    with torch.no_grad():  # as the script encodes (T5's kernels round differently with autograd on)
        expected, _, expected_pooled, _ = pipeline.encode_prompt(
            prompts, prompts, prompts, do_classifier_free_guidance=False, max_sequence_length=77
        )
    encoders = [pipeline.text_encoder, pipeline.text_encoder_2, pipeline.text_encoder_3]
    tokenizers = [pipeline.tokenizer, pipeline.tokenizer_2, pipeline.tokenizer_3]
    embeds, pooled = encode_prompts(encoders, tokenizers, prompts, 77, pipeline.transformer.config.joint_attention_dim)
    assert embeds.shape == expected.shape and torch.equal(embeds, expected) and torch.equal(pooled, expected_pooled)


# Slow: the launches
@pytest.fixture(scope="module")
def lora_run(sd3_assets, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("sd3-lora")
    extra = ["--report_to", "tensorboard", "--validation_prompts", PROMPT, "--validation_steps", 2]
    extra += ["--validation_inference_steps", 2, "--preference_eval_split", "test"]
    extra += ["--preference_eval_max_samples", 8, "--preference_eval_timesteps", 2]
    result = launch(SCRIPT, tiny_args(sd3_assets, output_dir, *LORA, *extra))
    return output_dir, result.stdout


@pytest.fixture(scope="module")
def full_run(sd3_assets, tmp_path_factory):
    """The full fine-tune on the latents cache, with validation by reward (the reward prompts' embeddings are encoded
    before the text encoders are freed)."""
    output_dir = tmp_path_factory.mktemp("sd3-full")
    prompts = tmp_path_factory.mktemp("sd3-full-prompts") / "prompts.txt"
    prompts.write_text("\n".join(REWARD_PROMPTS) + "\n")
    validation = [*REWARD_VALIDATION, "--validation_reward_prompts", prompts]
    result = launch(SCRIPT, tiny_args(sd3_assets, output_dir, *FULL, "--report_to", "tensorboard", *validation))
    return output_dir, result.stdout


def render(pipeline):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(
        PROMPT,
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images


def first_loss_is_log2(output_dir):
    tags = scalar_tags(output_dir / "logs")
    assert DPO_METRICS <= set(tags)
    # Step 1 is computed before any update: policy == reference, so the logit is 0 and the loss log 2.
    assert tags["loss"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert tags["model_mse_w"][0] == pytest.approx(tags["ref_mse_w"][0], abs=1e-6)
    assert tags["loss"][-1] != pytest.approx(math.log(2), abs=1e-4)  # and it moved: the runs trained


@pytest.mark.slow
def test_lora_run_starts_at_log2_and_writes_lora_card_summary_and_validation(lora_run):
    output_dir, log = lora_run
    first_loss_is_log2(output_dir)
    weights = load_file(output_dir / "pytorch_lora_weights.safetensors")
    assert weights and all(key.startswith("transformer.") and "lora" in key for key in weights)
    assert any(".attn.add_q_proj." in key for key in weights)  # the context stream's projections are trained too
    assert not (output_dir / "transformer").exists()
    card = (output_dir / "README.md").read_text()
    assert "Diffusion-DPO (beta_dpo = 400)" in card and "sd3" in card and "train_diffusion_dpo_sd3.py" in card
    summary = summary_of(output_dir)
    assert summary["weighting_scheme"] == "logit_normal" and summary["global_step"] == 4
    assert set(summary["peak_memory_by_phase_bytes"]) == {"training", "validation"}
    assert "== Diffusion-DPO finished: 4 optimizer steps" in log and "dropped ties: 4" in log
    from PIL import Image

    grids = sorted((output_dir / "validation").glob("step-*.png"))
    assert [p.name for p in grids] == ["step-000002.png", "step-000004.png"]
    assert Image.open(grids[-1]).size == (128, 64)  # base | trained, one row per prompt


@pytest.mark.slow
def test_heldout_accuracy_is_logged_before_training_at_validation_steps_and_at_the_end(lora_run):
    output_dir, _ = lora_run
    logged = scalar_events(output_dir / "logs")["heldout_preference_accuracy"]
    assert [step for step, _ in logged] == [0, 2, 4]
    assert logged[0][1] == pytest.approx(summary_of(output_dir)["heldout_preference_accuracy_before"])


@pytest.mark.slow
def test_resumed_lora_run_ends_with_the_weights_of_the_uninterrupted_one(sd3_assets, lora_run, tmp_path):
    uninterrupted, _ = lora_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(uninterrupted / "checkpoint-2", resumed / "checkpoint-2")
    args = tiny_args(sd3_assets, resumed, *LORA, "--resume_from_checkpoint", "checkpoint-2")
    result = launch(SCRIPT, args)
    assert f"Resuming from {resumed / 'checkpoint-2'}" in result.stdout
    assert_same_tensors(
        load_file(uninterrupted / "pytorch_lora_weights.safetensors"),
        load_file(resumed / "pytorch_lora_weights.safetensors"),
    )


@pytest.mark.slow
def test_saved_lora_loads_in_the_stock_sd3_pipeline_and_changes_its_images(sd3_assets, lora_run):
    from diffusers import StableDiffusion3Pipeline

    output_dir, _ = lora_run
    pipeline = StableDiffusion3Pipeline.from_pretrained(sd3_assets["model"])
    before = render(pipeline)
    pipeline.load_lora_weights(str(output_dir))
    (config,) = pipeline.transformer.peft_config.values()
    assert config.r == 4
    assert abs(render(pipeline) - before).max() > 1e-3


@pytest.mark.slow
def test_full_run_starts_at_log2_and_its_transformer_loads_and_changes_images(sd3_assets, full_run):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    output_dir, _ = full_run
    first_loss_is_log2(output_dir)
    assert not (output_dir / "pytorch_lora_weights.safetensors").exists()
    pipeline = StableDiffusion3Pipeline.from_pretrained(sd3_assets["model"])
    before = render(pipeline)
    pipeline.transformer = SD3Transformer2DModel.from_pretrained(output_dir, subfolder="transformer")
    assert abs(render(pipeline) - before).max() > 1e-3


@pytest.mark.slow
def test_validation_by_reward_logs_win_rates_from_step_0_and_best_holds_the_best_steps_transformer(
    sd3_assets, full_run, tmp_path
):
    output_dir, log = full_run
    summary = summary_of(output_dir)
    win_rates = {int(step): value for step, value in summary["validation_win_rates"].items()}
    assert list(win_rates) == [0, 1, 2, 3] and win_rates[0] == 0.5  # the base against itself
    assert dict(scalar_events(output_dir / "logs")["validation/win_rate"]) == pytest.approx(win_rates)
    metrics = summary["validation_reward_metrics"]["3"]
    assert set(metrics) == {"win_rate", "win_rate_toy_ball", "reward_toy_ball", "unscored_toy_ball"}
    assert metrics["unscored_toy_ball"] == 0  # every image scored
    logged = re.findall(r"Step (\d+): validation win-rate against the base [0-9.]+: toy_ball [0-9.]+ \(mean", log)
    assert logged == ["0", "1", "2", "3"]
    best = summary["best_checkpoint"]
    assert best == max(sorted(win_rates), key=lambda step: win_rates[step])  # the earliest of equal ones
    assert f"best step {best}, its weights in {output_dir / 'best'}" in log
    assert sorted(path.name for path in (output_dir / "best").iterdir()) == ["transformer"]  # the final layout
    # generate.py draws best/ with the validation's prompts, seeds and sampler (the script's T5 length), in this
    # process as kit.generate_and_judge runs it; toy_ball judges the images: the best step's mean reward again.
    from examples.eval import generate
    from examples.tiny_world.report import judge_run

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(REWARD_PROMPTS) + "\n")
    args = ["--pretrained_model_name_or_path", sd3_assets["model"], "--prompts", prompts, "--images_per_prompt", 2]
    args += ["--seed", 0, "--resolution", 64, "--num_inference_steps", 2, "--guidance_scale", 1]
    args += ["--max_sequence_length", 77, "--batch_size", 2, "--output_dir", tmp_path / "generated"]
    args += ["--model_name", "best", "--transformer_path", output_dir / "best"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script ran (OMP_NUM_THREADS=1)
    try:
        generate.main(generate.parse_args([str(arg) for arg in args]))
    finally:
        torch.set_num_threads(threads)
    verdicts = judge_run(tmp_path / "generated" / "best")
    assert len(verdicts) == 4
    drawn = sum(verdict["score"] for verdict in verdicts.values()) / len(verdicts)
    assert drawn == pytest.approx(summary["validation_reward_metrics"][str(best)]["reward_toy_ball"], abs=1e-6)


@pytest.fixture(scope="module")
def two_process_run(sd3_assets, full_run, tmp_path_factory):
    """The full run again in 2 processes x 2 pairs (the same global batch), after full_run has built the cache."""
    output_dir = tmp_path_factory.mktemp("sd3-full-two-processes")
    args = tiny_args(sd3_assets, output_dir, *FULL)
    args[args.index("--train_batch_size") + 1] = 2
    return output_dir, launch(SCRIPT, args, num_processes=2).stdout


@pytest.mark.slow
def test_two_processes_reach_the_weights_of_one_with_the_same_global_batch(sd3_assets, full_run, two_process_run):
    # The same pairs per step, the same sigma and noise per pair (keyed by seed, epoch and pair index), gradients
    # averaged over processes.
    (one, _), (two, log) = full_run, two_process_run
    assert "total batch (parallel, accumulation) = 4" in log and "weights identical on all processes: yes" in log
    base = transformer_weights(sd3_assets["model"])
    assert max_abs_diff(transformer_weights(one), base) > 1e-5  # the runs trained: equality is not the start's
    assert max_abs_diff(transformer_weights(one), transformer_weights(two)) < 5e-6


@pytest.mark.slow
def test_a_reused_latents_cache_loads_no_text_encoder(full_run, two_process_run):
    (_, built), (_, reused) = full_run, two_process_run
    assert "--cache_latents: building" in built and "no text encoder was loaded" not in built
    assert "--cache_latents: reusing" in reused and "no text encoder was loaded" in reused


def transformer_weights(folder):
    """The tensors of a pipeline's or a full fine-tune's transformer/, as stored."""
    return load_file(Path(folder, "transformer", "diffusion_pytorch_model.safetensors"))
