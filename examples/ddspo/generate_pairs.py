#!/usr/bin/env python
r"""DDSPO's image pairs: the reference model draws x0_w from the caption c and x0_l from its degraded c⁻, same seed.

    accelerate launch examples/ddspo/generate_pairs.py --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \
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
import io
import json
import sys
from pathlib import Path

from examples.eval.generate import (
    HelpFormatter,
    InputError,
    add_sampling_arguments,
    changed_settings,
    check_sampling_args,
    generator_for,
    image_seed,
    load_pipeline,
    resolved_path,
    share_of_this_process,
    weight_dtype_for,
    write_atomically,
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
FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}
EXAMPLES_SHOWN = 3
CONFIG_NAME = "pairs_config.json"
DATASET_CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: shards/shard-*.parquet
---
# DDSPO image pairs

Made by `examples/ddspo/generate_pairs.py` from `{dataset}`: for each row, `jpg_w` was drawn from `caption` and
`jpg_l` from `negative_caption` by the same reference pipeline from the same `seed`. {pairs} pairs in {shards} shards.
Settings: `pairs_config.json`. Read with `datasets.load_dataset("{output_dir}", split="train")`.
"""


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    model = parser.add_argument_group("reference model")
    model.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default="stabilityai/stable-diffusion-xl-base-1.0",
        help="The reference pipeline (hub id or folder): SDXL, SD1.x or SD2.x. Use the model DDSPO will train.",
    )
    model.add_argument(
        "--pretrained_vae_model_name_or_path",
        type=str,
        default=None,
        help="A VAE to use instead of the pipeline's, e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in fp16.",
    )
    model.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model on the hub.")
    model.add_argument("--variant", type=str, default=None, help="Weight variant to load, e.g. fp16.")
    model.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are cached.")

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
    args = parser.parse_args(input_args)
    try:
        check_args(args)
    except InputError as error:
        parser.error(str(error))
    return args


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
    model = Path(args.pretrained_model_name_or_path)
    if model.is_dir() and not (model / "model_index.json").is_file():
        raise InputError(
            f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path!r} is a folder without "
            "model_index.json; expected a diffusers pipeline folder (save_pretrained) or a hub id."
        )
    dataset = Path(args.dataset)
    if dataset.is_file() and dataset.suffix not in FILE_BUILDERS:
        raise InputError(
            f"--dataset {args.dataset!r} is a {dataset.suffix or 'suffix-less'} file; expected a dataset folder, "
            f"a hub id, or a file ending in one of {sorted(FILE_BUILDERS)}."
        )
    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        raise InputError(f"--output_dir {args.output_dir!r} is a file; expected a folder (new or of an earlier run).")
    if dataset.exists() and output.resolve() in (dataset.resolve(), *dataset.resolve().parents):
        raise InputError(
            f"--output_dir {args.output_dir!r} holds --dataset {args.dataset!r}; the pairs' dataset card would hide "
            "the degraded prompts from datasets.load_dataset. Choose an --output_dir of its own."
        )


def read_prompt_pairs(args):
    """(captions, negative captions) of every row of --dataset, in order; raises InputError when unreadable."""
    import datasets

    path = Path(args.dataset)
    try:
        if path.is_file():
            table = datasets.load_dataset(
                FILE_BUILDERS[path.suffix], data_files=str(path), split="train", cache_dir=args.cache_dir
            )
        else:
            table = datasets.load_dataset(args.dataset, split=args.dataset_split_name, cache_dir=args.cache_dir)
    except Exception as error:  # datasets raises many kinds (missing files, unknown splits, hub offline)
        raise InputError(
            f"--dataset {args.dataset!r} (split {args.dataset_split_name!r}) could not be read "
            f"({type(error).__name__}: {' '.join(str(error).split())[:300]}); expected the output folder of "
            "degrade_prompts.py, a dataset folder or hub id, or a .parquet/.csv/.json/.jsonl file."
        ) from error
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
    """({shard index: [usable row indices]} for the shards with at least one usable row, skip counts, examples).

    Shard s covers rows [s * shard_size, (s + 1) * shard_size) of the dataset, so a row's shard does not depend on
    which other rows are skipped."""
    shards, skipped, examples = {}, dict.fromkeys(SKIP_REASONS, 0), []
    for row_index, (caption, negative_caption) in enumerate(zip(captions, negative_captions)):
        reason = skip_reason(caption, negative_caption)
        if reason is not None:
            skipped[reason] += 1
            if len(examples) < EXAMPLES_SHOWN:
                examples.append(f"row {row_index} ({SKIP_REASONS[reason]}): {caption!r} -> {negative_caption!r}")
            continue
        shards.setdefault(row_index // shard_size, []).append(row_index)
    return shards, skipped, examples


def shard_path(output_dir, shard_index):
    return Path(output_dir) / "shards" / f"shard-{shard_index:05d}.parquet"


def pair_settings(args, weight_dtype):
    """Everything that changes the pixels of a pair with given prompts and row index, and the rows' grouping."""
    return {
        "pretrained_model_name_or_path": resolved_path(args.pretrained_model_name_or_path),
        "pretrained_vae_model_name_or_path": resolved_path(args.pretrained_vae_model_name_or_path),
        "revision": args.revision,
        "variant": args.variant,
        "scheduler": args.scheduler,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "resolution": args.resolution,
        "seed": args.seed,
        "dtype": str(weight_dtype).removeprefix("torch."),
        "shard_size": args.shard_size,
    }


def check_output_folder(output_dir, settings, shards, captions, negative_captions):
    """A resumed folder must hold pairs of the same settings, and each finished shard the rows the dataset has now.

    Returns the number of pairs in the finished shards; raises InputError otherwise."""
    import pyarrow.parquet as pq

    details = changed_settings(output_dir / CONFIG_NAME, settings)
    if details:
        raise InputError(
            f"{output_dir} holds pairs made with other settings ({details}). "
            "Use another --output_dir, or delete the folder."
        )
    finished = 0
    for path in sorted((output_dir / "shards").glob("shard-*.parquet")):
        shard_index = int(path.stem.removeprefix("shard-"))
        try:
            table = pq.read_table(path, columns=["row_index", "caption", "negative_caption"])
        except Exception as error:
            raise InputError(f"{path} cannot be read ({error}); delete it and rerun to make it again.") from error
        on_disk = list(zip(*(table[name].to_pylist() for name in ("row_index", "caption", "negative_caption"))))
        expected = [(row, captions[row], negative_captions[row]) for row in shards.get(shard_index, [])]
        if on_disk != expected:
            raise InputError(
                f"{path} does not hold the rows the dataset has now ({first_difference(on_disk, expected)}), so its "
                "images would not match their captions. Use the dataset it was made from, another --output_dir, "
                f"or delete {path.name} to make it again."
            )
        finished += len(on_disk)
    return finished


def first_difference(on_disk, expected):
    """The first row where a shard and the dataset disagree, in words."""
    for disk_row, dataset_row in zip(on_disk, expected):
        if disk_row != dataset_row:
            row, caption, negative_caption = disk_row
            if dataset_row[0] != row:
                return f"it has row {row} where the dataset's next usable row is {dataset_row[0]}"
            if dataset_row[1] != caption:
                return f"row {row}: caption {caption!r} on disk, {dataset_row[1]!r} now"
            return f"row {row}: negative_caption {negative_caption!r} on disk, {dataset_row[2]!r} now"
    if len(on_disk) > len(expected):
        return (
            f"it has {len(on_disk)} pairs where the dataset has {len(expected)} usable rows, from row {on_disk[0][0]}"
        )
    return f"it has {len(on_disk)} pairs where the dataset now has {len(expected)} usable rows"


def draw(pipeline, prompts, seeds, args):
    """One image per prompt, each from a generator of its own seed; and how many the safety checker blacked out."""
    output = pipeline(
        prompt=prompts,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        height=args.resolution,
        width=args.resolution,
        generator=[generator_for(seed) for seed in seeds],
    )
    flagged = sum(bool(flag) for flag in (getattr(output, "nsfw_content_detected", None) or []))
    return output.images, flagged


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_shard(pipeline, rows, captions, negative_captions, args, progress):
    """The pairs of `rows` as a pyarrow table, batch by batch (batches never cross shards, so the images do not
    depend on the number of processes); and the number of images the safety checker blacked out."""
    import pyarrow as pa

    columns, flagged = {name: [] for name in SHARD_COLUMNS}, 0
    for start in range(0, len(rows), args.batch_size):
        batch = rows[start : start + args.batch_size]
        seeds = [image_seed(args.seed, row) for row in batch]
        images_w, flagged_w = draw(pipeline, [captions[row] for row in batch], seeds, args)
        images_l, flagged_l = draw(pipeline, [negative_captions[row] for row in batch], seeds, args)  # same seeds
        flagged += flagged_w + flagged_l
        for row, seed, image_w, image_l in zip(batch, seeds, images_w, images_l):
            columns["caption"].append(captions[row])
            columns["negative_caption"].append(negative_captions[row])
            columns["jpg_w"].append(png_bytes(image_w))
            columns["jpg_l"].append(png_bytes(image_l))
            columns["seed"].append(seed)
            columns["row_index"].append(row)
        progress.update(len(batch))
    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in SHARD_COLUMNS.items()])
    return pa.Table.from_pydict(columns, schema=schema), flagged


def write_pending_shards(accelerator, args, shards, config, on_disk, weight_dtype, make_table):
    """Draw and write the shards not yet on disk, split over the processes (a collective: every process calls it).

    Shared with examples/mapo/build_pairs.py. Removes the temporary files a killed run left, writes the
    settings file `config`, then each process loads the pipeline once, draws its shards with
    `make_table(pipeline, rows, progress)` -> (pyarrow table, images the safety checker blacked out) and writes
    each atomically. Returns the pairs drawn by this run and the blacked-out images (summed over the processes),
    the shard files now on disk and the pairs they hold.
    """
    import pyarrow.parquet as pq
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    output_dir = Path(args.output_dir)
    pending = [shard for shard in sorted(shards) if not shard_path(output_dir, shard).is_file()]
    if accelerator.is_main_process:
        for stale in (output_dir / "shards").glob(".shard-*.tmp"):  # left by a run killed mid-write; none is open
            stale.unlink()
    accelerator.wait_for_everyone()  # every process has listed the missing shards before any is written
    (output_dir / "shards").mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        write_atomically(output_dir / CONFIG_NAME, lambda path: path.write_text(json.dumps(config, indent=2)))
    accelerator.print(
        f"{len(pending)} shards to generate ({sum(len(shards[shard]) for shard in pending)} pairs), "
        f"{len(shards) - len(pending)} already in {output_dir / 'shards'} ({on_disk} pairs, skipped)"
    )

    generated, flagged = 0, 0
    my_shards = share_of_this_process(accelerator, pending)
    if my_shards:
        pipeline = load_pipeline(
            args.pretrained_model_name_or_path,
            weight_dtype,
            accelerator.device,
            scheduler=args.scheduler,
            vae_path=args.pretrained_vae_model_name_or_path,
            revision=args.revision,
            variant=args.variant,
            cache_dir=args.cache_dir,
        )
        progress = tqdm(
            total=sum(len(shards[shard]) for shard in my_shards),
            desc="generating pairs (this process's share)",
            unit="pair",
            disable=not accelerator.is_local_main_process,
        )
        for shard in my_shards:
            table, shard_flagged = make_table(pipeline, shards[shard], progress)
            write_atomically(shard_path(output_dir, shard), lambda path: pq.write_table(table, path))
            generated += table.num_rows
            flagged += shard_flagged
        progress.close()
    counts_per_process = gather_object([(generated, flagged)])
    accelerator.wait_for_everyone()
    generated = sum(count for count, _ in counts_per_process)
    flagged = sum(count for _, count in counts_per_process)
    written = [shard_path(output_dir, shard) for shard in sorted(shards) if shard_path(output_dir, shard).is_file()]
    pairs = sum(pq.ParquetFile(path).metadata.num_rows for path in written)
    return generated, flagged, written, pairs


def report_pairs(log, tool, output_dir, shards, written, pairs, generated, on_disk, flagged, skipped_note):
    """The pair tools' last words: the safety checker's black images, the finished line, and pairs gone missing."""
    if flagged:
        log(
            f"warning: the pipeline's safety checker blacked out {flagged} images of this run; they are stored "
            "as generated (black). Filter them out, or load the pipeline without a safety checker."
        )
    log(
        f"== {tool} finished: {pairs} pairs written (this run: {generated}, already on disk: {on_disk}), "
        f"{len(written)} shards in {output_dir / 'shards'}; {skipped_note}; "
        f"read with datasets.load_dataset({str(output_dir)!r}, split='train')"
    )
    missing = sum(len(shards[shard]) for shard in sorted(shards)) - pairs
    if missing:
        raise RuntimeError(f"{missing} pairs are missing from {output_dir} after generation; rerun the command.")


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
    on_disk = check_output_folder(output_dir, settings, shards, captions, negative_captions)  # every process stops
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
    try:
        main(parse_args())
    except InputError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
