#!/usr/bin/env python
r"""Compare scored runs: mean per metric with a bootstrap interval, and the win-rate against a baseline.

    python -m examples.eval.compare --runs generated/sdxl generated/sft generated/dpo generated/mapo \
        --baseline sdxl --output_prefix results/mapo_table1

writes results/mapo_table1.md (tables to paste), .json (every number) and .png (bar chart of the
means with their intervals). Each run is a generate.py folder with a score.py `scores.csv`, or the
CSV itself; its name is the folder's (or --names).

- Prompts are matched by text. Only prompts scored in every run are compared; how many each run
  loses to this is printed and recorded, never dropped silently.
- Mean: the mean over prompts of each prompt's mean score (the mean over images when every prompt
  has K images). Interval: percentile bootstrap over prompts (--num_bootstrap resamples).
- Win-rate against the baseline, as CaPO Appendix B.2 computes it: for each prompt, the K x K'
  one-to-one comparisons of the model's images with the baseline's, a win counting 1 and a tie 1/2,
  divided by K x K'; then the mean over prompts (with the same bootstrap interval). 50 % = no change.
"""

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from examples.lib.cli import InputError, finite_float, parse_checked_args, run_tool
from examples.lib.files import prepare_output_folder, write_atomically
from examples.lib.runs import ID_COLUMNS
from utils.validation import win_rate  # the training scripts' validation by reward logs the same


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--runs",
        type=str,
        nargs="+",
        required=True,
        help="Two or more run folders (with scores.csv) or score CSV files.",
    )
    parser.add_argument(
        "--names", type=str, nargs="+", default=None, help="Names of the runs in the tables (default: folder names)."
    )
    parser.add_argument(
        "--baseline", type=str, default=None, help="Run the win-rates are computed against (default: the first)."
    )
    parser.add_argument(
        "--metrics",
        type=str,
        nargs="+",
        default=None,
        help="Score columns to compare (default: every score column all runs have).",
    )
    parser.add_argument(
        "--scores_filename", type=str, default="scores.csv", help="Score table inside each run folder."
    )
    parser.add_argument(
        "--num_bootstrap", type=int, default=10000, help="Bootstrap resamples of the prompts for the intervals."
    )
    parser.add_argument("--confidence", type=finite_float, default=0.95, help="Coverage of the bootstrap intervals.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the bootstrap resampling.")
    parser.add_argument(
        "--output_prefix", type=str, default="comparison", help="Writes PREFIX.md, PREFIX.json and PREFIX.png."
    )
    parser.add_argument("--title", type=str, default=None, help="Title of the chart.")
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace PREFIX.md, PREFIX.json and PREFIX.png of an earlier run."
    )
    return parse_checked_args(parser, check_args, input_args)


def check_args(args):
    if len(args.runs) < 2:
        raise InputError(f"--runs needs two or more runs to compare, got {len(args.runs)}.")
    if args.names is not None and len(args.names) != len(args.runs):
        raise InputError(f"--names must name every run: {len(args.runs)} runs, {len(args.names)} names.")
    names = args.names or [run_name(run) for run in args.runs]
    if len(set(names)) != len(names):
        raise InputError(f"Run names must be unique, got {names}; name them with --names.")
    if args.baseline is not None and args.baseline not in names:
        raise InputError(f"--baseline {args.baseline!r} is not one of the runs {names}.")
    if args.num_bootstrap <= 0:
        raise InputError(f"--num_bootstrap must be positive, got {args.num_bootstrap}.")
    if not 0 < args.confidence < 1:
        raise InputError(f"--confidence must lie strictly between 0 and 1, got {args.confidence}.")
    prefix = Path(args.output_prefix)
    if not prefix.name or prefix.is_dir():
        raise InputError(f"--output_prefix {args.output_prefix!r} is a folder; give a path and a file name stem.")
    outputs = [f"{prefix.name}.{suffix}" for suffix in OUTPUT_SUFFIXES]
    remedy = "Give another --output_prefix, or pass --overwrite to replace them."
    prepare_output_folder(prefix.parent, outputs, args.overwrite, flag="--output_prefix's folder", remedy=remedy)


OUTPUT_SUFFIXES = ("md", "json", "png")


def run_name(run):
    path = Path(run)
    return path.parent.name if path.suffix == ".csv" else path.name


def read_score_table(path):
    """A score CSV -> (rows, metric columns); each row maps column -> str."""
    if not Path(path).is_file():
        raise InputError(f"No score table at {str(path)!r}; run examples/eval/score.py on the run folder first.")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "prompt" not in (reader.fieldnames or []):
            raise InputError(f"{str(path)!r} has no 'prompt' column; expected a table written by score.py.")
        return list(reader), [column for column in reader.fieldnames if column not in ID_COLUMNS]


def scores_by_prompt(rows, metric, source="the score table"):
    """({prompt: array of the scores of its images}, unscored cells): empty and non-finite (nan, inf) cells are left
    out and counted; a cell that is not a number is an InputError naming `source`."""
    groups, unscored = {}, 0
    for row in rows:
        value = row.get(metric)
        if value in (None, ""):
            unscored += 1
            continue
        try:
            number = float(value)
        except ValueError:
            raise InputError(
                f"{source}: the {metric} cell of {row.get('image') or row['prompt']!r} is {value!r}, not a number; "
                "rescore the run with score.py."
            ) from None
        if not np.isfinite(number):
            unscored += 1
            continue
        groups.setdefault(row["prompt"], []).append(number)
    return {prompt: np.asarray(values) for prompt, values in groups.items()}, unscored


def bootstrap_interval(per_prompt_values, num_bootstrap, confidence, rng):
    """Percentile bootstrap interval of the mean of per-prompt values, resampling prompts with replacement."""
    values = np.asarray(per_prompt_values, dtype=np.float64)
    means = np.empty(num_bootstrap)
    chunk = max(1, 2_000_000 // len(values))  # bounded memory for large prompt sets
    for start in range(0, num_bootstrap, chunk):
        size = min(chunk, num_bootstrap - start)
        means[start : start + size] = values[rng.integers(0, len(values), size=(size, len(values)))].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def summarize(tables, metrics, baseline, num_bootstrap=10000, confidence=0.95, seed=0):
    """tables: {run name: rows of its score table}. Returns the dict compare.py writes as JSON."""
    rng = np.random.default_rng(seed)
    summary = {
        "baseline": baseline,
        "metrics": metrics,
        "confidence": confidence,
        "num_bootstrap": num_bootstrap,
        "seed": seed,
        "prompts": {},
        "results": {name: {} for name in tables},
    }
    for metric in metrics:
        grouped, empty_cells = {}, {}
        for name, rows in tables.items():
            grouped[name], empty_cells[name] = scores_by_prompt(rows, metric, f"run {name}")
        shared = sorted(set.intersection(*(set(groups) for groups in grouped.values())))
        if not shared:
            raise InputError(
                f"No prompt has {metric} scores in every run; compare runs generated from the same prompt set."
            )
        summary["prompts"][metric] = {
            "shared": len(shared),
            "dropped": {
                name: len(groups) - len(shared) for name, groups in grouped.items()
            },  # prompts not in every run
            "empty_cells": empty_cells,  # images without a finite score (score.py --skip_missing_images; nan, inf)
        }
        for name, groups in grouped.items():
            prompt_means = np.array([groups[prompt].mean() for prompt in shared])  # (P,)
            low, high = bootstrap_interval(prompt_means, num_bootstrap, confidence, rng)
            result = {
                "mean": float(prompt_means.mean()),
                "ci_low": low,
                "ci_high": high,
                "num_images": int(sum(len(groups[p]) for p in shared)),
            }
            if name != baseline:
                prompt_win_rates = np.array(
                    [win_rate(groups[prompt], grouped[baseline][prompt]) for prompt in shared]
                )  # (P,)
                win_low, win_high = bootstrap_interval(prompt_win_rates, num_bootstrap, confidence, rng)
                result.update(
                    {
                        "win_rate": float(prompt_win_rates.mean()),
                        "win_rate_ci_low": win_low,
                        "win_rate_ci_high": win_high,
                    }
                )
            summary["results"][name][metric] = result
    return summary


# The columns examples/eval/personalization.py writes (not reward models of the registry), as MaPO Table 2 names them
SCORE_NAMES = {"dinov2": "DINOv2", "siglip": "SigLIP"}


def display_name(metric):
    if metric in SCORE_NAMES:
        return SCORE_NAMES[metric]
    try:
        from examples.rewards import REWARD_MODELS
    except ImportError:  # the reward library (and torch) are not needed to compare tables
        return metric
    return REWARD_MODELS[metric].display_name if metric in REWARD_MODELS else metric


def markdown_tables(summary):
    metrics, confidence = summary["metrics"], round(100 * summary["confidence"])
    header = (
        "| Model | "
        + " | ".join(display_name(metric) for metric in metrics)
        + " |\n|---|"
        + "---|" * len(metrics)
        + "\n"
    )
    means = [
        f"Mean score, with {confidence} % bootstrap intervals over prompts "
        f"({summary['num_bootstrap']} resamples).\n\n",
        header,
    ]
    for name, results in summary["results"].items():
        cells = [
            f"{results[m]['mean']:.3f} [{results[m]['ci_low']:.3f}, {results[m]['ci_high']:.3f}]" for m in metrics
        ]
        means.append(f"| {name} | " + " | ".join(cells) + " |\n")
    wins = [
        f"\nWin-rate (%) against {summary['baseline']}: K x K one-to-one comparisons per prompt, "
        "ties count half (CaPO App. B.2).\n\n",
        header,
    ]
    for name, results in summary["results"].items():
        if name == summary["baseline"]:
            continue
        cells = [
            f"{100 * results[m]['win_rate']:.1f} "
            f"[{100 * results[m]['win_rate_ci_low']:.1f}, {100 * results[m]['win_rate_ci_high']:.1f}]"
            for m in metrics
        ]
        wins.append(f"| {name} | " + " | ".join(cells) + " |\n")
    prompts = ", ".join(f"{display_name(m)} {info['shared']}" for m, info in summary["prompts"].items())
    return "".join(means) + "".join(wins) + f"\nPrompts compared: {prompts}.\n"


def draw_chart(summary, path, title=None):
    """One panel per metric, one bar per model (mean, with its interval as error bar). Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics, names = summary["metrics"], list(summary["results"])
    colors = plt.get_cmap("tab10").colors
    figure, axes = plt.subplots(1, len(metrics), figsize=(2.2 + 1.1 * len(names) * len(metrics), 3.6), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        results = [summary["results"][name][metric] for name in names]
        means = np.array([r["mean"] for r in results])
        errors = np.array([[r["mean"] - r["ci_low"] for r in results], [r["ci_high"] - r["mean"] for r in results]])
        low, high = min(r["ci_low"] for r in results), max(r["ci_high"] for r in results)
        margin = max(0.25 * (high - low), 1e-3 * max(abs(high), 1.0))
        floor = low - margin  # bars rise from just below the lowest interval: the differences are the point, not zero
        axis.bar(
            range(len(names)),
            means - floor,
            bottom=floor,
            yerr=errors,
            capsize=4,
            color=[colors[i % len(colors)] for i in range(len(names))],
        )
        axis.set_ylim(floor, high + margin)
        axis.set_xticks(range(len(names)), names, rotation=30, ha="right")
        axis.set_title(display_name(metric))
    figure.suptitle(title or f"Mean score with {round(100 * summary['confidence'])} % bootstrap intervals")
    figure.tight_layout()
    figure.savefig(path, dpi=150, format="png")
    return figure


def main(args):
    names = args.names or [run_name(run) for run in args.runs]
    baseline = args.baseline or names[0]
    tables, columns = {}, {}
    for name, run in zip(names, args.runs):
        path = Path(run) if Path(run).suffix == ".csv" else Path(run) / args.scores_filename
        tables[name], columns[name] = read_score_table(path)
    common = [column for column in columns[names[0]] if all(column in columns[name] for name in names)]
    metrics = args.metrics or common
    missing = {name: [m for m in metrics if m not in columns[name]] for name in names}
    missing = {name: absent for name, absent in missing.items() if absent}
    if missing:
        raise InputError(
            f"Runs lack score columns {missing}; score them with score.py --reward_models ..., "
            f"or choose --metrics from {common}."
        )
    if not metrics:
        raise InputError(
            f"The runs share no score column; score them with the same --reward_models. Columns: {columns}."
        )

    summary = summarize(tables, metrics, baseline, args.num_bootstrap, args.confidence, args.seed)
    summary["runs"] = dict(zip(names, args.runs))
    for metric, info in summary["prompts"].items():
        losses = {name: lost for name, lost in info["dropped"].items() if lost}
        if losses:
            print(
                f"{metric}: compared on the {info['shared']} prompts every run has; prompts left out per run: {losses}"
            )
        unscored = {name: count for name, count in info["empty_cells"].items() if count}
        if unscored:
            print(f"{metric}: images without a finite score (empty, nan or inf), left out: {unscored}")

    outputs = {suffix: Path(f"{args.output_prefix}.{suffix}") for suffix in OUTPUT_SUFFIXES}
    table = markdown_tables(summary)
    write_atomically(outputs["md"], lambda path: path.write_text(table, encoding="utf-8"))
    write_atomically(outputs["json"], lambda path: path.write_text(json.dumps(summary, indent=2), encoding="utf-8"))
    write_atomically(outputs["png"], lambda path: draw_chart(summary, path, args.title))
    print(table)
    print(f"== compare finished: {outputs['md']}, {outputs['json']}, {outputs['png']}")


if __name__ == "__main__":
    run_tool(main, parse_args)
