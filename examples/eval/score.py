#!/usr/bin/env python
r"""Score every image of one or more generate.py runs with reward models: one row per image.

    python examples/eval/score.py --run_dirs generated/sdxl generated/mapo \
        --reward_models aesthetic hpsv21 pickscore

reads each folder's manifest.jsonl and writes `scores.csv` beside it (columns prompt_index, k, seed,
prompt, image, then one column per reward model). Reward models are those of `examples/rewards`
(pickscore, hpsv21, imagereward, aesthetic, clipscore, vqascore), loaded from their published
weights unless `--reward_model_paths name=path` points to a local copy.

Resumable: scores already in scores.csv are kept and not recomputed, the file is rewritten after
every batch, and a reward model whose scores are all present is not even loaded. A missing image
file is an error (rerun generate.py, which makes only what is missing), or, with
--skip_missing_images, a counted skip that leaves its cells empty.
"""

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `examples.rewards`

DEFAULT_REWARD_MODELS = ["aesthetic", "hpsv21", "pickscore"]  # MaPO Table 1
ID_COLUMNS = ["prompt_index", "k", "seed", "prompt", "image"]


class InputError(ValueError):
    """Bad flags or data: the message says what was expected, what was found and what to do."""


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--run_dirs",
        type=str,
        nargs="+",
        required=True,
        help="Folders written by generate.py (each with manifest.jsonl).",
    )
    parser.add_argument(
        "--reward_models",
        type=str,
        nargs="+",
        default=DEFAULT_REWARD_MODELS,
        help="Reward models to score with: pickscore, hpsv21, imagereward, aesthetic, clipscore, vqascore.",
    )
    parser.add_argument(
        "--reward_model_paths",
        type=str,
        nargs="*",
        default=[],
        metavar="NAME=PATH",
        help="Local weights for some reward models, e.g. pickscore=/models/PickScore_v1 (default: published weights).",
    )
    parser.add_argument("--batch_size", type=int, default=16, help="Images per reward-model call.")
    parser.add_argument(
        "--device", type=str, default=None, help="Device of the reward models (default: cuda if available, else cpu)."
    )
    parser.add_argument(
        "--dtype", type=str, default="fp32", choices=["fp32", "fp16", "bf16"], help="Precision of the reward models."
    )
    parser.add_argument(
        "--scores_filename", type=str, default="scores.csv", help="Name of the score table written in each run folder."
    )
    parser.add_argument(
        "--skip_missing_images",
        action="store_true",
        help="Leave images listed in the manifest but missing on disk unscored (counted) instead of stopping.",
    )
    args = parser.parse_args(input_args)
    try:
        check_args(args)
    except InputError as error:
        parser.error(str(error))
    return args


def parse_model_paths(pairs, reward_models):
    paths = {}
    for pair in pairs:
        name, separator, path = pair.partition("=")
        if not separator or not name or not path:
            raise InputError(f"--reward_model_paths entries look like NAME=PATH, got {pair!r}.")
        if name not in reward_models:
            raise InputError(f"--reward_model_paths names {name!r}, which is not in --reward_models {reward_models}.")
        paths[name] = path
    return paths


def check_args(args):
    """Refuse bad settings before any model is loaded."""
    from examples.rewards import RewardInputError, check_reward_model_names

    if args.batch_size <= 0:
        raise InputError(f"--batch_size must be positive, got {args.batch_size}.")
    if len(set(args.reward_models)) != len(args.reward_models):
        raise InputError(f"--reward_models lists a model twice: {args.reward_models}.")
    try:
        check_reward_model_names(args.reward_models)
    except RewardInputError as error:
        raise InputError(str(error)) from error
    args.reward_model_paths = parse_model_paths(args.reward_model_paths, args.reward_models)
    for run_dir in args.run_dirs:
        if not (Path(run_dir) / "manifest.jsonl").is_file():
            raise InputError(
                f"No manifest.jsonl in {run_dir!r}; expected a folder written by examples/eval/generate.py."
            )


def read_manifest(run_dir):
    rows = [
        json.loads(line)
        for line in (run_dir / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    if not rows:
        raise InputError(f"{run_dir / 'manifest.jsonl'} lists no images; run generate.py for this folder first.")
    return rows


def read_scores(path):
    """scores.csv -> ({image: {reward: float}} with empty cells absent, reward columns in file order)."""
    if not path.is_file():
        return {}, []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rewards = [column for column in reader.fieldnames or [] if column not in ID_COLUMNS]
        return {
            row["image"]: {name: float(row[name]) for name in rewards if row[name] not in ("", None)} for row in reader
        }, rewards


def write_scores(path, manifest, scores, reward_columns):
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(ID_COLUMNS + reward_columns)
        for row in manifest:
            image_scores = scores.get(row["image"], {})
            writer.writerow(
                [row[column] for column in ID_COLUMNS]
                + [repr(image_scores[name]) if name in image_scores else "" for name in reward_columns]
            )
    os.replace(temporary, path)


class Run:
    """One generate.py folder: its manifest, the scores on disk, and which images exist."""

    def __init__(self, run_dir, scores_filename):
        self.dir = Path(run_dir)
        self.scores_path = self.dir / scores_filename
        self.manifest = read_manifest(self.dir)
        self.scores, self.reward_columns = read_scores(self.scores_path)
        listed = {row["image"] for row in self.manifest}
        self.dropped_rows = len(set(self.scores) - listed)
        self.scores = {image: values for image, values in self.scores.items() if image in listed}
        self.missing_images = [row["image"] for row in self.manifest if not (self.dir / row["image"]).is_file()]

    def add_reward_column(self, name):
        if name not in self.reward_columns:
            self.reward_columns.append(name)

    def pending(self, reward_name):
        missing = set(self.missing_images)
        return [
            row
            for row in self.manifest
            if reward_name not in self.scores.get(row["image"], {}) and row["image"] not in missing
        ]

    def save(self):
        write_scores(self.scores_path, self.manifest, self.scores, self.reward_columns)


def main(args):
    import torch
    from tqdm.auto import tqdm

    from examples.rewards import load_reward_model

    runs = [Run(run_dir, args.scores_filename) for run_dir in args.run_dirs]
    for run in runs:
        if run.missing_images and not args.skip_missing_images:
            raise InputError(
                f"{len(run.missing_images)} images listed in {run.dir / 'manifest.jsonl'} are missing (first: {run.missing_images[:3]}). "
                "Rerun generate.py with the same flags to make them, or pass --skip_missing_images to leave them unscored."
            )
        if run.dropped_rows:
            print(
                f"{run.dir}: dropped {run.dropped_rows} rows of {run.scores_path.name} whose images are no longer in the manifest"
            )
        for name in args.reward_models:
            run.add_reward_column(name)

    summary = {}
    for name in args.reward_models:
        pending = {run.dir: run.pending(name) for run in runs}
        total_pending = sum(len(rows) for rows in pending.values())
        already = sum(len(run.manifest) - len(run.missing_images) for run in runs) - total_pending
        summary[name] = {"computed": total_pending, "already_present": already}
        if total_pending == 0:
            print(f"{name}: all {already} scores already present, model not loaded")
            continue
        reward = load_reward_model(
            name,
            path=args.reward_model_paths.get(name),
            device=args.device,
            dtype=args.dtype,
            batch_size=args.batch_size,
        )
        progress = tqdm(total=total_pending, desc=f"scoring {name}")
        for run in runs:
            rows = pending[run.dir]
            for start in range(0, len(rows), args.batch_size):
                batch = rows[start : start + args.batch_size]
                values = reward.score([run.dir / row["image"] for row in batch], [row["prompt"] for row in batch])
                for row, value in zip(batch, values.tolist()):
                    if not math.isfinite(value):
                        raise RuntimeError(
                            f"{name} gave a non-finite score ({value}) for {run.dir / row['image']}; check the model and the image."
                        )
                    run.scores.setdefault(row["image"], {})[name] = value
                run.save()  # after every batch: an interrupted run loses at most one batch
                progress.update(len(batch))
        progress.close()
        del reward
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    for run in runs:
        run.save()
    skipped = sum(len(run.missing_images) for run in runs)
    lines = [f"== score finished: {len(runs)} run(s), {skipped} missing images skipped"]
    for name, counts in summary.items():
        lines.append(f"   {name}: {counts['computed']} computed, {counts['already_present']} already present")
    lines.extend(f"   scores: {run.scores_path}" for run in runs)
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    try:
        main(parse_args())
    except InputError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
