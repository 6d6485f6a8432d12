"""Run folders of eval/generate.py and the score tables beside their images.

A run folder holds the images and `manifest.jsonl` (one row per image); `scores.csv` has one row per image, the
ID_COLUMNS then one column per score, and `scores.csv.sources.json` records which weights made each column.
Used by eval/score.py and eval/personalization.py (which fill columns), eval/compare.py and capo/select_pairs.py
(which read them).
"""

import csv
import json
import math
from pathlib import Path

from examples.lib.cli import InputError
from examples.lib.files import image_problem, write_atomically


ID_COLUMNS = ["prompt_index", "k", "seed", "prompt", "image"]
SOURCES_SUFFIX = ".sources.json"  # scores.csv -> scores.csv.sources.json


def check_run_dirs(run_dirs):
    """Every run folder must hold a manifest.jsonl; InputError naming the first that does not."""
    for run_dir in run_dirs:
        if not (Path(run_dir) / "manifest.jsonl").is_file():
            raise InputError(
                f"No manifest.jsonl in {run_dir!r}; expected a folder written by examples/eval/generate.py."
            )


MANIFEST_FIELDS = ("prompt", "prompt_index", "image")


def read_manifest(run_dir):
    """The rows of a run's manifest.jsonl; InputError naming the line that is not a whole row (a cut file) or when
    there is none."""
    path = Path(run_dir) / "manifest.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"{path} is not text; expected the JSON lines generate.py writes.") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or any(field not in row for field in MANIFEST_FIELDS):
            raise InputError(
                f"Line {number} of {path} is not a whole manifest row ({line[:80]!r}); expected JSON objects with "
                f"{', '.join(MANIFEST_FIELDS)} (a cut file?). Rerun generate.py with the same flags to write it again."
            )
        rows.append(row)
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


def write_scores(path, manifest, scores, reward_columns):
    def write(temporary):
        with open(temporary, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(ID_COLUMNS + reward_columns)
            for row in manifest:
                image_scores = scores.get(row["image"], {})
                writer.writerow(
                    [row[column] for column in ID_COLUMNS]
                    + [repr(image_scores[name]) if name in image_scores else "" for name in reward_columns]
                )

    write_atomically(path, write)


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
        sources = json.dumps(self.sources, indent=2) + "\n"
        write_atomically(self.sources_path, lambda path: path.write_text(sources, encoding="utf-8"))
        write_scores(self.scores_path, self.manifest, self.scores, self.reward_columns)


def check_images(paths):
    """InputError naming the first image of `paths` that is empty, truncated or not an image, before a model loads."""
    for path in paths:
        problem = image_problem(path)
        if problem is not None:
            raise InputError(f"{path} is {problem}; rerun generate.py with the same flags, which draws it again.")


def fill_column(runs, column, load_scorer, batch_size):
    """Compute the `column` scores the runs' tables lack, batch by batch, each batch saved at once (an interrupted run
    loses at most one). `load_scorer()`, called only when a score is missing, returns a model whose
    score(image paths, prompts) is a tensor (B,). Returns {"computed": ..., "already_present": ...} for the summary."""
    from tqdm.auto import tqdm

    pending = {run.dir: run.pending(column) for run in runs}
    total_pending = sum(len(rows) for rows in pending.values())
    already = sum(len(run.manifest) - len(run.missing_images) for run in runs) - total_pending
    if total_pending == 0:
        print(f"{column}: all {already} scores already present, model not loaded")
        return {"computed": 0, "already_present": already}
    check_images(run.dir / row["image"] for run in runs for row in pending[run.dir])
    scorer = load_scorer()
    progress = tqdm(total=total_pending, desc=f"scoring {column}")
    for run in runs:
        rows = pending[run.dir]
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            values = scorer.score([run.dir / row["image"] for row in batch], [row["prompt"] for row in batch])
            run.store(column, batch, values.tolist())
            progress.update(len(batch))
    progress.close()
    return {"computed": total_pending, "already_present": already}


def summary_lines(tool, runs, summary):
    """The first lines of a scoring tool's last words: the runs, the images skipped, what each column computed."""
    skipped = sum(len(run.missing_images) for run in runs)
    lines = [f"== {tool} finished: {len(runs)} run(s), {skipped} missing images skipped"]
    for column, counts in summary.items():
        lines.append(f"   {column}: {counts['computed']} computed, {counts['already_present']} already present")
    return lines


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
