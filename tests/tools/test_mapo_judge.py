"""MaPO's VLM-as-a-judge filter (examples/mapo/judge_pairs.py), run with plain `python` as a user would.

The judge is a tiny random Qwen2-VL built here from configs (one layer each, a byte-level tokenizer that writes
digits one by one as Qwen2's does, a chat template in Qwen2-VL's form), saved with save_pretrained and loaded by the
tool through from_pretrained. Its ratings mean nothing; the tests check that they are read as specified. The pairs
folder is written as build_pairs.py writes one: two shards, five pairs, one of them with a chosen image that is not
an image.
"""

import io
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from kit import finished_line, one_line_error, png_bytes, read_csv, run_tool, tree_bytes
from PIL import Image

from examples.lib.cli import InputError
from examples.lib.lm import fill_template, read_instruction_template
from examples.lib.pair_shards import CONFIG_NAME
from examples.mapo.build_pairs import DATASET_CARD, PRESETS, SHARD_COLUMNS, with_prefix
from examples.mapo.judge_pairs import (
    DEFAULT_INSTRUCTION_TEMPLATE,
    QWEN2_VL_CONVERSATION,
    expected_rating,
    judge_texts,
    rating_probabilities,
    rating_token_ids,
    template_sections,
)


SCRIPT = "examples/mapo/judge_pairs.py"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
# Qwen2-VL's chat template for one user message of images and texts, without its default system turn
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SHARDS = {  # shard file: [(row_index, caption)]
    "shard-00000.parquet": [(0, "a cat on a sofa"), (1, "a lighthouse on a cliff at dusk"), (3, "a red ball")],
    "shard-00001.parquet": [(4, "two dogs playing in the snow"), (6, "a bowl of ramen")],
}
UNDECODABLE_ROW = 6
N_PAIRS = 5


def byte_level_tokenizer():
    """A BPE tokenizer without merges over GPT-2's 256 byte symbols, plus Qwen2-VL's special tokens: every character
    is a token, so "10" is "1" then "0" as in Qwen2's tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={symbol: index for index, symbol in enumerate(symbols)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    token_id = tokenizer.convert_tokens_to_ids
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        "initializer_range": 0.5,  # far from uniform next-token probabilities, so the scores differ
        "bos_token_id": token_id("<|endoftext|>"),
        "eos_token_id": token_id("<|im_end|>"),
        "pad_token_id": token_id("<|endoftext|>"),
    }
    vision_config = {"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2}
    vision_config["initializer_range"] = 0.5
    config = Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|endoftext|>"),  # no video here; the config needs an id
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    folder = tmp_path_factory.mktemp("tiny-qwen2-vl")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # 64 x 64 images become 56 x 56: 4 x 4 patches of 14 pixels, merged 2 x 2 into 4 image tokens
    Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56).save_pretrained(folder)
    return folder


def chosen_images():
    rng = np.random.default_rng(0)
    gradient = np.broadcast_to(np.linspace(0, 255, 64)[None, :, None], (64, 64, 3))
    return {
        0: png_bytes(np.full((64, 64, 3), (200, 30, 30))),
        1: png_bytes(np.full((64, 64, 3), 255)),
        3: png_bytes(rng.integers(0, 256, (64, 64, 3))),
        4: png_bytes(gradient),
        UNDECODABLE_ROW: b"\x89PNG\r\n\x1a\n but no image",
    }


def write_pairs_folder(folder, preset="cartoon"):
    """A folder as build_pairs.py writes one: shards in the Pick-a-Pic schema, pairs_config.json and a card."""
    chosen_prefix, rejected_prefix, _ = PRESETS[preset] if preset else ("Watercolour.", "Photo.", "none")
    (folder / "shards").mkdir(parents=True)
    images = chosen_images()
    for name, rows in SHARDS.items():
        columns = {column: [] for column in SHARD_COLUMNS}
        for row_index, caption in rows:
            columns["caption"].append(caption)
            columns["jpg_0"].append(images[row_index])
            columns["jpg_1"].append(png_bytes(np.zeros((64, 64, 3))))
            columns["label_0"].append(1.0)
            columns["chosen_prompt"].append(with_prefix(chosen_prefix, caption))
            columns["rejected_prompt"].append(with_prefix(rejected_prefix, caption))
            columns["seed"].append(1000 + row_index)
            columns["row_index"].append(row_index)
        schema = pa.schema([(column, getattr(pa, kind)()) for column, kind in SHARD_COLUMNS.items()])
        pq.write_table(pa.Table.from_pydict(columns, schema=schema), folder / "shards" / name)
    config = {"preset": preset, "chosen_prefix": chosen_prefix, "rejected_prefix": rejected_prefix}
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    card = DATASET_CARD.format(
        prompts="prompts.txt",
        chosen_prefix=repr(chosen_prefix),
        rejected_prefix=repr(rejected_prefix),
        pairs=N_PAIRS,
        shards=len(SHARDS),
        output_dir=folder,
    )
    (folder / "README.md").write_text(card)
    return folder


def judge_args(model, pairs_dir, output_dir, *extra):
    return [
        "--vlm_model_name_or_path",
        model,
        "--pairs_dir",
        pairs_dir,
        "--output_dir",
        output_dir,
        "--device",
        "cpu",
        *extra,
    ]


def scores_by_row(output_dir):
    """{row_index: judge_score} of the pairs that have a score."""
    return {
        int(row["row_index"]): float(row["judge_score"])
        for row in read_csv(output_dir / "scores.csv")
        if row["judge_score"]
    }


@pytest.fixture(scope="module")
def judged(tiny_judge, tmp_path_factory):
    """One run over the pairs folder, keeping every pair scored above 1 (so that the random judge keeps some)."""
    root = tmp_path_factory.mktemp("judged")
    pairs_dir = write_pairs_folder(root / "pairs")
    args = [*judge_args(tiny_judge, pairs_dir, root / "out"), "--threshold", 1, "--batch_size", 2]
    return {"pairs_dir": pairs_dir, "output_dir": root / "out", "result": run_tool(SCRIPT, args)}


# Reading a rating from the judge's next-token probabilities ---


def test_ten_written_as_one_then_zero_takes_its_share_of_the_ones_probability():
    vocabulary = 12  # tokens 0..9 are the digits "0".."9", 10 and 11 other text
    rating_tokens = {rating: [rating] for rating in range(1, 10)} | {10: [1, 0]}
    first = torch.full((1, vocabulary), -float("inf"))
    first[0, [1, 5, 11]] = torch.log(torch.tensor([0.4, 0.4, 0.2]))  # "1" 0.4, "5" 0.4, other text 0.2
    after_one = torch.full((1, vocabulary), -float("inf"))
    after_one[0, [0, 3, 10]] = torch.log(torch.tensor([0.5, 0.25, 0.25]))  # "10" 0.5, "13" 0.25, "1." 0.25
    probabilities = rating_probabilities(first, after_one, rating_tokens)
    # masses: P(1) = 0.4 * 0.25, P(10) = 0.4 * 0.5, P(5) = 0.4, renormalized over 0.7
    expected = torch.zeros(1, 10, dtype=torch.float64)
    expected[0, [0, 4, 9]] = torch.tensor([0.1, 0.4, 0.2], dtype=torch.float64) / 0.7
    torch.testing.assert_close(probabilities, expected)
    torch.testing.assert_close(
        expected_rating(probabilities), torch.tensor([(0.1 + 2.0 + 2.0) / 0.7], dtype=torch.float64)
    )


def test_ten_as_one_token_is_read_from_the_first_token_alone():
    rating_tokens = {rating: [rating] for rating in range(1, 11)}
    first = torch.log(torch.tensor([[0.0, 0.5, 0, 0, 0, 0, 0, 0, 0, 0, 0.5, 0.0]]))
    probabilities = rating_probabilities(first, None, rating_tokens)
    assert probabilities[0, 0] == probabilities[0, 9] == 0.5 and expected_rating(probabilities).item() == 5.5


def test_rating_tokens_of_a_digit_by_digit_tokenizer_and_a_tokenizer_that_cannot_write_ratings():
    tokenizer = byte_level_tokenizer()
    digit = tokenizer.convert_tokens_to_ids
    assert rating_token_ids(tokenizer, "RATING: ") == {rating: [digit(str(rating))] for rating in range(1, 10)} | {
        10: [digit("1"), digit("0")]
    }
    with pytest.raises(InputError, match="writes the ratings after --answer_prefix"):
        rating_token_ids(word_level_tokenizer_without_digits(), "RATING: ")


def word_level_tokenizer_without_digits():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "RATING:": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")  # every rating is <unk>


def test_without_a_chat_template_the_judge_text_is_qwen2_vls_conversation():
    texts = judge_texts(byte_level_tokenizer(), ["Rate it."], "RATING: ")
    assert texts == [QWEN2_VL_CONVERSATION.replace("{instruction}", "Rate it.") + "RATING: "]
    assert texts[0].endswith("<|vision_end|>Rate it.<|im_end|>\n<|im_start|>assistant\nRATING: ")


def test_shipped_templates_have_one_section_per_build_pairs_preset_with_the_placeholder_and_the_answer_format():
    assert template_sections(DEFAULT_INSTRUCTION_TEMPLATE) == list(PRESETS)
    for aspect in PRESETS:
        template = read_instruction_template(DEFAULT_INSTRUCTION_TEMPLATE, aspect)
        assert template.count("{prompt}") == 1 and "#" not in template, aspect
        assert "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]" in template and "RATING: <a number from 1 to 10>" in template, aspect


# One run of the tool on the tiny judge ---


def direct_score(model_folder, caption, chosen_png):
    """The score by its definition, with the saved judge, one pair at a time, on the full answer "10"."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    image_processor = AutoImageProcessor.from_pretrained(model_folder)
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_folder, dtype=torch.float32).eval()
    instruction = fill_template(read_instruction_template(DEFAULT_INSTRUCTION_TEMPLATE, "cartoon"), caption)
    content = [{"type": "image"}, {"type": "text", "text": instruction}]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    vision = image_processor(images=[Image.open(io.BytesIO(chosen_png)).convert("RGB")], return_tensors="pt")
    image_tokens = int(vision["image_grid_thw"][0].prod()) // image_processor.merge_size**2
    text = text.replace("<|image_pad|>", "<|image_pad|>" * image_tokens) + "RATING: 10"
    input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            mm_token_type_ids=(input_ids == model.config.image_token_id).int(),
            pixel_values=vision["pixel_values"],
            image_grid_thw=vision["image_grid_thw"],
        ).logits[0]
    first, after_one = logits[-3].double().softmax(dim=-1), logits[-2].double().softmax(dim=-1)  # before "1", "0"
    digit = {value: tokenizer.convert_tokens_to_ids(str(value)) for value in range(10)}
    mass = {rating: first[digit[rating]].item() for rating in range(2, 10)}
    mass[10] = first[digit[1]].item() * after_one[digit[0]].item()
    mass[1] = first[digit[1]].item() * (1 - sum(after_one[digit[value]].item() for value in range(10)))
    return sum(rating * share for rating, share in mass.items()) / sum(mass.values())


@pytest.mark.slow
def test_scores_equal_the_definition_computed_pair_by_pair_with_the_saved_judge(judged, tiny_judge):
    scores = {int(row["row_index"]): row for row in read_csv(judged["output_dir"] / "scores.csv")}
    images = chosen_images()
    for rows in SHARDS.values():
        for row_index, caption in rows:
            if row_index == UNDECODABLE_ROW:
                continue
            score = float(scores[row_index]["judge_score"])
            assert score == pytest.approx(direct_score(tiny_judge, caption, images[row_index]), abs=1e-5), row_index
            assert 1 <= score <= 10 and 1 <= int(scores[row_index]["judge_rating"]) <= 10
    assert len({scores[row]["judge_score"] for row in scores if row != UNDECODABLE_ROW}) == N_PAIRS - 1  # distinct


@pytest.mark.slow
def test_every_pair_has_a_row_in_scores_csv_and_the_undecodable_image_is_counted(judged):
    rows = read_csv(judged["output_dir"] / "scores.csv")
    assert [(row["shard"], int(row["row_index"])) for row in rows] == [
        (name.removesuffix(".parquet"), row_index) for name, pairs in SHARDS.items() for row_index, _ in pairs
    ]
    undecodable = [row for row in rows if row["status"] == "undecodable"]
    assert [int(row["row_index"]) for row in undecodable] == [UNDECODABLE_ROW] and undecodable[0]["judge_score"] == ""
    summary = finished_line(judged["result"], "judge_pairs", last=True)
    assert "4 of 5 pairs kept (scored above 1.0), 0 dropped (at or below it), skipped 1 (1 chosen images" in summary
    assert "skipped shard-00001.parquet row 6: 'a bowl of ramen' (chosen image undecodable)" in judged["result"].stdout


@pytest.mark.slow
def test_the_aspect_is_the_pairs_folders_preset_and_the_judge_input_is_printed(judged):
    config = json.loads((judged["output_dir"] / "judge_config.json").read_text())
    assert config["aspect"] == "cartoon" and config["counts"] == {"kept": 4, "dropped": 0, "undecodable": 1}
    assert config["pairs_config"]["preset"] == "cartoon"
    assert "**Cartoon style**" in judged["result"].stdout
    assert "<|vision_end|>You are an expert judge" in judged["result"].stdout


@pytest.mark.slow
def test_kept_pairs_load_as_the_trainer_reads_them_in_the_input_schema_plus_the_judge_score(judged):
    import train_mapo_sdxl  # its load_split names the folder's data files, as tests/tools/test_mapo_tasks.py explains

    kept = train_mapo_sdxl.load_split(str(judged["output_dir"]), "train")
    assert kept.column_names == [*SHARD_COLUMNS, "judge_score"]
    shards = sorted(judged["pairs_dir"].glob("shards/*.parquet"))
    inputs = {row["row_index"]: row for row in pa.concat_tables([pq.read_table(path) for path in shards]).to_pylist()}
    scores = scores_by_row(judged["output_dir"])
    assert sorted(row["row_index"] for row in kept) == [0, 1, 3, 4]
    for row in kept:
        assert {column: row[column] for column in SHARD_COLUMNS} == inputs[row["row_index"]]
        assert row["judge_score"] == scores[row["row_index"]]


@pytest.mark.slow
def test_pairs_at_or_below_the_threshold_are_dropped_and_counted_from_the_cached_scores(judged, tiny_judge, tmp_path):
    output_dir = tmp_path / "out"
    shutil.copytree(judged["output_dir"], output_dir)
    scores = scores_by_row(output_dir)
    ordered = sorted(scores, key=scores.get)
    threshold = scores[ordered[1]]  # the second lowest score: it and the lowest are dropped, the two others kept
    assert 1 <= threshold < 10
    result = run_tool(
        SCRIPT, [*judge_args(tiny_judge, judged["pairs_dir"], output_dir), "--threshold", repr(threshold)]
    )
    assert "judge input" not in result.stdout  # every shard was scored already: no model was loaded
    assert f"2 of 5 pairs kept (scored above {threshold}), 2 dropped (at or below it), skipped 1" in finished_line(
        result, "judge_pairs", last=True
    )
    statuses = {int(row["row_index"]): row["status"] for row in read_csv(output_dir / "scores.csv")}
    expected = {ordered[0]: "dropped", ordered[1]: "dropped", ordered[2]: "kept", ordered[3]: "kept"}
    assert statuses == {**expected, UNDECODABLE_ROW: "undecodable"}
    kept = pa.concat_tables([pq.read_table(path) for path in sorted((output_dir / "shards").glob("*.parquet"))])
    assert sorted(kept["row_index"].to_pylist()) == sorted(ordered[2:])


@pytest.mark.slow
def test_the_default_threshold_is_the_papers_5(judged, tiny_judge, tmp_path):
    output_dir = tmp_path / "out"
    shutil.copytree(judged["output_dir"], output_dir)
    above_5 = sum(score > 5 for score in scores_by_row(output_dir).values())
    result = run_tool(SCRIPT, judge_args(tiny_judge, judged["pairs_dir"], output_dir), expect_success=above_5 > 0)
    assert f"{above_5} of 5 pairs kept (scored above 5.0), {4 - above_5} dropped" in result.stdout


@pytest.mark.slow
def test_a_threshold_no_pair_passes_is_one_error_line(judged, tiny_judge, tmp_path):
    output_dir = tmp_path / "out"
    shutil.copytree(judged["output_dir"], output_dir)
    highest = max(scores_by_row(output_dir).values())
    result = run_tool(
        SCRIPT, [*judge_args(tiny_judge, judged["pairs_dir"], output_dir), "--threshold", repr(highest)], False
    )
    assert "No pair kept: 0 of 5 pairs kept" in one_line_error(result)
    assert tree_bytes(output_dir) == tree_bytes(judged["output_dir"])  # the earlier run's pairs, card, config


@pytest.mark.slow
def test_a_resumed_run_with_another_aspect_stops_with_one_line(judged, tiny_judge, tmp_path):
    output_dir = tmp_path / "out"
    shutil.copytree(judged["output_dir"], output_dir)
    result = run_tool(SCRIPT, [*judge_args(tiny_judge, judged["pairs_dir"], output_dir), "--aspect", "safety"], False)
    assert "holds scores made with other judge settings (aspect: 'cartoon' on disk, 'safety' now" in one_line_error(
        result
    )


# Bad flags and folders: one line, before any model loads ---


@pytest.mark.parametrize("threshold", ["0.5", "10", "11", "-1", "nan"])
def test_a_threshold_off_the_scale_is_one_error_line(tmp_path, threshold):
    pairs_dir = write_pairs_folder(tmp_path / "pairs")
    # the judge does not exist: had the tool tried to load it, the error would name it instead
    args = [*judge_args("no-such-org/no-such-judge", pairs_dir, tmp_path / "out"), "--threshold", threshold]
    message = one_line_error(run_tool(SCRIPT, args, expect_success=False))
    if threshold == "nan":  # refused as the flag is read (examples/lib/cli.finite_float)
        assert "argument --threshold: 'nan' is not a finite number" in message
    else:
        assert "--threshold must lie on the judge's scale, 1 <= threshold < 10" in message
    assert not (tmp_path / "out").exists()


def test_an_unknown_aspect_is_one_error_line(tmp_path):
    pairs_dir = write_pairs_folder(tmp_path / "pairs")
    args = [*judge_args("no-such-org/no-such-judge", pairs_dir, tmp_path / "out"), "--aspect", "anime"]
    message = one_line_error(run_tool(SCRIPT, args, expect_success=False))
    assert "--aspect 'anime' is not a section of --instruction_template" in message
    assert "its aspects are cartoon, pixel_art, safety, culture" in message


def test_pairs_made_without_a_preset_need_an_aspect(tmp_path):
    pairs_dir = write_pairs_folder(tmp_path / "pairs", preset=None)
    result = run_tool(
        SCRIPT, judge_args("no-such-org/no-such-judge", pairs_dir, tmp_path / "out"), expect_success=False
    )
    assert "names no preset" in one_line_error(result) and "give --aspect" in one_line_error(result)


def test_a_folder_without_shards_is_one_error_line(tmp_path):
    (tmp_path / "pairs").mkdir()
    result = run_tool(SCRIPT, judge_args("no-such-org/no-such-judge", tmp_path / "pairs", tmp_path / "out"), False)
    assert "has no shards/shard-*.parquet; expected an output folder of" in one_line_error(result)
