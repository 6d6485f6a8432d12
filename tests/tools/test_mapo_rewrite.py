"""MaPO's context prompts (examples/mapo/context_prompts.py): the paper's instruction, the [[PROMPT]] tags.

The end-to-end tests run the tool with plain `python`, as a user would, on a tiny GPT-2 whose weights make it a
bigram model (kit.bigram_gpt2, as in tests/tools/test_ddspo_prompts.py): its next token depends only on the last
one, so its answers are known in advance. Its tokens carry SentencePiece's "▁" for a leading space, so that an opening
" [[PROMPT]]" and a closing "[[PROMPT]]" are two tokens and one answer can hold both.
"""

import json

import pytest
from kit import bigram_gpt2, finished_line, one_line_error, run_tool, write_lines

from examples.lib.lm import read_instruction_template
from examples.lib.prompts import read_prompt_set
from examples.mapo.context_prompts import (
    DEFAULT_INSTRUCTION_TEMPLATE,
    TEMPLATE_SECTION,
    extract_context_prompt,
)


SCRIPT = "examples/mapo/context_prompts.py"
PAPER_INSTRUCTION_END = (
    "Modify the given prompt to the appropriate format to describe the context of an image. Do not use the words "
    "that can specify the style (e.g., animation, 8k, oil painting), and exclude them if it is in the given prompt. "
    "Make sure that the prompt is one sentence long around 25 words. "
    'The modified prompt should start and end with the "[[PROMPT]]" tag.'
)


# the instruction and the answer, without a model ---------------------------------------------------------------------


def test_shipped_instruction_is_the_papers_with_one_prompt_placeholder():
    instruction = read_instruction_template(DEFAULT_INSTRUCTION_TEMPLATE, TEMPLATE_SECTION)
    assert instruction.startswith("You are a prompt engineer for the DALL-E-3 model, which is a diffusion-based")
    assert PAPER_INSTRUCTION_END in instruction
    assert "4. A fierce garden gnome warrior, clad in armor crafted from leaves and bark" in instruction
    assert instruction.count("{prompt}") == 1 and "#" not in instruction


def test_context_is_the_text_between_the_two_tags_on_one_line_without_quotes():
    answer = 'Sure! Here it is:\n[[PROMPT]] "A cat sleeps on a red sofa\n in a sunny room." [[PROMPT]]\nHope it helps.'
    assert extract_context_prompt(answer, "oil painting of a cat") == (
        "A cat sleeps on a red sofa in a sunny room.",
        None,
    )


@pytest.mark.parametrize("closing", ["[[/PROMPT]]", "[[ /prompt ]]", "[[PROMPT]]"])
def test_closing_tag_may_carry_a_slash_and_any_case(closing):
    assert extract_context_prompt(f"[[PROMPT]]A dog runs on a beach.{closing}", "a dog") == (
        "A dog runs on a beach.",
        None,
    )


def test_missing_closing_tag_takes_the_first_line_when_it_is_whole():
    answer = "[[PROMPT]] A dog runs on a beach.\nThe style words were removed."
    assert extract_context_prompt(answer, "a dog", finished=False) == ("A dog runs on a beach.", None)
    assert extract_context_prompt("[[PROMPT]] A dog runs on a beach.", "a dog", finished=True) == (
        "A dog runs on a beach.",
        None,
    )


def test_missing_closing_tag_on_an_answer_cut_off_by_the_token_limit_is_a_skip():
    assert extract_context_prompt("[[PROMPT]] A dog runs on a", "a dog", finished=False) == (None, "cut_off")


@pytest.mark.parametrize(
    "answer, reason",
    [
        ("A dog runs on a beach.", "no_tag"),
        ("PROMPT: A dog runs on a beach.", "no_tag"),
        ("[[PROMPT]][[PROMPT]]", "empty"),
        ('[[PROMPT]] " " [[PROMPT]]', "empty"),
        ("[[PROMPT]]", "empty"),
    ],
    ids=["untagged", "single_brackets", "empty_tags", "only_quotes", "lone_tag"],
)
def test_answer_without_a_tagged_prompt_is_a_skip(answer, reason):
    assert extract_context_prompt(answer, "a dog") == (None, reason)


def test_answer_equal_to_the_prompt_is_kept_as_the_prompt():
    assert extract_context_prompt("[[PROMPT]] A  DOG on a beach [[PROMPT]]", "a dog on a beach") == (
        "a dog on a beach",
        None,
    )


# end to end, on a bigram GPT-2 --------------------------------------------------------------------------------------

# After a prompt ending in "cat" the model answers ' [[PROMPT]] kitten napping[[PROMPT]]'; after "dog" an answer with
# no closing tag, ' [[prompt]] puppy'; after "tree" a lone tag; after "ball" no tag at all. Then it stops.
NEXT_TOKEN = {
    "▁cat": "▁[[PROMPT]]",
    "▁[[PROMPT]]": "▁kitten",
    "▁kitten": "▁napping",
    "▁napping": "[[PROMPT]]",
    "▁dog": "▁[[prompt]]",
    "▁[[prompt]]": "▁puppy",
    "▁tree": "[[PROMPT]]",
    "▁ball": "▁round",
    "▁round": "▁thing",
}  # every other token: <eos>
VOCAB = ["<eos>", "<unk>", "[[PROMPT]]", *sorted({*NEXT_TOKEN, *NEXT_TOKEN.values()} - {"[[PROMPT]]"}), "▁a"]
PROMPTS = ["an oil painting of a cat", "a ball", "8k photo of a dog", "a tree", "a cat"]
CONTEXTS = {0: "kitten napping", 2: "puppy", 4: "kitten napping"}


@pytest.fixture(scope="module")
def tagging_lm(tmp_path_factory):
    """A bigram GPT-2 (kit.bigram_gpt2) whose next token is NEXT_TOKEN[last token]."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    token_ids = {token: index for index, token in enumerate(VOCAB)}
    model = bigram_gpt2(VOCAB, NEXT_TOKEN)
    backend = Tokenizer(models.WordLevel(token_ids, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
    folder = tmp_path_factory.mktemp("bigram-tags")
    tokenizer.save_pretrained(folder)  # no chat template, no pad token: the plain-text path, eos as padding
    model.save_pretrained(folder)
    return folder


def rewrite_args(tmp_path, model_folder, prompts, *extra):
    return [
        "--prompts",
        write_lines(tmp_path / "prompts.txt", prompts),
        "--llm_model_name_or_path",
        model_folder,
        "--instruction_template",
        write_lines(tmp_path / "template.txt", ["Describe what it shows: {prompt}"]),
        "--max_new_tokens",
        8,
        "--llm_batch_size",
        2,
        "--device",
        "cpu",
        "--output_dir",
        tmp_path / "out",
        *extra,
    ]


def read_output(output_dir):
    import pyarrow.parquet as pq

    return pq.read_table(output_dir / "context_prompts.parquet").to_pylist()


@pytest.mark.slow
def test_rewrite_keeps_the_tagged_prompts_and_counts_the_skips(tmp_path, tagging_lm):
    result = run_tool(SCRIPT, rewrite_args(tmp_path, tagging_lm, PROMPTS))
    assert "first model input:\nDescribe what it shows: an oil painting of a cat\n" in result.stdout
    expected = [
        {"prompt": PROMPTS[index], "context": context, "prompt_index": index} for index, context in CONTEXTS.items()
    ]
    assert read_output(tmp_path / "out") == expected
    summary = finished_line(result, "context_prompts", last=True)
    assert "3 written (of 5 prompts; 0 equal to their prompt)" in summary
    assert (
        "skipped 2 (1 answers without a [[PROMPT]] tag, 1 answers with nothing inside the tags, 0 answers cut"
        in summary
    )
    assert "skipped (no_tag): 'a ball' -> 'round thing'" in result.stdout  # the examples of what was skipped
    config = json.loads((tmp_path / "out" / "context_config.json").read_text())
    assert config["skipped"] == {"no_tag": 1, "empty": 1, "cut_off": 0} and config["written"] == 3
    assert config["instruction"] == "Describe what it shows: {prompt}" and config["temperature"] == 0.0


@pytest.mark.slow
def test_output_is_read_by_build_pairs_prompt_reader_as_the_context_column(tmp_path, tagging_lm):
    run_tool(SCRIPT, rewrite_args(tmp_path, tagging_lm, PROMPTS))
    output = tmp_path / "out" / "context_prompts.parquet"
    assert read_prompt_set(str(output), column="context") == list(CONTEXTS.values())
    assert read_prompt_set(str(output)) == [PROMPTS[index] for index in CONTEXTS]  # `prompt`, the default column


@pytest.mark.slow
def test_answer_cut_off_before_its_closing_tag_is_skipped_and_counted(tmp_path, tagging_lm):
    result = run_tool(SCRIPT, rewrite_args(tmp_path, tagging_lm, ["a cat", "a dog"], "--max_new_tokens", 3))
    assert read_output(tmp_path / "out") == [{"prompt": "a dog", "context": "puppy", "prompt_index": 1}]
    summary = finished_line(result, "context_prompts", last=True)
    assert "1 answers cut off by --max_new_tokens before the closing tag" in summary


@pytest.mark.slow
def test_model_that_tags_no_prompt_is_one_error_line_and_writes_nothing(tmp_path, tagging_lm):
    result = run_tool(SCRIPT, rewrite_args(tmp_path, tagging_lm, ["a ball", "a tree"]), expect_success=False)
    assert "No context prompt was extracted from any of the 2 prompts" in one_line_error(result)
    assert not (tmp_path / "out" / "context_prompts.parquet").exists()


BAD_FLAGS = {
    "no_batch": (["--llm_batch_size", 0], "--llm_batch_size must be at least 1"),
    "negative_temperature": (["--temperature", -1], "--temperature must be 0 (greedy) or positive"),
    "missing_template": (["--instruction_template", "no-such-template.txt"], "no such file"),
}


@pytest.mark.parametrize("flags, message", list(BAD_FLAGS.values()), ids=list(BAD_FLAGS))
def test_bad_flags_stop_with_one_error_line_before_the_model_loads(tmp_path, flags, message):
    prompts = write_lines(tmp_path / "prompts.txt", PROMPTS)
    args = ["--prompts", prompts, "--llm_model_name_or_path", "no-such-org/no-such-model"]
    result = run_tool(SCRIPT, [*args, "--output_dir", tmp_path / "out", *flags], expect_success=False)
    assert message in one_line_error(result)  # a model load would fail on the hub id instead
    assert not (tmp_path / "out").exists()


def test_template_without_the_placeholder_stops_before_the_model_loads(tmp_path):
    prompts = write_lines(tmp_path / "prompts.txt", PROMPTS)
    template = write_lines(tmp_path / "template.txt", ["Describe the prompt."])
    args = ["--prompts", prompts, "--llm_model_name_or_path", "no-such-org/no-such-model"]
    result = run_tool(SCRIPT, [*args, "--instruction_template", template, "--output_dir", tmp_path / "out"], False)
    assert "has no {prompt} placeholder" in one_line_error(result)
