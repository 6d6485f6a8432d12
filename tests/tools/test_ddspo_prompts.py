"""DDSPO's negative prompts (examples/ddspo/degrade_prompts.py): random word removal and the LLM rewrite's plumbing.

Most tests call the tool's parse_args and main in this process (kit.error_in_process for its refusals); one runs it
with plain `python`, as a user would, to see the one line a refusal prints. The LLM tests (slow) use a tiny GPT-2
whose weights make it a bigram model: its next word depends only on the last word, so its answers are known in
advance.
"""

import csv
import json
import types

import datasets
import numpy as np
import pytest
from kit import (
    bad_prompt_source,
    bigram_gpt2,
    error_in_process,
    finished_line,
    one_line_error,
    run_tool,
    tree_bytes,
    write_lines,
)

from examples.ddspo import degrade_prompts
from examples.ddspo.degrade_prompts import (
    DEFAULT_INSTRUCTION_TEMPLATE,
    LLM_TARGETS,
    listed_negatives,
    negatives_from_answer,
    rand_removal,
    removal_variants,
)
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


def degrade(args, capsys):
    """Run the tool in this process; its printed output as `.stdout`, as kit.finished_line reads it."""
    degrade_prompts.main(degrade_prompts.parse_args([str(arg) for arg in args]))
    return types.SimpleNamespace(stdout=capsys.readouterr().out)


# rand_removal, the pure function ------------------------------------------------------------------------------------


def test_rand_removal_keeps_between_30_and_60_percent_of_the_words_up_to_truncation():
    # int(ratio * n) lies in (ratio * n - 1, ratio * n], so the kept fraction lies in [1 - 0.7, 1 - 0.4 + 1 / n);
    # the clip to [1, n - 1] removed words keeps a two-word prompt at one word.
    for n_words in range(2, 41):
        prompt, rng = numbered_prompt(n_words), np.random.default_rng(n_words)
        for _ in range(200):
            kept_fraction = len(rand_removal(prompt, rng, 0.4, 0.7).split()) / n_words
            assert 0.3 <= kept_fraction <= 0.6 + 1 / n_words, (n_words, kept_fraction)


def test_rand_removal_truncates_the_removed_count_as_the_authors_release_does():
    # KU-MIIL/DDSPO data_prep/random_removal.py removes max(1, int(ratio * n)) words: of 5 words, 2 unless the ratio
    # reaches 0.6 (a third of [0.4, 0.7]), a mean share of 7/15 = 0.467; round() removed 3 from a ratio of 0.5 on
    # (two thirds), 0.533.
    five_words = numbered_prompt(5)
    assert len(rand_removal(five_words, np.random.default_rng(0), 0.59, 0.59).split()) == 3  # int(2.95) = 2 removed
    rng = np.random.default_rng(0)
    shares = [1 - len(rand_removal(five_words, rng, 0.4, 0.7).split()) / 5 for _ in range(20000)]
    assert np.mean(shares) == pytest.approx(7 / 15, abs=0.005)


def test_rand_removal_draws_the_ratio_uniformly_over_the_whole_range():
    rng = np.random.default_rng(0)
    kept_of_ten = {len(rand_removal(numbered_prompt(10), rng, 0.4, 0.7).split()) for _ in range(500)}
    assert kept_of_ten == {4, 5, 6}  # int(4.0 ... 7.0) = 4 to 6 of 10 words removed (7 only at exactly 0.7)
    removed_of_hundred = [100 - len(rand_removal(numbered_prompt(100), rng, 0.4, 0.7).split()) for _ in range(2000)]
    assert np.mean(removed_of_hundred) == pytest.approx(54.5, abs=1)  # the mean of int() over [40, 70]


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


def test_defaults_follow_the_authors_release_five_negatives_sampled_at_temperature_0_7(tmp_path):
    prompts = write_lines(tmp_path / "prompts.txt", LONG_PROMPTS)
    args = degrade_prompts.parse_args(["--prompts", str(prompts), "--output_dir", str(tmp_path / "out")])
    assert (args.variants_per_prompt, args.temperature, args.max_new_tokens) == (5, 0.7, 256)


def test_shipped_instruction_template_has_a_section_per_target_with_the_placeholder():
    templates = {target: read_instruction_template(DEFAULT_INSTRUCTION_TEMPLATE, target) for target in LLM_TARGETS}
    for target, template in templates.items():
        assert template.count("{prompt}") == 1, target
        assert "\n#" not in template and "[alignment]" not in template and "[aesthetics]" not in template, target
        assert template.splitlines()[-2] == "Prompt: {prompt}", target  # the prompt comes last, after the examples
    assert templates["alignment"] != templates["aesthetics"]


@pytest.mark.parametrize("target", LLM_TARGETS)
def test_every_example_answer_of_the_shipped_template_is_one_the_tool_reads(target):
    # the examples show the model the answer's format: each must be a list the tool keeps, of rewrites of its prompt
    template = read_instruction_template(DEFAULT_INSTRUCTION_TEMPLATE, target)
    examples = template.split("\n\nPrompt: ")[1:-1]
    assert len(examples) >= 3, target
    for example in examples:
        prompt, *_, answer_line = example.splitlines()
        listed = listed_negatives(answer_line)
        if listed == [] and target == "alignment":  # the release asks for an empty list when nothing can go
            continue
        kept, left_out = negatives_from_answer(answer_line, True, prompt, 5)
        assert kept == listed and left_out == [], example


def test_the_negatives_are_the_json_list_after_the_label():
    answer = (
        'Key words: ["red", "ball"]\nNegative prompts: ["a ball", "a red cube"]\nPrompt: a cat\nKey words: ["cat"]'
    )
    assert listed_negatives(answer) == ["a ball", "a red cube"]
    assert listed_negatives('**Negative prompts:** ["a ball"]') == ["a ball"]  # markdown emphasis
    assert listed_negatives("negative prompts: []") == [] and listed_negatives("Negative prompts:\n[]") == []
    for unreadable in (
        "a ball",
        'Negative prompts: ["a ball", "a red',
        'Negative prompts: {"a": 1}',
        "Negative prompts: [1]",
    ):
        assert listed_negatives(unreadable) is None, unreadable


def test_an_answer_keeps_its_first_k_distinct_negatives_and_says_why_it_left_out_the_others():
    answer = 'Negative prompts: ["a ball", "", "A red  BALL", "a  Ball", "\\"a cube\\"", "a cone", "a tree"]'
    kept, left_out = negatives_from_answer(answer, True, "a red ball", 3)
    assert kept == ["a ball", "a cube", "a cone"]
    assert [reason for reason, _ in left_out] == ["empty", "same_as_prompt", "repeated", "beyond_variants"]


@pytest.mark.parametrize(
    "answer, ended, reason",
    [
        ("", True, "unreadable"),
        ("a blue cube on a chair", True, "unreadable"),
        ('Negative prompts: ["a blue', False, "cut"),
        ("Negative prompts: []", True, "empty_list"),
    ],
    ids=["nothing", "no_list", "cut", "empty_list"],
)
def test_an_answer_without_negatives_is_one_counted_skip(answer, ended, reason):
    assert negatives_from_answer(answer, ended, "a red ball", 5) == ([], [(reason, answer)])


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


# rand_removal mode, end to end --------------------------------------------------------------------------------------


def test_text_file_gives_k_distinct_variants_per_prompt_and_reports_short_prompts(tmp_path, capsys):
    prompts = write_lines(tmp_path / "prompts.txt", [LONG_PROMPTS[0], "cat", "", *LONG_PROMPTS[1:], "dog"])
    result = degrade(["--prompts", prompts, "--variants_per_prompt", 3, "--output_dir", tmp_path / "out"], capsys)
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


def test_fewer_distinct_variants_than_asked_are_counted_not_fatal(tmp_path, capsys):
    prompts = write_lines(tmp_path / "prompts.txt", ["a b", LONG_PROMPTS[0]])
    result = degrade(["--prompts", prompts, "--variants_per_prompt", 3, "--output_dir", tmp_path / "out"], capsys)
    rows = read_rows(tmp_path / "out")
    assert sorted(row["negative_caption"] for row in rows if row["prompt_index"] == 0) == ["a", "b"]
    summary = finished_line(result, "degrade_prompts")
    assert "5 rows written for 2 prompts" in summary and "1 variants short" in summary


def test_negatives_of_a_prompt_depend_only_on_the_seed_and_its_index(tmp_path, capsys):
    prompts = write_lines(tmp_path / "prompts.txt", LONG_PROMPTS)
    degrade(["--prompts", prompts, "--output_dir", tmp_path / "all"], capsys)
    degrade(
        ["--prompts", prompts, "--max_prompts", 2, "--variants_per_prompt", 1, "--output_dir", tmp_path / "two"],
        capsys,
    )
    degrade(["--prompts", prompts, "--seed", 1, "--output_dir", tmp_path / "other_seed"], capsys)
    all_rows = read_rows(tmp_path / "all")
    assert len(all_rows) == 5 * len(LONG_PROMPTS)  # five negatives of each prompt by default, as the release writes
    first_variants = [row for row in all_rows if row["variant"] == 0]
    assert read_rows(tmp_path / "two") == first_variants[:2]
    assert read_rows(tmp_path / "other_seed") != all_rows


def test_prompt_column_of_a_csv_file_is_read(tmp_path, capsys):
    with open(tmp_path / "prompts.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "description"])
        writer.writerows([[index, prompt] for index, prompt in enumerate(LONG_PROMPTS)])
    args = ["--prompts", tmp_path / "prompts.csv", "--prompt_column", "description", "--variants_per_prompt", 1]
    degrade([*args, "--output_dir", tmp_path / "out"], capsys)
    assert [row["caption"] for row in read_rows(tmp_path / "out")] == LONG_PROMPTS


# refusals: one line, nothing written ---------------------------------------------------------------------------------

BAD_FLAGS = {
    "min_ratio_zero": (["--min_removal", 0], "strictly between 0 and 1"),
    "max_ratio_one": (["--max_removal", 1], "strictly between 0 and 1"),
    "min_ratio_nan": (["--min_removal", "nan"], "'nan' is not a finite number"),
    "temperature_inf": (["--temperature", "inf"], "'inf' is not a finite number"),
    "min_above_max": (["--min_removal", 0.8, "--max_removal", 0.5], "must not exceed --max_removal"),
    "no_variants": (["--variants_per_prompt", 0], "--variants_per_prompt must be at least 1"),
    "llm_without_model": (["--mode", "llm"], "--mode llm needs --llm_model_name_or_path"),
}


@pytest.mark.parametrize("flags, message", list(BAD_FLAGS.values()), ids=list(BAD_FLAGS))
def test_bad_flags_stop_with_one_error_line_and_no_output(tmp_path, capsys, flags, message):
    prompts = write_lines(tmp_path / "prompts.txt", LONG_PROMPTS)
    error = error_in_process(degrade_prompts, ["--prompts", prompts, "--output_dir", tmp_path / "out", *flags], capsys)
    assert message in error
    assert not (tmp_path / "out").exists()


BAD_PROMPT_FILES = {  # kit.bad_prompt_source's kinds: the one line says
    "missing": "no such file or folder",
    "binary": "could not be read as",
    "broken_parquet": "could not be read as",
    "folder": "could not be read as",
}


@pytest.mark.parametrize("kind, message", list(BAD_PROMPT_FILES.items()), ids=list(BAD_PROMPT_FILES))
def test_a_prompt_file_that_cannot_be_read_stops_with_one_line_naming_it(tmp_path, capsys, kind, message):
    prompts = bad_prompt_source(tmp_path, kind)
    error = error_in_process(degrade_prompts, ["--prompts", prompts, "--output_dir", tmp_path / "out"], capsys)
    assert message in error and str(prompts) in error
    assert not (tmp_path / "out" / "train.parquet").exists()


def test_an_output_folder_that_is_a_file_or_cannot_be_written_is_refused_before_any_work(tmp_path, capsys):
    prompts = write_lines(tmp_path / "prompts.txt", LONG_PROMPTS)
    a_file = write_lines(tmp_path / "a-file", ["not a folder"])
    error = error_in_process(degrade_prompts, ["--prompts", prompts, "--output_dir", a_file], capsys)
    assert "is a file" in error
    error = error_in_process(degrade_prompts, ["--prompts", prompts, "--output_dir", a_file / "out"], capsys)
    assert "cannot be written" in error
    assert a_file.read_text() == "not a folder\n"


def test_an_earlier_run_is_kept_byte_for_byte_unless_overwrite_replaces_it(tmp_path, capsys):
    prompts = write_lines(tmp_path / "prompts.txt", LONG_PROMPTS)
    degrade(["--prompts", prompts, "--output_dir", tmp_path / "out"], capsys)
    before = tree_bytes(tmp_path / "out")
    for extra in ([], ["--seed", 1]):
        error = error_in_process(
            degrade_prompts, ["--prompts", prompts, "--output_dir", tmp_path / "out", *extra], capsys
        )
        assert (
            "holds an earlier run's outputs (degrade_config.json, train.parquet)" in error and "--overwrite" in error
        )
        assert tree_bytes(tmp_path / "out") == before
    degrade(["--prompts", prompts, "--seed", 1, "--overwrite", "--output_dir", tmp_path / "out"], capsys)
    assert json.loads((tmp_path / "out" / "degrade_config.json").read_text())["seed"] == 1
    # an earlier output given as the prompts would be deleted before it is read
    args = ["--prompts", tmp_path / "out" / "train.parquet", "--prompt_column", "caption", "--overwrite"]
    error = error_in_process(degrade_prompts, [*args, "--output_dir", tmp_path / "out"], capsys)
    assert "is an output of --output_dir" in error


def test_template_without_the_placeholder_stops_before_the_model_loads(tmp_path, capsys):
    prompts = write_lines(tmp_path / "prompts.txt", LONG_PROMPTS)
    template = write_lines(tmp_path / "template.txt", ["[alignment]", "Rewrite the prompt badly."])
    args = ["--prompts", prompts, "--mode", "llm", "--llm_model_name_or_path", "no-such-org/no-such-model"]
    error = error_in_process(
        degrade_prompts, [*args, "--instruction_template", template, "--output_dir", tmp_path / "out"], capsys
    )
    assert "has no {prompt} placeholder" in error  # a model load would fail on the hub id instead


def test_the_readme_hub_command_offline_ends_with_one_line(tmp_path):
    # README: --prompts diffusiondb downloads DiffusionDB's metadata; offline (the tests' HF_HUB_OFFLINE=1) that fails
    args = ["--prompts", "diffusiondb", "--shuffle_prompts_seed", 0, "--max_prompts", 200000]
    result = run_tool(SCRIPT, [*args, "--output_dir", tmp_path / "out"], expect_success=False)
    error = one_line_error(result)
    assert error.startswith("error: --prompts 'diffusiondb' could not be read as prompts")
    assert "reachable from here" in error


# llm mode, end to end, on a bigram GPT-2 ----------------------------------------------------------------------------

VOCAB = ["<eos>", "<unk>", "a", "red", "ball", "blue", "cube", "green", "cone", "tiny", "->"]
VOCAB += ["Negative", "prompts:", '["small', 'cube",', '"a', 'cone"]', "NEGATIVE", "PROMPTS:", "[]"]
NEXT_WORD = {  # every other word: <eos>
    # after "ball" and after the chat template's "->": 'Negative prompts: ["small cube", "a green cone"]'
    "ball": "Negative",
    "->": "Negative",
    "Negative": "prompts:",
    "prompts:": '["small',
    '["small': 'cube",',
    'cube",': '"a',
    '"a': "green",
    "green": 'cone"]',
    "tiny": "NEGATIVE",  # after "tiny": "NEGATIVE PROMPTS: []"
    "NEGATIVE": "PROMPTS:",
    "PROMPTS:": "[]",
}
CHAT_TEMPLATE = "{{ messages[0]['content'] }}{% if add_generation_prompt %} ->{% endif %}"
LISTED = ["small cube", "a green cone"]


@pytest.fixture(scope="module")
def bigram_lm(tmp_path_factory):
    """A bigram GPT-2 (kit.bigram_gpt2, 64 positions) that answers 'Negative prompts: ["small cube", "a green cone"]'
    after "ball" or "->", an empty list after "tiny" and nothing after any other word. Saved twice: with a word-level
    tokenizer, and with the same tokenizer plus a chat template that appends " ->".
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
        "--temperature",
        0,
        "--device",
        "cpu",
        "--output_dir",
        tmp_path / "out",
        *extra,
    ]


@pytest.mark.slow
def test_llm_answers_list_the_negatives_and_answers_without_them_are_counted(tmp_path, bigram_lm, capsys):
    result = degrade(llm_args(tmp_path, bigram_lm["plain"], ["a red ball", "a blue cube", "a tiny"]), capsys)
    assert "first model input:\nRewrite this: a red ball\n" in result.stdout
    rows = read_rows(tmp_path / "out")
    assert rows == [
        {"caption": "a red ball", "negative_caption": negative, "prompt_index": 0, "variant": variant}
        for variant, negative in enumerate(LISTED)
    ]
    summary = finished_line(result, "degrade_prompts")
    assert "2 rows written for 1 prompts (of 3)" in summary
    assert "1 answers without a 'Negative prompts: [...]' list" in summary
    assert "1 answers with an empty list" in summary
    config = json.loads((tmp_path / "out" / "degrade_config.json").read_text())
    assert config["instruction"] == "Rewrite this: {prompt}"
    assert config["skipped"]["unreadable"] == 1 and config["skipped"]["empty_list"] == 1


@pytest.mark.slow
def test_llm_uses_the_chat_template_and_keeps_at_most_k_negatives_that_differ_from_the_prompt(
    tmp_path, bigram_lm, capsys
):
    args = llm_args(tmp_path, bigram_lm["chat"], ["a green cone", "a red ball"], "--variants_per_prompt", 1)
    result = degrade(args, capsys)
    assert "first model input:\nRewrite this: a green cone ->\n" in result.stdout
    assert [(row["prompt_index"], row["negative_caption"]) for row in read_rows(tmp_path / "out")] == [
        (0, "small cube"),
        (1, "small cube"),
    ]
    summary = finished_line(result, "degrade_prompts")
    assert "1 listed negatives equal to the prompt" in summary  # "a green cone" for "a green cone"
    assert "1 listed negatives beyond --variants_per_prompt" in summary  # "a green cone" for "a red ball"


@pytest.mark.slow
def test_llm_prompts_beyond_the_models_positions_are_counted_not_a_traceback(tmp_path, bigram_lm, capsys):
    too_long = " ".join(["a"] * 60) + " ball"  # 2 + 61 input tokens and 8 new ones: beyond the GPT-2's 64 positions
    result = degrade(llm_args(tmp_path, bigram_lm["plain"], ["a red ball", too_long]), capsys)
    assert [row["prompt_index"] for row in read_rows(tmp_path / "out")] == [0, 0]
    assert "2 rows written for 1 prompts (of 2)" in finished_line(result, "degrade_prompts")
    assert "1 prompts too long for the model's positions" in finished_line(result, "degrade_prompts")
    assert "1 prompts skipped: with --max_new_tokens 8 they need more than the model's 64 positions" in result.stdout


@pytest.mark.slow
def test_llm_that_degrades_no_prompt_is_one_error_line(tmp_path, bigram_lm, capsys):
    args = llm_args(tmp_path, bigram_lm["plain"], ["a blue cube", "a small cube"])
    assert "No negative prompt was made for any of the 2 prompts" in error_in_process(degrade_prompts, args, capsys)
    assert not (tmp_path / "out" / "train.parquet").exists()
