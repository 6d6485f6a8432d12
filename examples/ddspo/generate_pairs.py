#!/usr/bin/env python
r"""DDSPO's image pairs: the reference model draws x0_w from the caption c and x0_l from its degraded c⁻, same seed.

    accelerate launch -m examples.ddspo.generate_pairs --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \
        --dataset diffusiondb-rand-removal --resolution 512 --guidance_scale 7.5 --output_dir diffusiondb-pairs

reads a degraded-prompt dataset (the folder examples/ddspo/degrade_prompts.py writes, or any dataset or
.parquet/.csv/.json/.jsonl file with the columns --caption_column and --negative_caption_column) and writes
`OUTPUT_DIR/shards/shard-00000.parquet`, ... with the columns caption, negative_caption, jpg_w, jpg_l (PNG bytes),
seed and row_index, plus `pairs_config.json` and a `README.md` dataset card, so that
`datasets.load_dataset(OUTPUT_DIR, split="train")` reads every shard.

- Pairs (paper §3.3): for row r, x0_w ~ ref(·|c) and x0_l ~ ref(·|c⁻) start from the same noise, drawn from a
  generator seeded with SeedSequence((--seed, r)); so the two images differ only through the prompt, and the seed
  does not depend on the batch size, the number of processes or the other rows.
- Any SD1.x/2.x or SDXL pipeline (the class its model_index.json names), sampled with --scheduler,
  --num_inference_steps, --guidance_scale, --resolution, --batch_size, --mixed_precision, as examples/eval/generate.py.
  A batch of --batch_size rows is two pipeline calls, the winners then the losers; batches never cross shards.
- Rows whose negative caption is missing, empty or equal to the caption (ignoring case and spacing), and rows with
  no caption, are skipped and counted, never dropped silently.
- Resumable: the rows are cut into shards of --shard_size; each shard is written atomically when done and never
  made again. A resumed run must have the same settings (pairs_config.json), and every finished shard must hold
  the captions and negative captions the dataset has for its rows now; otherwise the tool stops with one line.
- `accelerate launch` splits the missing shards over the processes.
"""

import argparse
from pathlib import Path

from examples.lib.cli import HelpFormatter, InputError, parse_checked_args, run_tool
from examples.lib.files import check_data_file, load_table, resolved_path, write_atomically
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
from examples.lib.sampling import (
    add_pipeline_arguments,
    add_sampling_arguments,
    check_pipeline_path,
    check_sampling_args,
    weight_dtype_for,
)


SHARD_COLUMNS = {  # name: pyarrow type
    "caption": "string",
    "negative_caption": "string",
    "jpg_w": "binary",  # PNG bytes, as Pick-a-Pic's jpg_0 / jpg_1 hold encoded images
    "jpg_l": "binary",
    "seed": "int64",
    "row_index": "int64",
}
SKIP_REASONS = {
    "no_caption": "with a missing or empty caption",
    "no_negative_caption": "with a missing or empty negative caption",
    "negative_equals_caption": "with a negative caption equal to the caption",
}
DATASET_CARD = (
    SHARDS_CARD_HEADER
    + """# DDSPO image pairs

Made by `examples/ddspo/generate_pairs.py` from `{dataset}`: for each row, `jpg_w` was drawn from `caption` and
`jpg_l` from `negative_caption` by the same reference pipeline from the same `seed`. {pairs} pairs in {shards} shards.
Settings: `pairs_config.json`. Read with `datasets.load_dataset("{output_dir}", split="train")`.
"""
)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    model = parser.add_argument_group("reference model")
    add_pipeline_arguments(
        model,
        "The reference pipeline (hub id or folder): SDXL, SD1.x or SD2.x. Use the model DDSPO will train.",
    )

    data = parser.add_argument_group("degraded prompts")
    data.add_argument(
        "--dataset",
        type=str,
        required=True,
        help="The output folder of degrade_prompts.py, a dataset folder or hub id, or a .parquet/.csv/.json/.jsonl "
        "file, with a caption and a negative caption per row.",
    )
    data.add_argument("--dataset_split_name", type=str, default="train", help="Split of a dataset folder or hub id.")
    data.add_argument("--caption_column", type=str, default="caption", help="Column of the prompts c.")
    data.add_argument(
        "--negative_caption_column", type=str, default="negative_caption", help="Column of the degraded prompts c⁻."
    )

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
        help="Dataset rows per shard: the unit written at once, resumed and split over the processes.",
    )
    return parse_checked_args(parser, check_args, input_args)


def check_args(args):
    """Refuse bad settings before any dataset is read or model loaded."""
    check_sampling_args(args)
    if args.shard_size <= 0:
        raise InputError(f"--shard_size must be positive, got {args.shard_size}.")
    if args.seed < 0:
        raise InputError(f"--seed must be non-negative (it seeds numpy's SeedSequence), got {args.seed}.")
    if args.caption_column == args.negative_caption_column:
        raise InputError(
            f"--caption_column and --negative_caption_column are both {args.caption_column!r}; "
            "name the column of the prompts and the column of their degraded versions."
        )
    check_pipeline_path(args.pretrained_model_name_or_path)
    check_data_file("--dataset", args.dataset)
    dataset, output = Path(args.dataset), Path(args.output_dir)
    if output.exists() and not output.is_dir():
        raise InputError(f"--output_dir {args.output_dir!r} is a file; expected a folder (new or of an earlier run).")
    if dataset.exists() and output.resolve() in (dataset.resolve(), *dataset.resolve().parents):
        raise InputError(
            f"--output_dir {args.output_dir!r} holds --dataset {args.dataset!r}; the pairs' dataset card would hide "
            "the degraded prompts from datasets.load_dataset. Choose an --output_dir of its own."
        )


def read_prompt_pairs(args):
    """(captions, negative captions) of every row of --dataset, in order; raises InputError when unreadable."""
    table = load_table(
        args.dataset,
        args.dataset_split_name,
        args.cache_dir,
        "--dataset",
        "the output folder of degrade_prompts.py, a dataset folder or hub id, or a .parquet/.csv/.json/.jsonl file",
    )
    missing = [name for name in (args.caption_column, args.negative_caption_column) if name not in table.column_names]
    if missing:
        raise InputError(
            f"--dataset {args.dataset!r} has no column {missing[0]!r} (its columns: {table.column_names}); "
            "name the right ones with --caption_column and --negative_caption_column."
        )
    columns = table.data  # the Arrow table: whole columns as lists at once
    return columns.column(args.caption_column).to_pylist(), columns.column(args.negative_caption_column).to_pylist()


def skip_reason(caption, negative_caption):
    """Why a row cannot make a pair (a key of SKIP_REASONS), or None when it can."""
    if not isinstance(caption, str) or not caption.strip():
        return "no_caption"
    if not isinstance(negative_caption, str) or not negative_caption.strip():
        return "no_negative_caption"
    # CLIP's tokenizers lowercase and split on spaces: such a c⁻ is c to the model, and the pair would contrast nothing
    if " ".join(negative_caption.split()).casefold() == " ".join(caption.split()).casefold():
        return "negative_equals_caption"
    return None


def plan_shards(captions, negative_captions, shard_size):
    """({shard index: [usable row indices]} for the shards with at least one usable row, skip counts, examples)."""
    return shards_of_usable_rows(list(zip(captions, negative_captions)), skip_reason, SKIP_REASONS, shard_size)


def make_shard(pipeline, rows, captions, negative_captions, args, progress):
    """The pairs of `rows` as a pyarrow table, and the number of images the safety checker blacked out."""
    shard_captions = [captions[row] for row in rows]
    shard_negatives = [negative_captions[row] for row in rows]
    seeds, pngs_w, pngs_l, flagged = draw_pairs(pipeline, rows, shard_captions, shard_negatives, args, progress)
    columns = {
        "caption": shard_captions,
        "negative_caption": shard_negatives,
        "jpg_w": pngs_w,
        "jpg_l": pngs_l,
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
        captions, negative_captions = read_prompt_pairs(args)
    shards, skipped, skip_examples = plan_shards(captions, negative_captions, args.shard_size)
    skip_report = ", ".join(f"{skipped[reason]} {label}" for reason, label in SKIP_REASONS.items())
    log(f"rows: {len(captions)} in {args.dataset}; skipped {sum(skipped.values())} ({skip_report})")
    for example in skip_examples:
        log(f"  skipped {example}")
    if not shards:
        raise InputError(
            f"None of the {len(captions)} rows of {args.dataset} can make a pair (skipped: {skip_report}); "
            "check the dataset and --caption_column / --negative_caption_column."
        )

    output_dir = Path(args.output_dir)
    settings = pair_settings(args, weight_dtype)
    on_disk = finished_pairs(  # on every process, so that all of them stop together
        output_dir,
        settings,
        shards,
        ["caption", "negative_caption"],
        lambda row: (captions[row], negative_captions[row]),
        "the dataset",
    )
    config = {**settings, "dataset": resolved_path(args.dataset), "dataset_split_name": args.dataset_split_name}
    config.update(caption_column=args.caption_column, negative_caption_column=args.negative_caption_column)
    generated, flagged, written, pairs = write_pending_shards(
        accelerator,
        args,
        shards,
        config,
        on_disk,
        weight_dtype,
        lambda pipeline, rows, progress: make_shard(pipeline, rows, captions, negative_captions, args, progress),
    )
    if accelerator.is_main_process:
        card = DATASET_CARD.format(dataset=args.dataset, pairs=pairs, shards=len(written), output_dir=output_dir)
        write_atomically(output_dir / "README.md", lambda path: path.write_text(card))
        skipped_note = f"skipped {sum(skipped.values())} rows ({skip_report})"
        report_pairs(
            log, "generate_pairs", output_dir, shards, written, pairs, generated, on_disk, flagged, skipped_note
        )
    accelerator.end_training()


if __name__ == "__main__":
    run_tool(main, parse_args)
