"""A local language model that rewrites prompts: its instruction file, loading, inputs, decoding and answers.

Used by ddspo/degrade_prompts.py (--mode llm: degraded prompts) and mapo/context_prompts.py (context prompts);
mapo/judge_pairs.py reads its instruction file and places its vision-language judge as they place their model.
"""

import re
from pathlib import Path

from examples.lib.cli import InputError


PLACEHOLDER = "{prompt}"
QUOTES = "\"'`“”‘’«»"


def read_instruction_template(path, target):
    """The instruction for `target` from a template file: its `[target]` section, or the whole file if it has none.

    Lines starting with `#` are comments. Raises InputError when the section is missing or lacks `{prompt}`.
    """
    sections, current = {}, None
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            continue
        header = re.fullmatch(r"\[(\w+)\]\s*", line)
        if header:
            current = header.group(1)
            sections[current] = []
        else:
            sections.setdefault(current, []).append(line)
    named = [name for name in sections if name is not None]
    if named:
        if target not in sections:
            raise InputError(
                f"--instruction_template {str(path)!r} has the sections {named} but no [{target}]; "
                f"add a section [{target}] or choose --llm_target among them."
            )
        template = "\n".join(sections[target]).strip()
    else:
        template = "\n".join(sections.get(None, [])).strip()
    if PLACEHOLDER not in template:
        where = f"section [{target}]" if named else "file"
        raise InputError(
            f"The {where} of --instruction_template {str(path)!r} has no {PLACEHOLDER} placeholder; "
            f"put {PLACEHOLDER} where the original prompt goes."
        )
    return template


def check_llm_args(args, section):
    """Refuse a bad --llm_model_name_or_path, --instruction_template (or its `section`) or --temperature before the
    model loads."""
    model_path = Path(args.llm_model_name_or_path)
    if model_path.exists() and not (model_path / "config.json").is_file():
        raise InputError(
            f"--llm_model_name_or_path {args.llm_model_name_or_path!r} has no config.json; "
            "expected a folder saved with save_pretrained (model and tokenizer) or a hub id."
        )
    if not Path(args.instruction_template).is_file():
        raise InputError(f"--instruction_template {args.instruction_template!r}: no such file.")
    read_instruction_template(args.instruction_template, section)
    if not args.temperature >= 0 or args.temperature == float("inf"):  # also refuses nan
        raise InputError(f"--temperature must be 0 (greedy) or positive, got {args.temperature}.")


def fill_template(template, prompt):
    """The instruction for one prompt; `str.replace`, not `str.format`, so that other braces stay as typed."""
    return template.replace(PLACEHOLDER, prompt)


def normalized(text):
    """Text as CLIP's tokenizers see it: lowercased, spaces collapsed."""
    return " ".join(text.split()).casefold()


def clean_rewrite(generated, prompt):
    """(negative prompt, None) from a model's answer, or (None, skip reason) when it is empty or equals the prompt.

    The negative prompt is the first non-empty line, stripped of surrounding quotes; "equal" ignores case and spacing.
    """
    lines = [line.strip().strip(QUOTES).strip() for line in generated.splitlines()]
    rewrite = next((line for line in lines if line), "")
    if not rewrite:
        return None, "empty"
    if normalized(rewrite) == normalized(prompt):
        return None, "same_as_prompt"
    return rewrite, None


def llm_input_texts(tokenizer, instructions):
    """(texts, add_special_tokens): the instructions in the tokenizer's chat template if it has one, else as is."""
    if getattr(tokenizer, "chat_template", None):
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
            )
            for instruction in instructions
        ]
        return texts, False  # the chat template writes its own special tokens
    return list(instructions), True


def device_and_dtype(args):
    """--device (default: cuda if available) and --dtype (auto: bfloat16 on a GPU, float32 on the CPU)."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    return device, dtype


def load_llm(args):
    """(tokenizer, model) of --llm_model_name_or_path on --device in --dtype, the tokenizer padding on the left."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, dtype = device_and_dtype(args)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.llm_model_name_or_path, cache_dir=args.cache_dir)
        model = AutoModelForCausalLM.from_pretrained(
            args.llm_model_name_or_path, dtype=dtype, cache_dir=args.cache_dir
        )
    except (OSError, ValueError) as error:
        raise InputError(
            f"--llm_model_name_or_path {args.llm_model_name_or_path!r} could not be loaded as a causal LM with its "
            f"tokenizer ({' '.join(str(error).split())[:300]}); expected a folder or hub id of such a model."
        ) from error
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InputError(
                f"The tokenizer of {args.llm_model_name_or_path!r} has neither a pad nor an eos token; "
                "batched generation needs one of them."
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # a decoder-only model continues from the last position of every row
    return tokenizer, model.to(device).eval()


def decoding_settings(args, tokenizer, model, **extra):
    """generate()'s settings: greedy at --temperature 0, else plain temperature sampling; --max_new_tokens; `extra`
    (e.g. num_return_sequences)."""
    decoding = {
        "do_sample": args.temperature > 0,
        "max_new_tokens": args.max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
        **extra,
    }
    if args.temperature > 0:  # plain temperature sampling, whatever top-p or top-k the model's generation_config sets
        decoding.update(temperature=args.temperature, top_p=1.0, top_k=0)
    if model.generation_config.eos_token_id is None:
        decoding["eos_token_id"] = tokenizer.eos_token_id
    return decoding


def answer_ids(tokenizer, model, texts, add_special_tokens, decoding):
    """The tokens the model generates after each of `texts` (num_return_sequences rows per text, in a row), (B, T),
    on the CPU."""
    import torch

    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    encoded.pop("token_type_ids", None)  # some tokenizers return them; most causal LMs do not take them
    encoded = encoded.to(model.device)
    with torch.no_grad():
        generated = model.generate(**encoded, **decoding)
    return generated[:, encoded["input_ids"].shape[1] :].cpu()


def end_token_ids(tokenizer, model):
    """Every id that ends an answer: the generation config's end-of-sequence ids and the tokenizer's."""
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    return ids - {None}


def position_limit(model):
    """The most positions the model can attend to (its position embeddings), or None when its config names none."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


def check_input_lengths(tokenizer, model, texts, add_special_tokens, max_new_tokens, prompts):
    """InputError naming the first prompt whose model input plus --max_new_tokens outnumbers the model's positions
    (a small model would fail on it with an IndexError), before anything is generated."""
    limit = position_limit(model)
    if limit is None:
        return
    for index, text in enumerate(texts):
        length = len(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        if length + max_new_tokens > limit:
            raise InputError(
                f"Prompt {index} ({prompts[index][:60]!r}) makes a model input of {length} tokens, which with "
                f"--max_new_tokens {max_new_tokens} needs {length + max_new_tokens} positions; "
                f"{model.config.name_or_path or 'the model'} has {limit}. Shorten or drop the prompt, lower "
                "--max_new_tokens, or use a model with more positions."
            )


def rewritten_batches(args, section, prompts, **decoding):
    """The answers of --llm_model_name_or_path to the `section` of --instruction_template filled with each prompt,
    batch by batch of --llm_batch_size: yields (index of the batch's first prompt, answers as text, whether each
    answer ended by itself rather than at --max_new_tokens). `decoding`: more generate() settings, e.g.
    num_return_sequences (then the answers of one prompt come in a row). Prints the first model input; sampling is
    seeded with --seed."""
    import torch
    from tqdm.auto import tqdm

    template = read_instruction_template(args.instruction_template, section)
    tokenizer, model = load_llm(args)
    texts, add_special_tokens = llm_input_texts(tokenizer, [fill_template(template, prompt) for prompt in prompts])
    print(f"first model input:\n{texts[0]}", flush=True)
    check_input_lengths(tokenizer, model, texts, add_special_tokens, args.max_new_tokens, prompts)
    settings = decoding_settings(args, tokenizer, model, **decoding)
    end_ids = torch.tensor(sorted(end_token_ids(tokenizer, model)))
    torch.manual_seed(args.seed)
    for start in tqdm(range(0, len(prompts), args.llm_batch_size), desc="rewriting", unit="batch"):
        batch = texts[start : start + args.llm_batch_size]
        generated = answer_ids(tokenizer, model, batch, add_special_tokens, settings)
        finished = torch.isin(generated, end_ids).any(dim=1).tolist()
        yield start, tokenizer.batch_decode(generated, skip_special_tokens=True), finished
