#!/usr/bin/env python
"""CaPO (Calibrated Preference Optimization, Lee et al. 2025) for Stable Diffusion 3 and 3.5 (flow matching), with DPO
and IPO on the same pairs for the paper's comparisons.

The sibling of train_capo.py (SDXL, SD1.x/SD2.x) for StableDiffusion3Pipeline: the same objective (docs/METHODS.md,
"CaPO") on the velocity error of rectified flow, drawn and weighted as the paper's App. A.3 does for SD3-medium
("CaPO on a flow model"). For a pair (c, x0_pos, x0_neg) with calibrated rewards R_ca in [0, 1], one log-SNR
lambda ~ U[-10, 10] and, by default, independent noise for the two images,

    sigma    = sigmoid(-lambda / 2),  x_sigma = (1 - sigma) x0 + sigma eps,  target eps - x0
    w        = 1 / (exp((lambda - b) / 2) + exp(-(lambda - b) / 2))             # --sigmoid_bias b, -1.0 (SD3-M)
    R_theta  = -w * (err(theta(x_sigma), target) - err(ref(x_sigma), target))   # per image
    logit    = beta * (R_theta(x_pos) - R_theta(x_neg))
    capo: loss = ((R_ca(x_pos) - R_ca(x_neg)) - logit)^2                         # Eq. 8
    dpo:  loss = -logsigmoid(logit)         ipo: loss = (1 - logit)^2            # Eq. 22

With LoRA the reference is the transformer with its adapters off; with full fine-tuning, a frozen copy. Example
(SD3-medium, the paper's settings: Adam, batch 256, lr 1.5e-5, 1000 warm-up steps, 5000 steps, beta 50 from the
sweep {30, 50, 100}; no weight decay and no gradient clipping, which the paper does not mention):

    accelerate launch train_capo_sd3.py \\
      --pretrained_model_name_or_path stabilityai/stable-diffusion-3-medium-diffusers --dataset_name capo-pairs-sd3 \\
      --objective capo --beta_capo 50 --train_batch_size 8 \\
      --gradient_accumulation_steps 32 --learning_rate 1.5e-5 --lr_warmup_steps 1000 --max_train_steps 5000 \\
      --gradient_checkpointing --mixed_precision bf16 --output_dir sd3-capo

(on one GPU; on 8, --gradient_accumulation_steps 4 keeps the batch of 256)
"""

import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import re
import resource
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path


class InputError(ValueError):
    """Bad flags or data: the message says what was expected, what was found and what to do."""


# utils.FLOW_TIMESTEP_SAMPLINGS, written out: flags are checked before torch is imported (a test keeps them equal)
WEIGHTING_SCHEMES = ("uniform", "logit_normal", "mode")
LR_SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
PIPELINE_FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "transformer/config.json",
]  # what training reads first
PIPELINE_CLASS = "StableDiffusion3Pipeline"
# The script to use for a pipeline of another family (model_index.json's _class_name).
SIBLING_SCRIPTS = {"StableDiffusionXLPipeline": "train_capo.py", "StableDiffusionPipeline": "train_capo.py"}
OBJECTIVES = ["capo", "dpo", "ipo"]
OBJECTIVE_NAMES = {"capo": "CaPO", "dpo": "DPO (CaPO Eq. 22)", "ipo": "IPO (CaPO Eq. 22)"}
# The paper's beta sweeps (App. B.2); the default of each objective is the middle of its SD3-M sweep.
BETA_SWEEPS = {
    "SDXL": {"capo": (300, 500, 1000), "ipo": (500, 1000, 2000), "dpo": (2000, 3000, 4000)},
    "SD3-M": {"capo": (30, 50, 100), "ipo": (50, 100, 200), "dpo": (100, 200, 300)},
}
DEFAULT_BETA = {objective: float(sweep[1]) for objective, sweep in BETA_SWEEPS["SD3-M"].items()}
DEFAULT_SIGMOID_BIAS = -1.0  # SD3-M (App. B.2); 1.5 is SDXL's
DEFAULT_LOG_SNR_RANGE = (-10.0, 10.0)  # App. A.3: lambda ~ U[-10, 10]
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# What a run writes in --output_dir (and its --logging_dir): a folder holding any of them holds an earlier run.
OUTPUT_NAMES = ["training_summary.json", "transformer", LORA_WEIGHT_NAME, "README.md", "validation", "best"]


# ----------------------------------------------------------------------------------------------
# Arguments (standard library only: a bad flag is refused before the imports below, which take seconds)
# ----------------------------------------------------------------------------------------------
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default that is a value (not None or an unset switch) and keeps the example's lines."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def finite_float(text):
    """argparse type of a value meant as a real number: 'nan', 'inf' and '-inf' are refused as usage errors."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default="stabilityai/stable-diffusion-3-medium-diffusers",
        help="Hub id or local folder of a StableDiffusion3Pipeline (SD3, SD3.5).",
    )
    model.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model on the hub.")
    model.add_argument("--variant", type=str, default=None, help="Weight variant to load, e.g. fp16.")
    model.add_argument(
        "--max_sequence_length",
        type=int,
        default=77,
        help="T5 tokens per prompt (diffusers' train_dreambooth_sd3.py default; the pipeline samples with 256). "
        "A pipeline without text_encoder_3 gets zeros of this length, as diffusers does.",
    )
    model.add_argument(
        "--lora_rank",
        type=int,
        default=None,
        help="Train LoRA adapters of this rank on the joint blocks' attention projections (context projections "
        "included, as diffusers' train_dreambooth_lora_sd3.py) instead of the full transformer.",
    )
    model.add_argument("--lora_alpha", type=int, default=None, help="LoRA alpha (default: the rank, i.e. scale 1).")

    method = parser.add_argument_group("method")
    method.add_argument(
        "--objective",
        type=str,
        default="capo",
        choices=OBJECTIVES,
        help="capo: regression of the implicit reward gap onto the calibrated reward gap (Eq. 8). dpo, ipo: the "
        "paper's baselines on the same pairs (Eq. 22).",
    )
    method.add_argument(
        "--beta_capo",
        type=finite_float,
        default=None,
        help="beta of the chosen --objective (default: the middle of the paper's SD3-M sweep: capo "
        + ", ".join(f"{o} {DEFAULT_BETA[o]:g}" for o in OBJECTIVES).removeprefix("capo ")
        + "). A beta inside another objective's sweep and outside this one's is warned about.",
    )
    method.add_argument(
        "--loss_weighting",
        type=str,
        default="sigmoid",
        choices=["sigmoid", "constant"],
        help="sigmoid: each image's error difference is weighted by w = 1 / (exp((lambda - b) / 2) + "
        "exp(-(lambda - b) / 2)) of its log-SNR lambda (App. A.3, the paper's SD3-M setting for all three "
        "objectives). constant: w = 1 (Table 6's constant row), with the same lambda draw unless --weighting_scheme "
        "gives another.",
    )
    method.add_argument(
        "--sigmoid_bias",
        type=finite_float,
        default=DEFAULT_SIGMOID_BIAS,
        help="b of the sigmoid weighting (the paper: -1.0 for SD3-M, 1.5 for SDXL).",
    )
    method.add_argument(
        "--shared_noise",
        action="store_true",
        help="One noise draw for both images of a pair (default: independent noise, App. A.2; the timestep is "
        "always shared).",
    )
    method.add_argument(
        "--log_snr_range",
        type=finite_float,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="lambda ~ U[LOW, HIGH] and sigma = sigmoid(-lambda / 2), one per pair (default -10 10, App. A.3): "
        "continuous, not the scheduler's table, and unshifted.",
    )
    method.add_argument(
        "--weighting_scheme",
        type=str,
        default=None,
        choices=WEIGHTING_SCHEMES,
        help="With --loss_weighting constant, instead of the uniform lambda: the density of the training sigmas as "
        "diffusers' SD3 scripts name and draw it (SD3 paper Sec. 3.1): u is drawn from it and sigma is the "
        "scheduler's table entry that u picks (its shift included). App. A.3 reports logit_normal close to its "
        "weighting.",
    )
    method.add_argument(
        "--logit_mean",
        type=finite_float,
        default=None,
        help="Mean of the normal of --weighting_scheme logit_normal (0)",
    )
    method.add_argument(
        "--logit_std", type=finite_float, default=None, help="Std of the normal of --weighting_scheme logit_normal (1)"
    )
    method.add_argument(
        "--mode_scale", type=finite_float, default=None, help="Scale of --weighting_scheme mode (SD3 paper; 1.29)."
    )
    method.add_argument(
        "--precondition_outputs",
        action="store_true",
        help="Compare x0_hat = x_sigma - sigma * v with x0 instead of v with eps - x0: the velocity error weighted "
        "by sigma^2 (diffusers' flag; the DDSPO release's SD3 setting). A beta tuned without it does not carry over.",
    )

    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="Required: the calibrated pairs (examples/capo/select_pairs.py writes caption, jpg_pos, jpg_neg, "
        "reward_pos, reward_neg), as a datasets hub name, a local folder (parquet/arrow/csv/json files, or "
        "save_to_disk output) or a single data file.",
    )
    data.add_argument("--dataset_split_name", type=str, default="train", help="Split to train on.")
    data.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are cached.")
    data.add_argument("--caption_column", type=str, default="caption", help="Column with the prompts.")
    data.add_argument(
        "--image_pos_column",
        type=str,
        default="jpg_pos",
        help="Preferred images x0_pos (encoded bytes or datasets Image; examples/capo/select_pairs.py writes them).",
    )
    data.add_argument("--image_neg_column", type=str, default="jpg_neg", help="Dispreferred images x0_neg.")
    data.add_argument(
        "--reward_pos_column",
        type=str,
        default="reward_pos",
        help="Calibrated reward R_ca(x_pos) in [0, 1] (the mean over rewards of Eq. 7's win-rates).",
    )
    data.add_argument("--reward_neg_column", type=str, default="reward_neg", help="Calibrated reward R_ca(x_neg).")
    data.add_argument(
        "--max_train_samples",
        type=int,
        default=None,
        help="Train on a random subset of this many pairs (after the skipped rows are dropped).",
    )
    data.add_argument(
        "--dataloader_num_workers", type=int, default=0, help="Processes that decode and augment images."
    )
    data.add_argument("--resolution", type=int, default=1024, help="Square training resolution (multiple of 8).")
    data.add_argument(
        "--random_crop",
        action="store_true",
        help="Crop at random (default: center). Both images of a pair share the crop.",
    )
    data.add_argument(
        "--random_flip",
        action="store_true",
        help="Flip both images of a pair together, horizontally, half the time (default: no flips: the pairs are the "
        "base model's own draws, scored unflipped, and left and right matter for GenEval Position and T2I-CompBench "
        "Spatial).",
    )
    data.add_argument(
        "--vae_encode_batch_size",
        type=int,
        default=1,
        help="Images per VAE encoder call (the VAE runs in float32; SDXL's at 1024 px peaked at 31 GiB with 8 per "
        "call on an H100, so 1 keeps encoding and the --cache_latents build low).",
    )
    data.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode every image (VAE) and caption (both CLIPs and T5) once before training, spread over the "
        "processes, and train on that cache, so the loop runs only the transformer: the text encoders are freed after "
        "the build, and a reused cache loads none, unless held-out accuracy or validation needs them. Each pair's "
        "crop and flip are drawn once, before caching. Later runs with the same data, model, resolution, "
        "--max_sequence_length and augmentation reuse the cache.",
    )
    data.add_argument(
        "--latents_cache_dir",
        type=str,
        default=None,
        help="Where --cache_latents keeps its caches, one folder per setting (default: <datasets "
        "cache>/preference_latents).",
    )
    data.add_argument(
        "--preference_eval_split",
        type=str,
        default=None,
        help="Split of --dataset_name for the held-out preference accuracy, measured before training (logged "
        "at step 0), every --validation_steps and at the end.",
    )
    data.add_argument("--preference_eval_max_samples", type=int, default=512, help="Pairs of the eval split to use.")
    data.add_argument(
        "--preference_eval_timesteps",
        type=int,
        default=4,
        help="Fixed (timestep, noise) draws per pair; a pair counts as right when its mean error on the positive is "
        "lower.",
    )

    training = parser.add_argument_group("training")
    training.add_argument(
        "--output_dir",
        type=str,
        default="capo-sd3",
        help="Where checkpoints, weights, logs and the model card go. A folder holding an earlier run's outputs is "
        "refused unless the run resumes it (--resume_from_checkpoint) or --overwrite replaces them.",
    )
    training.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace the outputs an earlier run left in --output_dir: they are deleted before training starts.",
    )
    training.add_argument(
        "--seed",
        type=int,
        default=None,
        help="Seed for data order, augmentation, timesteps and noise (random if unset, and logged).",
    )
    training.add_argument(
        "--train_batch_size", type=int, default=4, help="Preference pairs per device per micro-batch."
    )
    training.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step."
    )
    training.add_argument("--num_train_epochs", type=int, default=1, help="Epochs, unless --max_train_steps is set.")
    training.add_argument(
        "--max_train_steps", type=int, default=None, help="Optimizer steps; overrides --num_train_epochs."
    )
    training.add_argument(
        "--learning_rate",
        type=finite_float,
        default=1.5e-5,
        help="Peak learning rate (after --scale_lr if given); the paper: 1.5e-5 for SD3-M at batch 256.",
    )
    training.add_argument(
        "--scale_lr",
        action="store_true",
        help="Multiply the learning rate by accumulation steps x batch size x processes.",
    )
    training.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant_with_warmup",
        choices=LR_SCHEDULERS,
        help="Learning-rate schedule.",
    )
    training.add_argument(
        "--lr_warmup_steps", type=int, default=1000, help="Warm-up steps of the schedule (the paper: 1000)."
    )
    # The paper trains with Adam (App. B.2: Optax, TPU) and prints none of its settings: the betas and epsilon are
    # Adam's published defaults (Optax's too), and no weight decay or clipping, which plain Adam does not have.
    training.add_argument("--adam_beta1", type=finite_float, default=0.9, help="Adam beta1.")
    training.add_argument("--adam_beta2", type=finite_float, default=0.999, help="Adam beta2.")
    training.add_argument(
        "--adam_weight_decay",
        type=finite_float,
        default=0.0,
        help="Decoupled weight decay (AdamW); 0 is the paper's Adam.",
    )
    training.add_argument("--adam_epsilon", type=finite_float, default=1e-8, help="Adam epsilon.")
    training.add_argument(
        "--max_grad_norm",
        type=finite_float,
        default=0.0,
        help="Gradient clipping norm (0: no clipping, as the paper's Adam; the norm is logged either way).",
    )
    training.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW (same settings).")
    training.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Recompute transformer activations in the backward pass to save memory.",
    )
    training.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere GPUs.")
    training.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Overrides accelerate's config. Frozen weights are held in this dtype; trained weights stay float32. "
        "fp16 needs a GPU.",
    )
    training.add_argument(
        "--skip_final_save",
        action="store_true",
        help="Write no weights at the end (checkpoints, summary and model card are still written): for "
        "benchmarks, where a full SD3.5-large transformer is 16 GB of disk per run.",
    )

    checkpoints = parser.add_argument_group("checkpoints")
    checkpoints.add_argument(
        "--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N optimizer steps."
    )
    checkpoints.add_argument(
        "--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints."
    )
    checkpoints.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='A checkpoint-N folder (a path, or a name inside --output_dir), or "latest" in --output_dir.',
    )

    logs = parser.add_argument_group("logging and validation")
    logs.add_argument(
        "--report_to",
        type=str,
        default="tensorboard",
        choices=["tensorboard", "wandb", "all", "none"],
        help="Tracker for metrics and images.",
    )
    logs.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, relative to --output_dir.")
    logs.add_argument("--tracker_project_name", type=str, default="capo-sd3", help="Project name in the tracker.")
    logs.add_argument(
        "--validation_prompts",
        type=str,
        nargs="*",
        default=None,
        help="Prompts rendered side by side with the base model (validation/step-NNNNNN.png).",
    )
    logs.add_argument(
        "--validation_steps",
        type=int,
        default=200,
        help="Validate (images, held-out accuracy) every N optimizer steps and at the end.",
    )
    logs.add_argument(
        "--validation_inference_steps", type=int, default=25, help="Sampling steps for validation images."
    )
    logs.add_argument(
        "--validation_guidance_scale",
        type=finite_float,
        default=5.0,
        help="Classifier-free guidance for validation images.",
    )
    logs.add_argument(
        "--validation_reward_models",
        type=str,
        nargs="*",
        default=None,
        help="Reward models (names of examples/rewards/registry.py, e.g. pickscore hpsv21) that judge the images of "
        "--validation_reward_prompts at step 0, every --validation_steps and at the end: the win-rate against the "
        "base model's images (CaPO App. B.2, as examples/eval/compare.py computes it) and the mean reward are "
        "logged per reward, and the win-rate averaged over them picks the best step.",
    )
    logs.add_argument(
        "--validation_reward_model_paths",
        type=str,
        nargs="*",
        default=[],
        metavar="NAME=PATH",
        help="Local weights for some of --validation_reward_models, e.g. pickscore=/models/PickScore_v1 (default: "
        "the published weights).",
    )
    logs.add_argument(
        "--validation_reward_prompts",
        type=str,
        default=None,
        help="Text file of the prompts that validation by reward draws, one a line (needed with "
        "--validation_reward_models).",
    )
    logs.add_argument(
        "--validation_images_per_prompt",
        type=int,
        default=4,
        help="Images of each --validation_reward_prompts entry, image k of prompt i from seed SeedSequence((--seed, "
        "i, k)) at every validation, as examples/eval/generate.py seeds it.",
    )
    logs.add_argument(
        "--keep_best_checkpoint",
        action="store_true",
        help="Keep the weights of the step with the highest validation win-rate in best/ (the final output's "
        "layout), replaced when a later step beats it. Needs --validation_reward_models.",
    )

    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true", help="Upload the output folder to the hub at the end.")
    hub.add_argument(
        "--hub_model_id", type=str, default=None, help="Repository on the hub (default: the output folder's name)."
    )
    hub.add_argument("--hub_token", type=str, default=None, help="Token for the hub (default: the logged-in one).")

    args = parser.parse_args(input_args)
    try:
        check_args(args)
    except InputError as error:
        parser.error(str(error))
    return args


def check_timestep_args(args):
    """Two draws of sigma: lambda ~ U[--log_snr_range] (App. A.3; the default, for both weightings), or
    --weighting_scheme's density as diffusers' SD3 scripts draw it (with --loss_weighting constant only: w_lambda
    belongs to the uniform lambda). A flag of the draw not taken is refused rather than ignored; the unset flags of
    the draw taken get their defaults."""
    density_flags = [name for name in ("logit_mean", "logit_std", "mode_scale") if getattr(args, name) is not None]
    if args.weighting_scheme is None:
        if density_flags:
            raise InputError(
                f"--{density_flags[0]} shapes the sigma density of --weighting_scheme, and none is given: sigma "
                "comes from lambda ~ U[--log_snr_range] (App. A.3). Drop it or pass --weighting_scheme."
            )
        args.log_snr_range = list(args.log_snr_range or DEFAULT_LOG_SNR_RANGE)
        low, high = args.log_snr_range
        if not low < high:
            raise InputError(f"--log_snr_range must be LOW HIGH with LOW < HIGH, got {low:g} {high:g}.")
        return
    if args.loss_weighting == "sigmoid":
        raise InputError(
            f"--weighting_scheme {args.weighting_scheme} draws sigma from diffusers' density, and --loss_weighting "
            "sigmoid (the default) weights the uniform lambda draw of App. A.3; pass --loss_weighting constant with "
            "it, or drop it."
        )
    if args.log_snr_range is not None:
        raise InputError(
            f"--log_snr_range sets the uniform lambda draw, and --weighting_scheme {args.weighting_scheme} replaces "
            "it; give one of them."
        )
    defaults = {"logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.logit_std <= 0:
        raise InputError(f"--logit_std must be positive, got {args.logit_std}.")


def check_args(args):
    """Refuse bad settings before any import or model load; resolve --resume_from_checkpoint to a folder."""
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise InputError(
            "--use_8bit_adam needs bitsandbytes, which is not installed here: pip install bitsandbytes (its 8-bit "
            "AdamW runs on GPUs and, more slowly, on the CPU)."
        )
    if args.beta_capo is None:
        args.beta_capo = DEFAULT_BETA[args.objective]
    if args.beta_capo <= 0:
        raise InputError(
            f"--beta_capo must be positive (the paper's SD3-M sweep for {args.objective}: "
            f"{BETA_SWEEPS['SD3-M'][args.objective]}), got {args.beta_capo}."
        )
    warning = beta_range_warning(args.objective, args.beta_capo)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    if args.lora_rank is not None and args.lora_rank <= 0:
        raise InputError(f"--lora_rank must be a positive integer, got {args.lora_rank}.")
    if args.resolution <= 0 or args.resolution % 8 != 0:
        raise InputError(
            f"--resolution must be a positive multiple of 8 (the VAE downsamples 8x), got {args.resolution}."
        )
    positive = ["train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_steps"]
    positive += ["preference_eval_timesteps", "preference_eval_max_samples", "vae_encode_batch_size"]
    positive += ["num_train_epochs", "max_sequence_length"]
    positive += ["validation_images_per_prompt"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise InputError(f"--{name} must be positive, got {getattr(args, name)}.")
    check_validation_reward_args(args)
    for name in ("max_train_steps", "max_train_samples"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise InputError(f"--{name} must be positive, got {getattr(args, name)}.")
    check_timestep_args(args)
    if names_local_path(args.pretrained_model_name_or_path):
        check_pipeline_class(args.pretrained_model_name_or_path, local_model_index(args.pretrained_model_name_or_path))
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise InputError(f"--output_dir {args.output_dir!r} is a file; give a folder (it is created if missing).")
    if args.overwrite and args.resume_from_checkpoint is not None:
        raise InputError(
            "--overwrite deletes the earlier run's outputs that --resume_from_checkpoint continues; give one of them."
        )
    check_local_path("--pretrained_model_name_or_path", args.pretrained_model_name_or_path, PIPELINE_FILES)
    resuming = args.resume_from_checkpoint is not None
    args.resume_from_checkpoint = resolve_checkpoint(args)
    if args.dataset_name is None:
        raise InputError(
            "--dataset_name is required: the calibrated pairs to train on (examples/capo/select_pairs.py writes "
            "caption, jpg_pos, jpg_neg, reward_pos and reward_neg; Pick-a-Pic's labels are not calibrated rewards)."
        )
    check_local_path("--dataset_name", args.dataset_name, [])
    check_output_dir(args, resuming)


def beta_range_warning(objective, beta):
    """A sentence when `beta` lies inside another objective's sweep (App. B.2) but outside `objective`'s, else None.

    The three objectives read beta on different scales (CaPO regresses onto a gap in [-1, 1], DPO needs a logit of
    several units), so a beta copied from another objective's command line is the likely mistake.
    """
    for family, sweeps in BETA_SWEEPS.items():
        own = sweeps[objective]
        if own[0] <= beta <= own[-1]:
            return None
    for family, sweeps in BETA_SWEEPS.items():
        for other, sweep in sweeps.items():
            if other != objective and sweep[0] <= beta <= sweep[-1]:
                return (
                    f"--beta_capo {beta:g} lies in the paper's {family} sweep for {other} {sweep} but outside its "
                    f"sweeps for {objective} (SDXL {BETA_SWEEPS['SDXL'][objective]}, SD3-M "
                    f"{BETA_SWEEPS['SD3-M'][objective]}); is it meant for --objective {other}?"
                )
    return None


def read_validation_prompts(path):
    """The prompts of a --validation_reward_prompts file: one a line, blank lines left out."""
    file = Path(path)
    if not file.is_file():
        raise InputError(
            f"--validation_reward_prompts {path!r}: no such file here; expected a text file of prompts, one a line."
        )
    try:
        prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise InputError(
            f"--validation_reward_prompts {path!r} is not UTF-8 text; expected prompts, one a line."
        ) from None
    if not prompts:
        raise InputError(f"--validation_reward_prompts {path!r} holds no prompt; expected prompts, one a line.")
    return prompts


def check_validation_reward_args(args):
    """Validation by reward: known reward names, a prompt file, NAME=PATH weights; the other flags need the names.
    The reward registry (and torch with it) is imported only when --validation_reward_models is given."""
    if not args.validation_reward_models:
        given = [
            flag
            for flag in ("validation_reward_prompts", "validation_reward_model_paths", "keep_best_checkpoint")
            if getattr(args, flag)
        ]
        if given:
            raise InputError(
                f"--{given[0]} needs --validation_reward_models (reward names of examples/rewards/registry.py, "
                "e.g. pickscore)."
            )
        return
    if len(set(args.validation_reward_models)) != len(args.validation_reward_models):
        raise InputError(f"--validation_reward_models names a reward twice: {args.validation_reward_models}.")
    if args.validation_reward_prompts is None:
        raise InputError(
            "--validation_reward_models needs --validation_reward_prompts, a text file of prompts (one a line)."
        )
    read_validation_prompts(args.validation_reward_prompts)
    paths = {}
    for pair in args.validation_reward_model_paths:
        name, separator, path = pair.partition("=")
        if not separator or not name or not path:
            raise InputError(f"--validation_reward_model_paths entries look like NAME=PATH, got {pair!r}.")
        if name not in args.validation_reward_models:
            raise InputError(
                f"--validation_reward_model_paths names {name!r}, which is not in --validation_reward_models "
                f"{args.validation_reward_models}."
            )
        paths[name] = path
    args.validation_reward_model_paths = paths
    try:
        from examples.rewards.registry import RewardInputError, check_reward_model_names
    except ImportError as error:
        raise InputError(
            f"--validation_reward_models needs the repository's examples/rewards/ ({error}); run the script from the "
            "repository's root, or leave the flag out."
        ) from None
    try:
        check_reward_model_names(args.validation_reward_models)
    except RewardInputError as error:
        raise InputError(f"--validation_reward_models: {error}") from None


def names_local_path(value):
    """Hub ids look like `name` or `org/name`; anything else (or anything that exists on disk) is a local path."""
    return os.path.exists(value) or value.startswith((".", "/", "~")) or value.count("/") > 1


def local_model_index(value):
    """model_index.json of a local pipeline folder as a dict (empty when there is none to read: check_local_path
    names what is missing)."""
    path = Path(value).expanduser() / "model_index.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def check_pipeline_class(value, model_index):
    """The pipeline must be a StableDiffusion3Pipeline; another family is named, with the script that trains it."""
    found = model_index.get("_class_name")
    if found is None or found == PIPELINE_CLASS:
        return
    sibling = SIBLING_SCRIPTS.get(found)
    remedy = f"train it with {sibling}" if sibling else "give an SD3 or SD3.5 pipeline"
    raise InputError(
        f"--pretrained_model_name_or_path {value!r} is a {found} (its model_index.json), not a {PIPELINE_CLASS} "
        f"(SD3, SD3.5); {remedy}."
    )


def check_local_path(flag, value, required_files):
    """A local path must exist and, for a folder, hold `required_files`; a hub id is checked when it loads."""
    if not names_local_path(value):
        return
    path = Path(value).expanduser()
    if not path.exists():
        raise InputError(f"{flag} {value!r}: no such file or folder here; expected a hub id or a local path.")
    missing = [name for name in required_files if not (path / name).is_file()]
    if missing:
        found = sorted(p.name for p in path.iterdir()) if path.is_dir() else "a file"
        raise InputError(f"{flag} {value!r} lacks {missing}; found {found}. Expected a diffusers folder.")


def earlier_outputs(args):
    """The names in --output_dir that a run of this script writes there (OUTPUT_NAMES, checkpoint-N, the
    --logging_dir folder), sorted; anything else in the folder (a user's notes) is not an output."""
    folder = Path(args.output_dir)
    if not folder.is_dir():
        return []
    names = list(OUTPUT_NAMES)
    logging_dir = Path(args.logging_dir)
    if not logging_dir.is_absolute() and logging_dir.parts and logging_dir.parts[0] != "..":
        names.append(logging_dir.parts[0])
    found = {name for name in names if (folder / name).exists()}
    found |= {path.name for path in folder.glob("checkpoint-*")}
    return sorted(found)


def check_output_dir(args, resuming):
    """--output_dir (not a file: check_args) must be a folder this run may write, checked before anything loads, not
    at the final save: without an earlier run's outputs unless the run resumes it or --overwrite replaces them, and
    writable (probed where it is, or in its nearest existing parent when it is yet to be made, so that a refused run
    leaves no folder behind)."""
    found = earlier_outputs(args)
    if found and not args.overwrite and args.resume_from_checkpoint is None:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        remedy = (
            "Resume it with --resume_from_checkpoint latest, give a new --output_dir, or pass --overwrite to replace "
            "them."
        )
        if resuming:  # 'latest' found no checkpoint-N to continue from
            remedy = (
                "It has no checkpoint-N to resume: give a new --output_dir, or pass --overwrite (without "
                "--resume_from_checkpoint) to replace them."
            )
        raise InputError(f"--output_dir {args.output_dir!r} holds an earlier run's outputs ({shown}). {remedy}")
    path = Path(args.output_dir).absolute()
    nearest = path
    while not os.path.lexists(nearest):
        nearest = nearest.parent
    try:
        if nearest == path:
            probe = path / f".write-check.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".write-check.", dir=nearest))
    except OSError as error:
        raise InputError(f"--output_dir {args.output_dir!r} cannot be written ({error.strerror or error}).") from None


def delete_earlier_outputs(args):
    """--overwrite: delete what an earlier run wrote in --output_dir (earlier_outputs), nothing else. Returns the
    names deleted."""
    found = earlier_outputs(args)
    for name in found:
        path = Path(args.output_dir, name)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return found


def list_checkpoints(output_dir):
    """The checkpoint-N folders of `output_dir`, oldest first."""
    found = [path for path in Path(output_dir).glob("checkpoint-*") if CHECKPOINT_NAME.fullmatch(path.name)]
    return sorted((path for path in found if path.is_dir()), key=checkpoint_step)


def checkpoint_step(path):
    return int(CHECKPOINT_NAME.fullmatch(Path(path).name).group(1))


def resolve_checkpoint(args):
    """--resume_from_checkpoint as a folder path (None: start a new run), as diffusers' scripts resolve it."""
    value = args.resume_from_checkpoint
    if value is None:
        return None
    if value == "latest":
        found = list_checkpoints(args.output_dir)
        if not found:
            return None
        candidate = found[-1]
    else:
        for candidate in (Path(value), Path(args.output_dir, value)):
            if CHECKPOINT_NAME.fullmatch(candidate.name) and candidate.is_dir():
                break
        else:
            found = [path.name for path in list_checkpoints(args.output_dir)]
            raise InputError(
                f"--resume_from_checkpoint {value!r}: expected a checkpoint-N folder (a path, or a name inside "
                f"--output_dir {args.output_dir!r}) or 'latest'; --output_dir holds {found or 'no checkpoints'}."
            )
    check_checkpoint(candidate, args)
    return str(candidate)


def check_checkpoint(checkpoint, args):
    """A checkpoint resumes only a run of its own kind and settings, from intact files: refuse a LoRA checkpoint
    without --lora_rank or with another rank, a full transformer with --lora_rank, a missing optimizer state, and a
    weights file that is truncated or not safetensors (read from the headers, before anything loads)."""
    lora_file = checkpoint / LORA_WEIGHT_NAME
    remedy = "resume from another checkpoint, or start a new run in a new --output_dir."
    # DeepSpeed and FSDP save the model and optimizer in their own files (pytorch_model*, optimizer_*)
    saved_by_engine = any(checkpoint.glob("pytorch_model*"))
    if lora_file.is_file():
        rank = lora_rank_of(lora_file)
        if not args.lora_rank:
            rank_flag = f"--lora_rank {rank}" if rank else "the --lora_rank of the run that wrote it"
            raise InputError(f"{checkpoint} holds LoRA weights; resume it with {rank_flag}.")
        if rank is not None and rank != args.lora_rank:
            raise InputError(
                f"{checkpoint} holds LoRA weights of rank {rank}, and this run has --lora_rank {args.lora_rank}; "
                f"resume it with --lora_rank {rank}."
            )
    elif args.lora_rank and (checkpoint / "transformer").is_dir():
        raise InputError(f"{checkpoint} holds a full transformer (full fine-tuning); resume it without --lora_rank.")
    elif args.lora_rank and not saved_by_engine:
        raise InputError(f"{checkpoint} lacks {LORA_WEIGHT_NAME}, the LoRA weights a resumed run loads; {remedy}")
    elif not args.lora_rank and not saved_by_engine and not (checkpoint / "transformer" / "config.json").is_file():
        raise InputError(
            f"{checkpoint} lacks transformer/config.json, the full transformer a resumed run loads; {remedy}"
        )
    weight_files = [lora_file] if lora_file.is_file() else sorted((checkpoint / "transformer").glob("*.safetensors"))
    for path in weight_files:
        problem = safetensors_problem(path)
        if problem:
            raise InputError(f"{path} {problem}; {remedy}")
    optimizer = checkpoint / "optimizer.bin"
    if not optimizer.is_file() and not saved_by_engine and not (checkpoint / "optimizer_0").is_dir():
        found = sorted(path.name for path in checkpoint.iterdir())
        raise InputError(
            f"{checkpoint} lacks optimizer.bin, the optimizer state a resumed run restores (found {found}); {remedy}"
        )
    if optimizer.is_file() and not zipfile.is_zipfile(optimizer):
        raise InputError(f"{optimizer} is not a complete torch file (cut short?); {remedy}")


def safetensors_header(path):
    """The JSON header of a .safetensors file and the size its tensors' bytes must add up to: (header, size)."""
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size)) if header_size <= os.fstat(f.fileno()).st_size else None
    if not isinstance(header, dict):
        raise ValueError("no safetensors header")
    data_size = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    return header, 8 + header_size + data_size


def safetensors_problem(path):
    """Why the weights file `path` cannot be loaded (not safetensors, or truncated), or None; reads its header only."""
    try:
        _, expected_size = safetensors_header(path)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        return f"is not a readable safetensors file ({type(error).__name__})"
    size = path.stat().st_size
    if size != expected_size:
        return f"is truncated or damaged: {size} bytes, where its header names {expected_size}"
    return None


def lora_rank_of(path):
    """The rank of a saved LoRA (the first dimension of its down-projections), or None when the file is unreadable."""
    try:
        header, _ = safetensors_header(path)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    for key, entry in header.items():
        if ".lora.down." in key or ".lora_A." in key:
            return int(entry["shape"][0])
    return None


if __name__ == "__main__":
    ARGS = parse_args()


import datasets  # noqa: E402
import diffusers  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.logging import get_logger  # noqa: E402
from accelerate.utils import (  # noqa: E402
    DataLoaderConfiguration,
    DistributedType,
    ProjectConfiguration,
    broadcast_object_list,
    gather_object,
    set_seed,
)
from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.optimization import get_scheduler  # noqa: E402
from diffusers.training_utils import cast_training_params  # noqa: E402
from diffusers.utils import convert_unet_state_dict_to_peft  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from utils.diffusion import (  # noqa: E402
    flow_matching_log_snr,
    flow_matching_noisy_and_target,
    flow_matching_sigmas,
    flow_sigma_from_log_snr,
    flow_sigmoid_loss_weight,
    per_sample_mse,
    preconditioned_outputs,
    sample_flow_matching_u,
    sample_generators,
    sample_noise,
    sample_uniform_log_snr,
)
from utils.validation import (  # noqa: E402
    best_validation_step,
    describe_reward_validation,
    reward_validation_metrics,
    validation_image_seed,
)


logger = get_logger(__name__)

HELDOUT_EVAL_EPOCH = 2**31  # the held-out accuracy's fixed draws use "epochs" no training run reaches


# ----------------------------------------------------------------------------------------------
# Objective
# ----------------------------------------------------------------------------------------------
def capo_loss(
    model_losses_pos,
    model_losses_neg,
    ref_losses_pos,
    ref_losses_neg,
    weight_pos,
    weight_neg,
    reward_pos,
    reward_neg,
    beta,
    objective="capo",
):
    """CaPO (Eq. 8) and the DPO / IPO baselines on the same pairs (Eq. 22); docs/METHODS.md, "CaPO".

    Inputs have shape (B,): per-sample errors of the policy and of the reference against the forward-process target,
    the loss weight w(lambda_t) of each image (ones for constant weighting) and the calibrated rewards
    R_ca(x_pos), R_ca(x_neg). The implicit reward of an image is R_theta = -w * (model error - reference error)
    (Eq. 21/23, lambda'_t taken constant and absorbed into beta), and logit = beta * (R_theta(pos) - R_theta(neg)).
    At initialisation (policy == reference) logit = 0: the CaPO loss is mean((reward_pos - reward_neg)^2), DPO's
    log 2 and IPO's 1.
    """
    implicit_pos = -weight_pos * (model_losses_pos - ref_losses_pos)
    implicit_neg = -weight_neg * (model_losses_neg - ref_losses_neg)
    logit = beta * (implicit_pos - implicit_neg)  # (B,)
    target_margin = reward_pos - reward_neg  # in [-1, 1]
    if objective == "capo":
        per_pair = (target_margin - logit) ** 2
    elif objective == "dpo":
        per_pair = -F.logsigmoid(logit)
    elif objective == "ipo":
        per_pair = (1 - logit) ** 2
    else:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")
    loss = per_pair.mean()
    metrics = {
        "loss": loss.detach(),
        "implicit_acc": ((logit > 0).float() + 0.5 * (logit == 0).float()).mean().detach(),
        "reward_margin": logit.mean().detach(),
        "target_margin": target_margin.mean().detach(),
        "model_mse_pos": model_losses_pos.mean().detach(),
        "model_mse_neg": model_losses_neg.mean().detach(),
        "ref_mse_pos": ref_losses_pos.mean().detach(),
        "ref_mse_neg": ref_losses_neg.mean().detach(),
    }
    return loss, metrics


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}


def load_split(dataset_name, split, cache_dir=None):
    """A split of a hub dataset, a local folder, a `save_to_disk` folder or a single data file.

    What `datasets` cannot find (a split, a folder without data files, a hub id out of reach) stops the run
    with one line.
    """
    path = Path(dataset_name)
    try:
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            dataset = datasets.load_from_disk(str(path))
            if not isinstance(dataset, datasets.DatasetDict):
                return dataset
            if split not in dataset:
                raise InputError(f"{dataset_name!r} has no split {split!r}; it has {sorted(dataset)}.")
            return dataset[split]
        if path.is_file():
            builder = DATA_FILE_BUILDERS.get(path.suffix)
            if builder is None:
                raise InputError(f"Expected a .parquet, .arrow, .csv or .json(l) data file, found {dataset_name!r}.")
            empty = empty_parquet_split([path])
            if empty is not None:
                return empty
            return datasets.load_dataset(builder, data_files={split: str(path)}, split=split, cache_dir=cache_dir)
        if path.is_dir():
            # Name the folder's data files explicitly: the datasets cache is keyed on the files' modification times
            # only then. A folder whose README.md declares `configs:` (the data tools' cards do) is otherwise
            # keyed on the file patterns alone, and a rewritten folder would silently load its stale first version.
            builder = datasets.load_dataset_builder(str(path), cache_dir=cache_dir)
            files = {str(name): list(paths) for name, paths in (builder.config.data_files or {}).items()}
            empty = empty_parquet_split(files.get(split, []))
            if empty is not None:
                return empty
            return datasets.load_dataset(str(path), data_files=files or None, split=split, cache_dir=cache_dir)
        return datasets.load_dataset(dataset_name, split=split, cache_dir=cache_dir)
    except datasets.exceptions.DatasetGenerationError as error:  # a data file datasets cannot turn into rows
        cause = error.__cause__ or error
        raise InputError(
            f"Could not read split {split!r} of {dataset_name!r}: {type(cause).__name__}: "
            f"{' '.join(str(cause).split())[:300]}. Expected parquet/arrow/csv/json files of rows."
        ) from error
    except (OSError, ValueError) as error:  # FileNotFoundError, ConnectionError, "Unknown split"
        if isinstance(error, InputError):
            raise
        reason = str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else type(error).__name__
        raise InputError(
            f"Could not load split {split!r} of {dataset_name!r}: {reason}. Expected a hub dataset reachable from "
            "here, a folder of parquet/arrow/csv/json files named by split, a save_to_disk folder or a data file."
        ) from error


def empty_parquet_split(paths):
    """A split of 0 rows, with its columns, when every one of `paths` is a parquet file without rows (datasets fails
    to generate a split from those), so that the run can say how many rows it read; None otherwise."""
    import pyarrow.parquet as pq
    from datasets.table import InMemoryTable

    if not paths or any(Path(path).suffix != ".parquet" for path in paths):
        return None
    schemas = []
    try:
        for path in paths:
            parquet = pq.ParquetFile(path)
            if parquet.metadata.num_rows:
                return None
            schemas.append(parquet.schema_arrow)
    except (OSError, ValueError):  # not a readable parquet file: datasets says why
        return None
    return datasets.Dataset(InMemoryTable(schemas[0].empty_table()))


SKIP_REASONS = {
    "non_finite_reward": "reward_pos or reward_neg missing or not finite",
    "identical_images": "the two images of the pair are the same file",
}


def prepare_rows(dataset, args, split):
    """Check the columns and the calibrated rewards and drop the rows CaPO cannot use, counted by reason (see
    SKIP_REASONS). Rewards outside [0, 1] are not calibrated win-rates: that stops the run.

    Returns the dataset and {reason: count}.
    """
    columns = [args.caption_column, args.image_pos_column, args.image_neg_column]
    columns += [args.reward_pos_column, args.reward_neg_column]
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise InputError(
            f"Split {split!r} of {args.dataset_name!r} has no column(s) {missing}; it has {dataset.column_names}. "
            "CaPO trains on calibrated pairs (examples/capo/select_pairs.py writes caption, jpg_pos, jpg_neg, "
            "reward_pos, reward_neg); name other columns with --caption_column, --image_pos_column, "
            "--image_neg_column, --reward_pos_column, --reward_neg_column."
        )
    rows_read = len(dataset)
    skipped = dict.fromkeys(SKIP_REASONS, 0)

    def no_usable_row():
        reasons = ", ".join(f"{count} {SKIP_REASONS[reason]}" for reason, count in skipped.items() if count)
        return InputError(
            f"Split {split!r} of {args.dataset_name!r} has no usable row: {rows_read} rows read, "
            f"{'dropped: ' + reasons if reasons else 'none dropped'}; expected rows with a caption, two different "
            "images and finite calibrated rewards."
        )

    if rows_read == 0:
        raise no_usable_row()
    # Keep images undecoded: decoding happens in the loader, where a broken image is skipped and counted.
    for column in (args.image_pos_column, args.image_neg_column):
        if isinstance(dataset.features[column], datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    keep, outside = [], []
    rewards = np.stack(
        [
            np.array([np.nan if value is None else float(value) for value in dataset[column]], dtype=np.float64)
            for column in (args.reward_pos_column, args.reward_neg_column)
        ],
        axis=1,
    ).reshape(-1, 2)
    identical = identical_image_rows(dataset, args.image_pos_column, args.image_neg_column)
    for row, reward in enumerate(rewards):
        if not np.isfinite(reward).all():
            skipped["non_finite_reward"] += 1
        elif row in identical:
            skipped["identical_images"] += 1
        else:
            if ((reward < 0) | (reward > 1)).any():
                outside.append((row, *reward.tolist()))
            keep.append(row)
    if outside:
        row, pos, neg = outside[0]
        raise InputError(
            f"Split {split!r} of {args.dataset_name!r}: {len(outside)} row(s) have a calibrated reward outside "
            f"[0, 1] (first: row {row}, {args.reward_pos_column}={pos:g}, {args.reward_neg_column}={neg:g}); CaPO "
            "regresses onto win-rates (Eq. 7), so raw scores must be calibrated first (examples/capo/select_pairs.py)."
        )
    if not keep:
        raise no_usable_row()
    if len(keep) < len(dataset):
        dataset = dataset.select(keep)
    return dataset, skipped


def identical_image_rows(dataset, first_column, second_column):
    """Rows whose two image cells (encoded bytes, or datasets Image structs of bytes and path) hold the same file:
    equal bytes, or the same path where no bytes are stored.

    Reads the Arrow columns, not the rows: only pairs of equal byte length are compared byte for byte, so a large
    dataset's images are not read at all before training.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")[:]  # honours an indices mapping; memory-mapped otherwise
    cells = []
    for column in (first_column, second_column):
        values = table.column(column)
        if pa.types.is_struct(values.type):
            cells.append((pc.struct_field(values, "bytes"), pc.struct_field(values, "path")))
        else:
            cells.append((values, None))
    (bytes_a, paths_a), (bytes_b, paths_b) = cells
    lengths_a = pc.binary_length(bytes_a).to_numpy(zero_copy_only=False)
    lengths_b = pc.binary_length(bytes_b).to_numpy(zero_copy_only=False)
    rows = set()
    for row in np.flatnonzero(lengths_a == lengths_b):  # NaN (no bytes) never equals
        if bytes_a[int(row)].as_py() == bytes_b[int(row)].as_py():
            rows.add(int(row))
    if paths_a is not None and paths_b is not None:
        no_bytes = np.isnan(lengths_a.astype(float)) & np.isnan(lengths_b.astype(float))
        for row in np.flatnonzero(no_bytes):
            path = paths_a[int(row)].as_py()
            if path is not None and path == paths_b[int(row)].as_py():
                rows.add(int(row))
    return rows


def decode_image(value):
    """Encoded bytes, a datasets Image dict, a path or a PIL image -> RGB PIL image (raises on bad data)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, str):
        image = Image.open(value)
    elif isinstance(value, Image.Image):
        image = value
    else:
        raise ValueError(f"expected image bytes, a path or a PIL image, found {type(value).__name__}")
    image.load()
    return image.convert("RGB")


def crop_and_flip_pair(images, resolution, random_crop, hflip, rng):
    """Resize, crop and flip the two images of a pair with one set of parameters, so they stay aligned.

    Returns the pixel tensor (2, 3, resolution, resolution) in [-1, 1]. (SD3 has no micro-conditioning: the crop
    and sizes are not given to the model, as in diffusers' SD3 scripts.)
    """
    scale = resolution / min(images[0].height, images[0].width)
    size = (max(resolution, round(images[0].width * scale)), max(resolution, round(images[0].height * scale)))
    images = [image.resize(size, Image.BILINEAR) for image in images]  # the negative takes the positive's size
    width, height = size
    if random_crop:
        top, left = int(rng.integers(0, height - resolution + 1)), int(rng.integers(0, width - resolution + 1))
    else:
        top, left = (height - resolution) // 2, (width - resolution) // 2
    images = [image.crop((left, top, left + resolution, top + resolution)) for image in images]
    if hflip and rng.random() < 0.5:
        images = [ImageOps.mirror(image) for image in images]
    pixels = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


class CaPOPairs(torch.utils.data.Dataset):
    """Decoded, jointly augmented (positive, negative) images with their calibrated rewards. An undecodable row
    comes out as its index and the reason, and collate_fn drops and counts it."""

    def __init__(self, dataset, args, augment=True):
        self.dataset = dataset
        self.args = args
        self.augment = augment
        self.seed = args.seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        args = self.args
        row = self.dataset[int(index)]
        try:
            images = [decode_image(row[column]) for column in (args.image_pos_column, args.image_neg_column)]
        except Exception as error:  # a broken image must not end a multi-day run: skip, count, say why
            return {"skipped_index": int(index), "reason": f"{type(error).__name__}: {error}"}
        # Augmentation randomness depends on (seed, epoch, index) only: resumable and worker-independent.
        rng = np.random.default_rng([self.seed, self.epoch, int(index), 0])
        pixel_values = crop_and_flip_pair(
            images, args.resolution, args.random_crop and self.augment, args.random_flip and self.augment, rng
        )
        return {
            "pixel_values": pixel_values,  # (2, 3, H, W): positive, negative
            "rewards": torch.tensor(
                [row[args.reward_pos_column], row[args.reward_neg_column]], dtype=torch.float32
            ),  # (2,)
            "caption": row[args.caption_column] or "",
            "index": int(index),
        }


class CachedPairs(torch.utils.data.Dataset):
    """Rows from the --cache_latents cache: latents (2, C, h, w) positive first, calibrated rewards and the
    caption's embeddings."""

    def __init__(self, pairs, captions):
        self.pairs = pairs.with_format("torch")
        self.captions = captions.with_format("torch")
        self.caption_rows = {caption: row for row, caption in enumerate(captions["caption"])}

    def set_epoch(self, epoch):
        pass  # crops and flips were drawn once, before caching

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        pair = self.pairs[int(index)]
        cached = self.captions[self.caption_rows[pair["caption"]]]
        example = {
            "latents": pair["latents"],
            "rewards": pair["rewards"],
            "caption": pair["caption"],
            "index": int(pair["index"]),
            "prompt_embeds": cached["prompt_embeds"],
        }
        if "pooled_prompt_embeds" in cached:
            example["pooled_prompt_embeds"] = cached["pooled_prompt_embeds"]
        return example


def collate_fn(examples):
    """Stack the decoded pairs of a batch; undecodable ones are dropped and reported in `skipped`."""
    kept = [example for example in examples if "skipped_index" not in example]
    batch = {
        "num_skipped": len(examples) - len(kept),
        "skipped": [
            (example["skipped_index"], example["reason"]) for example in examples if "skipped_index" in example
        ],
    }
    for key in kept[0] if kept else ():
        values = [example[key] for example in kept]
        batch[key] = (
            torch.stack(values) if torch.is_tensor(values[0]) else values
        )  # pixel_values (B, k, 3, H, W) or latents (B, k, C, h, w)
    return batch


# ----------------------------------------------------------------------------------------------
# Encoders
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_prompts(text_encoders, tokenizers, prompts, max_sequence_length, joint_attention_dim):
    """SD3 conditioning as StableDiffusion3Pipeline.encode_prompt builds it: the penultimate hidden states of both
    CLIPs concatenated on the feature axis and zero-padded to the T5 width, then T5's tokens after them on the
    sequence axis (B, 77 + max_sequence_length, D); pooled = both CLIPs' projections concatenated (B, D_pooled).
    Without T5 (text_encoders[2] is None) its tokens are zeros, as the pipeline's are."""
    clip_embeds, pooled_embeds = [], []
    for tokenizer, text_encoder in zip(tokenizers[:2], text_encoders[:2]):
        input_ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(text_encoder.device)
        outputs = text_encoder(input_ids, output_hidden_states=True)
        clip_embeds.append(outputs.hidden_states[-2])
        pooled_embeds.append(outputs.text_embeds)
    clip_embeds = torch.cat(clip_embeds, dim=-1)
    if text_encoders[2] is None:
        t5_embeds = clip_embeds.new_zeros(len(prompts), max_sequence_length, joint_attention_dim)
    else:
        input_ids = tokenizers[2](
            prompts, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
        ).input_ids.to(text_encoders[2].device)
        t5_embeds = text_encoders[2](input_ids)[0].to(clip_embeds.dtype)
    clip_embeds = F.pad(clip_embeds, (0, t5_embeds.shape[-1] - clip_embeds.shape[-1]))
    return torch.cat([clip_embeds, t5_embeds], dim=-2), torch.cat(pooled_embeds, dim=-1)


@torch.no_grad()
def encode_images(vae, pixel_values, batch_size):
    """x0 = (VAE posterior mean - shift_factor) * scaling_factor, `batch_size` images per encoder call.

    The mean, not a sample (diffusers' SD3 scripts sample): the posterior's std is small against the latent scale,
    and a sample would make cached and on-the-fly latents, and a resumed run, differ.
    """
    latents = [
        vae.encode(pixel_values[start : start + batch_size].to(vae.device, vae.dtype)).latent_dist.mode()
        for start in range(0, pixel_values.shape[0], batch_size)
    ]
    return (torch.cat(latents) - vae.config.shift_factor) * vae.config.scaling_factor


def latents_cache_path(args, train_split, storage_dtype):
    """One folder per (data, model, resolution, T5 length, augmentation, dtype): a changed setting never reads a stale
    cache."""
    augmentation_is_random = args.random_crop or args.random_flip
    key = {
        "data": train_split._fingerprint,
        "model": args.pretrained_model_name_or_path,
        "revision": args.revision,
        "variant": args.variant,
        "resolution": args.resolution,
        "max_sequence_length": args.max_sequence_length,
        "random_crop": args.random_crop,
        "hflip": args.random_flip,
        "augmentation_seed": args.seed if augmentation_is_random else None,
        "caption_column": args.caption_column,
        "image_columns": [args.image_pos_column, args.image_neg_column],
        "reward_columns": [args.reward_pos_column, args.reward_neg_column],
        "dtype": str(storage_dtype),
    }
    root = args.latents_cache_dir or os.path.join(datasets.config.HF_DATASETS_CACHE, "preference_latents")
    return Path(root, hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16])


@torch.no_grad()
def build_latents_cache(accelerator, args, train_dataset, vae, encode_captions, cache_path, storage_dtype):
    """Encode every pair and every distinct caption (`encode_captions(list)` -> embeddings, pooled) once, each process
    its share; reuse a finished cache.

    Returns the CachedPairs dataset and the list of (pair index, reason) skipped as undecodable.
    """
    from datasets.arrow_writer import ArrowWriter

    marker = cache_path / "complete.json"
    rank, world = accelerator.process_index, accelerator.num_processes
    accelerator.wait_for_everyone()  # every process must see the same answer to "is the cache complete?"
    if not marker.exists():
        cache_path.mkdir(parents=True, exist_ok=True)
        numpy_dtype = "float16" if storage_dtype == torch.float16 else "float32"
        latent_size = args.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
        latent_shape = (2, vae.config.latent_channels, latent_size, latent_size)
        pair_features = datasets.Features(
            {
                "index": datasets.Value("int64"),
                "caption": datasets.Value("string"),
                "latents": datasets.Array4D(latent_shape, numpy_dtype),
                "rewards": datasets.Sequence(datasets.Value("float32"), length=2),
            }
        )
        train_dataset.set_epoch(0)  # the crop and flip of epoch 0 are the ones cached
        shard = torch.utils.data.Subset(train_dataset, range(rank, len(train_dataset), world))
        loader = torch.utils.data.DataLoader(
            shard,
            batch_size=max(1, args.vae_encode_batch_size // 2),
            collate_fn=collate_fn,
            num_workers=args.dataloader_num_workers,
        )
        skipped = []
        writer = ArrowWriter(features=pair_features, path=str(cache_path / f"pairs-{rank:05d}-of-{world:05d}.arrow"))
        for batch in tqdm(loader, desc="Caching latents", disable=not accelerator.is_local_main_process):
            skipped += batch["skipped"]
            if "index" not in batch:
                continue
            latents = encode_images(vae, batch["pixel_values"].flatten(0, 1), args.vae_encode_batch_size).unflatten(
                0, (-1, 2)
            )
            rows = {
                "index": batch["index"],
                "caption": batch["caption"],
                "latents": list(latents.to(storage_dtype).float().cpu().numpy().astype(numpy_dtype)),
                "rewards": list(batch["rewards"].numpy()),
            }
            writer.write_batch(rows)
        writer.finalize()
        writer.close()

        captions = sorted({caption or "" for caption in train_dataset.dataset[args.caption_column]})[rank::world]
        writer = ArrowWriter(path=str(cache_path / f"captions-{rank:05d}-of-{world:05d}.arrow"))
        for start in tqdm(
            range(0, len(captions), 64), desc="Caching text embeddings", disable=not accelerator.is_local_main_process
        ):
            chunk = captions[start : start + 64]
            prompt_embeds, pooled_prompt_embeds = encode_captions(chunk)
            writer.write_batch(
                {
                    "caption": chunk,
                    "prompt_embeds": list(prompt_embeds.to(storage_dtype).float().cpu().numpy().astype(numpy_dtype)),
                    "pooled_prompt_embeds": list(
                        pooled_prompt_embeds.to(storage_dtype).float().cpu().numpy().astype(numpy_dtype)
                    ),
                }
            )
        writer.finalize()
        writer.close()
        all_skipped = [item for part in gather_object([skipped]) for item in part]
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            marker.write_text(json.dumps({"skipped": all_skipped, "settings": vars(args)}, default=str))
        accelerator.wait_for_everyone()
    pairs = datasets.concatenate_datasets(
        [datasets.Dataset.from_file(str(p)) for p in sorted(cache_path.glob("pairs-*.arrow"))]
    ).sort("index")
    captions = datasets.concatenate_datasets(
        [datasets.Dataset.from_file(str(p)) for p in sorted(cache_path.glob("captions-*.arrow"))]
    )
    skipped = [tuple(item) for item in json.loads(marker.read_text())["skipped"]]
    return CachedPairs(pairs, captions), skipped


def capo_batch_inputs(batch, vae, encode_captions, args, device, dtype):
    """A collated batch -> the inputs of B pairs: latents (2B, C, h, w), all positives then all negatives; the
    caption's embeds {"prompt_embeds": (B, L, D), "pooled_prompt_embeds": (B, D)}; calibrated rewards (B,) of the
    positives and of the negatives.
    Reads the --cache_latents cache when the batch carries latents; encodes pixels and captions otherwise.
    """
    if "latents" in batch:
        latents = batch["latents"].transpose(0, 1).flatten(0, 1).to(device, dtype, non_blocking=True)  # (2B, ...)
        pooled = batch.get("pooled_prompt_embeds")
        condition = {
            "prompt_embeds": batch["prompt_embeds"].to(device, dtype, non_blocking=True),
            "pooled_prompt_embeds": None if pooled is None else pooled.to(device, dtype, non_blocking=True),
        }
    else:
        pixel_values = batch["pixel_values"].transpose(0, 1).flatten(0, 1)
        latents = encode_images(vae, pixel_values, args.vae_encode_batch_size).to(dtype)
        prompt_embeds, pooled = encode_captions(batch["caption"])
        condition = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}
    reward_pos, reward_neg = batch["rewards"].to(device, torch.float32).unbind(1)
    return latents, condition, reward_pos, reward_neg


def transformer_conditioning(condition):
    """Transformer keyword arguments for prompt embeds and pooled embeds of the same batch size."""
    return {
        "encoder_hidden_states": condition["prompt_embeds"],
        "pooled_projections": condition["pooled_prompt_embeds"],
    }


def concat_conditions(*conditions):
    """Stack several {"prompt_embeds", "pooled_prompt_embeds"} dicts along the batch."""
    return {key: torch.cat([condition[key] for condition in conditions]) for key in conditions[0]}


def noisy_pair_latents(noise_scheduler, latents, generators, args):
    """x_sigma for B pairs (latents (2B, ...), positives then negatives): one sigma per pair, shared by its images,
    and independent noise for the two images (App. A.2), or one draw for both with --shared_noise.

    sigma = sigmoid(-lambda / 2) with lambda ~ U[--log_snr_range] (App. A.3), or the scheduler's table entry that
    --weighting_scheme's u picks (as diffusers' SD3 scripts draw).

    Returns noisy latents (2B, ...), sigmas (2B,) and the targets (2B, ...): the velocity eps - x0, or x0 itself
    with --precondition_outputs.
    """
    device = latents.device
    if args.weighting_scheme is None:
        sigmas = flow_sigma_from_log_snr(sample_uniform_log_snr(generators, *args.log_snr_range, device))
    else:
        u = sample_flow_matching_u(
            args.weighting_scheme, generators, args.logit_mean, args.logit_std, args.mode_scale, device
        )
        config = noise_scheduler.config
        sigmas = flow_matching_sigmas(u, config.num_train_timesteps, config.shift)
    sigmas = sigmas.to(device).repeat(2)
    noise_pos = sample_noise(latents.shape[1:], generators, device)
    noise_neg = noise_pos if args.shared_noise else sample_noise(latents.shape[1:], generators, device)
    noisy_latents, target = flow_matching_noisy_and_target(latents, torch.cat([noise_pos, noise_neg]), sigmas)
    if args.precondition_outputs:
        target = latents
    return noisy_latents, sigmas, target


def loss_weights(sigmas, args):
    """w per image: 1 / (exp((lambda - b) / 2) + exp(-(lambda - b) / 2)) of its sigma's log-SNR (--loss_weighting
    sigmoid, App. A.3) or ones."""
    if args.loss_weighting == "constant":
        return torch.ones(sigmas.shape, device=sigmas.device)
    return flow_sigmoid_loss_weight(flow_matching_log_snr(sigmas), args.sigmoid_bias).to(sigmas.device)


def transformer_prediction(transformer, noisy_latents, sigmas, conditioning, precondition, num_train_timesteps):
    """The transformer's velocity at (x_sigma, timestep sigma * T), or x0_hat = x_sigma - sigma * v when
    `precondition`: the output that is compared with noisy_pair_latents' target."""
    model_output = transformer(
        hidden_states=noisy_latents, timestep=sigmas * num_train_timesteps, **conditioning, return_dict=False
    )[0]
    return preconditioned_outputs(model_output, noisy_latents, sigmas) if precondition else model_output


# ----------------------------------------------------------------------------------------------
# Held-out preference accuracy and validation images
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def preference_accuracy(accelerator, transformer, vae, encode_captions, noise_scheduler, eval_dataset, args, dtype):
    """Share of held-out pairs whose mean error (against the flow target) on the positive image is below that on the
    negative (ties half).

    The draws are fixed by (seed, pair index), so values before and after training are comparable.
    """
    shard = range(accelerator.process_index, len(eval_dataset), accelerator.num_processes)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(eval_dataset, shard), batch_size=args.train_batch_size, collate_fn=collate_fn
    )
    score, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    for batch in loader:
        if "index" not in batch:
            continue
        latents, condition, _, _ = capo_batch_inputs(batch, vae, encode_captions, args, accelerator.device, dtype)
        conditioning = transformer_conditioning(concat_conditions(condition, condition))
        batch_size = len(batch["index"])
        errors = torch.zeros(2, batch_size, device=accelerator.device)  # positives, negatives
        for draw in range(args.preference_eval_timesteps):
            generators = sample_generators(args.seed, HELDOUT_EVAL_EPOCH + draw, batch["index"], accelerator.device)
            noisy_latents, sigmas, target = noisy_pair_latents(noise_scheduler, latents, generators, args)
            with accelerator.autocast():
                model_pred = transformer_prediction(
                    transformer, noisy_latents, sigmas, conditioning, args.precondition_outputs, num_train_timesteps
                )
            errors += per_sample_mse(model_pred, target).view(2, batch_size)
        score += ((errors[0] < errors[1]).float() + 0.5 * (errors[0] == errors[1]).float()).sum()
        count += batch_size
    score, count = accelerator.reduce(score, "sum"), accelerator.reduce(count, "sum")
    return (score / count.clamp(min=1)).item()


@torch.no_grad()
def validation_embeddings(encode_captions, prompts):
    """The embeddings of `prompts` and of the empty negative prompt, encoded once at the start, so that rendering
    needs no text encoder (T5 is freed or never loaded with --cache_latents)."""
    negative_embeds, negative_pooled_embeds = encode_captions([""])
    embeddings = []
    for start in range(0, len(prompts), 64):
        prompt_embeds, pooled_prompt_embeds = encode_captions(list(prompts[start : start + 64]))
        embeddings += [
            {
                "prompt_embeds": prompt_embeds[i : i + 1],
                "pooled_prompt_embeds": pooled_prompt_embeds[i : i + 1],
                "negative_prompt_embeds": negative_embeds,
                "negative_pooled_prompt_embeds": negative_pooled_embeds,
            }
            for i in range(len(prompt_embeds))
        ]
    return embeddings


@torch.no_grad()
def render_validation(args, accelerator, vae, transformer, noise_scheduler, prompt_embeddings, generators):
    """Images of the prompts whose validation_embeddings are `prompt_embeddings` with `transformer`: for each prompt,
    one image per generator in its list, in one call of the stock StableDiffusion3Pipeline."""
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipeline.set_progress_bar_config(disable=True)
    images = []
    for embeddings, prompt_generators in zip(prompt_embeddings, generators):
        count = len(prompt_generators)  # the pipeline does not repeat given embeddings: one row per image
        with accelerator.autocast():
            output = pipeline(
                **{name: value.expand(count, *value.shape[1:]) for name, value in embeddings.items()},
                num_inference_steps=args.validation_inference_steps,
                guidance_scale=args.validation_guidance_scale,
                height=args.resolution,
                width=args.resolution,
                generator=prompt_generators,
            )
        images.append(output.images)
    return images


def render_validation_prompts(args, accelerator, vae, transformer, noise_scheduler, prompt_embeddings):
    """One image per --validation_prompts entry with `transformer`, a fixed seed per prompt."""
    generators = [
        [torch.Generator(device=accelerator.device).manual_seed(args.seed + i)]
        for i in range(len(args.validation_prompts))
    ]
    images = render_validation(args, accelerator, vae, transformer, noise_scheduler, prompt_embeddings, generators)
    return [prompt_images[0] for prompt_images in images]


def log_validation(args, accelerator, base_images, images, step):
    """Save and log the trained model's validation images beside the base model's."""
    grid = Image.new("RGB", (2 * args.resolution, args.resolution * len(images)))  # base | trained, a row a prompt
    for row, (base, trained) in enumerate(zip(base_images, images)):
        grid.paste(base, (0, row * args.resolution))
        grid.paste(trained, (args.resolution, row * args.resolution))
    path = Path(args.output_dir, "validation", f"step-{step:06d}.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation/base_vs_trained", np.asarray(grid), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            caption = " | ".join(args.validation_prompts)
            tracker.log({"validation/base_vs_trained": wandb.Image(grid, caption=caption)}, step=step)
    logger.info(f"Validation images (base | trained) saved to {path}")


def load_validation_rewards(args, device):
    """The --validation_reward_models, each loaded once; examples/rewards is imported here, only when asked for."""
    from examples.rewards.registry import RewardInputError, load_reward_model

    rewards = {}
    for name in args.validation_reward_models:
        try:
            rewards[name] = load_reward_model(name, path=args.validation_reward_model_paths.get(name), device=device)
        except (OSError, RewardInputError) as error:
            reason = " ".join(str(error).split()) or type(error).__name__
            raise InputError(
                f"Could not load the validation reward {name}: {reason} Expected its published weights in the hub "
                f"cache, or --validation_reward_model_paths {name}=PATH naming a local copy."
            ) from error
    return rewards


@torch.no_grad()
def prompt_share(accelerator, prompts):
    """The indices of the prompts of validation by reward that this process draws: every num_processes-th one."""
    return list(range(accelerator.process_index, len(prompts), accelerator.num_processes))


@torch.no_grad()
def validation_reward_scores(args, accelerator, vae, transformer, noise_scheduler, rewards, prompts, embeddings):
    """Draw --validation_images_per_prompt images of each of `prompts` with `transformer` and score them with each
    reward: {reward name: scores (P, K)}, on every process.

    Image k of prompt i starts from a CPU generator seeded with validation_image_seed(--seed, i, k), as
    examples/eval/generate.py draws it: every validation, the base's included, starts from the same noise. The
    prompts are split between the processes (prompt_share; `embeddings` are the validation_embeddings of this
    process's share) and the scores gathered.
    """
    mine = prompt_share(accelerator, prompts)
    generators = [
        [
            torch.Generator("cpu").manual_seed(validation_image_seed(args.seed, i, k))
            for k in range(args.validation_images_per_prompt)
        ]
        for i in mine
    ]
    training = transformer.training
    transformer.eval()
    images = render_validation(args, accelerator, vae, transformer, noise_scheduler, embeddings, generators)
    transformer.train(training)
    scores = {}
    for i, prompt_images in zip(mine, images):
        scores[i] = {name: reward.score(prompt_images, prompts[i]).tolist() for name, reward in rewards.items()}
    gathered = {}
    for part in gather_object([scores]):
        gathered.update(part)
    return {name: np.array([gathered[i][name] for i in range(len(prompts))]) for name in rewards}


REWARD_VALIDATION_RECORD = "reward_validation.json"  # in validation/: what a resumed run validated before


def reward_validation_settings(args, prompts):
    """What makes win-rates of two validations comparable: the same rewards, prompts, seeds and sampler."""
    return {
        "rewards": args.validation_reward_models,
        "reward_model_paths": args.validation_reward_model_paths,
        "prompts": prompts,
        "images_per_prompt": args.validation_images_per_prompt,
        "seed": args.seed,
        "inference_steps": args.validation_inference_steps,
        "guidance_scale": args.validation_guidance_scale,
        "resolution": args.resolution,
        "max_sequence_length": args.max_sequence_length,
    }


def read_reward_validation_record(args, settings, first_step):
    """{step: metrics} of the validations that an interrupted run made up to `first_step`, with the same settings."""
    path = Path(args.output_dir, "validation", REWARD_VALIDATION_RECORD)
    if first_step == 0 or not path.is_file():
        return {}
    record = json.loads(path.read_text())
    if record.get("settings") != settings:
        logger.warning(f"{path} was written with other validation settings; its win-rates are not carried over.")
        return {}
    return {int(step): metrics for step, metrics in record["steps"].items() if int(step) <= first_step}


def write_reward_validation_record(args, settings, history):
    path = Path(args.output_dir, "validation", REWARD_VALIDATION_RECORD)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(
        {"settings": settings, "steps": {str(step): history[step] for step in sorted(history)}}, indent=2
    )
    write_atomically(path, lambda temporary: temporary.write_text(text))


@contextlib.contextmanager
def adapters_disabled(transformer, lora):
    """With LoRA, the transformer with its adapters switched off is the base model; without LoRA, nothing to switch."""
    if lora:
        transformer.disable_adapters()
    try:
        yield transformer
    finally:
        if lora:
            transformer.enable_adapters()


@torch.no_grad()
def reference_prediction(transformer, ref_transformer, args, noisy_latents, sigmas, conditioning, num_train_timesteps):
    """The frozen reference's output: `transformer` (unwrapped) with its LoRA adapters off, or the frozen copy
    `ref_transformer` of full fine-tuning, which is held in the weight dtype."""
    if ref_transformer is None:
        with adapters_disabled(transformer, args.lora_rank):
            return transformer_prediction(
                transformer, noisy_latents, sigmas, conditioning, args.precondition_outputs, num_train_timesteps
            )
    dtype = ref_transformer.dtype
    conditioning = {key: value.to(dtype) for key, value in conditioning.items()}
    model_output = ref_transformer(
        hidden_states=noisy_latents.to(dtype),
        timestep=sigmas * num_train_timesteps,
        **conditioning,
        return_dict=False,
    )[0]
    if args.precondition_outputs:
        return preconditioned_outputs(model_output.float(), noisy_latents, sigmas)
    return model_output


# ----------------------------------------------------------------------------------------------
# Memory and saving
# ----------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory of each phase of a run (cache build, training loop, validation), not of the whole process.

    CUDA's allocator peak on a GPU; on the CPU the process's peak resident set size, whose high-water
    mark Linux resets through /proc/self/clear_refs. `switch(phase)` closes the running phase (a phase
    that runs several times keeps its largest peak) and restarts the counter.
    """

    def __init__(self, device):
        self.device = device
        self.kind = "cuda" if device.type == "cuda" else "rss"
        self.peaks = {}
        self.current = None

    def read(self):
        if self.kind == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        try:
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
        except (OSError, StopIteration):  # not Linux: ru_maxrss, the whole process's peak
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)

    def reset(self):
        if self.kind == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        except OSError:
            self.kind = "rss of the whole process (its peak cannot be reset here)"

    def switch(self, phase):
        if self.current is not None:
            self.peaks[self.current] = max(self.peaks.get(self.current, 0), self.read())
        self.current = phase
        self.reset()

    @contextlib.contextmanager
    def phase(self, name):
        outer = self.current
        self.switch(name)
        try:
            yield
        finally:
            self.switch(outer)


def write_atomically(path, write):
    """`write(temporary path)` in the same folder, then rename it to `path`: an error exit leaves the earlier file or
    none, never half a file."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


# diffusers' train_dreambooth_lora_sd3.py default: every joint block's attention, the context stream's projections too
LORA_TARGET_MODULES = [
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
]


def add_lora_adapters(transformer, rank, alpha, mixed_precision):
    """LoRA on the joint blocks' attention projections, base weights frozen; under fp16 the adapters train in
    float32."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=LORA_TARGET_MODULES)
    )
    if mixed_precision == "fp16":
        cast_training_params(transformer, dtype=torch.float32)


def lora_state_dict(transformer):
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer)  # saved as diffusers' SD3 scripts save it


def freeze(models, device):
    """Frozen (no gradients) and on `device`: the models that are not None."""
    for model in models:
        if model is not None:
            model.requires_grad_(False).to(device)


def weights_fingerprint(model):
    """sha256 of the trained parameters' bytes: equal on every process after a correct data-parallel run."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def method_description(args):
    if args.weighting_scheme is None:
        low, high = args.log_snr_range
        draw = f"lambda ~ U[{low:g}, {high:g}]"
    else:
        draw = f"sigma ~ {args.weighting_scheme}"
    weighting = f"sigmoid weighting b = {args.sigmoid_bias:g}" if args.loss_weighting == "sigmoid" else "no weighting"
    return (
        f"{OBJECTIVE_NAMES[args.objective]} (beta = {args.beta_capo:g}, {draw} with {weighting}, "
        f"{'shared' if args.shared_noise else 'independent'} noise)"
    )


def write_model_card(args, summary):
    method = method_description(args)
    weights = (
        f"`pytorch_lora_weights.safetensors` (LoRA rank {args.lora_rank}, for "
        "`StableDiffusion3Pipeline.load_lora_weights`)"
        if args.lora_rank
        else "`transformer/`"
    )
    if args.skip_final_save:
        weights = "not saved (--skip_final_save)"
    rows = dict(summary.get("last_step_metrics", {}))
    for when in ("before", "after"):
        key = f"heldout_preference_accuracy_{when}"
        if key in summary:
            rows[f"held-out preference accuracy ({args.preference_eval_split}), {when} training"] = summary[key]
    metrics = "\n".join(f"| {key} | {value:.4f} |" for key, value in rows.items())
    card = f"""---
base_model: {args.pretrained_model_name_or_path}
tags: [sd3, stable-diffusion-3, text-to-image, diffusers, capo, {args.objective}]
---
# {Path(args.output_dir).name}

{method} of `{args.pretrained_model_name_or_path}` on `{args.dataset_name}` (split `{args.dataset_split_name}`),
{steps(summary["global_step"])} of {summary["total_batch_size"]} pairs, learning rate {args.learning_rate:g}
({args.lr_scheduler}), trained with `train_capo_sd3.py`. Weights: {weights}.

Metrics of the last optimizer step:

| metric | value |
|---|---|
{metrics}
"""
    write_atomically(Path(args.output_dir, "README.md"), lambda path: path.write_text(card))


def steps(count):
    return f"{count} optimizer step{'' if count == 1 else 's'}"


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def main(args):
    logging_dir = Path(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    logger.info(accelerator.state, main_process_only=False)
    launched = int(os.environ.get("WORLD_SIZE", accelerator.num_processes))
    if launched != accelerator.num_processes:
        # accelerate enables FSDP and DeepSpeed only on GPUs; elsewhere each process would train alone.
        raise InputError(
            f"accelerate launched {launched} processes but set up {accelerator.num_processes}; expected one "
            "distributed run. FSDP and DeepSpeed configs need GPUs: on a CPU use ACCELERATE_USE_CPU=1 with "
            "--multi_gpu (DDP)."
        )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise InputError(
            "--mixed_precision fp16 needs a GPU: on the CPU accelerate autocasts to bfloat16, which does not mix "
            "with float16 weights. Use --mixed_precision bf16 (or no) here."
        )
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    if args.seed is None:
        # Every process must share the seed: it fixes the data order that the processes shard.
        seed = [int(torch.randint(0, 2**31 - 1, (1,)).item())]
        broadcast_object_list(seed)
        args.seed = seed[0]
        logger.info(f"No --seed given; using {args.seed}.")
    set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    # Data first: a bad dataset stops the run before any model is loaded.
    with accelerator.main_process_first():
        train_split = load_split(args.dataset_name, args.dataset_split_name, args.cache_dir)
        train_split, dropped = prepare_rows(train_split, args, args.dataset_split_name)
        if args.max_train_samples is not None:
            train_split = train_split.shuffle(seed=args.seed)
            train_split = train_split.select(range(min(args.max_train_samples, len(train_split))))
        eval_split = None
        if args.preference_eval_split is not None:
            eval_split = load_split(args.dataset_name, args.preference_eval_split, args.cache_dir)
            eval_split, _ = prepare_rows(eval_split, args, args.preference_eval_split)
            eval_split = eval_split.select(range(min(args.preference_eval_max_samples, len(eval_split))))
    reasons = ", ".join(f"{count} ({SKIP_REASONS[reason]})" for reason, count in dropped.items() if count)
    logger.info(f"Training on {len(train_split)} pairs; skipped rows: {reasons or 'none'}.")

    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.push_to_hub:
            from huggingface_hub import create_repo

            repo_name = args.hub_model_id or Path(args.output_dir).name
            repo_id = create_repo(repo_name, exist_ok=True, token=args.hub_token).repo_id

    # The rewards of validation by reward next: weights that cannot be found stop the run before SD3 loads.
    validation_rewards, reward_prompts = {}, []
    if args.validation_reward_models:
        validation_rewards = load_validation_rewards(args, accelerator.device)
        reward_prompts = read_validation_prompts(args.validation_reward_prompts)

    # Models. Frozen weights are loaded in the weight dtype (casting after loading warns in diffusers).
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    model_path = args.pretrained_model_name_or_path
    load_kwargs = {"revision": args.revision, "cache_dir": args.cache_dir}
    # With a finished --cache_latents cache and nothing else to encode, no text encoder is loaded at all.
    storage_dtype = torch.float16 if weight_dtype == torch.float16 else torch.float32  # numpy has no bfloat16
    cache_path = latents_cache_path(args, train_split, storage_dtype) if args.cache_latents else None
    needs_text_encoders = (
        cache_path is None
        or not (cache_path / "complete.json").exists()
        or eval_split is not None
        or bool(args.validation_prompts)
        or bool(validation_rewards)
    )
    try:
        model_index = StableDiffusion3Pipeline.load_config(model_path, **load_kwargs)
        check_pipeline_class(model_path, model_index)  # a hub id's family is known only now
        noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
            model_path, subfolder="scheduler", **load_kwargs
        )
        text_encoders, tokenizers = [None, None, None], [None, None, None]
        if needs_text_encoders:
            for i, subfolder in enumerate(("text_encoder", "text_encoder_2")):
                tokenizers[i] = transformers.CLIPTokenizer.from_pretrained(
                    model_path, subfolder=subfolder.replace("text_encoder", "tokenizer"), **load_kwargs
                )
                text_encoders[i] = transformers.CLIPTextModelWithProjection.from_pretrained(
                    model_path, subfolder=subfolder, variant=args.variant, dtype=weight_dtype, **load_kwargs
                )
            if (model_index.get("text_encoder_3") or [None])[0] is not None:  # SD3 may ship without T5
                tokenizers[2] = transformers.AutoTokenizer.from_pretrained(
                    model_path, subfolder="tokenizer_3", **load_kwargs
                )
                text_encoders[2] = transformers.T5EncoderModel.from_pretrained(
                    model_path, subfolder="text_encoder_3", variant=args.variant, dtype=weight_dtype, **load_kwargs
                )
            else:
                logger.info(f"{model_path} has no text_encoder_3 (T5): its tokens are zeros, as the pipeline's are.")
        # The VAE stays float32, as in diffusers' SD3 scripts.
        vae = AutoencoderKL.from_pretrained(
            model_path, subfolder="vae", variant=args.variant, dtype=torch.float32, **load_kwargs
        )
        transformer = SD3Transformer2DModel.from_pretrained(
            model_path,
            subfolder="transformer",
            variant=args.variant,
            dtype=weight_dtype if args.lora_rank else torch.float32,  # LoRA trains adapters only
            **load_kwargs,
        )
        ref_transformer = None
        if not args.lora_rank:  # full fine-tuning: the reference is a frozen copy
            ref_transformer = SD3Transformer2DModel.from_pretrained(
                model_path, subfolder="transformer", variant=args.variant, dtype=weight_dtype, **load_kwargs
            )
    except OSError as error:  # not on the hub (or the hub out of reach), or a file missing in a local folder
        reason = str(error).strip().splitlines()[0].rstrip(".")
        raise InputError(
            f"Could not load the SD3 models of {model_path!r}: {reason}. Expected a local diffusers folder or a hub "
            "id reachable from here."
        ) from error
    logger.info(f"Found a {model_index.get('_class_name')} (SD3 family): CaPO's SD3-M defaults apply.")
    freeze([vae, *text_encoders], accelerator.device)
    transformer.to(accelerator.device)
    if ref_transformer is not None:
        ref_transformer.requires_grad_(False).eval().to(accelerator.device)
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    joint_attention_dim = transformer.config.joint_attention_dim

    def encode_captions(captions):
        return encode_prompts(text_encoders, tokenizers, captions, args.max_sequence_length, joint_attention_dim)

    if args.lora_rank:
        add_lora_adapters(transformer, args.lora_rank, args.lora_alpha, accelerator.mixed_precision)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()

    # Checkpoints hold only what is trained: the LoRA file, or the transformer folder.
    def save_transformer(model, folder):
        """Save the full transformer; under FSDP the shards are gathered first (a collective: every process calls
        this)."""
        state_dict = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            model = accelerator.unwrap_model(model)
            if accelerator.distributed_type == DistributedType.FSDP:
                model = SD3Transformer2DModel.from_config(model.config)
                model.load_state_dict(state_dict)
            model.save_pretrained(folder)

    def save_lora(model, folder):
        if accelerator.is_main_process:
            model = accelerator.unwrap_model(model)
            # the adapter's config (rank, alpha) goes into the file: without it a loader takes alpha = rank
            layers, metadata = lora_state_dict(model), model.peft_config["default"].to_dict()
            write_atomically(
                Path(folder, LORA_WEIGHT_NAME),
                lambda path: StableDiffusion3Pipeline.save_lora_weights(
                    folder,
                    transformer_lora_layers=layers,
                    transformer_lora_adapter_metadata=metadata,
                    weight_name=path.name,
                ),
            )

    def save_model_hook(models, weights, output_dir):
        for model in models:
            if args.lora_rank:
                save_lora(model, output_dir)
            else:
                save_transformer(model, os.path.join(output_dir, "transformer"))
        while weights:
            weights.pop()

    def load_model_hook(models, input_dir):
        if not models:  # DeepSpeed and FSDP restored the model (and optimizer) from their own files
            return
        model = accelerator.unwrap_model(models.pop())
        if args.lora_rank:
            from peft.utils import set_peft_model_state_dict

            lora_weights = StableDiffusion3Pipeline.lora_state_dict(input_dir)
            transformer_weights = {
                k.removeprefix("transformer."): v for k, v in lora_weights.items() if k.startswith("transformer.")
            }
            incompatible = set_peft_model_state_dict(
                model, convert_unet_state_dict_to_peft(transformer_weights), "default"
            )
            if incompatible is not None and getattr(incompatible, "unexpected_keys", None):
                raise InputError(
                    f"The checkpoint in {input_dir} has LoRA weights this model lacks: "
                    f"{incompatible.unexpected_keys[:5]}; resume with the --lora_rank of the run that wrote it."
                )
            if accelerator.mixed_precision == "fp16":  # also when fp16 comes from accelerate's config
                cast_training_params(model, dtype=torch.float32)
        else:
            loaded = SD3Transformer2DModel.from_pretrained(input_dir, subfolder="transformer")
            model.register_to_config(**loaded.config)
            model.load_state_dict(loaded.state_dict())
            del loaded

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    # Optimizer
    if args.scale_lr:
        total_pairs = args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        args.learning_rate = args.learning_rate * total_pairs
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW  # with --adam_weight_decay 0 (the default) it is Adam, the paper's
    params_to_optimize = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = optimizer_class(
        params_to_optimize,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )

    # Dataset and dataloader
    memory = PeakMemory(accelerator.device)
    train_dataset = CaPOPairs(train_split, args, augment=True)
    cache_skipped = []
    validation_prompt_embeddings = None
    if args.validation_prompts and accelerator.is_main_process:
        validation_prompt_embeddings = validation_embeddings(encode_captions, args.validation_prompts)
    reward_prompt_embeddings = None  # this process's share, encoded now: the text encoders may be freed below
    if validation_rewards:
        mine = [reward_prompts[i] for i in prompt_share(accelerator, reward_prompts)]
        reward_prompt_embeddings = validation_embeddings(encode_captions, mine)
    if args.cache_latents:
        reusing = (cache_path / "complete.json").exists()
        logger.info(f"--cache_latents: {'reusing' if reusing else 'building'} {cache_path}")
        if not needs_text_encoders:
            logger.info("--cache_latents: every caption is in the cache, so no text encoder was loaded.")
        if args.random_crop or args.random_flip:
            logger.info("--cache_latents: each pair's crop and flip are drawn once and cached.")
        with memory.phase("cache_build"):
            train_dataset, cache_skipped = build_latents_cache(
                accelerator, args, train_dataset, vae, encode_captions, cache_path, storage_dtype
            )
        for index, reason in cache_skipped:
            logger.warning(f"Skipped pair {index} while caching: undecodable image ({reason}).")
        if len(train_dataset) == 0:
            index, reason = cache_skipped[0]
            raise InputError(
                f"Every one of the {len(cache_skipped)} pairs of {args.dataset_name!r} has an undecodable image "
                f"(pair {index}: {reason}); expected encoded images in the image columns."
            )
        if eval_split is None:  # nothing left to encode: free the text encoders (T5-XXL alone is 9 GiB in bf16)
            text_encoders[:] = [None, None, None]
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    eval_dataset = CaPOPairs(eval_split, args, augment=False) if eval_split is not None else None
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset,
        shuffle=True,
        batch_size=args.train_batch_size,
        collate_fn=collate_fn,
        num_workers=args.dataloader_num_workers,
        pin_memory=torch.cuda.is_available(),
    )

    # Schedule (steps counted per process before prepare(), as diffusers' scripts do)
    batches_per_epoch = math.ceil(len(train_dataset) / (args.train_batch_size * accelerator.num_processes))
    num_update_steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)
    first_step = checkpoint_step(args.resume_from_checkpoint) if args.resume_from_checkpoint else 0
    if first_step >= args.max_train_steps:
        if accelerator.is_main_process:
            print(
                f"== Nothing to train: {args.resume_from_checkpoint} is at step {first_step} of "
                f"{args.max_train_steps}. The finished run's outputs in {args.output_dir} were left as they are; "
                "raise --max_train_steps to train further.",
                flush=True,
            )
        accelerator.end_training()
        return
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )

    transformer, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        transformer, optimizer, train_dataloader, lr_scheduler
    )
    params_to_optimize = [p for p in transformer.parameters() if p.requires_grad]  # FSDP and DeepSpeed replace them

    if accelerator.is_main_process and args.overwrite:  # late: a run stopped by its data or models deletes nothing
        deleted = delete_earlier_outputs(args)
        if deleted:
            logger.info(f"--overwrite: deleted the earlier run's {', '.join(deleted)} in {args.output_dir}")
    accelerator.wait_for_everyone()  # nothing is written into --output_dir before the earlier outputs are gone
    if accelerator.is_main_process:
        tracker_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    training = f"LoRA rank {args.lora_rank}" if args.lora_rank else "full fine-tuning"
    logger.info("***** Running training *****")
    precondition = ", preconditioned outputs" if args.precondition_outputs else ""
    logger.info(f"  Method = {method_description(args)}, {training}{precondition}")
    logger.info(
        f"  Num pairs = {len(train_dataset)}, epochs = {args.num_train_epochs}, steps = {args.max_train_steps}"
    )
    logger.info(
        f"  Pairs per device = {args.train_batch_size}, total batch (parallel, accumulation) = {total_batch_size}"
    )

    def heldout_accuracy():
        transformer.eval()
        with memory.phase("validation"):
            model = accelerator.unwrap_model(transformer)
            accuracy = preference_accuracy(
                accelerator, model, vae, encode_captions, noise_scheduler, eval_dataset, args, weight_dtype
            )
        transformer.train()
        return accuracy

    def render(model):
        return render_validation_prompts(args, accelerator, vae, model, noise_scheduler, validation_prompt_embeddings)

    def validate(step):
        with memory.phase("validation"):
            images = render(accelerator.unwrap_model(transformer))
            log_validation(args, accelerator, base_images, images, step)

    def reward_scores(model):
        return validation_reward_scores(
            args,
            accelerator,
            vae,
            model,
            noise_scheduler,
            validation_rewards,
            reward_prompts,
            reward_prompt_embeddings,
        )

    def keep_best(step):
        """This step's weights replace best/: written beside it, then renamed into place."""
        best, staging = Path(args.output_dir, "best"), Path(args.output_dir, ".best.partial")
        if accelerator.is_main_process and staging.exists():
            shutil.rmtree(staging)
        if args.lora_rank:
            save_lora(transformer, staging)
        else:
            save_transformer(transformer, staging / "transformer")
        if accelerator.is_main_process:
            retired = Path(args.output_dir, ".best.replaced")
            if best.exists():
                os.replace(best, retired)
            os.replace(staging, best)
            if retired.exists():
                shutil.rmtree(retired)
            logger.info(f"Step {step} has the best validation win-rate so far; its weights are in {best}")
        accelerator.wait_for_everyone()

    def validate_by_reward(step, scores=None):
        """Log the win-rate against the base's images and the mean reward of this step's images (`scores`, or drawn
        now), per reward and averaged; with --keep_best_checkpoint, keep the weights of the best step so far."""
        if scores is None:
            with memory.phase("validation"):
                scores = reward_scores(accelerator.unwrap_model(transformer))
        metrics = reward_validation_metrics(scores, base_reward_scores)
        accelerator.log({f"validation/{name}": value for name, value in metrics.items()}, step=step)
        per_reward = describe_reward_validation(metrics, validation_rewards)
        logger.info(f"Step {step}: validation win-rate against the base {metrics['win_rate']:.3f}: {per_reward}")
        reward_history[step] = metrics
        if accelerator.is_main_process:
            write_reward_validation_record(args, reward_settings, reward_history)
        win_rates = {done: values["win_rate"] for done, values in reward_history.items()}
        if args.keep_best_checkpoint and best_validation_step(win_rates) == step:
            keep_best(step)

    # Measured on the starting model, before a checkpoint is loaded.
    summary = {}
    if eval_dataset is not None:
        summary["heldout_preference_accuracy_before"] = heldout_accuracy()
        logger.info(
            f"Held-out preference accuracy before training: {summary['heldout_preference_accuracy_before']:.3f}"
        )
        if first_step == 0:
            accelerator.log({"heldout_preference_accuracy": summary["heldout_preference_accuracy_before"]}, step=0)
    base_images = None
    if validation_prompt_embeddings is not None:
        with memory.phase("validation"):
            with adapters_disabled(accelerator.unwrap_model(transformer), args.lora_rank) as base:
                base_images = render(base)
    base_reward_scores, reward_history = None, {}
    if validation_rewards:
        with memory.phase("validation"):
            with adapters_disabled(accelerator.unwrap_model(transformer), args.lora_rank) as base:
                base_reward_scores = reward_scores(base)
        reward_settings = reward_validation_settings(args, reward_prompts)
        reward_history = read_reward_validation_record(args, reward_settings, first_step)
        if first_step == 0:
            validate_by_reward(0, base_reward_scores)  # the base against itself: 0.5

    global_step, first_epoch = first_step, first_step // num_update_steps_per_epoch
    if args.resume_from_checkpoint:
        logger.info(f"Resuming from {args.resume_from_checkpoint}")
        accelerator.load_state(args.resume_from_checkpoint)

    progress_bar = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    skipped_total, step_metrics, step_seconds = 0, [], []
    memory.switch("training")
    step_started = time.perf_counter()
    for epoch in range(first_epoch, args.num_train_epochs):
        transformer.train()
        train_dataset.set_epoch(epoch)
        train_dataloader.set_epoch(epoch)
        dataloader = train_dataloader
        if epoch == first_epoch and global_step > 0:
            resume_batches = (global_step - epoch * num_update_steps_per_epoch) * args.gradient_accumulation_steps
            dataloader = accelerator.skip_first_batches(train_dataloader, resume_batches)
        for batch in dataloader:
            if batch["num_skipped"]:
                skipped_total += batch["num_skipped"]
                for index, reason in batch["skipped"]:
                    logger.warning(f"Skipped pair {index}: undecodable image ({reason}).", main_process_only=False)
            if "index" not in batch:
                index, reason = batch["skipped"][0]
                raise InputError(
                    f"Every pair of a batch of {args.dataset_name!r} had an undecodable image ({skipped_total} "
                    f"skipped so far; pair {index}: {reason}); expected encoded images in the image columns."
                )
            with accelerator.accumulate(transformer):
                generators = sample_generators(args.seed, epoch, batch["index"], accelerator.device)
                latents, condition, reward_pos, reward_neg = capo_batch_inputs(
                    batch, vae, encode_captions, args, accelerator.device, weight_dtype
                )
                noisy_latents, sigmas, target = noisy_pair_latents(noise_scheduler, latents, generators, args)
                conditioning = transformer_conditioning(concat_conditions(condition, condition))
                # The reference's two passes and the policy's two, each pair of images in one call.
                ref_pred = reference_prediction(
                    accelerator.unwrap_model(transformer),
                    ref_transformer,
                    args,
                    noisy_latents,
                    sigmas,
                    conditioning,
                    num_train_timesteps,
                )
                ref_losses_pos, ref_losses_neg = per_sample_mse(ref_pred, target).chunk(2)
                model_pred = transformer_prediction(
                    transformer, noisy_latents, sigmas, conditioning, args.precondition_outputs, num_train_timesteps
                )
                model_losses_pos, model_losses_neg = per_sample_mse(model_pred, target).chunk(2)
                weight_pos, weight_neg = loss_weights(sigmas, args).chunk(2)
                loss, metrics = capo_loss(
                    model_losses_pos,
                    model_losses_neg,
                    ref_losses_pos,
                    ref_losses_neg,
                    weight_pos,
                    weight_neg,
                    reward_pos,
                    reward_neg,
                    args.beta_capo,
                    args.objective,
                )

                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    max_norm = args.max_grad_norm if args.max_grad_norm > 0 else float("inf")
                    grad_norm = accelerator.clip_grad_norm_(params_to_optimize, max_norm)
                    if grad_norm is not None:
                        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
                            grad_norm = grad_norm.full_tensor()
                        metrics["grad_norm"] = (
                            grad_norm.detach() if torch.is_tensor(grad_norm) else torch.tensor(grad_norm)
                        )
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step_metrics.append(metrics)

            if accelerator.sync_gradients:
                global_step += 1
                progress_bar.update(1)
                # Mean over the accumulated micro-batches, then over processes: one all-reduce and one
                # device-to-host copy per optimizer step, whatever the number of metrics.
                names = list(step_metrics[-1])
                means = [
                    torch.stack([m[key].float().to(accelerator.device) for m in step_metrics if key in m]).mean()
                    for key in names
                ]
                logs = dict(zip(names, accelerator.reduce(torch.stack(means), "mean").tolist()))
                step_seconds.append(time.perf_counter() - step_started)  # .tolist() waited for the step's device work
                logs["lr"] = lr_scheduler.get_last_lr()[0]
                logs["skipped_pairs"] = skipped_total
                step_metrics = []
                accelerator.log(logs, step=global_step)
                postfix = {"loss": f"{logs['loss']:.4f}"}
                postfix["acc"] = f"{logs['implicit_acc']:.2f}"
                progress_bar.set_postfix(**postfix)
                summary["last_step_metrics"] = {k: v for k, v in logs.items() if k not in ("lr", "skipped_pairs")}

                if global_step % args.checkpointing_steps == 0:
                    if accelerator.is_main_process and args.checkpoints_total_limit is not None:
                        existing = list_checkpoints(args.output_dir)
                        for old in existing[: max(0, len(existing) - args.checkpoints_total_limit + 1)]:
                            shutil.rmtree(old)
                    save_path = os.path.join(args.output_dir, f"checkpoint-{global_step}")
                    accelerator.save_state(save_path)
                    logger.info(f"Saved state to {save_path}")

                if global_step % args.validation_steps == 0 and global_step < args.max_train_steps:
                    if eval_dataset is not None:
                        accuracy = heldout_accuracy()
                        accelerator.log({"heldout_preference_accuracy": accuracy}, step=global_step)
                        logger.info(f"Step {global_step}: held-out preference accuracy {accuracy:.3f}")
                    if base_images is not None:
                        validate(global_step)
                    if validation_rewards:
                        validate_by_reward(global_step)
                step_started = time.perf_counter()  # checkpointing and validation are not step time
            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps:
            break
    memory.switch(None)

    accelerator.wait_for_everyone()
    transformer.eval()
    if eval_dataset is not None:
        summary["heldout_preference_accuracy_after"] = heldout_accuracy()
        accelerator.log(
            {"heldout_preference_accuracy": summary["heldout_preference_accuracy_after"]}, step=global_step
        )
    skipped_total = int(accelerator.reduce(torch.tensor(skipped_total, device=accelerator.device), "sum").item())
    skipped_total += len(cache_skipped)
    if accelerator.num_processes > 1 and accelerator.distributed_type != DistributedType.FSDP:
        # Data-parallel replicas must end bit-identical; say so rather than assume it.
        fingerprints = gather_object([weights_fingerprint(accelerator.unwrap_model(transformer))])
        summary["replicas_identical"] = len(set(fingerprints)) == 1
        if not summary["replicas_identical"]:
            logger.warning(f"The trained weights differ between processes: {fingerprints}")
    if not args.skip_final_save:
        if args.lora_rank:
            save_lora(transformer, args.output_dir)
        else:
            save_transformer(transformer, os.path.join(args.output_dir, "transformer"))
    if base_images is not None:
        validate(global_step)
    if validation_rewards:
        validate_by_reward(global_step)
        summary["validation_win_rates"] = {step: reward_history[step]["win_rate"] for step in sorted(reward_history)}
        summary["validation_reward_metrics"] = {step: reward_history[step] for step in sorted(reward_history)}
        summary["best_checkpoint"] = best_validation_step(summary["validation_win_rates"])
    if accelerator.is_main_process:
        summary.update(
            {
                "method": "capo",
                "objective": args.objective,
                "beta_capo": args.beta_capo,
                "global_step": global_step,
                "total_batch_size": total_batch_size,
                "train_batch_size": args.train_batch_size,
                "lora_rank": args.lora_rank,
                "cache_latents": args.cache_latents,
                "loss_weighting": args.loss_weighting,
                "sigmoid_bias": args.sigmoid_bias,
                "log_snr_range": args.log_snr_range,
                "weighting_scheme": args.weighting_scheme,
                "shared_noise": args.shared_noise,
                "precondition_outputs": args.precondition_outputs,
                "skipped_pairs": skipped_total,
                "skipped_rows": dropped,
                # After the first two steps (allocation, kernel selection), as a benchmark would count them.
                "seconds_per_step_median": float(np.median(step_seconds[2:] or step_seconds)),
                "peak_memory_bytes": memory.peaks["training"],  # the training loop's own peak
                "peak_memory_by_phase_bytes": memory.peaks,
                "peak_memory_kind": memory.kind,
            }
        )
        text = json.dumps(summary, indent=2)
        write_atomically(Path(args.output_dir, "training_summary.json"), lambda path: path.write_text(text))
        write_model_card(args, summary)
        if args.push_to_hub:
            from huggingface_hub import upload_folder

            upload_folder(
                repo_id=repo_id,
                folder_path=args.output_dir,
                commit_message="End of training",
                ignore_patterns=["checkpoint-*", "logs/*"],
                token=args.hub_token,
            )
        print_summary(args, summary)
    accelerator.end_training()


def print_summary(args, summary):
    name = OBJECTIVE_NAMES[summary["objective"]]
    lines = [f"== {name} finished: {steps(summary['global_step'])}, output in {args.output_dir}"]
    if "heldout_preference_accuracy_before" in summary:
        lines.append(
            f"   held-out preference accuracy ({args.preference_eval_split}): "
            f"{summary['heldout_preference_accuracy_before']:.3f} before -> "
            f"{summary['heldout_preference_accuracy_after']:.3f} after"
        )
    finals = ", ".join(f"{key} {value:.4g}" for key, value in summary["last_step_metrics"].items())
    lines.append(f"   last step: {finals}")
    skipped = [f"{count} ({SKIP_REASONS[reason]})" for reason, count in summary["skipped_rows"].items() if count]
    lines.append(
        f"   skipped rows: {', '.join(skipped) or 'none'}; skipped undecodable pairs: {summary['skipped_pairs']}"
    )
    peaks = ", ".join(
        f"{phase} {value / 2**30:.2f} GiB" for phase, value in summary["peak_memory_by_phase_bytes"].items()
    )
    lines.append(
        f"   {summary['seconds_per_step_median']:.3f} s per step (median); "
        f"peak memory ({summary['peak_memory_kind']}): {peaks}"
    )
    if "replicas_identical" in summary:
        lines.append(f"   weights identical on all processes: {'yes' if summary['replicas_identical'] else 'NO'}")
    if "best_checkpoint" in summary:
        win_rates = summary["validation_win_rates"]
        best = summary["best_checkpoint"]
        kept = f", its weights in {Path(args.output_dir, 'best')}" if args.keep_best_checkpoint else ""
        lines.append(
            "   validation win-rate against the base: "
            + ", ".join(f"{win_rates[step]:.3f} (step {step})" for step in win_rates)
            + f"; best step {best}{kept}"
        )
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    try:
        main(ARGS)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
