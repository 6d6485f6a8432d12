#!/usr/bin/env python
r"""Score every image of one or more generate.py runs with reward models: one row per image.

    python -m examples.eval.score --run_dirs generated/sdxl generated/mapo \
        --reward_models aesthetic hpsv21 pickscore

reads each folder's manifest.jsonl and writes `scores.csv` beside it (columns prompt_index, k, seed,
prompt, image, then one column per reward model). The reward models are those registered in
examples/rewards/registry.py (names under --reward_models below), loaded from their published weights
unless `--reward_model_paths name=path` points to a local copy.

Resumable: scores already in scores.csv are kept and not recomputed, the file is rewritten after
every batch, and a reward model whose scores are all present is not even loaded. A missing image
file is an error (rerun generate.py, which makes only what is missing), or, with
--skip_missing_images, a counted skip that leaves its cells empty.

Which weights made each column is recorded beside the table, in `scores.csv.sources.json`:
{column: [{"hub": repository, "revision": commit} or {"path": local path, "sha256": content hash}]}.
A run asking for other weights than those recorded for a column that holds scores stops before
loading anything, as does a column with scores and no record (a table from before the record).
"""

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path


DEFAULT_REWARD_MODELS = ["aesthetic", "hpsv21", "pickscore"]  # MaPO Table 1
ID_COLUMNS = ["prompt_index", "k", "seed", "prompt", "image"]
SOURCES_SUFFIX = ".sources.json"  # scores.csv -> scores.csv.sources.json


class InputError(ValueError):
    """Bad flags or data: the message says what was expected, what was found and what to do."""


def parse_args(input_args=None):
    from examples.rewards import REWARD_MODELS

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
        help=f"Reward models to score with: {', '.join(REWARD_MODELS)} "
        f"(default: {' '.join(DEFAULT_REWARD_MODELS)}, the metrics of MaPO Table 1).",
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
    parser.add_argument(
        "--adopt_unrecorded_scores",
        action="store_true",
        help=f"Record the weights asked for now as the source of score columns that have none (tables written "
        f"before score.py kept {SOURCES_SUFFIX} files), instead of stopping. Only when you know they made them.",
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


def read_sources(path):
    """scores.csv.sources.json -> {column: weights source}; {} when there is none."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(
            f"{path} is not valid JSON ({error}); expected the weights record score.py writes. Restore it, or delete "
            "it and the score table beside it to rescore."
        ) from error


def write_atomically(path, text):
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def describe_source(source):
    """A weights source (examples.rewards.reward_weights_source) as people read it."""
    parts = []
    for entry in source:
        if "sha256" in entry:
            parts.append(f"{entry['path']} (sha256 {entry['sha256'][:12]})")
        elif "revision" in entry:
            parts.append(f"{entry['hub']} at revision {entry['revision'][:12]}")
        else:
            parts.append(", ".join(f"{key} {value}" for key, value in entry.items()))
    return " + ".join(parts)


def source_identity(source):
    """What two sources must share to be the same weights: content hashes and hub commits, not where a folder lies."""
    return [{key: value for key, value in entry.items() if key != "path" or "sha256" not in entry} for entry in source]


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
        self.sources_path = self.dir / (scores_filename + SOURCES_SUFFIX)
        self.manifest = read_manifest(self.dir)
        self.scores, self.reward_columns = read_scores(self.scores_path)
        self.sources = read_sources(self.sources_path)
        listed = {row["image"] for row in self.manifest}
        self.dropped_rows = len(set(self.scores) - listed)
        self.scores = {image: values for image, values in self.scores.items() if image in listed}
        self.missing_images = [row["image"] for row in self.manifest if not (self.dir / row["image"]).is_file()]

    def add_reward_column(self, name):
        if name not in self.reward_columns:
            self.reward_columns.append(name)

    def has_scores(self, reward_name):
        return any(reward_name in values for values in self.scores.values())

    def check_source(self, name, source, adopt_unrecorded):
        """Refuse to add scores of other weights to a column, or to trust a column whose weights are unknown."""
        if not self.has_scores(name):
            return
        recorded = self.sources.get(name)
        if recorded is None and not adopt_unrecorded:
            raise InputError(
                f"{self.scores_path} holds {name} scores but {self.sources_path.name} records no weights for them "
                "(a table written before score.py kept that record?), so they may not come from "
                f"{describe_source(source)}; delete the {name} column (or the file) to rescore, score into another "
                "--scores_filename, or pass --adopt_unrecorded_scores if you know these weights made them."
            )
        if recorded is not None and source_identity(recorded) != source_identity(source):
            raise InputError(
                f"The {name} scores in {self.scores_path} come from {describe_source(recorded)}, but this run asks "
                f"for {describe_source(source)}; score into another --scores_filename, or delete the {name} column "
                f"(or the file) to rescore with the new weights."
            )

    def pending(self, reward_name):
        missing = set(self.missing_images)
        return [
            row
            for row in self.manifest
            if reward_name not in self.scores.get(row["image"], {}) and row["image"] not in missing
        ]

    def store(self, metric, rows, values):
        """One batch's scores of `metric` (a non-finite one stops the run), saved at once: an interrupted run
        loses at most one batch."""
        for row, value in zip(rows, values):
            if not math.isfinite(value):
                raise RuntimeError(
                    f"{metric} gave a non-finite score ({value}) for {self.dir / row['image']}; "
                    "check the model and the image."
                )
            self.scores.setdefault(row["image"], {})[metric] = value
        self.save()

    def save(self):
        # the record first: a column never holds scores its record does not cover
        write_atomically(self.sources_path, json.dumps(self.sources, indent=2) + "\n")
        write_scores(self.scores_path, self.manifest, self.scores, self.reward_columns)


def open_runs(args):
    """The --run_dirs as Runs; images their manifest lists but that are missing stop the run, unless
    --skip_missing_images leaves them unscored."""
    runs = [Run(run_dir, args.scores_filename) for run_dir in args.run_dirs]
    for run in runs:
        if run.missing_images and not args.skip_missing_images:
            raise InputError(
                f"{len(run.missing_images)} images listed in {run.dir / 'manifest.jsonl'} are missing "
                f"(first: {run.missing_images[:3]}). Rerun generate.py with the same flags to make them, "
                "or pass --skip_missing_images to leave them unscored."
            )
    return runs


def main(args):
    import torch
    from tqdm.auto import tqdm

    from examples.rewards import RewardInputError, load_reward_model, reward_weights_source

    runs = open_runs(args)
    # Which weights each model would load (hashes, hub commits), before any is loaded: unreachable weights
    # stop here, and so do weights other than those that made the scores already in a table.
    sources = {}
    for name in args.reward_models:
        try:
            sources[name] = reward_weights_source(name, args.reward_model_paths.get(name))
        except RewardInputError as error:
            raise InputError(str(error)) from error
    for run in runs:
        for name in args.reward_models:
            run.check_source(name, sources[name], args.adopt_unrecorded_scores)
    for run in runs:
        if run.dropped_rows:
            print(
                f"{run.dir}: dropped {run.dropped_rows} rows of {run.scores_path.name} "
                "whose images are no longer in the manifest"
            )
        for name in args.reward_models:
            run.add_reward_column(name)
            run.sources[name] = sources[name]

    summary = {}
    for name in args.reward_models:
        pending = {run.dir: run.pending(name) for run in runs}
        total_pending = sum(len(rows) for rows in pending.values())
        already = sum(len(run.manifest) - len(run.missing_images) for run in runs) - total_pending
        summary[name] = {"computed": total_pending, "already_present": already}
        if total_pending == 0:
            print(f"{name}: all {already} scores already present, model not loaded")
            continue
        try:
            reward = load_reward_model(
                name,
                path=args.reward_model_paths.get(name),
                device=args.device,
                dtype=args.dtype,
                batch_size=args.batch_size,
            )
        except (OSError, RewardInputError) as error:  # e.g. a processor or tokenizer repository missing offline
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise InputError(
                f"Could not load {name} from {describe_source(sources[name])}: {reason} "
                f"Expected complete weights; pass --reward_model_paths {name}=PATH to a local copy."
            ) from error
        progress = tqdm(total=total_pending, desc=f"scoring {name}")
        for run in runs:
            rows = pending[run.dir]
            for start in range(0, len(rows), args.batch_size):
                batch = rows[start : start + args.batch_size]
                values = reward.score([run.dir / row["image"] for row in batch], [row["prompt"] for row in batch])
                run.store(name, batch, values.tolist())
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
    lines.extend(f"   scores: {run.scores_path} (weights: {run.sources_path.name})" for run in runs)
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    try:
        main(parse_args())
    except InputError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
