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
