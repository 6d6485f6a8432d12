#!/usr/bin/env python
"""Convert the authors' pickled MPS checkpoint into the state dict the `mps` reward reads (examples/rewards/mps.py
says why the reward reads state dicts only, and what the conversion unpickles)."""

import argparse
from pathlib import Path

from examples.rewards.base import RewardInputError
from examples.rewards.mps import MPS_CHECKPOINT_FILENAME, MPS_STATE_DICT_FILENAME, convert_checkpoint


def parse_args(argv=None):
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
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not Path(args.checkpoint).is_file():
        raise SystemExit(
            f"--checkpoint {args.checkpoint!r} does not exist; expected the authors' {MPS_CHECKPOINT_FILENAME}."
        )
    try:
        print(f"wrote {convert_checkpoint(args.checkpoint, args.output_dir)}")
    except RewardInputError as error:
        raise SystemExit(str(error)) from None


if __name__ == "__main__":
    main()
