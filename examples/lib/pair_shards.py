"""Datasets of image pairs written shard by shard, resumably, over `accelerate launch`'s processes.

Used by ddspo/generate_pairs.py (DDSPO's pairs) and mapo/build_pairs.py (MaPO's task pairs): input row r makes one
pair whose two images start from the same noise, SeedSequence((--seed, r)); rows are cut into shards of
--shard_size, each written atomically to OUTPUT_DIR/shards/shard-NNNNN.parquet when done and never made again.
mapo/judge_pairs.py writes its kept pairs in the same layout (SHARDS_CARD_HEADER).
"""

import json
from pathlib import Path

from examples.lib.cli import InputError
from examples.lib.files import check_settings_unchanged, write_atomically
from examples.lib.sampling import (
    draw,
    image_seed,
    load_pipeline_for,
    png_bytes,
    sampler_settings,
    share_of_this_process,
    trained_weights,
)


CONFIG_NAME = "pairs_config.json"
EXAMPLES_SHOWN = 3
# the dataset card's metadata: `datasets.load_dataset(OUTPUT_DIR, split="train")` reads every shard
SHARDS_CARD_HEADER = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: shards/shard-*.parquet
---
"""


def shard_path(output_dir, shard_index):
    return Path(output_dir) / "shards" / f"shard-{shard_index:05d}.parquet"


def shards_of_usable_rows(rows, skip_reason, skip_labels, shard_size):
    """({shard index: [usable row indices]} for the shards with at least one usable row, skip counts, examples).

    rows: one tuple of values per input row; skip_reason(*values) is a key of skip_labels, or None for a usable row.
    Shard s covers rows [s * shard_size, (s + 1) * shard_size) of the input, so a row's shard does not depend on
    which other rows are skipped."""
    shards, skipped, examples = {}, dict.fromkeys(skip_labels, 0), []
    for row_index, values in enumerate(rows):
        reason = skip_reason(*values)
        if reason is not None:
            skipped[reason] += 1
            if len(examples) < EXAMPLES_SHOWN:
                shown = " -> ".join(repr(value) for value in values)
                examples.append(f"row {row_index} ({skip_labels[reason]}): {shown}")
            continue
        shards.setdefault(row_index // shard_size, []).append(row_index)
    return shards, skipped, examples


def pair_settings(args, weight_dtype):
    """Everything that changes the pixels of a pair with given prompts and row index, and the rows' grouping."""
    return {**sampler_settings(args, weight_dtype), "seed": args.seed, "shard_size": args.shard_size}


def finished_pairs(output_dir, settings, shards, columns, values_now, source):
    """The number of pairs in the finished shards of a resumed folder; InputError unless the folder was made with
    `settings` and each finished shard holds, for its rows, the `columns` values `values_now(row)` gives now (so that
    its images match their captions). `source` names the input in the messages ("the dataset")."""
    import pyarrow.parquet as pq

    check_settings_unchanged(output_dir / CONFIG_NAME, settings, "pairs made with other settings")
    finished = 0
    for path in sorted((output_dir / "shards").glob("shard-*.parquet")):
        shard_index = int(path.stem.removeprefix("shard-"))
        try:
            table = pq.read_table(path, columns=["row_index", *columns])
        except Exception as error:
            raise InputError(f"{path} cannot be read ({error}); delete it and rerun to make it again.") from error
        on_disk = list(zip(*(table[name].to_pylist() for name in ("row_index", *columns))))
        expected = [(row, *values_now(row)) for row in shards.get(shard_index, [])]
        if on_disk != expected:
            difference = first_difference(on_disk, expected, columns, source)
            raise InputError(
                f"{path} does not hold the rows {source} has now ({difference}), so its images would not match "
                f"their captions. Use {source} it was made from, another --output_dir, or delete {path.name} to "
                "make it again."
            )
        finished += len(on_disk)
    return finished


def first_difference(on_disk, expected, columns, source):
    """The first row where a shard and the input disagree, in words."""
    for disk_row, input_row in zip(on_disk, expected):
        if disk_row != input_row:
            row = disk_row[0]
            if input_row[0] != row:
                return f"it has row {row} where {source}'s next usable row is {input_row[0]}"
            for column, value, value_now in zip(columns, disk_row[1:], input_row[1:]):
                if value != value_now:
                    return f"row {row}: {column} {value!r} on disk, {value_now!r} now"
    if len(on_disk) > len(expected):
        return f"it has {len(on_disk)} pairs where {source} has {len(expected)} usable rows, from row {on_disk[0][0]}"
    return f"it has {len(on_disk)} pairs where {source} now has {len(expected)} usable rows"


def draw_pairs(pipeline, rows, prompts_w, prompts_l, args, progress):
    """The two images of each of `rows`, drawn from prompts_w and prompts_l (one each per row) from the row's seed:
    (seeds, PNG bytes of the first images, of the second ones, images the safety checker blacked out). Batch by
    batch of --batch_size, the first images then the second ones; batches never cross shards, so the images do not
    depend on the number of processes."""
    seeds, pngs_w, pngs_l, flagged = [], [], [], 0
    for start in range(0, len(rows), args.batch_size):
        batch = slice(start, start + args.batch_size)
        batch_seeds = [image_seed(args.seed, row) for row in rows[batch]]
        images_w, flagged_w = draw(pipeline, prompts_w[batch], batch_seeds, args)
        images_l, flagged_l = draw(pipeline, prompts_l[batch], batch_seeds, args)  # same seeds
        seeds += batch_seeds
        pngs_w += [png_bytes(image) for image in images_w]
        pngs_l += [png_bytes(image) for image in images_l]
        flagged += flagged_w + flagged_l
        progress.update(len(batch_seeds))
    return seeds, pngs_w, pngs_l, flagged


def shard_table(columns, types):
    """A pyarrow table of `columns` ({name: values}) with the column order and types of `types` ({name: type})."""
    import pyarrow as pa

    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in types.items()])
    return pa.Table.from_pydict(columns, schema=schema)


def write_pending_shards(accelerator, args, shards, config, on_disk, weight_dtype, make_table):
    """Draw and write the shards not yet on disk, split over the processes (a collective: every process calls it).

    Removes the temporary files a killed run left, writes the settings file `config`, then each process loads the
    pipeline once, draws its shards with `make_table(pipeline, rows, progress)` -> (pyarrow table, images the safety
    checker blacked out) and writes each atomically. Returns the pairs drawn by this run and the blacked-out images
    (summed over the processes), the shard files now on disk and the pairs they hold.
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
        pipeline = load_pipeline_for(args, weight_dtype, accelerator.device, **trained_weights(args))
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
