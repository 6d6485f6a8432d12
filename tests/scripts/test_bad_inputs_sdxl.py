"""Bad input to the three SDXL scripts (train_diffusion_dpo_sdxl.py, train_mapo_sdxl.py and
train_mapo_personalization_sdxl.py), table driven: an output folder that is a file, holds an earlier run's outputs or
cannot be written; a checkpoint that does not match the run or is cut short; a number that is not finite; a label
that is not a preference; a dataset with no usable rows. Each stops with one `error:` line (exit status 2, no
traceback) before anything loads, and leaves an earlier run's files byte for byte as they were; `--overwrite` deletes
those outputs, and nothing else, when training starts. In-process where the check runs before the models load; one
subprocess per script for the line a user sees."""

import argparse
import importlib
import math
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from kit import (
    launch,
    one_line_error,
    one_line_error_under_accelerate,
    parse_args_refusal,
    png_bytes,
    run_python,
    summary_of,
    tiny_args,
    tree_bytes,
)
from safetensors.numpy import save_file


SCRIPTS = ["train_diffusion_dpo_sdxl", "train_mapo_sdxl", "train_mapo_personalization_sdxl"]
PAIR_SCRIPTS = ["train_diffusion_dpo_sdxl", "train_mapo_sdxl"]  # those that read preference labels
PERSONALIZATION = "train_mapo_personalization_sdxl"


def script_argv(name, tmp_path, output_dir, *extra):
    """Flags that take `name` through its checks; the models are hub ids, never loaded here."""
    argv = ["--output_dir", str(output_dir)]
    if name == PERSONALIZATION:
        argv += ["--instance_data_dir", str(tmp_path)]
    return [*argv, *map(str, extra)]


def earlier_run(tmp_path):
    """An earlier LoRA run's outputs in tmp_path/out, with a user's own notes beside them."""
    folder = tmp_path / "out"
    folder.mkdir(parents=True)
    for name in ("training_summary.json", "README.md", "pytorch_lora_weights.safetensors"):
        (folder / name).write_text(f"earlier {name}")
    (folder / "logs" / "run").mkdir(parents=True)
    (folder / "logs" / "run" / "events").write_bytes(b"\x00earlier events")
    (folder / "notes.txt").write_text("mine")
    return folder


def a_file(tmp_path):
    (tmp_path / "out").write_text("a file")
    return tmp_path / "out"


def below_a_file(tmp_path):
    (tmp_path / "taken").write_text("a file")
    return tmp_path / "taken" / "out"


def under_proc(tmp_path):
    return Path("/proc/no-such-folder/out")  # tests run as root: chmod would not stop them writing


EARLIER = "holds an earlier run's outputs (README.md, logs, pytorch_lora_weights.safetensors, training_summary.json)."
OUTPUT_FOLDER_CASES = {
    "file": (a_file, [], "is a file; give a folder (it is created if missing)."),
    "earlier_run": (
        earlier_run,
        [],
        f"{EARLIER} Resume it with --resume_from_checkpoint latest, give a new --output_dir, or pass --overwrite to "
        "replace them.",
    ),
    "earlier_run_but_no_checkpoint_to_resume": (
        earlier_run,
        ["--resume_from_checkpoint", "latest"],
        f"{EARLIER} It has no checkpoint-N to resume: give a new --output_dir, or pass --overwrite (without "
        "--resume_from_checkpoint) to replace them.",
    ),
    "parent_is_a_file": (below_a_file, [], "cannot be written (Not a directory)."),
    "under_proc": (under_proc, [], "cannot be written ("),
}


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("case", OUTPUT_FOLDER_CASES)
def test_an_output_folder_this_run_may_not_write_is_refused_before_anything_loads(tmp_path, capsys, name, case):
    make, flags, message = OUTPUT_FOLDER_CASES[case]
    output_dir = make(tmp_path)
    before = tree_bytes(tmp_path)
    line = parse_args_refusal(name, script_argv(name, tmp_path, output_dir, *flags), capsys)
    assert f"--output_dir '{output_dir}' {message}" in line, line
    assert tree_bytes(tmp_path) == before
    assert not list(tmp_path.rglob(".write-check*"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_overwrite_is_refused_with_resume_from_checkpoint(tmp_path, capsys, name):
    output_dir = earlier_run(tmp_path)
    before = tree_bytes(tmp_path)
    argv = script_argv(name, tmp_path, output_dir, "--overwrite", "--resume_from_checkpoint", "latest")
    line = parse_args_refusal(name, argv, capsys)
    assert "--overwrite deletes the earlier run's outputs that --resume_from_checkpoint continues" in line
    assert tree_bytes(tmp_path) == before


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_folder_of_a_users_own_files_or_a_new_one_is_taken_and_nothing_is_created_before_the_run(tmp_path, name):
    script = importlib.import_module(name)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    script.parse_args(script_argv(name, tmp_path, tmp_path / "out"))
    script.parse_args(script_argv(name, tmp_path, tmp_path / "new" / "deeper"))
    assert tree_bytes(tmp_path) == {"out/notes.txt": b"mine"}
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["notes.txt", "out"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_overwrite_deletes_the_earlier_outputs_and_nothing_else_when_training_starts(tmp_path, name):
    script = importlib.import_module(name)
    output_dir = earlier_run(tmp_path)
    for folder in ("checkpoint-2", "validation", "unet", "rejected_samples"):
        (output_dir / folder).mkdir()
        (output_dir / folder / "file").write_text(folder)
    if name == PERSONALIZATION:
        (output_dir / "textual_inversion.safetensors").write_text("earlier embeddings")
    before = tree_bytes(output_dir)
    args = script.parse_args(script_argv(name, tmp_path, output_dir, "--overwrite"))
    assert tree_bytes(output_dir) == before  # the flags are checked; nothing is deleted yet
    script.remove_earlier_outputs(args)
    # rejected_samples/ is the personalization script's cache of base-model samples, reused by later runs
    assert sorted(path.name for path in output_dir.iterdir()) == ["notes.txt", "rejected_samples"]


def test_personalization_counts_its_token_embeddings_as_an_earlier_output(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "textual_inversion.safetensors").write_text("earlier embeddings")
    line = parse_args_refusal(PERSONALIZATION, script_argv(PERSONALIZATION, tmp_path, tmp_path / "out"), capsys)
    assert "holds an earlier run's outputs (textual_inversion.safetensors)" in line


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_user_sees_one_line_and_the_earlier_run_is_left_byte_for_byte(tmp_path, name):
    output_dir = earlier_run(tmp_path)
    before = tree_bytes(tmp_path)
    line = one_line_error(run_python(f"{name}.py", script_argv(name, tmp_path, output_dir)))
    assert f"error: --output_dir '{output_dir}' {EARLIER}" in line
    assert tree_bytes(tmp_path) == before


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_failed_write_leaves_the_earlier_file_and_no_temporary_one(tmp_path, name):
    script = importlib.import_module(name)
    target = tmp_path / "training_summary.json"
    target.write_text("earlier")

    def fail_halfway(path):
        path.write_text("half")
        raise OSError("No space left on device")

    with pytest.raises(OSError):
        script.write_atomically(target, fail_halfway)
    assert [path.name for path in tmp_path.iterdir()] == ["training_summary.json"] and target.read_text() == "earlier"


# Resuming ---


def checkpoint(folder, rank=4, lora=True, text_encoders=False, token=None):
    """A checkpoint-N folder as the scripts write one: the LoRA file (or unet/), token embeddings, optimizer.bin."""
    folder.mkdir(parents=True)
    if lora:
        prefixes = ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
        if text_encoders:
            prefixes += [f"{encoder}.text_model.encoder.layers.0.self_attn.q_proj" for encoder in ("text_encoder",)]
        tensors = {}
        for prefix in prefixes:
            tensors[f"{prefix}.lora.down.weight"] = np.zeros((rank, 8), np.float32)
            tensors[f"{prefix}.lora.up.weight"] = np.zeros((8, rank), np.float32)
        save_file(tensors, str(folder / "pytorch_lora_weights.safetensors"), metadata={"format": "pt"})
    else:
        (folder / "unet").mkdir()
        (folder / "unet" / "config.json").write_text("{}")
        save_file({"conv_in.weight": np.zeros((4, 4), np.float32)}, str(folder / "unet" / "weights.safetensors"))
    if token is not None:
        embeddings = {"clip_l": np.zeros((1, 4), np.float32), "clip_g": np.zeros((1, 4), np.float32)}
        save_file(embeddings, str(folder / "textual_inversion.safetensors"), metadata={"token": token})
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.bin")
    return folder


def cut_short(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def without(path):
    path.unlink()


# case: (scripts, how the checkpoint is made, what is done to it, the run's flags, the line)
CHECKPOINT_CASES = {
    "other_rank": (SCRIPTS, {}, None, ["--lora_rank", 8], "holds LoRA weights of rank 4, not the --lora_rank 8"),
    "lora_into_full": (SCRIPTS, {}, None, [], "holds LoRA weights; resume it with the --lora_rank"),
    "full_into_lora": (SCRIPTS, {"lora": False}, None, ["--lora_rank", 4], "holds a full UNet"),
    "no_optimizer": (SCRIPTS, {}, ("optimizer.bin", without), ["--lora_rank", 4], "has no optimizer.bin"),
    "cut_optimizer": (
        SCRIPTS,
        {},
        ("optimizer.bin", cut_short),
        ["--lora_rank", 4],
        "optimizer.bin is not a complete torch file",
    ),
    "cut_lora": (
        SCRIPTS,
        {},
        ("pytorch_lora_weights.safetensors", cut_short),
        ["--lora_rank", 4],
        "pytorch_lora_weights.safetensors is not a complete .safetensors file",
    ),
    "cut_unet": (
        SCRIPTS,
        {"lora": False},
        ("unet/weights.safetensors", cut_short),
        [],
        "weights.safetensors is not a complete .safetensors file",
    ),
    "text_encoders_dropped": (
        [PERSONALIZATION],
        {"text_encoders": True},
        None,
        ["--lora_rank", 4],
        "was written with --train_text_encoder",
    ),
    "text_encoders_added": (
        [PERSONALIZATION],
        {},
        None,
        ["--lora_rank", 4, "--train_text_encoder"],
        "was written without --train_text_encoder",
    ),
    "token_dropped": (
        [PERSONALIZATION],
        {"token": "<sks>"},
        None,
        ["--lora_rank", 4],
        "holds the embeddings of --placeholder_token '<sks>'; resume it with --placeholder_token '<sks>'",
    ),
    "token_added": (
        [PERSONALIZATION],
        {},
        None,
        ["--lora_rank", 4, "--placeholder_token", "<sks>", "--initializer_token", "dog"],
        "holds no textual_inversion.safetensors",
    ),
}


@pytest.mark.parametrize(
    "name,case", [(name, case) for case, (names, *_) in CHECKPOINT_CASES.items() for name in names]
)
def test_a_checkpoint_that_does_not_match_the_run_is_refused_naming_what_differs(tmp_path, capsys, name, case):
    _, made, damage, flags, message = CHECKPOINT_CASES[case]
    found = checkpoint(tmp_path / "out" / "checkpoint-2", **made)
    if damage is not None:
        damage[1](found / damage[0])
    before = tree_bytes(tmp_path)
    argv = script_argv(name, tmp_path, tmp_path / "out", "--resume_from_checkpoint", "latest", *flags)
    line = parse_args_refusal(name, argv, capsys)
    assert str(found) in line and message in line, line
    assert tree_bytes(tmp_path) == before


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_checkpoint_that_matches_the_run_is_resumed(tmp_path, name):
    script = importlib.import_module(name)
    made = {"text_encoders": True, "token": "<sks>"} if name == PERSONALIZATION else {}
    found = checkpoint(tmp_path / "out" / "checkpoint-2", **made)
    flags = ["--lora_rank", 4]
    if name == PERSONALIZATION:
        flags += ["--train_text_encoder", "--placeholder_token", "<sks>", "--initializer_token", "dog"]
    args = script.parse_args(
        script_argv(name, tmp_path, tmp_path / "out", "--resume_from_checkpoint", "latest", *flags)
    )
    assert args.resume_from_checkpoint == str(found)


# Numbers ---


def parser_of(name, monkeypatch):
    """`name`'s argument parser, captured when its parse_args parses."""
    captured = {}

    def capture(self, args=None, namespace=None):
        captured["parser"] = self
        raise SystemExit(0)

    module = importlib.import_module(name)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        module.parse_args([])
    monkeypatch.undo()
    return captured["parser"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_no_number_flag_takes_nan_or_an_infinity(tmp_path, capsys, monkeypatch, name):
    script = importlib.import_module(name)
    actions = parser_of(name, monkeypatch)._actions
    assert not [action.option_strings for action in actions if action.type is float]
    flags = [action.option_strings[0] for action in actions if action.type is script.finite_float]
    assert "--learning_rate" in flags and "--adam_epsilon" in flags and len(flags) >= 8, flags
    for flag in flags:
        for value in ("nan", "inf", "-inf"):
            line = parse_args_refusal(name, script_argv(name, tmp_path, tmp_path / "out", f"{flag}={value}"), capsys)
            assert f"argument {flag}: '{value}' is not a finite number" in line


# Labels and empty datasets ---


def labelled_pairs(labels):
    """A Pick-a-Pic-schema dataset, one row per label, the captions naming the rows."""
    image = png_bytes(np.zeros((8, 8, 3)))
    rows = len(labels)
    return datasets.Dataset.from_dict(
        {
            "caption": [f"row {i}" for i in range(rows)],
            "jpg_0": [image] * rows,
            "jpg_1": [image] * rows,
            "label_0": labels,
        }
    )


@pytest.mark.parametrize("name", PAIR_SCRIPTS)
def test_labels_that_are_not_a_preference_are_dropped_counted_and_never_trained_on(name):
    script = importlib.import_module(name)
    args = script.parse_args(["--seed", "0"])
    kept, dropped = script.prepare_pairs(
        labelled_pairs([1.0, 2.0, 0.0, -1.0, math.nan, None, math.inf, 0.5]), args, "train"
    )
    assert kept["caption"] == ["row 0", "row 2"]
    assert dropped == {"ties": 1, "bad_labels": 5}
    as_text = labelled_pairs(["1", "yes", "0"])  # a label column stored as text
    kept, dropped = script.prepare_pairs(as_text, args, "train")
    assert kept["caption"] == ["row 0", "row 2"] and dropped == {"ties": 0, "bad_labels": 1}


@pytest.mark.parametrize("name", PAIR_SCRIPTS)
@pytest.mark.parametrize(
    "labels,message",
    [
        ([], "has 0 rows; expected at least one preference pair."),
        (
            [0.5, 2.0, None],
            "no preference pairs left after dropping 1 ties and 2 rows whose 'label_0' is missing or not 0, 0.5 or 1, "
            "of the 3 rows read",
        ),
    ],
    ids=["no_rows", "no_usable_rows"],
)
def test_a_dataset_without_a_usable_pair_is_one_line_that_counts_what_was_dropped(name, labels, message):
    script = importlib.import_module(name)
    dataset = labelled_pairs(labels) if labels else labelled_pairs([1.0]).select([])
    with pytest.raises(script.InputError, match=re.escape(message)):
        script.prepare_pairs(dataset, script.parse_args(["--seed", "0"]), "train")


def empty_parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"caption": pa.array([], pa.string()), "label_0": pa.array([], pa.float64())}), path)


DATA_FILES = {
    "empty.parquet": (empty_parquet, "the file has 0 rows"),
    "empty.jsonl": (lambda path: path.write_bytes(b""), "the file has 0 rows"),
    "binary.parquet": (lambda path: path.write_bytes(b"\x00\x01 not parquet"), "Parquet magic bytes not found"),
}


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("file_name", DATA_FILES)
def test_a_data_file_without_rows_or_not_of_its_format_is_one_line_naming_it(tmp_path, name, file_name):
    script = importlib.import_module(name)
    write, reason = DATA_FILES[file_name]
    write(tmp_path / file_name)
    with pytest.raises(
        script.InputError, match=re.escape(f"Could not load split 'train' of '{tmp_path / file_name}'")
    ) as error:
        script.load_split(str(tmp_path / file_name), "train", cache_dir=str(tmp_path / "cache"))
    assert reason in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("caption_file", ["subject.txt", "metadata.jsonl"])
def test_a_caption_file_that_is_not_text_is_one_line_naming_it(tmp_path, caption_file):
    script = importlib.import_module(PERSONALIZATION)
    (tmp_path / "subject.png").write_bytes(png_bytes(np.zeros((8, 8, 3))))
    (tmp_path / caption_file).write_bytes(b"\xff\xfe\x00 binary")
    args = script.parse_args(["--instance_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(script.InputError, match=re.escape(f"{tmp_path / caption_file} could not be read as UTF-8")):
        script.read_instances(args)


# A real run ---


@pytest.mark.slow
def test_a_lora_run_with_overwrite_replaces_a_full_fine_tunes_outputs_and_keeps_the_users_files(tiny_assets, tmp_path):
    output_dir = tmp_path / "out"
    for folder in ("unet", "checkpoint-3", "logs"):
        (output_dir / folder).mkdir(parents=True)
        (output_dir / folder / "file").write_text("earlier")
    (output_dir / "README.md").write_text("earlier card")
    (output_dir / "notes.txt").write_text("mine")
    args = tiny_args(tiny_assets, output_dir, "--lora_rank", 4, "--max_train_steps", 1, "--overwrite")
    launch("train_diffusion_dpo_sdxl.py", args)
    names = sorted(path.name for path in output_dir.iterdir())
    assert names == ["README.md", "notes.txt", "pytorch_lora_weights.safetensors", "training_summary.json"], names
    assert (output_dir / "notes.txt").read_text() == "mine" and "earlier" not in (output_dir / "README.md").read_text()
    assert summary_of(output_dir)["lora_rank"] == 4 and summary_of(output_dir)["skipped_bad_labels"] == 0


@pytest.mark.slow
def test_a_dataset_whose_images_are_not_images_stops_with_one_line_naming_a_pair(tiny_assets, tmp_path):
    rows = {"caption": ["a", "b"], "jpg_0": [b"not an image"] * 2, "jpg_1": [b"nor this"] * 2, "label_0": [1.0, 0.0]}
    (tmp_path / "data").mkdir()
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "data" / "train.parquet"))
    data = {"model": tiny_assets["model"], "dataset": tmp_path / "data"}
    result = launch(
        "train_diffusion_dpo_sdxl.py",
        tiny_args(data, tmp_path / "out", "--max_train_steps", 1),
        check=False,
        accelerate=True,  # under the launcher: still one line, and no traceback through the script
    )
    line = one_line_error_under_accelerate(result, "train_diffusion_dpo_sdxl.py")
    assert "Every pair of a batch" in line and "had an undecodable image" in line and "UnidentifiedImageError" in line
