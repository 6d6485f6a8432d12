"""The playground's report: per-seed numbers to intervals, the markdown table, results.json and the figures."""

import json
import math

import numpy as np

from examples.playground_2d import metrics


METHOD_NAMES = {
    "dpo": "Diffusion-DPO",
    "ddspo": "DDSPO",
    "mapo": "MaPO",
    "sft": "SFT on chosen",
    "capo": "CaPO",
    "capo_dpo": "DPO on CaPO's pairs",
}
PANEL_NAMES = {"capo_dpo": "DPO"}  # a panel title has room for a short name
CLASS_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
PLOT_LIMIT = 4.0


def summary_row(name, run, metric, select=None):
    """{name, mean, half_width, n, per_seed, diverged}: the class-mean of `metric` per member, over the members
    that `select` (a predicate on a member's info) keeps; a member whose value is NaN is a diverged seed."""
    values, seeds = [], []
    for member, info in enumerate(run["members"]):
        if select is None or select(info):
            values.append(float(np.mean(run[metric][member])))
            seeds.append(info["seed"])
    mean, half_width, n = metrics.interval(values)
    diverged = [seed for seed, value in zip(seeds, values) if not math.isfinite(value)]
    return {"name": name, "mean": mean, "half_width": half_width, "n": n, "per_seed": values, "diverged": diverged}


def add_beta_rows(rows, runs, methods):
    """Append to each metric's rows one row per method and β (method by method, β ascending)."""
    for method in methods:
        run = runs[method]
        for beta in sorted({info["beta"] for info in run["members"]}):
            name = f"{METHOD_NAMES[method]}, β = {beta:g}"
            for metric in rows:
                rows[metric].append(summary_row(name, run, metric, lambda info, beta=beta: info["beta"] == beta))


def sweep_round(round_):
    """One round of the β sweep: the class-modes table, and per β the gap in mode accuracy DDSPO − Diffusion-DPO,
    paired by seed (both start from the seed's reference and train on the seed's pairs)."""
    reference = round_["reference"]
    rows = {metric: [summary_row("reference", reference, metric)] for metric in ("mode_acc", "swd", "spread")}
    add_beta_rows(rows, round_["runs"], ("dpo", "ddspo"))
    gaps = []
    for beta in sorted({info["beta"] for info in round_["runs"]["dpo"]["members"]}):
        dpo, ddspo = (
            summary_row(method, round_["runs"][method], "mode_acc", lambda info, beta=beta: info["beta"] == beta)
            for method in ("dpo", "ddspo")
        )
        differences = [value - other for value, other in zip(ddspo["per_seed"], dpo["per_seed"])]
        mean, half_width, n = metrics.interval(differences)
        gaps.append(
            {
                "beta": beta,
                "mean": mean,
                "half_width": half_width,
                "n": n,
                "per_seed": differences,
                "diverged": sorted(set(dpo["diverged"] + ddspo["diverged"])),
                "intervals_overlap": metrics.intervals_overlap(dpo["per_seed"], ddspo["per_seed"]),
            }
        )
    seeds = [member["seed"] for member in reference["members"]]
    return {"seeds": seeds, "rows": rows, "gaps": gaps}


def summarise(results):
    """The numbers of every table, as plain data (what results.json holds and the tests compare)."""
    summary = {}
    fixed = [("ground truth", results["truth"]["ground truth"]), ("noisy data", results["truth"]["noisy data"])]
    fixed.append(("reference", results["reference"]))
    if "modes" in results:
        rows = {
            metric: [summary_row(name, run, metric) for name, run in fixed] for metric in ("mode_acc", "swd", "spread")
        }
        add_beta_rows(rows, results["modes"]["runs"], ("dpo", "ddspo"))
        summary["modes"] = rows
    if "mismatch" in results:
        runs = results["mismatch"]["runs"]
        shifts = sorted({info["shift"] for info in runs["reference"]["members"]})
        rows = []
        for key, run in runs.items():
            first = run["members"][0]
            name = "reference" if key == "reference" else METHOD_NAMES[first["method"]]
            if key != "reference" and first["beta"] is not None:
                name += f", β = {first['beta']:g}"
            by_shift = [summary_row(name, run, "swd", lambda info, d=shift: info["shift"] == d) for shift in shifts]
            rows.append({"name": name, "shifts": shifts, "cells": by_shift})
        summary["mismatch"] = rows
    if "capo" in results:
        rows = {metric: [summary_row("reference", results["reference"], metric)] for metric in ("reward", "mode_acc")}
        rows.update({metric: [summary_row("reference", results["reference"], metric)] for metric in ("swd", "spread")})
        add_beta_rows(rows, results["capo"]["runs"], ("capo", "capo_dpo"))
        summary["capo"] = rows
    if "beta_sweep" in results:
        summary["beta_sweep"] = [sweep_round(round_) for round_ in results["beta_sweep"]["rounds"]]
    return summary


def cell(row, digits=3, sign=""):
    if row["n"] == 0:
        return "diverged"
    text = f"{row['mean']:{sign}.{digits}f}"
    if math.isfinite(row["half_width"]):
        text += f" ± {row['half_width']:.{digits}f}"
    return text


def seeds_cell(rows):
    """How many seeds a row rests on, naming the diverged ones (never dropped silently)."""
    diverged = sorted(set().union(*(row["diverged"] for row in rows)))
    total = len(rows[0]["per_seed"])
    if not diverged:
        return str(total)
    return f"{total - len(diverged)} of {total} (diverged: seed {', '.join(str(seed) for seed in diverged)})"


def metric_table(rows, columns):
    """A markdown table: one line per method, one column per (metric key, header)."""
    lines = ["| | " + " | ".join(header for _, header in columns) + " | seeds |"]
    lines.append("|---" * (len(columns) + 2) + "|")
    for index in range(len(rows[columns[0][0]])):
        row_cells = [rows[key][index] for key, _ in columns]
        lines.append(
            f"| {row_cells[0]['name']} | " + " | ".join(cell(c) for c in row_cells) + f" | {seeds_cell(row_cells)} |"
        )
    return lines


def markdown(summary, settings):
    """The results table the README quotes: mean ± half-width of the 95 % t-interval over seeds."""
    lines = [
        "# 2-D playground: measured numbers",
        "",
        "Written by `python -m examples.playground_2d.playground` (settings at the end). Every cell: mean over seeds",
        "± the half-width of the 95 % Student-t interval; each seed's number is the mean over the classes.",
        "",
    ]
    if "modes" in summary:
        lines += [
            "## Class modes (DDSPO Fig. 2)",
            "",
            "Mode accuracy: share of a class's samples nearest its own centre (higher is better). SWD: sliced",
            "Wasserstein-2 distance to the class's ground-truth mode (lower is better). Spread: RMS distance of a",
            f"class's samples from their mean (ground truth: {settings['mode_std'] * math.sqrt(2):.3f}).",
            "",
        ]
        lines += metric_table(
            summary["modes"], [("mode_acc", "mode accuracy ↑"), ("swd", "SWD ↓"), ("spread", "spread")]
        )
        lines.append("")
    if "mismatch" in summary:
        shifts = summary["mismatch"][0]["shifts"]
        lines += [
            "## Reference mismatch (MaPO §3.1)",
            "",
            "SWD between the fine-tuned samples and the preferred distribution (the ground-truth modes moved outward",
            "by the shift d), lower is better; the reference row is where every method starts.",
            "",
            "| | " + " | ".join(f"d = {shift:g}" for shift in shifts) + " | seeds |",
            "|---" * (len(shifts) + 2) + "|",
        ]
        for row in summary["mismatch"]:
            cells = " | ".join(cell(c) for c in row["cells"])
            lines.append(f"| {row['name']} | {cells} | {seeds_cell(row['cells'])} |")
        lines.append("")
    if "capo" in summary:
        lines += [
            "## CaPO on a reward on the plane",
            "",
            "Reward: minus the squared distance to the class centre (higher is better); pairs: best and worst of each",
            "group by calibrated reward (examples/capo/select_pairs.py).",
            "",
        ]
        columns = [("reward", "reward ↑"), ("mode_acc", "mode accuracy ↑"), ("swd", "SWD ↓"), ("spread", "spread")]
        lines += metric_table(summary["capo"], columns)
        lines.append("")
    if "beta_sweep" in summary:
        lines += sweep_markdown(summary["beta_sweep"])
    lines += ["## Settings", "", "```", json.dumps(settings, indent=None, sort_keys=True), "```", ""]
    return "\n".join(lines)


def seed_range(seeds):
    return f"{seeds[0]}–{seeds[-1]}"


def gap_cells(gap):
    """The gap's two cells: the paired difference, and whether the two methods' own intervals overlap."""
    if gap is None:
        return ["–", "not run"]
    overlap = "overlap" if gap["intervals_overlap"] else "apart"
    if gap["diverged"]:
        overlap += f" (diverged: seed {', '.join(str(seed) for seed in gap['diverged'])})"
    return [cell(gap, sign="+"), overlap]


def sweep_markdown(rounds):
    """The β sweep's section: each round's class-modes table, then the gap in mode accuracy per β and round."""
    lines = [
        "## β sweep: Diffusion-DPO vs DDSPO on the class modes",
        "",
        f"Round 1: seeds {seed_range(rounds[0]['seeds'])} at every β of the grid. Round 2, where there is one: fresh",
        "seeds, each with its own reference and pairs, at every β where round 1's mode-accuracy intervals of the two",
        "methods overlapped. Mode accuracy, SWD and spread as in the class-modes table.",
        "",
    ]
    columns = [("mode_acc", "mode accuracy ↑"), ("swd", "SWD ↓"), ("spread", "spread")]
    for number, round_ in enumerate(rounds, start=1):
        lines += [f"### Round {number}: seeds {seed_range(round_['seeds'])}", ""]
        lines += metric_table(round_["rows"], columns)
        lines.append("")
    header = "| β |"
    for number, round_ in enumerate(rounds, start=1):
        header += f" round {number}: DDSPO − Diffusion-DPO ({len(round_['seeds'])} seeds) | intervals |"
    lines += [
        "### The gap in mode accuracy",
        "",
        "DDSPO − Diffusion-DPO, paired by seed (both start from the seed's reference and train on its pairs): mean",
        "± the half-width of the 95 % t-interval of the per-seed differences. Intervals: whether the two methods'",
        "own intervals (the tables above) overlap.",
        "",
        header,
        "|---" * (2 * len(rounds) + 1) + "|",
    ]
    for first_gap in rounds[0]["gaps"]:
        cells = []
        for round_ in rounds:
            gaps = {gap["beta"]: gap for gap in round_["gaps"]}
            cells += gap_cells(gaps.get(first_gap["beta"]))
        lines.append(f"| {first_gap['beta']:g} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def write_json(path, summary, settings, wall_seconds):
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"settings": settings, "summary": summary, "wall_seconds": round(wall_seconds, 1)}, f, indent=1)


# ----------------------------------------------------------------------------------------------
# Figures (matplotlib, from requirements.txt)
# ----------------------------------------------------------------------------------------------
def scatter(axis, points, centres, title, size=2.0):
    """points (K, S, 2), coloured by class, with the class centres."""
    for label in range(points.shape[0]):
        colour = CLASS_COLOURS[label % len(CLASS_COLOURS)]
        axis.scatter(points[label, :, 0], points[label, :, 1], s=size, color=colour, alpha=0.6, linewidths=0)
    axis.scatter(centres[:, 0], centres[:, 1], marker="+", color="black", s=40, linewidths=1)
    axis.set_xlim(-PLOT_LIMIT, PLOT_LIMIT)
    axis.set_ylim(-PLOT_LIMIT, PLOT_LIMIT)
    axis.set_aspect("equal")
    axis.set_xticks([])
    axis.set_yticks([])
    axis.set_title(title, fontsize=8)


def draw_pairs(axis, labels, points_w, points_l):
    for label, winner, loser in zip(labels, points_w, points_l):
        colour = CLASS_COLOURS[int(label) % len(CLASS_COLOURS)]
        axis.plot([winner[0], loser[0]], [winner[1], loser[1]], color=colour, linewidth=0.6, alpha=0.8)
        axis.scatter(*winner, marker="^", color=colour, edgecolors="black", s=30, linewidths=0.6, zorder=3)
        axis.scatter(*loser, marker="v", color="white", edgecolors=colour, s=30, linewidths=1.0, zorder=3)


def member_points(run, beta, seed):
    for member, info in enumerate(run["members"]):
        if info["beta"] == beta and info["seed"] == seed:
            return run["points"][member]
    raise KeyError((beta, seed))


def class_points(points, labels, num_classes):
    """Flat points with labels -> a list per class (for the training-data panel, classes of unequal size)."""
    return [points[labels == label] for label in range(num_classes)]


def modes_figure(results, path, title, runs_key, methods):
    """DDSPO Fig. 2's layout for seed 0: ground truth, noisy data, reference (with the pairs); then one row per method,
    one column per β."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    world, seed = results["world"], results["seeds"][0]
    experiment = results[runs_key]
    betas = sorted({info["beta"] for info in experiment["runs"][methods[0]]["members"]})
    columns = max(3, len(betas))
    figure, axes = plt.subplots(1 + len(methods), columns, figsize=(2.2 * columns, 2.3 * (1 + len(methods))))
    for axis in axes.flat:
        axis.axis("off")
    truth = results["truth"]["ground truth"]["points"][0]
    scatter(axes[0, 0], truth, world.centres, "(a) ground truth")
    axes[0, 0].axis("on")
    data, data_labels = results["noisy_training_data"]
    for label, points in enumerate(class_points(data, data_labels, world.num_classes)):
        axes[0, 1].scatter(points[:, 0], points[:, 1], s=1.0, color=CLASS_COLOURS[label % 8], alpha=0.4, linewidths=0)
    scatter(axes[0, 1], np.zeros((0, 0, 2)), world.centres, "(b) noisy training data")
    axes[0, 1].axis("on")
    reference = results["reference"]
    accuracy = np.mean(reference["mode_acc"][0])
    scatter(axes[0, 2], reference["points"][0], world.centres, f"(c) reference, acc {accuracy:.2f}")
    pairs = experiment["pairs"]
    draw_pairs(axes[0, 2], pairs["labels"][0], pairs["points_w"][0], pairs["points_l"][0])
    axes[0, 2].axis("on")
    for row, method in enumerate(methods, start=1):
        run = experiment["runs"][method]
        for column, beta in enumerate(betas):
            letter = "defghijk"[row - 1]
            member = [i for i, info in enumerate(run["members"]) if info["beta"] == beta and info["seed"] == seed][0]
            accuracy = np.mean(run["mode_acc"][member])
            label = f"({letter}) {PANEL_NAMES.get(method, METHOD_NAMES[method])} β={beta:g}, acc {accuracy:.2f}"
            scatter(axes[row, column], member_points(run, beta, seed), world.centres, label)
            axes[row, column].axis("on")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def mismatch_figure(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    for index, row in enumerate(summary["mismatch"]):
        shifts = np.array(row["shifts"]) + 0.03 * (index - len(summary["mismatch"]) / 2)  # no hidden error bars
        means = [c["mean"] for c in row["cells"]]
        errors = [0.0 if not math.isfinite(c["half_width"]) else c["half_width"] for c in row["cells"]]
        style = {"linestyle": "--", "color": "black"} if row["name"] == "reference" else {}
        axis.errorbar(shifts, means, yerr=errors, marker="o", markersize=3, capsize=2, label=row["name"], **style)
    axis.set_xlabel("shift d of the preferred data away from the reference's modes")
    axis.set_ylabel("SWD to the preferred distribution")
    axis.legend(fontsize=7)
    axis.set_title("Reference mismatch: mean ± 95 % interval over seeds", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def sweep_figure(rounds, path):
    """Mode accuracy and SWD against β (log scale), mean ± 95 % interval, both methods, every round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colours = {"dpo": "#1f77b4", "ddspo": "#d62728"}
    for axis, (metric, label) in zip(axes, [("mode_acc", "mode accuracy ↑"), ("swd", "SWD to the true modes ↓")]):
        reference = rounds[0]["rows"][metric][0]
        axis.axhline(reference["mean"], color="black", linestyle="--", linewidth=1, label="reference")
        for number, round_ in enumerate(rounds, start=1):
            rows = {row["name"]: row for row in round_["rows"][metric]}
            betas = [gap["beta"] for gap in round_["gaps"]]
            for index, method in enumerate(("dpo", "ddspo")):
                cells = [rows[f"{METHOD_NAMES[method]}, β = {beta:g}"] for beta in betas]
                offset = 1.0 + 0.06 * (2 * (number - 1) + index - 1.5)  # side by side, no hidden error bars
                axis.errorbar(
                    [beta * offset for beta in betas],
                    [c["mean"] for c in cells],
                    yerr=[0.0 if not math.isfinite(c["half_width"]) else c["half_width"] for c in cells],
                    marker="o" if number == 1 else "s",
                    markersize=4,
                    capsize=2,
                    color=colours[method],
                    markerfacecolor=colours[method] if number == 1 else "white",
                    linestyle="-" if number == 1 else ":",
                    label=f"{METHOD_NAMES[method]}, round {number} ({len(round_['seeds'])} seeds)",
                )
        axis.set_xscale("log")
        axis.set_xlabel("β")
        axis.set_ylabel(label)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7)
    figure.suptitle("β sweep on the class modes: mean ± 95 % interval over seeds", fontsize=9)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
