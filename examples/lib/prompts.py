"""Prompt sets: named benchmark sets, text/CSV/JSON/parquet files, and dataset columns.

Used by the tools that read prompts: eval/generate.py, ddspo/degrade_prompts.py, mapo/context_prompts.py and
mapo/build_pairs.py.

Named sets (downloaded on first use, then read from the hub cache):

    pickapic_v2_test   captions of the Pick-a-Pic v2 test split, duplicates removed (MaPO Table 1, Diffusion-DPO):
                       yuvalkirstain/pickapic_v2_no_images, split "test", column "caption" (no image download)
    partiprompts       PartiPrompts (1632 prompts; CaPO Tables 1-2): nateraw/parti-prompts, column "Prompt"
    hpdv2              the HPD v2 benchmark prompts (800 each of anime, concept-art, paintings, photo):
                       zhwang/HPDv2 benchmark/<style>.json, as `hpsv2.benchmark_prompts()` reads them;
                       hpdv2_anime, hpdv2_concept-art, hpdv2_paintings, hpdv2_photo for one style
    diffusiondb        the prompts of DiffusionDB 2M (poloclub/diffusiondb metadata.parquet); use it with
                       --shuffle_prompts_seed and --max_prompts to draw a sample (CaPO trains on such a sample)

Anything else is a path (.txt: one prompt a line; .csv/.tsv, .json/.jsonl, .parquet: a column; a
dataset folder) or a hub dataset id; name the column with `column` and the split with `split`.
"""

import csv
import json
import random
from functools import partial
from pathlib import Path

from examples.lib.cli import InputError


HPDV2_STYLES = ("anime", "concept-art", "paintings", "photo")
NAMED_DATASET_SETS = {
    "pickapic_v2_test": {"dataset": "yuvalkirstain/pickapic_v2_no_images", "split": "test", "column": "caption"},
    "partiprompts": {"dataset": "nateraw/parti-prompts", "split": "train", "column": "Prompt"},
}
PROMPT_SET_NAMES = sorted([*NAMED_DATASET_SETS, "hpdv2", *(f"hpdv2_{style}" for style in HPDV2_STYLES), "diffusiondb"])
DEFAULT_COLUMNS = ("prompt", "caption", "Prompt", "text")


# what a prompt file of each suffix should hold
PROMPT_FILE_KINDS = {
    ".txt": "UTF-8 text, one prompt a line",
    ".csv": "a UTF-8 CSV file with a header row",
    ".tsv": "a UTF-8 tab-separated file with a header row",
    ".json": "a JSON list of strings or of objects",
    ".jsonl": "JSON lines, one object a line",
    ".parquet": "a parquet file",
}


def looks_local(spec):
    """A path that cannot be a hub dataset id (`owner/name`): absolute, relative with ./ or ../, or deeper."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1


class PromptSetError(InputError):
    """A prompt set that cannot be read: the message says what was expected, what was found and what to do."""


def _pick_column(columns, column, source):
    if column is not None:
        if column not in columns:
            raise PromptSetError(
                f"{source} has no column {column!r}; its columns are {list(columns)}. "
                "Name the prompt column with --prompt_column."
            )
        return column
    for candidate in DEFAULT_COLUMNS:
        if candidate in columns:
            return candidate
    raise PromptSetError(
        f"{source} has none of the columns {list(DEFAULT_COLUMNS)}; its columns are {list(columns)}. "
        "Name the prompt column with --prompt_column."
    )


def _read_table_file(path, column):
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            rows = list(reader)
            name = _pick_column(reader.fieldnames or [], column, str(path))
        return [row[name] for row in rows]
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(rows, list) and all(isinstance(row, str) for row in rows):
            return rows  # a plain list of prompts, e.g. the HPD v2 benchmark files
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return table.column(_pick_column(table.column_names, column, str(path))).to_pylist()
    else:
        raise PromptSetError(
            f"Unsupported prompt file {str(path)!r}; expected .txt, .csv, .tsv, .json, .jsonl or .parquet."
        )
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise PromptSetError(f"{str(path)!r} should hold a list of strings or of objects with a prompt field.")
    name = _pick_column(rows[0].keys() if rows else [], column, str(path))
    return [row.get(name) for row in rows]


def _read_dataset(name, split, column, cache_dir):
    import datasets

    path = Path(name)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise PromptSetError(
                    f"{name!r} has no split {split!r}; it has {list(dataset)}. Choose one with --prompt_split."
                )
            dataset = dataset[split]
    else:
        try:
            dataset = datasets.load_dataset(name, split=split, cache_dir=cache_dir)
        except ValueError as error:  # unknown split
            raise PromptSetError(
                f"Could not read split {split!r} of {name!r}: {error} Choose the split with --prompt_split."
            ) from error
    return dataset[_pick_column(dataset.column_names, column, f"{name!r} (split {split!r})")]


def _read_hpdv2(styles, cache_dir):
    from huggingface_hub import hf_hub_download

    prompts = []
    for style in styles:
        file = hf_hub_download(
            "zhwang/HPDv2", f"{style}.json", subfolder="benchmark", repo_type="dataset", cache_dir=cache_dir
        )
        prompts.extend(json.loads(Path(file).read_text(encoding="utf-8")))
    return prompts


def read_prompt_set(spec, column=None, split=None, cache_dir=None):
    """All prompts of a prompt set, in order, before any cleaning (see `select_prompts`)."""
    if spec in NAMED_DATASET_SETS:
        named = NAMED_DATASET_SETS[spec]
        return _read_dataset(named["dataset"], split or named["split"], column or named["column"], cache_dir)
    if spec == "hpdv2":
        return _read_hpdv2(HPDV2_STYLES, cache_dir)
    if spec.startswith("hpdv2_") and spec.removeprefix("hpdv2_") in HPDV2_STYLES:
        return _read_hpdv2([spec.removeprefix("hpdv2_")], cache_dir)
    if spec == "diffusiondb":
        import datasets

        metadata = datasets.load_dataset(
            "parquet",
            data_files="hf://datasets/poloclub/diffusiondb/metadata.parquet",
            split="train",
            cache_dir=cache_dir,
        )
        return metadata["prompt"]
    path = Path(spec)
    if path.is_file():
        try:
            if path.suffix.lower() == ".txt":
                return path.read_text(encoding="utf-8").splitlines()
            return _read_table_file(path, column)
        except PromptSetError:
            raise
        except (UnicodeDecodeError, ValueError, OSError) as error:  # binary text, bad JSON, a broken parquet file
            raise PromptSetError(
                f"--prompts {spec!r} could not be read as a {path.suffix or 'suffix-less'} prompt file "
                f"({type(error).__name__}: {' '.join(str(error).split())[:200]}); expected "
                f"{PROMPT_FILE_KINDS.get(path.suffix.lower(), 'a .txt/.csv/.tsv/.json/.jsonl/.parquet file')}."
            ) from None
    if not path.exists() and (path.suffix.lower() in PROMPT_FILE_KINDS or looks_local(spec)):
        raise PromptSetError(f"--prompts {spec!r}: no such file or folder.")
    if path.is_dir() or "/" in spec:
        try:
            return _read_dataset(spec, split or "test", column, cache_dir)
        except PromptSetError:
            raise
        except Exception as error:  # datasets raises many kinds (no data files, unknown splits, hub offline)
            raise PromptSetError(
                f"--prompts {spec!r} could not be read as a dataset ({type(error).__name__}: "
                f"{' '.join(str(error).split())[:200]}); expected a prompt file, a dataset folder or a hub dataset id."
            ) from None
    raise PromptSetError(
        f"Unknown prompt set {spec!r}: expected one of {PROMPT_SET_NAMES}, a prompt file, a dataset folder "
        "or a hub dataset id."
    )


def select_prompts(prompts, keep_duplicates=False, shuffle_seed=None, max_prompts=None):
    """Drop empty entries and (unless asked not to) duplicates, optionally shuffle, then keep the first `max_prompts`.

    Returns (prompts, counts) where counts says how many entries each step removed, so nothing is lost silently.
    """
    counts = {"read": len(prompts), "empty": 0, "duplicates": 0, "beyond_max_prompts": 0}
    cleaned = []
    for prompt in prompts:
        if prompt is None or not str(prompt).strip():
            counts["empty"] += 1
            continue
        cleaned.append(str(prompt).strip())
    if not keep_duplicates:
        unique = list(dict.fromkeys(cleaned))
        counts["duplicates"] = len(cleaned) - len(unique)
        cleaned = unique
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(cleaned)
    if max_prompts is not None and len(cleaned) > max_prompts:
        counts["beyond_max_prompts"] = len(cleaned) - max_prompts
        cleaned = cleaned[:max_prompts]
    if not cleaned:
        raise PromptSetError(
            f"The prompt set is empty after cleaning ({counts}); expected at least one non-empty prompt."
        )
    return cleaned, counts


def load_prompts(
    spec, column=None, split=None, cache_dir=None, keep_duplicates=False, shuffle_seed=None, max_prompts=None
):
    """`read_prompt_set` then `select_prompts`: (prompts, counts)."""
    return select_prompts(read_prompt_set(spec, column, split, cache_dir), keep_duplicates, shuffle_seed, max_prompts)


def read_prompts(args, keep_duplicates=False, log=partial(print, flush=True)):
    """--prompts read with the prompt flags the tools name alike (--prompt_column, --prompt_split, --cache_dir,
    --shuffle_prompts_seed, --max_prompts): (prompts, counts), the counts logged in one line."""
    prompts, counts = load_prompts(
        args.prompts,
        column=args.prompt_column,
        split=args.prompt_split,
        cache_dir=args.cache_dir,
        keep_duplicates=keep_duplicates,
        shuffle_seed=args.shuffle_prompts_seed,
        max_prompts=args.max_prompts,
    )
    log(
        f"prompts: {len(prompts)} from {args.prompts} (read {counts['read']}; dropped {counts['empty']} empty, "
        f"{counts['duplicates']} duplicates, {counts['beyond_max_prompts']} beyond --max_prompts)"
    )
    return prompts, counts


def prompt_settings(args, counts):
    """What `read_prompts` read, for a tool's config file: the prompt flags and the counts."""
    return {
        "prompts": args.prompts,
        "prompt_column": args.prompt_column,
        "prompt_split": args.prompt_split,
        "max_prompts": args.max_prompts,
        "shuffle_prompts_seed": args.shuffle_prompts_seed,
        "prompt_counts": counts,
    }
