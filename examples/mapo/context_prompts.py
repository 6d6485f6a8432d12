#!/usr/bin/env python
r"""Context prompts for MaPO's task pairs (paper Appendix E): a local instruction-tuned LM rewrites each prompt into
one ~25-word sentence about what the image shows, without style words, answered between "[[PROMPT]]" tags.

    python -m examples.mapo.context_prompts --prompts pickapic_v2_test --shuffle_prompts_seed 0 \
        --max_prompts 20000 --llm_model_name_or_path Qwen/Qwen2.5-7B-Instruct --output_dir pick-context

writes `OUTPUT_DIR/context_prompts.parquet` (columns prompt (the original), context, prompt_index) and
`context_config.json`; `build_pairs.py --prompts OUTPUT_DIR/context_prompts.parquet --prompt_column context` makes
the pairs from it.

- Prompts: any set examples/lib/prompts.py reads (a named set, a .txt/.csv/.tsv/.json/.jsonl/.parquet file, a
  dataset folder or hub id); empty and repeated prompts are dropped and counted when read, then
  --shuffle_prompts_seed and --max_prompts draw a sample (the paper used 20,000 Pick-a-Pic v2 prompts).
- Instruction: the paper's "Context Prompt Extraction Prompt" verbatim (context_instruction.txt, with `{prompt}`
  where the prompt goes), or --instruction_template; sent through the model's chat template when it has one.
- Answer: the paper asks for the prompt to start and end with the [[PROMPT]] tag. The context prompt is the text
  between the first two tags (a closing [[/PROMPT]] counts too; case and spaces inside the brackets are ignored),
  on one line, surrounding quotes stripped. Without a closing tag, the first line after the opening tag is taken if
  the line ends there or the model stopped by itself; if --max_new_tokens cut it off, the row is skipped. Answers
  with no tag, or nothing inside it, are skipped too; every skip is counted by reason and the first few printed. An
  answer equal to the prompt is kept (the prompt already was a context prompt) and counted.
- Decoding is greedy by default (--temperature 0); sampling is seeded with --seed and repeats for the same --seed
  and --llm_batch_size.
"""

import argparse
import json
import re
from pathlib import Path

from examples.lib.cli import HelpFormatter, InputError, finite_float, parse_checked_args, run_tool
from examples.lib.files import OVERWRITE_HELP, prepare_output_folder, write_atomically
from examples.lib.lm import check_llm_args, clean_rewrite, read_instruction_template, rewritten_batches
from examples.lib.prompts import PROMPT_SET_NAMES, prompt_settings, read_prompts


DEFAULT_INSTRUCTION_TEMPLATE = Path(__file__).resolve().parent / "context_instruction.txt"
TEMPLATE_SECTION = "context"  # a template file with sections must have a [context] one
TAG_PATTERN = re.compile(r"\[\[\s*/?\s*PROMPT\s*\]\]", re.IGNORECASE)  # [[PROMPT]], and [[/PROMPT]] to close
OUTPUT_NAME = "context_prompts.parquet"
CONFIG_NAME = "context_config.json"
SKIP_REASONS = {
    "no_tag": "answers without a [[PROMPT]] tag",
    "empty": "answers with nothing inside the tags",
    "cut_off": "answers cut off by --max_new_tokens before the closing tag",
}
EXAMPLES_SHOWN = 3


def extract_context_prompt(answer, prompt, finished=True):
    """(context prompt, None) from a model's answer, or (None, skip reason: a key of SKIP_REASONS).

    `finished`: the model ended its answer itself (an end-of-sequence token), rather than --max_new_tokens.
    An answer equal to the prompt (up to case and spacing) is returned as the prompt.
    """
    parts = TAG_PATTERN.split(answer, maxsplit=2)
    if len(parts) == 1:
        return None, "no_tag"
    if len(parts) == 3:  # opened and closed: the tagged text may span lines; it becomes one
        inside = " ".join(parts[1].split())
    else:  # no closing tag: its first line, if that line is whole
        inside = parts[1].lstrip()
        if not finished and "\n" not in inside:
            return None, "cut_off" if inside.strip() else "empty"
    context, reason = clean_rewrite(inside, prompt)  # the first non-empty line, without quotes
    if reason == "same_as_prompt":
        return prompt, None
    return context, reason


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    prompts = parser.add_argument_group("prompts")
    prompts.add_argument(
        "--prompts",
        type=str,
        required=True,
        help=f"Prompt set: one of {PROMPT_SET_NAMES}, a .txt (one prompt a line) / .csv / .tsv / .json / .jsonl / "
        ".parquet file, a dataset folder or a hub dataset id.",
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
        help="Keep the first N prompts (after removing empty and repeated ones, and shuffling; the paper: 20000).",
    )
    prompts.add_argument(
        "--shuffle_prompts_seed",
        type=int,
        default=None,
        help="Shuffle the prompts with this seed before --max_prompts.",
    )
    prompts.add_argument(
        "--cache_dir", type=str, default=None, help="Where downloaded datasets and models are cached."
    )

    llm = parser.add_argument_group("language model")
    llm.add_argument(
        "--llm_model_name_or_path",
        type=str,
        required=True,
        help="A transformers causal LM with its tokenizer (folder or hub id), e.g. Qwen/Qwen2.5-7B-Instruct (the "
        "paper used gpt-3.5-turbo-0125 through its API).",
    )
    llm.add_argument(
        "--instruction_template",
        type=str,
        default=str(DEFAULT_INSTRUCTION_TEMPLATE),
        help="Instruction file with {prompt} where the prompt goes (default: the paper's, Appendix E).",
    )
    llm.add_argument(
        "--temperature",
        type=finite_float,
        default=0.0,
        help="0: greedy decoding; above 0: plain temperature sampling.",
    )
    llm.add_argument("--seed", type=int, default=0, help="Seeds the sampling (--temperature above 0).")
    llm.add_argument(
        "--max_new_tokens",
        type=int,
        default=96,
        help="Longest answer per prompt (a 25-word sentence between two tags is about 45 tokens).",
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
    output.add_argument("--output_dir", type=str, required=True, help=f"Folder for {OUTPUT_NAME} and {CONFIG_NAME}.")
    output.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    return parse_checked_args(parser, check_args, input_args)


def check_args(args):
    """Refuse bad settings before any prompt set is read or model loaded."""
    for name in ("max_new_tokens", "llm_batch_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.max_prompts is not None and args.max_prompts < 1:
        raise InputError(f"--max_prompts must be at least 1, got {args.max_prompts}.")
    if args.seed < 0:
        raise InputError(f"--seed must be non-negative, got {args.seed}.")
    check_llm_args(args, TEMPLATE_SECTION)
    prepare_output_folder(args.output_dir, [OUTPUT_NAME, CONFIG_NAME], args.overwrite)


def rewrite_prompts(args, prompts):
    """{prompt_index: context prompt}, skip counts by reason, and the number of answers equal to their prompt."""
    contexts, skipped, unchanged, skip_examples = {}, dict.fromkeys(SKIP_REASONS, 0), 0, []
    for start, answers, finished in rewritten_batches(args, TEMPLATE_SECTION, prompts):
        for offset, answer in enumerate(answers):
            prompt_index = start + offset
            context, reason = extract_context_prompt(answer, prompts[prompt_index], finished[offset])
            if reason is not None:
                skipped[reason] += 1
                if len(skip_examples) < EXAMPLES_SHOWN:
                    skip_examples.append((reason, prompts[prompt_index], answer))
                continue
            contexts[prompt_index] = context
            unchanged += context == prompts[prompt_index]
    for reason, prompt, answer in skip_examples:
        print(f"skipped ({reason}): {prompt!r} -> {answer!r}", flush=True)
    return contexts, skipped, unchanged


def write_contexts(path, prompts, contexts):
    """The table build_pairs reads (`--prompt_column context`), written atomically; returns the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"prompt": [], "context": [], "prompt_index": []}
    for prompt_index, context in sorted(contexts.items()):
        rows["prompt"].append(prompts[prompt_index])
        rows["context"].append(context)
        rows["prompt_index"].append(prompt_index)
    schema = pa.schema([("prompt", pa.string()), ("context", pa.string()), ("prompt_index", pa.int64())])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda temporary: pq.write_table(pa.Table.from_pydict(rows, schema=schema), temporary))
    return len(rows["prompt"])


def main(args):
    prompts, counts = read_prompts(args)

    contexts, skipped, unchanged = rewrite_prompts(args, prompts)
    skip_report = ", ".join(f"{skipped[reason]} {label}" for reason, label in SKIP_REASONS.items())
    if not contexts:
        raise InputError(
            f"No context prompt was extracted from any of the {len(prompts)} prompts (skipped: {skip_report}); "
            "check the model (an instruction-tuned one) and --instruction_template, or raise --max_new_tokens."
        )

    output_path = Path(args.output_dir) / OUTPUT_NAME
    written = write_contexts(output_path, prompts, contexts)
    settings = {
        **prompt_settings(args, counts),
        "llm_model_name_or_path": args.llm_model_name_or_path,
        "instruction_template": args.instruction_template,
        "instruction": read_instruction_template(args.instruction_template, TEMPLATE_SECTION),
        "temperature": args.temperature,
        "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
        "llm_batch_size": args.llm_batch_size,
        "written": written,
        "unchanged": unchanged,
        "skipped": skipped,
    }
    text = json.dumps(settings, indent=2, ensure_ascii=False)
    write_atomically(Path(args.output_dir) / CONFIG_NAME, lambda path: path.write_text(text))
    print(
        f"== context_prompts finished: {written} written (of {len(prompts)} prompts; {unchanged} equal to their "
        f"prompt) to {output_path}; skipped {sum(skipped.values())} ({skip_report}); make pairs with "
        f"build_pairs.py --prompts {output_path} --prompt_column context",
        flush=True,
    )


if __name__ == "__main__":
    run_tool(main, parse_args)
