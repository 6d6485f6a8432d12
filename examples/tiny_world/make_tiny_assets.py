#!/usr/bin/env python
"""Build a tiny SDXL pipeline and a tiny Pick-a-Pic-format preference dataset, from configs alone.

Nothing is downloaded: the models are randomly initialised from small configs and the CLIP
tokenizer is a byte-level vocabulary written on the spot. The result loads with the same code
paths as the real assets (`StableDiffusionXLPipeline.from_pretrained`, `datasets.load_dataset`),
so the training scripts, tests and demo exercise real loading code.

The dataset's preference is learnable and balanced: both images of a pair show a ball of the
colour the caption names; the raters of this toy world prefer the ball in the top half of the
picture (a property horizontal flips keep). Winners are vertical mirror images of losers in
distribution, so an untrained model prefers neither (held-out preference accuracy near 50 %);
a model that learns the preference does.

    python -m examples.tiny_world.make_tiny_assets --output_dir tiny
    # -> tiny/tiny-sdxl (pipeline), tiny/tiny-pickapic/{train,test}.parquet
    python -m examples.tiny_world.make_tiny_assets --output_dir tiny --family sd --skip_dataset
    # -> tiny/tiny-sd: an SD1.x-style pipeline (one text encoder; --family sd_v: v-prediction -> tiny/tiny-sd-v)
    python -m examples.tiny_world.make_tiny_assets --output_dir tiny --family sd3 --skip_dataset
    # -> tiny/tiny-sd3: a StableDiffusion3Pipeline (MMDiT, two CLIP encoders and T5, 16-channel VAE, shift 3.0)
    python -m examples.tiny_world.make_tiny_assets --output_dir tiny --family sana --skip_dataset
    # -> tiny/tiny-sana: a SanaPipeline (linear-attention DiT, Gemma2, 32-channel AutoencoderDC, flow DPM-Solver)

`--unet_preset bench` builds the efficiency benchmark's model instead: a ~24 M-parameter UNet
(64, 128, 256 channels, 2 layers per block) for 256 px images (32x32 latents), the same tiny text
encoders and VAE, and the dataset at 256 px. Its VAE fit is shorter (`--vae_fit_steps`): the
benchmark measures speed and memory, not whether a preference is learnt.

    python -m examples.tiny_world.make_tiny_assets --unet_preset bench --output_dir bench
    # -> bench/bench-sdxl, bench/bench-pickapic/{train,test}.parquet
"""

import argparse
import os

from examples.lib.cli import run_tool
from examples.lib.files import OVERWRITE_HELP, prepare_output_folder
from examples.tiny_world.world import (
    DEFAULT_RESOLUTION,
    DEFAULT_VAE_FIT_STEPS,
    UNET_PRESETS,
    build_tiny_pickapic,
    build_tiny_sana_pipeline,
    build_tiny_sd3_pipeline,
    build_tiny_sd_pipeline,
    build_tiny_sdxl_pipeline,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output_dir", type=str, default="tiny_assets", help="Where to write tiny-sdxl/ and tiny-pickapic/."
    )
    parser.add_argument(
        "--unet_preset",
        type=str,
        default="tiny",
        choices=sorted(UNET_PRESETS),
        help=(
            "tiny: ~1 M-parameter UNet for tests and the demo; "
            "bench: ~24 M-parameter UNet for examples/benchmark/benchmark_efficiency.py."
        ),
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Side of the square dataset images (the tiny VAE downsamples 8x). Default: 64 for tiny, 256 for bench.",
    )
    parser.add_argument(
        "--vae_fit_steps",
        type=int,
        default=None,
        help=(
            "Steps of the VAE's reconstruction fit. Default: 120 for tiny, 20 for bench "
            "(speed benchmarks need no learnable preference)."
        ),
    )
    parser.add_argument(
        "--num_train_pairs", type=int, default=384, help="Preference pairs in the train split (before ties)."
    )
    parser.add_argument("--num_test_pairs", type=int, default=96, help="Held-out preference pairs in the test split.")
    parser.add_argument(
        "--num_ties",
        type=int,
        default=4,
        help="Extra train rows with label_0 = 0.5 (ties), dropped by the training scripts.",
    )
    parser.add_argument(
        "--family",
        type=str,
        default="sdxl",
        choices=["sdxl", "sd", "sd_v", "sd3", "sana"],
        help="Pipeline to build: sdxl (two text encoders, micro-conditioning), sd (SD1.x-style, one text encoder, "
        "epsilon-prediction), sd_v (the same with v-prediction, as SD2.x 768), sd3 (flow matching: a 2-block "
        "MMDiT, two CLIP encoders and T5, a 16-channel VAE; tiny preset only) or sana (flow matching: a 2-block "
        "linear-attention DiT, Gemma2, a 32-channel AutoencoderDC that is not fitted; tiny preset only, "
        "no --vae_fit_steps, sides a multiple of 32).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed for the model weights and the images.")
    parser.add_argument("--skip_model", action="store_true", help="Only write the dataset.")
    parser.add_argument("--skip_dataset", action="store_true", help="Only write the pipeline.")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    args = parser.parse_args(argv)
    if args.family == "sana" and args.vae_fit_steps is not None and not args.skip_model:
        parser.error("--vae_fit_steps is not used by --family sana (its AutoencoderDC is not fitted); drop it.")
    if args.resolution is None:
        args.resolution = DEFAULT_RESOLUTION[args.unet_preset]
    if args.vae_fit_steps is None:
        args.vae_fit_steps = DEFAULT_VAE_FIT_STEPS[args.unet_preset]
    if args.resolution <= 0 or args.resolution % 8 != 0:
        parser.error(f"--resolution must be a positive multiple of 8 (the VAE downsamples 8x), got {args.resolution}.")
    for name in ("num_train_pairs", "num_test_pairs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}.")
    for name in ("num_ties", "vae_fit_steps"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} cannot be negative, got {getattr(args, name)}.")
    if args.family in ("sd3", "sana") and args.unet_preset != "tiny" and not args.skip_model:
        parser.error(
            f"--family {args.family} has only the tiny preset, got --unet_preset {args.unet_preset}; drop it."
        )
    if args.family == "sana" and args.resolution % 32 != 0 and not args.skip_model:
        parser.error(
            f"--family sana draws sides that are multiples of 32 (SanaPipeline), got --resolution {args.resolution}."
        )
    if args.skip_model and args.skip_dataset:
        parser.error("--skip_model and --skip_dataset together write nothing; give one of them at most.")
    return args


def output_names(args):
    """The folders this run writes in --output_dir: the pipeline's and the dataset's."""
    names = []
    if not args.skip_model:
        names.append(f"{args.unet_preset}-{'sdxl' if args.family == 'sdxl' else args.family.replace('_', '-')}")
    if not args.skip_dataset:
        names.append(f"{args.unet_preset}-pickapic")
    return names


def main(args=None):
    """Build what the flags ask for; `args` may also be a list of command-line arguments (or None: sys.argv)."""
    if args is None or isinstance(args, list):
        args = parse_args(args)
    prepare_output_folder(args.output_dir, output_names(args), args.overwrite)  # an InputError: one line
    preset = args.unet_preset
    if not args.skip_model:
        common = dict(seed=args.seed, resolution=args.resolution, unet_preset=preset, vae_fit_steps=args.vae_fit_steps)
        if args.family == "sdxl":
            path = os.path.join(args.output_dir, f"{preset}-sdxl")
            num_parameters, kind = build_tiny_sdxl_pipeline(path, **common), "SDXL"
        elif args.family == "sd3":
            path = os.path.join(args.output_dir, f"{preset}-sd3")
            num_parameters = build_tiny_sd3_pipeline(
                path, seed=args.seed, resolution=args.resolution, vae_fit_steps=args.vae_fit_steps
            )
            kind = "SD3 (flow matching)"
        elif args.family == "sana":
            path = os.path.join(args.output_dir, f"{preset}-sana")
            num_parameters = build_tiny_sana_pipeline(path, seed=args.seed, resolution=args.resolution)
            kind = "SANA (flow matching, linear attention)"
        else:
            path = os.path.join(args.output_dir, f"{preset}-{args.family.replace('_', '-')}")
            prediction_type = "v_prediction" if args.family == "sd_v" else "epsilon"
            num_parameters = build_tiny_sd_pipeline(path, prediction_type=prediction_type, **common)
            kind = f"SD1.x-style ({prediction_type})"
        print(
            f"{preset} {kind} pipeline: {path} ({'transformer' if args.family in ('sd3', 'sana') else 'UNet'}: "
            f"{num_parameters / 1e6:.2f} M parameters, "
            f"{args.resolution // 8}x{args.resolution // 8} latents)"
        )
    if not args.skip_dataset:
        path = build_tiny_pickapic(
            os.path.join(args.output_dir, f"{preset}-pickapic"),
            args.num_train_pairs,
            args.num_test_pairs,
            args.num_ties,
            args.seed,
            args.resolution,
        )
        print(
            f"{preset} Pick-a-Pic dataset: {path} ({args.resolution} px; train: {args.num_train_pairs} pairs + "
            f"{args.num_ties} ties, test: {args.num_test_pairs} pairs)"
        )


if __name__ == "__main__":
    run_tool(main, parse_args)
