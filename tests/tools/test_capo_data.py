"""CaPO's data tools (examples/capo): calibrated rewards (Eq. 7, 28), frontier-based pair selection (§4.3), the
pair dataset select_pairs.py writes from a scored run folder, and the SLERP model soup (Eq. 29)."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from kit import one_line_error, read_parquet, run_python
from PIL import Image

from examples.capo.soup import default_lambdas, merge_task_vectors, slerp, slerp_coefficients
from examples.lib.calibration import (
    best_worst_pair,
    calibrate,
    dominating_none,
    frontier_pairs,
    frontier_sets,
    non_dominated,
    select_pairs,
)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------------------------------------------------------
# Calibration (Eq. 7, Eq. 2, Eq. 28)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bradley_terry", "probability"])
def test_calibrated_rewards_lie_between_zero_and_one(kind):
    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 1, 16) if kind == "probability" else rng.normal(0, 50, 16)  # wide: sigmoids saturate
    calibrated = calibrate(scores, kind)
    assert calibrated.shape == (16,)
    assert (calibrated >= 0).all() and (calibrated <= 1).all()


def test_three_bradley_terry_scores_calibrate_to_the_hand_computed_win_rates():
    # scores 0, 1, 3: R_ca(x_i) = (sigmoid(s_i - s_j) + sigmoid(s_i - s_k)) / 2
    # sigmoid(1) = 0.7310586, sigmoid(2) = 0.8807971, sigmoid(3) = 0.9525741
    expected = [
        (0.2689414 + 0.0474259) / 2,  # sigmoid(-1), sigmoid(-3)
        (0.7310586 + 0.1192029) / 2,  # sigmoid(1), sigmoid(-2)
        (0.9525741 + 0.8807971) / 2,  # sigmoid(3), sigmoid(2)
    ]
    np.testing.assert_allclose(calibrate([0.0, 1.0, 3.0], "bradley_terry"), expected, atol=1e-7)


def test_bradley_terry_temperature_divides_the_score_differences():
    scores = np.array([20.0, 21.0, 24.0, 19.5])
    np.testing.assert_allclose(
        calibrate(scores, "bradley_terry", temperature=2.0), calibrate(scores / 2, "bradley_terry")
    )
    np.testing.assert_allclose(
        calibrate([0.0, 3.0], "bradley_terry", temperature=3.0), [sigmoid(-1.0), sigmoid(1.0)], atol=1e-12
    )


def test_probability_scores_calibrate_with_eq_28():
    # P(x > x') = s^a / (s^a + s'^a); three images 0.2, 0.6, 0.2
    expected = [(0.25 + 0.5) / 2, (0.75 + 0.75) / 2, (0.5 + 0.25) / 2]
    np.testing.assert_allclose(calibrate([0.2, 0.6, 0.2], "probability"), expected, atol=1e-12)
    # alpha = 2: 0.04 / (0.04 + 0.36) = 0.1
    np.testing.assert_allclose(calibrate([0.2, 0.6], "probability", alpha=2.0), [0.1, 0.9], atol=1e-12)


@pytest.mark.parametrize("kind", ["bradley_terry", "probability"])
def test_calibrated_rewards_of_a_group_average_one_half(kind):
    # sum_i sum_{k != i} P(x_i > x_k) counts each of the N(N-1)/2 pairs once in each order, and P + P' = 1
    rng = np.random.default_rng(1)
    for size in (2, 3, 16):
        scores = rng.uniform(0, 1, size) if kind == "probability" else rng.normal(20, 3, size)
        assert calibrate(scores, kind, alpha=1.7 if kind == "probability" else 1.0).mean() == pytest.approx(0.5)


def test_calibration_refuses_fewer_than_two_scores_and_non_positive_temperatures():
    with pytest.raises(ValueError):
        calibrate([1.0], "bradley_terry")
    with pytest.raises(ValueError):
        calibrate([1.0, 2.0], "bradley_terry", temperature=0.0)


# ---------------------------------------------------------------------------------------------------------------
# Pair selection (§4.3)
# ---------------------------------------------------------------------------------------------------------------

#          A           B           C           D           E             F           G
POINTS = [(0.9, 0.1), (0.1, 0.9), (0.5, 0.5), (0.4, 0.4), (0.05, 0.05), (0.02, 0.3), (1.0, 0.0)]
A, B, C, D, E, F, G = range(7)


def test_upper_frontier_is_the_set_no_point_dominates():
    assert non_dominated(POINTS).tolist() == [A, B, C, G]  # D < C; E, F below B


def test_lower_frontier_is_the_set_that_dominates_no_point():
    # G = (1.0, 0.0) dominates no one (its second reward is the lowest) and no one dominates it
    assert dominating_none(POINTS).tolist() == [E, F, G]


def test_points_on_both_frontiers_are_removed():
    positives, negatives = frontier_sets(POINTS)
    assert positives == [A, B, C] and negatives == [E, F]


def test_equal_points_do_not_dominate_each_other():
    points = [(0.5, 0.5), (0.5, 0.5), (0.1, 0.1)]
    assert non_dominated(points).tolist() == [0, 1]
    assert frontier_sets(points) == ([0, 1], [2])


def test_frontier_pairs_draw_from_the_filtered_frontiers_and_never_pair_a_point_with_itself():
    rng = np.random.default_rng(0)
    pairs = frontier_pairs(POINTS, num_pairs=100, rng=rng)
    assert sorted(pairs) == [(p, n) for p in (A, B, C) for n in (E, F)]  # every distinct pair once, capped at 3 x 2
    one = frontier_pairs(POINTS, num_pairs=1, rng=np.random.default_rng(3))
    assert len(one) == 1 and one[0][0] in (A, B, C) and one[0][1] in (E, F)


def test_frontier_draws_depend_on_the_seed_only():
    draws = {tuple(frontier_pairs(POINTS, 2, np.random.default_rng(seed))) for seed in range(20)}
    assert len(draws) > 1
    assert frontier_pairs(POINTS, 2, np.random.default_rng(5)) == frontier_pairs(POINTS, 2, np.random.default_rng(5))


def test_coincident_frontiers_give_no_pair_and_say_so():
    incomparable = [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)]  # every point is on both frontiers
    assert frontier_pairs(incomparable, 1, np.random.default_rng(0)) == []
    assert select_pairs(incomparable, "frontier", 1, np.random.default_rng(0)) == ([], "coincident_frontiers")


def test_best_worst_and_sum_take_the_top_and_the_bottom_image():
    assert best_worst_pair([0.2, 0.9, 0.1, 0.5]) == (1, 2)
    calibrated = [(0.9, 0.1), (0.6, 0.7), (0.1, 0.2)]  # sums 1.0, 1.3, 0.3
    assert select_pairs(calibrated, "sum") == ([(1, 2)], None)


def test_groups_that_cannot_give_a_pair_are_skipped_with_their_reason():
    assert select_pairs([[0.5]], "best_worst") == ([], "few_images")
    assert select_pairs([[0.5], [0.5], [0.5]], "best_worst") == ([], "tied")
    assert select_pairs([(0.5, 0.5), (0.5, 0.5)], "frontier", 1, np.random.default_rng(0)) == ([], "tied")
    assert select_pairs([(0.8, 0.2), (0.2, 0.8)], "sum") == ([], "tied")  # the rewards cancel out


# ---------------------------------------------------------------------------------------------------------------
# select_pairs.py end to end, on a hand-made scored run folder
# ---------------------------------------------------------------------------------------------------------------

# prompt index -> (pickscore, hpsv21) per image; None: an empty cell
RUN = {
    0: [(21.0, 27.0), (22.5, 28.5), (20.0, 26.0), (21.5, 29.0)],  # a normal group
    1: [(21.0, 27.0)],  # one image
    2: [(21.0, 27.0), (21.0, 27.0), (21.0, 27.0)],  # all tied
    3: [(23.0, 26.0), (21.0, 28.0)],  # the rewards disagree: the frontiers coincide
    4: [(21.0, 27.0), (None, 27.5), (22.0, float("nan"))],  # two unusable scores leave one image
}
SOURCES = {
    "pickscore": [{"hub": "yuvalkirstain/PickScore_v1", "revision": "0123456789abcdef"}],
    "hpsv21": [{"path": "/models/hps", "sha256": "f" * 64}],
}


def write_scored_run(run_dir):
    """A generate.py + score.py folder: manifest.jsonl, 8x8 PNGs, scores.csv with two rewards (and a column from
    another tool, my_score, all 0.5), its sources."""
    run_dir.mkdir(parents=True)
    manifest, score_rows = [], []
    for prompt_index, images in RUN.items():
        for k, (pickscore, hps) in enumerate(images):
            name = f"{prompt_index:05d}_{k:02d}.png"
            Image.new("RGB", (8, 8), (40 * prompt_index, 60 * k, 7)).save(run_dir / name)
            row = {"prompt": f"prompt {prompt_index}", "prompt_index": prompt_index, "k": k, "seed": k, "image": name}
            manifest.append(row)
            cells = {"pickscore": "" if pickscore is None else repr(pickscore), "hpsv21": repr(hps), "my_score": "0.5"}
            score_rows.append({**row, **cells})
    (run_dir / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in manifest))
    with open(run_dir / "scores.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["prompt_index", "k", "seed", "prompt", "image", "pickscore", "hpsv21", "my_score"])
        writer.writeheader()
        writer.writerows({key: row[key] for key in writer.fieldnames} for row in score_rows)
    (run_dir / "scores.csv.sources.json").write_text(json.dumps(SOURCES))
    return run_dir


@pytest.fixture
def scored_dir(tmp_path):
    return write_scored_run(tmp_path / "sdxl")


def run_select_pairs(*args):
    return run_python("examples/capo/select_pairs.py", [str(arg) for arg in args])


@pytest.mark.parametrize(
    "selection, rewards, prompts, skipped",
    [
        # pickscore alone: prompt 4 keeps images 0 and 2 (its empty cell is image 1's); prompt 3 has a best image
        ("best_worst", ["pickscore"], [0, 3, 4], "fewer than 2 images 1, all scores tied 1"),
        # both rewards: prompt 4 loses two images; prompt 3's calibrated rewards cancel out in the sum
        ("sum", ["pickscore", "hpsv21"], [0], "fewer than 2 images 2, all scores tied 2"),
    ],
    ids=["best_worst", "sum"],
)
def test_select_pairs_writes_pairs_whose_positive_has_the_higher_calibrated_reward(
    scored_dir, tmp_path, selection, rewards, prompts, skipped
):
    output_dir = tmp_path / "pairs"
    result = run_select_pairs(
        "--run_dirs", scored_dir, "--reward_models", *rewards, "--selection", selection, "--output_dir", output_dir
    )
    assert result.returncode == 0, result.stdout[-3000:]
    pairs = read_parquet(output_dir / "train.parquet")
    assert [pair["prompt_index"] for pair in pairs] == prompts
    for pair in pairs:
        assert pair["reward_pos"] > pair["reward_neg"]
        assert pair["reward_pos"] == pytest.approx(np.mean([pair[f"{name}_calibrated_pos"] for name in rewards]))
        assert pair["image_pos"] != pair["image_neg"]
        assert pair["jpg_pos"] == (scored_dir / pair["image_pos"]).read_bytes()
        assert pair["caption"] == f"prompt {pair['prompt_index']}"
    # prompt 0: image 01 is best in both rewards, image 02 worst in both
    assert (pairs[0]["image_pos"], pairs[0]["image_neg"]) == ("00000_01.png", "00000_02.png")
    assert (pairs[0]["pickscore_pos"], pairs[0]["pickscore_neg"]) == (22.5, 20.0)
    assert f"prompts skipped: {skipped}" in result.stdout


def test_select_pairs_frontier_dataset_has_every_column_and_counts_each_skip(scored_dir, tmp_path):
    output_dir = tmp_path / "pairs"
    rewards = ["--reward_models", "pickscore", "hpsv21"]
    result = run_select_pairs("--run_dirs", scored_dir, *rewards, "--pairs_per_prompt", 2, "--output_dir", output_dir)
    assert result.returncode == 0, result.stdout[-3000:]
    pairs = read_parquet(output_dir / "train.parquet")
    columns = ["caption", "jpg_pos", "jpg_neg", "reward_pos", "reward_neg", "prompt_index", "image_pos", "image_neg"]
    for name in ("pickscore", "hpsv21"):
        columns += [f"{name}_calibrated_pos", f"{name}_calibrated_neg", f"{name}_pos", f"{name}_neg"]
    assert set(columns) <= set(pairs[0])
    # prompt 0: image 01 (22.5, 28.5) dominates 00 and 02; 03 (21.5, 29.0) is on the upper frontier too; 02 is lowest
    assert sorted((pair["image_pos"], pair["image_neg"]) for pair in pairs) == [
        ("00000_01.png", "00000_02.png"),
        ("00000_03.png", "00000_02.png"),
    ]
    stdout = result.stdout
    assert "fewer than 2 images 2, all scores tied 1, frontiers coincide 1" in stdout
    assert "missing or non-finite score 2" in stdout
    assert "00004_01.png (pickscore: '')" in stdout and "00004_02.png (hpsv21: 'nan')" in stdout
    card = (output_dir / "README.md").read_text()
    assert "yuvalkirstain/PickScore_v1" in card and "100 * cos" in card and '"selection": "frontier"' in card


def test_select_pairs_output_loads_as_a_datasets_train_split(scored_dir, tmp_path):
    import datasets

    output_dir = tmp_path / "pairs"
    result = run_select_pairs("--run_dirs", scored_dir, "--reward_models", "pickscore", "--output_dir", output_dir)
    assert result.returncode == 0, result.stdout[-3000:]
    dataset = datasets.load_dataset(str(output_dir), split="train", cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == 3 and dataset[0]["jpg_pos"][:8] == b"\x89PNG\r\n\x1a\n"


def test_select_pairs_skips_an_image_whose_file_is_missing(scored_dir, tmp_path):
    (scored_dir / "00000_02.png").unlink()  # the worst image of prompt 0
    result = run_select_pairs("--run_dirs", scored_dir, "--reward_models", "pickscore", "--output_dir", tmp_path / "o")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "image file missing 1" in result.stdout
    assert read_parquet(tmp_path / "o" / "train.parquet")[0]["image_neg"] == "00000_00.png"


def test_select_pairs_never_pairs_a_file_with_itself_under_another_name(scored_dir, tmp_path):
    names = ["00000_00.png", "./00000_00.png"]  # one file
    rows = [
        {"prompt": "prompt 5", "prompt_index": 5, "k": k, "seed": k, "image": name} for k, name in enumerate(names)
    ]
    with open(scored_dir / "manifest.jsonl", "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    with open(scored_dir / "scores.csv", "a", newline="") as f:
        for row, score in zip(rows, (20.0, 25.0)):
            csv.writer(f).writerow([5, row["k"], row["seed"], row["prompt"], row["image"], score, 27.0, 0.5])
    result = run_select_pairs("--run_dirs", scored_dir, "--reward_models", "pickscore", "--output_dir", tmp_path / "o")
    assert result.returncode == 0, result.stdout[-3000:]
    assert "both images the same file 1" in result.stdout
    assert 5 not in [pair["prompt_index"] for pair in read_parquet(tmp_path / "o" / "train.parquet")]


def test_a_prompt_repeated_in_the_list_is_its_own_group_each_time(scored_dir, tmp_path):
    # generate.py --keep_duplicate_prompts samples a repeated prompt once per occurrence, with its own seeds: each
    # occurrence is calibrated and paired on its own, as the paper's N images of one prompt.
    rows = [
        {"prompt": "prompt 0", "prompt_index": 6, "k": k, "seed": 10 + k, "image": f"00006_{k:02d}.png"}
        for k in range(2)
    ]
    for k, row in enumerate(rows):
        Image.new("RGB", (8, 8), (200, 60 * k, 9)).save(scored_dir / row["image"])
    with open(scored_dir / "manifest.jsonl", "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    with open(scored_dir / "scores.csv", "a", newline="") as f:
        for row, score in zip(rows, (20.0, 25.0)):
            csv.writer(f).writerow([6, row["k"], row["seed"], row["prompt"], row["image"], score, 27.0, 0.5])
    result = run_select_pairs("--run_dirs", scored_dir, "--reward_models", "pickscore", "--output_dir", tmp_path / "o")
    assert result.returncode == 0, result.stdout[-3000:]
    pairs = {pair["prompt_index"]: pair for pair in read_parquet(tmp_path / "o" / "train.parquet")}
    assert pairs[0]["caption"] == pairs[6]["caption"] == "prompt 0"
    assert (pairs[0]["image_pos"], pairs[0]["image_neg"]) == ("00000_01.png", "00000_02.png")  # RUN's group 0 alone
    assert (pairs[6]["image_pos"], pairs[6]["image_neg"]) == ("00006_01.png", "00006_00.png")
    assert pairs[6]["reward_pos"] == pytest.approx(1 / (1 + math.exp(-5.0)))  # calibrated within its two images


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--reward_models", "imagereward"], "has no column imagereward"),
        (["--reward_models", "pickscore", "hpsv21", "--selection", "best_worst"], "use --selection sum"),
        (["--reward_models", "pickscore", "--temperature", "pickscore=0"], "must be positive"),
        (["--reward_models", "pickscore", "--temperature", "pickscore=-2"], "must be positive"),
        (["--reward_models", "pickscore", "--reward_kinds", "pickscore=ranking"], "unknown kind 'ranking'"),
        (["--reward_models", "my_score"], "pass --reward_kinds my_score=bradley_terry"),
        (["--reward_models", "pickscor"], "has no column pickscor"),
    ],
    ids=[
        "absent-column",
        "best-worst-with-two-rewards",
        "zero-temperature",
        "negative-temperature",
        "unknown-kind",
        "unregistered-column",
        "misspelt-column",
    ],
)
def test_select_pairs_refuses_bad_flags_with_one_line(scored_dir, tmp_path, flags, message):
    result = run_select_pairs("--run_dirs", scored_dir, *flags, "--output_dir", tmp_path / "pairs")
    assert message in one_line_error(result)
    assert not (tmp_path / "pairs").exists()


def test_select_pairs_takes_a_column_of_another_tool_once_its_kind_is_given(scored_dir, tmp_path):
    flags = ["--reward_models", "my_score", "--reward_kinds", "my_score=probability", "--output_dir", tmp_path / "o"]
    result = run_select_pairs("--run_dirs", scored_dir, *flags)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 pairs from 0 of 5 prompts" in result.stdout  # my_score is 0.5 everywhere: every group ties


@pytest.mark.parametrize("missing", ["manifest.jsonl", "scores.csv"])
def test_select_pairs_refuses_a_run_folder_without_manifest_or_scores(scored_dir, tmp_path, missing):
    (scored_dir / missing).unlink()
    result = run_select_pairs("--run_dirs", scored_dir, "--reward_models", "pickscore", "--output_dir", tmp_path / "o")
    assert f"No {missing} in" in one_line_error(result)


# ---------------------------------------------------------------------------------------------------------------
# Model soup (Eq. 29)
# ---------------------------------------------------------------------------------------------------------------


def angle(a, b):
    return math.acos(float(torch.dot(a, b) / (a.norm() * b.norm())))


def test_slerp_of_orthogonal_unit_vectors_at_one_half_has_unit_norm_and_equal_angles():
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    middle = slerp(a, b, 0.5)
    assert float(middle.norm()) == pytest.approx(1.0)
    assert angle(middle, a) == pytest.approx(angle(middle, b)) == pytest.approx(math.pi / 4)


def test_slerp_moves_along_the_arc_in_proportion_to_lambda():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert angle(slerp(a, b, 1 / 3), a) == pytest.approx(math.pi / 6)


@pytest.mark.parametrize("factor", [2.0, -1.0], ids=["parallel", "antiparallel"])
def test_slerp_of_parallel_vectors_falls_back_to_linear_interpolation(factor):
    a = torch.tensor([1.0, 2.0, 3.0])
    assert slerp_coefficients(a, factor * a, 0.25)[2] == "parallel"
    torch.testing.assert_close(slerp(a, factor * a, 0.25), 0.75 * a + 0.25 * factor * a)


def test_slerp_with_a_zero_task_vector_is_linear():
    a = torch.tensor([1.0, -2.0])
    assert slerp_coefficients(a, torch.zeros(2), 0.5)[2] == "zero"
    torch.testing.assert_close(slerp(a, torch.zeros(2), 0.5), 0.5 * a)
    torch.testing.assert_close(slerp(torch.zeros(2), torch.zeros(2), 0.5), torch.zeros(2))


def test_three_models_merge_pairwise_with_one_half_then_one_third():
    assert default_lambdas(3) == [0.5, pytest.approx(1 / 3)]
    rng = torch.Generator().manual_seed(0)
    vectors = [torch.randn(50, generator=rng) for _ in range(3)]
    merged, paths = merge_task_vectors(vectors, default_lambdas(3))
    torch.testing.assert_close(merged, slerp(slerp(vectors[0], vectors[1], 0.5), vectors[2], 1 / 3))
    assert paths == ["slerp", "slerp"]
    # by hand, three orthogonal unit vectors: tau_12 = (e1 + e2) / sqrt(2), a unit vector orthogonal to e3; the
    # second merge turns it by a third of the right angle towards e3: cos(30 deg) tau_12 + sin(30 deg) e3
    orthogonal, _ = merge_task_vectors(list(torch.eye(3)), default_lambdas(3))
    third = math.sqrt(3) / 2 / math.sqrt(2)
    torch.testing.assert_close(orthogonal, torch.tensor([third, third, 0.5]))
    same = [vectors[0]] * 3  # the linear limit: each model weighs 1/3
    torch.testing.assert_close(merge_task_vectors(same, default_lambdas(3))[0], vectors[0])


def run_soup(*args):
    return run_python("examples/capo/soup.py", [str(arg) for arg in args])


def tiny_unet(seed):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )


LORA_RANK, LORA_ALPHA = 4, 8  # scale alpha / r = 2, recorded in the file's adapter metadata


@pytest.fixture(scope="module")
def soup_models(tmp_path_factory):
    """A base UNet (a pipeline-style folder with unet/), two full fine-tunes (unet/ folders) and a LoRA file."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("soup")
    tiny_unet(0).save_pretrained(root / "base" / "unet")
    for i in (1, 2):
        model = tiny_unet(0)
        noise = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=noise))
        model.save_pretrained(root / f"full{i}" / "unet")
    model = tiny_unet(0)
    model.add_adapter(
        LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    noise = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: give the LoRA an update
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=noise))
    StableDiffusionXLPipeline.save_lora_weights(
        root / "lora",
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(model)),
        unet_lora_adapter_metadata=model.peft_config["default"].to_dict(),
    )
    return root


def load_unet_state(folder):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet").state_dict()


def lora_task_vector_by_hand(lora_file, base_state):
    """tau of a LoRA from its file alone: up @ down * alpha / r on the layers it adapts, zero elsewhere."""
    from safetensors.torch import load_file

    weights = load_file(lora_file)
    deltas = {name: torch.zeros_like(tensor) for name, tensor in base_state.items()}
    for key, down in weights.items():
        if key.endswith(".lora.down.weight"):
            layer = key.removeprefix("unet.").removesuffix(".lora.down.weight")
            deltas[f"{layer}.weight"] = (
                weights[key.replace(".lora.down.", ".lora.up.")] @ down * LORA_ALPHA / LORA_RANK
            )
    return deltas


@pytest.mark.slow
def test_soup_of_two_full_unets_and_a_lora_is_eq_29_merged_pairwise_and_loads_with_stock_diffusers(
    soup_models, tmp_path
):
    root = soup_models
    models = [root / "full1", root / "full2", root / "lora"]
    result = run_soup(
        "--pretrained_model_name_or_path", root / "base", "--models", *models, "--output_dir", tmp_path / "soup"
    )
    assert result.returncode == 0, result.stdout[-3000:]
    merged = load_unet_state(tmp_path / "soup")  # stock diffusers
    base, full1, full2 = (load_unet_state(root / name) for name in ("base", "full1", "full2"))
    lora = lora_task_vector_by_hand(root / "lora" / "pytorch_lora_weights.safetensors", base)
    assert any(delta.abs().sum() > 0 for delta in lora.values())
    for name, base_tensor in base.items():
        first = slerp(full1[name] - base_tensor, full2[name] - base_tensor, 0.5)
        expected = base_tensor + slerp(first, lora[name], 1 / 3)
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6, msg=name)
    config = json.loads((tmp_path / "soup" / "soup_config.json").read_text())
    assert config["lambdas"] == [0.5, pytest.approx(1 / 3)] and config["models"][2]["scale"] == [2.0]


@pytest.mark.slow
def test_soup_of_a_full_unet_with_itself_is_that_unet(soup_models, tmp_path):
    from examples.capo import soup

    root = soup_models
    flags = ["--pretrained_model_name_or_path", root / "base", "--models", root / "full1", root / "full1"]
    soup.main(soup.parse_args([str(flag) for flag in [*flags, "--output_dir", tmp_path / "soup"]]))
    merged, full1 = load_unet_state(tmp_path / "soup"), load_unet_state(root / "full1")
    for name, tensor in full1.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_soup_of_a_lora_with_itself_is_the_base_with_that_lora_fused_as_generate_py_fuses_it(soup_models, tmp_path):
    from diffusers import UNet2DConditionModel

    from examples.capo import soup

    root = soup_models
    flags = ["--pretrained_model_name_or_path", root / "base", "--models", root / "lora", root / "lora"]
    soup.main(soup.parse_args([str(flag) for flag in [*flags, "--output_dir", tmp_path / "soup"]]))
    fused = UNet2DConditionModel.from_pretrained(root / "base", subfolder="unet")
    fused.load_lora_adapter(str(root / "lora"), prefix="unet", weight_name="pytorch_lora_weights.safetensors")
    fused.fuse_lora()
    fused.unload_lora()
    merged = load_unet_state(tmp_path / "soup")
    for name, tensor in fused.state_dict().items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_soup_refuses_a_single_model_with_one_line(tmp_path):
    result = run_soup("--models", tmp_path, "--output_dir", tmp_path / "soup")
    assert "--models needs two or more fine-tuned models" in one_line_error(result)


def test_soup_refuses_a_folder_that_is_neither_lora_nor_unet_with_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_soup("--models", tmp_path / "empty", tmp_path / "empty", "--output_dir", tmp_path / "soup")
    assert "is neither a LoRA" in one_line_error(result)
    assert not (tmp_path / "soup").exists()
