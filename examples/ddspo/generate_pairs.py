#!/usr/bin/env python
r"""DDSPO's image pairs: the reference model draws x0_w from the caption c and x0_l from its degraded c⁻, same seed.

    accelerate launch -m examples.ddspo.generate_pairs --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \
        --dataset diffusiondb-rand-removal --resolution 512 --output_dir diffusiondb-pairs

reads a degraded-prompt dataset (the folder examples/ddspo/degrade_prompts.py writes, or any dataset or
.parquet/.csv/.json/.jsonl file with the columns --caption_column and --negative_caption_column) and writes
`OUTPUT_DIR/shards/shard-00000.parquet`, ... with the columns caption, negative_caption, jpg_w, jpg_l (PNG bytes),
seed and row_index, plus `pairs_config.json` and a `README.md` dataset card, so that
`datasets.load_dataset(OUTPUT_DIR, split="train")` reads every shard.

- One pair per prompt (--negatives_per_prompt one, the default): the rows that share a `prompt_index` (the up to
  5 negatives degrade_prompts.py writes for one prompt) make one pair, from one of their usable rows drawn with a
  generator seeded with (--seed, prompt_index), as the authors' release (KU-MIIL/DDSPO, prepare_latents.py) draws
  one of a prompt's negatives; the rows not drawn are counted. `all`: every row makes a pair. A dataset without
  a `prompt_index` column makes a pair of every row.
- Pairs (paper §3.3): for row r, x0_w ~ ref(·|c) and x0_l ~ ref(·|c⁻) start from the same noise, drawn from a
  generator seeded with SeedSequence((--seed, r)); so the two images differ only through the prompt, and the seed
  does not depend on the batch size, the number of processes or the other rows.
- Any SD1.x/2.x or SDXL pipeline (the class its model_index.json names), sampled with --scheduler,
  --num_inference_steps, --guidance_scale, --resolution, --batch_size, --mixed_precision, as examples/eval/generate.py,
  but with the release's 25 steps and guidance 7.5 (for SD1.x and SDXL alike) by default.
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
from examples.lib.files import (
    check_data_file,
    check_safetensors_in,
    load_table,
    prepare_output_folder,
    resolved_path,
    write_atomically,
)
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
    add_trained_weights_arguments,
    check_pipeline_path,
    check_sampling_args,
    check_trained_weights,
    trained_weight_settings,
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
    "not_drawn": "not drawn (another negative of the same prompt_index makes its pair)",
}
PROMPT_INDEX_COLUMN = "prompt_index"  # degrade_prompts.py's: the rows of one prompt's negatives share it
DRAW_STREAM = 1  # (seed, prompt_index, DRAW_STREAM) seeds the draw; (seed, row) seeds the images
SAMPLING_DEFAULTS = {"num_inference_steps": 25, "guidance_scale": 7.5}  # the release's prepare_latents.py
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
    # A fine-tuned reference: the pipeline with these weights in place of the base's (e.g. an SFT stage's output).
    add_trained_weights_arguments(model)

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
    data.add_argument(
        "--negatives_per_prompt",
        type=str,
        default="one",
        choices=["one", "all"],
        help=f"one: the rows sharing a {PROMPT_INDEX_COLUMN} (a prompt's negatives, from degrade_prompts.py) make one "
        "pair, from one of them drawn with (--seed, prompt_index), as the authors' release does; all: every row "
        f"makes a pair. Without a {PROMPT_INDEX_COLUMN} column, every row makes a pair.",
    )

    sampling = parser.add_argument_group("sampling (as examples/eval/generate.py)")
    sampling.add_argument(
        "--seed", type=int, default=0, help="Base seed; both images of row r start from SeedSequence((seed, r))."
    )
    add_sampling_arguments(sampling)
    sampling.set_defaults(**SAMPLING_DEFAULTS)

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
    """Refuse bad settings before any dataset is read or model loaded; then make --output_dir ready."""
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
    check_trained_weights(args)
    check_safetensors_in(args.pretrained_model_name_or_path, "--pretrained_model_name_or_path")
    if args.pretrained_vae_model_name_or_path is not None:
        check_safetensors_in(args.pretrained_vae_model_name_or_path, "--pretrained_vae_model_name_or_path")
    check_data_file("--dataset", args.dataset)
    dataset, output = Path(args.dataset), Path(args.output_dir)
    if dataset.exists() and output.resolve() in (dataset.resolve(), *dataset.resolve().parents):
        raise InputError(
            f"--output_dir {args.output_dir!r} holds --dataset {args.dataset!r}; the pairs' dataset card would hide "
            "the degraded prompts from datasets.load_dataset. Choose an --output_dir of its own."
        )
    # an earlier run's shards are resumed (their settings are checked against pairs_config.json before any model
    # loads), so no output name is refused here: only a file in the folder's place, or a folder that cannot be written
    prepare_output_folder(args.output_dir, patterns=())


def read_prompt_pairs(args):
    """(captions, negative captions, prompt indices or None) of every row of --dataset, in order; raises InputError
    when unreadable. The prompt indices (PROMPT_INDEX_COLUMN) are read for --negatives_per_prompt one, when there."""
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
    captions = columns.column(args.caption_column).to_pylist()
    negative_captions = columns.column(args.negative_caption_column).to_pylist()
    if args.negatives_per_prompt == "all" or PROMPT_INDEX_COLUMN not in table.column_names:
        return captions, negative_captions, None
    prompt_indices = columns.column(PROMPT_INDEX_COLUMN).to_pylist()
    check_prompt_indices(args.dataset, captions, prompt_indices)
    return captions, negative_captions, prompt_indices


def check_prompt_indices(dataset, captions, prompt_indices):
    """Prompt indices must be non-negative integers (they seed the draw), and rows sharing one share their caption."""
    caption_of_prompt = {}
    for row, (caption, prompt_index) in enumerate(zip(captions, prompt_indices)):
        if not isinstance(prompt_index, int) or isinstance(prompt_index, bool) or prompt_index < 0:
            raise InputError(
                f"--dataset {dataset!r}: row {row} has {PROMPT_INDEX_COLUMN} {prompt_index!r}; expected non-negative "
                "integers (degrade_prompts.py's prompt positions), or pass --negatives_per_prompt all."
            )
        first_row, first_caption = caption_of_prompt.setdefault(prompt_index, (row, caption))
        if caption != first_caption:
            raise InputError(
                f"--dataset {dataset!r}: rows {first_row} and {row} share {PROMPT_INDEX_COLUMN} {prompt_index} but "
                f"not their caption ({first_caption!r}, {caption!r}); the rows of one prompt must have its caption, "
                "or pass --negatives_per_prompt all."
            )


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


def plan_shards(captions, negative_captions, shard_size, prompt_indices=None, seed=0):
    """({shard index: [row indices that make a pair]} for the shards with at least one, skip counts, examples).

    With `prompt_indices`, one usable row per prompt index makes a pair (`draw_one_per_prompt`)."""
    rows = list(zip(captions, negative_captions))
    shards, skipped, examples = shards_of_usable_rows(rows, skip_reason, SKIP_REASONS, shard_size)
    if prompt_indices is not None:
        shards, skipped["not_drawn"] = draw_one_per_prompt(shards, prompt_indices, seed)
    return shards, skipped, examples


def draw_one_per_prompt(shards, prompt_indices, seed):
    """Keep one of the usable rows of each prompt index, drawn uniformly by a generator seeded with
    (seed, prompt_index, DRAW_STREAM): the same row whatever the shard size, the processes or the other prompts.
    Returns the shards that keep a row and the number of rows not drawn."""
    import numpy as np

    rows_of_prompt = {}
    for shard in sorted(shards):
        for row in shards[shard]:
            rows_of_prompt.setdefault(prompt_indices[row], []).append(row)
    drawn = set()
    for prompt_index, rows in rows_of_prompt.items():
        rng = np.random.default_rng((seed, prompt_index, DRAW_STREAM))
        drawn.add(rows[int(rng.integers(len(rows)))])
    kept_shards = {}
    for shard, rows in shards.items():
        kept = [row for row in rows if row in drawn]
        if kept:
            kept_shards[shard] = kept
    return kept_shards, sum(len(rows) for rows in rows_of_prompt.values()) - len(drawn)


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
        captions, negative_captions, prompt_indices = read_prompt_pairs(args)
    shards, skipped, skip_examples = plan_shards(
        captions, negative_captions, args.shard_size, prompt_indices, args.seed
    )
    skip_report = ", ".join(f"{skipped[reason]} {label}" for reason, label in SKIP_REASONS.items())
    log(f"rows: {len(captions)} in {args.dataset}; skipped {sum(skipped.values())} ({skip_report})")
    for example in skip_examples:
        log(f"  skipped {example}")
    if args.negatives_per_prompt == "one" and prompt_indices is None:
        log(f"{args.dataset} has no {PROMPT_INDEX_COLUMN} column: every row is a prompt of its own and makes a pair")
    if not shards:
        raise InputError(
            f"None of the {len(captions)} rows of {args.dataset} can make a pair (skipped: {skip_report}); "
            "check the dataset and --caption_column / --negative_caption_column."
        )

    output_dir = Path(args.output_dir)
    settings = {
        **pair_settings(args, weight_dtype),
        **trained_weight_settings(args),
        "negatives_per_prompt": args.negatives_per_prompt,
    }
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
