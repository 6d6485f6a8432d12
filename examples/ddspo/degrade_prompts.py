#!/usr/bin/env python
r"""Degraded ("negative") prompts c⁻ for DDSPO, without labels: random word removal or an LLM rewrite.

    python -m examples.ddspo.degrade_prompts --prompts diffusiondb --shuffle_prompts_seed 0 \
        --max_prompts 200000 --output_dir diffusiondb-negatives

writes `OUTPUT_DIR/train.parquet` (columns caption, negative_caption, prompt_index, variant; one row
per negative prompt, so `datasets.load_dataset(OUTPUT_DIR)` reads it) and `degrade_config.json`.

- `--variants_per_prompt K` (5, as the authors' release, KU-MIIL/DDSPO data_prep/): up to K distinct
  negative prompts per prompt, one row each; generate_pairs.py draws one of them per prompt for its pair,
  as the release's prepare_latents.py does. Fewer distinct ones than K is counted, not an error.
- `--mode rand_removal` (default; the paper's Rand-removal, §4.2, §4.4): each variant removes a
  fraction of the prompt's words drawn uniformly in [--min_removal, --max_removal] (paper: 40-70 %),
  int(fraction · words) of them as the release counts, at least one and never all, keeping the order of
  the rest. Prompts of fewer than 2 words cannot be degraded and are skipped (counted).
- `--mode llm` (the paper's LLaMA (TA) and LLaMA (AQ), §4.3, §4.4): a `transformers` causal LM
  answers the `[alignment]` or `[aesthetics]` section of --instruction_template filled with each prompt,
  sampled at --temperature (0.7, the release's). The answer lists the negative prompts on a line
  `Negative prompts: [...]` (a JSON list of strings), as the shipped template asks; the first K distinct
  ones that are neither empty nor the prompt are kept. Answers without such a list, empty lists, and
  the entries left out are counted by reason, as are prompts too long for the model's positions.
- Seeds: the removals of prompt i come from a generator seeded with (--seed, i), so they do not depend
  on the other prompts, on --max_prompts or on K (variant k is the same whatever K). LLM sampling is
  seeded once with --seed and repeats for the same --seed and --llm_batch_size.
- An --output_dir that holds an earlier run's train.parquet or degrade_config.json is refused before
  any work, unless --overwrite; so is one that is a file or cannot be written.
"""

import argparse
import json
import re
from pathlib import Path

from examples.lib.cli import HelpFormatter, InputError, finite_float, parse_checked_args, run_tool
from examples.lib.files import OVERWRITE_HELP, check_safetensors_in, prepare_output_folder, write_atomically
from examples.lib.lm import (
    PLACEHOLDER,
    check_llm_args,
    clean_rewrite,
    fill_template,
    llm_input_texts,
    normalized,
    read_instruction_template,
    rewritten_batches,
)
from examples.lib.prompts import PROMPT_SET_NAMES, prompt_settings, read_prompts
from train_ddspo import rand_removal  # the training script's not_paired mode draws the same way


MODES = ("rand_removal", "llm")
LLM_TARGETS = ("alignment", "aesthetics")  # the paper's TA and AQ rewrites (Table 3a)
DEFAULT_INSTRUCTION_TEMPLATE = Path(__file__).resolve().parent / "llm_instruction.txt"
OUTPUTS = ("train.parquet", "degrade_config.json")
# the label of the answer's list of negative prompts, in any case, with markdown emphasis around it tolerated
ANSWER_LIST = re.compile(r"negative prompts[*_ ]*:[*_ ]*", re.IGNORECASE)
TRIES_PER_VARIANT = 10  # rand_removal draws at most K * 10 times per prompt to find K distinct variants
SKIP_REASONS = {
    "rand_removal": {
        "too_short": "prompts too short to degrade (fewer than 2 words)",
        "not_distinct": "variants short of --variants_per_prompt (no new distinct variant in {tries} draws)",
    },
    "llm": {
        "too_long": "prompts too long for the model's positions (with --max_new_tokens)",
        "cut": "answers cut at --max_new_tokens before their list closed",
        "unreadable": "answers without a 'Negative prompts: [...]' list of strings",
        "empty_list": "answers with an empty list (nothing to degrade)",
        "empty": "listed negatives empty",
        "same_as_prompt": "listed negatives equal to the prompt",
        "repeated": "listed negatives repeating another of the same prompt",
        "beyond_variants": "listed negatives beyond --variants_per_prompt",
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


def listed_negatives(answer):
    """The JSON list of strings after the first 'Negative prompts:' of a model's answer, or None when there is none
    (no such line, a list cut short, or something else than strings)."""
    label = ANSWER_LIST.search(answer)
    if label is None:
        return None
    try:
        listed, _ = json.JSONDecoder().raw_decode(answer[label.end() :].lstrip())
    except json.JSONDecodeError:
        return None
    if not isinstance(listed, list) or not all(isinstance(item, str) for item in listed):
        return None
    return listed


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
        default=5,
        help="K: up to K distinct negative prompts per prompt, one row each (the authors' release: up to 5; "
        "generate_pairs.py draws one per prompt).",
    )
    degrading.add_argument(
        "--seed", type=int, default=0, help="Removals of prompt i use a generator seeded with (seed, i); LLM sampling."
    )

    removal = parser.add_argument_group("rand_removal")
    removal.add_argument(
        "--min_removal", type=finite_float, default=0.4, help="Smallest fraction of the words removed (paper: 40 %%)."
    )
    removal.add_argument(
        "--max_removal", type=finite_float, default=0.7, help="Largest fraction of the words removed (paper: 70 %%)."
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
        f"each with {PLACEHOLDER} where the prompt goes, asking for a line 'Negative prompts: [...]'.",
    )
    llm.add_argument(
        "--temperature",
        type=finite_float,
        default=0.7,
        help="Sampling temperature (the authors' release: 0.7); 0: greedy decoding.",
    )
    llm.add_argument(
        "--max_new_tokens",
        type=int,
        default=256,
        help="Longest answer generated per prompt (the release's); a list cut there is counted, not kept.",
    )
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
    output.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    return parse_checked_args(parser, check_args, input_args)


def check_args(args):
    """Refuse bad settings before any prompt set is read or model loaded; then make --output_dir ready."""
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
    prompts_path = Path(args.prompts).resolve()
    if any(prompts_path == (Path(args.output_dir) / name).resolve() for name in OUTPUTS):
        raise InputError(
            f"--prompts {args.prompts!r} is an output of --output_dir {args.output_dir!r}, which this run replaces; "
            "copy it elsewhere or choose another --output_dir."
        )
    if args.mode == "llm":
        if args.llm_model_name_or_path is None:
            raise InputError(
                "--mode llm needs --llm_model_name_or_path, a transformers causal LM (folder or hub id), "
                "e.g. meta-llama/Meta-Llama-3-8B-Instruct."
            )
        check_llm_args(args, args.llm_target)
        check_safetensors_in(args.llm_model_name_or_path, "--llm_model_name_or_path")
    prepare_output_folder(args.output_dir, OUTPUTS, args.overwrite)


def read_prompt_set(args):
    """--prompts as (prompts, counts); InputError, naming it, for anything that cannot be read as prompts."""
    try:
        return read_prompts(args)
    except InputError:
        raise
    except Exception as error:  # a named set's download (the hub offline), or anything examples/lib/prompts.py lets by
        raise InputError(
            f"--prompts {args.prompts!r} could not be read as prompts ({type(error).__name__}: "
            f"{' '.join(str(error).split())[:200]}); expected one of {PROMPT_SET_NAMES}, a UTF-8 .txt file (one "
            "prompt a line), a .csv/.tsv/.json/.jsonl/.parquet file, a dataset folder or a hub dataset id reachable "
            "from here."
        ) from error


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


def prompts_within_positions(args, prompts):
    """(indices of the prompts whose model input and longest answer fit in the model's positions, indices of those
    that do not). A prompt beyond them would stop generation with an IndexError; it is skipped and counted instead."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(args.llm_model_name_or_path, cache_dir=args.cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(args.llm_model_name_or_path, cache_dir=args.cache_dir)
    except (OSError, ValueError) as error:
        raise InputError(
            f"--llm_model_name_or_path {args.llm_model_name_or_path!r} could not be loaded as a causal LM with its "
            f"tokenizer ({' '.join(str(error).split())[:300]}); expected a folder or hub id of such a model."
        ) from error
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is None:  # no learned position table (nothing to overrun)
        return list(range(len(prompts))), []
    template = read_instruction_template(args.instruction_template, args.llm_target)
    texts, add_special_tokens = llm_input_texts(tokenizer, [fill_template(template, prompt) for prompt in prompts])
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]
    fit, too_long = [], []
    for prompt_index, length in enumerate(lengths):
        (fit if length + args.max_new_tokens <= positions else too_long).append(prompt_index)
    if too_long:
        longest = max(lengths[index] for index in too_long)
        print(
            f"{len(too_long)} prompts skipped: with --max_new_tokens {args.max_new_tokens} they need more than the "
            f"model's {positions} positions (the longest input: {longest} tokens), e.g. "
            f"{[prompts[index][:80] for index in too_long[:EXAMPLES_SHOWN]]}",
            flush=True,
        )
    return fit, too_long


def negatives_from_answer(answer, ended, prompt, count):
    """(the negative prompts kept from one answer, [(skip reason, text)] for what was left out): the first `count`
    distinct entries of its listed_negatives that are neither empty nor the prompt (up to case and spacing). An
    answer without a list is one skip, 'cut' when it did not `ended` by itself, and an empty list is one skip."""
    listed = listed_negatives(answer)
    if listed is None:
        return [], [("unreadable" if ended else "cut", answer)]
    if not listed:
        return [], [("empty_list", answer)]
    kept, left_out = [], []
    for item in listed:
        negative, reason = clean_rewrite(item, prompt)
        if reason is None and normalized(negative) in {normalized(other) for other in kept}:
            reason = "repeated"
        if reason is None and len(kept) == count:
            reason = "beyond_variants"
        if reason is None:
            kept.append(negative)
        else:
            left_out.append((reason, item))
    return kept, left_out


def degrade_by_llm(args, prompts):
    """{prompt_index: [negative prompts]} and the skip counts, from the list in one answer of the LLM per prompt."""
    skipped = dict.fromkeys(SKIP_REASONS["llm"], 0)
    variants, examples = {}, []
    fit, too_long = prompts_within_positions(args, prompts)
    skipped["too_long"] = len(too_long)
    if not fit:
        return variants, skipped
    for start, answers, finished in rewritten_batches(args, args.llm_target, [prompts[index] for index in fit]):
        for offset, (answer, ended) in enumerate(zip(answers, finished)):
            prompt_index = fit[start + offset]
            kept, left_out = negatives_from_answer(answer, ended, prompts[prompt_index], args.variants_per_prompt)
            if kept:
                variants[prompt_index] = kept
            for reason, text in left_out:
                skipped[reason] += 1
                if len(examples) < EXAMPLES_SHOWN and reason != "beyond_variants":
                    examples.append((reason, prompts[prompt_index], text))
    for reason, prompt, text in examples:
        print(f"skipped ({reason}): {prompt!r} -> {text!r}", flush=True)
    return variants, skipped


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
    table = pa.Table.from_pydict(rows, schema=schema)
    write_atomically(output_dir / "train.parquet", lambda path: pq.write_table(table, path))
    return len(rows["caption"])


def main(args):
    prompts, counts = read_prompt_set(args)

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
    config = json.dumps(settings, indent=2, ensure_ascii=False)
    write_atomically(output_dir / "degrade_config.json", lambda path: path.write_text(config, encoding="utf-8"))
    print(
        f"== degrade_prompts finished: {n_rows} rows written for {prompts_with_rows} prompts "
        f"(of {len(prompts)}) to {output_dir / 'train.parquet'}; skipped {skip_report}",
        flush=True,
    )


if __name__ == "__main__":
    run_tool(main, parse_args)
