#!/usr/bin/env python
r"""Generate K images per prompt from an SD1.x/2.x or SDXL pipeline, optionally with trained weights, for evaluation.

    accelerate launch examples/eval/generate.py --model_name mapo \
        --lora_path sdxl-mapo --prompts pickapic_v2_test --images_per_prompt 4 --output_dir generated

writes `generated/mapo/<prompt_index>_<k>.png`, `manifest.jsonl` (one row per image: prompt,
prompt_index, k, seed, image), `prompts.json` and `generation_config.json`.

- The pipeline is the text-to-image pipeline that the model's model_index.json names (SDXL, SD1.x, SD2.x);
  an SD folder without a safety checker is loaded without one.
- Trained weights: `--lora_path` (a training output folder with `pytorch_lora_weights.safetensors`,
  or the file) or `--unet_path` (a folder with `unet/`, the `unet/` folder itself, or a hub repository
  such as mhdang/dpo-sdxl-text2image-v1); neither for the base model. A personalization run's new token
  (`textual_inversion.safetensors`) loads from the --lora_path folder, or from --textual_inversion_path.
- Same seeds for every model: image k of prompt i is drawn from its own generator seeded with
  SeedSequence((--seed, i, k)), so models compared with the same --seed and prompt set start from
  the same noise, whatever the batch size or number of processes. (Runs with the same batching give
  identical files; a different batching can move a pixel by one level through float rounding.)
- Resumable: an image already on disk is not made again (files are written atomically), so an
  interrupted run, or a run with more prompts or a larger K, only makes what is missing. Settings
  that change the images (model, weights, scheduler, steps, guidance, size, seed, precision) must
  match the folder's generation_config.json; prompts must extend, not change, its prompts.json.
- `accelerate launch` splits the missing images over the processes.

The module-level helpers (seeds, atomic writes, the settings guard, the process split, pipeline loading) are
shared with examples/ddspo/generate_pairs.py.
"""

import argparse
import json
import os
import sys
from pathlib import Path

from examples.eval.prompts import PROMPT_SET_NAMES, PromptSetError, load_prompts


SCHEDULERS = {
    "default": None,  # the pipeline's own (Euler discrete for SDXL base 1.0)
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",  # CaPO's data and evaluation sampler for SDXL (Appendix B.1)
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
TEXTUAL_INVERSION_NAME = "textual_inversion.safetensors"  # train_mapo_sdxl.py --placeholder_token: clip_l, clip_g


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default that is a value (not None) and keeps the example's lines (the examples/ddspo
    tools built on this one use it)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class InputError(ValueError):
    """Bad flags or data: the message says what was expected, what was found and what to do."""


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default="stabilityai/stable-diffusion-xl-base-1.0",
        help="Base pipeline (hub id or folder): SDXL, SD1.x or SD2.x, the class its model_index.json names.",
    )
    parser.add_argument(
        "--pretrained_vae_model_name_or_path",
        type=str,
        default=None,
        help="A VAE to use instead of the pipeline's, e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in fp16.",
    )
    parser.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model on the hub.")
    parser.add_argument("--variant", type=str, default=None, help="Weight variant to load, e.g. fp16.")
    parser.add_argument(
        "--lora_path",
        type=str,
        default=None,
        help=f"LoRA weights to apply: a training output folder holding {LORA_WEIGHT_NAME}, or a .safetensors file.",
    )
    parser.add_argument(
        "--lora_scale", type=float, default=1.0, help="Scale of the LoRA update when it is fused into the weights."
    )
    parser.add_argument(
        "--textual_inversion_path",
        type=str,
        default=None,
        help=f"A new token's embeddings (train_mapo_sdxl.py --placeholder_token): a folder holding "
        f"{TEXTUAL_INVERSION_NAME} or the file. Default: the --lora_path folder's, when it holds one.",
    )
    parser.add_argument(
        "--unet_path",
        type=str,
        default=None,
        help="A fine-tuned UNet: a training output folder holding unet/, the unet/ folder itself, "
        "or a hub repository of either kind.",
    )
    parser.add_argument(
        "--model_name",
        type=str,
        required=True,
        help="Name of this model's sub-folder of --output_dir and of its row in compare.py's table.",
    )
    parser.add_argument(
        "--prompts",
        type=str,
        required=True,
        help=f"Prompt set: one of {PROMPT_SET_NAMES}, a .txt/.csv/.tsv/.json/.jsonl/.parquet file, "
        "a dataset folder or a hub dataset id.",
    )
    parser.add_argument(
        "--prompt_column",
        type=str,
        default=None,
        help="Column holding the prompts (files and datasets; default: prompt, caption, Prompt or text).",
    )
    parser.add_argument(
        "--prompt_split", type=str, default=None, help="Dataset split to read (default: the named set's, else test)."
    )
    parser.add_argument(
        "--max_prompts",
        type=int,
        default=None,
        help="Keep the first N prompts (after removing duplicates and shuffling).",
    )
    parser.add_argument(
        "--shuffle_prompts_seed",
        type=int,
        default=None,
        help="Shuffle the prompts with this seed before --max_prompts (to sample, e.g. DiffusionDB).",
    )
    parser.add_argument(
        "--keep_duplicate_prompts",
        action="store_true",
        help="Keep repeated prompts (by default each distinct prompt is used once).",
    )
    parser.add_argument(
        "--images_per_prompt",
        type=int,
        default=4,
        help="K, images per prompt (CaPO's win-rate makes K^2 comparisons per prompt).",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Base seed; image k of prompt i uses SeedSequence((seed, i, k))."
    )
    add_sampling_arguments(parser)
    parser.add_argument(
        "--negative_prompt", type=str, default=None, help="Negative prompt for every image (default: none)."
    )
    parser.add_argument("--output_dir", type=str, required=True, help="Images go to OUTPUT_DIR/MODEL_NAME/.")
    parser.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are cached.")
    args = parser.parse_args(input_args)
    try:
        check_args(args)
    except InputError as error:
        parser.error(str(error))
    return args


def add_sampling_arguments(parser):
    """The sampler flags, named and defaulted alike in every tool that generates images."""
    parser.add_argument("--scheduler", type=str, default="default", choices=list(SCHEDULERS), help="Sampler.")
    parser.add_argument("--num_inference_steps", type=int, default=50, help="Sampling steps.")
    parser.add_argument("--guidance_scale", type=float, default=5.0, help="Classifier-free guidance scale.")
    parser.add_argument("--resolution", type=int, default=1024, help="Side of the square images.")
    parser.add_argument("--batch_size", type=int, default=4, help="Images per pipeline call on each process.")
    parser.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Weights and activations precision (default: the accelerate config's).",
    )


def check_sampling_args(args):
    """Refuse bad sampler flags (those of `add_sampling_arguments`) before any model is loaded."""
    for name in ("num_inference_steps", "batch_size", "resolution"):
        if getattr(args, name) <= 0:
            raise InputError(f"--{name} must be positive, got {getattr(args, name)}.")
    if args.resolution % 8 != 0:
        raise InputError(f"--resolution must be a multiple of 8 (the VAE downsamples 8x), got {args.resolution}.")


def check_args(args):
    """Refuse bad settings before any model is loaded."""
    if args.images_per_prompt <= 0:
        raise InputError(f"--images_per_prompt must be positive, got {args.images_per_prompt}.")
    check_sampling_args(args)
    if args.max_prompts is not None and args.max_prompts <= 0:
        raise InputError(f"--max_prompts must be positive, got {args.max_prompts}.")
    if args.lora_path is not None and args.unet_path is not None:
        raise InputError(
            "Give --lora_path or --unet_path, not both: each evaluates one trained model against the same base."
        )
    if args.lora_path is not None:
        lora = Path(args.lora_path)
        if lora.is_dir() and not (lora / LORA_WEIGHT_NAME).is_file():
            raise InputError(
                f"--lora_path {args.lora_path!r} is a folder without {LORA_WEIGHT_NAME}; "
                "expected a training output folder or the .safetensors file."
            )
        if not lora.exists():
            raise InputError(f"--lora_path {args.lora_path!r} does not exist.")
    args.textual_inversion_path = textual_inversion_file(args.textual_inversion_path, args.lora_path)
    if args.unet_path is not None and Path(args.unet_path).exists():
        unet_subfolder(args.unet_path)  # a hub id is checked when the model loads
    if (
        not args.model_name
        or any(character in args.model_name for character in "/\\")
        or args.model_name.startswith(".")
    ):
        raise InputError(f"--model_name must be a plain folder name (no slashes), got {args.model_name!r}.")


def textual_inversion_file(path, lora_path):
    """The embeddings file to load: `path` (a folder holding TEXTUAL_INVERSION_NAME, or the file), else the one
    beside the LoRA weights of a training output folder, else None."""
    if path is None:
        beside_lora = Path(lora_path) / TEXTUAL_INVERSION_NAME if lora_path is not None else None
        return str(beside_lora) if beside_lora is not None and beside_lora.is_file() else None
    candidate = Path(path) / TEXTUAL_INVERSION_NAME if Path(path).is_dir() else Path(path)
    if not candidate.is_file():
        raise InputError(
            f"--textual_inversion_path {path!r}: no such file; expected a training output folder holding "
            f"{TEXTUAL_INVERSION_NAME} or the file."
        )
    return str(candidate)


def load_textual_inversion(pipeline, path):
    """Add the token saved in `path` (its metadata names it) to the SDXL pipeline's two tokenizers and encoders."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as saved:
        token = (saved.metadata() or {}).get("token")
    embeddings = load_file(path)
    if not token or set(embeddings) != {"clip_l", "clip_g"} or not hasattr(pipeline, "text_encoder_2"):
        raise InputError(
            f"{path} is not an SDXL textual-inversion file of train_mapo_sdxl.py (clip_l and clip_g embeddings, the "
            f"token in its metadata) for this {type(pipeline).__name__}; found keys {sorted(embeddings)}."
        )
    for key, suffix in (("clip_l", ""), ("clip_g", "_2")):
        pipeline.load_textual_inversion(
            embeddings[key],
            token=token,
            text_encoder=getattr(pipeline, f"text_encoder{suffix}"),
            tokenizer=getattr(pipeline, f"tokenizer{suffix}"),
        )
    return token


def unet_subfolder(unet_path):
    """The subfolder ("unet", or None: the top) with the UNet config of a training output, unet folder or hub repo."""
    path = Path(unet_path)
    if path.exists():
        has = lambda name: (path / name).is_file()  # noqa: E731
    else:
        from huggingface_hub import file_exists

        has = lambda name: file_exists(unet_path, name)  # noqa: E731
    if has("unet/config.json"):
        return "unet"
    if has("config.json"):
        return None
    raise InputError(
        f"--unet_path {unet_path!r} holds neither unet/config.json nor config.json; "
        "expected a training output folder with unet/, a unet folder, or such a hub repository."
    )


def image_seed(base_seed, *indices):
    """The seed of one image, from SeedSequence((base_seed, *indices)): (i, k) for image k of prompt i here, the row
    index for a DDSPO pair. Independent of K, of the other prompts and of how the work is split."""
    import numpy as np

    return int(np.random.SeedSequence((base_seed, *indices)).generate_state(1)[0])


def generator_for(seed):
    """A CPU generator, so that an image's starting noise is the same on every device."""
    import torch

    return torch.Generator("cpu").manual_seed(seed)


def image_filename(prompt_index, k):
    return f"{prompt_index:05d}_{k:02d}.png"


def resolved_path(path):
    """A local path made absolute (the same folder named two ways is one setting); a hub id or None unchanged."""
    return str(Path(path).resolve()) if path is not None and Path(path).exists() else path


def weight_dtype_for(mixed_precision):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def generation_settings(args, weight_dtype):
    """Everything that changes the pixels of an image with a given prompt and seed."""
    return {
        "pretrained_model_name_or_path": resolved_path(args.pretrained_model_name_or_path),
        "pretrained_vae_model_name_or_path": resolved_path(args.pretrained_vae_model_name_or_path),
        "revision": args.revision,
        "variant": args.variant,
        "lora_path": resolved_path(args.lora_path),
        "lora_scale": args.lora_scale if args.lora_path else None,
        "textual_inversion_path": resolved_path(args.textual_inversion_path),
        "unet_path": resolved_path(args.unet_path),
        "scheduler": args.scheduler,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "negative_prompt": args.negative_prompt,
        "resolution": args.resolution,
        "seed": args.seed,
        "dtype": str(weight_dtype).removeprefix("torch."),
    }


def changed_settings(config_file, settings):
    """'key: old on disk, new now; ...' for every setting that differs from those saved in `config_file` (a JSON
    file of a previous run), or '' when none does or there is no such file."""
    if not config_file.is_file():
        return ""
    previous = json.loads(config_file.read_text())
    changed = {key: (previous.get(key), value) for key, value in settings.items() if previous.get(key) != value}
    return "; ".join(f"{key}: {old!r} on disk, {new!r} now" for key, (old, new) in changed.items())


def check_run_folder(run_dir, settings, prompts):
    """A resumed folder must hold images of the same settings and prompt order; raises InputError otherwise."""
    config_file, prompts_file = run_dir / "generation_config.json", run_dir / "prompts.json"
    details = changed_settings(config_file, settings)
    if details:
        raise InputError(
            f"{run_dir} holds images made with other settings ({details}). "
            "Use another --model_name or --output_dir, or delete the folder."
        )
    if prompts_file.is_file():
        previous_prompts = json.loads(prompts_file.read_text())
        shared = min(len(previous_prompts), len(prompts))
        mismatch = next((i for i in range(shared) if previous_prompts[i] != prompts[i]), None)
        if mismatch is not None:
            raise InputError(
                f"Prompt {mismatch} of this run ({prompts[mismatch]!r}) differs from the one the images in {run_dir} "
                f"were made for ({previous_prompts[mismatch]!r}). Keep the same prompt set and order "
                "(--prompts, --shuffle_prompts_seed), or use another --model_name."
            )


def write_atomically(path, write):
    """`write(temporary_path)`, then rename it to `path`: a crash leaves the old file or none, never half a file.
    The temporary file is hidden (a leading dot) in the same folder."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(temporary)
    os.replace(temporary, path)


def share_of_this_process(accelerator, items):
    """This process's contiguous share of `items` (all of them with one process). Every process must pass the same
    list, so each one lists the work on disk before any of them writes (`accelerator.wait_for_everyone()`)."""
    with accelerator.split_between_processes(items) as share:
        return list(share)


def load_pipeline(
    pretrained_model_name_or_path,
    weight_dtype,
    device,
    scheduler="default",
    vae_path=None,
    unet_path=None,
    lora_path=None,
    lora_scale=1.0,
    textual_inversion_path=None,
    revision=None,
    variant=None,
    cache_dir=None,
):
    """The text-to-image pipeline of the family model_index.json names (SDXL, SD1.x, SD2.x), on `device`.

    `vae_path` and `unet_path` replace those components; `lora_path` (a folder with LORA_WEIGHT_NAME, or the file)
    is fused into the weights at `lora_scale`; `textual_inversion_path` adds a trained token (SDXL);
    `scheduler` is a key of SCHEDULERS. A local SD folder whose
    model_index.json names a safety checker that is not in the folder is loaded without one.
    """
    import diffusers
    from diffusers import AutoencoderKL, AutoPipelineForText2Image, DiffusionPipeline, UNet2DConditionModel

    try:
        model_index = DiffusionPipeline.load_config(
            pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir
        )
    except OSError as error:  # no model_index.json: a wrong folder, a wrong hub id, or the hub out of reach
        raise InputError(
            f"--pretrained_model_name_or_path {pretrained_model_name_or_path!r} could not be loaded "
            f"({' '.join(str(error).split())[:200]}); expected a diffusers pipeline folder or a hub id reachable "
            "from here (is HF_HUB_OFFLINE set?)."
        ) from error
    components = {}
    if vae_path is not None:
        components["vae"] = AutoencoderKL.from_pretrained(vae_path, dtype=weight_dtype, cache_dir=cache_dir)
    if unet_path is not None:
        if "unet" not in model_index:
            raise InputError(
                f"--unet_path was given, but {pretrained_model_name_or_path!r} is a {model_index['_class_name']} "
                "without a UNet; use a UNet pipeline (SD1.x, SD2.x, SDXL)."
            )
        components["unet"] = UNet2DConditionModel.from_pretrained(
            unet_path, subfolder=unet_subfolder(unet_path), dtype=weight_dtype, cache_dir=cache_dir
        )
    local_folder = Path(pretrained_model_name_or_path)
    safety_checker = model_index.get("safety_checker")
    if (
        local_folder.is_dir()
        and safety_checker
        and safety_checker[0]
        and not (local_folder / "safety_checker").is_dir()
    ):
        components.update(safety_checker=None, requires_safety_checker=False)
    pipeline = AutoPipelineForText2Image.from_pretrained(
        pretrained_model_name_or_path,
        revision=revision,
        variant=variant,
        dtype=weight_dtype,
        cache_dir=cache_dir,
        **components,
    )
    if SCHEDULERS[scheduler] is not None:
        pipeline.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipeline.scheduler.config)
    if textual_inversion_path is not None:
        load_textual_inversion(pipeline, textual_inversion_path)
    if lora_path is not None:
        lora = Path(lora_path)
        folder, weight_name = (lora, LORA_WEIGHT_NAME) if lora.is_dir() else (lora.parent, lora.name)
        pipeline.load_lora_weights(str(folder), weight_name=weight_name)
        pipeline.fuse_lora(lora_scale=lora_scale)
        pipeline.unload_lora_weights()  # the update now lives in the fused weights
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def main(args):
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    weight_dtype = weight_dtype_for(accelerator.mixed_precision)
    log = accelerator.print

    try:
        with accelerator.main_process_first():
            prompts, counts = load_prompts(
                args.prompts,
                column=args.prompt_column,
                split=args.prompt_split,
                cache_dir=args.cache_dir,
                keep_duplicates=args.keep_duplicate_prompts,
                shuffle_seed=args.shuffle_prompts_seed,
                max_prompts=args.max_prompts,
            )
    except PromptSetError as error:
        raise InputError(str(error)) from error
    log(
        f"prompts: {len(prompts)} from {args.prompts} (read {counts['read']}; dropped {counts['empty']} empty, "
        f"{counts['duplicates']} duplicates, {counts['beyond_max_prompts']} beyond --max_prompts)"
    )

    run_dir = Path(args.output_dir) / args.model_name
    settings = generation_settings(args, weight_dtype)
    check_run_folder(run_dir, settings, prompts)  # on every process, so that all of them stop together
    all_items = [(prompt_index, k) for prompt_index in range(len(prompts)) for k in range(args.images_per_prompt)]
    pending = [item for item in all_items if not (run_dir / image_filename(*item)).is_file()]
    accelerator.wait_for_everyone()  # every process has listed the missing images before any is written
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        previous_prompts = (
            json.loads((run_dir / "prompts.json").read_text()) if (run_dir / "prompts.json").is_file() else []
        )
        kept_prompts = (
            prompts if len(prompts) >= len(previous_prompts) else previous_prompts
        )  # a shorter run keeps the longer list
        write_atomically(
            run_dir / "generation_config.json", lambda path: path.write_text(json.dumps(settings, indent=2))
        )
        write_atomically(
            run_dir / "prompts.json",
            lambda path: path.write_text(json.dumps(kept_prompts, indent=0, ensure_ascii=False)),
        )
    log(
        f"{args.model_name}: {len(pending)} images to generate, "
        f"{len(all_items) - len(pending)} already in {run_dir} (skipped)"
    )

    generated = 0
    my_items = share_of_this_process(accelerator, pending)
    if my_items:
        pipeline = load_pipeline(
            args.pretrained_model_name_or_path,
            weight_dtype,
            accelerator.device,
            scheduler=args.scheduler,
            vae_path=args.pretrained_vae_model_name_or_path,
            unet_path=args.unet_path,
            lora_path=args.lora_path,
            lora_scale=args.lora_scale,
            textual_inversion_path=args.textual_inversion_path,
            revision=args.revision,
            variant=args.variant,
            cache_dir=args.cache_dir,
        )
        progress = tqdm(
            total=len(my_items),
            desc=f"generating {args.model_name} (this process's share)",
            disable=not accelerator.is_local_main_process,
        )
        for start in range(0, len(my_items), args.batch_size):
            batch = my_items[start : start + args.batch_size]
            images = pipeline(
                prompt=[prompts[i] for i, _ in batch],
                negative_prompt=[args.negative_prompt] * len(batch) if args.negative_prompt is not None else None,
                num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale,
                height=args.resolution,
                width=args.resolution,
                generator=[generator_for(image_seed(args.seed, i, k)) for i, k in batch],
            ).images
            for (i, k), image in zip(batch, images):
                write_atomically(run_dir / image_filename(i, k), lambda path: image.save(path, format="PNG"))
            generated += len(batch)
            progress.update(len(batch))
        progress.close()
    generated_per_process = gather_object([generated])
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        rows = [
            {
                "prompt": prompts[i],
                "prompt_index": i,
                "k": k,
                "seed": image_seed(args.seed, i, k),
                "image": image_filename(i, k),
            }
            for i, k in all_items
            if (run_dir / image_filename(i, k)).is_file()
        ]
        missing = len(all_items) - len(rows)
        write_atomically(
            run_dir / "manifest.jsonl",
            lambda path: path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)),
        )
        log(
            f"== generate finished: {sum(generated_per_process)} images generated "
            f"(per process: {generated_per_process}), {len(all_items) - len(pending)} skipped (already on disk), "
            f"{missing} missing; manifest with {len(rows)} images in {run_dir / 'manifest.jsonl'}"
        )
        if missing:
            raise RuntimeError(
                f"{missing} images are missing from {run_dir} after generation; rerun the same command to make them."
            )
    accelerator.end_training()


if __name__ == "__main__":
    try:
        main(parse_args())
    except InputError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
