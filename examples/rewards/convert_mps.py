#!/usr/bin/env python
"""Convert the authors' pickled MPS checkpoint into the state dict the `mps` reward reads (examples/rewards/mps.py
says why the reward reads state dicts only, and what the conversion unpickles)."""

import argparse
from pathlib import Path

from examples.lib.cli import InputError, parse_checked_args, run_tool
from examples.lib.files import OVERWRITE_HELP, prepare_output_folder


def parse_args(input_args=None):
    from examples.rewards.mps import MPS_CHECKPOINT_FILENAME, MPS_STATE_DICT_FILENAME

    parser = argparse.ArgumentParser(
        description=(
            "Convert the authors' pickled MPS checkpoint into the state dict the mps reward reads. Only tensors and "
            "inert stand-ins for the classes that hold them are unpickled; a file that names anything else is "
            "refused (see examples/rewards/mps.py's docstring).\n\n"
            "    python -m examples.rewards.convert_mps --checkpoint MPS_overall_checkpoint.pth \\\n"
            "        --output_dir models/mps"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint", type=str, required=True, help=f"The authors' {MPS_CHECKPOINT_FILENAME} (a pickled model)."
    )
    parser.add_argument(
        "--output_dir", type=str, required=True, help=f"Folder that receives {MPS_STATE_DICT_FILENAME}."
    )
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    return parse_checked_args(parser, check_args, input_args)


def check_args(args):
    from examples.rewards.mps import MPS_CHECKPOINT_FILENAME, MPS_STATE_DICT_FILENAME

    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise InputError(
            f"--checkpoint {args.checkpoint!r} {'is a folder' if checkpoint.is_dir() else 'does not exist'}; "
            f"expected the authors' {MPS_CHECKPOINT_FILENAME}."
        )
    if checkpoint.stat().st_size == 0:
        raise InputError(
            f"--checkpoint {args.checkpoint!r} is empty; expected the authors' {MPS_CHECKPOINT_FILENAME}."
        )
    args.created_output_dir = not Path(args.output_dir).exists()
    prepare_output_folder(args.output_dir, [MPS_STATE_DICT_FILENAME], args.overwrite)


def main(args):
    from examples.rewards.base import RewardInputError
    from examples.rewards.mps import convert_checkpoint

    try:
        print(f"wrote {convert_checkpoint(args.checkpoint, args.output_dir)}")
    except RewardInputError as error:
        if args.created_output_dir and not any(Path(args.output_dir).iterdir()):
            Path(args.output_dir).rmdir()  # a refused file leaves nothing behind
        raise InputError(str(error)) from None


if __name__ == "__main__":
    run_tool(main, parse_args)
