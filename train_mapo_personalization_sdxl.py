#!/usr/bin/env python
"""MaPO personalization (Hong et al., §4.1 and Table 2) for SDXL: a few target images of one subject against the
base model's own samples. Reference-free.

Each target image of --instance_data_dir (a DreamBooth-style folder, or a dataset) is the chosen side of
--num_rejected_per_image pairs whose rejected side is a sample the base model draws for the same caption, drawn once
before training and cached. The objective is MaPO's (Eq. 5-7 and Appendix A; docs/METHODS.md, "MaPO"), with the
same timestep and noise for both images of a pair, per-sample errors l_w, l_l, and

    phi_beta(l) = (s l / (exp(s l) - 1)) ** beta          # Eq. 7, s = --snr_value
    loss = mean(l_w) - mean(logsigmoid(T (phi_beta(l_w) - phi_beta(l_l)))) / beta

The paper's setting (Table 2, Appendix D, "strictly" after DCO): LoRA on the UNet at 5e-5, the text side at 5e-6
(DCO's release trains the new token's embeddings there, no text-encoder LoRA), beta 1024, the whole training set in
every batch. Example (the DreamBooth dog, 5 images; examples/mapo/README.md says where it differs from DCO):

    accelerate launch train_mapo_personalization_sdxl.py --instance_data_dir dreambooth/dataset/dog \\
      --instance_prompt "a photo of <sks> dog" --placeholder_token "<sks>" --initializer_token dog \\
      --lora_rank 32 --beta_mapo 1024 --learning_rate 5e-5 --text_encoder_lr 5e-6 --lr_scheduler constant \\
      --lr_warmup_steps 0 --adam_weight_decay 1e-4 --train_batch_size 5 --max_train_steps 2000 \\
      --mixed_precision fp16 --output_dir sdxl-mapo-dog
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
        "--instance_data_dir",
        type=str,
        required=True,
        help="A DreamBooth-style folder of target images of one subject, or a dataset (local or hub) with an "
        "--instance_image_column. Captions come from a <image>.txt beside each image, a metadata.jsonl (file_name "
        "and --caption_column or text), the dataset's --caption_column, or --instance_prompt.",
    )
    data.add_argument(
        "--instance_prompt",
        type=str,
        default=None,
        help='Caption for every target image that has none of its own, e.g. "a photo of <sks> dog".',
    )
    data.add_argument(
        "--instance_image_column", type=str, default="image", help="Image column of an --instance_data_dir dataset."
    )
    data.add_argument(
        "--caption_column",
        type=str,
        default="caption",
        help="Caption key of a metadata.jsonl, or caption column of an --instance_data_dir dataset.",
    )
    data.add_argument(
        "--dataset_split_name", type=str, default="train", help="Split of an --instance_data_dir dataset."
    )
    data.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are cached.")
    data.add_argument(
        "--max_train_samples",
        type=int,
        default=None,
        help="Train on a random subset of this many (target, base sample) pairs.",
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
        "once, before caching. Later runs with the same data, model, resolution and augmentation reuse the cache. "
        "Not with --train_text_encoder or --placeholder_token, which change the text embeddings at every step.",
    )
    data.add_argument(
        "--latents_cache_dir",
        type=str,
        default=None,
        help="Where --cache_latents keeps its caches, one folder per setting (default: <datasets "
        "cache>/preference_latents).",
    )

    rejected = parser.add_argument_group(
        "rejected samples (MaPO §4.1 and App. C-D: what the base model draws for the targets' captions, cached)"
    )
    rejected.add_argument(
        "--num_rejected_per_image",
        type=int,
        default=1,
        help="Base-model samples (rejected images) per target image, each from its own seed; each target image is "
        "the chosen side of this many pairs.",
    )
    rejected.add_argument(
        "--rejected_cache_dir",
        type=str,
        default=None,
        help="Where the base-model samples are kept, one folder per setting (default: <output_dir>/"
        "rejected_samples). A run with the same model, captions, seed, resolution and sampler reuses them.",
    )
    rejected.add_argument(
        "--rejected_inference_steps", type=int, default=25, help="Sampling steps of the base-model samples."
    )
    rejected.add_argument(
        "--rejected_guidance_scale",
        type=finite_float,
        default=5.0,
        help="Classifier-free guidance of the base-model samples.",
    )

    text = parser.add_argument_group("text encoders (App. D, after DCO: text-encoder LoRA and textual inversion)")
    text.add_argument(
        "--train_text_encoder",
        action="store_true",
        help="Also train LoRA adapters (rank --lora_rank) on both text encoders, at --text_encoder_lr. Needs "
        "--lora_rank; the text embeddings are then computed in the loop (no --cache_latents).",
    )
    text.add_argument(
        "--text_encoder_lr",
        type=finite_float,
        default=5e-6,
        help="Learning rate of the text-encoder LoRA and the textual-inversion embeddings (the paper's "
        "personalization setting, after DCO: 5e-6, with UNet learning rate 5e-5).",
    )
    text.add_argument(
        "--placeholder_token",
        type=str,
        default=None,
        help="Textual inversion: add this token (e.g. <sks>) to both tokenizers and train its two embeddings, "
        "initialised from --initializer_token's. The captions must contain it; the base-model samples are drawn "
        "with --initializer_token in its place. Saved as textual_inversion.safetensors (clip_l, clip_g).",
    )
    text.add_argument(
        "--initializer_token",
        type=str,
        default=None,
        help="A word that is one token in both tokenizers (e.g. dog): the new token's starting embedding.",
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
        "--train_batch_size",
        type=int,
        default=4,
        help="(target, base sample) pairs per device per micro-batch; the paper puts the whole set in every batch.",
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
        help="Render the validation images every N optimizer steps and at the end.",
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


def check_args(args):
    """Refuse bad settings before any import or model load; resolve --resume_from_checkpoint to a folder."""
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise InputError(
            "--use_8bit_adam needs bitsandbytes, which is not installed here: pip install bitsandbytes (its 8-bit "
            "AdamW runs on GPUs and, more slowly, on the CPU)."
        )
    if args.beta_mapo <= 0:
        raise InputError(f"--beta_mapo must be positive (personalization setting: 1024), got {args.beta_mapo}.")
    if args.snr_value <= 0:
        raise InputError(f"--snr_value must be positive (default 0.5), got {args.snr_value}.")
    if args.lora_rank is not None and args.lora_rank <= 0:
        raise InputError(f"--lora_rank must be a positive integer, got {args.lora_rank}.")
    if args.resolution <= 0 or args.resolution % 8 != 0:
        raise InputError(
            f"--resolution must be a positive multiple of 8 (the VAE downsamples 8x), got {args.resolution}."
        )
    positive = ["train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_steps"]
    positive += ["vae_encode_batch_size", "num_train_epochs", "num_rejected_per_image", "rejected_inference_steps"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise InputError(f"--{name} must be positive, got {getattr(args, name)}.")
    for name in ("max_train_steps", "max_train_samples"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise InputError(f"--{name} must be positive, got {getattr(args, name)}.")
    check_local_path("--pretrained_model_name_or_path", args.pretrained_model_name_or_path, PIPELINE_FILES)
    if args.pretrained_vae_model_name_or_path is not None:
        check_local_path(
            "--pretrained_vae_model_name_or_path", args.pretrained_vae_model_name_or_path, ["config.json"]
        )
    if args.text_encoder_lr <= 0:
        raise InputError(f"--text_encoder_lr must be positive (paper: 5e-6), got {args.text_encoder_lr}.")
    if args.train_text_encoder and not args.lora_rank:
        raise InputError("--train_text_encoder trains LoRA adapters on the text encoders; give --lora_rank too.")
    if (args.placeholder_token is None) != (args.initializer_token is None):
        raise InputError(
            "--placeholder_token and --initializer_token go together: the new token's embedding starts from the "
            "initializer's (e.g. --placeholder_token '<sks>' --initializer_token dog)."
        )
    if args.placeholder_token is not None and (not args.placeholder_token.strip() or " " in args.placeholder_token):
        raise InputError(f"--placeholder_token must be one word without spaces, got {args.placeholder_token!r}.")
    if args.cache_latents and (args.train_text_encoder or args.placeholder_token is not None):
        flag = "--train_text_encoder" if args.train_text_encoder else "--placeholder_token"
        raise InputError(f"--cache_latents caches the text embeddings, which {flag} changes at every step; drop one.")
    check_local_path("--instance_data_dir", args.instance_data_dir, [])
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise InputError(f"--output_dir {args.output_dir!r} is a file; give a folder (it is created if missing).")
    if args.overwrite and args.resume_from_checkpoint is not None:
        raise InputError(
            "--overwrite deletes the earlier run's outputs that --resume_from_checkpoint continues; give one of them."
        )
    resuming = args.resume_from_checkpoint is not None
    args.resume_from_checkpoint = resolve_checkpoint(args)
    check_output_dir(args, resuming)


def names_local_path(value):
    """Hub ids look like `name` or `org/name`; anything else (or anything that exists on disk) is a local path."""
    return os.path.exists(value) or value.startswith((".", "/", "~")) or value.count("/") > 1


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


LORA_WEIGHTS = (
    "pytorch_lora_weights.safetensors"  # the LoRA of the UNet and, with --train_text_encoder, of both encoders
)
TEXTUAL_INVERSION_FILE = "textual_inversion.safetensors"  # the new token's clip_l and clip_g embeddings
# What a run of this script writes into --output_dir, besides its --logging_dir folder. Another run's are refused
# unless it is resumed (--resume_from_checkpoint) or replaced (--overwrite); a user's other files there do not count.
# (The base-model samples of rejected_samples/ are a cache that later runs reuse, not an output.)
RUN_OUTPUTS = ["training_summary.json", "README.md", LORA_WEIGHTS, TEXTUAL_INVERSION_FILE, "unet", "checkpoint-*"]
RUN_OUTPUTS += ["validation"]


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
        encoders = any(key.startswith("text_encoder") for key in header)
        if encoders != args.train_text_encoder:
            wrote = "with" if encoders else "without"
            raise InputError(
                f"{checkpoint} was written {wrote} --train_text_encoder (its LoRA file "
                f"{'holds' if encoders else 'lacks'} the text encoders' adapters); resume it {wrote} "
                "--train_text_encoder."
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
    if not (checkpoint / TEXTUAL_INVERSION_FILE).is_file():
        if args.placeholder_token is not None:
            raise InputError(
                f"{checkpoint} holds no {TEXTUAL_INVERSION_FILE}: its run had no --placeholder_token; resume it "
                "without --placeholder_token and --initializer_token."
            )
    else:
        header = safetensors_header(checkpoint / TEXTUAL_INVERSION_FILE)
        token = header.get("__metadata__", {}).get("token")
        if token != args.placeholder_token:
            found = "" if args.placeholder_token is None else f", not {args.placeholder_token!r}"
            raise InputError(
                f"{checkpoint} holds the embeddings of --placeholder_token {token!r}{found}; resume it with "
                f"--placeholder_token {token!r} and the --initializer_token of the run that wrote it."
            )
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
    DistributedDataParallelKwargs,
    DistributedType,
    ProjectConfiguration,
    broadcast_object_list,
    gather_object,
    set_seed,
)
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.optimization import get_scheduler  # noqa: E402
from diffusers.training_utils import _set_state_dict_into_text_encoder, cast_training_params  # noqa: E402
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from utils.diffusion import (  # noqa: E402
    DDPM_PREDICTION_TYPES,
    noisy_latents_and_target,
    per_sample_mse,
    sample_generators,
    sample_noise,
    sample_timesteps,
)


logger = get_logger(__name__)


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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_FILES = ("metadata.jsonl",)  # besides the <image>.txt captions
SHOWN = 3  # examples named in a message about many files


def read_instances(args):
    """The target images of --instance_data_dir with their captions.

    Returns ({"caption": [...], "image": [encoded bytes, ...], "name": [...]}, skipped), where skipped lists
    (name, reason) for the files that are not readable images. A folder without a single readable image, or
    images without a caption (and no --instance_prompt), stop the run with one line.
    """
    path = Path(args.instance_data_dir).expanduser()
    if path.is_dir() and any(child.suffix.lower() in IMAGE_SUFFIXES for child in path.iterdir()):
        rows, skipped = read_instance_folder(path, args.caption_column)
    else:
        rows, skipped = read_instance_dataset(args)
    missing = [name for name, caption in zip(rows["name"], rows["caption"]) if not caption]
    if missing and args.instance_prompt is None:
        raise InputError(
            f"{len(missing)} of {len(rows['name'])} target images in {args.instance_data_dir!r} have no caption "
            f"({', '.join(missing[:SHOWN])}{', ...' if len(missing) > SHOWN else ''}); expected a <image>.txt beside "
            f"each image, a metadata.jsonl with file_name and {args.caption_column!r} (or text), a caption column, "
            "or --instance_prompt for all of them."
        )
    rows["caption"] = [caption or args.instance_prompt for caption in rows["caption"]]
    if not rows["name"]:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in skipped[:SHOWN])
        raise InputError(
            f"{args.instance_data_dir!r} has no readable target image{f' ({reasons})' if reasons else ''}; expected "
            f"image files ({', '.join(IMAGE_SUFFIXES)}) or a dataset with an {args.instance_image_column!r} column."
        )
    if args.placeholder_token is not None and not any(args.placeholder_token in c for c in rows["caption"]):
        raise InputError(
            f"No caption contains --placeholder_token {args.placeholder_token!r} (first: {rows['caption'][0]!r}), so "
            "its embedding would never train; put it in the captions or --instance_prompt."
        )
    return rows, skipped


def read_instance_folder(path, caption_column):
    """Every file of a DreamBooth-style folder: images with their captions; other files skipped with a reason."""
    captions = {}
    metadata = path / "metadata.jsonl"
    if metadata.exists():
        for number, line in enumerate(read_caption_file(metadata).splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                captions[entry["file_name"]] = entry.get(caption_column, entry.get("text"))
            except (ValueError, KeyError, TypeError) as error:
                raise InputError(
                    f"{metadata} line {number} is not a JSON object with file_name and {caption_column!r} "
                    f"({type(error).__name__}: {error})."
                ) from error
    rows, skipped = {"caption": [], "image": [], "name": []}, []
    for child in sorted(path.iterdir()):
        if child.name in CAPTION_FILES or child.is_dir():
            continue
        if child.suffix.lower() == ".txt" and any(child.with_suffix(s).exists() for s in IMAGE_SUFFIXES):
            continue  # a caption
        if child.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append((child.name, f"not an image file ({', '.join(IMAGE_SUFFIXES)})"))
            continue
        try:
            decode_image(str(child))  # from the path, so that the decoder's message names the file
        except Exception as error:  # any decoder error: skip and count, say why
            skipped.append((child.name, f"unreadable image ({type(error).__name__}: {error})"))
            continue
        sidecar = child.with_suffix(".txt")
        caption = read_caption_file(sidecar).strip() if sidecar.exists() else captions.get(child.name)
        rows["caption"].append((caption or "").strip())
        rows["image"].append(child.read_bytes())
        rows["name"].append(child.name)
    return rows, skipped


def read_caption_file(path):
    """A caption file's text (a <image>.txt or the metadata.jsonl); one that is not UTF-8 text stops the run."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(
            f"{path} could not be read as UTF-8 text ({type(error).__name__}: {error}); expected a caption file: "
            "the caption of the image beside it (<image>.txt), or JSON lines with file_name and a caption "
            "(metadata.jsonl)."
        ) from None


def read_instance_dataset(args):
    """Target images from a dataset (a hub id, a data folder or file): its image column and optional captions."""
    dataset = load_split(args.instance_data_dir, args.dataset_split_name, args.cache_dir)
    if args.instance_image_column not in dataset.column_names:
        raise InputError(
            f"{args.instance_data_dir!r} holds no image files and its split {args.dataset_split_name!r} has no "
            f"column {args.instance_image_column!r} (it has {dataset.column_names}); set --instance_image_column."
        )
    if isinstance(dataset.features[args.instance_image_column], datasets.Image):
        dataset = dataset.cast_column(args.instance_image_column, datasets.Image(decode=False))
    has_captions = args.caption_column in dataset.column_names
    rows, skipped = {"caption": [], "image": [], "name": []}, []
    for index, row in enumerate(dataset):
        value = row[args.instance_image_column]
        try:
            if isinstance(value, dict):
                value = value.get("bytes") or Path(value["path"]).read_bytes()
            decode_image(value)
        except Exception as error:  # any decoder error: skip and count, say why
            skipped.append((f"row {index}", f"unreadable image ({type(error).__name__}: {error})"))
            continue
        rows["caption"].append(((row[args.caption_column] if has_captions else None) or "").strip())
        rows["image"].append(value)
        rows["name"].append(f"row {index}")
    return rows, skipped


def personalization_pairs(instances, rejected_paths, caption_column):
    """(caption, target image, base-model sample) rows: a pair per sample, the target always the chosen side."""
    rows = {caption_column: [], "instance_image": [], "base_sample": []}
    for caption, image, paths in zip(instances["caption"], instances["image"], rejected_paths):
        for path in paths:
            rows[caption_column].append(caption)
            rows["instance_image"].append(image)
            rows["base_sample"].append(path.read_bytes())
    features = {caption_column: datasets.Value("string")}
    features.update({"instance_image": datasets.Value("binary"), "base_sample": datasets.Value("binary")})
    return datasets.Dataset.from_dict(rows, features=datasets.Features(features))


def subsample(train_split, args):
    """--max_train_samples: a random subset of the training pairs, drawn with --seed."""
    if args.max_train_samples is None:
        return train_split
    train_split = train_split.shuffle(seed=args.seed)
    return train_split.select(range(min(args.max_train_samples, len(train_split))))


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
    """Decoded, jointly augmented (target, base sample) pairs, the target as the winner. An undecodable pair comes
    out as its index and the reason, and collate_fn drops and counts it."""

    def __init__(self, dataset, args):
        self.dataset = dataset
        self.args = args
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
            images = [decode_image(row[column]) for column in ("instance_image", "base_sample")]
        except Exception as error:  # a broken image must not end a run: skip, count, say why
            return {"skipped_index": int(index), "reason": f"{type(error).__name__}: {error}"}
        # Augmentation randomness depends on (seed, epoch, index) only: resumable and worker-independent.
        rng = np.random.default_rng([self.seed, self.epoch, int(index), 0])
        pixel_values, time_ids = crop_and_flip_pair(images, args.resolution, args.random_crop, not args.no_hflip, rng)
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
def encode_prompts(text_encoders, tokenizers, prompts):
    """SDXL conditioning: penultimate hidden states of both encoders concatenated, pooled output of the second.

    Differentiable: with --train_text_encoder or --placeholder_token the loop's gradients reach the encoders.
    """
    prompt_embeds_list = []
    for tokenizer, text_encoder in zip(tokenizers, text_encoders):
        input_ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(next(text_encoder.parameters()).device)  # a DDP-wrapped encoder has no .device
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


def add_placeholder_token(tokenizers, text_encoders, placeholder, initializer):
    """Textual inversion: add `placeholder` to both tokenizers, its embedding rows copied from `initializer`'s.

    Returns the new token's id in each tokenizer. The rows are made trainable by `train_token_rows`.
    """
    token_ids = []
    for number, (tokenizer, text_encoder) in enumerate(zip(tokenizers, text_encoders), 1):
        initializer_ids = tokenizer.encode(initializer, add_special_tokens=False)
        if len(initializer_ids) != 1:
            raise InputError(
                f"--initializer_token {initializer!r} is {len(initializer_ids)} tokens in tokenizer {number} "
                f"({tokenizer.convert_ids_to_tokens(initializer_ids)}); expected a word that is one token."
            )
        vocab = tokenizer.get_vocab()
        known = placeholder in vocab or f"{placeholder}</w>" in vocab  # CLIP spells a word's last piece with </w>
        if known or tokenizer.add_tokens([placeholder]) != 1:
            raise InputError(
                f"--placeholder_token {placeholder!r} is already a token of tokenizer {number}; choose a new "
                "string, e.g. <sks>."
            )
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the row is set below
        token_id = tokenizer.convert_tokens_to_ids(placeholder)
        weight = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            weight[token_id] = weight[initializer_ids[0]].clone()
        token_ids.append(token_id)
    return token_ids


def train_token_rows(text_encoder, token_id):
    """Make the embedding matrix trainable with a gradient that is zero everywhere but the new token's row."""
    weight = text_encoder.get_input_embeddings().weight
    weight.requires_grad_(True)
    mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    mask[token_id] = 1
    weight.register_hook(lambda grad: grad * mask.to(grad.dtype))
    return weight


def token_embeddings(text_encoders, token_ids):
    """The new token's embedding in each text encoder, saved the way SDXL embeddings are (clip_l, clip_g)."""
    rows = [
        te.get_input_embeddings().weight[i].detach().float().cpu()[None] for te, i in zip(text_encoders, token_ids)
    ]
    return {"clip_l": rows[0].contiguous(), "clip_g": rows[1].contiguous()}


def add_text_encoder_lora(text_encoder, rank, alpha):
    """LoRA on a CLIP text encoder's attention projections (diffusers' DreamBooth-LoRA SDXL targets)."""
    from peft import LoraConfig

    target_modules = ["q_proj", "k_proj", "v_proj", "out_proj"]
    text_encoder.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=target_modules)
    )


# ----------------------------------------------------------------------------------------------
# Base-model samples (the rejected side) and validation images
# ----------------------------------------------------------------------------------------------
def sdxl_pipeline(args, vae, text_encoders, tokenizers, unet, dtype):
    """An SDXL pipeline around the models in memory: the base ones before training, the trained ones after."""
    pipeline = StableDiffusionXLPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        vae=vae,
        text_encoder=text_encoders[0],
        text_encoder_2=text_encoders[1],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet,
        revision=args.revision,
        variant=args.variant,
        dtype=dtype,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def rejected_prompt(caption, args):
    """The base model's prompt for a target's caption: the new token, which it does not know, as its initializer."""
    if args.placeholder_token is None:
        return caption
    return caption.replace(args.placeholder_token, args.initializer_token)


def sample_seed(seed, target, sample):
    """The seed of base-model sample `sample` of target `target`: independent of the process count."""
    return int(np.random.SeedSequence([seed, target, sample]).generate_state(1)[0])


def rejected_samples_folder(args, prompts, dtype):
    """One folder per (model, prompts, seed, sampler, resolution, dtype): no stale samples after a change."""
    key = {
        "model": args.pretrained_model_name_or_path,
        "revision": args.revision,
        "variant": args.variant,
        "vae": args.pretrained_vae_model_name_or_path,
        "prompts": prompts,
        "samples_per_image": args.num_rejected_per_image,
        "seed": args.seed,
        "resolution": args.resolution,
        "inference_steps": args.rejected_inference_steps,
        "guidance_scale": args.rejected_guidance_scale,
        "dtype": str(dtype),
    }
    root = args.rejected_cache_dir or os.path.join(args.output_dir, "rejected_samples")
    return Path(root, hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]), key


@torch.no_grad()
def draw_rejected_samples(accelerator, args, prompts, vae, text_encoders, tokenizers, unet, dtype):
    """Base-model samples for the targets' captions, the rejected side of the personalization pairs.

    Drawn once, each process its share, into a folder keyed on every setting that changes them: a later run
    with the same settings reads them back, and an interrupted one draws only what is missing. Sample k of
    target i starts from a CPU generator seeded with SeedSequence((--seed, i, k)).
    Returns the paths (a list of --num_rejected_per_image per target) and how many this run drew.
    """
    folder, key = rejected_samples_folder(args, prompts, dtype)
    paths = [
        [folder / f"{i:05d}-{k:02d}.png" for k in range(args.num_rejected_per_image)] for i in range(len(prompts))
    ]
    accelerator.wait_for_everyone()
    pending = [(i, k) for i, row in enumerate(paths) for k, path in enumerate(row) if not path.exists()]
    accelerator.wait_for_everyone()  # every process has listed the folder before any writes to it
    folder.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        (folder / "settings.json").write_text(json.dumps(key, indent=2))
    mine = pending[accelerator.process_index :: accelerator.num_processes]
    if mine:
        pipeline = sdxl_pipeline(args, vae, text_encoders, tokenizers, unet, dtype)
        for i, k in tqdm(mine, desc="Drawing rejected samples", disable=not accelerator.is_local_main_process):
            generator = torch.Generator().manual_seed(sample_seed(args.seed, i, k))
            with accelerator.autocast():
                image = pipeline(
                    prompts[i],
                    num_inference_steps=args.rejected_inference_steps,
                    guidance_scale=args.rejected_guidance_scale,
                    height=args.resolution,
                    width=args.resolution,
                    generator=generator,
                ).images[0]
            partial = paths[i][k].with_suffix(".partial")
            image.save(partial, format="PNG")
            partial.replace(paths[i][k])  # a killed run leaves no half-written sample behind
        del pipeline
    accelerator.wait_for_everyone()
    return paths, len(pending)


@torch.no_grad()
def render_validation(args, accelerator, vae, text_encoders, tokenizers, unet, dtype):
    """One image per --validation_prompts entry with `unet`, a fixed seed per prompt."""
    pipeline = sdxl_pipeline(args, vae, text_encoders, tokenizers, unet, dtype)
    images = []
    for i, prompt in enumerate(args.validation_prompts):
        generator = torch.Generator(device=accelerator.device).manual_seed(args.seed + i)
        with accelerator.autocast():
            output = pipeline(
                prompt,
                num_inference_steps=args.validation_inference_steps,
                guidance_scale=args.validation_guidance_scale,
                height=args.resolution,
                width=args.resolution,
                generator=generator,
            )
        images.append(output.images[0])
    return images


def log_validation(args, accelerator, base_images, vae, text_encoders, tokenizers, unet, dtype, step):
    """Render the trained model's validation images and save and log them beside the base model's."""
    images = render_validation(args, accelerator, vae, text_encoders, tokenizers, unet, dtype)
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

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, save_embedding_layers=False))


def weights_fingerprint(model):
    """sha256 of the trained parameters' bytes: equal on every process after a correct data-parallel run."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def personalization_summary(args, instances, skipped, rejected):
    """What a personalization run trained on, for training_summary.json."""
    return {
        "personalization": {
            "target_images": len(instances["name"]),
            "skipped_files": [f"{name}: {reason}" for name, reason in skipped],
            "rejected_samples": rejected,
            "train_text_encoder": args.train_text_encoder,
            "placeholder_token": args.placeholder_token,
        }
    }


def write_model_card(args, summary):
    method = f"MaPO (beta_mapo = {args.beta_mapo:g}, snr_value = {args.snr_value:g})"
    weights = f"`pytorch_lora_weights.safetensors` (LoRA rank {args.lora_rank})" if args.lora_rank else "`unet/`"
    if args.train_text_encoder:
        weights += ", with LoRA on both text encoders"
    if args.placeholder_token is not None:
        weights += f"; `{TEXTUAL_INVERSION_FILE}` (token `{args.placeholder_token}`: clip_l, clip_g)"
    if args.skip_final_save:
        weights = "not saved (--skip_final_save)"
    data = f"the target images of `{args.instance_data_dir}` against base-model samples (personalization)"
    rows = summary.get("last_step_metrics", {})
    metrics = "\n".join(f"| {key} | {value:.4f} |" for key, value in rows.items())
    card = f"""---
base_model: {args.pretrained_model_name_or_path}
tags: [stable-diffusion-xl, text-to-image, diffusers, mapo]
---
# {Path(args.output_dir).name}

{method} of `{args.pretrained_model_name_or_path}` on {data},
{steps(summary["global_step"])} of {summary["total_batch_size"]} pairs, learning rate {args.learning_rate:g}
({args.lr_scheduler}), trained with `train_mapo_personalization_sdxl.py`. Weights: {weights}.

Metrics of the last optimizer step:

| metric | value |
|---|---|
{metrics}
{usage(args)}"""
    write_atomically(Path(args.output_dir, "README.md"), lambda path: path.write_text(card))


def usage(args):
    """The model card's loading code for LoRA and textual-inversion outputs (a full UNet loads as `unet/`)."""
    if args.skip_final_save or not (args.lora_rank or args.placeholder_token):
        return ""
    lines = [
        "from diffusers import StableDiffusionXLPipeline",
        "from safetensors.torch import load_file",
        "",
        f'pipeline = StableDiffusionXLPipeline.from_pretrained("{args.pretrained_model_name_or_path}")',
    ]
    if args.lora_rank:
        lines.append(f'pipeline.load_lora_weights("{args.output_dir}")')
    if args.placeholder_token is not None:
        token = args.placeholder_token
        lines.append(f'embeddings = load_file("{Path(args.output_dir, TEXTUAL_INVERSION_FILE)}")')
        for key, suffix in (("clip_l", ""), ("clip_g", "_2")):
            lines.append(
                f'pipeline.load_textual_inversion(embeddings["{key}"], token="{token}", '
                f"text_encoder=pipeline.text_encoder{suffix}, tokenizer=pipeline.tokenizer{suffix})"
            )
    return "\nTo load it:\n\n```python\n" + "\n".join(lines) + "\n```\n"


def steps(count):
    return f"{count} optimizer step{'' if count == 1 else 's'}"


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def main(args):
    logging_dir = Path(args.output_dir, args.logging_dir)
    trains_text_encoders = args.train_text_encoder or args.placeholder_token is not None
    # The first encoder's last layer feeds nothing SDXL reads (it takes the penultimate hidden states), so its
    # LoRA weights get no gradient, which DDP refuses unless told (as diffusers' DreamBooth-LoRA SDXL does).
    ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=args.train_text_encoder)
    accelerator = Accelerator(
        kwargs_handlers=[ddp_kwargs],
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
    if trains_text_encoders and accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        raise InputError(
            "--train_text_encoder and --placeholder_token train three models at once, which this script does under "
            f"DDP only, not {accelerator.distributed_type.value}; use examples/accelerate_configs/multi_gpu_ddp.yaml "
            "(personalization trains a few images: one GPU is the paper's setting)."
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

    # Data first: a bad target folder stops the run before any model is loaded. The pairs are made once the base
    # model has drawn the rejected side.
    with accelerator.main_process_first():
        instances, instance_skipped = read_instances(args)
    for name, reason in instance_skipped:
        logger.warning(f"Skipped {name} in {args.instance_data_dir}: {reason}.")
    logger.info(
        f"Personalization: {len(instances['name'])} target images; skipped {len(instance_skipped)} files that "
        "are not readable images."
    )

    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.push_to_hub:
            from huggingface_hub import create_repo

            repo_name = args.hub_model_id or Path(args.output_dir).name
            repo_id = create_repo(repo_name, exist_ok=True, token=args.hub_token).repo_id

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
    token_ids = None
    if args.placeholder_token is not None:
        token_ids = add_placeholder_token(tokenizers, text_encoders, args.placeholder_token, args.initializer_token)

    # The rejected side: what the base model draws for each target's caption, before any adapter exists.
    prompts = [rejected_prompt(caption, args) for caption in instances["caption"]]
    rejected_paths, drawn = draw_rejected_samples(
        accelerator, args, prompts, vae, text_encoders, tokenizers, unet, weight_dtype
    )
    rejected = {"folder": str(rejected_paths[0][0].parent), "drawn": drawn}
    rejected["reused"] = len(prompts) * args.num_rejected_per_image - drawn
    logger.info(
        f"Rejected samples in {rejected['folder']}: {rejected['drawn']} drawn now, {rejected['reused']} reused."
    )
    train_split = subsample(personalization_pairs(instances, rejected_paths, args.caption_column), args)
    if args.train_batch_size * accelerator.num_processes < len(train_split):
        logger.info(
            f"Personalization: {len(train_split)} pairs, {args.train_batch_size * accelerator.num_processes} "
            f"per step; the paper trains on the whole set each step (--train_batch_size {len(train_split)})."
        )

    if args.lora_rank:
        add_lora_adapters(unet, args.lora_rank, args.lora_alpha, accelerator.mixed_precision)
    if args.train_text_encoder:
        for text_encoder in text_encoders:
            add_text_encoder_lora(text_encoder, args.lora_rank, args.lora_alpha)
    token_rows = []
    if token_ids is not None:
        token_rows = [train_token_rows(te, token_id) for te, token_id in zip(text_encoders, token_ids)]
    if trains_text_encoders and accelerator.mixed_precision == "fp16":
        cast_training_params(text_encoders, dtype=torch.float32)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if trains_text_encoders:
            for text_encoder in text_encoders:
                text_encoder.gradient_checkpointing_enable()

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

    def save_lora(folder):
        """The UNet's LoRA (and the text encoders' with --train_text_encoder) in one diffusers LoRA file."""
        if not accelerator.is_main_process:
            return
        model = accelerator.unwrap_model(unet)
        # the adapter's config (rank, alpha) goes into the file: without it a loader takes alpha = rank
        layers = {"unet_lora_layers": lora_state_dict(model)}
        layers["unet_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
        if args.train_text_encoder:
            for name, text_encoder in zip(("text_encoder", "text_encoder_2"), text_encoders):
                text_encoder = accelerator.unwrap_model(text_encoder)
                layers[f"{name}_lora_layers"] = lora_state_dict(text_encoder)
                layers[f"{name}_lora_adapter_metadata"] = text_encoder.peft_config["default"].to_dict()
        write_atomically(
            Path(folder, LORA_WEIGHTS),
            lambda path: StableDiffusionXLPipeline.save_lora_weights(folder, **layers, weight_name=path.name),
        )

    def save_embeddings(folder):
        if accelerator.is_main_process:
            encoders = [accelerator.unwrap_model(text_encoder) for text_encoder in text_encoders]
            embeddings = token_embeddings(encoders, token_ids)
            write_atomically(
                Path(folder, TEXTUAL_INVERSION_FILE),
                lambda path: save_file(embeddings, str(path), metadata={"token": args.placeholder_token}),
            )

    def save_trained(folder):
        """What this run trains, into `folder`; a collective under FSDP (every process calls this)."""
        if args.lora_rank:
            save_lora(folder)
        else:
            save_unet(unet, os.path.join(folder, "unet"))
        if token_ids is not None:
            save_embeddings(folder)

    def save_model_hook(models, weights, output_dir):
        save_trained(output_dir)
        while weights:
            weights.pop()

    def load_model_hook(models, input_dir):
        if not models:  # DeepSpeed and FSDP restored the model (and optimizer) from their own files
            return
        models.clear()  # restored here, from the files save_trained wrote
        model = accelerator.unwrap_model(unet)
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
            if args.train_text_encoder:
                for name, text_encoder in zip(("text_encoder", "text_encoder_2"), text_encoders):
                    _set_state_dict_into_text_encoder(
                        lora_weights, prefix=f"{name}.", text_encoder=accelerator.unwrap_model(text_encoder)
                    )
            if accelerator.mixed_precision == "fp16":  # also when fp16 comes from accelerate's config
                cast_training_params(model, dtype=torch.float32)
        else:
            loaded = UNet2DConditionModel.from_pretrained(input_dir, subfolder="unet")
            model.register_to_config(**loaded.config)
            model.load_state_dict(loaded.state_dict())
            del loaded
        if token_ids is not None:
            saved = load_file(os.path.join(input_dir, TEXTUAL_INVERSION_FILE))
            with torch.no_grad():
                for row, token_id, key in zip(token_rows, token_ids, ("clip_l", "clip_g")):
                    row[token_id] = saved[key][0].to(row.device, row.dtype)
        if trains_text_encoders and accelerator.mixed_precision == "fp16":
            cast_training_params(text_encoders, dtype=torch.float32)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    # Optimizer
    if args.scale_lr:
        total_pairs = args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        args.learning_rate = args.learning_rate * total_pairs
        args.text_encoder_lr = args.text_encoder_lr * total_pairs
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    param_groups = [{"params": [p for p in unet.parameters() if p.requires_grad]}]
    if args.train_text_encoder:
        lora_params = [p for te in text_encoders for p in te.parameters() if p.requires_grad]
        lora_params = [p for p in lora_params if all(p is not row for row in token_rows)]
        param_groups.append({"params": lora_params, "lr": args.text_encoder_lr})
    if token_rows:
        # No weight decay: it would shrink every other token's embedding, whose gradient is masked to zero.
        param_groups.append({"params": token_rows, "lr": args.text_encoder_lr, "weight_decay": 0.0})
    optimizer = optimizer_class(
        param_groups,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )

    # Dataset and dataloader
    memory = PeakMemory(accelerator.device)
    train_dataset = PreferencePairs(train_split, args)
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
                f"Every one of the {len(cache_skipped)} pairs has an undecodable image (pair {index}: {reason}); "
                f"check the target images of {args.instance_data_dir!r} and the base-model samples."
            )
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

    loop_text_encoders = text_encoders  # the ones the training loop calls: wrapped for DDP when they train
    if trains_text_encoders:
        unet, *loop_text_encoders, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            unet, *text_encoders, optimizer, train_dataloader, lr_scheduler
        )
    else:
        unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            unet, optimizer, train_dataloader, lr_scheduler
        )
    trained_models = [unet, *(loop_text_encoders if trains_text_encoders else [])]
    # FSDP and DeepSpeed replace the parameters
    params_to_optimize = [p for model in trained_models for p in model.parameters() if p.requires_grad]

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
    if args.train_text_encoder:
        training += f", text-encoder LoRA at learning rate {args.text_encoder_lr:g}"
    if args.placeholder_token is not None:
        training += f", textual inversion of {args.placeholder_token} (from {args.initializer_token})"
    logger.info("***** Running training *****")
    logger.info(f"  Method = MaPO, beta_mapo = {args.beta_mapo:g}, snr_value = {args.snr_value:g}, {training}")
    logger.info(
        f"  Num pairs = {len(train_dataset)}, epochs = {args.num_train_epochs}, steps = {args.max_train_steps}"
    )
    logger.info(
        f"  Pairs per device = {args.train_batch_size}, total batch (parallel, accumulation) = {total_batch_size}"
    )

    def validate(step):
        with memory.phase("validation"):
            model = accelerator.unwrap_model(unet)
            log_validation(args, accelerator, base_images, vae, text_encoders, tokenizers, model, weight_dtype, step)

    # Rendered by the starting model, before a checkpoint is loaded.
    summary = {}
    base_images = None
    if args.validation_prompts and accelerator.is_main_process:
        with memory.phase("validation"), adapters_disabled(accelerator.unwrap_model(unet), args.lora_rank) as base:
            base_images = render_validation(args, accelerator, vae, text_encoders, tokenizers, base, weight_dtype)

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
                    f"Every pair of a batch had an undecodable image ({skipped_total} skipped so far; pair {index}: "
                    f"{reason}); check the target images of {args.instance_data_dir!r} and the base-model samples."
                )
            with accelerator.accumulate(unet):
                generators = sample_generators(args.seed, epoch, batch["index"], accelerator.device)
                inputs = pair_batch_inputs(
                    batch,
                    vae,
                    loop_text_encoders,
                    tokenizers,
                    args.vae_encode_batch_size,
                    accelerator.device,
                    weight_dtype,
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
                if len(param_groups) > 1:
                    logs["lr_text_encoder"] = lr_scheduler.get_last_lr()[1]
                logs["skipped_pairs"] = skipped_total
                step_metrics = []
                accelerator.log(logs, step=global_step)
                progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", acc=f"{logs['implicit_acc']:.2f}")
                summary["last_step_metrics"] = {
                    k: v for k, v in logs.items() if k not in ("lr", "lr_text_encoder", "skipped_pairs")
                }

                if global_step % args.checkpointing_steps == 0:
                    if accelerator.is_main_process and args.checkpoints_total_limit is not None:
                        existing = list_checkpoints(args.output_dir)
                        for old in existing[: max(0, len(existing) - args.checkpoints_total_limit + 1)]:
                            shutil.rmtree(old)
                    save_path = os.path.join(args.output_dir, f"checkpoint-{global_step}")
                    accelerator.save_state(save_path)
                    logger.info(f"Saved state to {save_path}")

                if global_step % args.validation_steps == 0 and global_step < args.max_train_steps:
                    if base_images is not None:
                        validate(global_step)
                step_started = time.perf_counter()  # checkpointing and validation are not step time
            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps:
            break
    memory.switch(None)

    accelerator.wait_for_everyone()
    unet.eval()
    skipped_total = int(accelerator.reduce(torch.tensor(skipped_total, device=accelerator.device), "sum").item())
    skipped_total += len(cache_skipped)
    if accelerator.num_processes > 1 and accelerator.distributed_type != DistributedType.FSDP:
        # Data-parallel replicas must end bit-identical; say so rather than assume it.
        fingerprint = "".join(weights_fingerprint(accelerator.unwrap_model(model)) for model in trained_models)
        fingerprints = gather_object([fingerprint])
        summary["replicas_identical"] = len(set(fingerprints)) == 1
        if not summary["replicas_identical"]:
            logger.warning(f"The trained weights differ between processes: {fingerprints}")
    if not args.skip_final_save:
        save_trained(args.output_dir)
    if base_images is not None:
        validate(global_step)
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
                **personalization_summary(args, instances, instance_skipped, rejected),
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
    finals = ", ".join(f"{key} {value:.4g}" for key, value in summary["last_step_metrics"].items())
    lines.append(f"   last step: {finals}")
    lines.append(f"   skipped undecodable pairs: {summary['skipped_pairs']}")
    peaks = ", ".join(
        f"{phase} {value / 2**30:.2f} GiB" for phase, value in summary["peak_memory_by_phase_bytes"].items()
    )
    lines.append(
        f"   {summary['seconds_per_step_median']:.3f} s per step (median); "
        f"peak memory ({summary['peak_memory_kind']}): {peaks}"
    )
    if "replicas_identical" in summary:
        lines.append(f"   weights identical on all processes: {'yes' if summary['replicas_identical'] else 'NO'}")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    try:
        main(ARGS)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
