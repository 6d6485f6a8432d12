#!/usr/bin/env python
r"""Score every image of one or more generate.py runs with reward models: one row per image.

    python -m examples.eval.score --run_dirs generated/sdxl generated/mapo \
        --reward_models aesthetic hpsv21 pickscore

reads each folder's manifest.jsonl and writes `scores.csv` beside it (columns prompt_index, k, seed,
prompt, image, then one column per reward model). The reward models are those registered in
examples/rewards/registry.py (names under --reward_models below), loaded from their published weights
unless `--reward_model_paths name=path` points to a local copy.

Resumable: scores already in scores.csv are kept and not recomputed, the file is rewritten after
every batch, and a reward model whose scores are all present is not even loaded. A missing image
file is an error (rerun generate.py, which makes only what is missing), or, with
--skip_missing_images, a counted skip that leaves its cells empty.

Which weights made each column is recorded beside the table, in `scores.csv.sources.json`:
{column: [{"hub": repository, "revision": commit} or {"path": local path, "sha256": content hash}]}.
A run asking for other weights than those recorded for a column that holds scores stops before
loading anything, as does a column with scores and no record (a table from before the record).
"""

import argparse
from functools import partial

from examples.lib.cli import InputError, parse_checked_args, run_tool
from examples.lib.runs import SOURCES_SUFFIX, check_run_dirs, describe_source, fill_column, open_runs, summary_lines


DEFAULT_REWARD_MODELS = ["aesthetic", "hpsv21", "pickscore"]  # MaPO Table 1


def parse_args(input_args=None):
    from examples.rewards import REWARD_MODELS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--run_dirs",
        type=str,
        nargs="+",
        required=True,
        help="Folders written by generate.py (each with manifest.jsonl).",
    )
    parser.add_argument(
        "--reward_models",
        type=str,
        nargs="+",
        default=DEFAULT_REWARD_MODELS,
        help=f"Reward models to score with: {', '.join(REWARD_MODELS)} "
        f"(default: {' '.join(DEFAULT_REWARD_MODELS)}, the metrics of MaPO Table 1).",
    )
    parser.add_argument(
        "--reward_model_paths",
        type=str,
        nargs="*",
        default=[],
        metavar="NAME=PATH",
        help="Local weights for some reward models, e.g. pickscore=/models/PickScore_v1 (default: published weights).",
    )
    parser.add_argument("--batch_size", type=int, default=16, help="Images per reward-model call.")
    parser.add_argument(
        "--device", type=str, default=None, help="Device of the reward models (default: cuda if available, else cpu)."
    )
    parser.add_argument(
        "--dtype", type=str, default="fp32", choices=["fp32", "fp16", "bf16"], help="Precision of the reward models."
    )
    parser.add_argument(
        "--scores_filename", type=str, default="scores.csv", help="Name of the score table written in each run folder."
    )
    parser.add_argument(
        "--skip_missing_images",
        action="store_true",
        help="Leave images listed in the manifest but missing on disk unscored (counted) instead of stopping.",
    )
    parser.add_argument(
        "--adopt_unrecorded_scores",
        action="store_true",
        help=f"Record the weights asked for now as the source of score columns that have none (tables written "
        f"before score.py kept {SOURCES_SUFFIX} files), instead of stopping. Only when you know they made them.",
    )
    return parse_checked_args(parser, check_args, input_args)


def parse_model_paths(pairs, reward_models):
    paths = {}
    for pair in pairs:
        name, separator, path = pair.partition("=")
        if not separator or not name or not path:
            raise InputError(f"--reward_model_paths entries look like NAME=PATH, got {pair!r}.")
        if name not in reward_models:
            raise InputError(f"--reward_model_paths names {name!r}, which is not in --reward_models {reward_models}.")
        paths[name] = path
    return paths


def check_args(args):
    """Refuse bad settings before any model is loaded."""
    from examples.rewards import RewardInputError, check_reward_model_names

    if args.batch_size <= 0:
        raise InputError(f"--batch_size must be positive, got {args.batch_size}.")
    if len(set(args.reward_models)) != len(args.reward_models):
        raise InputError(f"--reward_models lists a model twice: {args.reward_models}.")
    try:
        check_reward_model_names(args.reward_models)
    except RewardInputError as error:
        raise InputError(str(error)) from error
    args.reward_model_paths = parse_model_paths(args.reward_model_paths, args.reward_models)
    check_run_dirs(args.run_dirs)


def load_reward(name, args, source):
    """The reward model `name` (examples.rewards) with its --reward_model_paths weights; InputError when it cannot
    load."""
    from examples.rewards import RewardInputError, load_reward_model

    try:
        return load_reward_model(
            name,
            path=args.reward_model_paths.get(name),
            device=args.device,
            dtype=args.dtype,
            batch_size=args.batch_size,
        )
    except (OSError, RewardInputError) as error:  # e.g. a processor or tokenizer repository missing offline
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(
            f"Could not load {name} from {describe_source(source)}: {reason} "
            f"Expected complete weights; pass --reward_model_paths {name}=PATH to a local copy."
        ) from error


def main(args):
    import torch

    from examples.rewards import RewardInputError, reward_weights_source

    runs = open_runs(args)
    # Which weights each model would load (hashes, hub commits), before any is loaded: unreachable weights
    # stop here, and so do weights other than those that made the scores already in a table.
    sources = {}
    for name in args.reward_models:
        try:
            sources[name] = reward_weights_source(name, args.reward_model_paths.get(name))
        except RewardInputError as error:
            raise InputError(str(error)) from error
    for run in runs:
        for name in args.reward_models:
            run.check_source(name, sources[name], args.adopt_unrecorded_scores)
    for run in runs:
        if run.dropped_rows:
            print(
                f"{run.dir}: dropped {run.dropped_rows} rows of {run.scores_path.name} "
                "whose images are no longer in the manifest"
            )
        for name in args.reward_models:
            run.add_reward_column(name)
            run.sources[name] = sources[name]

    summary = {}
    for name in args.reward_models:
        summary[name] = fill_column(runs, name, partial(load_reward, name, args, sources[name]), args.batch_size)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the reward model is gone: room for the next

    for run in runs:
        run.save()
    lines = summary_lines("score", runs, summary)
    lines.extend(f"   scores: {run.scores_path} (weights: {run.sources_path.name})" for run in runs)
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    run_tool(main, parse_args)
