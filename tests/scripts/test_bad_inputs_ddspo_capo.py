"""What users type, refused or counted, in train_ddspo.py and train_capo.py (issue 19's kinds, each against both):

- the output folder: a file, an earlier run's outputs (left byte for byte as they were), one that cannot be written,
  --overwrite with --resume_from_checkpoint; --overwrite deletes only what a run writes;
- numbers: nan and inf for every float flag;
- resuming: a checkpoint of the other kind or another --lora_rank, a missing optimizer.bin, cut weight files;
- data: a dataset with no usable row names how many rows were read and why each group was dropped; a reward that is
  not finite is dropped and counted, never trained on;
- writes: an error while a single output file is written leaves the earlier file.

Every check happens before any model loads, so the cases run in-process (parse_args, prepare_rows); one subprocess
per script shows the line as a user sees it: exit code 2, one `error:` line, no traceback.
"""

import argparse
import json

import datasets
import numpy as np
import pytest
import torch
from kit import one_line_error, parse_args_refusal, png_bytes, run_python, tree_bytes
from safetensors.torch import save_file

import train_capo
import train_ddspo


SCRIPTS = {"train_ddspo": train_ddspo, "train_capo": train_capo}
FLOAT_FLAGS = {
    "train_ddspo": ["--beta_ddspo", "--min_removal", "--max_removal", "--validation_guidance_scale"],
    "train_capo": ["--beta_capo", "--sigmoid_bias", "--validation_guidance_scale"],
}
for _name in FLOAT_FLAGS:
    FLOAT_FLAGS[_name] += ["--learning_rate", "--adam_beta1", "--adam_beta2", "--adam_weight_decay"]
    FLOAT_FLAGS[_name] += ["--adam_epsilon", "--max_grad_norm"]


@pytest.fixture
def data(tmp_path):
    """A --dataset_name that exists (the flag checks do not read it)."""
    folder = tmp_path / "data"
    folder.mkdir()
    return folder


def fill_with_earlier_outputs(folder, *names):
    """An output folder as an earlier run left it (summary, model card, checkpoint, logs, `names`), and user notes."""
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoint-2" / "optimizer.bin").write_bytes(b"state")
    (folder / "logs").mkdir()
    (folder / "logs" / "events").write_bytes(b"events")
    (folder / "training_summary.json").write_text('{"global_step": 2}')
    (folder / "README.md").write_text("# the earlier model")
    (folder / "notes.txt").write_text("my notes")
    for name in names:
        (folder / name).mkdir()
    return folder


# ----------------------------------------------------------------------------------------------
# The output folder
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS)
def test_an_earlier_runs_outputs_are_refused_and_left_byte_for_byte_as_they_were(script, data, tmp_path, capsys):
    output_dir = fill_with_earlier_outputs(tmp_path / "out", "unet", "validation")
    before = tree_bytes(output_dir)
    line = parse_args_refusal(script, ["--dataset_name", data, "--output_dir", output_dir], capsys)
    names = "README.md, checkpoint-2, logs, training_summary.json, unet and 1 more"  # sorted, five named
    assert f"--output_dir '{output_dir}' holds an earlier run's outputs ({names}). Resume it with " in line
    assert "--resume_from_checkpoint latest, give a new --output_dir, or pass --overwrite to replace them." in line
    assert tree_bytes(output_dir) == before


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_run_into_a_folder_of_earlier_outputs_stops_with_one_line_as_users_see_it(script, data, tmp_path):
    output_dir = fill_with_earlier_outputs(tmp_path / "out", "unet")
    before = tree_bytes(output_dir)
    line = one_line_error(run_python(f"{script}.py", ["--dataset_name", data, "--output_dir", output_dir]))
    assert "holds an earlier run's outputs" in line
    assert tree_bytes(output_dir) == before


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_users_own_files_in_the_output_folder_are_not_an_earlier_run(script, data, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("my notes")
    args = SCRIPTS[script].parse_args(["--dataset_name", str(data), "--output_dir", str(tmp_path / "out")])
    assert SCRIPTS[script].earlier_outputs(args) == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_overwrite_deletes_what_a_run_writes_and_nothing_else(script, data, tmp_path):
    output_dir = fill_with_earlier_outputs(tmp_path / "out", "unet", "validation")
    (output_dir / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    argv = ["--dataset_name", str(data), "--output_dir", str(output_dir), "--overwrite"]
    args = SCRIPTS[script].parse_args(argv)  # accepted
    deleted = SCRIPTS[script].delete_earlier_outputs(args)
    assert deleted == sorted(
        ["README.md", "checkpoint-2", "logs", "pytorch_lora_weights.safetensors", "training_summary.json"]
        + ["unet", "validation"]
    )
    assert sorted(path.name for path in output_dir.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize(
    "case",
    ["a_file", "parent_is_a_file", "under_proc", "overwrite_and_resume", "latest_without_checkpoints"],
)
def test_an_output_folder_that_cannot_be_used_is_one_line_before_anything_loads(script, case, data, tmp_path, capsys):
    argv = ["--dataset_name", data]
    if case == "a_file":
        (tmp_path / "out").write_text("a file")
        argv += ["--output_dir", tmp_path / "out"]
        expected = f"--output_dir '{tmp_path / 'out'}' is a file; give a folder (it is created if missing)."
    elif case == "parent_is_a_file":
        (tmp_path / "parent").write_text("a file")
        argv += ["--output_dir", tmp_path / "parent" / "out"]
        expected = f"--output_dir '{tmp_path / 'parent' / 'out'}' cannot be written (Not a directory)."
    elif case == "under_proc":
        argv += ["--output_dir", "/proc/no-such-folder/out"]
        expected = "--output_dir '/proc/no-such-folder/out' cannot be written ("
    elif case == "overwrite_and_resume":
        fill_with_earlier_outputs(tmp_path / "out")
        argv += ["--output_dir", tmp_path / "out", "--overwrite", "--resume_from_checkpoint", "latest"]
        expected = "--overwrite deletes the earlier run's outputs that --resume_from_checkpoint continues"
    else:
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "training_summary.json").write_text("{}")
        argv += ["--output_dir", tmp_path / "out", "--resume_from_checkpoint", "latest"]
        expected = "It has no checkpoint-N to resume: give a new --output_dir, or pass --overwrite"
    before = tree_bytes(tmp_path)
    assert expected in parse_args_refusal(script, argv, capsys)
    assert tree_bytes(tmp_path) == before


# ----------------------------------------------------------------------------------------------
# Numbers
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_float_flag_is_a_finite_float_and_is_listed_here(script, monkeypatch):
    captured = {}

    def capture(parser, args=None, namespace=None):
        captured["parser"] = parser
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        SCRIPTS[script].parse_args([])
    finite_float = SCRIPTS[script].finite_float
    floats = []
    for action in captured["parser"]._actions:
        if action.type in (float, finite_float) or isinstance(action.default, float):
            floats.append(action)
    assert {action.option_strings[0] for action in floats} == set(FLOAT_FLAGS[script])
    assert all(action.type is finite_float for action in floats)


@pytest.mark.parametrize("script,flag", [(script, flag) for script, flags in FLOAT_FLAGS.items() for flag in flags])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_and_infinities_are_refused_for_every_float_flag(script, flag, value, data, tmp_path, capsys):
    line = parse_args_refusal(
        script, ["--dataset_name", data, "--output_dir", tmp_path / "out", f"{flag}={value}"], capsys
    )
    assert f"argument {flag}: '{value}' is not a finite number" in line
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Resuming
# ----------------------------------------------------------------------------------------------
def lora_checkpoint(folder, rank=4, optimizer=True):
    """A LoRA checkpoint as the scripts save it: diffusers-named down/up projections and accelerate's optimizer.bin."""
    folder.mkdir(parents=True)
    weights = {
        "unet.down_blocks.0.attentions.0.to_q.lora.down.weight": torch.zeros(rank, 8),
        "unet.down_blocks.0.attentions.0.to_q.lora.up.weight": torch.zeros(8, rank),
    }
    save_file(weights, str(folder / "pytorch_lora_weights.safetensors"))
    if optimizer:
        torch.save({"state": {}}, folder / "optimizer.bin")
    return folder


def unet_checkpoint(folder):
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    save_file({"conv_in.weight": torch.zeros(4, 4)}, str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    torch.save({"state": {}}, folder / "optimizer.bin")
    return folder


def cut(path, keep=-20):
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize(
    "case",
    ["lora_into_full", "other_lora_rank", "no_optimizer", "optimizer_cut", "lora_cut", "unet_cut", "lora_missing"],
)
def test_a_checkpoint_that_does_not_match_the_run_is_refused_naming_what_differs(script, case, data, tmp_path, capsys):
    checkpoint = tmp_path / "out" / "checkpoint-3"
    argv = ["--dataset_name", data, "--output_dir", tmp_path / "out", "--resume_from_checkpoint", "latest"]
    if case == "lora_into_full":
        lora_checkpoint(checkpoint)
        expected = f"{checkpoint} holds LoRA weights; resume it with --lora_rank 4."
    elif case == "other_lora_rank":
        lora_checkpoint(checkpoint, rank=4)
        argv += ["--lora_rank", 8]
        expected = f"{checkpoint} holds LoRA weights of rank 4, and this run has --lora_rank 8"
    elif case == "no_optimizer":
        lora_checkpoint(checkpoint, optimizer=False)
        argv += ["--lora_rank", 4]
        expected = f"{checkpoint} lacks optimizer.bin"
    elif case == "optimizer_cut":
        lora_checkpoint(checkpoint)
        cut(checkpoint / "optimizer.bin")
        argv += ["--lora_rank", 4]
        expected = f"{checkpoint / 'optimizer.bin'} is not a complete torch file"
    elif case == "lora_cut":
        lora_checkpoint(checkpoint)
        cut(checkpoint / "pytorch_lora_weights.safetensors")
        argv += ["--lora_rank", 4]
        expected = f"{checkpoint / 'pytorch_lora_weights.safetensors'} is truncated or damaged"
    elif case == "unet_cut":
        unet_checkpoint(checkpoint)
        cut(checkpoint / "unet" / "diffusion_pytorch_model.safetensors")
        expected = f"{checkpoint / 'unet' / 'diffusion_pytorch_model.safetensors'} is truncated or damaged"
    else:
        checkpoint.mkdir(parents=True)
        torch.save({"state": {}}, checkpoint / "optimizer.bin")
        argv += ["--lora_rank", 4]
        expected = f"{checkpoint} lacks pytorch_lora_weights.safetensors"
    before = tree_bytes(tmp_path)
    assert expected in parse_args_refusal(script, argv, capsys)
    assert tree_bytes(tmp_path) == before


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_intact_checkpoint_of_the_runs_kind_resumes(script, data, tmp_path):
    lora_checkpoint(tmp_path / "out" / "checkpoint-3")
    argv = ["--dataset_name", str(data), "--output_dir", str(tmp_path / "out"), "--resume_from_checkpoint", "latest"]
    args = SCRIPTS[script].parse_args([*argv, "--lora_rank", "4"])
    assert args.resume_from_checkpoint == str(tmp_path / "out" / "checkpoint-3")


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
IMAGE, OTHER = png_bytes(np.zeros((8, 8, 3))), png_bytes(np.full((8, 8, 3), 255))


def rows_of(script, count, **columns):
    """`count` rows of the script's schema, with `columns` replacing its defaults, as a pyarrow table."""
    import pyarrow as pa

    if script == "train_ddspo":
        default = {"caption": "a red ball", "negative_caption": "a ball", "jpg_w": IMAGE, "jpg_l": OTHER}
    else:
        default = {"caption": "a red ball", "jpg_pos": IMAGE, "jpg_neg": OTHER, "reward_pos": 0.8, "reward_neg": 0.2}
    kinds = {str: pa.string(), bytes: pa.binary(), float: pa.float64()}
    schema = pa.schema([(name, kinds[type(value)]) for name, value in default.items()])
    return pa.table({name: columns.get(name, [value] * count) for name, value in default.items()}, schema=schema)


@pytest.mark.parametrize(
    "script,columns,expected",
    [
        ("train_ddspo", {}, "0 rows read, none dropped"),
        (
            "train_ddspo",
            {"negative_caption": ["", None, "a red  ball"]},
            "3 rows read, dropped: 2 empty or missing negative caption, 1 negative caption equal to the caption",
        ),
        ("train_capo", {}, "0 rows read, none dropped"),
        (
            "train_capo",
            {"reward_pos": [float("nan"), float("inf"), None]},
            "3 rows read, dropped: 3 reward_pos or reward_neg missing or not finite",
        ),
    ],
    ids=["ddspo-empty", "ddspo-all-dropped", "capo-empty", "capo-no-finite-reward"],
)
def test_a_dataset_without_a_usable_row_says_how_many_rows_were_read_and_why_each_was_dropped(
    script, columns, expected, data, tmp_path
):
    import pyarrow.parquet as pq

    count = len(next(iter(columns.values()))) if columns else 0
    pq.write_table(rows_of(script, count, **columns), data / "train.parquet")
    args = SCRIPTS[script].parse_args(["--dataset_name", str(data), "--output_dir", str(tmp_path / "out")])
    args.seed = 0
    split = SCRIPTS[script].load_split(str(data), "train", cache_dir=str(tmp_path / "cache"))  # as main() reads it
    with pytest.raises(SCRIPTS[script].InputError) as refused:
        SCRIPTS[script].prepare_rows(split, args, "train")
    assert f"has no usable row: {expected}; expected rows with a caption" in str(refused.value)


def test_an_infinite_reward_is_dropped_and_counted_never_trained_on(data, tmp_path):
    args = train_capo.parse_args(["--dataset_name", str(data), "--output_dir", str(tmp_path / "out")])
    table = rows_of("train_capo", 3, caption=["kept", "inf", "-inf"], reward_neg=[0.2, float("inf"), float("-inf")])
    rows = datasets.Dataset.from_dict(table.to_pydict())
    kept, skipped = train_capo.prepare_rows(rows, args, "train")
    assert kept["caption"] == ["kept"] and skipped["non_finite_reward"] == 2


# ----------------------------------------------------------------------------------------------
# Writes
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS)
def test_an_error_while_an_output_file_is_written_leaves_the_earlier_file_and_no_temporary(script, tmp_path):
    summary = tmp_path / "training_summary.json"
    summary.write_text('{"global_step": 2}')

    def fails_halfway(path):
        path.write_text('{"global_st')
        raise OSError("disk full")

    with pytest.raises(OSError):
        SCRIPTS[script].write_atomically(summary, fails_halfway)
    assert summary.read_text() == '{"global_step": 2}' and [p.name for p in tmp_path.iterdir()] == [summary.name]
    SCRIPTS[script].write_atomically(summary, lambda path: path.write_text('{"global_step": 4}'))
    assert summary.read_text() == '{"global_step": 4}' and [p.name for p in tmp_path.iterdir()] == [summary.name]
