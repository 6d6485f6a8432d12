#!/usr/bin/env python
r"""Degraded ("negative") prompts c⁻ for DDSPO, without labels: random word removal or an LLM rewrite.

    python -m examples.ddspo.degrade_prompts --prompts diffusiondb --shuffle_prompts_seed 0 \
        --max_prompts 200000 --output_dir diffusiondb-negatives

writes `OUTPUT_DIR/train.parquet` (columns caption, negative_caption, prompt_index, variant; one row
per negative prompt, so `datasets.load_dataset(OUTPUT_DIR)` reads it) and `degrade_config.json`.

- `--mode rand_removal` (default; the paper's Rand-removal, §4.2, §4.4): each variant removes a
  fraction of the prompt's words drawn uniformly in [--min_removal, --max_removal] (paper: 40-70 %),
  at least one word and never all, keeping the order of the rest. Prompts of fewer than 2 words
  cannot be degraded and are skipped (counted).
- `--mode llm` (the paper's LLaMA (TA) and LLaMA (AQ), §4.3, §4.4): a `transformers` causal LM
  rewrites each prompt following the `[alignment]` or `[aesthetics]` section of
  --instruction_template. The first non-empty line of its answer, quotes stripped, is c⁻; an empty
  answer, or one equal to the prompt, is skipped (counted).
- `--variants_per_prompt K`: up to K distinct negative prompts per prompt (in llm mode K > 1 needs
  --temperature > 0). Fewer distinct ones than K is counted, not an error.
- Seeds: the removals of prompt i come from a generator seeded with (--seed, i), so they do not depend
  on the other prompts, on --max_prompts or on K (variant k is the same whatever K). LLM sampling is
  seeded once with --seed and repeats for the same --seed and --llm_batch_size.
"""

import argparse
import json
from pathlib import Path

from examples.lib.cli import HelpFormatter, InputError, parse_checked_args, run_tool
from examples.lib.files import write_atomically
from examples.lib.lm import PLACEHOLDER, check_llm_args, clean_rewrite, read_instruction_template, rewritten_batches
from examples.lib.prompts import PROMPT_SET_NAMES, prompt_settings, read_prompts
from train_ddspo import rand_removal  # the training script's not_paired mode draws the same way


MODES = ("rand_removal", "llm")
LLM_TARGETS = ("alignment", "aesthetics")  # the paper's TA and AQ rewrites (Table 3a)
DEFAULT_INSTRUCTION_TEMPLATE = Path(__file__).resolve().parent / "llm_instruction.txt"
TRIES_PER_VARIANT = 10  # rand_removal draws at most K * 10 times per prompt to find K distinct variants
SKIP_REASONS = {
    "rand_removal": {
        "too_short": "prompts too short to degrade (fewer than 2 words)",
        "not_distinct": "variants short of --variants_per_prompt (no new distinct variant in {tries} draws)",
    },
    "llm": {
        "empty": "rewrites empty",
        "same_as_prompt": "rewrites equal to the prompt",
        "repeated": "rewrites repeating another variant of the same prompt",
    },
}
EXAMPLES_SHOWN = 3


def removal_variants(prompt, rng, count, min_ratio, max_ratio):
    """Up to `count` distinct `rand_removal` variants of `prompt`, in the order drawn (fewer if it has fewer)."""
    variants = []
    for _ in range(count * TRIES_PER_VARIANT):
        if len(variants) == count:
            break
        variant = rand_removal(prompt, rng, min_ratio, max_ratio)
        if variant not in variants:
            variants.append(variant)
    return variants


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    prompts = parser.add_argument_group("prompts")
    prompts.add_argument(
        "--prompts",
        type=str,
        required=True,
        help=f"Prompt set: one of {PROMPT_SET_NAMES}, a .txt (one prompt a line) / .csv / .tsv / .json / .jsonl / "
        ".parquet file, a dataset folder or a hub dataset id (DiffusionDB's `prompt` column is found as is).",
    )
    prompts.add_argument(
        "--prompt_column",
        type=str,
        default=None,
        help="Column holding the prompts (files and datasets; default: prompt, caption, Prompt or text).",
    )
    prompts.add_argument(
        "--prompt_split", type=str, default=None, help="Dataset split to read (default: the named set's, else test)."
    )
    prompts.add_argument(
        "--max_prompts",
        type=int,
        default=None,
        help="Keep the first N prompts (after removing empty and repeated ones, and shuffling).",
    )
    prompts.add_argument(
        "--shuffle_prompts_seed",
        type=int,
        default=None,
        help="Shuffle the prompts with this seed before --max_prompts (to draw a sample, e.g. of DiffusionDB).",
    )
    prompts.add_argument(
        "--cache_dir", type=str, default=None, help="Where downloaded datasets and models are cached."
    )

    degrading = parser.add_argument_group("degradation")
    degrading.add_argument(
        "--mode",
        type=str,
        default="rand_removal",
        choices=MODES,
        help="rand_removal: remove random words (the paper's best for text alignment); llm: rewrite with a model.",
    )
    degrading.add_argument(
        "--variants_per_prompt",
        type=int,
        default=1,
        help="K: distinct negative prompts per prompt, one row each.",
    )
    degrading.add_argument(
        "--seed", type=int, default=0, help="Removals of prompt i use a generator seeded with (seed, i); LLM sampling."
    )

    removal = parser.add_argument_group("rand_removal")
    removal.add_argument(
        "--min_removal", type=float, default=0.4, help="Smallest fraction of the words removed (paper: 40 %%)."
    )
    removal.add_argument(
        "--max_removal", type=float, default=0.7, help="Largest fraction of the words removed (paper: 70 %%)."
    )

    llm = parser.add_argument_group("llm")
    llm.add_argument(
        "--llm_model_name_or_path",
        type=str,
        default=None,
        help="A transformers causal LM with its tokenizer (folder or hub id), "
        "e.g. meta-llama/Meta-Llama-3-8B-Instruct (the paper uses LLaMA3-8B).",
    )
    llm.add_argument(
        "--llm_target",
        type=str,
        default="alignment",
        choices=LLM_TARGETS,
        help="What the rewrite degrades: text-image alignment (the paper's TA) or aesthetics (AQ, its best for "
        "aesthetic quality).",
    )
    llm.add_argument(
        "--instruction_template",
        type=str,
        default=str(DEFAULT_INSTRUCTION_TEMPLATE),
        help="Instruction file: an [alignment] and an [aesthetics] section (or one template for any target), "
        f"each with {PLACEHOLDER} where the prompt goes.",
    )
    llm.add_argument(
        "--temperature", type=float, default=0.0, help="0: greedy decoding; above 0: plain temperature sampling."
    )
    llm.add_argument("--max_new_tokens", type=int, default=96, help="Longest answer generated per prompt.")
    llm.add_argument("--llm_batch_size", type=int, default=16, help="Prompts per generate call.")
    llm.add_argument("--device", type=str, default=None, help="Device of the model (default: cuda if available).")
    llm.add_argument(
        "--dtype",
        type=str,
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="Weights dtype (auto: bfloat16 on cuda, float32 otherwise).",
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--output_dir", type=str, required=True, help="Folder for train.parquet and degrade_config.json."
    )
    return parse_checked_args(parser, check_args, input_args)


def check_args(args):
    """Refuse bad settings before any prompt set is read or model loaded."""
    if not (0 < args.min_removal < 1 and 0 < args.max_removal < 1):
        raise InputError(
            f"--min_removal and --max_removal must lie strictly between 0 and 1, got {args.min_removal} and "
            f"{args.max_removal} (the paper removes 0.4 to 0.7 of the words)."
        )
    if args.min_removal > args.max_removal:
        raise InputError(
            f"--min_removal ({args.min_removal}) must not exceed --max_removal ({args.max_removal}); swap them."
        )
    for name in ("variants_per_prompt", "max_new_tokens", "llm_batch_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.max_prompts is not None and args.max_prompts < 1:
        raise InputError(f"--max_prompts must be at least 1, got {args.max_prompts}.")
    if args.seed < 0:
        raise InputError(f"--seed must be non-negative (it seeds numpy generators), got {args.seed}.")
    if (Path(args.output_dir) / "train.parquet").exists():
        raise InputError(
            f"{Path(args.output_dir) / 'train.parquet'} already exists; choose another --output_dir or delete it."
        )
    if args.mode == "llm":
        if args.llm_model_name_or_path is None:
            raise InputError(
                "--mode llm needs --llm_model_name_or_path, a transformers causal LM (folder or hub id), "
                "e.g. meta-llama/Meta-Llama-3-8B-Instruct."
            )
        check_llm_args(args, args.llm_target)
        if args.variants_per_prompt > 1 and args.temperature == 0:
            raise InputError(
                f"--variants_per_prompt {args.variants_per_prompt} needs --temperature above 0: greedy decoding "
                "gives the same rewrite every time."
            )


def degrade_by_removal(args, prompts):
    """{prompt_index: [negative prompts]} and the skip counts, with examples of the prompts too short to degrade."""
    import numpy as np

    variants, skipped, too_short_examples = {}, {"too_short": 0, "not_distinct": 0}, []
    for prompt_index, prompt in enumerate(prompts):
        if len(prompt.split()) < 2:
            skipped["too_short"] += 1
            if len(too_short_examples) < EXAMPLES_SHOWN:
                too_short_examples.append(prompt)
            continue
        rng = np.random.default_rng((args.seed, prompt_index))
        variants[prompt_index] = removal_variants(
            prompt, rng, args.variants_per_prompt, args.min_removal, args.max_removal
        )
        skipped["not_distinct"] += args.variants_per_prompt - len(variants[prompt_index])
    if too_short_examples:
        print(f"prompts too short to degrade, e.g. {too_short_examples}", flush=True)
    return variants, skipped


def degrade_by_llm(args, prompts):
    """{prompt_index: [negative prompts]} and the skip counts, from K answers of the LLM per prompt."""
    variants, skipped, skip_examples = {}, {"empty": 0, "same_as_prompt": 0, "repeated": 0}, []
    batches = rewritten_batches(args, args.llm_target, prompts, num_return_sequences=args.variants_per_prompt)
    for start, answers, _ in batches:
        for offset, answer in enumerate(answers):
            prompt_index = start + offset // args.variants_per_prompt  # generate returns K answers per prompt in a row
            rewrite, reason = clean_rewrite(answer, prompts[prompt_index])
            kept = variants.setdefault(prompt_index, [])
            if reason is None and rewrite in kept:
                reason = "repeated"
            if reason is not None:
                skipped[reason] += 1
                if len(skip_examples) < EXAMPLES_SHOWN:
                    skip_examples.append((reason, prompts[prompt_index], answer))
                continue
            kept.append(rewrite)
    for reason, prompt, answer in skip_examples:
        print(f"skipped ({reason}): {prompt!r} -> {answer!r}", flush=True)
    return {index: kept for index, kept in variants.items() if kept}, skipped


def degrade_settings(args, prompt_counts):
    """What made the rows, for degrade_config.json."""
    settings = {
        **prompt_settings(args, prompt_counts),
        "mode": args.mode,
        "variants_per_prompt": args.variants_per_prompt,
        "seed": args.seed,
    }
    if args.mode == "rand_removal":
        settings.update({"min_removal": args.min_removal, "max_removal": args.max_removal})
    else:
        settings.update(
            {
                "llm_model_name_or_path": args.llm_model_name_or_path,
                "llm_target": args.llm_target,
                "instruction_template": args.instruction_template,
                "instruction": read_instruction_template(args.instruction_template, args.llm_target),
                "temperature": args.temperature,
                "max_new_tokens": args.max_new_tokens,
                "llm_batch_size": args.llm_batch_size,
            }
        )
    return settings


def write_rows(output_dir, prompts, variants):
    """train.parquet with one row per negative prompt, written atomically; returns the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"caption": [], "negative_caption": [], "prompt_index": [], "variant": []}
    for prompt_index, negatives in sorted(variants.items()):
        for variant, negative in enumerate(negatives):
            rows["caption"].append(prompts[prompt_index])
            rows["negative_caption"].append(negative)
            rows["prompt_index"].append(prompt_index)
            rows["variant"].append(variant)
    schema = pa.schema(
        [
            ("caption", pa.string()),
            ("negative_caption", pa.string()),
            ("prompt_index", pa.int64()),
            ("variant", pa.int64()),
        ]
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pydict(rows, schema=schema)
    write_atomically(output_dir / "train.parquet", lambda path: pq.write_table(table, path))
    return len(rows["caption"])


def main(args):
    prompts, counts = read_prompts(args)

    if args.mode == "rand_removal":
        variants, skipped = degrade_by_removal(args, prompts)
    else:
        variants, skipped = degrade_by_llm(args, prompts)
    reasons = SKIP_REASONS[args.mode]
    skip_report = ", ".join(
        f"{skipped[reason]} {label.format(tries=args.variants_per_prompt * TRIES_PER_VARIANT)}"
        for reason, label in reasons.items()
    )
    prompts_with_rows = sum(1 for negatives in variants.values() if negatives)
    if prompts_with_rows == 0:
        raise InputError(
            f"No negative prompt was made for any of the {len(prompts)} prompts (skipped: {skip_report}); "
            "check the prompt set, or the model and --instruction_template."
        )

    output_dir = Path(args.output_dir)
    n_rows = write_rows(output_dir, prompts, variants)
    settings = degrade_settings(args, counts)
    settings.update(rows=n_rows, prompts_with_rows=prompts_with_rows, skipped=skipped)
    (output_dir / "degrade_config.json").write_text(json.dumps(settings, indent=2, ensure_ascii=False))
    print(
        f"== degrade_prompts finished: {n_rows} rows written for {prompts_with_rows} prompts "
        f"(of {len(prompts)}) to {output_dir / 'train.parquet'}; skipped {skip_report}",
        flush=True,
    )


if __name__ == "__main__":
    run_tool(main, parse_args)
