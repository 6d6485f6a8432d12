"""Personalization scores (examples/eval/personalization.py, MaPO Table 2) on a tiny random DINOv2 and SigLIP,
loaded through from_pretrained as the published ones are, and hand-made generate.py run folders.

Most tests call the tool's main() in this process (the models load in a fraction of a second); the command-line
behaviours (one error line, compare.py's table) run it as users do.
"""

import csv
import importlib.util
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from kit import copy_run, one_line_error, read_csv, run_python, write_run, write_tiny_dinov2
from PIL import Image

from examples.eval import personalization
from examples.lib.cli import InputError


PROMPTS = ["a photo of <sks> dog", "a photo of <sks> dog on the beach", "a red ball"]
K = 2
WORDS = ["a", "photo", "of", "<sks>", "dog", "on", "the", "beach", "red", "ball"]


def write_tiny_siglip(folder, seed=0):
    """A 2-layer SiglipModel per tower on 32 px images and 16-token texts, a word-level tokenizer (the `tokenizers`
    library: no SentencePiece) and a SigLIP image processor, saved as the hub's are. logit_scale and logit_bias are
    set as a trained SigLIP's are (a large scale, a negative bias), so the probabilities spread."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, SiglipConfig, SiglipImageProcessorPil, SiglipModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{word: i + 3 for i, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=16
    )
    tokenizer.save_pretrained(folder)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = SiglipConfig(
        text_config=dict(
            tower,
            vocab_size=len(vocab),
            max_position_embeddings=16,
            projection_size=32,
            pad_token_id=0,
            bos_token_id=None,
            eos_token_id=1,
        ),
        vision_config=dict(tower, image_size=32, patch_size=8),
    )
    torch.manual_seed(seed)
    model = SiglipModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-1.0)
    model.save_pretrained(folder)
    return folder


def random_image(seed, size=64):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The tiny models, a target folder of one image (target_0), one of two, and a run whose first image is an
    exact copy of target_0."""
    root = tmp_path_factory.mktemp("personalization")
    targets = [random_image(100), random_image(101)]
    for name, count in (("one_target", 1), ("two_targets", 2)):
        (root / name).mkdir()
        for i in range(count):
            targets[i].save(root / name / f"target_{i}.png")
    (root / "two_targets" / "target_0.txt").write_text("a photo of <sks> dog")  # a caption: not an image, ignored
    images = [targets[0]] + [random_image(seed) for seed in range(1, len(PROMPTS) * K)]
    return {
        "root": root,
        "dinov2": write_tiny_dinov2(root / "dinov2"),
        "siglip": write_tiny_siglip(root / "siglip"),
        "one_target": root / "one_target",
        "two_targets": root / "two_targets",
        "run": write_run(root / "runs" / "tuned", PROMPTS, images, K),
        "images": images,
    }


def tool_args(assets, run_dirs, *extra, target_dir=None):
    return [
        "--run_dirs",
        *map(str, run_dirs),
        "--target_dir",
        str(target_dir or assets["one_target"]),
        "--dinov2_model_name_or_path",
        str(assets["dinov2"]),
        "--siglip_model_name_or_path",
        str(assets["siglip"]),
        "--device",
        "cpu",
        *map(str, extra),
    ]


def run_in_process(assets, run_dirs, *extra, target_dir=None):
    personalization.main(personalization.parse_args(tool_args(assets, run_dirs, *extra, target_dir=target_dir)))


def column(run_dir, name, scores_filename="scores.csv"):
    return np.array([float(row[name]) for row in read_csv(run_dir / scores_filename)])


@pytest.fixture(scope="module")
def scored(assets):
    """The run scored once against the one-image target folder (dinov2 and siglip)."""
    run_in_process(assets, [assets["run"]], "--batch_size", 4)
    return assets["run"]


def test_the_tool_explains_itself_with_help():
    result = run_python("examples/eval/personalization.py", ["--help"])
    assert result.returncode == 0 and "--target_dir" in result.stdout and "--prompt_replace" in result.stdout


def test_dinov2_similarity_of_a_target_image_to_itself_is_100_and_to_other_images_less(scored):
    dinov2 = column(scored, "dinov2")
    assert dinov2[0] == pytest.approx(100.0, abs=1e-4)  # image 0 is a copy of the only target image
    assert (dinov2[1:] < 99.0).all()


def test_dinov2_against_several_targets_is_the_mean_of_the_similarities_to_each(assets, scored, tmp_path):
    run_dir = copy_run(assets["run"], tmp_path / "tuned")
    run_in_process(
        assets, [run_dir], "--metrics", "dinov2", "--scores_filename", "two.csv", target_dir=assets["two_targets"]
    )
    (tmp_path / "second_only").mkdir()
    shutil.copy(assets["two_targets"] / "target_1.png", tmp_path / "second_only")
    run_in_process(
        assets,
        [run_dir],
        "--metrics",
        "dinov2",
        "--scores_filename",
        "second.csv",
        target_dir=tmp_path / "second_only",
    )
    both, first, second = (
        column(run_dir, "dinov2", "two.csv"),
        column(scored, "dinov2"),
        column(run_dir, "dinov2", "second.csv"),
    )
    np.testing.assert_allclose(both, (first + second) / 2, rtol=1e-5, atol=1e-4)


def test_siglip_score_is_100_times_the_sigmoid_probability_of_the_model(assets, scored):
    from transformers import AutoImageProcessor, AutoTokenizer, SiglipModel

    model = SiglipModel.from_pretrained(assets["siglip"]).eval()
    tokenizer, processor = (
        AutoTokenizer.from_pretrained(assets["siglip"]),
        AutoImageProcessor.from_pretrained(assets["siglip"]),
    )
    rows = read_csv(scored / "scores.csv")
    images = [Image.open(scored / row["image"]).convert("RGB") for row in rows]
    tokens = tokenizer([row["prompt"] for row in rows], padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        logits = model(
            input_ids=tokens["input_ids"], pixel_values=processor(images=images, return_tensors="pt")["pixel_values"]
        ).logits_per_image
    expected = 100 * torch.sigmoid(logits.diagonal()).numpy()
    np.testing.assert_allclose(column(scored, "siglip"), expected, rtol=1e-6, atol=1e-5)  # float32 resolution
    assert column(scored, "siglip").std() > 0.1  # the tiny model tells the pairs apart


def test_prompt_replace_changes_the_text_siglip_reads_and_is_recorded(assets, scored, tmp_path):
    run_dir = copy_run(assets["run"], tmp_path / "tuned")
    replaced = tmp_path / "replaced.csv"
    run_in_process(
        assets,
        [run_dir],
        "--metrics",
        "siglip",
        "--scores_filename",
        replaced.name,
        "--prompt_replace",
        "<sks> dog=dog",
    )
    # the same images with the identifier gone from their prompts, in a run folder of their own
    plain_prompts = [prompt.replace("<sks> dog", "dog") for prompt in PROMPTS]
    plain = tmp_path / "plain"
    shutil.copytree(assets["run"], plain)
    manifest = [json.loads(line) for line in (plain / "manifest.jsonl").read_text().splitlines()]
    for row in manifest:
        row["prompt"] = plain_prompts[row["prompt_index"]]
    (plain / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in manifest))
    run_in_process(assets, [plain], "--metrics", "siglip", "--scores_filename", replaced.name)
    np.testing.assert_allclose(
        column(run_dir, "siglip", replaced.name), column(plain, "siglip", replaced.name), atol=1e-5
    )
    assert [row["prompt"] for row in read_csv(run_dir / replaced.name)] == [p for p in PROMPTS for _ in range(K)]
    assert not np.allclose(column(run_dir, "siglip", replaced.name)[:4], column(scored, "siglip")[:4], atol=1e-3)
    sources = json.loads((run_dir / f"{replaced.name}.sources.json").read_text())
    assert sources["siglip"][-1] == {"prompt_replace": [["<sks> dog", "dog"]]}


def test_scores_join_score_pys_columns_and_compare_tables_them(assets, tmp_path):
    runs = [
        write_run(tmp_path / name, PROMPTS, [random_image(10 * offset + i) for i in range(len(PROMPTS) * K)], K)
        for offset, name in enumerate(("base", "tuned"))
    ]
    for offset, run_dir in enumerate(runs):  # a table score.py wrote: its aesthetic column and its record
        with open(run_dir / "scores.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["prompt_index", "k", "seed", "prompt", "image", "aesthetic"])
            for row in map(json.loads, (run_dir / "manifest.jsonl").read_text().splitlines()):
                writer.writerow(
                    [row["prompt_index"], row["k"], row["seed"], row["prompt"], row["image"], 5.0 + offset]
                )
        (run_dir / "scores.csv.sources.json").write_text(
            json.dumps({"aesthetic": [{"path": "/models/aesthetic", "sha256": "0" * 64}]})
        )
    result = run_python("examples/eval/personalization.py", tool_args(assets, runs))
    assert result.returncode == 0, result.stdout[-3000:]
    assert "dinov2: 12 computed, 0 already present" in result.stdout
    for offset, run_dir in enumerate(runs):
        rows = read_csv(run_dir / "scores.csv")
        assert list(rows[0]) == ["prompt_index", "k", "seed", "prompt", "image", "aesthetic", "dinov2", "siglip"]
        assert all(float(row["aesthetic"]) == 5.0 + offset for row in rows)
        assert set(json.loads((run_dir / "scores.csv.sources.json").read_text())) == {"aesthetic", "dinov2", "siglip"}
    personal_scores = [read_csv(run_dir / "scores.csv") for run_dir in runs]
    # and score.py, run afterwards with a tiny reward, keeps them
    from examples.tiny_world.tiny_rewards import STAND_INS

    clipscore = STAND_INS["clipscore"](tmp_path / "clipscore", 0)
    scored = run_python(
        "examples/eval/score.py",
        ["--run_dirs", *runs, "--reward_models", "clipscore", "--reward_model_paths", f"clipscore={clipscore}"],
    )
    assert scored.returncode == 0, scored.stdout[-3000:]
    for run_dir, before in zip(runs, personal_scores):
        after = read_csv(run_dir / "scores.csv")
        assert [{key: row[key] for key in ("aesthetic", "dinov2", "siglip")} for row in after] == [
            {key: row[key] for key in ("aesthetic", "dinov2", "siglip")} for row in before
        ]
        assert all(row["clipscore"] for row in after)
    prefix = tmp_path / "report" / "table2"
    compared = run_python(
        "examples/eval/compare.py",
        [
            "--runs",
            *runs,
            "--baseline",
            "base",
            "--metrics",
            "aesthetic",
            "siglip",
            "dinov2",
            "--num_bootstrap",
            200,
            "--output_prefix",
            prefix,
        ],
    )
    assert compared.returncode == 0, compared.stdout[-3000:]
    table = Path(f"{prefix}.md").read_text()
    assert "| Model | Aesthetic | SigLIP | DINOv2 |" in table and "| tuned | 6.000 [" in table
    summary = json.loads(Path(f"{prefix}.json").read_text())
    assert summary["results"]["tuned"]["dinov2"]["mean"] == pytest.approx(column(runs[1], "dinov2").mean(), rel=1e-6)


def test_a_rerun_computes_nothing_and_loads_no_model(assets, scored, tmp_path, capsys, monkeypatch):
    run_dir = copy_run(assets["run"], tmp_path / "tuned")
    before = read_csv(run_dir / "scores.csv")
    monkeypatch.setattr(personalization.Scorer, "load", lambda self: pytest.fail("a model was loaded"))
    capsys.readouterr()
    run_in_process(assets, [run_dir])
    out = capsys.readouterr().out
    assert "dinov2: all 6 scores already present, model not loaded" in out
    assert "siglip: all 6 scores already present, model not loaded" in out
    assert read_csv(run_dir / "scores.csv") == before


def test_other_target_images_for_a_scored_column_stop_before_any_model_loads(assets, scored, tmp_path, monkeypatch):
    run_dir = copy_run(assets["run"], tmp_path / "tuned")
    monkeypatch.setattr(personalization.Scorer, "load", lambda self: pytest.fail("a model was loaded"))
    with pytest.raises(InputError, match="The dinov2 scores in .* come from"):
        run_in_process(assets, [run_dir], target_dir=assets["two_targets"])
    moved = Path(shutil.copytree(assets["one_target"], tmp_path / "moved_targets"))
    run_in_process(assets, [run_dir], target_dir=moved)  # the same images elsewhere: the same targets


def test_an_unreadable_target_file_is_skipped_and_counted(assets, tmp_path, capsys):
    targets = Path(shutil.copytree(assets["two_targets"], tmp_path / "targets"))
    (targets / "broken.jpg").write_bytes(b"not a jpeg")
    names, images, _, skipped = personalization.read_target_images(targets)
    assert names == ["target_0.png", "target_1.png"] and len(images) == 2
    assert [name for name, _ in skipped] == ["broken.jpg"]
    run_dir = copy_run(assets["run"], tmp_path / "tuned")
    run_in_process(assets, [run_dir], "--metrics", "dinov2", "--scores_filename", "broken.csv", target_dir=targets)
    assert "warning: skipped 1 image files of" in capsys.readouterr().out
    run_in_process(
        assets, [run_dir], "--metrics", "dinov2", "--scores_filename", "clean.csv", target_dir=assets["two_targets"]
    )
    np.testing.assert_allclose(
        column(run_dir, "dinov2", "broken.csv"), column(run_dir, "dinov2", "clean.csv"), rtol=0, atol=1e-4
    )


@pytest.mark.parametrize("content", ["empty", "captions_only", "unreadable_only"])
def test_a_target_folder_without_a_readable_image_stops_with_one_error_line(assets, tmp_path, content):
    targets = tmp_path / "targets"
    targets.mkdir()
    if content == "captions_only":
        (targets / "target_0.txt").write_text("a photo of <sks> dog")
    if content == "unreadable_only":
        (targets / "target_0.png").write_bytes(b"\x89PNG broken")
    result = run_python("examples/eval/personalization.py", tool_args(assets, [assets["run"]], target_dir=targets))
    line = one_line_error(result)
    assert "expected the subject's target images" in line
    assert ("1 image files that do not decode" in line) == (content == "unreadable_only")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--target_dir", "no/such/folder"], "is not a folder"),
        (["--metrics", "dinov2"], "give --target_dir FOLDER"),
        (["--metrics", "siglip", "--prompt_replace", "sks"], "look like OLD=NEW"),
    ],
    ids=["missing_folder", "no_target_dir", "bad_replace"],
)
def test_bad_flags_stop_with_one_error_line(assets, flags, message):
    args = ["--run_dirs", assets["run"], *flags]
    assert message in one_line_error(run_python("examples/eval/personalization.py", args))


def test_published_weights_that_are_not_cached_offline_stop_with_one_line(assets, tmp_path):
    run_dir = write_run(tmp_path / "fresh", PROMPTS, assets["images"], K)
    result = run_python(
        "examples/eval/personalization.py", ["--run_dirs", run_dir, "--target_dir", assets["one_target"]]
    )
    line = one_line_error(result)
    assert "'facebook/dinov2-base' is neither in the local hub cache nor reachable" in line
    assert not (run_dir / "scores.csv").exists()


@pytest.mark.skipif(importlib.util.find_spec("sentencepiece") is not None, reason="sentencepiece is installed")
def test_a_sentencepiece_tokenizer_without_its_package_stops_before_any_scoring(assets, tmp_path, monkeypatch):
    siglip = Path(shutil.copytree(assets["siglip"], tmp_path / "siglip"))  # as google/siglip-* ship theirs
    (siglip / "tokenizer.json").unlink()
    (siglip / "spiece.model").write_bytes(b"a SentencePiece model")
    (siglip / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "SiglipTokenizer"}))
    monkeypatch.setattr(personalization.Scorer, "load", lambda self: pytest.fail("a model was loaded"))
    run_dir = write_run(tmp_path / "fresh", PROMPTS, assets["images"], K)
    args = tool_args(assets, [run_dir])
    args[args.index("--siglip_model_name_or_path") + 1] = str(siglip)
    with pytest.raises(InputError, match=r"requires the SentencePiece library.*pip install sentencepiece"):
        personalization.main(personalization.parse_args(args))
