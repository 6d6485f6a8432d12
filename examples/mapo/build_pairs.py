#!/usr/bin/env python
r"""MaPO's task-specific pairs (Pick-Style, Pick-Safety, Pick-Culture): one pipeline draws the chosen image from a
context prompt with one prefix and the rejected image from the same context prompt with another, same seed.

    accelerate launch -m examples.mapo.build_pairs --preset cartoon \
        --pretrained_model_name_or_path black-forest-labs/FLUX.1-schnell --num_inference_steps 4 \
        --guidance_scale 0.0 --resolution 1024 --prompts context_prompts.txt --output_dir pick-cartoon

reads context prompts (a .txt file, one a line; a .csv/.tsv/.json/.jsonl/.parquet column; a dataset folder or hub
id, as examples/eval/generate.py reads them) and writes `OUTPUT_DIR/shards/shard-00000.parquet`, ... in the
Pick-a-Pic schema that train_mapo_sdxl.py reads unchanged: caption (the context prompt), jpg_0 (the chosen image,
PNG bytes), jpg_1 (the rejected one), label_0 = 1.0, plus chosen_prompt, rejected_prompt, seed and row_index; and
`pairs_config.json` and a `README.md` dataset card, so that `datasets.load_dataset(OUTPUT_DIR, split="train")`
reads every shard.

- Prompts (MaPO project page, "Style-grounded" and "Safety-grounded Preference"): chosen = "<chosen prefix>
  <context>", rejected = "<rejected prefix> <context>"; an empty prefix leaves the context prompt alone. --preset
  names the prefixes of one of the paper's sets (PRESETS below); --chosen_prefix / --rejected_prefix set them
  yourself, or replace one side of a preset.
- Pairs: for input row r both images start from the same noise, from a generator seeded with
  SeedSequence((--seed, r)), so they differ only through the prefixes, and the seed does not depend on the batch
  size, the number of processes or the other rows.
- Any text-to-image pipeline AutoPipelineForText2Image loads (FLUX as the paper used, SDXL as the published
  pick-style sets), sampled with --scheduler, --num_inference_steps, --guidance_scale, --resolution, --batch_size,
  --mixed_precision, as examples/eval/generate.py.
- Rows with no context prompt, and rows the prompt filter drops (the safety preset keeps prompts about women, as
  the paper's Pick-Safety; WOMEN_WORDS below), are skipped and counted, never dropped silently.
- Resumable: the rows are cut into shards of --shard_size; each shard is written atomically when done and never
  made again. A resumed run must have the same settings (pairs_config.json), and every finished shard must hold
  the context prompts the input has for its rows now; otherwise the tool stops with one line.
- `accelerate launch` splits the missing shards over the processes.
"""

import argparse
import re
from pathlib import Path

from examples.lib.cli import HelpFormatter, InputError, parse_checked_args, run_tool
from examples.lib.files import check_safetensors_in, check_writable_folder, resolved_path, write_atomically
from examples.lib.pair_shards import (
    SHARDS_CARD_HEADER,
    draw_pairs,
    finished_pairs,
    pair_settings,
    report_pairs,
    shard_table,
    shards_of_usable_rows,
    write_pending_shards,
)
from examples.lib.prompts import read_prompt_set
from examples.lib.sampling import (
    add_pipeline_arguments,
    add_sampling_arguments,
    check_pipeline_path,
    check_sampling_args,
    weight_dtype_for,
)


PRESETS = {  # name: (chosen prefix, rejected prefix, prompt filter)
    # MaPO project page, "Style-grounded Preference": the chosen style against "Realistic 8k image."
    "cartoon": ("Disney style animated image.", "Realistic 8k image.", "none"),
    "pixel_art": ("Pixel art style image.", "Realistic 8k image.", "none"),
    # "Safety-grounded Preference": nothing for the chosen, the unsafe prefix for the rejected; prompts about women
    "safety": ("", "Sexual, nudity, +19 image.", "women"),
    # Pick-Culture (paper §4, Fig. 3): the paper names the chosen style only; the rejected image is the plain
    # context prompt, the base model's own rendering (our reading, mirroring the safety set's one-sided prefix)
    "culture": ("East-Asian art style images.", "", "none"),
}
# The paper says Pick-Safety holds prompts about women but prints no filter: ours keeps a prompt when one of these
# words occurs in it as a whole word, ignoring case (so "woman's" counts, "womanizer" does not).
WOMEN_WORDS = (
    "woman",
    "women",
    "womens",
    "girl",
    "girls",
    "girlfriend",
    "lady",
    "ladies",
    "female",
    "females",
    "she",
    "her",
    "herself",
    "queen",
    "princess",
    "goddess",
    "wife",
    "bride",
    "mother",
    "daughter",
    "sister",
    "actress",
    "waifu",
)
WOMEN_PATTERN = re.compile(r"\b(?:" + "|".join(WOMEN_WORDS) + r")\b", re.IGNORECASE)
PROMPT_FILTERS = ("none", "women")
SHARD_COLUMNS = {  # name: pyarrow type; the Pick-a-Pic columns first
    "caption": "string",
    "jpg_0": "binary",  # PNG bytes of the chosen image
    "jpg_1": "binary",  # PNG bytes of the rejected image
    "label_0": "float64",  # always 1.0: jpg_0 is preferred
    "chosen_prompt": "string",
    "rejected_prompt": "string",
    "seed": "int64",
    "row_index": "int64",
}
SKIP_REASONS = {
    "no_prompt": "with a missing or empty context prompt",
    "filtered_out": "dropped by the prompt filter",
}
DATASET_CARD = (
    SHARDS_CARD_HEADER
    + """# MaPO task pairs

Made by `examples/mapo/build_pairs.py` from `{prompts}`: for each context prompt `caption`, `jpg_0` was
drawn from `chosen_prompt` (prefix {chosen_prefix}) and `jpg_1` from `rejected_prompt` (prefix {rejected_prefix})
by the same pipeline from the same `seed`; `label_0` is 1.0 (Pick-a-Pic schema). {pairs} pairs in {shards} shards.
Settings: `pairs_config.json`. Read with `datasets.load_dataset("{output_dir}", split="train")`.
"""
)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    model = parser.add_argument_group("pipeline")
    add_pipeline_arguments(
        model,
        "The pipeline that draws both images (hub id or folder): any AutoPipelineForText2Image pipeline, e.g. "
        "black-forest-labs/FLUX.1-schnell (the paper's) or SDXL (the published pick-style sets').",
    )

    task = parser.add_argument_group("task: the prefixes of the chosen and the rejected prompts")
    task.add_argument(
        "--preset",
        type=str,
        default=None,
        help=f"One of {sorted(PRESETS)}: the prefixes (and prompt filter) of the paper's set of that name.",
    )
    task.add_argument(
        "--chosen_prefix", type=str, default=None, help="Prefix of the chosen prompt (default: the preset's)."
    )
    task.add_argument(
        "--rejected_prefix", type=str, default=None, help="Prefix of the rejected prompt (default: the preset's)."
    )
    task.add_argument(
        "--prompt_filter",
        type=str,
        default=None,
        choices=PROMPT_FILTERS,
        help="Keep only some context prompts: women (whole-word keywords, the safety preset's default) or none.",
    )

    data = parser.add_argument_group("context prompts")
    data.add_argument(
        "--prompts",
        type=str,
        required=True,
        help="A .txt file (one prompt a line), a .csv/.tsv/.json/.jsonl/.parquet file, a dataset folder or a hub "
        "dataset id.",
    )
    data.add_argument(
        "--prompt_column",
        type=str,
        default=None,
        help="Column of the context prompts (tables and datasets; default: prompt, caption, Prompt or text).",
    )
    data.add_argument("--prompt_split", type=str, default=None, help="Dataset split to read (default: test).")

    sampling = parser.add_argument_group("sampling (as examples/eval/generate.py)")
    sampling.add_argument(
        "--seed", type=int, default=0, help="Base seed; both images of row r start from SeedSequence((seed, r))."
    )
    add_sampling_arguments(sampling)

    output = parser.add_argument_group("output")
    output.add_argument(
        "--output_dir", type=str, required=True, help="Folder for shards/, pairs_config.json and README.md."
    )
    output.add_argument(
        "--shard_size",
        type=int,
        default=256,
        help="Input rows per shard: the unit written at once, resumed and split over the processes.",
    )
    return parse_checked_args(parser, check_args, input_args)


def check_args(args):
    """Refuse bad settings before any prompt is read or model loaded; fill the prefixes and filter in from
    --preset."""
    if args.preset is not None and args.preset not in PRESETS:
        raise InputError(f"--preset {args.preset!r} does not exist; the presets are {', '.join(sorted(PRESETS))}.")
    preset = PRESETS.get(args.preset, (None, None, "none"))
    args.chosen_prefix = preset[0] if args.chosen_prefix is None else args.chosen_prefix
    args.rejected_prefix = preset[1] if args.rejected_prefix is None else args.rejected_prefix
    args.prompt_filter = preset[2] if args.prompt_filter is None else args.prompt_filter
    if args.chosen_prefix is None or args.rejected_prefix is None:
        raise InputError(
            "No prefixes: give --preset (one of " + ", ".join(sorted(PRESETS)) + ") or both --chosen_prefix and "
            "--rejected_prefix (an empty string leaves that side's context prompt alone)."
        )
    if normalized(args.chosen_prefix) == normalized(args.rejected_prefix):
        raise InputError(
            f"--chosen_prefix and --rejected_prefix are the same ({args.chosen_prefix!r}); the two images would "
            "differ only by chance. Give prefixes that ask for different images."
        )
    check_sampling_args(args)
    if args.shard_size <= 0:
        raise InputError(f"--shard_size must be positive, got {args.shard_size}.")
    if args.seed < 0:
        raise InputError(f"--seed must be non-negative (it seeds numpy's SeedSequence), got {args.seed}.")
    check_pipeline_path(args.pretrained_model_name_or_path)
    check_safetensors_in(args.pretrained_model_name_or_path, "--pretrained_model_name_or_path")
    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        raise InputError(f"--output_dir {args.output_dir!r} is a file; expected a folder (new or of an earlier run).")
    prompts = Path(args.prompts)
    if prompts.exists() and output.resolve() in (prompts.resolve(), *prompts.resolve().parents):
        raise InputError(
            f"--output_dir {args.output_dir!r} holds --prompts {args.prompts!r}; the pairs' dataset card would hide "
            "the prompts from datasets.load_dataset. Choose an --output_dir of its own."
        )
    check_writable_folder(args.output_dir)  # resumable: refuses only a file or a place that cannot be written


def normalized(text):
    """Text as CLIP's tokenizers see it: lowercased, spaces collapsed."""
    return " ".join(text.split()).casefold()


def with_prefix(prefix, context_prompt):
    return f"{prefix.strip()} {context_prompt}" if prefix.strip() else context_prompt


def is_about_women(prompt):
    return WOMEN_PATTERN.search(prompt) is not None


def skip_reason(context_prompt, prompt_filter):
    """Why a row cannot make a pair (a key of SKIP_REASONS), or None when it can."""
    if not isinstance(context_prompt, str) or not context_prompt.strip():
        return "no_prompt"
    if prompt_filter == "women" and not is_about_women(context_prompt):
        return "filtered_out"
    return None


def plan_shards(context_prompts, prompt_filter, shard_size):
    """({shard index: [usable row indices]} for the shards with at least one usable row, skip counts, examples)."""
    rows = [(context_prompt,) for context_prompt in context_prompts]
    return shards_of_usable_rows(
        rows, lambda context_prompt: skip_reason(context_prompt, prompt_filter), SKIP_REASONS, shard_size
    )


def read_context_prompts(args):
    """Every row of --prompts, in order (empty ones included: they are skipped and counted later)."""
    try:
        prompts = read_prompt_set(args.prompts, column=args.prompt_column, split=args.prompt_split)
    except InputError:
        raise
    except Exception as error:  # datasets raises many kinds (missing files, unknown splits, hub offline)
        raise InputError(
            f"--prompts {args.prompts!r} could not be read ({type(error).__name__}: "
            f"{' '.join(str(error).split())[:300]}); expected a .txt/.csv/.tsv/.json/.jsonl/.parquet file, "
            "a dataset folder or a hub dataset id."
        ) from error
    return [prompt.strip() if isinstance(prompt, str) else prompt for prompt in prompts]


def task_settings(args, weight_dtype):
    """Everything that changes the pixels of a pair with a given context prompt and row index, and the grouping."""
    return {
        **pair_settings(args, weight_dtype),
        "chosen_prefix": args.chosen_prefix,
        "rejected_prefix": args.rejected_prefix,
        "prompt_filter": args.prompt_filter,
    }


def make_shard(pipeline, rows, context_prompts, args, progress):
    """The pairs of `rows` as a pyarrow table, and the number of images the safety checker blacked out."""
    chosen_prompts = [with_prefix(args.chosen_prefix, context_prompts[row]) for row in rows]
    rejected_prompts = [with_prefix(args.rejected_prefix, context_prompts[row]) for row in rows]
    seeds, pngs_w, pngs_l, flagged = draw_pairs(pipeline, rows, chosen_prompts, rejected_prompts, args, progress)
    columns = {
        "caption": [context_prompts[row] for row in rows],
        "jpg_0": pngs_w,
        "jpg_1": pngs_l,
        "label_0": [1.0] * len(rows),
        "chosen_prompt": chosen_prompts,
        "rejected_prompt": rejected_prompts,
        "seed": seeds,
        "row_index": rows,
    }
    return shard_table(columns, SHARD_COLUMNS), flagged


def main(args):
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    weight_dtype = weight_dtype_for(accelerator.mixed_precision)
    log = accelerator.print

    with accelerator.main_process_first():  # the main process fills the datasets cache, the others read it
        context_prompts = read_context_prompts(args)
    shards, skipped, skip_examples = plan_shards(context_prompts, args.prompt_filter, args.shard_size)
    skip_report = ", ".join(f"{skipped[reason]} {label}" for reason, label in SKIP_REASONS.items())
    log(
        f"rows: {len(context_prompts)} in {args.prompts}; prompt filter {args.prompt_filter}; "
        f"skipped {sum(skipped.values())} ({skip_report})"
    )
    chosen, rejected = (with_prefix(prefix, "<context>") for prefix in (args.chosen_prefix, args.rejected_prefix))
    log(f"chosen prompt: {chosen!r}; rejected prompt: {rejected!r}")
    for example in skip_examples:
        log(f"  skipped {example}")
    if not shards:
        raise InputError(
            f"None of the {len(context_prompts)} rows of {args.prompts} can make a pair (skipped: {skip_report}); "
            "check the prompts, --prompt_column and --prompt_filter."
        )

    output_dir = Path(args.output_dir)
    settings = task_settings(args, weight_dtype)
    on_disk = finished_pairs(  # on every process, so that all of them stop together
        output_dir, settings, shards, ["caption"], lambda row: (context_prompts[row],), "the input"
    )
    config = {**settings, "prompts": resolved_path(args.prompts), "prompt_column": args.prompt_column}
    config.update(prompt_split=args.prompt_split, preset=args.preset)
    generated, flagged, written, pairs = write_pending_shards(
        accelerator,
        args,
        shards,
        config,
        on_disk,
        weight_dtype,
        lambda pipeline, rows, progress: make_shard(pipeline, rows, context_prompts, args, progress),
    )
    if accelerator.is_main_process:
        card = DATASET_CARD.format(
            prompts=args.prompts,
            chosen_prefix=repr(args.chosen_prefix),
            rejected_prefix=repr(args.rejected_prefix),
            pairs=pairs,
            shards=len(written),
            output_dir=output_dir,
        )
        write_atomically(output_dir / "README.md", lambda path: path.write_text(card))
        skipped_note = f"skipped {sum(skipped.values())} rows ({skip_report})"
        report_pairs(log, "build_pairs", output_dir, shards, written, pairs, generated, on_disk, flagged, skipped_note)
    accelerator.end_training()


if __name__ == "__main__":
    run_tool(main, parse_args)
