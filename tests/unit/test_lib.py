"""examples/lib's output-folder policy and number type, shared by every tool under examples/."""

import argparse

import pytest

from examples.lib.cli import InputError, finite_float
from examples.lib.files import prepare_output_folder


def test_a_folder_with_an_earlier_runs_outputs_is_refused_and_left_as_it_was(tmp_path):
    (tmp_path / "scores.csv").write_text("old")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"holds an earlier run's outputs \(scores.csv\).*--overwrite") as error:
        prepare_output_folder(tmp_path, ["*.csv"])
    assert "\n" not in str(error.value)
    assert (tmp_path / "scores.csv").read_text() == "old"


def test_overwrite_deletes_only_the_earlier_outputs(tmp_path):
    (tmp_path / "scores.csv").write_text("old")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "0.png").write_bytes(b"png")
    (tmp_path / "notes.txt").write_text("mine")
    assert prepare_output_folder(tmp_path, ["*.csv", "images"], overwrite=True) == ["images", "scores.csv"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]


def test_a_file_or_an_unwritable_place_is_refused_before_any_work(tmp_path):
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(InputError, match="is a file; give a folder"):
        prepare_output_folder(tmp_path / "taken", ["*"])
    with pytest.raises(InputError, match="cannot be written"):
        prepare_output_folder(tmp_path / "taken" / "below", ["*"])  # a file stands where a parent folder should
    assert (tmp_path / "taken").read_text() == "a file"


def test_a_new_folder_is_created(tmp_path):
    assert prepare_output_folder(tmp_path / "a" / "b", ["*"]) == []
    assert (tmp_path / "a" / "b").is_dir()


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "NaN", "seven"])
def test_finite_float_refuses_what_is_not_a_finite_number(text):
    with pytest.raises(argparse.ArgumentTypeError):
        finite_float(text)


def test_finite_float_reads_numbers():
    assert finite_float("1e-5") == 1e-5 and finite_float("-3") == -3.0


def test_a_resumable_folder_is_checked_without_being_created(tmp_path):
    from examples.lib.files import check_writable_folder

    check_writable_folder(tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(InputError, match="is a file"):
        check_writable_folder(tmp_path / "taken")
    with pytest.raises(InputError, match=r"cannot be written \(.*taken' is a file\)"):
        check_writable_folder(tmp_path / "taken" / "below")


def test_a_safetensors_file_is_whole_only_when_its_header_parses_and_its_data_is_all_there(tmp_path):
    import torch
    from safetensors.torch import save_file

    from examples.lib.files import safetensors_problem

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(100)}, path)
    assert safetensors_problem(path) is None
    data = path.read_bytes()
    for cut, problem in [(data[:-10], "truncated"), (b"", "an empty file"), (b"<html>", "not a safetensors file")]:
        path.write_bytes(cut)
        assert safetensors_problem(path).startswith(problem), cut[:20]


def test_an_image_file_is_whole_only_when_every_chunk_reads_back(tmp_path):
    import numpy as np
    from PIL import Image

    from examples.lib.files import image_problem

    path = tmp_path / "0.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(path)
    assert image_problem(path) is None
    data = path.read_bytes()
    for cut, problem in [(data[:-12], "not a readable image"), (b"", "an empty file"), (b"text", "not a readable")]:
        path.write_bytes(cut)
        assert image_problem(path).startswith(problem), cut[:20]
    assert image_problem(tmp_path / "absent.png") == "missing"


def test_a_cut_manifest_is_one_line_naming_the_line(tmp_path):
    from examples.lib.runs import read_manifest

    row = '{"prompt": "a", "prompt_index": 0, "k": 0, "seed": 1, "image": "00000_00.png"}'
    (tmp_path / "manifest.jsonl").write_text(f"{row}\n{row[:30]}")
    with pytest.raises(InputError, match=r"Line 2 of .*manifest.jsonl is not a whole manifest row") as error:
        read_manifest(tmp_path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "no such file or folder"),
        ("binary", r"could not be read as a \.txt prompt file \(UnicodeDecodeError"),
        ("bad_json", r"could not be read as a \.json prompt file \(JSONDecodeError"),
    ],
)
def test_a_prompt_file_that_cannot_be_read_is_one_line_naming_it(tmp_path, kind, message):
    from examples.lib.prompts import read_prompt_set

    path = {"missing": tmp_path / "no" / "p.txt", "binary": tmp_path / "p.txt", "bad_json": tmp_path / "p.json"}[kind]
    if kind == "binary":
        path.write_bytes(bytes(range(128, 256)))
    if kind == "bad_json":
        path.write_text('["a red ball", ')
    with pytest.raises(InputError, match=message) as error:
        read_prompt_set(str(path))
    assert str(path) in str(error.value) and "\n" not in str(error.value)
