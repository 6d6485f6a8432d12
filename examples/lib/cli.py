"""What every command-line tool of examples/ shares: the error it stops with, its --help layout, how it exits.

Every tool under examples/ (eval, ddspo, mapo, capo, tiny_world, playground_2d) raises `InputError` for a bad
flag or bad data: `parse_checked_args` turns one found in the flags into argparse's usage error, and
`run_tool(main, parse_args)` one found later into a single line, never a traceback.
"""

import argparse
import math
import sys


class InputError(ValueError):
    """Bad flags or data: the message says what was expected, what was found and what to do."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default that is a value (not None or False) and keeps the description's example lines."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def finite_float(text):
    """argparse type of a value meant as a real number: 'nan', 'inf' and '-inf' are refused as usage errors."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def parse_checked_args(parser, check_args, input_args=None):
    """The flags, refused by `check_args` (an InputError) with argparse's usage error before anything loads."""
    args = parser.parse_args(input_args)
    try:
        check_args(args)
    except InputError as error:
        parser.error(str(error))
    return args


def run_tool(main, parse_args):
    """`main(parse_args())`; an InputError ends the tool with one line, `error: <message>`, and exit status 2."""
    try:
        main(parse_args())
    except InputError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
