"""Shared fixtures: tiny assets built once per session, and a runner that launches scripts as users do."""

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Every Hugging Face cache (datasets' Arrow files, the latents cache under it, hub downloads) goes to a
# folder of this test session, never the user's ~/.cache. Set before anything imports datasets, and
# inherited by every script the tests launch.
HF_HOME = tempfile.mkdtemp(prefix="preference-tests-hf-")
os.environ.update({"HF_HOME": HF_HOME, "HF_DATASETS_CACHE": os.path.join(HF_HOME, "datasets")})
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """The default tiny SDXL pipeline and tiny Pick-a-Pic dataset (examples/tiny_world/make_tiny_assets.py)."""
    from examples.tiny_world import make_tiny_assets

    root = tmp_path_factory.mktemp("tiny")
    make_tiny_assets.main(["--output_dir", str(root)])
    return {"model": str(root / "tiny-sdxl"), "dataset": str(root / "tiny-pickapic"), "root": root}


@pytest.fixture(scope="session")
def tiny_world(tiny_assets):
    """The tiny pipeline pre-trained to draw the tiny world's balls (examples/tiny_world/pretrain_tiny_world.py).

    Built once and kept on disk under TINY_WORLD_CACHE (default ~/.cache/preference-alignment/tiny-world): a
    build whose fingerprint (settings, recipe source, torch and diffusers versions) matches is reused, anything
    else is rebuilt (about 3 minutes on 2 cores)."""
    from examples.tiny_world import pretrain_tiny_world

    path, _ = pretrain_tiny_world.build(pretrain_tiny_world.parse_args(["--output_dir", tiny_world_cache()]))
    return {"model": str(path), "dataset": tiny_assets["dataset"]}


def tiny_world_cache():
    return os.environ.get("TINY_WORLD_CACHE") or str(Path.home() / ".cache" / "preference-alignment" / "tiny-world")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(script, args, num_processes=1, timeout=600, check=True):
    """`accelerate launch` a training script on the CPU; returns the CompletedProcess (stdout+stderr in .stdout)."""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    env = {**os.environ, **OFFLINE_ENV}
    cmd = [accelerate, "launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if num_processes > 1:
        # `--cpu --num_processes 2` silently starts one process; this is the recipe that starts two (ENVIRONMENT.md).
        env["ACCELERATE_USE_CPU"] = "1"
        cmd += ["--multi_gpu", "--num_processes", str(num_processes), "--main_process_port", str(free_port())]
    else:
        cmd += ["--num_processes", "1"]
    cmd += [str(REPO / script), *[str(a) for a in args]]
    result = subprocess.run(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed with exit code {result.returncode}:\n{result.stdout[-6000:]}")
    return result


def python_command(script):
    """How a user runs `script`: a training script as a file, a tool under examples/ as a module
    (`python -m examples.eval.generate`, from the repository root)."""
    if script.startswith("examples/") and script.endswith(".py"):
        return [sys.executable, "-m", script[: -len(".py")].replace("/", ".")]
    return [sys.executable, str(REPO / script)]


def run_python(script, args, timeout=300):
    """Run a script with plain `python` (for argument errors that must stop before any model loads)."""
    return subprocess.run(
        [*python_command(script), *[str(a) for a in args]],
        cwd=REPO,
        env={**os.environ, **OFFLINE_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def tiny_args(tiny_assets, output_dir, *extra):
    return [
        "--pretrained_model_name_or_path",
        tiny_assets["model"],
        "--dataset_name",
        tiny_assets["dataset"],
        "--resolution",
        64,
        "--train_batch_size",
        4,
        "--seed",
        0,
        "--lr_warmup_steps",
        0,
        "--checkpointing_steps",
        1000,
        "--report_to",
        "none",
        "--output_dir",
        output_dir,
        *extra,
    ]
