"""train_ddspo_sana.py: DDSPO on SANA, as the authors' release trains it (uniform sigmas, velocities compared, Gemma2
after the pipeline's complex human instruction, the reference as the transformer with its LoRA off).

Fast tests: the release's defaults, the families refused both ways, the prompt encoding. Launches, on the tiny SANA
pipeline (conftest `tiny_sana`) and the tiny DDSPO rows (conftest `ddspo_pairs`): a 2-step LoRA run whose first logged
loss is log 2, resumed from its checkpoint to the same weights, which load in the stock SanaPipeline and change its
images; and a one-step full fine-tuning run on a --cache_latents cache (not_paired), whose loss is log 2. No learning
test: the tiny world has no SANA base (its DC-AE is not fitted)."""

import inspect
import math
import shutil

import pytest
import torch
from kit import (
    assert_same_tensors,
    launch,
    other_family_refusal,
    parse_args_refusal,
    scalar_events,
    summary_of,
    tiny_args,
)
from safetensors.torch import load_file

import train_ddspo_sana


SCRIPT = "train_ddspo_sana.py"
LOG2 = math.log(2.0)
PROMPT = "a photo of a red ball"


def test_defaults_are_the_authors_sana_release(tmp_path):
    (tmp_path / "data").mkdir()
    argv = ["--dataset_name", tmp_path / "data", "--output_dir", tmp_path / "out"]
    args = train_ddspo_sana.parse_args([str(arg) for arg in argv])
    assert (args.beta_ddspo, args.weighting_scheme, args.precondition_outputs) == (1000, "uniform", False)
    assert (args.learning_rate, args.resolution, args.lr_warmup_steps) == (4e-8, 1024, 0)
    assert (args.max_sequence_length, args.complex_human_instruction) == (300, True)
    assert args.pretrained_model_name_or_path == "Efficient-Large-Model/Sana_600M_1024px_diffusers"


def test_a_resolution_the_dc_ae_cannot_downsample_is_refused(tmp_path, capsys):
    argv = ["--dataset_name", tmp_path, "--output_dir", tmp_path / "out", "--resolution", 48]
    assert "--resolution must be a positive multiple of 32" in parse_args_refusal("train_ddspo_sana", argv, capsys)


@pytest.mark.parametrize(
    "script,found,sibling",
    [
        (SCRIPT, "StableDiffusion3Pipeline", "train_ddspo_sd3.py"),
        (SCRIPT, "StableDiffusionXLPipeline", "train_ddspo.py"),
        ("train_ddspo_sd3.py", "SanaPipeline", SCRIPT),
        ("train_ddspo.py", "SanaPipeline", SCRIPT),
    ],
)
def test_a_pipeline_of_another_family_names_the_script_that_trains_it(tmp_path, script, found, sibling):
    line = other_family_refusal(script, found, tmp_path)
    assert f"is a {found}" in line and f"train it with {sibling}" in line


def test_prompts_are_encoded_after_the_pipelines_instruction_unless_told_not_to(tiny_sana):
    """The conditioning is the stock pipeline's for the prompt it samples: Gemma2 reads the pipeline's complex human
    instruction first, and 300 positions are kept whatever the length (the first token and the last 299, so the
    instruction is read by Gemma2's causal attention, not attended to by the transformer); without it (the script's
    --no-complex_human_instruction) the bare prompt is encoded, and the attended embeddings change."""
    from diffusers import SanaPipeline

    pipeline = SanaPipeline.from_pretrained(tiny_sana)
    prompts, instruction = [PROMPT, "a blue ball"], train_ddspo_sana.COMPLEX_HUMAN_INSTRUCTION
    assert instruction == call_default(SanaPipeline, "complex_human_instruction") and len(instruction) > 5
    stock, stock_mask, _, _ = pipeline.encode_prompt(
        prompts, do_classifier_free_guidance=False, complex_human_instruction=instruction
    )
    embeds, mask = train_ddspo_sana.encode_prompts(pipeline, prompts, 300, instruction)
    assert torch.equal(embeds, stock) and torch.equal(mask, stock_mask)
    assert embeds.shape == (2, 300, pipeline.text_encoder.config.hidden_size) and mask.shape == (2, 300)
    bare, bare_mask = train_ddspo_sana.encode_prompts(pipeline, prompts, 300, None)
    assert bare.shape == embeds.shape
    attended, bare_attended = embeds * mask[..., None], bare * bare_mask[..., None]
    assert (mask.sum(dim=1) > 1).all() and not torch.allclose(bare_attended, attended, atol=1e-3)


def call_default(pipeline_class, name):
    return inspect.signature(pipeline_class.__call__).parameters[name].default


# ----------------------------------------------------------------------------------------------
# Slow: the launches
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_runs(tiny_sana, ddspo_pairs, tmp_path_factory):
    """A 2-step LoRA run (paired; a checkpoint every step; tensorboard; validation images of one prompt at the start
    and the end) and its resumption from a copy of checkpoint-1."""
    assets = {"model": str(tiny_sana), "dataset": ddspo_pairs}
    common = ["--max_train_steps", 2, "--lora_rank", 4, "--learning_rate", 5e-2, "--checkpointing_steps", 1]
    output_dir = tmp_path_factory.mktemp("ddspo-sana-lora")
    validation = ["--validation_prompts", PROMPT, "--validation_inference_steps", 2]
    log = launch(SCRIPT, [*tiny_args(assets, output_dir, *common, *validation), "--report_to", "tensorboard"]).stdout
    resumed = tmp_path_factory.mktemp("ddspo-sana-lora-resumed")
    shutil.copytree(output_dir / "checkpoint-1", resumed / "checkpoint-1")
    resumed_log = launch(SCRIPT, tiny_args(assets, resumed, *common, "--resume_from_checkpoint", "latest")).stdout
    return {"output_dir": output_dir, "log": log, "resumed": resumed, "resumed_log": resumed_log}


@pytest.mark.slow
def test_first_logged_loss_is_exactly_log2_with_the_releases_sana_settings(lora_runs):
    log = lora_runs["log"]
    assert "Found a SanaPipeline (SANA family)" in log
    assert "Training sigmas: uniform on a 1000-entry flow table with shift 1" in log
    assert "Prompts: Gemma2, 300 positions kept, after the pipeline's complex human instruction" in log
    assert "--negative_mode paired, sigma ~ uniform, constant weighting, shared noise" in log
    logged = scalar_events(lora_runs["output_dir"] / "logs")
    first = {name: logged[name][0] for name in ("loss", "reward_margin", "model_mse_w", "model_mse_l", "ref_mse_l")}
    assert all(step == 1 for step, _ in first.values())
    first = {name: value for name, (_, value) in first.items()}
    assert first["loss"] == pytest.approx(LOG2, abs=1e-6) and first["reward_margin"] == pytest.approx(0, abs=1e-5)
    assert first["model_mse_w"] == pytest.approx(0, abs=1e-9)  # the policy is the reference: tgt_w is its output
    assert first["model_mse_l"] == pytest.approx(first["ref_mse_l"], rel=1e-5)
    assert first["ref_mse_l"] > 1e-7  # tgt_l is the reference under c-, the policy is conditioned on c
    assert logged["loss"][1][1] != pytest.approx(LOG2, abs=1e-6)  # the second step trains a changed model
    skipped = {"empty_negative": 1, "negative_equals_caption": 1}
    summary = summary_of(lora_runs["output_dir"])
    assert {reason: count for reason, count in summary["skipped_rows"].items() if count} == skipped
    card = (lora_runs["output_dir"] / "README.md").read_text()
    assert "tags: [sana, text-to-image, diffusers, ddspo]" in card and "SanaPipeline.load_lora_weights" in card
    assert (lora_runs["output_dir"] / "validation" / "step-000002.png").is_file()


@pytest.mark.slow
def test_resumed_lora_run_ends_with_the_weights_of_the_uninterrupted_one(lora_runs):
    assert f"Resuming from {lora_runs['resumed'] / 'checkpoint-1'}" in lora_runs["resumed_log"]
    assert_same_tensors(
        load_file(lora_runs["output_dir"] / "pytorch_lora_weights.safetensors"),
        load_file(lora_runs["resumed"] / "pytorch_lora_weights.safetensors"),
    )


@pytest.mark.slow
def test_saved_lora_loads_in_the_stock_sana_pipeline_and_changes_its_images(tiny_sana, lora_runs):
    from diffusers import SanaPipeline

    def render(pipeline):
        pipeline.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)
        kwargs = {"num_inference_steps": 2, "height": 64, "width": 64, "use_resolution_binning": False}
        return pipeline(PROMPT, output_type="np", generator=generator, **kwargs).images

    pipeline = SanaPipeline.from_pretrained(tiny_sana)
    before = render(pipeline)
    pipeline.load_lora_weights(lora_runs["output_dir"])
    (config,) = pipeline.transformer.peft_config.values()
    assert config.r == 4 and set(config.target_modules) == {"to_q", "to_k", "to_v"}
    assert float(abs(render(pipeline) - before).max()) > 1e-3


@pytest.mark.slow
def test_full_fine_tuning_on_a_cache_starts_at_log2_without_the_instruction(tiny_sana, ddspo_pairs, tmp_path):
    """not_paired (c- the rand-removal of c, the loser the next pair's winner), the transformer trained in full against
    a frozen copy, on --cache_latents, with bare prompts: the first loss is log 2 and the transformer is saved."""
    extra = ["--max_train_steps", 1, "--learning_rate", 1e-4, "--negative_mode", "not_paired", "--cache_latents"]
    extra += ["--no-complex_human_instruction", "--latents_cache_dir", tmp_path / "cache"]
    log = launch(SCRIPT, tiny_args({"model": str(tiny_sana), "dataset": ddspo_pairs}, tmp_path / "out", *extra)).stdout
    assert "--cache_latents: building" in log and "Prompts: Gemma2, 300 positions kept, bare" in log
    first = summary_of(tmp_path / "out")["last_step_metrics"]
    assert first["loss"] == pytest.approx(LOG2, abs=1e-6) and first["model_mse_w"] == pytest.approx(0, abs=1e-9)
    assert first["ref_mse_l"] > 1e-7
    assert (tmp_path / "out" / "transformer" / "config.json").is_file()
