#!/usr/bin/env python
r"""Generate K images per prompt from an SD1.x/2.x, SDXL, SD3 or SANA pipeline, optionally with trained weights.

    accelerate launch -m examples.eval.generate --model_name mapo \
        --lora_path sdxl-mapo --prompts pickapic_v2_test --images_per_prompt 4 --output_dir generated

writes `generated/mapo/<prompt_index>_<k>.png`, `manifest.jsonl` (one row per image: prompt,
prompt_index, k, seed, image), `prompts.json` and `generation_config.json`.

- The pipeline is the text-to-image pipeline that the model's model_index.json names (SDXL, SD1.x, SD2.x,
  SD3 / SD3.5); an SD folder without a safety checker is loaded without one.
- SD3 (flow matching): `--scheduler default` is the pipeline's own FlowMatchEulerDiscreteScheduler,
  `--scheduler flow_dpmpp_2m` the DPM-Solver++(2M) on flow sigmas that CaPO samples SD3 with; `--shift` and
  `--max_sequence_length` default to the pipeline's own (3.0, 256). CaPO's setting:
      accelerate launch -m examples.eval.generate --pretrained_model_name_or_path \
          stabilityai/stable-diffusion-3-medium-diffusers --scheduler flow_dpmpp_2m --shift 3.0 \
          --num_inference_steps 50 --guidance_scale 5.0 --model_name sd3 --prompts pickapic_v2_test \
          --output_dir generated
  `--lora_path` takes a train_diffusion_dpo_sd3.py LoRA output and `--transformer_path` its full fine-tuning
  output (a folder with `transformer/`); `--unet_path` and `--textual_inversion_path` are for UNet pipelines.
- SANA (SanaPipeline) as SD3: its own scheduler (DPM-Solver on flow sigmas, which flow_dpmpp_2m equals), its
  flow_shift, and its prompt encoding (Gemma2, `max_sequence_length` 300 behind the pipeline's complex human
  instruction) unless `--shift` or `--max_sequence_length` are given; it draws at `--resolution` itself, a multiple
  of 32 (no binning to its trained sizes).
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
"""

import argparse
import json
from pathlib import Path

from examples.lib.cli import InputError, parse_checked_args, run_tool
from examples.lib.files import (
    check_safetensors,
    check_safetensors_in,
    check_settings_unchanged,
    check_writable_folder,
    image_problem,
    resolved_path,
    write_atomically,
)
from examples.lib.prompts import PROMPT_SET_NAMES, read_prompts
from examples.lib.sampling import (
    FLOW_PIPELINES,
    TEXTUAL_INVERSION_NAME,
    add_pipeline_arguments,
    add_sampling_arguments,
    add_trained_weights_arguments,
    check_sampling_args,
    check_trained_weights,
    draw,
    image_seed,
    load_pipeline_for,
    local_pipeline_class,
    sampler_settings,
    share_of_this_process,
    textual_inversion_file,
    weight_dtype_for,
)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pipeline_arguments(
        parser,
        "Base pipeline (hub id or folder): SDXL, SD1.x, SD2.x, SD3 or SANA, the class its model_index.json names.",
    )
    add_trained_weights_arguments(parser)
    parser.add_argument(
        "--textual_inversion_path",
        type=str,
        default=None,
        help=f"A new token's embeddings (train_mapo_personalization_sdxl.py --placeholder_token): a folder "
        f"holding {TEXTUAL_INVERSION_NAME} or the file. Default: the --lora_path folder's, when it holds one.",
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
    return parse_checked_args(parser, check_args, input_args)


def check_args(args):
    """Refuse bad settings before any model is loaded."""
    if args.images_per_prompt <= 0:
        raise InputError(f"--images_per_prompt must be positive, got {args.images_per_prompt}.")
    check_sampling_args(args)
    check_safetensors_in(args.pretrained_model_name_or_path, "--pretrained_model_name_or_path")
    if args.max_prompts is not None and args.max_prompts <= 0:
        raise InputError(f"--max_prompts must be positive, got {args.max_prompts}.")
    check_trained_weights(args)
    args.textual_inversion_path = textual_inversion_file(args.textual_inversion_path, args.lora_path)
    if args.textual_inversion_path is not None and Path(args.textual_inversion_path).is_file():
        check_safetensors(args.textual_inversion_path, "--textual_inversion_path")
    class_name = local_pipeline_class(args.pretrained_model_name_or_path)
    if class_name in FLOW_PIPELINES and args.textual_inversion_path is not None:  # (a hub id: load_pipeline checks)
        raise InputError(
            f"--textual_inversion_path is for UNet pipelines (SD1.x, SD2.x, SDXL), but "
            f"{args.pretrained_model_name_or_path!r} is a {class_name}; give its trained weights as --lora_path "
            "or --transformer_path."
        )
    if (
        not args.model_name
        or any(character in args.model_name for character in "/\\")
        or args.model_name.startswith(".")
    ):
        raise InputError(f"--model_name must be a plain folder name (no slashes), got {args.model_name!r}.")
    # a resumable folder: an earlier run's images are kept (and checked against its settings in main)
    check_writable_folder(args.output_dir)
    check_writable_folder(Path(args.output_dir) / args.model_name, flag="--output_dir/--model_name")


def image_filename(prompt_index, k):
    return f"{prompt_index:05d}_{k:02d}.png"


def generation_settings(args, weight_dtype):
    """Everything that changes the pixels of an image with a given prompt and seed."""
    return {
        **sampler_settings(args, weight_dtype),
        "lora_path": resolved_path(args.lora_path),
        "lora_scale": args.lora_scale if args.lora_path else None,
        "textual_inversion_path": resolved_path(args.textual_inversion_path),
        "unet_path": resolved_path(args.unet_path),
        # a flow pipeline's; absent when not given, so folders made before the flag resume
        **({"transformer_path": resolved_path(args.transformer_path)} if args.transformer_path else {}),
        "negative_prompt": args.negative_prompt,
        "seed": args.seed,
    }


def check_run_folder(run_dir, settings, prompts):
    """A resumed folder must hold images of the same settings and prompt order; raises InputError otherwise."""
    prompts_file = run_dir / "prompts.json"
    check_settings_unchanged(
        run_dir / "generation_config.json",
        settings,
        "images made with other settings",
        "Use another --model_name or --output_dir, or delete the folder.",
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


def images_to_draw(run_dir, items):
    """(the (prompt_index, k) of `items` to draw, those of them on disk but unreadable): an image on disk is done only
    when it is whole; a truncated or empty file (an interrupted copy, a full disk) is drawn again."""
    present = {item for item in items if (run_dir / image_filename(*item)).is_file()}
    broken = [item for item in items if item in present and image_problem(run_dir / image_filename(*item))]
    redraw = set(broken)
    return [item for item in items if item not in present or item in redraw], broken


def main(args):
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    weight_dtype = weight_dtype_for(accelerator.mixed_precision)
    log = accelerator.print

    with accelerator.main_process_first():
        prompts, _ = read_prompts(args, keep_duplicates=args.keep_duplicate_prompts, log=log)

    run_dir = Path(args.output_dir) / args.model_name
    settings = generation_settings(args, weight_dtype)
    check_run_folder(run_dir, settings, prompts)  # on every process, so that all of them stop together
    all_items = [(prompt_index, k) for prompt_index in range(len(prompts)) for k in range(args.images_per_prompt)]
    pending, broken = images_to_draw(run_dir, all_items)
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
        + (f"; {len(broken)} on disk but unreadable (truncated or empty) are drawn again" if broken else "")
    )

    generated = 0
    my_items = share_of_this_process(accelerator, pending)
    if my_items:
        pipeline = load_pipeline_for(
            args,
            weight_dtype,
            accelerator.device,
            unet_path=args.unet_path,
            transformer_path=args.transformer_path,
            lora_path=args.lora_path,
            lora_scale=args.lora_scale,
            textual_inversion_path=args.textual_inversion_path,
        )
        progress = tqdm(
            total=len(my_items),
            desc=f"generating {args.model_name} (this process's share)",
            disable=not accelerator.is_local_main_process,
        )
        for start in range(0, len(my_items), args.batch_size):
            batch = my_items[start : start + args.batch_size]
            negative_prompts = [args.negative_prompt] * len(batch) if args.negative_prompt is not None else None
            seeds = [image_seed(args.seed, i, k) for i, k in batch]
            images, _ = draw(pipeline, [prompts[i] for i, _ in batch], seeds, args, negative_prompts)
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
    run_tool(main, parse_args)
