#!/usr/bin/env python
r"""CaPO's training pairs from scored generate.py runs: calibrated rewards (Eq. 7) and pair selection (§4.3).

    python -m examples.capo.select_pairs --run_dirs generated/sdxl_diffusiondb \
        --reward_models pickscore hpsv21 aesthetic --selection frontier --output_dir capo-pairs

reads each run folder's manifest.jsonl (generate.py) and scores.csv (score.py) and writes
`capo-pairs/train.parquet` (one row per pair) and a dataset card `capo-pairs/README.md`.

- Groups: the images of one prompt within one run folder (N images; the paper uses N = 16).
- Calibration (Eq. 7), per reward and group: R_ca(x_i) = 1/(N-1) sum_{k != i} P(x_i > x_k), with
  P = sigmoid((R(x_i) - R(x_k)) / T) for Bradley-Terry rewards (Eq. 2; T = --temperature, default 1, in
  the reward's native units, listed in the dataset card) and P = s_i^a / (s_i^a + s_k^a) for
  probability-like scores such as VQAScore (Eq. 28; a = --alpha). Calibrated rewards lie in [0, 1];
  within a group they average exactly 1/2, since P(x > x') + P(x' > x) = 1.
- Selection: `best_worst` (one reward: argmax / argmin of R_ca), `sum` (add the calibrated rewards,
  then top-1 / worst-1; the paper's SUM baseline), `frontier` (frontier-based rejection sampling,
  §4.3; the default for several rewards). x dominates x' iff R_ca^(j)(x) >= R_ca^(j)(x') for every
  reward j and > for at least one (standard Pareto dominance: equal points do not dominate each other,
  so duplicates stay on the upper frontier together instead of removing each other). Upper frontier:
  the points no other point dominates; lower frontier: the points that dominate no other point. Points
  on both are removed; x+ is drawn from what is left of the upper frontier, x- from the lower, at
  random (seeded by --seed and the prompt index), --pairs_per_prompt distinct pairs per prompt.
- Training target: reward_pos / reward_neg = the mean over rewards of the calibrated values (§4.3).
  A frontier pair's x+ is not always higher in that mean than its x-; such pairs are kept and counted.
- Skipped, and counted in the summary: images with a missing or non-finite score (named) or no file;
  prompts with fewer than 2 scored images, with all calibrated values tied, or whose frontiers coincide
  (no image dominates another). A pair of one file with itself is never written.
"""

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np

from examples.lib.calibration import KINDS, SELECTIONS, calibrate, prompt_rng, select_pairs
from examples.lib.cli import InputError, finite_float, parse_checked_args, run_tool
from examples.lib.files import OVERWRITE_HELP, prepare_output_folder, temporary_path, write_atomically
from examples.lib.runs import (
    ID_COLUMNS,
    SOURCES_SUFFIX,
    check_run_dirs,
    read_manifest,
    read_sources,
    source_identity,
)


# The units each reward's score is written in by examples/rewards (score.py's columns). The Bradley-Terry
# calibration sigmoid((R_i - R_k) / T) depends on them (docs/METHODS.md, CaPO); the card records them.
REWARD_UNITS = {
    "pickscore": "logit_scale * cos(image, text), logit_scale = exp(learned) ~ 100: about 100 * cos",
    "hpsv21": "100 * cos(image, text)",
    "imagereward": "ImageReward's normalised score (mean 0, std 1 on its training data)",
    "aesthetic": "LAION aesthetic predictor v2 score, about 1-10 (stands in for VILA-R, which has no PyTorch weights)",
    "mps": "MPS as its model outputs: exp(logit_scale) * cos(text, condition-masked cross-attended image)",
    "clipscore": "100 * max(cos(image, text), 0)",
    "vqascore": "P('Yes' | image, question), a probability in [0, 1]",
}
PROMPT_SKIPS = {
    "few_images": "fewer than 2 images",
    "tied": "all scores tied",
    "coincident_frontiers": "frontiers coincide",
    "same_file": "both images the same file",
}
IMAGE_SKIPS = {
    "bad_score": "missing or non-finite score",
    "no_file": "image file missing",
    "listed_twice": "listed twice in a group",
}
OUTPUT_NAMES = ["train.parquet", "README.md"]  # what a run writes in --output_dir (--overwrite replaces them)
WRITE_BATCH = 64  # pairs per Parquet row group: the image bytes of a large dataset never sit in memory at once


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("input")
    data.add_argument(
        "--run_dirs",
        type=str,
        nargs="+",
        required=True,
        help="generate.py folders, each with manifest.jsonl and a score.py table.",
    )
    data.add_argument(
        "--scores_filename",
        type=str,
        default="scores.csv",
        help="Score table inside each run folder (default: scores.csv).",
    )
    data.add_argument(
        "--reward_models",
        type=str,
        nargs="+",
        required=True,
        help="Score columns to calibrate and select with (e.g. pickscore, or mps vqascore aesthetic).",
    )
    data.add_argument(
        "--reward_kinds",
        type=str,
        nargs="*",
        default=[],
        metavar="NAME=KIND",
        help=f"Kind ({' or '.join(KINDS)}) of columns that are not registered reward models "
        "(default: the kind examples/rewards/registry.py gives each registered model).",
    )
    calibration = parser.add_argument_group("calibration (Eq. 7)")
    calibration.add_argument(
        "--temperature",
        type=str,
        nargs="*",
        default=[],
        metavar="NAME=T",
        help="Bradley-Terry temperature per reward: P = sigmoid((R_i - R_k) / T), R in the reward's native units "
        "(default 1 for every reward, as Eq. 2).",
    )
    calibration.add_argument(
        "--alpha",
        type=finite_float,
        default=1.0,
        help="Exponent of Eq. 28 for probability-like rewards (default: 1, the paper's).",
    )
    selection = parser.add_argument_group("pair selection (§4.3)")
    selection.add_argument(
        "--selection",
        type=str,
        default=None,
        choices=SELECTIONS,
        help="best_worst (one reward), sum (top-1/worst-1 of the summed calibrated rewards) or frontier "
        "(frontier-based rejection sampling). Default: best_worst for one reward, frontier for several.",
    )
    selection.add_argument(
        "--pairs_per_prompt",
        type=int,
        default=1,
        help="Distinct (x+, x-) pairs per prompt drawn by frontier selection (default: 1; best_worst, sum: one).",
    )
    selection.add_argument(
        "--seed", type=int, default=0, help="Seed of the frontier draws, with the prompt index (default: 0)."
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--output_dir", type=str, required=True, help="Receives train.parquet and the dataset card README.md."
    )
    output.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    return parse_checked_args(parser, check_args, input_args)


def parse_assignments(entries, flag):
    """["name=value", ...] -> {name: value}."""
    assignments = {}
    for entry in entries:
        name, separator, value = entry.partition("=")
        if not separator or not name or not value:
            raise InputError(f"{flag} entries look like NAME=VALUE, got {entry!r}.")
        if name in assignments:
            raise InputError(f"{flag} sets {name!r} twice.")
        assignments[name] = value
    return assignments


def score_columns(path):
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    return [column for column in header if column not in ID_COLUMNS]


def check_args(args):
    """Refuse bad settings and run folders before any image is read; fills in kinds, temperatures, selection."""
    from examples.rewards import REWARD_MODELS

    if len(set(args.reward_models)) != len(args.reward_models):
        raise InputError(f"--reward_models lists a reward twice: {args.reward_models}.")
    check_run_dirs(args.run_dirs)
    for run_dir in args.run_dirs:
        scores = Path(run_dir) / args.scores_filename
        if not scores.is_file():
            raise InputError(
                f"No {args.scores_filename} in {run_dir!r}; score the run first: "
                f"python -m examples.eval.score --run_dirs {run_dir} --reward_models {' '.join(args.reward_models)}."
            )
        missing = [name for name in args.reward_models if name not in score_columns(scores)]
        if missing:
            raise InputError(
                f"{scores} has no column {', '.join(missing)} (it has {', '.join(score_columns(scores)) or 'none'}); "
                f"score it with score.py --reward_models {' '.join(missing)}, or choose --reward_models among those."
            )
    if len({str(Path(run_dir).resolve()) for run_dir in args.run_dirs}) != len(args.run_dirs):
        raise InputError(f"--run_dirs lists a folder twice: {args.run_dirs}.")
    kinds = parse_assignments(args.reward_kinds, "--reward_kinds")
    for name, kind in kinds.items():
        if kind not in KINDS:
            raise InputError(f"--reward_kinds gives {name!r} the unknown kind {kind!r}; expected one of {KINDS}.")
        if name not in args.reward_models:
            raise InputError(f"--reward_kinds names {name!r}, which is not in --reward_models {args.reward_models}.")
    for name in args.reward_models:
        if name not in kinds:
            if name not in REWARD_MODELS:
                raise InputError(
                    f"{name!r} is not a registered reward model ({', '.join(REWARD_MODELS)}), so its kind is "
                    f"unknown; pass --reward_kinds {name}=bradley_terry (a logit-scale reward) or "
                    f"{name}=probability (a score in [0, 1], Eq. 28)."
                )
            kinds[name] = REWARD_MODELS[name].kind
    args.reward_kinds = {name: kinds[name] for name in args.reward_models}

    temperatures = parse_assignments(args.temperature, "--temperature")
    for name, value in temperatures.items():
        if name not in args.reward_models:
            raise InputError(f"--temperature names {name!r}, which is not in --reward_models {args.reward_models}.")
        try:
            temperatures[name] = float(value)
        except ValueError:
            raise InputError(f"--temperature {name}={value}: the temperature must be a number.") from None
        if not (math.isfinite(temperatures[name]) and temperatures[name] > 0):
            raise InputError(f"--temperature {name}={value}: the temperature must be positive and finite.")
        if args.reward_kinds[name] != "bradley_terry":
            raise InputError(
                f"--temperature {name}={value}: {name} is probability-like (Eq. 28), which a temperature does not "
                "apply to; set --alpha instead."
            )
    args.temperature = {name: temperatures.get(name, 1.0) for name in args.reward_models}
    if not (math.isfinite(args.alpha) and args.alpha > 0):
        raise InputError(f"--alpha must be positive and finite, got {args.alpha}.")

    if args.selection is None:
        args.selection = "best_worst" if len(args.reward_models) == 1 else "frontier"
    if args.selection == "best_worst" and len(args.reward_models) > 1:
        raise InputError(
            f"--selection best_worst picks with one reward, got {len(args.reward_models)} "
            f"({' '.join(args.reward_models)}); use --selection sum or --selection frontier for several."
        )
    if args.pairs_per_prompt < 1:
        raise InputError(f"--pairs_per_prompt must be at least 1, got {args.pairs_per_prompt}.")
    if args.pairs_per_prompt > 1 and args.selection != "frontier":
        raise InputError(
            f"--selection {args.selection} gives one pair per prompt (top-1 and worst-1); "
            "--pairs_per_prompt applies to --selection frontier."
        )
    prepare_output_folder(args.output_dir, OUTPUT_NAMES, args.overwrite)


# ---------------------------------------------------------------------------------------------------------------
# Reading runs
# ---------------------------------------------------------------------------------------------------------------


def recorded_sources(run_dir, scores_filename):
    """The weights record of a run's score table (score.py's), or None when it has none."""
    path = Path(run_dir) / (scores_filename + SOURCES_SUFFIX)
    return read_sources(path) if path.is_file() else None


def check_sources_agree(runs, reward_models):
    """The same reward column must come from the same weights in every run: one dataset, one reward per name."""
    for name in reward_models:
        recorded = {run["dir"]: run["sources"][name] for run in runs if run["sources"] and name in run["sources"]}
        identities = {json.dumps(source_identity(source), sort_keys=True) for source in recorded.values()}
        if len(identities) > 1:
            raise InputError(
                f"The {name} scores of the runs come from different weights ({recorded}); score every run with the "
                "same weights, or select pairs for each run separately."
            )


def parse_score(cell):
    """A score-table cell -> float, or None when it is empty, not a number or not finite."""
    if cell in (None, ""):
        return None
    try:
        value = float(cell)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_run(run_dir, scores_filename, reward_models, reward_kinds, image_skips):
    """One run folder -> list of groups {prompt, prompt_index, images: [name], scores: (N, L)}, in prompt order.

    Images without a usable score or without a file are left out and added to `image_skips`
    ({reason: [description]})."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    with open(run_dir / scores_filename, newline="", encoding="utf-8") as f:
        score_rows = {row["image"]: row for row in csv.DictReader(f)}
    groups = {}
    for row in manifest:
        # A group is one prompt of generate.py's list: a prompt repeated with --keep_duplicate_prompts is sampled
        # (and calibrated) once per occurrence, each with its own seeds.
        group = groups.setdefault(
            (row["prompt_index"], row["prompt"]),
            {"prompt": row["prompt"], "prompt_index": row["prompt_index"], "images": [], "scores": []},
        )
        name = row["image"]
        if name in group["images"]:
            image_skips["listed_twice"].append(f"{run_dir / name}")
            continue
        cells = score_rows.get(name, {})
        values = [parse_score(cells.get(reward)) for reward in reward_models]
        bad = [reward for reward, value in zip(reward_models, values) if value is None]
        if bad:
            shown = {reward: cells.get(reward, "no row") for reward in bad}
            image_skips["bad_score"].append(f"{run_dir / name} ({', '.join(f'{k}: {v!r}' for k, v in shown.items())})")
            continue
        if not (run_dir / name).is_file():
            image_skips["no_file"].append(f"{run_dir / name}")
            continue
        for reward, value in zip(reward_models, values):
            if reward_kinds[reward] == "probability" and not 0 <= value <= 1:
                raise InputError(
                    f"{run_dir / scores_filename}: the {reward} score of {name} is {value}, outside [0, 1], but "
                    f"{reward} is calibrated as a probability (Eq. 28); pass --reward_kinds {reward}=bradley_terry "
                    "if it is a logit-scale reward, or rescore the run."
                )
        group["images"].append(name)
        group["scores"].append(values)
    ordered = sorted(groups.values(), key=lambda group: group["prompt_index"])
    for group in ordered:
        group["scores"] = np.asarray(group["scores"], dtype=np.float64).reshape(-1, len(reward_models))  # (N, L)
    return ordered


# ---------------------------------------------------------------------------------------------------------------
# Writing the dataset
# ---------------------------------------------------------------------------------------------------------------


def pair_schema(reward_models):
    import pyarrow as pa

    fields = [
        ("caption", pa.string()),
        ("jpg_pos", pa.binary()),
        ("jpg_neg", pa.binary()),
        ("reward_pos", pa.float64()),
        ("reward_neg", pa.float64()),
    ]
    for name in reward_models:
        fields += [(f"{name}_calibrated_pos", pa.float64()), (f"{name}_calibrated_neg", pa.float64())]
    for name in reward_models:
        fields += [(f"{name}_pos", pa.float64()), (f"{name}_neg", pa.float64())]
    fields += [
        ("prompt_index", pa.int64()),
        ("run_dir", pa.string()),
        ("image_pos", pa.string()),
        ("image_neg", pa.string()),
    ]
    return pa.schema(fields)


class PairWriter:
    """Streams pairs into train.parquet in row groups of WRITE_BATCH; the file appears whole or not at all."""

    def __init__(self, path, reward_models):
        import pyarrow.parquet as pq

        self.path, self.reward_models = Path(path), reward_models
        self.temporary = temporary_path(self.path)
        self.schema = pair_schema(reward_models)
        self.writer = pq.ParquetWriter(self.temporary, self.schema)
        self.rows, self.count = [], 0

    def add(self, row):
        self.rows.append(row)
        self.count += 1
        if len(self.rows) >= WRITE_BATCH:
            self.flush()

    def flush(self):
        import pyarrow as pa

        if self.rows:
            columns = {field.name: [row[field.name] for row in self.rows] for field in self.schema}
            self.writer.write_table(pa.table(columns, schema=self.schema))
            self.rows = []

    def close(self):
        self.flush()
        self.writer.close()
        self.temporary.replace(self.path)

    def abort(self):
        self.writer.close()
        self.temporary.unlink(missing_ok=True)


def dataset_card(args, runs, counts, image_skips, prompt_skips, num_pairs, num_groups):
    """The README.md written beside train.parquet: how the pairs were made, in which units, from which weights."""
    lines = [
        "---",  # the card's metadata: `datasets.load_dataset(output_dir)` reads train.parquet as the train split
        "configs:",
        "- config_name: default",
        "  data_files:",
        "  - split: train",
        "    path: train.parquet",
        "---",
        "",
        "# CaPO preference pairs",
        "",
        "Written by `examples/capo/select_pairs.py`: calibrated rewards (CaPO Eq. 7) and "
        f"`{args.selection}` pair selection (§4.3) over the images of each prompt.",
        "",
        f"- Pairs: {num_pairs} from {num_groups - sum(prompt_skips.values())} of {num_groups} prompts "
        f"({args.pairs_per_prompt} per prompt asked; seed {args.seed}).",
        "- Prompts skipped: " + ", ".join(f"{PROMPT_SKIPS[key]} {value}" for key, value in prompt_skips.items()) + ".",
        "- Images skipped: "
        + ", ".join(f"{IMAGE_SKIPS[key]} {len(value)}" for key, value in image_skips.items())
        + ".",
        f"- Frontier pairs whose x+ is not higher in the mean calibrated reward than x-: {counts['not_higher']}.",
        "",
        "Columns: `caption`; `jpg_pos`, `jpg_neg` (the encoded image files); `reward_pos`, `reward_neg` (mean over "
        "the rewards of the calibrated values, in [0, 1]: the CaPO target is their difference); "
        "`<reward>_calibrated_pos/neg` (each reward's calibrated value); `<reward>_pos/neg` (raw scores, units "
        "below); `prompt_index`, `run_dir`, `image_pos`, `image_neg` (where the images came from).",
        "",
        "| reward | kind | units of the raw score | calibration |",
        "|---|---|---|---|",
    ]
    for name in args.reward_models:
        kind = args.reward_kinds[name]
        if kind == "bradley_terry":
            rule = f"sigmoid((R_i - R_k) / {args.temperature[name]:g}) (Eq. 2)"
        else:
            rule = f"s_i^{args.alpha:g} / (s_i^{args.alpha:g} + s_k^{args.alpha:g}) (Eq. 28)"
        units = REWARD_UNITS.get(name, "as written in the score table (not a registered reward model)")
        lines.append(f"| `{name}` | {kind} | {units} | {rule} |")
    settings = {
        "selection": args.selection,
        "reward_models": args.reward_models,
        "reward_kinds": args.reward_kinds,
        "reward_units": {name: REWARD_UNITS.get(name) for name in args.reward_models},
        "temperature": args.temperature,
        "alpha": args.alpha,
        "pairs_per_prompt": args.pairs_per_prompt,
        "seed": args.seed,
        "dominance": ">= in every reward and > in at least one; equal points do not dominate each other",
        "runs": {
            run["dir"]: {
                "scores": args.scores_filename,
                "weights_sources": run["sources"] if run["sources"] is not None else "not recorded",
            }
            for run in runs
        },
        "pairs": num_pairs,
        "prompts": num_groups,
        "prompts_skipped": {PROMPT_SKIPS[key]: value for key, value in prompt_skips.items()},
        "images_skipped": {IMAGE_SKIPS[key]: len(value) for key, value in image_skips.items()},
        "images_skipped_first": {IMAGE_SKIPS[key]: value[:20] for key, value in image_skips.items() if value},
    }
    lines += [
        "",
        "Weights that made each score column, copied from each run's "
        f"`{args.scores_filename}{SOURCES_SUFFIX}`, and every setting:",
        "",
        "```json",
        json.dumps(settings, indent=2, ensure_ascii=False),
        "```",
        "",
    ]
    return "\n".join(lines)


def calibrate_group(scores, args):
    """(N, L) raw scores of one prompt -> (N, L) calibrated rewards, one column per reward (Eq. 7)."""
    calibrated = np.empty_like(scores)
    for j, name in enumerate(args.reward_models):
        calibrated[:, j] = calibrate(scores[:, j], args.reward_kinds[name], args.temperature[name], args.alpha)
    return calibrated


def pair_row(group, run_dir, pos, neg, scores, calibrated, reward_models):
    """One row of train.parquet; the images are read here, one pair at a time."""
    target = calibrated.mean(axis=1)  # (N,): R_ca = mean_j R_ca^(j), §4.3
    row = {
        "caption": group["prompt"],
        "jpg_pos": (Path(run_dir) / group["images"][pos]).read_bytes(),
        "jpg_neg": (Path(run_dir) / group["images"][neg]).read_bytes(),
        "reward_pos": float(target[pos]),
        "reward_neg": float(target[neg]),
        "prompt_index": int(group["prompt_index"]),
        "run_dir": str(run_dir),
        "image_pos": group["images"][pos],
        "image_neg": group["images"][neg],
    }
    for j, name in enumerate(reward_models):
        row[f"{name}_calibrated_pos"] = float(calibrated[pos, j])
        row[f"{name}_calibrated_neg"] = float(calibrated[neg, j])
        row[f"{name}_pos"] = float(scores[pos, j])
        row[f"{name}_neg"] = float(scores[neg, j])
    return row


def same_file(run_dir, first, second):
    return (Path(run_dir) / first).resolve() == (Path(run_dir) / second).resolve()


def main(args):
    runs, image_skips = [], {key: [] for key in IMAGE_SKIPS}
    for run_dir in args.run_dirs:
        groups = read_run(run_dir, args.scores_filename, args.reward_models, args.reward_kinds, image_skips)
        sources = recorded_sources(run_dir, args.scores_filename)
        runs.append({"dir": str(run_dir), "groups": groups, "sources": sources})
    check_sources_agree(runs, args.reward_models)

    output_dir = Path(args.output_dir)
    writer = PairWriter(output_dir / "train.parquet", args.reward_models)
    prompt_skips = {key: 0 for key in PROMPT_SKIPS}
    counts = {"not_higher": 0, "short_of_pairs": 0}
    num_groups = sum(len(run["groups"]) for run in runs)
    try:
        for run in runs:
            for group in run["groups"]:
                scores = group["scores"]  # (N, L)
                if len(scores) < 2:
                    prompt_skips["few_images"] += 1
                    continue
                calibrated = calibrate_group(scores, args)  # (N, L)
                rng = prompt_rng(args.seed, group["prompt_index"])
                pairs, reason = select_pairs(calibrated, args.selection, args.pairs_per_prompt, rng)
                images = group["images"]
                pairs = [(pos, neg) for pos, neg in pairs if not same_file(run["dir"], images[pos], images[neg])]
                if reason is None and not pairs:
                    reason = "same_file"  # two names of one file (names are unique within a group)
                if reason is not None:
                    prompt_skips[reason] += 1
                    continue
                if args.selection == "frontier" and len(pairs) < args.pairs_per_prompt:
                    counts["short_of_pairs"] += 1
                for pos, neg in pairs:
                    row = pair_row(group, run["dir"], pos, neg, scores, calibrated, args.reward_models)
                    counts["not_higher"] += row["reward_pos"] <= row["reward_neg"]
                    writer.add(row)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    card = dataset_card(args, runs, counts, image_skips, prompt_skips, writer.count, num_groups)
    write_atomically(output_dir / "README.md", lambda path: path.write_text(card, encoding="utf-8"))

    lines = [
        f"== select_pairs finished: {writer.count} pairs from {num_groups - sum(prompt_skips.values())} of "
        f"{num_groups} prompts ({args.selection}, rewards {' '.join(args.reward_models)}) in {writer.path}",
        "   prompts skipped: " + ", ".join(f"{PROMPT_SKIPS[key]} {value}" for key, value in prompt_skips.items()),
        "   images skipped: " + ", ".join(f"{IMAGE_SKIPS[key]} {len(value)}" for key, value in image_skips.items()),
    ]
    for key, described in image_skips.items():
        for description in described[:10]:
            lines.append(f"      {IMAGE_SKIPS[key]}: {description}")
        if len(described) > 10:
            lines.append(f"      ... and {len(described) - 10} more ({IMAGE_SKIPS[key]})")
    if args.selection == "frontier":
        lines.append(
            f"   frontier pairs whose x+ is not higher in the mean calibrated reward than x-: {counts['not_higher']} "
            f"(kept: their target difference is <= 0); prompts with fewer than {args.pairs_per_prompt} distinct "
            f"pairs: {counts['short_of_pairs']}"
        )
    lines.append(f"   dataset card: {output_dir / 'README.md'}")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    run_tool(main, parse_args)
