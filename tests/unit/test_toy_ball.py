"""The tiny world's judge (examples/rewards/toy_ball.py) on images drawn the way the tiny dataset draws them."""

import io
import json

import numpy as np
import pytest
from kit import run_python
from PIL import Image

from examples.rewards import REWARD_MODELS, RewardInputError, load_reward_model, reward_weights_source
from examples.rewards.toy_ball import COLOR_NAMES, caption_color
from examples.tiny_world import world


@pytest.fixture(scope="module")
def judge():
    return load_reward_model("toy_ball", device="cpu")


def drawn(color, half, seed):
    return world.make_image(color, half, np.random.default_rng(seed), 64)


def test_toy_ball_is_registered_as_a_bradley_terry_reward_with_no_weights():
    assert REWARD_MODELS["toy_ball"].kind == "bradley_terry"
    assert reward_weights_source("toy_ball") == [{"builtin": "toy_ball", "version": 1}]
    with pytest.raises(RewardInputError, match="no weights"):
        reward_weights_source("toy_ball", "/some/folder")


def test_judge_finds_every_drawn_ball_in_its_half_and_names_its_colour(judge):
    for seed in range(60):
        color, half = COLOR_NAMES[seed % len(COLOR_NAMES)], ("top", "bottom")[seed % 2]
        verdict = judge.judge(drawn(color, half, seed), f"a photo of a {color} ball")
        assert verdict["found"], (color, half, seed)
        assert verdict["top"] == (half == "top"), (color, half, seed, verdict["center_y"])
        assert verdict["color"] == color and verdict["color_match"], (color, half, seed, verdict["color"])


def test_a_ball_high_up_in_the_captions_colour_scores_best(judge):
    top, bottom = drawn("red", "top", 1), drawn("red", "bottom", 1)
    score = lambda image, caption: judge.judge(image, caption)["score"]  # noqa: E731
    assert score(top, "a photo of a red ball") > score(bottom, "a photo of a red ball")
    assert score(top, "a photo of a red ball") > score(top, "a photo of a blue ball")  # wrong colour costs


def test_an_image_without_a_ball_is_not_found_and_scores_worst(judge):
    empty = np.full((64, 64, 3), 30, np.uint8) + np.random.default_rng(0).integers(0, 6, (64, 64, 3)).astype(np.uint8)
    verdict = judge.judge(empty, "a photo of a red ball")
    assert not verdict["found"] and not verdict["top"] and not verdict["color_match"]
    assert verdict["score"] < judge.judge(drawn("red", "bottom", 3), "a photo of a blue ball")["score"]


def test_judge_agrees_with_every_label_of_the_tiny_datasets_raters(judge):
    rows = world.make_pairs(96, np.random.default_rng(5), 64)
    for caption, first, second, label in zip(rows["caption"], rows["jpg_0"], rows["jpg_1"], rows["label_0"]):
        scores = [judge.judge(Image.open(io.BytesIO(png)), caption)["score"] for png in (first, second)]
        assert (scores[0] > scores[1]) == (label == 1.0)


def test_caption_colour_is_read_from_the_words_of_the_caption():
    assert caption_color("a photo of a cyan ball") == "cyan"
    assert caption_color("A Photo Of A Red, Shiny Ball") == "red"
    assert caption_color("a photo of a ball") is None


def test_score_py_scores_a_run_with_toy_ball_and_records_it_as_builtin(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = []
    for k, half in enumerate(("top", "bottom")):
        Image.fromarray(drawn("green", half, k)).save(run / f"00000_{k:02d}.png")
        rows.append(
            {"prompt": "a photo of a green ball", "prompt_index": 0, "k": k, "seed": k, "image": f"00000_{k:02d}.png"}
        )
    (run / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = run_python("examples/eval/score.py", ["--run_dirs", run, "--reward_models", "toy_ball"])
    assert result.returncode == 0, result.stdout
    lines = (run / "scores.csv").read_text().splitlines()
    assert lines[0].split(",")[-1] == "toy_ball"
    top_score, bottom_score = (float(line.split(",")[-1]) for line in lines[1:])
    assert top_score > bottom_score
    assert json.loads((run / "scores.csv.sources.json").read_text()) == {
        "toy_ball": [{"builtin": "toy_ball", "version": 1}]
    }
    refused = run_python(
        "examples/eval/score.py",
        ["--run_dirs", run, "--reward_models", "toy_ball", "--reward_model_paths", "toy_ball=x"],
    )
    assert refused.returncode == 2 and "no weights" in refused.stdout
