#!/usr/bin/env python
r"""What the tiny world's generated images show: where the balls sit, before and after alignment.

    python -m examples.tiny_world.report --runs demo_output/generated/base demo_output/generated/mapo \
        --grid demo_output/tiny_world_grid.png

Each run is an examples/eval/generate.py folder made with the same --seed and prompts, so image k of
prompt i starts from the same noise in every run. Every image is judged by the toy_ball reward
(examples/rewards/toy_ball.py): is there a ball, is it in the top half (the tiny raters' preference),
is it the caption's colour. Printed per run: the share of images with the ball in the top half and
the share whose colour matches the caption, each with a 95 % percentile-bootstrap interval over
images; for every run after the first, the change in top-half share against the first run with a
paired bootstrap interval (the same images resampled in both runs). The grid shows, for each prompt,
the first --images_per_row images of every run side by side, same seeds in the same column; the bar
under each image is white where the judge found the ball in the top half, grey for the bottom half,
black for no ball.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from examples.lib.cli import InputError
from examples.lib.runs import check_images, read_manifest


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--runs", type=str, nargs="+", required=True, help="generate.py folders; the first is the baseline."
    )
    parser.add_argument(
        "--names", type=str, nargs="+", default=None, help="Labels of the runs (default: folder names)."
    )
    parser.add_argument("--grid", type=str, default=None, help="Write the labelled before/after grid to this PNG.")
    parser.add_argument("--images_per_row", type=int, default=4, help="Images of each prompt per run in the grid.")
    parser.add_argument("--num_bootstrap", type=int, default=10000, help="Bootstrap resamples for the intervals.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the bootstrap resampling.")
    parser.add_argument(
        "--training_summary",
        type=str,
        default=None,
        help="A training run's training_summary.json: its held-out preference accuracy is printed with the rest.",
    )
    parser.add_argument("--output_json", type=str, default=None, help="Also write every number to this JSON file.")
    args = parser.parse_args(input_args)
    if args.names is not None and len(args.names) != len(args.runs):
        parser.error(f"--names must name every run: {len(args.runs)} runs, {len(args.names)} names.")
    if args.images_per_row <= 0 or args.num_bootstrap <= 0:
        parser.error("--images_per_row and --num_bootstrap must be positive.")
    for run in args.runs:
        if not (Path(run) / "manifest.jsonl").is_file():
            parser.error(f"No manifest.jsonl in {run!r}; expected a folder written by examples/eval/generate.py.")
    return args


def judge_run(run_dir, judge=None):
    """{(prompt_index, k): verdict} for every image of a generate.py folder (see ToyBall.judge), plus its prompt."""
    from PIL import Image

    from examples.rewards import load_reward_model

    judge = judge or load_reward_model("toy_ball", device="cpu")
    verdicts, rows = {}, read_manifest(Path(run_dir))
    check_images(Path(run_dir) / row["image"] for row in rows)
    for row in rows:
        with Image.open(Path(run_dir) / row["image"]) as image:
            verdict = judge.judge(image, row["prompt"])
        verdicts[(row["prompt_index"], row["k"])] = {**verdict, "prompt": row["prompt"], "image": row["image"]}
    return verdicts


def bootstrap_mean(values, num_bootstrap=10000, seed=0, confidence=0.95):
    """Mean of `values` (N,) or of paired differences, and its percentile-bootstrap interval over the N entries."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(num_bootstrap, len(values)))].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(values.mean()), float(low), float(high)


def summarize(verdicts_by_run, num_bootstrap=10000, seed=0):
    """{run: {found, top, color_match: (mean, low, high), n}} and, for runs after the first, top_change against it.

    Only images present in every run are compared (matched by prompt index and k, i.e. by seed)."""
    names = list(verdicts_by_run)
    shared = sorted(set.intersection(*(set(verdicts) for verdicts in verdicts_by_run.values())))
    if not shared:
        raise InputError(f"The runs {names} share no image (prompt index, k); generate them with the same prompts.")
    baseline_top = np.array([verdicts_by_run[names[0]][key]["top"] for key in shared], dtype=np.float64)
    summary = {}
    for name, verdicts in verdicts_by_run.items():
        result = {"n": len(shared), "dropped": len(verdicts) - len(shared)}
        for field in ("found", "top", "color_match"):
            values = [verdicts[key][field] for key in shared]
            result[field] = bootstrap_mean(values, num_bootstrap, seed)
        if name != names[0]:
            top = np.array([verdicts[key]["top"] for key in shared], dtype=np.float64)
            result["top_change"] = bootstrap_mean(top - baseline_top, num_bootstrap, seed)
        summary[name] = result
    return summary


def report_lines(summary):
    lines = []
    for name, result in summary.items():
        top, color, found = result["top"], result["color_match"], result["found"]
        line = (
            f"   {name}: ball in the top half {top[0]:.3f} [{top[1]:.3f}, {top[2]:.3f}], "
            f"colour matches caption {color[0]:.3f} [{color[1]:.3f}, {color[2]:.3f}], "
            f"ball found {found[0]:.3f} ({result['n']} images)"
        )
        if "top_change" in result:
            change = result["top_change"]
            line += (
                f"; top-half share {change[0]:+.3f} [{change[1]:+.3f}, {change[2]:+.3f}] against {next(iter(summary))}"
            )
        lines.append(line)
    return lines


def write_grid(verdicts_by_run, run_dirs, path, images_per_row=4, scale=2, summary=None):
    """Rows: prompts; for each run a block of its first images_per_row images (same seeds across runs), labelled
    with the run's name (and its top-half share, given the summary), with a legend of the bars at the bottom."""
    from PIL import Image, ImageDraw, ImageFont

    names = list(verdicts_by_run)
    shared = set.intersection(*(set(verdicts) for verdicts in verdicts_by_run.values()))
    prompts = {}
    for key in sorted(shared):
        prompts.setdefault(key[0], []).append(key)
    first = verdicts_by_run[names[0]]
    size = 64 * scale
    with Image.open(Path(run_dirs[0]) / first[min(shared)]["image"]) as probe:
        aspect = probe.height / probe.width
    tile_w, tile_h = size, int(size * aspect)
    gap, bar, label_w, header_h = 6, 6, 190, 28
    block_w = images_per_row * (tile_w + 2) + gap * 2
    width = label_w + len(names) * block_w
    legend_h = 26
    height = header_h + len(prompts) * (tile_h + bar + 4) + legend_h
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=15)
    for r, name in enumerate(names):
        label = name if summary is None else f"{name}: ball in the top half {summary[name]['top'][0]:.2f}"
        draw.text((label_w + r * block_w + gap, 6), label, fill=(0, 0, 0), font=font)
    legend = "bar under each image: white = ball in the top half (the raters' preference), grey = bottom half"
    legend += ", black = no ball; same column = same seed"
    draw.text((6, height - legend_h + 4), legend, fill=(60, 60, 60), font=font)
    for row, (prompt_index, keys) in enumerate(sorted(prompts.items())):
        top_y = header_h + row * (tile_h + bar + 4)
        draw.text((6, top_y + tile_h // 2 - 8), first[keys[0]]["prompt"], fill=(0, 0, 0), font=font)
        for r, (name, run_dir) in enumerate(zip(names, run_dirs)):
            for c, key in enumerate(keys[:images_per_row]):
                verdict = verdicts_by_run[name][key]
                x = label_w + r * block_w + gap + c * (tile_w + 2)
                with Image.open(Path(run_dir) / verdict["image"]) as image:
                    canvas.paste(image.convert("RGB").resize((tile_w, tile_h), Image.NEAREST), (x, top_y))
                shade = 235 if verdict["top"] else (130 if verdict["found"] else 0)
                draw.rectangle([x, top_y + tile_h + 1, x + tile_w - 1, top_y + tile_h + bar], fill=(shade,) * 3)
                if shade == 235:
                    draw.rectangle([x, top_y + tile_h + 1, x + tile_w - 1, top_y + tile_h + bar], outline=(0, 0, 0))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")


def main(args):
    from examples.rewards import load_reward_model

    names = args.names or [Path(run).name for run in args.runs]
    judge = load_reward_model("toy_ball", device="cpu")
    verdicts_by_run = {name: judge_run(run, judge) for name, run in zip(names, args.runs)}
    summary = summarize(verdicts_by_run, args.num_bootstrap, args.seed)
    print("== tiny world: generated images judged by toy_ball (95 % bootstrap intervals over images)")
    if args.training_summary:
        training = json.loads(Path(args.training_summary).read_text())
        if "heldout_preference_accuracy_before" in training:
            print(
                f"   held-out preference accuracy of the training run: "
                f"{training['heldout_preference_accuracy_before']:.3f} before -> "
                f"{training['heldout_preference_accuracy_after']:.3f} after"
            )
    print("\n".join(report_lines(summary)))
    if args.grid:
        write_grid(verdicts_by_run, args.runs, args.grid, args.images_per_row, summary=summary)
        print(f"   grid: {args.grid}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    try:
        main(parse_args())
    except InputError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
