"""Data handling of both scripts: ties, broken images, joint augmentation, micro-conditioning, clear errors."""

import os

import datasets
import numpy as np
import pytest
import torch
from kit import png_bytes, run_python
from PIL import Image

import train_diffusion_dpo_sdxl
import train_mapo_sdxl


SCRIPTS = [train_diffusion_dpo_sdxl, train_mapo_sdxl]


def solid(value, size=(16, 16)):
    return png_bytes(np.full((*size, 3), value, dtype=np.uint8))


def args_for(script, *extra):
    return script.parse_args(["--resolution", "16", "--seed", "0", *extra])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.__name__)
def test_ties_and_unlabeled_rows_are_dropped_and_counted(script):
    dataset = datasets.Dataset.from_dict(
        {
            "caption": ["a", "b", "c", "d", "e"],
            "jpg_0": [solid(0)] * 5,
            "jpg_1": [solid(255)] * 5,
            "label_0": [1.0, 0.5, 0.0, 0.5, None],
        }
    )
    pairs, dropped = script.prepare_pairs(dataset, args_for(script), "train")
    assert dropped == {"ties": 2, "bad_labels": 1}
    assert pairs["caption"] == ["a", "c"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.__name__)
def test_the_preferred_image_comes_first_whatever_its_column(script):
    dataset = datasets.Dataset.from_dict(
        {"caption": ["x", "y"], "jpg_0": [solid(10), solid(20)], "jpg_1": [solid(200), solid(250)], "label_0": [1, 0]}
    )
    args = args_for(script, "--no_hflip")
    pairs = script.PreferencePairs(script.prepare_pairs(dataset, args, "train")[0], args)
    winner_0, loser_0 = pairs[0]["pixel_values"]
    winner_1, loser_1 = pairs[1]["pixel_values"]
    assert winner_0.mean() < loser_0.mean()  # label 1: jpg_0 (dark) preferred
    assert winner_1.mean() > loser_1.mean()  # label 0: jpg_1 (bright) preferred


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.__name__)
def test_ordered_pair_schema_uses_chosen_and_rejected_columns(script):
    dataset = datasets.Dataset.from_dict({"prompt": ["x"], "chosen": [solid(0)], "rejected": [solid(255)]})
    args = args_for(script, "--chosen_column", "chosen", "--rejected_column", "rejected", "--caption_column", "prompt")
    pairs, dropped = script.prepare_pairs(dataset, args, "train")
    example = script.PreferencePairs(pairs, args)[0]
    assert dropped == {"ties": 0, "bad_labels": 0}
    assert example["caption"] == "x" and example["pixel_values"][0].mean() < example["pixel_values"][1].mean()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.__name__)
def test_undecodable_image_is_skipped_and_counted(script):
    dataset = datasets.Dataset.from_dict(
        {
            "caption": ["ok", "broken", "ok too"],
            "jpg_0": [solid(0), b"\xff\xd8 not a jpeg", solid(0)],
            "jpg_1": [solid(255)] * 3,
            "label_0": [1.0, 1.0, 1.0],
        }
    )
    args = args_for(script)
    pairs = script.PreferencePairs(script.prepare_pairs(dataset, args, "train")[0], args)
    batch = script.collate_fn([pairs[i] for i in range(3)])
    assert batch["num_skipped"] == 1
    assert batch["skipped"][0][0] == 1 and "UnidentifiedImageError" in batch["skipped"][0][1]
    assert (
        batch["caption"] == ["ok", "ok too"]
        and batch["index"] == [0, 2]
        and batch["pixel_values"].shape == (2, 2, 3, 16, 16)
    )


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.__name__)
def test_joint_crop_and_flip_keep_the_pair_aligned_and_time_ids_match_the_crop(script):
    rng = np.random.default_rng(0)
    winner = rng.integers(0, 256, size=(24, 40, 3), dtype=np.uint8)  # landscape: h 24, w 40
    loser = 255 - winner  # pixel-wise partner of the winner
    images = [Image.fromarray(winner), Image.fromarray(loser)]
    flips = set()
    for seed in range(12):
        pixels, time_ids = script.crop_and_flip_pair(
            images, 16, random_crop=True, hflip=True, rng=np.random.default_rng(seed)
        )
        # Aligned: the loser is still the negative of the winner after the joint transform.
        assert torch.allclose(pixels[1], -pixels[0], atol=2 / 127.5)
        (orig_h, orig_w, top, left, target_h, target_w) = time_ids[0].tolist()
        assert (orig_h, orig_w, target_h, target_w) == (24, 40, 16, 16)
        assert time_ids[1].tolist() == time_ids[0].tolist()
        # The crop window named by (top, left) is where the pixels came from (in the mirrored image if flipped).
        resized = images[0].resize((27, 16), Image.BILINEAR)  # shorter side to 16, aspect kept
        crop = (
            np.asarray(resized.crop((int(left), int(top), int(left) + 16, int(top) + 16)), dtype=np.float32) / 127.5
            - 1
        )
        mirrored = (
            np.asarray(
                resized.transpose(Image.FLIP_LEFT_RIGHT).crop((int(left), int(top), int(left) + 16, int(top) + 16)),
                dtype=np.float32,
            )
            / 127.5
            - 1
        )
        got = pixels[0].permute(1, 2, 0).numpy()
        flipped = np.allclose(got, mirrored, atol=1e-6)
        assert flipped or np.allclose(got, crop, atol=1e-6)
        flips.add(flipped)
    assert flips == {True, False}  # both branches were exercised


def test_center_crop_without_flip_is_deterministic_and_centered():
    image = Image.fromarray(np.arange(32 * 48 * 3, dtype=np.uint32).reshape(32, 48, 3).astype(np.uint8))
    _, time_ids = train_mapo_sdxl.crop_and_flip_pair(
        [image, image], 16, random_crop=False, hflip=False, rng=np.random.default_rng(0)
    )
    assert time_ids[0].tolist() == [32, 48, 0, 4, 16, 16]  # resized to 16x24, centered 4 px from the left


@pytest.mark.parametrize("script", ["train_diffusion_dpo_sdxl.py", "train_mapo_sdxl.py"])
def test_missing_column_stops_before_any_model_is_loaded(tmp_path, script):
    datasets.Dataset.from_dict({"caption": ["x"], "jpg_0": [solid(0)], "jpg_1": [solid(9)]}).to_parquet(
        str(tmp_path / "train.parquet")
    )
    result = run_python(
        script,
        [
            "--dataset_name",
            tmp_path / "train.parquet",
            "--pretrained_model_name_or_path",
            "no-such-org/no-such-model",  # a hub id: it would fail only when models load
            "--output_dir",
            tmp_path / "out",
        ],
    )
    assert result.returncode == 2
    assert "has no column(s) ['label_0']" in result.stdout and "--label_column" in result.stdout
    assert "Traceback" not in result.stdout


def test_empty_dataset_after_dropping_ties_is_a_clear_error(tmp_path):
    datasets.Dataset.from_dict(
        {"caption": ["x"], "jpg_0": [solid(0)], "jpg_1": [solid(9)], "label_0": [0.5]}
    ).to_parquet(str(tmp_path / "train.parquet"))
    result = run_python(
        "train_mapo_sdxl.py",
        [
            "--dataset_name",
            tmp_path / "train.parquet",
            "--pretrained_model_name_or_path",
            "no-such-org/no-such-model",  # a hub id: it would fail only when models load
            "--output_dir",
            tmp_path / "out",
        ],
    )
    assert result.returncode == 2 and "no preference pairs left after dropping 1 ties" in result.stdout


@pytest.mark.parametrize(
    "script,flag",
    [
        ("train_mapo_sdxl.py", "--beta_mapo"),
        ("train_diffusion_dpo_sdxl.py", "--beta_dpo"),
        ("train_mapo_sdxl.py", "--snr_value"),
    ],
)
def test_non_positive_beta_is_refused(script, flag):
    result = run_python(script, [flag, "0"])
    assert result.returncode == 2 and f"{flag} must be positive" in result.stdout


def test_unknown_lr_scheduler_is_refused_with_the_choices():
    result = run_python("train_mapo_sdxl.py", ["--lr_scheduler", "cosine_annealing"])
    assert (
        result.returncode == 2
        and "invalid choice: 'cosine_annealing'" in result.stdout
        and "cosine_with_restarts" in result.stdout
    )


def test_model_with_unsupported_prediction_type_is_refused(tiny_assets, tmp_path):
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_assets["model"], model)
    config_path = model / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["prediction_type"] = "sample"
    config_path.write_text(json.dumps(config))
    result = run_python(
        "train_mapo_sdxl.py",
        [
            "--pretrained_model_name_or_path",
            model,
            "--dataset_name",
            tiny_assets["dataset"],
            "--output_dir",
            tmp_path / "out",
            "--report_to",
            "none",
        ],
    )
    assert result.returncode == 2 and "found prediction_type='sample'" in result.stdout


@pytest.mark.parametrize(
    "script_name",
    ["train_diffusion_dpo_sdxl", "train_mapo_sdxl", "train_ddspo", "train_capo", "train_diffusion_dpo_sd3"],
)
def test_a_rewritten_dataset_folder_whose_card_declares_its_files_loads_its_new_rows(script_name, tmp_path):
    # examples/capo/select_pairs.py and examples/ddspo/generate_pairs.py write such a card; datasets keys the cache
    # of a `configs:` card on its file patterns, so without naming the files a rerun would train on the old rows.
    import importlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    script = importlib.import_module(script_name)
    folder = tmp_path / "pairs"
    folder.mkdir()
    card = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: train.parquet\n---\n"
    (folder / "README.md").write_text(card)
    cache = str(tmp_path / "cache")
    for rows in (1, 3):
        pq.write_table(pa.table({"caption": [f"prompt {i}" for i in range(rows)]}), folder / "train.parquet")
        os.utime(folder / "train.parquet", (rows, rows))  # distinct modification times, however fast the rewrite
        assert len(script.load_split(str(folder), "train", cache_dir=cache)) == rows


@pytest.mark.parametrize(
    "script_name",
    ["train_diffusion_dpo_sdxl", "train_mapo_sdxl", "train_ddspo", "train_capo", "train_diffusion_dpo_sd3"],
)
def test_two_dataset_folders_of_one_name_and_card_each_load_their_own_rows(script_name, tmp_path):
    # A plain load_dataset(folder) keys such a folder's cache on its name and its card's patterns: the second folder
    # would read the first's rows.
    import importlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    script = importlib.import_module(script_name)
    card = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: train.parquet\n---\n"
    cache = str(tmp_path / "cache")
    for parent, rows in (("first", 1), ("second", 2)):
        folder = tmp_path / parent / "pairs"
        folder.mkdir(parents=True)
        (folder / "README.md").write_text(card)
        pq.write_table(pa.table({"caption": [parent] * rows}), folder / "train.parquet")
        assert script.load_split(str(folder), "train", cache_dir=cache)["caption"] == [parent] * rows
