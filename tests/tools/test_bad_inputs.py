"""Bad input to the tools under examples/ (issue 19; examples/ddspo's are tested beside them): each kind that applies
to a tool ends in one `error:` line, exit code 2 and no traceback, and an earlier run's outputs stay byte for byte as
they were.

Every case runs in-process, as the tool's `__main__` does (`run_tool(main, parse_args)`), and stops before any model
loads; `test_the_user_sees_one_line_from_a_fresh_process` proves the line for the tools whose `__main__` differs or
that stop before torch is imported. Kinds covered (examples/eval/README.md lists them): an output folder that is a
file or holds an earlier run's outputs (without --overwrite); prompt files that are missing, binary, a broken parquet
file or a folder; a prompt longer than a small language model's positions; truncated weight files; undecodable or
truncated images; a cut manifest.jsonl; probability-kind rewards outside [0, 1]; MPS conversion of an empty, text,
truncated or non-MPS file; make_tiny_assets --resolution 0 and --num_ties -1; NaN in a float flag; a failed child
run of the benchmark.
"""

import importlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from kit import (
    OFFLINE_ENV,
    REPO,
    bad_prompt_source,
    bigram_gpt2,
    error_in_process,
    one_line_error,
    png_bytes,
    read_csv,
    tree_bytes,
    write_lines,
    write_run,
)
from PIL import Image


PROMPTS = ["a photo of a red ball", "a photo of a blue ball"]


# What the cases are made of ---


def random_images(count, size=16):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)) for _ in range(count)]


def write_scored_run(folder, columns, per_prompt=2):
    """A generate.py run folder of PROMPTS, `per_prompt` images each, with a scores.csv of `columns`
    ({name: [value per image]}, in manifest order)."""
    write_run(folder, PROMPTS, random_images(len(PROMPTS) * per_prompt), per_prompt)
    rows = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    header = ["prompt_index", "k", "seed", "prompt", "image", *columns]
    lines = [",".join(header)]
    for index, row in enumerate(rows):
        cells = [row["prompt_index"], row["k"], row["seed"], f'"{row["prompt"]}"', row["image"]]
        lines.append(",".join(str(cell) for cell in [*cells, *(values[index] for values in columns.values())]))
    (folder / "scores.csv").write_text("\n".join(lines) + "\n")
    return folder


def cut_manifest(run_dir):
    text = (run_dir / "manifest.jsonl").read_text()
    (run_dir / "manifest.jsonl").write_text(text[: len(text) - 20])  # the last row loses its end


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def safetensors_file(path, tensors=None):
    import torch
    from safetensors.torch import save_file

    save_file(tensors or {"unet.down.lora_A.weight": torch.zeros(4, 8)}, path)
    return path


def earlier_outputs(folder, names):
    """A folder holding files named as a tool's outputs, written by 'an earlier run'."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(f"earlier {name}\n")
    return folder


PROMPT_SOURCE_ERRORS = {
    "missing": "no such file or folder",
    "binary": r"could not be read as a \.txt prompt file .*UTF-8",
    "broken_parquet": r"could not be read as a \.parquet prompt file",
    "folder": "could not be read as a dataset",
}


# The cases: (tool, case) -> build(tmp_path) -> {"argv", "message", "kept": [paths left as they were]} ---

CASES = {}


def case(tool, name):
    def register(build):
        CASES[tool, name] = build
        return build

    return register


def generate_argv(tmp_path, *extra, prompts=None, output_dir=None):
    prompts = prompts or write_lines(tmp_path / "prompts.txt", PROMPTS)
    argv = ["--pretrained_model_name_or_path", tmp_path / "no-model", "--model_name", "base", "--prompts", prompts]
    return [*argv, "--cache_dir", tmp_path / "cache", "--output_dir", output_dir or tmp_path / "generated", *extra]


@case("generate", "output_dir_is_a_file")
def _(tmp_path):
    taken = write_lines(tmp_path / "generated", ["not a folder"])
    argv = generate_argv(tmp_path, output_dir=taken)
    return {"argv": argv, "message": "--output_dir .* is a file", "kept": [taken]}


@case("generate", "truncated_lora_weights")
def _(tmp_path):
    lora = truncate(safetensors_file(tmp_path / "pytorch_lora_weights.safetensors"), 0.8)
    return {"argv": generate_argv(tmp_path, "--lora_path", lora), "message": "--lora_path .* is truncated"}


@case("generate", "nan_lora_scale")
def _(tmp_path):
    lora = safetensors_file(tmp_path / "pytorch_lora_weights.safetensors")
    argv = generate_argv(tmp_path, "--lora_path", lora, "--lora_scale", "nan")
    return {"argv": argv, "message": "--lora_scale: 'nan' is not a finite number"}


for _kind in PROMPT_SOURCE_ERRORS:

    @case("generate", f"prompts_{_kind}")
    def _(tmp_path, kind=_kind):
        argv = generate_argv(tmp_path, prompts=bad_prompt_source(tmp_path, kind))
        return {"argv": argv, "message": PROMPT_SOURCE_ERRORS[kind]}


@case("score", "truncated_image")
def _(tmp_path):
    run_dir = write_scored_run(tmp_path / "run", {})
    (run_dir / "scores.csv").unlink()
    truncate(run_dir / "00001_00.png")
    argv = ["--run_dirs", run_dir, "--reward_models", "toy_ball", "--device", "cpu"]
    return {"argv": argv, "message": r"00001_00\.png is not a readable image .*rerun generate\.py", "kept": [run_dir]}


@case("score", "cut_manifest")
def _(tmp_path):
    run_dir = write_scored_run(tmp_path / "run", {"toy_ball": [0.1, 0.2, 0.3, 0.4]})
    cut_manifest(run_dir)
    argv = ["--run_dirs", run_dir, "--reward_models", "toy_ball", "--device", "cpu"]
    return {"argv": argv, "message": r"Line 4 of .*manifest\.jsonl is not a whole manifest row", "kept": [run_dir]}


@case("personalization", "undecodable_image")
def _(tmp_path):
    from kit import write_tiny_dinov2

    run_dir = write_scored_run(tmp_path / "run", {})
    (run_dir / "00000_01.png").write_text("not an image")
    targets = tmp_path / "targets"
    targets.mkdir()
    random_images(1)[0].save(targets / "subject.png")
    dinov2 = write_tiny_dinov2(tmp_path / "dinov2")
    argv = ["--run_dirs", run_dir, "--target_dir", targets, "--metrics", "dinov2"]
    argv += ["--dinov2_model_name_or_path", dinov2, "--device", "cpu"]
    return {"argv": argv, "message": r"00000_01\.png is not a readable image", "kept": [run_dir]}


def compare_runs(tmp_path, base_scores=(1.0, 2.0, 3.0, 4.0)):
    base = write_scored_run(tmp_path / "base", {"aesthetic": list(base_scores)})
    tuned = write_scored_run(tmp_path / "tuned", {"aesthetic": [2.0, 3.0, 4.0, 5.0]})
    return ["--runs", base, tuned, "--num_bootstrap", 50]


@case("compare", "output_prefix_under_a_file")
def _(tmp_path):
    taken = write_lines(tmp_path / "results", ["not a folder"])
    argv = [*compare_runs(tmp_path), "--output_prefix", taken / "table"]
    return {"argv": argv, "message": "--output_prefix's folder .* is a file", "kept": [taken]}


@case("compare", "earlier_outputs_at_the_prefix")
def _(tmp_path):
    results = earlier_outputs(tmp_path / "results", ["table.md", "table.json"])
    argv = [*compare_runs(tmp_path), "--output_prefix", results / "table"]
    return {
        "argv": argv,
        "message": r"holds an earlier run's outputs \(table.json, table.md\).*--overwrite",
        "kept": [results],
    }


@case("compare", "score_that_is_not_a_number")
def _(tmp_path):
    argv = [*compare_runs(tmp_path, base_scores=(1.0, "good", 3.0, 4.0)), "--output_prefix", tmp_path / "o" / "t"]
    return {"argv": argv, "message": r"the aesthetic cell of .*00000_01\.png' is 'good', not a number"}


@case("compare", "nan_confidence")
def _(tmp_path):
    argv = [*compare_runs(tmp_path), "--confidence", "nan", "--output_prefix", tmp_path / "o" / "t"]
    return {"argv": argv, "message": "--confidence: 'nan' is not a finite number"}


def select_pairs_argv(tmp_path, reward="pickscore", values=(0.1, 0.9, 0.2, 0.8)):
    run_dir = write_scored_run(tmp_path / "run", {reward: list(values)})
    return run_dir, ["--run_dirs", run_dir, "--reward_models", reward, "--output_dir", tmp_path / "pairs"]


@case("select_pairs", "earlier_pairs")
def _(tmp_path):
    _, argv = select_pairs_argv(tmp_path)
    pairs = earlier_outputs(tmp_path / "pairs", ["train.parquet", "README.md"])
    return {"argv": argv, "message": r"holds an earlier run's outputs \(README.md, train.parquet\)", "kept": [pairs]}


@case("select_pairs", "probability_reward_outside_0_1")
def _(tmp_path):
    run_dir, argv = select_pairs_argv(tmp_path, reward="vqascore", values=(0.2, 1.7, 0.4, 0.5))
    return {"argv": argv, "message": r"vqascore score of 00000_01\.png is 1\.7, outside \[0, 1\]", "kept": [run_dir]}


@case("select_pairs", "cut_manifest")
def _(tmp_path):
    run_dir, argv = select_pairs_argv(tmp_path)
    cut_manifest(run_dir)
    return {"argv": argv, "message": "is not a whole manifest row", "kept": [run_dir]}


@case("select_pairs", "nan_alpha")
def _(tmp_path):
    _, argv = select_pairs_argv(tmp_path)
    return {"argv": [*argv, "--alpha", "nan"], "message": "--alpha: 'nan' is not a finite number"}


def soup_argv(tmp_path):
    base = tmp_path / "base"
    (base / "unet").mkdir(parents=True)
    (base / "unet" / "config.json").write_text("{}")
    models = [safetensors_file(tmp_path / f"lora_{i}.safetensors") for i in range(2)]
    return ["--pretrained_model_name_or_path", base, "--models", *models, "--output_dir", tmp_path / "soup"]


@case("soup", "earlier_soup")
def _(tmp_path):
    soup = earlier_outputs(tmp_path / "soup", ["soup_config.json", "unet/config.json"])
    message = r"holds an earlier run's outputs \(soup_config.json, unet\)"
    return {"argv": soup_argv(tmp_path), "message": message, "kept": [soup]}


@case("soup", "truncated_lora_weights")
def _(tmp_path):
    argv = soup_argv(tmp_path)
    truncate(tmp_path / "lora_1.safetensors", 0.9)
    return {"argv": argv, "message": r"Model .*lora_1\.safetensors' is truncated"}


@case("soup", "nan_lambda")
def _(tmp_path):
    return {"argv": [*soup_argv(tmp_path), "--lambdas", "nan"], "message": "--lambdas: 'nan' is not a finite number"}


def context_argv(tmp_path, prompts=None, model="no-such/model"):
    prompts = prompts or write_lines(tmp_path / "prompts.txt", PROMPTS)
    argv = ["--prompts", prompts, "--llm_model_name_or_path", model, "--device", "cpu", "--max_new_tokens", 8]
    return [*argv, "--cache_dir", tmp_path / "cache", "--output_dir", tmp_path / "contexts"]


@case("context_prompts", "earlier_output")
def _(tmp_path):
    contexts = earlier_outputs(tmp_path / "contexts", ["context_prompts.parquet", "context_config.json"])
    message = r"holds an earlier run's outputs \(context_config.json, context_prompts.parquet\)"
    return {"argv": context_argv(tmp_path), "message": message, "kept": [contexts]}


@case("context_prompts", "nan_temperature")
def _(tmp_path):
    return {
        "argv": [*context_argv(tmp_path), "--temperature", "nan"],
        "message": "--temperature: 'nan' is not a finite number",
    }


for _kind in PROMPT_SOURCE_ERRORS:

    @case("context_prompts", f"prompts_{_kind}")
    def _(tmp_path, kind=_kind):
        return {
            "argv": context_argv(tmp_path, bad_prompt_source(tmp_path, kind)),
            "message": PROMPT_SOURCE_ERRORS[kind],
        }


def small_language_model(folder):
    """A GPT-2 of 64 positions over a word-level vocabulary (kit.bigram_gpt2), with its tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<eos>", "<unk>", "▁a"]
    backend = Tokenizer(models.WordLevel({token: i for i, token in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>").save_pretrained(folder)
    bigram_gpt2(vocab, {}).save_pretrained(folder)
    return folder


@case("context_prompts", "prompt_longer_than_the_models_positions")
def _(tmp_path):
    model = small_language_model(tmp_path / "lm")
    prompts = write_lines(tmp_path / "prompts.txt", ["a", " ".join(["a"] * 70)])
    template = write_lines(tmp_path / "template.txt", ["Describe: {prompt}"])
    message = r"Prompt 1 \('a a a.*needs \d+ positions; .* has 64\. Shorten"
    return {"argv": [*context_argv(tmp_path, prompts, model), "--instruction_template", template], "message": message}


@case("judge_pairs", "no_pair_kept_leaves_the_earlier_outputs")
def _(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from examples.mapo import judge_pairs

    pairs_dir = tmp_path / "pairs"
    (pairs_dir / "shards").mkdir(parents=True)
    table = pa.table({"caption": PROMPTS, "jpg_0": [png_bytes(np.zeros((8, 8, 3)))] * 2, "row_index": [0, 1]})
    pq.write_table(table, pairs_dir / "shards" / "shard-00000.parquet")
    output = tmp_path / "judged"
    argv = ["--pairs_dir", pairs_dir, "--aspect", "cartoon", "--vlm_model_name_or_path", "no-such/judge"]
    argv += ["--output_dir", output, "--threshold", 9.5]
    settings = judge_pairs.judge_settings(judge_pairs.parse_args([str(arg) for arg in argv]))
    earlier_outputs(output, ["scores.csv", "README.md", "shards/shard-00000.parquet"])  # a run at threshold 2
    (output / "judge_config.json").write_text(json.dumps({**settings, "threshold": 2.0, "counts": {"kept": 2}}))
    cache = ["row_index,caption,judge_score,judge_rating", *(f"{i},{p},3.0,3" for i, p in enumerate(PROMPTS))]
    (output / "score_cache").mkdir()
    write_lines(output / "score_cache" / "shard-00000.csv", cache)
    return {"argv": argv, "message": r"No pair kept: 0 of 2 pairs kept .*Lower --threshold", "kept": [output]}


def mismatch_argv(tmp_path, images):
    import pyarrow as pa
    import pyarrow.parquet as pq

    dataset = tmp_path / "pairs.parquet"
    columns = {"caption": PROMPTS, "jpg_0": images, "jpg_1": images, "label_0": [1.0, 0.0]}
    pq.write_table(pa.table(columns), dataset)
    argv = ["--pretrained_model_name_or_path", "no-such/pipeline", "--dataset", dataset, "--resolution", 64]
    return [*argv, "--cache_dir", tmp_path / "cache", "--output_dir", tmp_path / "mismatch"]


@case("measure_mismatch", "undecodable_dataset_images")
def _(tmp_path):
    argv = mismatch_argv(tmp_path, [b"", truncate_bytes(png_bytes(np.zeros((32, 32, 3))))])
    return {"argv": argv, "message": r"No row of .*skipped: .*2 whose image does not decode"}


def truncate_bytes(data):
    return data[: len(data) // 2]


@case("measure_mismatch", "output_dir_is_a_file")
def _(tmp_path):
    argv = mismatch_argv(tmp_path, [png_bytes(np.zeros((8, 8, 3)))] * 2)
    taken = write_lines(tmp_path / "mismatch", ["not a folder"])
    return {"argv": argv, "message": "--output_dir .* is a file", "kept": [taken]}


def fake_pipeline(folder):
    """A pipeline folder as far as the flag checks look: model_index.json and a UNet weight file."""
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    safetensors_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    return folder


@case("build_pairs", "truncated_pipeline_weights")
def _(tmp_path):
    pipeline = fake_pipeline(tmp_path / "pipeline")
    truncate(pipeline / "unet" / "diffusion_pytorch_model.safetensors", 0.9)
    argv = ["--pretrained_model_name_or_path", pipeline, "--chosen_prefix", "a cartoon of", "--rejected_prefix", ""]
    argv += ["--prompts", write_lines(tmp_path / "prompts.txt", PROMPTS), "--output_dir", tmp_path / "pairs"]
    return {"argv": argv, "message": r"diffusion_pytorch_model\.safetensors' is truncated"}


@case("build_pairs", "output_dir_is_a_file")
def _(tmp_path):
    taken = write_lines(tmp_path / "pairs", ["not a folder"])
    argv = ["--pretrained_model_name_or_path", fake_pipeline(tmp_path / "pipeline"), "--preset", "cartoon"]
    argv += ["--prompts", write_lines(tmp_path / "prompts.txt", PROMPTS), "--output_dir", taken]
    return {"argv": argv, "message": "--output_dir .* is a file", "kept": [taken]}


def mps_checkpoint(tmp_path, kind):
    import torch

    path = tmp_path / "MPS_overall_checkpoint.pth"
    if kind == "empty_file":
        path.write_bytes(b"")
    elif kind == "text_file":
        path.write_text("<html>404 Not Found</html>\n")
    else:
        torch.save({"model.logit_scale": torch.ones(()), "other.weight": torch.zeros(64, 64)}, path)
        if kind == "truncated_checkpoint":
            truncate(path)
    return path


MPS_ERRORS = {
    "empty_file": "--checkpoint .* is empty",
    "text_file": "could not be read as a pickled checkpoint",
    "truncated_checkpoint": "could not be read as a pickled checkpoint",
    "not_an_mps_checkpoint": "is not an MPS state dict",
}

for _kind in MPS_ERRORS:

    @case("convert_mps", _kind)
    def _(tmp_path, kind=_kind):
        argv = ["--checkpoint", mps_checkpoint(tmp_path, kind), "--output_dir", tmp_path / "mps"]
        return {"argv": argv, "message": MPS_ERRORS[kind]}


@case("convert_mps", "earlier_conversion")
def _(tmp_path):
    converted = earlier_outputs(tmp_path / "mps", ["MPS_overall_state_dict.safetensors"])
    argv = ["--checkpoint", mps_checkpoint(tmp_path, "not_an_mps_checkpoint"), "--output_dir", converted]
    return {"argv": argv, "message": r"holds an earlier run's outputs \(MPS_overall_state_dict", "kept": [converted]}


@case("make_tiny_assets", "resolution_0")
def _(tmp_path):
    argv = ["--resolution", 0, "--output_dir", tmp_path / "tiny"]
    return {"argv": argv, "message": "--resolution must be a positive multiple of 8"}


@case("make_tiny_assets", "negative_num_ties")
def _(tmp_path):
    return {"argv": ["--num_ties", -1, "--output_dir", tmp_path / "tiny"], "message": "--num_ties cannot be negative"}


@case("make_tiny_assets", "earlier_assets")
def _(tmp_path):
    assets = earlier_outputs(tmp_path / "tiny", ["tiny-pickapic/train.parquet"])
    argv = ["--skip_model", "--output_dir", assets]
    return {"argv": argv, "message": r"holds an earlier run's outputs \(tiny-pickapic\)", "kept": [assets]}


@case("playground", "earlier_results")
def _(tmp_path):
    results = earlier_outputs(tmp_path / "toy2d", ["results.md", "results.json", "modes.png"])
    message = r"holds an earlier run's outputs \(modes.png, results.json, results.md\)"
    return {"argv": ["--output_dir", results], "message": message, "kept": [results]}


@case("playground", "output_dir_is_a_file")
def _(tmp_path):
    taken = write_lines(tmp_path / "toy2d", ["not a folder"])
    return {"argv": ["--output_dir", taken], "message": "--output_dir .* is a file", "kept": [taken]}


@case("playground", "nan_learning_rate")
def _(tmp_path):
    argv = ["--learning_rate", "nan", "--output_dir", tmp_path / "toy2d"]
    return {"argv": argv, "message": "--learning_rate: 'nan' is not a finite number"}


@case("benchmark", "output_dir_is_a_file")
def _(tmp_path):
    taken = write_lines(tmp_path / "bench", ["not a folder"])
    return {"argv": ["--quick", "--output_dir", taken], "message": "--output_dir .* is a file", "kept": [taken]}


@case("benchmark", "nan_memory_budget")
def _(tmp_path):
    argv = ["--quick", "--memory_budget_gb", "nan", "--output_dir", tmp_path / "bench"]
    return {"argv": argv, "message": "--memory_budget_gb: 'nan' is not a finite number"}


MODULES = {
    "generate": "examples.eval.generate",
    "score": "examples.eval.score",
    "personalization": "examples.eval.personalization",
    "compare": "examples.eval.compare",
    "select_pairs": "examples.capo.select_pairs",
    "soup": "examples.capo.soup",
    "context_prompts": "examples.mapo.context_prompts",
    "judge_pairs": "examples.mapo.judge_pairs",
    "measure_mismatch": "examples.mapo.measure_mismatch",
    "build_pairs": "examples.mapo.build_pairs",
    "convert_mps": "examples.rewards.convert_mps",
    "make_tiny_assets": "examples.tiny_world.make_tiny_assets",
    "playground": "examples.playground_2d.playground",
    "benchmark": "examples.benchmark.benchmark_efficiency",
}


def contents(path):
    """What an earlier run left at `path`: a folder's files (kit.tree_bytes), or a file's bytes."""
    return tree_bytes(path) if path.is_dir() else path.read_bytes()


@pytest.mark.parametrize("tool, kind", sorted(CASES))
def test_bad_input_is_one_error_line_and_leaves_earlier_outputs_as_they_were(tool, kind, tmp_path, capsys):
    setup = CASES[tool, kind](tmp_path)
    before = {path: contents(path) for path in setup.get("kept", [])}
    capsys.readouterr()  # what making the inputs printed (a tiny model's save) is not the tool's
    error = error_in_process(importlib.import_module(MODULES[tool]), setup["argv"], capsys)
    assert re.search(setup["message"], error), error
    for path, state in before.items():
        assert contents(path) == state, path


# Beyond one line ---


def test_the_user_sees_one_line_from_a_fresh_process(tmp_path):
    """The tools whose __main__ is not run_tool(main, parse_args), and those that stop before torch loads, as users
    run them: `python -m examples.<folder>.<tool>`."""
    for tool, kind in [
        ("make_tiny_assets", "earlier_assets"),
        ("convert_mps", "empty_file"),
        ("compare", "nan_confidence"),
    ]:
        (tmp_path / tool).mkdir()
        setup = CASES[tool, kind](tmp_path / tool)
        result = subprocess.run(
            [sys.executable, "-m", MODULES[tool], *map(str, setup["argv"])],
            cwd=REPO,
            env={**os.environ, **OFFLINE_ENV},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=120,
        )
        assert re.search(setup["message"], one_line_error(result)), result.stdout


def test_generate_draws_again_an_image_that_is_on_disk_but_truncated(tmp_path):
    from examples.eval.generate import image_filename, images_to_draw

    items = [(0, 0), (0, 1), (1, 0)]
    for i, k in items[:2]:
        random_images(1)[0].save(tmp_path / image_filename(i, k))
    truncate(tmp_path / image_filename(0, 1))
    pending, broken = images_to_draw(tmp_path, items)
    assert pending == [(0, 1), (1, 0)] and broken == [(0, 1)]


def test_compare_leaves_out_and_counts_infinite_and_nan_scores(tmp_path, capsys):
    from examples.eval import compare

    base = write_scored_run(tmp_path / "base", {"aesthetic": [1.0, "inf", 3.0, "nan"]})
    tuned = write_scored_run(tmp_path / "tuned", {"aesthetic": [2.0, 3.0, "-inf", 5.0]})
    prefix = tmp_path / "table"
    compare.main(
        compare.parse_args([str(a) for a in ["--runs", base, tuned, "--num_bootstrap", 50, "--output_prefix", prefix]])
    )
    printed = capsys.readouterr().out
    assert "images without a finite score (empty, nan or inf), left out: {'base': 2, 'tuned': 1}" in printed
    table = prefix.with_suffix(".md").read_text()
    assert not re.search(r"\b(inf|nan)\b", table), table
    summary = json.loads(prefix.with_suffix(".json").read_text())
    assert summary["results"]["base"]["aesthetic"]["mean"] == pytest.approx(2.0)  # (1 + 3) / 2 over the two prompts


def test_judge_pairs_keeps_its_config_when_no_pair_is_kept_and_writes_it_when_one_is(tmp_path, capsys):
    """The error exit leaves judge_config.json alone (the table case above); a threshold that keeps pairs then
    writes the new config, from the cached scores and without a model."""
    setup = CASES["judge_pairs", "no_pair_kept_leaves_the_earlier_outputs"](tmp_path)
    argv = [str(arg) for arg in setup["argv"][:-1]] + ["2.5"]
    from examples.mapo import judge_pairs

    judge_pairs.main(judge_pairs.parse_args(argv))
    config = json.loads((tmp_path / "judged" / "judge_config.json").read_text())
    assert config["threshold"] == 2.5 and config["counts"]["kept"] == 2
    assert [row["status"] for row in read_csv(tmp_path / "judged" / "scores.csv")] == ["kept", "kept"]


def test_benchmark_reports_a_failed_child_run_in_one_line_naming_it(tmp_path, capsys, monkeypatch):
    """--latents uncached starts no run before the floors, which write to runs/ (once never created: a
    FileNotFoundError); the floor's child fails on a pipeline that does not load, and the benchmark says so in one
    line naming the run and the child's own last line."""
    from examples.benchmark import benchmark_efficiency as benchmark

    monkeypatch.setattr(benchmark, "device_info", lambda args: {"cuda": False, "gpu": None, "gpu_memory": None})
    monkeypatch.setattr(benchmark, "memory_budget_bytes", lambda args, info: 2**30)
    pipeline = fake_pipeline(tmp_path / "pipeline")
    argv = ["--pretrained_model_name_or_path", pipeline, "--dataset_name", tmp_path / "pairs", "--resolution", 64]
    argv += ["--methods", "mapo", "--latents", "uncached", "--quick", "--output_dir", tmp_path / "bench"]
    error = error_in_process(benchmark, argv, capsys)
    assert re.search(
        r"error: the benchmark's run floor-mapo-0 failed \(exit code \d+\): OSError: .*config\.json.* \(full log: ",
        error,
    )
    assert (tmp_path / "bench" / "runs" / "floor-mapo-0.log").is_file()
