"""The evaluation tools (examples/eval) run as users run them, on the tiny SDXL pipeline and tiny reward stand-ins.

Slow tests (marked) launch the tools on models; score.py's tests score a hand-made run folder (a manifest and
its images) rather than generate.py's output, so that only the generate tests build the tiny SDXL pipeline. A
refusal runs in this process as `python -m` runs the tool (its main under examples/lib/cli.run_tool), without the
seconds of a fresh interpreter; the unreachable published weights are refused in a fresh process, as users see it.
"""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from kit import copy_run, error_in_process, launch, pixels, read_csv, run_tool, write_lines, write_run
from PIL import Image

from examples.eval import compare, generate, score
from examples.lib.prompts import PromptSetError, load_prompts
from examples.lib.sampling import image_seed


PROMPTS = ["a photo of a red ball", "a photo of a blue ball", "a photo of a green ball"]
K = 2
GENERATE, SCORE, COMPARE = (f"examples/eval/{tool}.py" for tool in ("generate", "score", "compare"))


@pytest.fixture(scope="module", autouse=True)
def caches_in_a_temporary_folder(tmp_path_factory):
    """The tools launched here read and fill an empty hub and datasets cache, not ~/.cache."""
    home = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HOME", str(home))
        patch.setenv("HF_HUB_CACHE", str(home / "hub"))
        patch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
        yield home


def generate_args(tiny_assets, output_dir, model_name, prompts_file, *extra):
    return [
        "--pretrained_model_name_or_path",
        tiny_assets["model"],
        "--model_name",
        model_name,
        "--prompts",
        prompts_file,
        "--images_per_prompt",
        K,
        "--num_inference_steps",
        2,
        "--resolution",
        64,
        "--batch_size",
        2,
        "--seed",
        0,
        "--output_dir",
        output_dir,
        *extra,
    ]


def read_manifest(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def eval_assets(tiny_assets, tmp_path_factory):
    """A prompt file, a LoRA and a fine-tuned UNet of the tiny pipeline, and a base run."""
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("eval")
    prompts_file = write_lines(root / "prompts.txt", PROMPTS)

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_assets["model"], subfolder="unet")
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    )
    (root / "lora").mkdir()
    StableDiffusionXLPipeline.save_lora_weights(
        root / "lora", unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    )

    unet = UNet2DConditionModel.from_pretrained(tiny_assets["model"], subfolder="unet")
    with torch.no_grad():
        unet.conv_out.bias += 0.5  # a "fine-tuned" UNet that visibly differs from the base
    unet.save_pretrained(root / "full" / "unet")

    output_dir = root / "generated"
    run_tool(GENERATE, generate_args(tiny_assets, output_dir, "base", prompts_file))
    return {
        "root": root,
        "prompts_file": prompts_file,
        "lora": root / "lora",
        "full": root / "full",
        "output_dir": output_dir,
    }


def write_random_run(run_dir):
    """A run folder as generate.py leaves it (K random 64 px images per prompt), made without a model."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(len(PROMPTS) * K)]
    return write_run(run_dir, PROMPTS, images, K)


@pytest.fixture(scope="module")
def other_pickscore(tmp_path_factory):
    """A second pickscore stand-in, with other random weights than conftest `tiny_rewards`' one."""
    from examples.tiny_world.tiny_rewards import STAND_INS

    return str(STAND_INS["pickscore"](tmp_path_factory.mktemp("other") / "pickscore", 99))


def reward_args(rewards, *names, paths=None):
    paths = {name: rewards[name] for name in names} | (paths or {})
    return ["--reward_models", *names, "--reward_model_paths", *(f"{name}={path}" for name, path in paths.items())]


@pytest.fixture(scope="module")
def scored_run(tiny_rewards, tmp_path_factory):
    """A run scored once with the tiny pickscore and hpsv21; tests copy it before changing anything."""
    run_dir = write_random_run(tmp_path_factory.mktemp("scored") / "base")
    result = run_tool(
        SCORE, ["--run_dirs", run_dir, *reward_args(tiny_rewards, "pickscore", "hpsv21"), "--batch_size", 4]
    )
    return {"dir": run_dir, "stdout": result.stdout}


def error_lines(output):
    return [line for line in output.splitlines() if line.strip()]


def score_refusal(args, capsys):
    """score.py refusing `args`, run in this process as `python -m` runs it (examples/lib/cli.run_tool over its main
    and parse_args), without starting an interpreter: exit status 2 and no traceback; returns all it printed."""
    from examples.lib.cli import run_tool as run_tool_in_process

    with pytest.raises(SystemExit) as stopped:
        run_tool_in_process(score.main, lambda: score.parse_args([str(arg) for arg in args]))
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert stopped.value.code == 2 and "Traceback" not in output, output[-3000:]
    return output


def test_every_tool_explains_itself_with_help():
    for script in (GENERATE, SCORE, COMPARE):
        result = run_tool(script, ["--help"])
        assert "usage:" in result.stdout and "--" in result.stdout


@pytest.mark.slow
def test_generate_writes_k_images_per_prompt_with_their_seeds_in_a_manifest(eval_assets):
    run_dir = eval_assets["output_dir"] / "base"
    rows = read_manifest(run_dir)
    assert [(row["prompt_index"], row["k"]) for row in rows] == [(i, k) for i in range(3) for k in range(K)]
    assert [row["prompt"] for row in rows] == [p for p in PROMPTS for _ in range(K)]
    assert [row["seed"] for row in rows] == [image_seed(0, i, k) for i in range(3) for k in range(K)]
    assert len({row["seed"] for row in rows}) == 3 * K
    for row in rows:
        assert Image.open(run_dir / row["image"]).size == (64, 64)
    assert json.loads((run_dir / "prompts.json").read_text()) == PROMPTS


@pytest.mark.slow
def test_same_seeds_give_identical_images_across_two_runs(eval_assets, tiny_assets):
    other = eval_assets["root"] / "second_run"
    run_tool(GENERATE, generate_args(tiny_assets, other, "base", eval_assets["prompts_file"]))
    for row in read_manifest(eval_assets["output_dir"] / "base"):
        assert np.array_equal(
            pixels(other / "base" / row["image"]), pixels(eval_assets["output_dir"] / "base" / row["image"])
        )


@pytest.mark.slow
def test_resumed_generation_redoes_nothing_and_fills_only_what_is_missing(eval_assets, tiny_assets):
    source = eval_assets["output_dir"] / "base"
    output_dir = eval_assets["root"] / "resume"
    shutil.copytree(source, output_dir / "base")
    images = sorted((output_dir / "base").glob("*.png"))
    mtimes = {path: path.stat().st_mtime_ns for path in images}

    rerun = run_tool(GENERATE, generate_args(tiny_assets, output_dir, "base", eval_assets["prompts_file"]))
    assert "0 images to generate, 6 already" in rerun.stdout
    assert "0 images generated" in rerun.stdout
    assert {path: path.stat().st_mtime_ns for path in images} == mtimes

    removed = images[3]
    removed.unlink()
    refill = run_tool(GENERATE, generate_args(tiny_assets, output_dir, "base", eval_assets["prompts_file"]))
    assert "1 images to generate, 5 already" in refill.stdout
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in mtimes.items() if path != removed)
    # remade from its own seed; alone in its batch, so float reductions may move a pixel by one level
    assert np.abs(pixels(removed) - pixels(source / removed.name)).max() <= 1


@pytest.mark.slow
def test_generate_under_accelerate_launch_splits_the_images_over_two_processes(eval_assets, tiny_assets):
    output_dir = eval_assets["root"] / "two_processes"
    result = launch(
        GENERATE,
        generate_args(tiny_assets, output_dir, "base", eval_assets["prompts_file"]),
        num_processes=2,
    )
    assert "6 images generated (per process: [3, 3])" in result.stdout
    assert [row["image"] for row in read_manifest(output_dir / "base")] == [
        row["image"] for row in read_manifest(eval_assets["output_dir"] / "base")
    ]
    for row in read_manifest(
        output_dir / "base"
    ):  # each image's noise comes from its own seed, not from the process or batch
        difference = np.abs(
            pixels(output_dir / "base" / row["image"]) - pixels(eval_assets["output_dir"] / "base" / row["image"])
        )
        assert difference.max() <= 1


@pytest.fixture(scope="module")
def weighted_run(eval_assets, tiny_assets):
    """run(weights): the images generate.py draws with eval_assets' LoRA ("lora") or fine-tuned UNet ("unet"),
    beside the base run; drawn once for the module (the end-to-end test scores the LoRA's)."""
    made = set()

    def run(weights):
        if weights not in made:
            flag = ["--lora_path", eval_assets["lora"]] if weights == "lora" else ["--unet_path", eval_assets["full"]]
            args = generate_args(tiny_assets, eval_assets["output_dir"], weights, eval_assets["prompts_file"], *flag)
            run_tool(GENERATE, args)
            made.add(weights)
        return eval_assets["output_dir"] / weights

    return run


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["lora", "unet"])
def test_trained_weights_change_the_images_but_not_the_seeds(weights, eval_assets, weighted_run):
    weighted_run(weights)
    base_rows, rows = (
        read_manifest(eval_assets["output_dir"] / "base"),
        read_manifest(eval_assets["output_dir"] / weights),
    )
    assert [row["seed"] for row in rows] == [row["seed"] for row in base_rows]
    differences = [
        np.abs(
            pixels(eval_assets["output_dir"] / weights / row["image"])
            - pixels(eval_assets["output_dir"] / "base" / row["image"])
        ).mean()
        for row in rows
    ]
    assert min(differences) > 1.0


@pytest.mark.slow
def test_generate_refuses_to_mix_settings_in_one_folder(eval_assets, tiny_assets, capsys):
    args = generate_args(
        tiny_assets, eval_assets["output_dir"], "base", eval_assets["prompts_file"], "--guidance_scale", 7.5
    )
    assert "guidance_scale: 5.0 on disk, 7.5 now" in error_in_process(generate, args, capsys)  # before loading


@pytest.mark.slow
def test_generate_stops_on_an_empty_prompt_set_before_loading_a_model(eval_assets, tiny_assets, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "empty after cleaning" in error_in_process(
        generate, generate_args(tiny_assets, tmp_path, "base", empty), capsys
    )
    assert not (tmp_path / "base").exists()


def test_prompt_sets_load_from_text_csv_jsonl_and_dataset_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "p.csv").write_text('id,text\n1,"a cat, sitting"\n2,a dog\n3,a cat\n4,"a cat, sitting"\n')
    prompts, counts = load_prompts(str(tmp_path / "p.csv"))
    assert prompts == ["a cat, sitting", "a dog", "a cat"] and counts["duplicates"] == 1
    (tmp_path / "p.jsonl").write_text('{"caption": "one"}\n{"caption": ""}\n{"caption": "two"}\n')
    prompts, counts = load_prompts(str(tmp_path / "p.jsonl"), max_prompts=1)
    assert prompts == ["one"] and counts == {"read": 3, "empty": 1, "duplicates": 0, "beyond_max_prompts": 1}

    colors = ["red", "green", "blue", "yellow", "purple", "cyan"]
    dataset = tmp_path / "dataset"  # a folder of parquet splits, as the tiny Pick-a-Pic is
    dataset.mkdir()
    for split, repeats in (("train", 1), ("test", 4)):
        captions = [f"a photo of a {color} ball" for color in colors] * repeats
        pq.write_table(pa.table({"caption": captions, "label": [0.5] * len(captions)}), dataset / f"{split}.parquet")
    cache = str(tmp_path / "datasets_cache")
    prompts, counts = load_prompts(str(dataset), column="caption", split="test", cache_dir=cache)
    assert prompts == [f"a photo of a {color} ball" for color in colors] and counts["read"] == 24
    shuffled, _ = load_prompts(str(dataset), column="caption", split="test", cache_dir=cache, shuffle_seed=1)
    assert sorted(shuffled) == sorted(prompts)
    assert shuffled == load_prompts(str(dataset), column="caption", split="test", cache_dir=cache, shuffle_seed=1)[0]
    with pytest.raises(PromptSetError, match="no column 'prompt_text'"):
        load_prompts(str(tmp_path / "p.csv"), column="prompt_text")
    with pytest.raises(PromptSetError, match="Unknown prompt set"):
        load_prompts("partiprompt")


@pytest.mark.slow
def test_score_writes_one_row_per_image_with_the_reward_models_values(scored_run, tiny_rewards):
    import torch

    from examples.rewards import load_reward_model

    run_dir = scored_run["dir"]
    assert "pickscore: 6 computed, 0 already present" in scored_run["stdout"]
    rows = read_csv(run_dir / "scores.csv")
    assert [row["image"] for row in rows] == [row["image"] for row in read_manifest(run_dir)]
    assert list(rows[0]) == ["prompt_index", "k", "seed", "prompt", "image", "pickscore", "hpsv21"]
    expected = load_reward_model("hpsv21", path=tiny_rewards["hpsv21"], device="cpu").score(
        [run_dir / row["image"] for row in rows], [row["prompt"] for row in rows]
    )
    torch.testing.assert_close(torch.tensor([float(row["hpsv21"]) for row in rows]), expected, rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def rescored_run(scored_run, tiny_rewards, tmp_path_factory):
    """A copy of scored_run scored again with the same pickscore and hpsv21 weights, and aesthetic."""
    run_dir = copy_run(scored_run["dir"], tmp_path_factory.mktemp("rescored") / "base")
    before = read_csv(run_dir / "scores.csv")
    again = run_tool(SCORE, ["--run_dirs", run_dir, *reward_args(tiny_rewards, "pickscore", "hpsv21", "aesthetic")])
    return {"dir": run_dir, "before": before, "stdout": again.stdout}


@pytest.mark.slow
def test_score_resumes_computing_only_the_missing_columns(rescored_run):
    run_dir, before, again = rescored_run["dir"], rescored_run["before"], rescored_run["stdout"]
    assert "pickscore: all 6 scores already present, model not loaded" in again
    assert "hpsv21: all 6 scores already present, model not loaded" in again
    assert "aesthetic: 6 computed, 0 already present" in again
    rescored = read_csv(run_dir / "scores.csv")
    assert [row["pickscore"] for row in rescored] == [row["pickscore"] for row in before]  # kept, not recomputed
    assert all(row["aesthetic"] for row in rescored)


@pytest.mark.slow
def test_score_records_which_weights_made_each_column(scored_run, tiny_rewards):
    from examples.rewards import reward_weights_source

    sources = json.loads((scored_run["dir"] / "scores.csv.sources.json").read_text())
    assert sources == {name: reward_weights_source(name, tiny_rewards[name]) for name in ("pickscore", "hpsv21")}
    assert sources["pickscore"][0]["path"] == str(Path(tiny_rewards["pickscore"]).resolve())


@pytest.mark.slow
def test_score_refuses_to_add_other_weights_to_a_column_and_leaves_the_table_alone(
    scored_run, tiny_rewards, other_pickscore, tmp_path, capsys
):
    from examples.rewards import reward_weights_source

    run_dir = copy_run(scored_run["dir"], tmp_path / "base")
    table = (run_dir / "scores.csv").read_text()
    other = {"pickscore": other_pickscore}
    output = score_refusal(["--run_dirs", run_dir, *reward_args(tiny_rewards, "pickscore", paths=other)], capsys)
    assert len(error_lines(output)) == 1
    error = error_lines(output)[0]
    assert error.startswith("error: The pickscore scores in") and "--scores_filename" in error
    assert str(Path(tiny_rewards["pickscore"]).resolve()) in error  # the recorded source
    assert str(Path(other_pickscore).resolve()) in error  # the requested one
    assert (run_dir / "scores.csv").read_text() == table
    recorded = json.loads((run_dir / "scores.csv.sources.json").read_text())["pickscore"]
    assert recorded == reward_weights_source("pickscore", tiny_rewards["pickscore"])


@pytest.mark.slow
def test_score_accepts_the_same_weights_again_even_from_another_folder(
    scored_run, rescored_run, tiny_rewards, tmp_path
):
    # the same folder: scored_run's pickscore weights given again (with others) are accepted, not recomputed
    assert "pickscore: all 6 scores already present, model not loaded" in rescored_run["stdout"]
    run_dir = copy_run(scored_run["dir"], tmp_path / "base")
    moved = {"pickscore": shutil.copytree(tiny_rewards["pickscore"], tmp_path / "moved")}
    again = run_tool(SCORE, ["--run_dirs", run_dir, *reward_args(tiny_rewards, "pickscore", paths=moved)])
    assert "pickscore: all 6 scores already present, model not loaded" in again.stdout


@pytest.mark.slow
def test_score_does_not_trust_a_table_without_a_record_of_its_weights_unless_told_to(
    scored_run, tiny_rewards, tmp_path, capsys
):
    run_dir = copy_run(scored_run["dir"], tmp_path / "base")
    (run_dir / "scores.csv.sources.json").unlink(missing_ok=True)  # a table from before score.py kept the record
    table = (run_dir / "scores.csv").read_text()
    refused = score_refusal(["--run_dirs", run_dir, *reward_args(tiny_rewards, "pickscore")], capsys)
    assert len(error_lines(refused)) == 1
    assert "records no weights" in refused and "--adopt_unrecorded_scores" in refused
    assert (run_dir / "scores.csv").read_text() == table
    adopted = run_tool(
        SCORE, ["--run_dirs", run_dir, *reward_args(tiny_rewards, "pickscore"), "--adopt_unrecorded_scores"]
    )
    assert "pickscore: all 6 scores already present, model not loaded" in adopted.stdout
    assert set(json.loads((run_dir / "scores.csv.sources.json").read_text())) == {"pickscore"}


@pytest.mark.slow
def test_score_stops_with_one_line_when_weights_cannot_be_reached(tmp_path, capsys):
    run_dir = write_random_run(tmp_path / "base")
    # the published weights as a user meets them offline (a fresh process: the tests' HF_HUB_OFFLINE=1)
    published = run_tool(SCORE, ["--run_dirs", run_dir, "--reward_models", "pickscore"], expect_success=False)
    assert published.returncode == 2
    missing_path = tmp_path / "no_such_folder"
    local = score_refusal(
        ["--run_dirs", run_dir, "--reward_models", "hpsv21", "--reward_model_paths", f"hpsv21={missing_path}"], capsys
    )
    for output, names in ((published.stdout, "yuvalkirstain/PickScore_v1"), (local, str(missing_path))):
        assert "Traceback" not in output
        assert len(error_lines(output)) == 1 and error_lines(output)[0].startswith("error: ")
        assert names in output and "--reward_model_paths" in output
    assert "HF_HUB_OFFLINE" in published.stdout
    assert not (run_dir / "scores.csv").exists()


@pytest.mark.slow
def test_score_stops_on_a_missing_image_unless_told_to_skip_it(tiny_rewards, tmp_path, capsys):
    run_dir = write_random_run(tmp_path / "base")
    (run_dir / "00001_00.png").unlink()
    stopped = score_refusal(["--run_dirs", run_dir, *reward_args(tiny_rewards, "pickscore")], capsys)
    assert "1 images listed" in stopped and "00001_00.png" in stopped
    skipped = run_tool(
        SCORE, ["--run_dirs", run_dir, *reward_args(tiny_rewards, "pickscore"), "--skip_missing_images"]
    )
    assert "1 missing images skipped" in skipped.stdout and "pickscore: 5 computed" in skipped.stdout
    empty_cells = [row["pickscore"] == "" for row in read_csv(run_dir / "scores.csv")]
    assert empty_cells == [False, False, True, False, False, False]


def test_score_rejects_an_unknown_reward_model_before_loading_anything(tmp_path, capsys):
    run_dir = write_random_run(tmp_path / "base")
    result = score_refusal(["--run_dirs", run_dir, "--reward_models", "pickscore", "hsp"], capsys)
    assert "Unknown reward model(s) ['hsp']" in result


def test_score_offers_every_registered_reward_model_and_only_those(monkeypatch, capsys, tmp_path):
    from examples.eval import score
    from examples.rewards import REWARD_MODELS, RewardModel

    class NewReward(RewardModel):
        name, display_name, kind = "newreward", "New", "bradley_terry"

    monkeypatch.setitem(REWARD_MODELS, NewReward.name, NewReward)
    with pytest.raises(SystemExit):
        score.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"Reward models to score with: {', '.join(REWARD_MODELS)} " in help_text
    assert set(score.DEFAULT_REWARD_MODELS) <= set(REWARD_MODELS)
    run_dir = write_random_run(tmp_path / "base")
    args = score.parse_args(["--run_dirs", str(run_dir), "--reward_models", "newreward"])
    assert args.reward_models == ["newreward"]


def test_win_rate_makes_k_squared_comparisons_and_counts_ties_half():
    # model [2, 4] vs baseline [1, 3]: 2>1 win, 2<3 loss, 4>1 win, 4>3 win -> 3/4
    assert compare.win_rate([2.0, 4.0], [1.0, 3.0]) == 0.75
    # model [5, 6] vs baseline [5, 5]: two ties (1/2 each) and two wins -> 3/4
    assert compare.win_rate([5.0, 6.0], [5.0, 5.0]) == 0.75
    # K = 3 against K' = 1: 1 win, 1 tie, 1 loss -> 1/2
    assert compare.win_rate([1.0, 2.0, 3.0], [2.0]) == 0.5


def write_score_table(path, scores):
    """scores: {prompt: {"aesthetic": [...], "pickscore": [...]}}, K images per prompt."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt_index", "k", "seed", "prompt", "image", "aesthetic", "pickscore"])
        for index, (prompt, values) in enumerate(scores.items()):
            for k, (aesthetic, pickscore) in enumerate(zip(values["aesthetic"], values["pickscore"])):
                writer.writerow([index, k, 0, prompt, f"{index:05d}_{k:02d}.png", aesthetic, pickscore])


HAND_MADE = {
    "base": {
        "p1": {"aesthetic": [1.0, 3.0], "pickscore": [20.0, 20.0]},
        "p2": {"aesthetic": [5.0, 5.0], "pickscore": [21.0, 23.0]},
    },
    "tuned": {
        "p1": {"aesthetic": [2.0, 4.0], "pickscore": [20.0, 21.0]},
        "p2": {"aesthetic": [5.0, 6.0], "pickscore": [22.0, 22.0]},
    },
}


def test_compare_on_hand_made_tables_gives_the_hand_computed_means_intervals_and_win_rates(tmp_path):
    for name, scores in HAND_MADE.items():
        write_score_table(tmp_path / name / "scores.csv", scores)
    run_tool(
        COMPARE,
        [
            "--runs",
            tmp_path / "base",
            tmp_path / "tuned",
            "--num_bootstrap",
            2000,
            "--output_prefix",
            tmp_path / "out" / "table",
        ],
    )
    summary = json.loads((tmp_path / "out" / "table.json").read_text())
    base, tuned = summary["results"]["base"], summary["results"]["tuned"]
    assert base["aesthetic"]["mean"] == pytest.approx(3.5)  # (1+3+5+5)/4
    assert tuned["aesthetic"]["mean"] == pytest.approx(4.25)  # (2+4+5+6)/4
    assert base["pickscore"]["mean"] == pytest.approx(21.0) and tuned["pickscore"]["mean"] == pytest.approx(21.25)
    # aesthetic: p1 3/4 (above), p2 3/4 (two ties, two wins) -> 0.75
    assert tuned["aesthetic"]["win_rate"] == pytest.approx(0.75)
    # pickscore: p1 [20,21] vs [20,20]: two ties + two wins = 3/4; p2 [22,22] vs [21,23]: 2 wins, 2 losses = 1/2
    # -> 0.625
    assert tuned["pickscore"]["win_rate"] == pytest.approx(0.625)
    assert "win_rate" not in base["aesthetic"]
    for results in (base, tuned):
        for metric in ("aesthetic", "pickscore"):
            assert results[metric]["ci_low"] <= results[metric]["mean"] <= results[metric]["ci_high"]
    # two prompts: the resampled means can only be p1's, p2's, or their average
    assert (base["aesthetic"]["ci_low"], base["aesthetic"]["ci_high"]) == (pytest.approx(2.0), pytest.approx(5.0))
    assert summary["prompts"]["aesthetic"] == {
        "shared": 2,
        "dropped": {"base": 0, "tuned": 0},
        "empty_cells": {"base": 0, "tuned": 0},
    }
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| tuned | 4.250 [" in table and "| tuned | 75.0 [" in table
    with Image.open(tmp_path / "out" / "table.png") as chart:
        assert chart.format == "PNG" and chart.size[0] > 200


def test_bootstrap_interval_of_equal_prompt_means_is_that_mean():
    low, high = compare.bootstrap_interval([2.5, 2.5, 2.5], 500, 0.95, np.random.default_rng(0))
    assert low == high == 2.5


def test_compare_counts_the_prompts_that_are_not_in_every_run(tmp_path):
    write_score_table(
        tmp_path / "base" / "scores.csv",
        {**HAND_MADE["base"], "p3": {"aesthetic": [9.0, 9.0], "pickscore": [30.0, 30.0]}},
    )
    write_score_table(tmp_path / "tuned" / "scores.csv", HAND_MADE["tuned"])
    result = run_tool(
        COMPARE,
        ["--runs", tmp_path / "base", tmp_path / "tuned", "--num_bootstrap", 100, "--output_prefix", tmp_path / "cmp"],
    )
    assert "prompts left out per run: {'base': 1}" in result.stdout
    summary = json.loads((tmp_path / "cmp.json").read_text())
    assert summary["results"]["base"]["aesthetic"]["mean"] == pytest.approx(3.5)  # p3 is not compared


def test_chart_has_one_bar_per_model_and_metric_at_the_mean(tmp_path):
    tables = {}
    for name, scores in {**HAND_MADE, "third": HAND_MADE["base"]}.items():
        write_score_table(tmp_path / f"{name}.csv", scores)
        tables[name], _ = compare.read_score_table(tmp_path / f"{name}.csv")
    summary = compare.summarize(tables, ["aesthetic", "pickscore"], "base", num_bootstrap=200)
    figure = compare.draw_chart(summary, tmp_path / "chart.png")
    assert len(figure.axes) == 2
    for axis, metric in zip(figure.axes, ["aesthetic", "pickscore"]):
        assert len(axis.patches) == 3  # base, tuned, third
        tops = [bar.get_y() + bar.get_height() for bar in axis.patches]
        assert tops == pytest.approx([summary["results"][name][metric]["mean"] for name in ("base", "tuned", "third")])
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_generate_score_compare_end_to_end(eval_assets, weighted_run, tiny_rewards):
    base, lora = eval_assets["output_dir"] / "base", weighted_run("lora")
    run_tool(SCORE, ["--run_dirs", base, lora, *reward_args(tiny_rewards, "pickscore", "imagereward")])
    prefix = eval_assets["root"] / "report" / "table"
    result = run_tool(
        COMPARE, ["--runs", base, lora, "--baseline", "base", "--num_bootstrap", 500, "--output_prefix", prefix]
    )
    assert "| lora |" in result.stdout and "PickScore" in result.stdout and "ImageReward" in result.stdout
    for suffix in ("md", "json", "png"):
        assert Path(f"{prefix}.{suffix}").is_file()


@pytest.fixture(scope="module")
def tiny_sd_lora(tmp_path_factory):
    """A tiny SD1.x-style pipeline (one text encoder, no safety checker) and a LoRA of its UNet."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from examples.tiny_world import world

    root = tmp_path_factory.mktemp("tiny_sd")
    world.build_tiny_sd_pipeline(root / "tiny-sd", vae_fit_steps=0)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(root / "tiny-sd", subfolder="unet")
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    )
    (root / "lora").mkdir()
    StableDiffusionPipeline.save_lora_weights(
        root / "lora", unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    )
    prompts_file = write_lines(root / "prompts.txt", PROMPTS)
    return {"model": str(root / "tiny-sd"), "lora": root / "lora", "prompts_file": prompts_file}


@pytest.mark.slow
def test_generate_on_an_sd_pipeline_writes_its_images_and_applies_a_lora(tiny_sd_lora, tmp_path):
    output_dir = tmp_path / "generated"
    for name, extra in (("base", []), ("lora", ["--lora_path", tiny_sd_lora["lora"]])):
        run_tool(
            GENERATE,
            generate_args(
                tiny_sd_lora, output_dir, name, tiny_sd_lora["prompts_file"], "--scheduler", "euler", *extra
            ),
        )
    base_rows, lora_rows = read_manifest(output_dir / "base"), read_manifest(output_dir / "lora")
    assert [(row["prompt_index"], row["k"]) for row in base_rows] == [(i, k) for i in range(3) for k in range(K)]
    assert [row["seed"] for row in lora_rows] == [row["seed"] for row in base_rows]
    for row in base_rows:
        assert Image.open(output_dir / "base" / row["image"]).size == (64, 64)
    differences = [
        np.abs(pixels(output_dir / "lora" / row["image"]) - pixels(output_dir / "base" / row["image"])).mean()
        for row in base_rows
    ]
    assert min(differences) > 1.0
