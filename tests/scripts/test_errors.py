"""Bad input stops with one line that says what was expected and what was found, before anything heavy."""

import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
from kit import OFFLINE_ENV, REPO, one_line_error, parse_args_refusal, run_python


SCRIPTS = ["train_diffusion_dpo_sdxl.py", "train_mapo_sdxl.py", "train_ddspo.py", "train_capo.py"]
# train_mapo_personalization_sdxl.py needs --instance_data_dir to get further; test_sd3_dpo.py covers the SD3 script
ALL_SCRIPTS = [*SCRIPTS, "train_mapo_personalization_sdxl.py", "train_diffusion_dpo_sd3.py"]
REWARD_VALIDATION_SCRIPTS = [*SCRIPTS, "train_diffusion_dpo_sd3.py"]  # the scripts with validation by reward
HUB_ID_NOT_HERE = "no-such-org/no-such-model"  # looks like a hub id: it can only fail when the models load


def tiny_parquet_folder(folder):
    image = datasets.Image().encode_example(np.zeros((8, 8, 3), dtype=np.uint8))["bytes"]
    folder.mkdir()
    rows = {"caption": ["x"], "jpg_0": [image], "jpg_1": [image], "label_0": [1.0]}
    datasets.Dataset.from_dict(rows).to_parquet(str(folder / "train.parquet"))
    return folder


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("resolution", [0, -64])
def test_non_positive_resolution_is_refused_and_leaves_no_output_folder(tmp_path, script, resolution):
    result = run_python(script, ["--resolution", resolution, "--output_dir", tmp_path / "out"])
    assert "--resolution must be a positive multiple of 8" in one_line_error(result)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_flags_are_checked_before_torch_is_imported(script):
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{script!r}, '--resolution', '0']\n"
        "try:\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit:\n"
        "    print('torch imported:', 'torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env={**os.environ, **OFFLINE_ENV}, capture_output=True, text=True
    )
    assert "torch imported: False" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_model_folder_without_pipeline_files_is_named_with_what_it_holds(tmp_path, script):
    (tmp_path / "model" / "unet").mkdir(parents=True)
    result = run_python(script, ["--pretrained_model_name_or_path", tmp_path / "model"])
    line = one_line_error(result)
    assert "model_index.json" in line and "scheduler/scheduler_config.json" in line and "found ['unet']" in line


@pytest.mark.parametrize("script", SCRIPTS)
def test_dataset_path_that_does_not_exist_is_one_line(tmp_path, script):
    result = run_python(script, ["--dataset_name", tmp_path / "nowhere", "--output_dir", tmp_path / "out"])
    line = one_line_error(result)
    assert f"--dataset_name '{tmp_path / 'nowhere'}': no such file or folder" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("split_flag", ["--dataset_split_name", "--preference_eval_split"])
def test_split_the_dataset_lacks_is_one_line_naming_the_splits_it_has(tmp_path, split_flag):
    folder = tiny_parquet_folder(tmp_path / "data")
    args = ["--dataset_name", folder, split_flag, "validation", "--pretrained_model_name_or_path", HUB_ID_NOT_HERE]
    line = one_line_error(run_python("train_mapo_sdxl.py", [*args, "--output_dir", tmp_path / "out"]))
    assert "split 'validation'" in line and "['train']" in line


def test_model_the_hub_cannot_serve_offline_is_one_line(tmp_path):
    folder = tiny_parquet_folder(tmp_path / "data")
    args = ["--dataset_name", folder, "--pretrained_model_name_or_path", HUB_ID_NOT_HERE]
    line = one_line_error(run_python("train_diffusion_dpo_sdxl.py", [*args, "--output_dir", tmp_path / "out"]))
    assert f"Could not load the SDXL models of '{HUB_ID_NOT_HERE}'" in line


def test_fp16_without_a_gpu_is_refused_with_a_sentence(tmp_path):
    folder = tiny_parquet_folder(tmp_path / "data")
    args = ["--dataset_name", folder, "--mixed_precision", "fp16", "--output_dir", tmp_path / "out"]
    line = one_line_error(run_python("train_mapo_sdxl.py", args))
    assert "--mixed_precision fp16 needs a GPU" in line and "bf16" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_from_a_checkpoint_that_is_not_there_lists_those_that_are(tmp_path, script):
    (tmp_path / "out" / "checkpoint-2").mkdir(parents=True)
    args = ["--output_dir", tmp_path / "out", "--resume_from_checkpoint", "checkpoint-500"]
    line = one_line_error(run_python(script, args))
    assert "'checkpoint-500'" in line and "holds ['checkpoint-2']" in line


@pytest.mark.parametrize("script", SCRIPTS)
def test_resuming_a_checkpoint_of_the_other_kind_of_training_is_refused(tmp_path, script):
    lora_checkpoint, unet_checkpoint = tmp_path / "out" / "checkpoint-2", tmp_path / "out" / "checkpoint-4"
    lora_checkpoint.mkdir(parents=True)
    (lora_checkpoint / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (unet_checkpoint / "unet").mkdir(parents=True)
    common = ["--output_dir", tmp_path / "out", "--resume_from_checkpoint"]
    assert "holds LoRA weights" in one_line_error(run_python(script, [*common, "checkpoint-2"]))
    line = one_line_error(run_python(script, [*common, "checkpoint-4", "--lora_rank", 4]))
    assert "holds a full UNet" in line


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_help_shows_groups_in_the_order_of_main_defaults_and_an_example(script):
    result = run_python(script, ["--help"])
    assert result.returncode == 0
    groups = ["model:", "method:", "data:", "training:", "checkpoints:", "logging and validation:", "hub:"]
    positions = [result.stdout.find(f"\n{group}\n") for group in groups]
    assert -1 not in positions and positions == sorted(positions), positions
    text = " ".join(result.stdout.split())  # argparse wraps at the terminal's width
    assert "(default: 1e-08)" in text and "(default: None)" not in text and f"accelerate launch {script}" in text


def reward_validation_refusal(script, tmp_path, capsys, *flags):
    """The one line with which `script` refuses validation-by-reward `flags` (in-process parse_args)."""
    (tmp_path / "data").mkdir(exist_ok=True)
    argv = ["--dataset_name", tmp_path / "data", "--output_dir", tmp_path / "out", *flags]
    return parse_args_refusal(script.removesuffix(".py"), argv, capsys)


@pytest.mark.parametrize("script", REWARD_VALIDATION_SCRIPTS)
def test_unknown_validation_reward_is_one_line_naming_the_known_ones(tmp_path, script, capsys):
    (tmp_path / "prompts.txt").write_text("a photo of a red ball\n")
    flags = ["--validation_reward_models", "toy_ball", "nope", "--validation_reward_prompts", tmp_path / "prompts.txt"]
    line = reward_validation_refusal(script, tmp_path, capsys, *flags)
    assert "Unknown reward model(s) ['nope']" in line and "'pickscore'" in line and "'toy_ball'" in line


@pytest.mark.parametrize("script", REWARD_VALIDATION_SCRIPTS)
@pytest.mark.parametrize(
    "prompts,message",
    [
        (None, "--validation_reward_models needs --validation_reward_prompts"),
        ("nowhere.txt", "nowhere.txt': no such file here"),
        ("empty.txt", "empty.txt' holds no prompt"),
    ],
)
def test_validation_rewards_without_a_prompt_file_are_one_line(tmp_path, script, capsys, prompts, message):
    (tmp_path / "empty.txt").write_text("\n \n")
    flags = ["--validation_reward_models", "toy_ball"]
    flags += ["--validation_reward_prompts", tmp_path / prompts] if prompts else []
    assert message in reward_validation_refusal(script, tmp_path, capsys, *flags)


@pytest.mark.parametrize("script", REWARD_VALIDATION_SCRIPTS)
@pytest.mark.parametrize(
    "flags,message",
    [
        (["--keep_best_checkpoint"], "--keep_best_checkpoint needs --validation_reward_models"),
        (["--validation_reward_model_paths", "pickscore=/m"], "--validation_reward_model_paths needs --validation_"),
        (["--validation_images_per_prompt", 0], "--validation_images_per_prompt must be positive, got 0"),
    ],
)
def test_validation_by_reward_flags_without_their_rewards_are_one_line(tmp_path, script, capsys, flags, message):
    assert message in reward_validation_refusal(script, tmp_path, capsys, *flags)


@pytest.mark.parametrize("script", REWARD_VALIDATION_SCRIPTS)
def test_validation_reward_weights_for_a_reward_not_asked_for_are_one_line(tmp_path, script, capsys):
    (tmp_path / "prompts.txt").write_text("a photo of a red ball\n")
    flags = ["--validation_reward_models", "toy_ball", "--validation_reward_prompts", tmp_path / "prompts.txt"]
    flags += ["--validation_reward_model_paths", "pickscore=/models/pickscore"]
    line = reward_validation_refusal(script, tmp_path, capsys, *flags)
    assert "names 'pickscore', which is not in --validation_reward_models ['toy_ball']" in line


EVERY_SCRIPT = sorted(path.name for path in REPO.glob("train_*.py"))


@pytest.mark.parametrize("script", EVERY_SCRIPT)
def test_8bit_adam_without_bitsandbytes_is_one_line_before_anything_loads(script, tmp_path, monkeypatch, capsys):
    """A user without bitsandbytes who asks for 8-bit AdamW is told to install it, before any model loads."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # importlib.util.find_spec answers None: not installed
    data = "--instance_data_dir" if script == "train_mapo_personalization_sdxl.py" else "--dataset_name"
    argv = ["--use_8bit_adam", data, tmp_path, "--output_dir", tmp_path / "out"]
    line = parse_args_refusal(script.removesuffix(".py"), argv, capsys)
    assert "--use_8bit_adam needs bitsandbytes, which is not installed here: pip install bitsandbytes" in line


def test_the_suites_processes_start_without_bitsandbytes_as_a_user_without_it_would():
    """conftest.py's harness reaches the scripts the tests start: a run asking for 8-bit AdamW stops with the line a
    user without bitsandbytes sees (tests that need it launch with kit.launch(..., bitsandbytes=True))."""
    result = run_python("train_mapo_sdxl.py", ["--use_8bit_adam", "--output_dir", REPO / "no-such-folder"])
    assert "--use_8bit_adam needs bitsandbytes" in one_line_error(result)
