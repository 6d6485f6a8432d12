#!/usr/bin/env python
"""MaPO, margin-aware preference optimization (Hong et al.), for SDXL. Reference-free.

The objective (MaPO Eq. 5-7 and Appendix A; docs/METHODS.md, "MaPO"): the same timestep and noise
for both images of a pair, per-sample errors l_w, l_l, and

    phi_beta(l) = (s l / (exp(s l) - 1)) ** beta          # Eq. 7, s = --snr_value
    loss = mean(l_w) - mean(logsigmoid(T (phi_beta(l_w) - phi_beta(l_l)))) / beta

No reference network is built or evaluated. Example (Pick-a-Pic v2, the paper's beta):

    accelerate launch train_mapo_sdxl.py --beta_mapo 8 \\
      --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
      --dataset_name yuvalkirstain/pickapic_v2 --resolution 1024 --train_batch_size 4 \\
      --learning_rate 1e-7 --max_train_steps 2000 --mixed_precision bf16 --output_dir sdxl-mapo
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


LR_SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
PIPELINE_FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "unet/config.json",
]  # what training reads first


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
        default="stabilityai/stable-diffusion-xl-base-1.0",
        help="Hub id or local folder of an SDXL pipeline.",
    )
    model.add_argument(
        "--pretrained_vae_model_name_or_path",
        type=str,
        default=None,
        help="A different VAE, e.g. madebyollin/sdxl-vae-fp16-fix (then the VAE runs in the weight dtype; "
        "SDXL's own VAE stays in float32).",
    )
    model.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model on the hub.")
    model.add_argument("--variant", type=str, default=None, help="Weight variant to load, e.g. fp16.")
    model.add_argument(
        "--prediction_type",
        type=str,
        default=None,
        choices=["epsilon", "v_prediction"],
        help="Override the scheduler's prediction type (default: the model's own).",
    )
    model.add_argument(
        "--lora_rank",
        type=int,
        default=None,
        help="Train LoRA adapters of this rank on the UNet attention layers instead of the full UNet.",
    )
    model.add_argument("--lora_alpha", type=int, default=None, help="LoRA alpha (default: the rank, i.e. scale 1).")

    method = parser.add_argument_group("method")
    method.add_argument(
        "--beta_mapo",
        type=finite_float,
        default=8.0,
        help="beta of MaPO Eq. 5-7: exponent of phi and 1/beta weight of the margin. Paper Table 3: 8 preference "
        "alignment (Pick-a-Pic), 32 culture, 64 safety and style, 1024 personalization.",
    )
    method.add_argument(
        "--snr_value",
        type=finite_float,
        default=0.5,
        help="s of MaPO Appendix A, a constant scale of the errors inside phi (the authors' default).",
    )

    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset_name",
        type=str,
        default="yuvalkirstain/pickapic_v2",
        help="A datasets hub name, a local folder (parquet/arrow/csv/json files, or save_to_disk output) or a "
        "single data file.",
    )
    data.add_argument("--dataset_split_name", type=str, default="train", help="Split to train on.")
    data.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are cached.")
    data.add_argument("--caption_column", type=str, default="caption", help="Column with the prompts.")
    data.add_argument(
        "--image_0_column",
        type=str,
        default="jpg_0",
        help="Pick-a-Pic schema: first image (encoded bytes or datasets Image).",
    )
    data.add_argument("--image_1_column", type=str, default="jpg_1", help="Pick-a-Pic schema: second image.")
    data.add_argument(
        "--label_column",
        type=str,
        default="label_0",
        help="Pick-a-Pic schema: 1 if image_0 is preferred, 0 if image_1 is, 0.5 for a tie (ties are dropped and "
        "counted).",
    )
    data.add_argument(
        "--chosen_column",
        type=str,
        default=None,
        help="Ordered-pair schema: column of preferred images. Use with --rejected_column instead of the "
        "Pick-a-Pic columns.",
    )
    data.add_argument(
        "--rejected_column", type=str, default=None, help="Ordered-pair schema: column of dispreferred images."
    )
    data.add_argument(
        "--max_train_samples",
        type=int,
        default=None,
        help="Train on a random subset of this many pairs (after dropping ties).",
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
        "--no_hflip",
        action="store_true",
        help="Disable random horizontal flips (otherwise both images of a pair flip together).",
    )
    data.add_argument(
        "--vae_encode_batch_size",
        type=int,
        default=1,
        help="Images per VAE encoder call. SDXL's float32 VAE at 1024 px peaked at 31 GiB with 8 per call on an "
        "H100, three times the LoRA training loop; 1 keeps encoding (and the --cache_latents build) below it.",
    )
    data.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode every image (VAE) and caption (text encoders) once before training, spread over the "
        "processes, and train on that cache, so the loop runs only the UNet. Each pair's crop and flip are drawn "
        "once, before caching. Later runs with the same data, model, resolution and augmentation reuse the cache.",
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
        help="Fixed (timestep, noise) draws per pair; a pair counts as right when its mean error on the winner is "
        "lower.",
    )

    training = parser.add_argument_group("training")
    training.add_argument(
        "--output_dir", type=str, default="mapo-sdxl", help="Where checkpoints, weights, logs and the model card go."
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
        "--learning_rate", type=finite_float, default=1e-7, help="Peak learning rate (after --scale_lr if given)."
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
    training.add_argument("--lr_warmup_steps", type=int, default=200, help="Warm-up steps of the schedule.")
    training.add_argument("--adam_beta1", type=finite_float, default=0.9, help="AdamW beta1.")
    training.add_argument("--adam_beta2", type=finite_float, default=0.999, help="AdamW beta2.")
    training.add_argument("--adam_weight_decay", type=finite_float, default=1e-2, help="AdamW weight decay.")
    training.add_argument("--adam_epsilon", type=finite_float, default=1e-8, help="AdamW epsilon.")
    training.add_argument(
        "--max_grad_norm",
        type=finite_float,
        default=1.0,
        help="Gradient clipping norm (0 disables clipping; the norm is still logged).",
    )
    training.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW.")
    training.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Recompute UNet activations in the backward pass to save memory.",
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
        "benchmarks, where a full SDXL UNet is 10 GB of disk per run.",
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
    logs.add_argument("--tracker_project_name", type=str, default="mapo-sdxl", help="Project name in the tracker.")
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

    argv = sys.argv[1:] if input_args is None else [str(arg) for arg in input_args]
    if any(arg.split("=")[0] == "--instance_data_dir" for arg in argv):
        parser.error(
            "--instance_data_dir is personalization, which train_mapo_personalization_sdxl.py trains (same flags); "
            "this script trains on a preference dataset (--dataset_name)."
        )
    args = parser.parse_args(input_args)
    try:
        check_args(args)
    except InputError as error:
        parser.error(str(error))
    return args


def check_args(args):
    """Refuse bad settings before any import or model load; resolve --resume_from_checkpoint to a folder."""
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise InputError(
            "--use_8bit_adam needs bitsandbytes, which is not installed here: pip install bitsandbytes (its 8-bit "
            "AdamW runs on GPUs and, more slowly, on the CPU)."
        )
    if args.beta_mapo <= 0:
        raise InputError(f"--beta_mapo must be positive (Pick-a-Pic setting: 8), got {args.beta_mapo}.")
    if args.snr_value <= 0:
        raise InputError(f"--snr_value must be positive (default 0.5), got {args.snr_value}.")
    if args.lora_rank is not None and args.lora_rank <= 0:
        raise InputError(f"--lora_rank must be a positive integer, got {args.lora_rank}.")
    if (args.chosen_column is None) != (args.rejected_column is None):
        raise InputError(
            "--chosen_column and --rejected_column go together: give both for an ordered-pair dataset, or neither "
            "for the Pick-a-Pic schema."
        )
    if args.resolution <= 0 or args.resolution % 8 != 0:
        raise InputError(
            f"--resolution must be a positive multiple of 8 (the VAE downsamples 8x), got {args.resolution}."
        )
    positive = ["train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_steps"]
    positive += ["preference_eval_timesteps", "vae_encode_batch_size", "num_train_epochs"]
    positive += ["validation_images_per_prompt"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise InputError(f"--{name} must be positive, got {getattr(args, name)}.")
    check_validation_reward_args(args)
    for name in ("max_train_steps", "max_train_samples"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise InputError(f"--{name} must be positive, got {getattr(args, name)}.")
    check_not_sd3(args.pretrained_model_name_or_path)
    check_local_path("--pretrained_model_name_or_path", args.pretrained_model_name_or_path, PIPELINE_FILES)
    if args.pretrained_vae_model_name_or_path is not None:
        check_local_path(
            "--pretrained_vae_model_name_or_path", args.pretrained_vae_model_name_or_path, ["config.json"]
        )
    check_local_path("--dataset_name", args.dataset_name, [])
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise InputError(f"--output_dir {args.output_dir!r} is a file; give a folder (it is created if missing).")
    if args.overwrite and args.resume_from_checkpoint is not None:
        raise InputError(
            "--overwrite deletes the earlier run's outputs that --resume_from_checkpoint continues; give one of them."
        )
    resuming = args.resume_from_checkpoint is not None
    args.resume_from_checkpoint = resolve_checkpoint(args)
    check_output_dir(args, resuming)


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


def check_not_sd3(value):
    """An SD3 or SD3.5 pipeline folder (model_index.json's _class_name) is trained by train_mapo_sd3.py."""
    path = Path(value).expanduser() / "model_index.json"
    if not names_local_path(value) or not path.is_file():
        return
    found = ""
    with contextlib.suppress(OSError, ValueError, AttributeError):  # unreadable: the usual checks say what is wrong
        found = str(json.loads(path.read_text()).get("_class_name", ""))
    if found.startswith("StableDiffusion3"):
        raise InputError(
            f"--pretrained_model_name_or_path {value!r} is a {found} (SD3, SD3.5; its model_index.json), not an "
            "SDXL pipeline; train it with train_mapo_sd3.py."
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
    candidates = (Path(value), Path(args.output_dir, value))
    if value == "latest":
        candidates = list_checkpoints(args.output_dir)[-1:]
        if not candidates:
            return None
    for candidate in candidates:
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


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
# What a run of this script writes into --output_dir, besides its --logging_dir folder. Another run's are refused
# unless it is resumed (--resume_from_checkpoint) or replaced (--overwrite); a user's other files there do not count.
RUN_OUTPUTS = ["training_summary.json", "README.md", LORA_WEIGHTS, "unet", "checkpoint-*", "validation", "best"]


def earlier_outputs(args):
    """The names in --output_dir that a run of this script writes there (RUN_OUTPUTS, the --logging_dir folder)."""
    folder = Path(args.output_dir)
    if not folder.is_dir():
        return []
    found = {path.name for pattern in RUN_OUTPUTS for path in folder.glob(pattern)}
    logs = Path(folder, args.logging_dir).resolve()
    if logs.exists() and logs.is_relative_to(folder.resolve()) and logs != folder.resolve():
        found.add(logs.relative_to(folder.resolve()).parts[0])
    return sorted(found)


def check_output_dir(args, resuming):
    """Refuse an --output_dir that holds an earlier run's outputs (unless this run resumes it or passes --overwrite)
    or that cannot be written: before anything loads, not at the final save."""
    found = earlier_outputs(args)
    if found and not args.overwrite and args.resume_from_checkpoint is None:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        remedy = (
            "Resume it with --resume_from_checkpoint latest, give a new --output_dir, or pass --overwrite to "
            "replace them."
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
        else:  # created when the run starts: probe where it will be, so that a refused run leaves no folder behind
            os.rmdir(tempfile.mkdtemp(prefix=".write-check.", dir=nearest))
    except OSError as error:
        raise InputError(f"--output_dir {args.output_dir!r} cannot be written ({error.strerror or error}).") from None


def remove_earlier_outputs(args):
    """--overwrite: delete what an earlier run left in --output_dir (earlier_outputs), and nothing else."""
    found = earlier_outputs(args)
    for name in found:
        path = Path(args.output_dir, name)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return found


def write_atomically(path, write):
    """`write(temporary path)` in the same folder, then rename it to `path`: an error exit leaves the earlier file
    or none, never half a file."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def safetensors_header(path):
    """The JSON header of a .safetensors file (tensor names, shapes, offsets), read with the standard library; a file
    that is cut short or not one stops the run with one line naming it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            length = int.from_bytes(file.read(8), "little")
            if size < 8 or length > size - 8:
                raise ValueError(f"{size} bytes, shorter than its header")
            header = json.loads(file.read(length))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        if 8 + length + end > size:
            raise ValueError(f"{size} bytes of the {8 + length + end} its header describes")
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
        raise InputError(
            f"{path} is not a complete .safetensors file ({error}): cut short or not one. Resume from another "
            "checkpoint-N, or start anew in a new --output_dir."
        ) from None
    return header


def check_optimizer_state(checkpoint):
    """accelerate's optimizer.bin, a torch zip file (DeepSpeed keeps the optimizer in pytorch_model/, sharded FSDP
    in optimizer_0/)."""
    optimizer = checkpoint / "optimizer.bin"
    if not optimizer.exists():
        if (checkpoint / "pytorch_model").is_dir() or (checkpoint / "optimizer_0").is_dir():
            return
        raise InputError(
            f"{checkpoint} has no optimizer.bin, so it cannot be resumed (a save that did not finish?); resume from "
            "another checkpoint-N, or start anew in a new --output_dir."
        )
    if not zipfile.is_zipfile(optimizer):
        raise InputError(
            f"{optimizer} is not a complete torch file (cut short?); resume from another checkpoint-N, or start anew "
            "in a new --output_dir."
        )


def check_checkpoint(checkpoint, args):
    """A checkpoint must be of this run's kind (LoRA of its --lora_rank, or a full UNet) and hold complete files: what
    differs is named in one line, before anything loads."""
    has_lora = (checkpoint / LORA_WEIGHTS).is_file()
    if has_lora and not args.lora_rank:
        raise InputError(f"{checkpoint} holds LoRA weights; resume it with the --lora_rank of the run that wrote it.")
    if args.lora_rank and not has_lora and (checkpoint / "unet").is_dir():
        raise InputError(f"{checkpoint} holds a full UNet (full fine-tuning); resume it without --lora_rank.")
    if args.lora_rank:
        if not has_lora:
            raise InputError(
                f"{checkpoint} holds no {LORA_WEIGHTS}; expected a checkpoint of a LoRA run of this script."
            )
        header = safetensors_header(checkpoint / LORA_WEIGHTS)
        ranks = {entry["shape"][0] for key, entry in header.items() if re.search(r"^unet\..*(lora_A|lora\.down)", key)}
        if ranks and ranks != {args.lora_rank}:
            rank = ", ".join(map(str, sorted(ranks)))
            raise InputError(
                f"{checkpoint} holds LoRA weights of rank {rank}, not the --lora_rank {args.lora_rank} of this run; "
                f"resume it with --lora_rank {rank}."
            )
    else:
        weights = sorted((checkpoint / "unet").glob("*.safetensors"))
        if not weights:
            raise InputError(
                f"{checkpoint} holds neither {LORA_WEIGHTS} nor unet/*.safetensors; expected a checkpoint-N folder "
                "that this script wrote."
            )
        for path in weights:
            safetensors_header(path)
    check_optimizer_state(checkpoint)


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
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.optimization import get_scheduler  # noqa: E402
from diffusers.training_utils import cast_training_params  # noqa: E402
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from utils.diffusion import (  # noqa: E402
    DDPM_PREDICTION_TYPES,
    noisy_latents_and_target,
    per_sample_mse,
    sample_generators,
    sample_noise,
    sample_timesteps,
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
def log_u_over_expm1(u):
    """log(u / (exp(u) - 1)) for u >= 0, with the limit 0 at u = 0, finite with finite gradients everywhere."""
    small = u < 1e-4
    u_safe = torch.where(small, torch.ones_like(u), u)  # keeps the unused branch (and its gradient) finite
    # log(exp(u) - 1) = u + log(1 - exp(-u)) does not overflow for large u.
    exact = torch.log(u_safe) - u_safe - torch.log(-torch.expm1(-u_safe))
    series = -u / 2 - u**2 / 24  # Taylor expansion at 0; error O(u^4)
    return torch.where(small, series, exact)


def mapo_loss(model_losses_w, model_losses_l, beta_mapo, snr_value, num_train_timesteps):
    """MaPO (Hong et al., Eq. 5-7 and Appendix A; docs/METHODS.md). Inputs are per-sample errors, shape (B,).

    phi_beta is evaluated in log space and float64: with beta = 1024 the naive power underflows
    float32 once s*l exceeds about 0.2. The loss is never below mean(l_w).
    """
    log_phi_w = beta_mapo * log_u_over_expm1(snr_value * model_losses_w.double())  # (B,) Eq. 7
    log_phi_l = beta_mapo * log_u_over_expm1(snr_value * model_losses_l.double())  # (B,)
    logits = num_train_timesteps * (torch.exp(log_phi_w) - torch.exp(log_phi_l))  # (B,) Eq. 6, T * score difference
    margin = F.logsigmoid(logits)  # (B,)
    loss = model_losses_w.mean() - (margin.mean() / beta_mapo).to(model_losses_w.dtype)  # Eq. 5
    metrics = {
        "loss": loss.detach(),
        "implicit_acc": ((logits > 0).float() + 0.5 * (logits == 0).float()).mean().detach(),
        "reward_margin": logits.mean().float().detach(),
        "model_mse_w": model_losses_w.mean().detach(),
        "model_mse_l": model_losses_l.mean().detach(),
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
            return datasets.load_dataset(builder, data_files={split: str(path)}, split=split, cache_dir=cache_dir)
        if path.is_dir():
            # Name the folder's data files explicitly: the datasets cache is keyed on the files' modification times
            # only then. A folder whose README.md declares `configs:` (the data tools' cards do) is otherwise
            # keyed on the file patterns alone, and a rewritten folder would silently load its stale first version.
            builder = datasets.load_dataset_builder(str(path), cache_dir=cache_dir)
            files = {name: list(paths) for name, paths in (builder.config.data_files or {}).items()}
            return datasets.load_dataset(str(path), data_files=files or None, split=split, cache_dir=cache_dir)
        return datasets.load_dataset(dataset_name, split=split, cache_dir=cache_dir)
    except InputError:
        raise
    except Exception as error:  # datasets raises many kinds: a missing split or file, a file it cannot parse
        cause = error.__cause__ if error.__cause__ is not None else error  # DatasetGenerationError wraps the reason
        reason = " ".join(str(cause).split()).rstrip(".")[:300] or type(cause).__name__
        if path.is_file() and data_file_rows(path) == 0:
            reason = "the file has 0 rows"
        raise InputError(
            f"Could not load split {split!r} of {dataset_name!r}: {reason}. Expected a hub dataset reachable from "
            "here, a folder of parquet/arrow/csv/json files named by split, a save_to_disk folder or a data file."
        ) from error


def data_file_rows(path):
    """The rows of an empty or parquet data file (0 for an empty file); None when they cannot be told cheaply."""
    if path.stat().st_size == 0:
        return 0
    if path.suffix == ".parquet":
        import pyarrow.parquet

        with contextlib.suppress(Exception):  # not a parquet file: datasets' own message says so
            return pyarrow.parquet.ParquetFile(path).metadata.num_rows
    return None


def prepare_pairs(dataset, args, split):
    """Check the columns, drop ties and rows whose label is missing or not 0, 0.5 or 1 (counted), and order every row
    as (winner, loser) columns.

    Returns the dataset and a dict of counts of what was dropped.
    """
    if args.chosen_column is not None:
        needed = [args.caption_column, args.chosen_column, args.rejected_column]
    else:
        needed = [args.caption_column, args.image_0_column, args.image_1_column, args.label_column]
    missing = [column for column in needed if column not in dataset.column_names]
    if missing:
        raise InputError(
            f"Split {split!r} of {args.dataset_name!r} has no column(s) {missing}; it has {dataset.column_names}. "
            "Name the columns with --caption_column, --image_0_column/--image_1_column/--label_column "
            "(Pick-a-Pic schema) or --chosen_column/--rejected_column (ordered pairs)."
        )
    rows_read = len(dataset)
    if rows_read == 0:
        raise InputError(
            f"Split {split!r} of {args.dataset_name!r} has 0 rows; expected at least one preference pair."
        )
    dropped = {"ties": 0, "bad_labels": 0}
    if args.chosen_column is None:
        labels = np.array([label_value(label) for label in dataset[args.label_column]], dtype=np.float64)
        is_tie = labels == 0.5
        is_bad = ~np.isin(labels, (0.0, 0.5, 1.0))  # missing, NaN, infinite or not a preference: never trained on
        dropped = {"ties": int(is_tie.sum()), "bad_labels": int(is_bad.sum())}
        keep = np.flatnonzero(~is_tie & ~is_bad)
        if len(keep) < len(dataset):
            dataset = dataset.select(keep)
    if len(dataset) == 0:
        raise InputError(
            f"Split {split!r} of {args.dataset_name!r} has no preference pairs left after dropping "
            f"{dropped['ties']} ties and {dropped['bad_labels']} rows whose {args.label_column!r} is missing or not "
            f"0, 0.5 or 1, of the {rows_read} rows read; expected at least one pair with label 0 or 1."
        )
    # Keep images undecoded: decoding happens in the loader, where a broken image is skipped and counted.
    image_columns = (
        [args.chosen_column, args.rejected_column]
        if args.chosen_column
        else [args.image_0_column, args.image_1_column]
    )
    for column in image_columns:
        if isinstance(dataset.features[column], datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset, dropped


def label_value(label):
    """A preference label as a float; NaN for one that is missing or not a number (then the row is dropped)."""
    try:
        return float(label)
    except (TypeError, ValueError):
        return math.nan


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

    Returns the pixel tensor (2, 3, resolution, resolution) in [-1, 1] and, per image, the SDXL
    micro-conditioning (original_h, original_w, crop_top, crop_left, target_h, target_w).
    """
    original_sizes = [(image.height, image.width) for image in images]
    scale = resolution / min(images[0].height, images[0].width)
    size = (max(resolution, round(images[0].width * scale)), max(resolution, round(images[0].height * scale)))
    images = [image.resize(size, Image.BILINEAR) for image in images]  # the loser takes the winner's size
    width, height = size
    if random_crop:
        top, left = int(rng.integers(0, height - resolution + 1)), int(rng.integers(0, width - resolution + 1))
    else:
        top, left = (height - resolution) // 2, (width - resolution) // 2
    images = [image.crop((left, top, left + resolution, top + resolution)) for image in images]
    if hflip and rng.random() < 0.5:
        images = [ImageOps.mirror(image) for image in images]
        left = width - left - resolution  # where the crop window sits in the mirrored image
    pixels = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 127.5 - 1.0
    pixel_values = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    time_ids = torch.tensor(
        [[*original, top, left, resolution, resolution] for original in original_sizes], dtype=torch.float32
    )
    return pixel_values, time_ids


class PreferencePairs(torch.utils.data.Dataset):
    """Decoded, jointly augmented (winner, loser) pairs. An undecodable pair comes out as its index and the reason,
    and collate_fn drops and counts it."""

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
        if args.chosen_column is not None:
            columns = (args.chosen_column, args.rejected_column)
        else:
            columns = (
                (args.image_0_column, args.image_1_column)
                if float(row[args.label_column]) > 0.5
                else (args.image_1_column, args.image_0_column)
            )
        try:
            images = [decode_image(row[column]) for column in columns]
        except Exception as error:  # a broken image must not end a multi-day run: skip, count, say why
            return {"skipped_index": int(index), "reason": f"{type(error).__name__}: {error}"}
        # Augmentation randomness depends on (seed, epoch, index) only: resumable and worker-independent.
        rng = np.random.default_rng([self.seed, self.epoch, int(index), 0])
        pixel_values, time_ids = crop_and_flip_pair(
            images, args.resolution, args.random_crop and self.augment, not args.no_hflip and self.augment, rng
        )
        return {
            "pixel_values": pixel_values,
            "time_ids": time_ids,
            "caption": row[args.caption_column] or "",
            "index": int(index),
        }


class CachedPairs(torch.utils.data.Dataset):
    """Pairs from the --cache_latents cache: latents (2, C, h, w) winner first, time ids, the caption's embeddings."""

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
        caption = self.captions[self.caption_rows[pair["caption"]]]
        return {
            "latents": pair["latents"],
            "time_ids": pair["time_ids"],
            "caption": pair["caption"],
            "index": int(pair["index"]),
            "prompt_embeds": caption["prompt_embeds"],
            "pooled_prompt_embeds": caption["pooled_prompt_embeds"],
        }


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
        )  # pixel_values (B, 2, 3, H, W), time_ids (B, 2, 6)
    return batch


# ----------------------------------------------------------------------------------------------
# Encoders
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_prompts(text_encoders, tokenizers, prompts):
    """SDXL conditioning: penultimate hidden states of both encoders concatenated, pooled output of the second."""
    prompt_embeds_list = []
    for tokenizer, text_encoder in zip(tokenizers, text_encoders):
        input_ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(text_encoder.device)
        outputs = text_encoder(input_ids, output_hidden_states=True)
        prompt_embeds_list.append(outputs.hidden_states[-2])
    pooled_prompt_embeds = outputs.text_embeds  # the second encoder has the projection
    return torch.cat(prompt_embeds_list, dim=-1), pooled_prompt_embeds


@torch.no_grad()
def encode_images(vae, pixel_values, batch_size):
    """VAE posterior means times scaling_factor, `batch_size` images per encoder call.

    The mean, not a sample: SDXL's posterior std is ~1e-3 of the latent scale, so sampling adds
    nothing but would make cached and on-the-fly latents differ.
    """
    latents = [
        vae.encode(pixel_values[start : start + batch_size].to(vae.device, vae.dtype)).latent_dist.mode()
        for start in range(0, pixel_values.shape[0], batch_size)
    ]
    return torch.cat(latents) * vae.config.scaling_factor


def latents_cache_path(args, train_split, storage_dtype):
    """One folder per (data, model, resolution, augmentation, dtype): a changed setting never reads a stale cache."""
    augmentation_is_random = args.random_crop or not args.no_hflip
    key = {
        "data": train_split._fingerprint,
        "model": args.pretrained_model_name_or_path,
        "revision": args.revision,
        "variant": args.variant,
        "vae": args.pretrained_vae_model_name_or_path,
        "resolution": args.resolution,
        "random_crop": args.random_crop,
        "hflip": not args.no_hflip,
        "augmentation_seed": args.seed if augmentation_is_random else None,
        "caption_column": args.caption_column,
        "dtype": str(storage_dtype),
    }
    root = args.latents_cache_dir or os.path.join(datasets.config.HF_DATASETS_CACHE, "preference_latents")
    return Path(root, hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16])


@torch.no_grad()
def build_latents_cache(accelerator, args, train_dataset, vae, text_encoders, tokenizers, cache_path, storage_dtype):
    """Encode every pair and every distinct caption once, each process its share; reuse a finished cache.

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
        pair_features = datasets.Features(
            {
                "index": datasets.Value("int64"),
                "caption": datasets.Value("string"),
                "latents": datasets.Array4D((2, vae.config.latent_channels, latent_size, latent_size), numpy_dtype),
                "time_ids": datasets.Array2D((2, 6), "float32"),
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
            writer.write_batch(
                {
                    "index": batch["index"],
                    "caption": batch["caption"],
                    "time_ids": list(batch["time_ids"].numpy()),
                    "latents": list(latents.to(storage_dtype).float().cpu().numpy().astype(numpy_dtype)),
                }
            )
        writer.finalize()
        writer.close()

        captions = sorted({caption or "" for caption in train_dataset.dataset[args.caption_column]})[rank::world]
        writer = ArrowWriter(path=str(cache_path / f"captions-{rank:05d}-of-{world:05d}.arrow"))
        for start in tqdm(
            range(0, len(captions), 64), desc="Caching text embeddings", disable=not accelerator.is_local_main_process
        ):
            chunk = captions[start : start + 64]
            prompt_embeds, pooled_prompt_embeds = encode_prompts(text_encoders, tokenizers, chunk)
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


def pair_batch_inputs(batch, vae, text_encoders, tokenizers, vae_encode_batch_size, device, dtype):
    """A collated batch -> latents (2B, C, h, w), all winners then all losers; prompt embeds (B, L, D),
    pooled prompt embeds (B, D) and SDXL time ids (2B, 6).

    Reads the --cache_latents cache when the batch carries latents; encodes pixels and captions otherwise.
    """
    if "latents" in batch:
        latents = batch["latents"].transpose(0, 1).flatten(0, 1).to(device, dtype, non_blocking=True)
        prompt_embeds = batch["prompt_embeds"].to(device, dtype, non_blocking=True)
        pooled_prompt_embeds = batch["pooled_prompt_embeds"].to(device, dtype, non_blocking=True)
    else:
        pixel_values = batch["pixel_values"].transpose(0, 1).flatten(0, 1)
        latents = encode_images(vae, pixel_values, vae_encode_batch_size).to(dtype)
        prompt_embeds, pooled_prompt_embeds = encode_prompts(text_encoders, tokenizers, batch["caption"])
    time_ids = batch["time_ids"].transpose(0, 1).flatten(0, 1).to(device, prompt_embeds.dtype)
    return latents, prompt_embeds, pooled_prompt_embeds, time_ids


def noisy_pair_inputs(noise_scheduler, latents, prompt_embeds, pooled_prompt_embeds, time_ids, generators):
    """UNet inputs for k images per pair, with one timestep and one noise draw per pair, shared by its images.

    latents (kB, C, h, w) grouped by role (all winners, then all losers; k = 1 for winners alone), prompt
    embeds (B, ...), time_ids (kB, 6), one generator per pair. Returns noisy latents (kB, ...), timesteps
    (kB,), the conditioning kwargs and the target (kB, ...).
    """
    images_per_pair = latents.shape[0] // prompt_embeds.shape[0]
    timesteps = sample_timesteps(noise_scheduler.config.num_train_timesteps, generators, latents.device)
    timesteps = timesteps.repeat(images_per_pair)
    noise = sample_noise(latents.shape[1:], generators, latents.device).repeat(images_per_pair, 1, 1, 1)
    noisy_latents, target = noisy_latents_and_target(noise_scheduler, latents, noise, timesteps)
    conditioning = {
        "encoder_hidden_states": prompt_embeds.repeat(images_per_pair, 1, 1),
        "added_cond_kwargs": {"text_embeds": pooled_prompt_embeds.repeat(images_per_pair, 1), "time_ids": time_ids},
    }
    return noisy_latents, timesteps, conditioning, target


# ----------------------------------------------------------------------------------------------
# Held-out preference accuracy and validation images
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def preference_accuracy(accelerator, unet, vae, text_encoders, tokenizers, noise_scheduler, eval_dataset, args, dtype):
    """Share of held-out pairs whose mean error on the winner is below that on the loser (ties half).

    The draws are fixed by (seed, pair index), so values before and after training are comparable.
    """
    shard = range(accelerator.process_index, len(eval_dataset), accelerator.num_processes)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(eval_dataset, shard), batch_size=args.train_batch_size, collate_fn=collate_fn
    )
    score, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    for batch in loader:
        if "index" not in batch:
            continue
        inputs = pair_batch_inputs(
            batch, vae, text_encoders, tokenizers, args.vae_encode_batch_size, accelerator.device, dtype
        )
        batch_size = len(batch["index"])
        errors = torch.zeros(2, batch_size, device=accelerator.device)  # winners, losers
        for draw in range(args.preference_eval_timesteps):
            generators = sample_generators(args.seed, HELDOUT_EVAL_EPOCH + draw, batch["index"], accelerator.device)
            noisy_latents, timesteps, conditioning, target = noisy_pair_inputs(noise_scheduler, *inputs, generators)
            with accelerator.autocast():
                model_pred = unet(noisy_latents, timesteps, **conditioning).sample
            errors += per_sample_mse(model_pred, target).view(2, batch_size)
        score += ((errors[0] < errors[1]).float() + 0.5 * (errors[0] == errors[1]).float()).sum()
        count += batch_size
    score, count = accelerator.reduce(score, "sum"), accelerator.reduce(count, "sum")
    return (score / count.clamp(min=1)).item()


@torch.no_grad()
def render_validation(args, accelerator, vae, text_encoders, unet, dtype, prompts, generators):
    """Images of `prompts` with `unet`: for each prompt, one image per generator in its list, in one pipeline call."""
    pipeline = StableDiffusionXLPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        vae=vae,
        text_encoder=text_encoders[0],
        text_encoder_2=text_encoders[1],
        unet=unet,
        revision=args.revision,
        variant=args.variant,
        dtype=dtype,
    )
    pipeline.set_progress_bar_config(disable=True)
    images = []
    for prompt, prompt_generators in zip(prompts, generators):
        with accelerator.autocast():
            output = pipeline(
                [prompt] * len(prompt_generators),
                num_inference_steps=args.validation_inference_steps,
                guidance_scale=args.validation_guidance_scale,
                height=args.resolution,
                width=args.resolution,
                generator=prompt_generators,
            )
        images.append(output.images)
    return images


def render_validation_prompts(args, accelerator, vae, text_encoders, unet, dtype):
    """One image per --validation_prompts entry with `unet`, a fixed seed per prompt."""
    generators = [
        [torch.Generator(device=accelerator.device).manual_seed(args.seed + i)]
        for i in range(len(args.validation_prompts))
    ]
    images = render_validation(args, accelerator, vae, text_encoders, unet, dtype, args.validation_prompts, generators)
    return [prompt_images[0] for prompt_images in images]


def log_validation(args, accelerator, base_images, vae, text_encoders, unet, dtype, step):
    """Render the trained model's validation images and save and log them beside the base model's."""
    images = render_validation_prompts(args, accelerator, vae, text_encoders, unet, dtype)
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
def validation_reward_scores(args, accelerator, vae, text_encoders, unet, dtype, rewards, prompts):
    """Draw --validation_images_per_prompt images of each of `prompts` with `unet` and score them with each reward:
    {reward name: scores (P, K)}, on every process.

    Image k of prompt i starts from a CPU generator seeded with validation_image_seed(--seed, i, k), as
    examples/eval/generate.py draws it: every validation, the base's included, starts from the same noise. The
    prompts are split between the processes and the scores gathered.
    """
    mine = list(range(accelerator.process_index, len(prompts), accelerator.num_processes))
    generators = [
        [
            torch.Generator("cpu").manual_seed(validation_image_seed(args.seed, i, k))
            for k in range(args.validation_images_per_prompt)
        ]
        for i in mine
    ]
    training = unet.training
    unet.eval()
    images = render_validation(
        args, accelerator, vae, text_encoders, unet, dtype, [prompts[i] for i in mine], generators
    )
    unet.train(training)
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
def adapters_disabled(unet, lora):
    """With LoRA, the UNet with its adapters switched off is the base model; without LoRA, nothing to switch."""
    if lora:
        unet.disable_adapters()
    try:
        yield unet
    finally:
        if lora:
            unet.enable_adapters()


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


def add_lora_adapters(unet, rank, alpha, mixed_precision):
    """LoRA on the UNet's attention projections, base weights frozen; under fp16 the adapters train in float32."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    target_modules = ["to_k", "to_q", "to_v", "to_out.0"]
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=target_modules)
    )
    if mixed_precision == "fp16":
        cast_training_params(unet, dtype=torch.float32)


def lora_state_dict(unet):
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def weights_fingerprint(model):
    """sha256 of the trained parameters' bytes: equal on every process after a correct data-parallel run."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def write_model_card(args, summary):
    method = f"MaPO (beta_mapo = {args.beta_mapo:g}, snr_value = {args.snr_value:g})"
    weights = f"`pytorch_lora_weights.safetensors` (LoRA rank {args.lora_rank})" if args.lora_rank else "`unet/`"
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
tags: [stable-diffusion-xl, text-to-image, diffusers, mapo]
---
# {Path(args.output_dir).name}

{method} of `{args.pretrained_model_name_or_path}` on `{args.dataset_name}` (split `{args.dataset_split_name}`),
{steps(summary["global_step"])} of {summary["total_batch_size"]} pairs, learning rate {args.learning_rate:g}
({args.lr_scheduler}), trained with `train_mapo_sdxl.py`. Weights: {weights}.

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
        train_split, dropped = prepare_pairs(train_split, args, args.dataset_split_name)
        if args.max_train_samples is not None:
            train_split = train_split.shuffle(seed=args.seed)
            train_split = train_split.select(range(min(args.max_train_samples, len(train_split))))
        eval_split = None
        if args.preference_eval_split is not None:
            eval_split = load_split(args.dataset_name, args.preference_eval_split, args.cache_dir)
            eval_split, _ = prepare_pairs(eval_split, args, args.preference_eval_split)
            eval_split = eval_split.select(range(min(args.preference_eval_max_samples, len(eval_split))))
    logger.info(
        f"Training on {len(train_split)} pairs; dropped {dropped['ties']} ties and {dropped['bad_labels']} rows "
        "whose label is missing or not 0, 0.5 or 1."
    )

    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.push_to_hub:
            from huggingface_hub import create_repo

            repo_name = args.hub_model_id or Path(args.output_dir).name
            repo_id = create_repo(repo_name, exist_ok=True, token=args.hub_token).repo_id

    # The rewards of validation by reward next: weights that cannot be found stop the run before SDXL loads.
    validation_rewards, reward_prompts = {}, []
    if args.validation_reward_models:
        validation_rewards = load_validation_rewards(args, accelerator.device)
        reward_prompts = read_validation_prompts(args.validation_reward_prompts)

    # Models. Frozen weights are loaded in the weight dtype (casting after loading warns in diffusers).
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    # SDXL's own VAE overflows in float16 and stays float32; a replacement such as the fp16-fix VAE does not.
    vae_dtype = weight_dtype if args.pretrained_vae_model_name_or_path else torch.float32
    model_path = args.pretrained_model_name_or_path
    load_kwargs = {"revision": args.revision, "cache_dir": args.cache_dir}
    try:
        noise_scheduler = DDPMScheduler.from_pretrained(model_path, subfolder="scheduler", **load_kwargs)
        tokenizers = [
            transformers.AutoTokenizer.from_pretrained(model_path, subfolder=subfolder, **load_kwargs)
            for subfolder in ("tokenizer", "tokenizer_2")
        ]
        text_encoders = [
            transformers.CLIPTextModel.from_pretrained(
                model_path, subfolder="text_encoder", variant=args.variant, dtype=weight_dtype, **load_kwargs
            ),
            transformers.CLIPTextModelWithProjection.from_pretrained(
                model_path, subfolder="text_encoder_2", variant=args.variant, dtype=weight_dtype, **load_kwargs
            ),
        ]
        if args.pretrained_vae_model_name_or_path:
            vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, dtype=vae_dtype, **load_kwargs)
        else:
            vae = AutoencoderKL.from_pretrained(
                model_path, subfolder="vae", variant=args.variant, dtype=vae_dtype, **load_kwargs
            )
        unet = UNet2DConditionModel.from_pretrained(
            model_path,
            subfolder="unet",
            variant=args.variant,
            dtype=weight_dtype if args.lora_rank else torch.float32,  # LoRA trains adapters only
            **load_kwargs,
        )
    except OSError as error:  # not on the hub (or the hub out of reach), or a file missing in a local folder
        reason = str(error).strip().splitlines()[0].rstrip(".")
        raise InputError(
            f"Could not load the SDXL models of {model_path!r}: {reason}. Expected a local diffusers folder or a hub "
            "id reachable from here."
        ) from error
    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    if noise_scheduler.config.prediction_type not in DDPM_PREDICTION_TYPES:
        raise InputError(
            f"Expected a model that predicts {DDPM_PREDICTION_TYPES}, found "
            f"prediction_type={noise_scheduler.config.prediction_type!r}; set --prediction_type."
        )
    for frozen in (vae, *text_encoders):
        frozen.requires_grad_(False).to(accelerator.device)
    unet.to(accelerator.device)

    if args.lora_rank:
        add_lora_adapters(unet, args.lora_rank, args.lora_alpha, accelerator.mixed_precision)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    # Checkpoints hold only what is trained: the LoRA file, or the UNet folder.
    def save_unet(model, folder):
        """Save the full UNet; under FSDP the shards are gathered first (a collective: every process calls this)."""
        state_dict = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            model = accelerator.unwrap_model(model)
            if accelerator.distributed_type == DistributedType.FSDP:
                model = UNet2DConditionModel.from_config(model.config)
                model.load_state_dict(state_dict)
            model.save_pretrained(folder)

    def save_lora(model, folder):
        if accelerator.is_main_process:
            model = accelerator.unwrap_model(model)
            layers = lora_state_dict(model)
            # the adapter's config (rank, alpha) goes into the file: without it a loader takes alpha = rank
            metadata = model.peft_config["default"].to_dict()
            write_atomically(
                Path(folder, LORA_WEIGHTS),
                lambda path: StableDiffusionXLPipeline.save_lora_weights(
                    folder, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata, weight_name=path.name
                ),
            )

    def save_model_hook(models, weights, output_dir):
        for model in models:
            if args.lora_rank:
                save_lora(model, output_dir)
            else:
                save_unet(model, os.path.join(output_dir, "unet"))
        while weights:
            weights.pop()

    def load_model_hook(models, input_dir):
        if not models:  # DeepSpeed and FSDP restored the model (and optimizer) from their own files
            return
        model = accelerator.unwrap_model(models.pop())
        if args.lora_rank:
            from peft.utils import set_peft_model_state_dict

            lora_weights, _ = StableDiffusionXLPipeline.lora_state_dict(input_dir)
            unet_weights = {k.removeprefix("unet."): v for k, v in lora_weights.items() if k.startswith("unet.")}
            incompatible = set_peft_model_state_dict(model, convert_unet_state_dict_to_peft(unet_weights), "default")
            if incompatible is not None and getattr(incompatible, "unexpected_keys", None):
                raise InputError(
                    f"The checkpoint in {input_dir} has LoRA weights this model lacks: "
                    f"{incompatible.unexpected_keys[:5]}; resume with the --lora_rank of the run that wrote it."
                )
            if accelerator.mixed_precision == "fp16":  # also when fp16 comes from accelerate's config
                cast_training_params(model, dtype=torch.float32)
        else:
            loaded = UNet2DConditionModel.from_pretrained(input_dir, subfolder="unet")
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
        optimizer_class = torch.optim.AdamW
    params_to_optimize = [p for p in unet.parameters() if p.requires_grad]
    optimizer = optimizer_class(
        params_to_optimize,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )

    # Dataset and dataloader
    memory = PeakMemory(accelerator.device)
    train_dataset = PreferencePairs(train_split, args, augment=True)
    cache_skipped = []
    if args.cache_latents:
        storage_dtype = torch.float16 if weight_dtype == torch.float16 else torch.float32  # numpy has no bfloat16
        cache_path = latents_cache_path(args, train_split, storage_dtype)
        reusing = (cache_path / "complete.json").exists()
        logger.info(f"--cache_latents: {'reusing' if reusing else 'building'} {cache_path}")
        if args.random_crop or not args.no_hflip:
            logger.info(
                "--cache_latents: each pair's crop and flip are drawn once and cached (pass --no_hflip to train "
                "without flips)."
            )
        with memory.phase("cache_build"):
            train_dataset, cache_skipped = build_latents_cache(
                accelerator, args, train_dataset, vae, text_encoders, tokenizers, cache_path, storage_dtype
            )
        for index, reason in cache_skipped:
            logger.warning(f"Skipped pair {index} while caching: undecodable image ({reason}).")
        if len(train_dataset) == 0:
            index, reason = cache_skipped[0]
            raise InputError(
                f"Every one of the {len(cache_skipped)} pairs of {args.dataset_name!r} has an undecodable image "
                f"(pair {index}: {reason}); expected encoded images in the image columns."
            )
    eval_dataset = PreferencePairs(eval_split, args, augment=False) if eval_split is not None else None
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

    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        unet, optimizer, train_dataloader, lr_scheduler
    )
    params_to_optimize = [p for p in unet.parameters() if p.requires_grad]  # FSDP and DeepSpeed replace them

    if accelerator.is_main_process and args.overwrite:
        removed = remove_earlier_outputs(args)
        if removed:
            logger.info(f"--overwrite: deleted the earlier run's {', '.join(removed)} in {args.output_dir}")
    accelerator.wait_for_everyone()  # nothing is written into --output_dir before the earlier outputs are gone
    if accelerator.is_main_process:
        tracker_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    training = f"LoRA rank {args.lora_rank}" if args.lora_rank else "full fine-tuning"
    logger.info("***** Running training *****")
    logger.info(f"  Method = MaPO, beta_mapo = {args.beta_mapo:g}, snr_value = {args.snr_value:g}, {training}")
    logger.info(
        f"  Num pairs = {len(train_dataset)}, epochs = {args.num_train_epochs}, steps = {args.max_train_steps}"
    )
    logger.info(
        f"  Pairs per device = {args.train_batch_size}, total batch (parallel, accumulation) = {total_batch_size}"
    )

    def heldout_accuracy():
        unet.eval()
        with memory.phase("validation"):
            model = accelerator.unwrap_model(unet)
            accuracy = preference_accuracy(
                accelerator, model, vae, text_encoders, tokenizers, noise_scheduler, eval_dataset, args, weight_dtype
            )
        unet.train()
        return accuracy

    def validate(step):
        with memory.phase("validation"):
            model = accelerator.unwrap_model(unet)
            log_validation(args, accelerator, base_images, vae, text_encoders, model, weight_dtype, step)

    def keep_best(step):
        """This step's weights replace best/: written beside it, then renamed into place."""
        best, staging = Path(args.output_dir, "best"), Path(args.output_dir, ".best.partial")
        if accelerator.is_main_process and staging.exists():
            shutil.rmtree(staging)
        if args.lora_rank:
            save_lora(unet, staging)
        else:
            save_unet(unet, staging / "unet")
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
                model = accelerator.unwrap_model(unet)
                scores = validation_reward_scores(
                    args, accelerator, vae, text_encoders, model, weight_dtype, validation_rewards, reward_prompts
                )
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
    if args.validation_prompts and accelerator.is_main_process:
        with memory.phase("validation"), adapters_disabled(accelerator.unwrap_model(unet), args.lora_rank) as base:
            base_images = render_validation_prompts(args, accelerator, vae, text_encoders, base, weight_dtype)
    base_reward_scores, reward_history = None, {}
    if validation_rewards:
        with memory.phase("validation"), adapters_disabled(accelerator.unwrap_model(unet), args.lora_rank) as base:
            base_reward_scores = validation_reward_scores(
                args, accelerator, vae, text_encoders, base, weight_dtype, validation_rewards, reward_prompts
            )
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
        unet.train()
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
            with accelerator.accumulate(unet):
                generators = sample_generators(args.seed, epoch, batch["index"], accelerator.device)
                inputs = pair_batch_inputs(
                    batch, vae, text_encoders, tokenizers, args.vae_encode_batch_size, accelerator.device, weight_dtype
                )
                noisy_latents, timesteps, conditioning, target = noisy_pair_inputs(
                    noise_scheduler, *inputs, generators
                )

                model_pred = unet(noisy_latents, timesteps, **conditioning).sample
                model_losses_w, model_losses_l = per_sample_mse(model_pred, target).chunk(2)
                loss, metrics = mapo_loss(
                    model_losses_w,
                    model_losses_l,
                    args.beta_mapo,
                    args.snr_value,
                    noise_scheduler.config.num_train_timesteps,
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
                progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", acc=f"{logs['implicit_acc']:.2f}")
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
    unet.eval()
    if eval_dataset is not None:
        summary["heldout_preference_accuracy_after"] = heldout_accuracy()
        accelerator.log(
            {"heldout_preference_accuracy": summary["heldout_preference_accuracy_after"]}, step=global_step
        )
    skipped_total = int(accelerator.reduce(torch.tensor(skipped_total, device=accelerator.device), "sum").item())
    skipped_total += len(cache_skipped)
    if accelerator.num_processes > 1 and accelerator.distributed_type != DistributedType.FSDP:
        # Data-parallel replicas must end bit-identical; say so rather than assume it.
        fingerprints = gather_object([weights_fingerprint(accelerator.unwrap_model(unet))])
        summary["replicas_identical"] = len(set(fingerprints)) == 1
        if not summary["replicas_identical"]:
            logger.warning(f"The trained weights differ between processes: {fingerprints}")
    if not args.skip_final_save:
        if args.lora_rank:
            save_lora(unet, args.output_dir)
        else:
            save_unet(unet, os.path.join(args.output_dir, "unet"))
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
                "method": "mapo",
                "global_step": global_step,
                "total_batch_size": total_batch_size,
                "train_batch_size": args.train_batch_size,
                "lora_rank": args.lora_rank,
                "cache_latents": args.cache_latents,
                "skipped_pairs": skipped_total,
                "dropped_ties": dropped["ties"],
                "skipped_bad_labels": dropped["bad_labels"],
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
    lines = [f"== MaPO finished: {steps(summary['global_step'])}, output in {args.output_dir}"]
    if "heldout_preference_accuracy_before" in summary:
        lines.append(
            f"   held-out preference accuracy ({args.preference_eval_split}): "
            f"{summary['heldout_preference_accuracy_before']:.3f} before -> "
            f"{summary['heldout_preference_accuracy_after']:.3f} after"
        )
    finals = ", ".join(f"{key} {value:.4g}" for key, value in summary["last_step_metrics"].items())
    lines.append(f"   last step: {finals}")
    lines.append(
        f"   dropped ties: {summary['dropped_ties']}, skipped bad labels: {summary['skipped_bad_labels']}, "
        f"skipped undecodable pairs: {summary['skipped_pairs']}"
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
