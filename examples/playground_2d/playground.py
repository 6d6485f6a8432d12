#!/usr/bin/env python
"""The preference objectives on a conditional 2-D mixture of Gaussians, on a CPU in about a minute.

A small MLP denoiser with a class embedding is trained as the reference on a noisy version of K Gaussian modes
(DDSPO Fig. 2b), then fine-tuned from it with the training scripts' own objectives:

- modes: N = 2 pairs per class, winner ~ ref(.|c), loser ~ ref(.|c-) from a neighbouring class; Diffusion-DPO vs
  DDSPO (DDSPO Fig. 2, §4.1);
- mismatch: winners from the true modes moved outward by a shift d; Diffusion-DPO vs MaPO vs SFT (MaPO §3.1);
- capo: a reward on the plane, N images per group from the reference, calibration and pair selection with
  examples/capo/select_pairs.py; CaPO vs DPO on the same pairs;
- beta_sweep (not run by default): modes over a low β grid, with more seeds where the methods' intervals overlap.

Writes results.md (the table), results.json (every seed's numbers), modes.png, mismatch.png and capo.png
(beta_sweep: beta_sweep.png and a beta_sweep_samples_round<n>.png per round):

    python -m examples.playground_2d.playground --output_dir docs/toy2d
    python -m examples.playground_2d.playground --experiments beta_sweep --output_dir docs/toy2d/sweep
"""

import argparse
import json
import time
from pathlib import Path

from examples.lib.cli import HelpFormatter, InputError, finite_float, parse_checked_args, run_tool
from examples.lib.files import OVERWRITE_HELP, prepare_output_folder


EXPERIMENTS = ("modes", "mismatch", "capo")  # the default run
SWEEP = "beta_sweep"
SWEEP_SETTINGS = ("sweep_betas", "sweep_more_seeds")
MIN_SEEDS = 5
OUTPUT_NAMES = ["results.md", "results.json", "modes.png", "mismatch.png", "capo.png"]  # --overwrite replaces them
OUTPUT_NAMES += ["beta_sweep.png", "beta_sweep_samples_round1.png", "beta_sweep_samples_round2.png"]


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    world = parser.add_argument_group("the world")
    world.add_argument("--num_classes", type=int, default=6, help="Classes, one Gaussian mode each, on a circle.")
    world.add_argument("--radius", type=finite_float, default=2.0, help="Radius of the circle of mode centres.")
    world.add_argument("--mode_std", type=finite_float, default=0.2, help="Standard deviation of a true mode.")
    world.add_argument(
        "--noisy_std", type=finite_float, default=0.45, help="Standard deviation of a mode in the noisy data."
    )
    world.add_argument(
        "--label_noise", type=finite_float, default=0.2, help="Share of the noisy data drawn from a neighbouring mode."
    )
    reference = parser.add_argument_group("the reference model")
    reference.add_argument("--hidden", type=int, default=64, help="Width of the MLP's three hidden layers.")
    reference.add_argument(
        "--reference_points_per_class", type=int, default=500, help="Noisy training points per class."
    )
    reference.add_argument("--reference_steps", type=int, default=2000, help="Adam steps (linear decay to 0).")
    reference.add_argument("--reference_batch_size", type=int, default=256, help="Points per step and seed.")
    reference.add_argument("--reference_learning_rate", type=finite_float, default=2e-3, help="Peak learning rate.")
    finetuning = parser.add_argument_group("fine-tuning: one setting shared by every method")
    finetuning.add_argument("--learning_rate", type=finite_float, default=1e-4, help="Adam, constant, every method.")
    finetuning.add_argument("--finetune_steps", type=int, default=500, help="Steps, every method.")
    finetuning.add_argument("--batch_size", type=int, default=64, help="Pairs per step and seed (drawn with repeats).")
    finetuning.add_argument(
        "--betas",
        type=finite_float,
        nargs="+",
        default=[100.0, 1000.0, 5000.0],
        help="β grid of Diffusion-DPO, DDSPO, CaPO and its DPO baseline (one meaning: the logit's scale).",
    )
    finetuning.add_argument(
        "--mapo_betas",
        type=finite_float,
        nargs="+",
        default=[8.0, 64.0],
        help="β grid of MaPO (an exponent: Table 3).",
    )
    experiments = parser.add_argument_group("experiments")
    experiments.add_argument(
        "--experiments",
        nargs="+",
        choices=[*EXPERIMENTS, SWEEP],
        default=list(EXPERIMENTS),
        help=f"Which to run; {SWEEP} (about 3 minutes) is not part of the default run.",
    )
    experiments.add_argument("--pairs_per_class", type=int, default=2, help="modes: pairs per class (DDSPO: N = 2).")
    experiments.add_argument(
        "--shifts",
        type=finite_float,
        nargs="+",
        default=[0.0, 1.0, 2.0, 4.0],
        help="mismatch: shifts d of the winners.",
    )
    experiments.add_argument("--mismatch_pairs_per_class", type=int, default=16, help="mismatch: pairs per class.")
    experiments.add_argument("--capo_groups_per_class", type=int, default=8, help="capo: groups (prompts) per class.")
    experiments.add_argument("--capo_images_per_group", type=int, default=8, help="capo: images N per group.")
    experiments.add_argument(
        "--sweep_betas",
        type=finite_float,
        nargs="+",
        default=[0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0],
        help="beta_sweep: β grid of Diffusion-DPO and DDSPO on the class modes.",
    )
    experiments.add_argument(
        "--sweep_more_seeds",
        type=int,
        default=20,
        help="beta_sweep: fresh seeds of the second round, at every β where the two methods' mode-accuracy intervals "
        "overlap after --num_seeds seeds (0: no second round).",
    )
    evaluation = parser.add_argument_group("evaluation and output")
    evaluation.add_argument("--num_seeds", type=int, default=5, help=f"Seeds per number (at least {MIN_SEEDS}).")
    evaluation.add_argument("--seed", type=int, default=0, help="First seed; the others follow it.")
    evaluation.add_argument("--samples_per_class", type=int, default=200, help="Generated points per class and seed.")
    evaluation.add_argument("--sampling_steps", type=int, default=50, help="DDPM sampling steps.")
    evaluation.add_argument("--output_dir", type=str, default="toy2d-output", help="Receives the table and figures.")
    evaluation.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    return parse_checked_args(parser, check_args, input_args)


def check_args(args):
    """Refuse settings that cannot run before torch is imported."""
    if args.num_classes < 2:
        raise InputError(f"--num_classes must be at least 2 (a class needs a neighbour), got {args.num_classes}.")
    if any(shift < 0 for shift in args.shifts):
        raise InputError(f"--shifts are distances and cannot be negative, got {args.shifts}.")
    if args.num_seeds < MIN_SEEDS:
        raise InputError(
            f"--num_seeds must be at least {MIN_SEEDS} for the reported intervals, got {args.num_seeds}; "
            "shorten a run with --finetune_steps or --reference_steps instead."
        )
    positive = ["hidden", "reference_points_per_class", "reference_steps", "reference_batch_size", "finetune_steps"]
    positive += ["batch_size", "pairs_per_class", "mismatch_pairs_per_class", "capo_groups_per_class"]
    positive += ["samples_per_class", "sampling_steps"]
    for name in positive:
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    if args.capo_images_per_group < 2:
        raise InputError(f"--capo_images_per_group must be at least 2 (a pair), got {args.capo_images_per_group}.")
    for name in ("radius", "mode_std", "noisy_std", "learning_rate", "reference_learning_rate"):
        if not getattr(args, name) > 0:
            raise InputError(f"--{name} must be positive, got {getattr(args, name)}.")
    if not 0 <= args.label_noise <= 1:
        raise InputError(f"--label_noise is a share in [0, 1], got {args.label_noise}.")
    if any(not beta > 0 for beta in args.betas + args.mapo_betas):
        raise InputError(f"--betas and --mapo_betas must be positive, got {args.betas} and {args.mapo_betas}.")
    if any(not beta > 0 for beta in args.sweep_betas):
        raise InputError(f"--sweep_betas must be positive, got {args.sweep_betas}.")
    if SWEEP in args.experiments and args.sweep_more_seeds != 0 and args.sweep_more_seeds <= args.num_seeds:
        raise InputError(
            f"--sweep_more_seeds must be more than --num_seeds ({args.num_seeds}) to narrow the intervals, or 0 for "
            f"no second round, got {args.sweep_more_seeds}."
        )
    prepare_output_folder(args.output_dir, OUTPUT_NAMES, args.overwrite)


def settings_of(args):
    left_out = ["output_dir", "overwrite"]
    if SWEEP not in args.experiments:
        left_out += SWEEP_SETTINGS  # a run without the sweep keeps the record it had before the sweep existed
    return {key: value for key, value in sorted(vars(args).items()) if key not in left_out}


def main(args):
    start = time.time()
    import torch

    from examples.playground_2d import (  # torch, diffusers and the training scripts: after the flags are checked
        report,
        toy,
    )

    torch.set_num_threads(1)  # the tensors are tiny: a second thread costs more than it brings, on 2 cores many times
    results = toy.run_all(args)
    settings = settings_of(args)
    summary = report.summarise(results)
    output_dir = Path(args.output_dir)
    if "modes" in results:
        title = "Diffusion-DPO vs DDSPO, N = %d pairs per class (seed %d)" % (args.pairs_per_class, args.seed)
        report.modes_figure(results, output_dir / "modes.png", title, "modes", ["dpo", "ddspo"])
    if "mismatch" in results:
        report.mismatch_figure(summary, output_dir / "mismatch.png")
    if "capo" in results:
        title = "CaPO vs DPO on the same calibrated pairs (seed %d)" % args.seed
        report.modes_figure(results, output_dir / "capo.png", title, "capo", ["capo", "capo_dpo"])
    if SWEEP in results:
        report.sweep_figure(summary[SWEEP], output_dir / "beta_sweep.png")
        for number, round_ in enumerate(results[SWEEP]["rounds"], start=1):
            title = f"β sweep, round {number}: Diffusion-DPO vs DDSPO, N = {args.pairs_per_class} pairs per class"
            title += f" (seed {round_['seeds'][0]})"
            in_round = {**results, **round_, SWEEP: round_}  # the round's seeds, reference, pairs and training data
            path = output_dir / f"beta_sweep_samples_round{number}.png"
            report.modes_figure(in_round, path, title, SWEEP, ["dpo", "ddspo"])
    (output_dir / "results.md").write_text(report.markdown(summary, settings), encoding="utf-8")
    wall_seconds = time.time() - start
    report.write_json(output_dir / "results.json", summary, settings, wall_seconds)
    print((output_dir / "results.md").read_text(encoding="utf-8"))
    print(f"Wrote {output_dir}/results.md, results.json and the figures in {wall_seconds:.0f} s.")
    return json.loads((output_dir / "results.json").read_text(encoding="utf-8"))


if __name__ == "__main__":
    run_tool(main, parse_args)
