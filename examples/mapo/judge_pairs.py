#!/usr/bin/env python
r"""VLM-as-a-judge filter for MaPO's task pairs (paper Appendix C): Qwen2-VL rates the chosen image of every pair of a
build_pairs.py folder on a 10-point scale for the task's aspect, and the pairs rated above --threshold are kept.

    python -m examples.mapo.judge_pairs --pairs_dir pick-safety --output_dir pick-safety-judged

reads `PAIRS_DIR/shards/shard-*.parquet` (the Pick-a-Pic schema build_pairs.py writes) and writes, in the same
schema plus a `judge_score` column, the kept pairs to `OUTPUT_DIR/shards/shard-*.parquet` with a `README.md` dataset
card, so that `train_mapo_sdxl.py --dataset_name OUTPUT_DIR` trains on them; every pair's score to
`OUTPUT_DIR/scores.csv`; the settings to `judge_config.json`.

- Judge: a `transformers` Qwen2VLForConditionalGeneration (default Qwen/Qwen2-VL-7B-Instruct, the paper's), its
  tokenizer and image processor. The user message is the chosen image (`jpg_0`) and the --aspect section of
  --instruction_template with `{prompt}` replaced by the pair's context prompt (`caption`); the answer is forced to
  start with --answer_prefix ("RATING: ").
- Score: the rating is read from the judge's next-token probabilities, never from generated text, so it is
  deterministic and always defined. P(k) for k = 1..10 is the probability that the answer continues with k (Qwen2
  writes digits one by one: P(10) = P("1") P("0" | "1"), P(1) = P("1") P(no digit | "1")), renormalized over the
  ten; the score is the expected rating, sum_k k P(k), in [1, 10]. `judge_rating` is the most probable one.
- Kept: score > --threshold (default 5: the paper keeps "the instances above a score of 5"); a pair whose score is
  at or below it is dropped. Both are counted, and pairs whose chosen image cannot be decoded are skipped and counted.
- --aspect (cartoon, pixel_art, safety, culture: build_pairs' presets) defaults to the `preset` of the folder's
  pairs_config.json.
- Resumable: the scores of each input shard are saved in OUTPUT_DIR/score_cache/ when it is done. A rerun with the
  same judge settings scores only the shards not done yet, so another --threshold costs no model call; other
  settings stop the run with one line.
"""

import argparse
import csv
import io
import json
import re
from pathlib import Path

from examples.lib.cli import HelpFormatter, InputError, finite_float, parse_checked_args, run_tool
from examples.lib.files import check_settings_unchanged, check_writable_folder, resolved_path, write_atomically
from examples.lib.lm import device_and_dtype, fill_template, read_instruction_template
from examples.lib.pair_shards import CONFIG_NAME as PAIRS_CONFIG_NAME
from examples.lib.pair_shards import SHARDS_CARD_HEADER


DEFAULT_INSTRUCTION_TEMPLATE = Path(__file__).resolve().parent / "judge_templates.txt"
RATINGS = tuple(range(1, 11))  # MJ-Bench's 10-point scale
LOWEST_RATING, HIGHEST_RATING = RATINGS[0], RATINGS[-1]
IMAGE_PAD = "<|image_pad|>"  # Qwen2-VL's placeholder, one per image patch group after expansion
# Qwen2-VL's conversation for one image and one text, as its own chat template renders it; used when the tokenizer
# comes without a chat template (the hub repository keeps it with the processor).
QWEN2_VL_CONVERSATION = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{instruction}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
REQUIRED_COLUMNS = ("caption", "jpg_0", "row_index")
SKIP_REASONS = {"undecodable": "chosen images that could not be decoded"}
CONFIG_NAME = "judge_config.json"
SCORES_NAME = "scores.csv"
SCORE_FIELDS = ("row_index", "caption", "judge_score", "judge_rating")
EXAMPLES_SHOWN = 3
DATASET_CARD = (
    SHARDS_CARD_HEADER
    + """# MaPO task pairs, judged

The pairs of `{pairs_dir}` whose chosen image (`jpg_0`) `{model}` rated above {threshold} for the aspect `{aspect}`
on a 10-point scale (`judge_score`, the expected rating), made by `examples/mapo/judge_pairs.py`: {kept} of
{scored} pairs. Every pair's score: `scores.csv`; settings: `judge_config.json`. Read with
`datasets.load_dataset("{output_dir}", split="train")`.
"""
)


def rating_probabilities(first_logits, after_one_logits, rating_tokens):
    """P(rating = k) for k = 1..10, (B, 10), from the judge's logits right after the answer prefix and after a "1".

    first_logits: (B, V), the first answer token. after_one_logits: (B, V), the token after "1" (None when "10" is
    one token). rating_tokens: {k: token ids of k after the answer prefix} (`rating_token_ids`).
    A rating of one token has its first-token probability. When "10" is written "1" "0", P(10) = P("1") P("0" | "1")
    and P(1) = P("1") P(no digit | "1"); 11..19 are off the scale. The ten are renormalized: the judge's mass on
    any other answer is no rating.
    """
    first = first_logits.double().softmax(dim=-1)  # (B, V)
    masses = first[:, [rating_tokens[rating][0] for rating in RATINGS]]  # (B, 10)
    if len(rating_tokens[HIGHEST_RATING]) == 2:
        after_one = after_one_logits.double().softmax(dim=-1)  # (B, V)
        digit_ids = [rating_tokens[rating][0] for rating in RATINGS[:-1]] + [rating_tokens[HIGHEST_RATING][1]]
        one_then_zero = masses[:, 0] * after_one[:, rating_tokens[HIGHEST_RATING][1]]
        one_then_no_digit = masses[:, 0] * (1 - after_one[:, digit_ids].sum(dim=-1))
        masses = masses.clone()
        masses[:, 0], masses[:, -1] = one_then_no_digit, one_then_zero
    return masses / masses.sum(dim=-1, keepdim=True)


def expected_rating(probabilities):
    """The judge score: sum_k k P(k), (B,), in [1, 10]."""
    import torch

    return probabilities @ torch.tensor(RATINGS, dtype=probabilities.dtype, device=probabilities.device)


def rating_token_ids(tokenizer, answer_prefix):
    """{k: the token ids that write k after `answer_prefix`} for k = 1..10; InputError when the tokenizer writes the
    ratings in a way `rating_probabilities` cannot read (each of 1..9 one token; 10 one token, or "1" then one)."""
    prefix_ids = tokenizer(answer_prefix, add_special_tokens=False)["input_ids"]
    rating_tokens = {}
    for rating in RATINGS:
        ids = tokenizer(answer_prefix + str(rating), add_special_tokens=False)["input_ids"]
        rating_tokens[rating] = ids[len(prefix_ids) :] if ids[: len(prefix_ids)] == prefix_ids else None
    digits = [rating_tokens[rating] for rating in RATINGS[:-1]]
    ten = rating_tokens[HIGHEST_RATING]
    readable = all(ids is not None and len(ids) == 1 for ids in digits) and len({ids[0] for ids in digits}) == 9
    readable = readable and ten is not None and (len(ten) == 1 or (len(ten) == 2 and ten[0] == digits[0][0]))
    if not readable:
        raise InputError(
            f"The judge's tokenizer writes the ratings after --answer_prefix {answer_prefix!r} as {rating_tokens}; "
            "expected one token for each of 1..9 after the prefix's own tokens, and 10 as one token or as '1' and "
            "one more. Choose an --answer_prefix that ends where a number starts (e.g. 'RATING: ')."
        )
    return rating_tokens


def judge_texts(tokenizer, instructions, answer_prefix):
    """The judge's input for each instruction: a user message of one image and the text, then the forced answer
    prefix; in the tokenizer's chat template when it has one, else in QWEN2_VL_CONVERSATION."""
    texts = []
    for instruction in instructions:
        if getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = QWEN2_VL_CONVERSATION.replace("{instruction}", instruction)
        if text.count(IMAGE_PAD) != 1:
            raise InputError(
                f"The judge's chat template wrote {text.count(IMAGE_PAD)} image placeholders {IMAGE_PAD} for one "
                "image; expected a Qwen2-VL model whose template renders an image as <|vision_start|><|image_pad|>"
                "<|vision_end|>."
            )
        texts.append(text + answer_prefix)
    return texts


def judge_inputs(tokenizer, image_processor, texts, images, continuation_ids, image_token_id):
    """The model's inputs for a batch, as Qwen2VLProcessor makes them (it needs torchvision for its video processor
    in transformers 5; the judge needs images only): each image placeholder repeated once per merged patch, left
    padding, then `continuation_ids` (B-independent, e.g. the "1" of "10") appended to every row."""
    import torch

    vision = image_processor(images=images, return_tensors="pt")
    merged_patch = image_processor.merge_size**2
    expanded = [
        text.replace(IMAGE_PAD, IMAGE_PAD * (int(grid.prod()) // merged_patch))
        for text, grid in zip(texts, vision["image_grid_thw"])
    ]
    encoded = tokenizer(expanded, return_tensors="pt", padding=True, add_special_tokens=False)
    continuation = torch.tensor([continuation_ids] * len(texts), dtype=encoded["input_ids"].dtype).view(len(texts), -1)
    input_ids = torch.cat([encoded["input_ids"], continuation], dim=1)
    attention_mask = torch.cat([encoded["attention_mask"], torch.ones_like(continuation)], dim=1)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": (input_ids == image_token_id).int(),  # 1 marks image tokens, for M-RoPE
        "pixel_values": vision["pixel_values"],
        "image_grid_thw": vision["image_grid_thw"],
    }


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    model = parser.add_argument_group("judge")
    model.add_argument(
        "--vlm_model_name_or_path",
        type=str,
        default="Qwen/Qwen2-VL-7B-Instruct",
        help="The judge (hub id or folder): a Qwen2VLForConditionalGeneration with its tokenizer and image processor.",
    )
    model.add_argument("--revision", type=str, default=None, help="Revision of the judge on the hub.")
    model.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models are cached.")
    model.add_argument("--device", type=str, default=None, help="Device of the judge (default: cuda if available).")
    model.add_argument(
        "--dtype",
        type=str,
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="Weights dtype (auto: bfloat16 on cuda, float32 otherwise).",
    )
    model.add_argument("--batch_size", type=int, default=8, help="Pairs per forward pass of the judge.")

    task = parser.add_argument_group("what the judge is asked")
    task.add_argument(
        "--aspect",
        type=str,
        default=None,
        help="Section of --instruction_template to judge by: cartoon, pixel_art, safety or culture in the shipped "
        f"file (default: the preset in PAIRS_DIR/{PAIRS_CONFIG_NAME}).",
    )
    task.add_argument(
        "--instruction_template",
        type=str,
        default=str(DEFAULT_INSTRUCTION_TEMPLATE),
        help="Instruction file: one [aspect] section each, with {prompt} where the context prompt goes.",
    )
    task.add_argument(
        "--answer_prefix",
        type=str,
        default="RATING: ",
        help="The start of the judge's answer, forced; the rating is read from the tokens that follow it.",
    )
    task.add_argument(
        "--threshold",
        type=finite_float,
        default=5.0,
        help=f"Keep the pairs scored above it (the paper: 5); on the scale, {LOWEST_RATING} <= t < {HIGHEST_RATING}.",
    )

    data = parser.add_argument_group("pairs")
    data.add_argument(
        "--pairs_dir", type=str, required=True, help="A build_pairs.py output folder (shards/shard-*.parquet)."
    )
    data.add_argument(
        "--output_dir",
        type=str,
        required=True,
        help=f"Folder for the kept pairs (shards/, README.md), {SCORES_NAME}, {CONFIG_NAME} and score_cache/.",
    )
    return parse_checked_args(parser, check_args, input_args)


def template_sections(path):
    """The section names of an instruction file, in order (none: one template for every aspect)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [match.group(1) for line in lines if (match := re.fullmatch(r"\[(\w+)\]\s*", line))]


def check_args(args):
    """Refuse bad settings and a folder that is not build_pairs' before the judge is loaded; fill --aspect in."""
    if not LOWEST_RATING <= args.threshold < HIGHEST_RATING:  # also refuses nan
        raise InputError(
            f"--threshold must lie on the judge's scale, {LOWEST_RATING} <= threshold < {HIGHEST_RATING} (scores are "
            f"expected ratings from {LOWEST_RATING} to {HIGHEST_RATING}; pairs scored above it are kept), "
            f"got {args.threshold}."
        )
    if args.batch_size < 1:
        raise InputError(f"--batch_size must be at least 1, got {args.batch_size}.")
    if not args.answer_prefix.strip():
        raise InputError("--answer_prefix is empty; give the text the judge's answer starts with, e.g. 'RATING: '.")
    model_path = Path(args.vlm_model_name_or_path)
    if model_path.exists() and not (model_path / "config.json").is_file():
        raise InputError(
            f"--vlm_model_name_or_path {args.vlm_model_name_or_path!r} has no config.json; expected a folder saved "
            "with save_pretrained (model, tokenizer and image processor) or a hub id."
        )
    pairs_dir, output_dir = Path(args.pairs_dir), Path(args.output_dir)
    input_shards(pairs_dir)  # raises when there are none or they lack columns
    if args.aspect is None:
        args.aspect = preset_of(pairs_dir)
    if not Path(args.instruction_template).is_file():
        raise InputError(f"--instruction_template {args.instruction_template!r}: no such file.")
    sections = template_sections(args.instruction_template)
    if sections and args.aspect not in sections:
        raise InputError(
            f"--aspect {args.aspect!r} is not a section of --instruction_template {args.instruction_template!r}; "
            f"its aspects are {', '.join(sections)}."
        )
    read_instruction_template(args.instruction_template, args.aspect)  # raises without the placeholder
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"--output_dir {args.output_dir!r} is a file; expected a folder (new or of an earlier run).")
    inside = output_dir.resolve() in (pairs_dir.resolve(), *pairs_dir.resolve().parents)
    if inside or pairs_dir.resolve() in output_dir.resolve().parents:
        raise InputError(
            f"--output_dir {args.output_dir!r} and --pairs_dir {args.pairs_dir!r} overlap; the kept pairs' shards "
            "and card would mix with the input's. Choose an --output_dir of its own."
        )
    check_writable_folder(output_dir)  # resumable (its score cache): refuses only a file or an unwritable place


def input_shards(pairs_dir):
    """The shard files of a build_pairs folder, in order; InputError when there are none or one lacks a column."""
    import pyarrow.parquet as pq

    shards = sorted((pairs_dir / "shards").glob("shard-*.parquet"))
    if not shards:
        raise InputError(
            f"--pairs_dir {str(pairs_dir)!r} has no shards/shard-*.parquet; expected an output folder of "
            "examples/mapo/build_pairs.py."
        )
    for path in shards:
        try:
            columns = pq.read_schema(path).names
        except Exception as error:
            raise InputError(f"{path} cannot be read ({error}); make it again with build_pairs.py.") from error
        missing = [column for column in REQUIRED_COLUMNS if column not in columns]
        if missing:
            raise InputError(
                f"{path} has no column(s) {missing}; it has {columns}. Expected the Pick-a-Pic schema that "
                "build_pairs.py writes (caption, jpg_0 the chosen image, jpg_1, label_0, ..., row_index)."
            )
    return shards


def preset_of(pairs_dir):
    """The build_pairs preset of a folder, the default --aspect; InputError when it names none."""
    config_file = pairs_dir / PAIRS_CONFIG_NAME
    preset = json.loads(config_file.read_text()).get("preset") if config_file.is_file() else None
    if preset is None:
        raise InputError(
            f"{config_file} names no preset (its pairs were made with prefixes of their own, or it is missing); "
            "give --aspect (cartoon, pixel_art, safety or culture, or a section of your --instruction_template)."
        )
    return preset


def judge_settings(args):
    """Everything that changes a pair's score; a resumed run must have the same."""
    return {
        "pairs_dir": resolved_path(args.pairs_dir),
        "vlm_model_name_or_path": resolved_path(args.vlm_model_name_or_path),
        "revision": args.revision,
        "dtype": args.dtype,
        "aspect": args.aspect,
        "instruction": read_instruction_template(args.instruction_template, args.aspect),
        "answer_prefix": args.answer_prefix,
    }


def load_judge(args):
    """(tokenizer, image processor, model, device) of --vlm_model_name_or_path; InputError when it cannot load."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

    device, dtype = device_and_dtype(args)
    where = {"revision": args.revision, "cache_dir": args.cache_dir}
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.vlm_model_name_or_path, **where)
        image_processor = AutoImageProcessor.from_pretrained(args.vlm_model_name_or_path, **where)
        model = Qwen2VLForConditionalGeneration.from_pretrained(args.vlm_model_name_or_path, dtype=dtype, **where)
    except (OSError, ValueError) as error:
        raise InputError(
            f"--vlm_model_name_or_path {args.vlm_model_name_or_path!r} could not be loaded as a Qwen2-VL model with "
            f"its tokenizer and image processor ({' '.join(str(error).split())[:300]})."
        ) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # every row's last positions are the answer's
    return tokenizer, image_processor, model.to(device).eval(), device


def decoded_image(png_bytes):
    """The image as RGB, or None when the bytes are not an image."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(png_bytes))
        image.load()
        return image.convert("RGB")
    except Exception:  # PIL raises UnidentifiedImageError, OSError, ValueError; None bytes a TypeError
        return None


class Judge:
    """The judge loaded once, scoring (image, context prompt) batches."""

    def __init__(self, args):
        self.args = args
        self.template = read_instruction_template(args.instruction_template, args.aspect)
        self.tokenizer, self.image_processor, self.model, self.device = load_judge(args)
        self.rating_tokens = rating_token_ids(self.tokenizer, args.answer_prefix)
        # "10" written as "1" "0": feed the "1" too, so one pass gives P(first token) and P(next | "1")
        self.continuation_ids = self.rating_tokens[HIGHEST_RATING][:-1]
        first = judge_texts(self.tokenizer, [fill_template(self.template, "<context prompt>")], args.answer_prefix)
        print(f"judge input (before the image placeholder is expanded):\n{first[0]}", flush=True)

    def scores(self, images, captions):
        """(expected ratings, most probable ratings), two lists of len(images)."""
        import torch

        instructions = [fill_template(self.template, caption) for caption in captions]
        texts = judge_texts(self.tokenizer, instructions, self.args.answer_prefix)
        inputs = judge_inputs(
            self.tokenizer,
            self.image_processor,
            texts,
            images,
            self.continuation_ids,
            self.model.config.image_token_id,
        )
        inputs = {name: value.to(self.device) for name, value in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.no_grad():
            logits = self.model(**inputs, logits_to_keep=2).logits  # (B, 2, V): the last two positions
        if self.continuation_ids:
            probabilities = rating_probabilities(logits[:, -2], logits[:, -1], self.rating_tokens)
        else:
            probabilities = rating_probabilities(logits[:, -1], None, self.rating_tokens)
        ratings = (probabilities.argmax(dim=-1) + LOWEST_RATING).tolist()
        return expected_rating(probabilities).cpu().tolist(), ratings


def read_score_cache(path, table):
    """The cached scores of a shard as rows of SCORE_FIELDS; InputError when they are not the shard's rows."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):  # an empty score or rating: the chosen image was undecodable
            score = float(row["judge_score"]) if row["judge_score"] else None
            rating = int(row["judge_rating"]) if row["judge_rating"] else None
            rows.append(
                {
                    "row_index": int(row["row_index"]),
                    "caption": row["caption"],
                    "judge_score": score,
                    "judge_rating": rating,
                }
            )
    on_disk = [(row["row_index"], row["caption"]) for row in rows]
    if on_disk != list(zip(table["row_index"].to_pylist(), table["caption"].to_pylist())):
        raise InputError(
            f"{path} holds the scores of other rows than {path.stem} of --pairs_dir has now (was the folder made "
            f"again?). Delete {path} to score that shard again, or use another --output_dir."
        )
    return rows


def write_csv(path, rows, fields):
    def write(temporary):
        with open(temporary, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)  # floats as repr: they read back exactly

    write_atomically(path, write)


def score_shard(judge, table, args, progress):
    """Rows of SCORE_FIELDS for one shard's pairs (score and rating None where the chosen image is undecodable)."""
    rows = []
    captions, row_indices, images = table["caption"].to_pylist(), table["row_index"].to_pylist(), table["jpg_0"]
    for start in range(0, table.num_rows, args.batch_size):
        batch = range(start, min(start + args.batch_size, table.num_rows))
        decoded = {position: decoded_image(images[position].as_py()) for position in batch}
        usable = [position for position in batch if decoded[position] is not None]
        scored = {}
        if usable:
            scores, ratings = judge.scores([decoded[p] for p in usable], [captions[p] for p in usable])
            scored = dict(zip(usable, zip(scores, ratings)))
        for position in batch:
            score, rating = scored.get(position, (None, None))
            rows.append(
                {
                    "row_index": row_indices[position],
                    "caption": captions[position],
                    "judge_score": score,
                    "judge_rating": rating,
                }
            )
        progress.update(len(batch))
    return rows


def status(score, threshold):
    """kept, dropped or undecodable (no score). The paper keeps the instances "above a score of 5": strictly above."""
    if score is None:
        return "undecodable"
    return "kept" if score > threshold else "dropped"


def write_kept_pairs(input_path, output_path, rows, kept):
    """The pairs at the positions `kept` of a shard, with their `judge_score`, written atomically; the file is
    removed when none is kept (an earlier run with a lower threshold may have written it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not kept:
        output_path.unlink(missing_ok=True)
        return
    table = pq.read_table(input_path).take(kept)
    scores = pa.array([rows[position]["judge_score"] for position in kept], pa.float64())
    table = table.append_column("judge_score", scores)
    write_atomically(output_path, lambda temporary: pq.write_table(table, temporary))


def main(args):
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    pairs_dir, output_dir = Path(args.pairs_dir), Path(args.output_dir)
    shards = input_shards(pairs_dir)
    settings = judge_settings(args)
    check_settings_unchanged(output_dir / CONFIG_NAME, settings, "scores made with other judge settings")
    cache_dir = output_dir / "score_cache"
    pending = [path for path in shards if not (cache_dir / f"{path.stem}.csv").is_file()]
    total = sum(pq.ParquetFile(path).metadata.num_rows for path in shards)
    print(
        f"pairs: {total} in {len(shards)} shards of {pairs_dir}; aspect {args.aspect}; threshold {args.threshold}; "
        f"{len(shards) - len(pending)} shards already scored in {cache_dir}",
        flush=True,
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    if not (output_dir / CONFIG_NAME).is_file():  # the settings the score cache is made with (an earlier run's match)
        write_atomically(output_dir / CONFIG_NAME, lambda path: path.write_text(json.dumps(settings, indent=2)))

    judge = Judge(args) if pending else None  # a rerun with every shard scored loads no model
    to_score = sum(pq.ParquetFile(path).metadata.num_rows for path in pending)
    progress = tqdm(total=to_score, desc="judging", unit="pair")
    all_rows, counts, skip_examples, kept_by_shard = [], dict.fromkeys(("kept", "dropped", "undecodable"), 0), [], {}
    for path in shards:
        cache_path = cache_dir / f"{path.stem}.csv"
        if path in pending:
            rows = score_shard(judge, pq.read_table(path, columns=["row_index", "caption", "jpg_0"]), args, progress)
            write_csv(cache_path, rows, SCORE_FIELDS)
        else:
            rows = read_score_cache(cache_path, pq.read_table(path, columns=["row_index", "caption"]))
        statuses = [status(row["judge_score"], args.threshold) for row in rows]
        kept_by_shard[path] = (
            rows,
            [position for position, row_status in enumerate(statuses) if row_status == "kept"],
        )
        for row, row_status in zip(rows, statuses):
            counts[row_status] += 1
            all_rows.append({"shard": path.stem, **row, "status": row_status})
            if row_status == "undecodable" and len(skip_examples) < EXAMPLES_SHOWN:
                skip_examples.append(f"{path.name} row {row['row_index']}: {row['caption']!r}")
    progress.close()

    for example in skip_examples:
        print(f"  skipped {example} (chosen image undecodable)", flush=True)
    scores = [row["judge_score"] for row in all_rows if row["judge_score"] is not None]
    score_range = f"scores from {min(scores):.3f} to {max(scores):.3f}" if scores else "no pair scored"
    report = (
        f"{counts['kept']} of {len(all_rows)} pairs kept (scored above {args.threshold}), {counts['dropped']} dropped "
        f"(at or below it), skipped {counts['undecodable']} ({counts['undecodable']} {SKIP_REASONS['undecodable']}); "
        f"{score_range}"
    )
    if counts["kept"] == 0:  # stops before any output is written: an earlier run's pairs, card and config stay
        raise InputError(
            f"No pair kept: {report}; nothing written but the score cache {cache_dir}. Lower --threshold (the scores "
            "are cached: a rerun is quick)."
        )
    report += f"; every score in {output_dir / SCORES_NAME}"
    (output_dir / "shards").mkdir(exist_ok=True)
    for path, (rows, kept) in kept_by_shard.items():
        write_kept_pairs(path, output_dir / "shards" / path.name, rows, kept)
    write_csv(output_dir / SCORES_NAME, all_rows, ("shard", *SCORE_FIELDS, "status"))
    config = {**settings, "threshold": args.threshold, "pairs_config": read_pairs_config(pairs_dir), "counts": counts}
    write_atomically(output_dir / CONFIG_NAME, lambda path: path.write_text(json.dumps(config, indent=2)))
    card = DATASET_CARD.format(
        pairs_dir=pairs_dir,
        model=args.vlm_model_name_or_path,
        threshold=args.threshold,
        aspect=args.aspect,
        kept=counts["kept"],
        scored=len(scores),
        output_dir=output_dir,
    )
    write_atomically(output_dir / "README.md", lambda path: path.write_text(card))
    print(f"== judge_pairs finished: {report}; train with --dataset_name {output_dir}", flush=True)


def read_pairs_config(pairs_dir):
    config_file = pairs_dir / PAIRS_CONFIG_NAME
    return json.loads(config_file.read_text()) if config_file.is_file() else None


if __name__ == "__main__":
    run_tool(main, parse_args)
