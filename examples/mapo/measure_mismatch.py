#!/usr/bin/env python
r"""Reference mismatch of a preference dataset against a model (MaPO §3.1, Fig. 2): the model draws an image from
each sampled row's caption, DINOv2 embeds it and the row's image, and the mean cosine similarity is reported (higher:
less mismatch), with the β of MaPO's Table 3 for the tasks of similar mismatch.

    accelerate launch -m examples.mapo.measure_mismatch \
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --dataset mapo-t2i/pick-style-cartoon --max_samples 256 --output_dir mismatch-cartoon

writes `OUTPUT_DIR/generated/<row>.png` (the model's draws), `generation_config.json`, `rows.json` (caption and
seed of each row drawn), and `mismatch.json` (per-row similarities, mean, standard deviation, the β suggestion).

- The dataset's image of a row: --image_column, or by default the chosen image of the Pick-a-Pic schema (jpg_0
  where label_0 is 1, jpg_1 where it is 0; ties, unlabeled rows and images that do not decode are skipped and
  counted). The first --max_samples usable rows are measured.
- The model's image of a row is drawn with the sampler flags of examples/eval/generate.py, from the seed in
  --seed_column when given (build_pairs.py and generate_pairs.py store each pair's seed in `seed`), else from
  SeedSequence((--seed, row)). A dataset of the model's own draws from the same seeds measures 1.0.
- Embedding: transformers' Dinov2Model (a hub id or a local folder with its image processor), the pooled output
  (the layer-normed CLS token), L2-normalised; cosine similarity = dot product.
- Resumable: images already drawn (and whole) are not drawn again, and a rerun with other sampler settings stops
  with one line; another --dinov2_model_name_or_path only re-embeds.
- `accelerate launch` splits the drawing over the processes; the main process embeds.

The β suggestion reads MaPO's numbers: Table 3 gives the best β per task, and Fig. 2 orders the tasks by reference
mismatch (TABLE_3_BETAS below, least mismatch first). Fig. 2's similarity values are a plot whose numbers the paper
does not print; give the similarities of the tasks you compare against with --task_similarities (measured with
this tool, or read off Fig. 2), and the tool places the dataset between its two neighbours.
"""

import argparse
import json
from pathlib import Path

from examples.lib.cli import HelpFormatter, InputError, parse_checked_args, run_tool
from examples.lib.embeddings import embed, load_dinov2
from examples.lib.files import (
    check_data_file,
    check_safetensors_in,
    check_settings_unchanged,
    check_writable_folder,
    image_problem,
    load_table,
    resolved_path,
    write_atomically,
)
from examples.lib.sampling import (
    add_pipeline_arguments,
    add_sampling_arguments,
    check_pipeline_path,
    check_sampling_args,
    draw,
    image_seed,
    load_pipeline_for,
    sampler_settings,
    share_of_this_process,
    weight_dtype_for,
)


# MaPO Table 3 (best β per task), in Fig. 2's order of reference mismatch, least first (§4: "we list these tasks in
# ascending order of reference mismatch (see Figure 2)").
TABLE_3_BETAS = {
    "preference_alignment": 8,
    "cultural_representation": 32,
    "safe_generation": 64,
    "style_learning": 64,
    "personalization": 1024,
}
SKIP_REASONS = {
    "no_caption": "with a missing or empty caption",
    "no_preference": "with a tie or no label (no chosen image)",
    "no_image": "with no image",
    "bad_image": "whose image does not decode (empty, truncated or not an image)",
}
CONFIG_NAME = "generation_config.json"


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    model = parser.add_argument_group("model (the reference model to measure against)")
    add_pipeline_arguments(model, "The pipeline (hub id or folder) that DPO or MaPO would start from.")

    data = parser.add_argument_group("dataset")
    data.add_argument(
        "--dataset", type=str, required=True, help="A dataset folder or hub id, or a .parquet/.csv/.json(l) file."
    )
    data.add_argument("--dataset_split_name", type=str, default="train", help="Split of a dataset folder or hub id.")
    data.add_argument("--caption_column", type=str, default="caption", help="Column of the prompts.")
    data.add_argument(
        "--image_column",
        type=str,
        default=None,
        help="Column of the dataset's images (default: the chosen one of jpg_0/jpg_1 by --label_column).",
    )
    data.add_argument(
        "--label_column", type=str, default="label_0", help="Pick-a-Pic schema: 1 if jpg_0 is chosen, 0 if jpg_1."
    )
    data.add_argument(
        "--seed_column",
        type=str,
        default=None,
        help="Column of each row's seed, to draw from the seed the dataset's image was drawn from.",
    )
    data.add_argument("--max_samples", type=int, default=256, help="Measure the first N usable rows.")

    sampling = parser.add_argument_group("sampling (as examples/eval/generate.py)")
    sampling.add_argument(
        "--seed", type=int, default=0, help="Base seed (without --seed_column): row r uses SeedSequence((seed, r))."
    )
    add_sampling_arguments(sampling)

    embedding = parser.add_argument_group("embedding")
    embedding.add_argument(
        "--dinov2_model_name_or_path",
        type=str,
        default="facebook/dinov2-base",
        help="DINOv2 (transformers Dinov2Model with its image processor): a hub id or a local folder.",
    )
    embedding.add_argument("--embed_batch_size", type=int, default=16, help="Images per DINOv2 forward pass.")
    embedding.add_argument(
        "--task_similarities",
        type=str,
        nargs="*",
        default=[],
        help=f"TASK=SIMILARITY for tasks of {list(TABLE_3_BETAS)}, to place the dataset among them for a β.",
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--output_dir", type=str, required=True, help="Folder for generated/, the configs and mismatch.json."
    )
    return parse_checked_args(parser, check_args, input_args)


def check_args(args):
    """Refuse bad settings before any dataset is read or model loaded; parse --task_similarities."""
    check_sampling_args(args)
    for name in ("max_samples", "embed_batch_size"):
        if getattr(args, name) <= 0:
            raise InputError(f"--{name} must be positive, got {getattr(args, name)}.")
    if args.seed < 0:
        raise InputError(f"--seed must be non-negative (it seeds numpy's SeedSequence), got {args.seed}.")
    args.task_similarities = parse_task_similarities(args.task_similarities)
    check_pipeline_path(args.pretrained_model_name_or_path)
    check_safetensors_in(args.pretrained_model_name_or_path, "--pretrained_model_name_or_path")
    dinov2 = Path(args.dinov2_model_name_or_path)
    if dinov2.is_dir() and not (dinov2 / "config.json").is_file():
        raise InputError(
            f"--dinov2_model_name_or_path {args.dinov2_model_name_or_path!r} is a folder without config.json; "
            "expected a Dinov2Model folder (save_pretrained, with its preprocessor_config.json) or a hub id."
        )
    check_data_file("--dataset", args.dataset)
    check_writable_folder(args.output_dir)  # resumable: refuses only a file or a place that cannot be written


def parse_task_similarities(items):
    """{task: similarity} from TASK=SIMILARITY strings; raises InputError on a bad one."""
    similarities = {}
    for item in items:
        task, _, value = item.partition("=")
        if task not in TABLE_3_BETAS:
            raise InputError(
                f"--task_similarities {item!r}: unknown task {task!r}; expected one of {list(TABLE_3_BETAS)}."
            )
        try:
            similarities[task] = float(value)
        except ValueError:
            raise InputError(
                f"--task_similarities {item!r}: expected TASK=SIMILARITY with a number, e.g. style_learning=0.42."
            ) from None
        if not -1 <= similarities[task] <= 1:  # also refuses nan and inf
            raise InputError(f"--task_similarities {item!r}: a cosine similarity lies in [-1, 1].")
    return similarities


def suggest_beta(similarity, task_similarities):
    """(lowest β, highest β, reason) of MaPO Table 3 for a dataset of this mean similarity, placed among the tasks of
    known similarity; (None, None, reason) when no task similarity is known.

    The tasks are ordered by their similarity (higher: less mismatch, smaller β). Between two tasks the range runs
    from the β of the more similar to that of the less similar one; beyond the ends it is the end task's β."""
    if not task_similarities:
        ladder = ", ".join(f"{task} {beta}" for task, beta in TABLE_3_BETAS.items())
        return (
            None,
            None,
            (f"Table 3's β by task, least mismatch first: {ladder}; give --task_similarities to place this dataset"),
        )
    ranked = sorted(task_similarities.items(), key=lambda item: -item[1])  # least mismatch first
    above = [(task, value) for task, value in ranked if value >= similarity]
    below = [(task, value) for task, value in ranked if value < similarity]
    if not above:
        task, value = below[0]
        beta = TABLE_3_BETAS[task]
        return beta, beta, f"more similar than {task} ({value:.4f}, β {beta}): β {beta} or lower"
    if not below:
        task, value = above[-1]
        beta = TABLE_3_BETAS[task]
        return beta, beta, f"less similar than {task} ({value:.4f}, β {beta}): β {beta} or higher"
    (task_above, value_above), (task_below, value_below) = above[-1], below[0]
    low, high = sorted((TABLE_3_BETAS[task_above], TABLE_3_BETAS[task_below]))
    return (
        low,
        high,
        (
            f"between {task_above} ({value_above:.4f}, β {TABLE_3_BETAS[task_above]}) and {task_below} "
            f"({value_below:.4f}, β {TABLE_3_BETAS[task_below]}): β in [{low}, {high}]"
        ),
    )


def read_rows(args):
    """([(row index, caption, image value, seed)] for the first --max_samples usable rows, skip counts)."""
    table = load_table(
        args.dataset,
        args.dataset_split_name,
        args.cache_dir,
        "--dataset",
        "a dataset folder or hub id, or a .parquet/.csv/.json/.jsonl file",
    )
    image_columns = [args.image_column] if args.image_column else ["jpg_0", "jpg_1", args.label_column]
    needed = [args.caption_column, *image_columns, *([args.seed_column] if args.seed_column else [])]
    missing = [name for name in needed if name not in table.column_names]
    if missing:
        raise InputError(
            f"--dataset {args.dataset!r} has no column {missing[0]!r} (its columns: {table.column_names}); name the "
            "right ones with --caption_column, --image_column (or the Pick-a-Pic jpg_0/jpg_1/--label_column) and "
            "--seed_column."
        )
    rows, skipped = [], dict.fromkeys(SKIP_REASONS, 0)
    columns = table.data  # the Arrow table: whole columns as Python lists at once, images undecoded
    captions = columns.column(args.caption_column).to_pylist()
    seeds = columns.column(args.seed_column).to_pylist() if args.seed_column else None
    if args.image_column:
        chosen_images = columns.column(args.image_column).to_pylist()
    else:
        images_0, images_1 = (columns.column(name).to_pylist() for name in ("jpg_0", "jpg_1"))
        labels = columns.column(args.label_column).to_pylist()
        chosen_images = [
            image_0 if label == 1 else image_1 if label == 0 else None
            for image_0, image_1, label in zip(images_0, images_1, labels)
        ]
    for row_index, caption in enumerate(captions):
        if len(rows) == args.max_samples:
            break
        if not isinstance(caption, str) or not caption.strip():
            skipped["no_caption"] += 1
            continue
        if args.image_column is None and labels[row_index] not in (0, 1):
            skipped["no_preference"] += 1
            continue
        if chosen_images[row_index] is None:
            skipped["no_image"] += 1
            continue
        if not decodes(chosen_images[row_index]):
            skipped["bad_image"] += 1
            continue
        seed = int(seeds[row_index]) if seeds is not None else image_seed(args.seed, row_index)
        rows.append((row_index, caption, chosen_images[row_index], seed))
    return rows, skipped


def decode_image(value):
    """Encoded bytes, a datasets Image dict ({bytes, path}), a path or a PIL image -> RGB PIL image."""
    import io

    from PIL import Image

    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    image = Image.open(io.BytesIO(value)) if isinstance(value, (bytes, bytearray)) else value
    image = Image.open(image) if isinstance(image, str) else image
    return image.convert("RGB")


def decodes(value):
    """Whether a dataset image value decodes to pixels (a truncated or empty file does not)."""
    try:
        decode_image(value)
    except Exception:  # PIL raises UnidentifiedImageError, OSError, SyntaxError...; bad values a TypeError
        return False
    return True


def generated_path(output_dir, row_index):
    return Path(output_dir) / "generated" / f"{row_index:06d}.png"


def check_output_folder(output_dir, settings, rows):
    """A resumed folder must hold draws of the same settings, and the same caption and seed for every row drawn."""
    check_settings_unchanged(output_dir / CONFIG_NAME, settings, "images drawn with other settings")
    rows_file = output_dir / "rows.json"
    previous = {}
    if rows_file.is_file():
        previous = {int(row): value for row, value in json.loads(rows_file.read_text()).items()}
    for row_index, caption, _, seed in rows:
        if row_index in previous and previous[row_index] != [caption, seed]:
            raise InputError(
                f"{generated_path(output_dir, row_index)} was drawn from {previous[row_index]} (caption, seed), "
                f"row {row_index} now has {[caption, seed]}. Use another --output_dir, or delete the folder."
            )
    return previous


def main(args):
    import numpy as np
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    weight_dtype = weight_dtype_for(accelerator.mixed_precision)
    log = accelerator.print

    with accelerator.main_process_first():  # the main process fills the datasets cache, the others read it
        rows, skipped = read_rows(args)
    skip_report = ", ".join(f"{skipped[reason]} {label}" for reason, label in SKIP_REASONS.items())
    log(f"rows: {len(rows)} to measure from {args.dataset}; skipped {sum(skipped.values())} ({skip_report})")
    if not rows:
        raise InputError(
            f"No row of {args.dataset} has a caption and an image (skipped: {skip_report}); check --caption_column "
            "and --image_column / --label_column."
        )

    output_dir = Path(args.output_dir)
    settings = sampler_settings(args, weight_dtype)  # the seed is each row's
    previous = check_output_folder(output_dir, settings, rows)  # every process stops
    # a draw on disk counts only when it is whole: a truncated or empty file is drawn again
    pending = [row for row in rows if image_problem(generated_path(output_dir, row[0])) is not None]
    accelerator.wait_for_everyone()  # every process has listed the missing images before any is written
    (output_dir / "generated").mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        write_atomically(output_dir / CONFIG_NAME, lambda path: path.write_text(json.dumps(settings, indent=2)))
        drawn = {**previous, **{row_index: [caption, seed] for row_index, caption, _, seed in rows}}
        write_atomically(output_dir / "rows.json", lambda path: path.write_text(json.dumps(drawn, indent=0)))
    log(f"{len(pending)} images to draw, {len(rows) - len(pending)} already in {output_dir / 'generated'}")

    my_rows = share_of_this_process(accelerator, pending)
    if my_rows:
        pipeline = load_pipeline_for(args, weight_dtype, accelerator.device)
        progress = tqdm(total=len(my_rows), desc="drawing", disable=not accelerator.is_local_main_process)
        for start in range(0, len(my_rows), args.batch_size):
            batch = my_rows[start : start + args.batch_size]
            images, _ = draw(pipeline, [caption for _, caption, _, _ in batch], [seed for *_, seed in batch], args)
            for (row_index, _, _, _), image in zip(batch, images):
                write_atomically(generated_path(output_dir, row_index), lambda path: image.save(path, format="PNG"))
            progress.update(len(batch))
        progress.close()
        del pipeline
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        device = accelerator.device
        model, processor = load_dinov2(args.dinov2_model_name_or_path, device, cache_dir=args.cache_dir)
        data_images = [decode_image(image) for _, _, image, _ in rows]
        model_images = [decode_image(str(generated_path(output_dir, row_index))) for row_index, _, _, _ in rows]
        data_embeddings = embed(model, processor, data_images, args.embed_batch_size, device)  # (N, D)
        model_embeddings = embed(model, processor, model_images, args.embed_batch_size, device)  # (N, D)
        similarities = (data_embeddings * model_embeddings).sum(dim=-1).cpu().numpy().astype(np.float64)  # (N,)
        mean, std = float(similarities.mean()), float(similarities.std())
        beta_low, beta_high, reason = suggest_beta(mean, args.task_similarities)
        report = {
            "dataset": args.dataset,
            "image_column": args.image_column or f"chosen of jpg_0/jpg_1 by {args.label_column}",
            "model": resolved_path(args.pretrained_model_name_or_path),
            "dinov2": resolved_path(args.dinov2_model_name_or_path),
            "pairs": len(rows),
            "skipped": skipped,
            "mean_cosine_similarity": mean,
            "std_cosine_similarity": std,
            "suggested_beta_mapo": [beta_low, beta_high],
            "suggestion": reason,
            "task_similarities": args.task_similarities,
            "table_3_betas": TABLE_3_BETAS,
            "similarities": {str(row_index): float(value) for (row_index, *_), value in zip(rows, similarities)},
        }
        write_atomically(output_dir / "mismatch.json", lambda path: path.write_text(json.dumps(report, indent=2)))
        log(
            f"== measure_mismatch finished: mean DINOv2 cosine similarity {mean:.6f} (std {std:.4f}) over "
            f"{len(rows)} rows of {args.dataset}; {reason}; details in {output_dir / 'mismatch.json'}"
        )
    accelerator.end_training()


if __name__ == "__main__":
    run_tool(main, parse_args)
