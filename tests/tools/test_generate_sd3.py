"""generate.py on an SD3 pipeline (the shipped tiny-world SD3 base): each flow sampler draws, the SD3 flags reach
the pipeline, and flags of the other family stop in one line before any model loads.

The runs are made once, in this process (generate.main, as `python -m examples.eval.generate` calls it), to keep
the file within its 40 s.
"""

import json

import numpy as np
import pytest
from kit import TINY_WORLD_BASES, error_in_process, pixels, write_lines
from PIL import Image

from examples.eval import generate
from examples.lib.sampling import FLOW_SCHEDULERS


pytestmark = pytest.mark.usefixtures("hub_cache_in_a_temporary_folder")

SD3_BASE = TINY_WORLD_BASES / "tiny-world-sd3"
SDXL_BASE = TINY_WORLD_BASES / "tiny-world-sdxl"
PROMPTS = ["a photo of a red ball", "a photo of a blue ball"]
K = 2
# The run of each sampler with the pipeline's own shift and T5 length, and two runs that change one of them.
RUNS = {
    **{scheduler: ["--scheduler", scheduler] for scheduler in FLOW_SCHEDULERS},
    "shift_1": ["--shift", 1.0],
    "max_sequence_length_32": ["--max_sequence_length", 32],
}


def generate_argv(output_dir, model_name, prompts_file, *extra, model=SD3_BASE):
    argv = ["--pretrained_model_name_or_path", model, "--model_name", model_name, "--prompts", prompts_file]
    argv += ["--images_per_prompt", K, "--num_inference_steps", 6, "--resolution", 64, "--batch_size", 4]
    return [str(arg) for arg in [*argv, "--output_dir", output_dir, *extra]]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_lines(tmp_path_factory.mktemp("prompts") / "prompts.txt", PROMPTS)


@pytest.fixture(scope="module")
def runs(prompts_file, tmp_path_factory):
    """{run name: its folder}, every run of RUNS drawn from the shipped SD3 base."""
    output_dir = tmp_path_factory.mktemp("generated")
    for name, extra in RUNS.items():
        generate.main(generate.parse_args(generate_argv(output_dir, name, prompts_file, *extra)))
    return {name: output_dir / name for name in RUNS}


def mean_difference(run_a, run_b):
    """Mean absolute pixel difference of the same-seed images of two runs."""
    names = sorted(path.name for path in run_a.glob("*.png"))
    return np.mean([np.abs(pixels(run_a / name) - pixels(run_b / name)).mean() for name in names])


@pytest.mark.parametrize("scheduler", FLOW_SCHEDULERS)
def test_each_flow_sampler_writes_k_images_per_prompt_from_an_sd3_folder(runs, scheduler):
    rows = [json.loads(line) for line in (runs[scheduler] / "manifest.jsonl").read_text().splitlines()]
    assert [(row["prompt_index"], row["k"]) for row in rows] == [(i, k) for i in range(len(PROMPTS)) for k in range(K)]
    for row in rows:
        assert Image.open(runs[scheduler] / row["image"]).size == (64, 64)
    assert json.loads((runs[scheduler] / "generation_config.json").read_text())["scheduler"] == scheduler


def test_the_flow_dpm_solver_is_another_sampler_than_the_pipelines_euler(runs):
    assert mean_difference(runs["default"], runs["flow_dpmpp_2m"]) > 0.5


def test_shift_reaches_the_scheduler_and_is_recorded(runs):
    assert mean_difference(runs["default"], runs["shift_1"]) > 1.0
    assert json.loads((runs["shift_1"] / "generation_config.json").read_text())["shift"] == 1.0
    # left to the pipeline, it is not recorded: folders made before the flag resume as they were
    assert "shift" not in json.loads((runs["default"] / "generation_config.json").read_text())


def test_max_sequence_length_reaches_the_pipeline_and_is_recorded(runs):
    assert mean_difference(runs["default"], runs["max_sequence_length_32"]) > 1.0
    config = json.loads((runs["max_sequence_length_32"] / "generation_config.json").read_text())
    assert config["max_sequence_length"] == 32


@pytest.mark.parametrize(
    ("model", "extra", "expected"),
    [
        (SD3_BASE, ["--scheduler", "ddim"], "is a sampler of SD1.x, SD2.x and SDXL"),
        (SD3_BASE, ["--unet_path", SDXL_BASE], "--unet_path is for UNet pipelines"),
        (SD3_BASE, ["--resolution", 72], "must be a multiple of 16"),
        (SDXL_BASE, ["--scheduler", "flow_dpmpp_2m"], "is for flow-matching pipelines (SD3)"),
        (SDXL_BASE, ["--shift", 3.0], "is for flow-matching pipelines (SD3)"),
        (SDXL_BASE, ["--max_sequence_length", 77], "is for flow-matching pipelines (SD3)"),
        (SDXL_BASE, ["--transformer_path", SD3_BASE], "--transformer_path is for flow pipelines"),
        (SD3_BASE, ["--transformer_path", "/no/such/folder"], "--transformer_path '/no/such/folder' does not exist"),
    ],
    ids=[
        "ddpm-sampler-on-sd3",
        "unet-on-sd3",
        "sd3-resolution",
        "flow-sampler-on-sdxl",
        "shift-on-sdxl",
        "t5-on-sdxl",
        "transformer-on-sdxl",
        "missing-transformer",
    ],
)
def test_flags_of_the_other_family_stop_in_one_line(model, extra, expected, prompts_file, tmp_path, capsys):
    argv = generate_argv(tmp_path, "refused", prompts_file, *extra, model=model)
    assert expected in error_in_process(generate, argv, capsys)
    assert not (tmp_path / "refused").exists()


def test_a_fine_tuned_transformer_is_what_draws_with_transformer_path(runs, prompts_file, tmp_path):
    """A full fine-tune of train_diffusion_dpo_sd3.py leaves transformer/ alone: --transformer_path draws with it.
    The base's own transformer draws the base's images; one with changed weights draws others."""
    import torch
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(SD3_BASE, subfolder="transformer")
    transformer.save_pretrained(tmp_path / "same" / "transformer")  # a training output folder
    with torch.no_grad():
        transformer.proj_out.weight.mul_(1.5)
    transformer.save_pretrained(tmp_path / "changed-transformer")  # the transformer folder itself
    for name in ("same", "changed"):
        path = tmp_path / name if name == "same" else tmp_path / "changed-transformer"
        generate.main(generate.parse_args(generate_argv(tmp_path, name, prompts_file, "--transformer_path", path)))
    assert mean_difference(runs["default"], tmp_path / "same") < 1e-6
    assert mean_difference(runs["default"], tmp_path / "changed") > 1.0
    config = json.loads((tmp_path / "changed" / "generation_config.json").read_text())
    assert config["transformer_path"] == str((tmp_path / "changed-transformer").resolve())
