"""DDSPO's negative prompts (examples/ddspo/degrade_prompts.py): random word removal and the LLM rewrite's plumbing.

The end-to-end tests run the tool with plain `python`, as a user would. The LLM tests (slow) use a tiny GPT-2 whose
weights make it a bigram model: its next word depends only on the last word, so its answers are known in advance.
"""

import csv
import json

import datasets
import numpy as np
import pytest
from kit import bigram_gpt2, finished_line, one_line_error, run_tool, write_lines

from examples.ddspo.degrade_prompts import DEFAULT_INSTRUCTION_TEMPLATE, LLM_TARGETS, rand_removal, removal_variants
from examples.lib.cli import InputError
from examples.lib.lm import clean_rewrite, fill_template, read_instruction_template


SCRIPT = "examples/ddspo/degrade_prompts.py"
LONG_PROMPTS = [
    "a photo of a red ball on a wooden table",
    "a small blue cube next to a green cone, studio lighting",
    "an oil painting of a lighthouse at dusk by the sea",
    "two cats sleeping on a sofa",
]


def numbered_prompt(n_words):
    return " ".join(f"w{index}" for index in range(n_words))


def read_rows(output_dir):
    return datasets.load_dataset(str(output_dir), split="train").to_list()


# rand_removal, the pure function ------------------------------------------------------------------------------------


def test_rand_removal_keeps_between_30_and_60_percent_of_the_words_up_to_rounding():
    # round(ratio * n) is within 0.5 of ratio * n, so the kept fraction lies within 0.5 / n of [1 - 0.7, 1 - 0.4];
    # the clip to [1, n - 1] removed words never binds for these ratios once n >= 2.
    for n_words in range(2, 41):
        prompt, rng = numbered_prompt(n_words), np.random.default_rng(n_words)
        for _ in range(200):
            kept_fraction = len(rand_removal(prompt, rng, 0.4, 0.7).split()) / n_words
            assert 0.3 - 0.5 / n_words <= kept_fraction <= 0.6 + 0.5 / n_words, (n_words, kept_fraction)


def test_rand_removal_draws_the_ratio_uniformly_over_the_whole_range():
    rng = np.random.default_rng(0)
    kept_of_ten = {len(rand_removal(numbered_prompt(10), rng, 0.4, 0.7).split()) for _ in range(500)}
    assert kept_of_ten == {3, 4, 5, 6}  # 4 to 7 of 10 words removed, each count drawn
    removed_of_hundred = [100 - len(rand_removal(numbered_prompt(100), rng, 0.4, 0.7).split()) for _ in range(2000)]
    assert np.mean(removed_of_hundred) == pytest.approx(55, abs=1)  # the middle of [40, 70]


def test_rand_removal_is_deterministic_under_a_seed():
    prompt = LONG_PROMPTS[0]
    rng_a, rng_b, rng_other = np.random.default_rng(7), np.random.default_rng(7), np.random.default_rng(8)
    sequence_a = [rand_removal(prompt, rng_a, 0.4, 0.7) for _ in range(20)]
    assert sequence_a == [rand_removal(prompt, rng_b, 0.4, 0.7) for _ in range(20)]
    assert sequence_a != [rand_removal(prompt, rng_other, 0.4, 0.7) for _ in range(20)]


@pytest.mark.parametrize("ratio", [0.01, 0.4, 0.7, 0.99], ids=lambda ratio: f"ratio{ratio}")
def test_rand_removal_removes_at_least_one_word_and_keeps_at_least_one(ratio):
    rng = np.random.default_rng(0)
    for n_words in range(2, 13):
        prompt = numbered_prompt(n_words)
        for _ in range(50):
            negative = rand_removal(prompt, rng, ratio, ratio)
            assert negative and negative != prompt
            assert 1 <= len(negative.split()) <= n_words - 1


def test_rand_removal_keeps_the_order_of_the_words_it_keeps():
    prompt, rng = numbered_prompt(30), np.random.default_rng(0)
    for _ in range(100):
        kept_indices = [int(word.removeprefix("w")) for word in rand_removal(prompt, rng, 0.4, 0.7).split()]
        assert kept_indices == sorted(set(kept_indices))


def test_rand_removal_refuses_a_one_word_prompt():
    with pytest.raises(ValueError, match="at least 2 words"):
        rand_removal("cat", np.random.default_rng(0), 0.4, 0.7)


def test_removal_variants_are_distinct_and_as_many_as_the_prompt_allows():
    variants = removal_variants(LONG_PROMPTS[0], np.random.default_rng(0), 5, 0.4, 0.7)
    assert len(set(variants)) == 5 and LONG_PROMPTS[0] not in variants
    assert sorted(removal_variants("a b", np.random.default_rng(0), 3, 0.4, 0.7)) == ["a", "b"]


# the LLM instruction and its answer ----------------------------------------------------------------------------------


def test_shipped_instruction_template_has_a_section_per_target_with_the_placeholder():
    templates = {target: read_instruction_template(DEFAULT_INSTRUCTION_TEMPLATE, target) for target in LLM_TARGETS}
    for target, template in templates.items():
        assert template.count("{prompt}") == 1, target
        assert "#" not in template and "[" not in template, target  # no comments, no next section
    assert templates["alignment"] != templates["aesthetics"]


def test_fill_template_puts_the_prompt_in_place_and_keeps_other_braces():
    filled = fill_template('Rewrite "{prompt}" as JSON {"prompt": ...}', "a {red} ball")
    assert filled == 'Rewrite "a {red} ball" as JSON {"prompt": ...}'


def test_template_file_without_sections_serves_every_target(tmp_path):
    path = write_lines(tmp_path / "one.txt", ["# a comment", "Make this worse: {prompt}", "Answer:"])
    for target in LLM_TARGETS:
        assert read_instruction_template(path, target) == "Make this worse: {prompt}\nAnswer:"


def test_template_section_without_the_placeholder_is_refused(tmp_path):
    path = write_lines(tmp_path / "t.txt", ["[alignment]", "Rewrite {prompt}", "[aesthetics]", "Rewrite it"])
    assert read_instruction_template(path, "alignment") == "Rewrite {prompt}"
    with pytest.raises(InputError, match=r"section \[aesthetics\].*no \{prompt\}"):
        read_instruction_template(path, "aesthetics")


def test_rewrite_is_the_first_non_empty_line_without_quotes():
    assert clean_rewrite('\n  "a blue cube on a chair"  \nThis rewrite drops the ball.', "a red ball") == (
        "a blue cube on a chair",
        None,
    )
    assert clean_rewrite("“a blurry snapshot of a ball”", "a red ball") == ("a blurry snapshot of a ball", None)


@pytest.mark.parametrize("answer", ["", "  \n\n ", '""', "\n ' ' \n"], ids=["nothing", "blank", "quotes", "quoted"])
def test_empty_answer_is_a_skip(answer):
    assert clean_rewrite(answer, "a red ball") == (None, "empty")


def test_answer_equal_to_the_prompt_up_to_case_and_spacing_is_a_skip():
    assert clean_rewrite('"A  Red ball"\nsecond line', "a red ball") == (None, "same_as_prompt")


# rand_removal mode, end to end --------------------------------------------------------------------------------------


def test_text_file_gives_k_distinct_variants_per_prompt_and_reports_short_prompts(tmp_path):
    prompts = write_lines(tmp_path / "prompts.txt", [LONG_PROMPTS[0], "cat", "", *LONG_PROMPTS[1:], "dog"])
    result = run_tool(SCRIPT, ["--prompts", prompts, "--variants_per_prompt", 3, "--output_dir", tmp_path / "out"])
    rows = read_rows(tmp_path / "out")
    assert list(rows[0]) == ["caption", "negative_caption", "prompt_index", "variant"]
    assert len(rows) == 3 * len(LONG_PROMPTS)
    loaded_prompts = [LONG_PROMPTS[0], "cat", *LONG_PROMPTS[1:], "dog"]  # the blank line is dropped when read
    for prompt_index in (0, 2, 3, 4):
        mine = [row for row in rows if row["prompt_index"] == prompt_index]
        assert [row["variant"] for row in mine] == [0, 1, 2]
        assert {row["caption"] for row in mine} == {loaded_prompts[prompt_index]}
        negatives = [row["negative_caption"] for row in mine]
        assert len(set(negatives)) == 3 and loaded_prompts[prompt_index] not in negatives
    summary = finished_line(result, "degrade_prompts")
    assert "12 rows written for 4 prompts (of 6)" in summary
    assert "2 prompts too short to degrade" in summary and "0 variants short" in summary
    assert "['cat', 'dog']" in result.stdout  # the examples of what was skipped
    config = json.loads((tmp_path / "out" / "degrade_config.json").read_text())
    assert config["mode"] == "rand_removal" and (config["min_removal"], config["max_removal"]) == (0.4, 0.7)
    assert config["skipped"] == {"too_short": 2, "not_distinct": 0} and config["rows"] == 12


def test_fewer_distinct_variants_than_asked_are_counted_not_fatal(tmp_path):
    prompts = write_lines(tmp_path / "prompts.txt", ["a b", LONG_PROMPTS[0]])
    result = run_tool(SCRIPT, ["--prompts", prompts, "--variants_per_prompt", 3, "--output_dir", tmp_path / "out"])
    rows = read_rows(tmp_path / "out")
    assert sorted(row["negative_caption"] for row in rows if row["prompt_index"] == 0) == ["a", "b"]
    summary = finished_line(result, "degrade_prompts")
    assert "5 rows written for 2 prompts" in summary and "1 variants short" in summary


def test_negatives_of_a_prompt_depend_only_on_the_seed_and_its_index(tmp_path):
    prompts = write_lines(tmp_path / "prompts.txt", LONG_PROMPTS)
    run_tool(SCRIPT, ["--prompts", prompts, "--variants_per_prompt", 2, "--output_dir", tmp_path / "all"])
    run_tool(SCRIPT, ["--prompts", prompts, "--max_prompts", 2, "--output_dir", tmp_path / "first_two"])
    run_tool(SCRIPT, ["--prompts", prompts, "--seed", 1, "--output_dir", tmp_path / "other_seed"])
    first_variants = [row for row in read_rows(tmp_path / "all") if row["variant"] == 0]
    assert read_rows(tmp_path / "first_two") == first_variants[:2]
    assert read_rows(tmp_path / "other_seed") != first_variants


def test_prompt_column_of_a_csv_file_is_read(tmp_path):
    with open(tmp_path / "prompts.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "description"])
        writer.writerows([[index, prompt] for index, prompt in enumerate(LONG_PROMPTS)])
    args = ["--prompts", tmp_path / "prompts.csv", "--prompt_column", "description", "--output_dir", tmp_path / "out"]
    run_tool(SCRIPT, args)
    assert [row["caption"] for row in read_rows(tmp_path / "out")] == LONG_PROMPTS


BAD_FLAGS = {
    "min_ratio_zero": (["--min_removal", 0], "strictly between 0 and 1"),
    "max_ratio_one": (["--max_removal", 1], "strictly between 0 and 1"),
    "min_above_max": (["--min_removal", 0.8, "--max_removal", 0.5], "must not exceed --max_removal"),
    "no_variants": (["--variants_per_prompt", 0], "--variants_per_prompt must be at least 1"),
    "llm_without_model": (["--mode", "llm"], "--mode llm needs --llm_model_name_or_path"),
    "greedy_with_k_2": (
        ["--mode", "llm", "--llm_model_name_or_path", "no-such-org/no-such-model", "--variants_per_prompt", 2],
        "needs --temperature above 0",
    ),
}


@pytest.mark.parametrize("flags, message", list(BAD_FLAGS.values()), ids=list(BAD_FLAGS))
def test_bad_flags_stop_with_one_error_line_and_no_output(tmp_path, flags, message):
    prompts = write_lines(tmp_path / "prompts.txt", LONG_PROMPTS)
    result = run_tool(SCRIPT, ["--prompts", prompts, "--output_dir", tmp_path / "out", *flags], expect_success=False)
    assert message in one_line_error(result)
    assert not (tmp_path / "out").exists()


def test_template_without_the_placeholder_stops_before_the_model_loads(tmp_path):
    prompts = write_lines(tmp_path / "prompts.txt", LONG_PROMPTS)
    template = write_lines(tmp_path / "template.txt", ["[alignment]", "Rewrite the prompt badly."])
    args = ["--prompts", prompts, "--mode", "llm", "--llm_model_name_or_path", "no-such-org/no-such-model"]
    result = run_tool(SCRIPT, [*args, "--instruction_template", template, "--output_dir", tmp_path / "out"], False)
    assert "has no {prompt} placeholder" in one_line_error(result)  # a model load would fail on the hub id instead


# llm mode, end to end, on a bigram GPT-2 ----------------------------------------------------------------------------

VOCAB = ["<eos>", "<unk>", "a", "red", "ball", "blue", "cube", "green", "cone", "small", "->"]
NEXT_WORD = {"ball": "small", "small": "cube", "->": "a", "a": "green", "green": "cone"}  # every other word: <eos>
CHAT_TEMPLATE = "{{ messages[0]['content'] }}{% if add_generation_prompt %} ->{% endif %}"


@pytest.fixture(scope="module")
def bigram_lm(tmp_path_factory):
    """A bigram GPT-2 (kit.bigram_gpt2) that answers "small cube" after "ball", nothing after "cube", "a green cone"
    after "->". Saved twice: with a word-level tokenizer, and with the same tokenizer plus a chat template that
    appends " ->".
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    word_ids = {word: index for index, word in enumerate(VOCAB)}
    model = bigram_gpt2(VOCAB, NEXT_WORD)
    backend = Tokenizer(models.WordLevel(word_ids, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folders = {}
    for name, chat_template in (("plain", None), ("chat", CHAT_TEMPLATE)):
        folders[name] = tmp_path_factory.mktemp(f"bigram-{name}")
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
        tokenizer.chat_template = chat_template  # no pad token: the tool falls back to eos
        tokenizer.save_pretrained(folders[name])
        model.save_pretrained(folders[name])
    return folders


def llm_args(tmp_path, model_folder, prompts, *extra):
    prompts_file = write_lines(tmp_path / "prompts.txt", prompts)
    template = write_lines(tmp_path / "template.txt", ["[alignment]", "Rewrite this: {prompt}"])
    return [
        "--prompts",
        prompts_file,
        "--mode",
        "llm",
        "--llm_model_name_or_path",
        model_folder,
        "--instruction_template",
        template,
        "--max_new_tokens",
        8,
        "--device",
        "cpu",
        "--output_dir",
        tmp_path / "out",
        *extra,
    ]


@pytest.mark.slow
def test_llm_continues_the_filled_template_and_counts_empty_rewrites(tmp_path, bigram_lm):
    result = run_tool(SCRIPT, llm_args(tmp_path, bigram_lm["plain"], ["a red ball", "a blue cube"]))
    assert "first model input:\nRewrite this: a red ball\n" in result.stdout
    rows = read_rows(tmp_path / "out")
    assert rows == [{"caption": "a red ball", "negative_caption": "small cube", "prompt_index": 0, "variant": 0}]
    summary = finished_line(result, "degrade_prompts")
    assert "1 rows written for 1 prompts (of 2)" in summary and "1 rewrites empty" in summary
    assert (
        json.loads((tmp_path / "out" / "degrade_config.json").read_text())["instruction"] == "Rewrite this: {prompt}"
    )


@pytest.mark.slow
def test_llm_uses_the_chat_template_and_skips_rewrites_equal_to_the_prompt(tmp_path, bigram_lm):
    result = run_tool(SCRIPT, llm_args(tmp_path, bigram_lm["chat"], ["a green cone", "a red ball"]))
    assert "first model input:\nRewrite this: a green cone ->\n" in result.stdout
    rows = read_rows(tmp_path / "out")
    assert rows == [{"caption": "a red ball", "negative_caption": "a green cone", "prompt_index": 1, "variant": 0}]
    assert "0 rewrites empty, 1 rewrites equal to the prompt" in finished_line(result, "degrade_prompts")


@pytest.mark.slow
def test_llm_sampled_variants_that_repeat_each_other_are_counted(tmp_path, bigram_lm):
    extra = ["--variants_per_prompt", 2, "--temperature", 1.0, "--llm_batch_size", 1]
    result = run_tool(SCRIPT, llm_args(tmp_path, bigram_lm["plain"], ["a red ball", "a blue cube"], *extra))
    assert [row["negative_caption"] for row in read_rows(tmp_path / "out")] == ["small cube"]
    summary = finished_line(result, "degrade_prompts")
    assert "2 rewrites empty" in summary and "1 rewrites repeating another variant" in summary


@pytest.mark.slow
def test_llm_that_degrades_no_prompt_is_one_error_line(tmp_path, bigram_lm):
    result = run_tool(SCRIPT, llm_args(tmp_path, bigram_lm["plain"], ["a blue cube", "a small cube"]), False)
    assert "No negative prompt was made for any of the 2 prompts" in one_line_error(result)
    assert not (tmp_path / "out").exists()
