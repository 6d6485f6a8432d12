"""The test kit: the helpers that several test files use, as plain functions and constants (`from kit import ...`).

Launching a script or tool as a user does, reading what it prints (the one error line, the `finished:` line) and
what it writes (summaries, pair shards, CSVs, images), comparing weights, and building tiny models. Fixtures live in
conftest.py; a helper that a second test file needs belongs here, not in that file.
"""

import csv
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image


REPO = Path(__file__).resolve().parents[1]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
ACCELERATE_CONFIGS = REPO / "examples" / "accelerate_configs"
# The pre-trained tiny-world bases, shipped with the repository (examples/tiny_world/README.md): whole pipeline
# folders the scripts read in place. learning/test_tiny_world_bases.py checks that pretrain_tiny_world.py still
# builds them (opt-in: TINY_WORLD_REBUILD=1).
TINY_WORLD_BASES = REPO / "examples" / "tiny_world" / "bases"


# Launching scripts and tools ---


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(script, args, num_processes=1, timeout=600, check=True, accelerate=False, bitsandbytes=False):
    """Run a training script (or tool) on the CPU as a user does; returns the CompletedProcess (stdout+stderr in
    .stdout). Several processes go through `accelerate launch --multi_gpu`; one process runs with plain `python`, as
    the scripts' docstrings allow (the Accelerator is the same; `accelerate launch --num_processes 1` only adds a
    launcher process, 2.5 s of start-up that the suite paid about a hundred times), unless `accelerate` is True.
    The run sees bitsandbytes only when `bitsandbytes` is True (conftest.py: the suite's processes start without
    it)."""
    env = {**os.environ, **OFFLINE_ENV}
    if bitsandbytes:
        env["SUITE_WITHOUT_BITSANDBYTES"] = "0"
    if num_processes == 1 and not accelerate:
        cmd = python_command(script)
    else:
        cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_machines", "1"]
        cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
        if num_processes > 1:
            # `--cpu --num_processes 2` silently starts one process; this is the recipe that starts two
            # (ENVIRONMENT.md).
            env["ACCELERATE_USE_CPU"] = "1"
            cmd += ["--multi_gpu", "--num_processes", str(num_processes), "--main_process_port", str(free_port())]
        else:
            cmd += ["--num_processes", "1"]
        if script.startswith("examples/") and script.endswith(".py"):
            cmd += ["-m", script[: -len(".py")].replace("/", ".")]  # a tool runs as a module, as its README says
        else:
            cmd += [str(REPO / script)]
    cmd += [str(a) for a in args]
    result = subprocess.run(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed with exit code {result.returncode}:\n{result.stdout[-6000:]}")
    return result


def launch_with_config(config, script, args, overrides, env_overrides=(), timeout=600):
    """`accelerate launch --config_file <config> <overrides>`: a GPU config of examples/accelerate_configs with the
    flags that make it run on the CPU. Returns the output."""
    env = {**os.environ, **OFFLINE_ENV, **dict(env_overrides)}
    cmd = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--config_file",
        str(ACCELERATE_CONFIGS / config),
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(free_port()),
        *overrides,
        str(REPO / script),
        *[str(a) for a in args],
    ]
    result = subprocess.run(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"{' '.join(cmd)} failed with exit code {result.returncode}:\n{result.stdout[-6000:]}"
    )
    return result.stdout


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


def run_tool(script, args, expect_success=True):
    """Run a tool with plain `python` (run_python); unless expect_success is False, a failure raises with its
    output."""
    result = run_python(script, args)
    if expect_success and result.returncode != 0:
        raise AssertionError(
            f"{script} {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stdout[-4000:]}"
        )
    return result


def tiny_args(tiny_assets, output_dir, *extra):
    """A training script's flags for a short run on the tiny assets (conftest `tiny_assets`)."""
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


def pair_args(model, output_dir, *extra):
    """The flags a pair-drawing tool (generate_pairs.py, build_pairs.py) shares, for 2-step 64 px draws on a tiny
    pipeline in batches of 2 and shards of 4; `extra` names the data and anything else."""
    return [
        "--pretrained_model_name_or_path",
        model,
        "--num_inference_steps",
        2,
        "--resolution",
        64,
        "--batch_size",
        2,
        "--shard_size",
        4,
        "--output_dir",
        output_dir,
        *extra,
    ]


# What a tool prints ---


def one_line_error(result):
    """The error as a user sees it: exit code 2, no traceback, and a single line that says `error:`."""
    assert result.returncode == 2, result.stdout[-3000:]
    assert "Traceback" not in result.stdout, result.stdout[-3000:]
    errors = [line for line in result.stdout.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stdout[-3000:]
    return errors[0]


def one_line_error_under_accelerate(result, script):
    """A refused run of `script` as a user sees it where `accelerate launch` may have started it: a failure exit,
    one `error:` line, and no traceback through the script (accelerate adds its own report that its child failed,
    traceback included)."""
    assert result.returncode != 0, result.stdout[-3000:]
    assert f'{script}", line' not in result.stdout, result.stdout[-3000:]
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:") or " error: " in line]
    assert len(errors) == 1, result.stdout[-3000:]
    return errors[0]


def finished_line(result, tool, last=False):
    """The one `== <tool> finished: ...` line of a tool's output; with last=True it must also be the output's last
    line."""
    lines = [line for line in result.stdout.splitlines() if line.startswith(f"== {tool} finished:")]
    assert len(lines) == 1, result.stdout[-3000:]
    if last:
        assert result.stdout.strip().splitlines()[-1] == lines[0].strip(), result.stdout[-3000:]
    return lines[0]


# What a run writes ---


def summary_of(output_dir):
    """A training run's training_summary.json."""
    return json.loads((Path(output_dir) / "training_summary.json").read_text())


def shard_files(output_dir):
    """The pair shards of a pair tool's output folder, in order."""
    return sorted((Path(output_dir) / "shards").glob("shard-*.parquet"))


def read_pairs(output_dir):
    """Every row of every shard of a pair tool's output folder, in order, as dicts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(path) for path in shard_files(output_dir)]).to_pylist()


def read_parquet(path):
    """The rows of one parquet file, as dicts."""
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def draw_again(model, seed, prompts):
    """Draw each prompt alone as the pair tools draw (2 steps, guidance 5, 64 px) from a pair's stored seed: the
    pixels of each image, to compare with the pair's."""
    import torch

    from examples.lib.sampling import generator_for, load_pipeline

    pipeline = load_pipeline(str(model), torch.float32, "cpu")
    images = [
        pipeline(
            prompt=[prompt],
            num_inference_steps=2,
            guidance_scale=5.0,
            height=64,
            width=64,
            generator=[generator_for(seed)],
        ).images[0]
        for prompt in prompts
    ]
    return [pixels(image) for image in images]


def file_states(output_dir):
    """{shard name: (modification time, bytes)}: compare two to see that a rerun left the shards alone."""
    return {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in shard_files(output_dir)}


def read_csv(path):
    """The rows of a CSV file (scores.csv, ...), as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_lines(path, lines):
    """A text file of `lines` (a prompt file, an instruction template); returns its path."""
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_run(run_dir, prompts, images, per_prompt=1):
    """A run folder as examples/eval/generate.py leaves it, made without a model: `per_prompt` images of each prompt
    (`images` in manifest order, prompt by prompt), named and seeded as generate.py's with --seed 0, and
    manifest.jsonl."""
    from examples.eval.generate import image_filename
    from examples.lib.sampling import image_seed

    run_dir.mkdir(parents=True)
    rows = []
    for index, (i, k) in enumerate((i, k) for i in range(len(prompts)) for k in range(per_prompt)):
        name = image_filename(i, k)
        images[index].save(run_dir / name)
        rows.append({"prompt": prompts[i], "prompt_index": i, "k": k, "seed": image_seed(0, i, k), "image": name})
    (run_dir / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return run_dir


def copy_run(run_dir, destination):
    """A copy of a run or output folder to change in a test, leaving the module's shared one alone."""
    return Path(shutil.copytree(run_dir, destination))


def pixels(image):
    """An image's RGB pixels as int16, so that the difference of two is exact: PNG bytes, a file or a PIL image."""
    if isinstance(image, bytes):
        image = Image.open(io.BytesIO(image))
    elif isinstance(image, (str, Path)):
        image = Image.open(image)
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def png_bytes(array):
    """The PNG encoding of an RGB array (values 0 to 255)."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# Weights and logs ---


def unet_state(output_dir):
    """The state dict of a pipeline's or a full fine-tune's UNet, loaded with diffusers."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(output_dir, subfolder="unet").state_dict()


def unet_weights(output_dir):
    """The tensors of a full fine-tune's unet/diffusion_pytorch_model.safetensors, read as stored."""
    from safetensors.torch import load_file

    return load_file(Path(output_dir, "unet", "diffusion_pytorch_model.safetensors"))


def assert_same_tensors(first, second, atol=1e-6):
    import torch

    assert first.keys() == second.keys()
    for key in first:
        assert torch.allclose(first[key].float(), second[key].float(), atol=atol), key


def max_abs_diff(first, second):
    assert first.keys() == second.keys()
    return max((first[key].float() - second[key].float()).abs().max().item() for key in first)


def scalar_events(logging_dir):
    """{tag: [(step, value), ...]} of every tensorboard scalar under `logging_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [p for p in Path(logging_dir).rglob("events.out.tfevents.*")]
    assert events, f"no tensorboard event file under {logging_dir}"
    tags = {}
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            tags[tag] = [(event.step, event.value) for event in accumulator.Scalars(tag)]
    return tags


def scalar_tags(logging_dir):
    """{tag: [value, ...]} of every tensorboard scalar under `logging_dir`."""
    return {tag: [value for _, value in events] for tag, events in scalar_events(logging_dir).items()}


# Tiny models ---


def bigram_gpt2(vocab, next_token):
    """A GPT-2 over `vocab` whose next token is next_token[last token] (<eos> for any other), greedy or not.

    Its blocks and position embeddings are zero, so the last hidden state is layer_norm(one_hot(last token)); the
    LM head maps it to the next token (its rows sum to zero, which cancels layer norm's offset).
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    ids = {token: index for index, token in enumerate(vocab)}
    config = GPT2Config(
        vocab_size=len(vocab),
        n_positions=64,
        n_embd=len(vocab),
        n_layer=1,
        n_head=1,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    model = GPT2LMHeadModel(config)
    following = torch.zeros(len(vocab), len(vocab))
    for token, index in ids.items():
        following[ids[next_token.get(token, "<eos>")], index] = 1
    with torch.no_grad():
        for parameter in model.transformer.h.parameters():
            parameter.zero_()
        model.transformer.wpe.weight.zero_()
        model.transformer.wte.weight.copy_(torch.eye(len(vocab)))
        model.lm_head.weight.copy_(10 * (following - following.mean(dim=1, keepdim=True)))
    return model


def write_tiny_dinov2(folder, seed=0):
    """A 2-layer Dinov2Model on 32x32 images with random weights, and its image processor, saved as the hub's are.

    The weights are drawn wider than DINOv2's init (std 0.5, not 0.02) so that different images embed apart."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        initializer_range=0.5,
    )
    Dinov2Model(config).save_pretrained(folder)
    BitImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)
    return folder


# The learning tests' (tests/learning/): the tiny world's ball prompts, and generating and judging a model ---

COLORS = ("red", "green", "blue", "yellow", "purple", "cyan")
PROMPTS = [f"a photo of a {color} ball" for color in COLORS]
TOP = [f"a photo of a {color} ball at the top" for color in COLORS]
DEGRADED = [f"a photo of a {color} ball at the bottom" for color in COLORS]
IMAGES_PER_PROMPT = 32
MIN_CHANGE = 0.15
MIN_COLOR_MATCH = 0.9


def share(verdicts, field):
    return sum(verdict[field] for verdict in verdicts.values()) / len(verdicts)


def generate_and_judge(tiny_world, output_dir, model_name, *weights, prompts=PROMPTS, guidance_scale=5):
    """Draw IMAGES_PER_PROMPT images of each prompt with examples/eval/generate.py (with the flags in
    tiny_world["sampling"], if any) and judge each with the toy_ball judge: {(prompt_index, k): verdict}
    (examples/tiny_world/report.judge_run).

    generate.py runs in this process (its main, on one thread as its subprocess runs with OMP_NUM_THREADS=1: the
    images are byte for byte those of `python examples/eval/generate.py`), because this is the learning tests'
    measuring instrument, called about twenty times, and a new interpreter would pay about 5 s of imports each
    time. The tool itself is tested as users run it in tests/tools/test_eval.py."""
    import torch

    from examples.eval import generate
    from examples.tiny_world.report import judge_run

    prompts_file = Path(output_dir) / "prompts.txt"
    prompts_file.parent.mkdir(parents=True, exist_ok=True)
    prompts_file.write_text("\n".join(prompts) + "\n")
    args = ["--pretrained_model_name_or_path", tiny_world["model"], "--prompts", prompts_file]
    args += ["--model_name", model_name, "--images_per_prompt", IMAGES_PER_PROMPT, "--seed", 0, "--resolution", 64]
    args += ["--num_inference_steps", 20, "--guidance_scale", guidance_scale, "--batch_size", 96]
    args += ["--output_dir", output_dir, *tiny_world.get("sampling", ()), *weights]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generate.main(generate.parse_args([str(arg) for arg in args]))
    finally:
        torch.set_num_threads(threads)
    return judge_run(Path(output_dir) / model_name)


def tree_bytes(folder):
    """{path relative to `folder`: bytes} of every file under it: compare two to see that a refused run left an
    earlier run's outputs exactly as they were."""
    folder = Path(folder)
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def error_in_process(tool, args, capsys):
    """A tool's refusal, run in this process as `python -m` runs it (examples/lib/cli.run_tool over the module's
    `main` and `parse_args`), without starting an interpreter: exit status 2, no traceback, one `error:` line
    (argparse's usage error or run_tool's line), which it returns. `tool` is the imported module, `capsys` pytest's
    fixture."""
    import pytest

    from examples.lib.cli import run_tool as run_tool_in_process

    with pytest.raises(SystemExit) as exit_info:
        run_tool_in_process(tool.main, lambda: tool.parse_args([str(arg) for arg in args]))
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert exit_info.value.code == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 1, output[-3000:]
    return errors[0]


def parse_args_refusal(script, argv, capsys):
    """A training script's parse_args (`script`: its module name), in-process, refusing `argv`: the single `error:`
    line it prints (exit status 2, no traceback)."""
    import importlib

    import pytest

    with pytest.raises(SystemExit) as stopped:
        importlib.import_module(script).parse_args([str(arg) for arg in argv])
    assert stopped.value.code == 2
    output = capsys.readouterr()
    errors = [line for line in (output.out + output.err).splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in output.err, output.err
    return errors[0]


def bad_prompt_source(tmp_path, kind):
    """A --prompts value that cannot be read, of the kind: missing, binary (a .txt that is not UTF-8),
    broken_parquet (text under a parquet name) or folder (a folder without a data file datasets reads)."""
    if kind == "missing":
        return tmp_path / "nowhere" / "prompts.txt"
    if kind == "binary":
        path = tmp_path / "prompts.txt"
        path.write_bytes(bytes(range(128, 256)) * 4)
        return path
    if kind == "broken_parquet":
        path = tmp_path / "prompts.parquet"
        path.write_text("caption\na red ball\n")
        return path
    folder = tmp_path / "prompt_folder"
    folder.mkdir()
    (folder / "notes.bin").write_bytes(b"\x00\x01")
    return folder


# CaPO's pairs in the learning tests: 8 occurrences of each caption, 8 samples each (generate.py
# --keep_duplicate_prompts), 48 prompt groups, each calibrated on its own (Eq. 7) and paired best against worst, as
# the paper's N = 16 images of a prompt; drawn in 10 steps (the judge draws in 20): 384 images in about 12 s, where 16
# occurrences in 20 steps took four times as long and moved the balls as far (the learning files' docstrings).
CAPO_REPEATS, CAPO_SAMPLES, CAPO_SAMPLING_STEPS = 8, 8, 10


def capo_pair_sets(tiny_world, root, rewards, sampling_steps=CAPO_SAMPLING_STEPS, repeats=CAPO_REPEATS):
    """{reward: pairs folder} for each of `rewards` ("toy_ball", and "reversed", its negative: a reward that prefers
    the ball at the bottom): the base's own samples (`repeats` occurrences of each caption, CAPO_SAMPLES images
    each, `sampling_steps` steps, with tiny_world["sampling"], if any) scored by toy_ball, calibrated and paired by
    select_pairs.py, one pair per occurrence."""
    import csv

    root.mkdir(parents=True, exist_ok=True)
    (root / "prompts.txt").write_text("\n".join(PROMPTS * repeats) + "\n")
    args = ["--pretrained_model_name_or_path", tiny_world["model"], "--prompts", root / "prompts.txt"]
    args += ["--keep_duplicate_prompts", "--images_per_prompt", CAPO_SAMPLES, "--seed", 100, "--resolution", 64]
    args += ["--num_inference_steps", sampling_steps, "--guidance_scale", 5, "--batch_size", 96]
    args += ["--output_dir", root, "--model_name", "base", *tiny_world.get("sampling", ())]
    for script, script_args in (
        ("examples/eval/generate.py", args),
        ("examples/eval/score.py", ["--run_dirs", root / "base", "--reward_models", "toy_ball"]),
    ):
        result = run_python(script, script_args)
        assert result.returncode == 0, result.stdout[-4000:]
    scores = root / "base" / "scores.csv"
    with open(scores, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["reversed"] = repr(-float(row["toy_ball"]))
    with open(scores, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    folders = {}
    for reward in rewards:
        folders[reward] = root / f"pairs-{reward}"
        result = run_python(
            "examples/capo/select_pairs.py",
            ["--run_dirs", root / "base", "--reward_models", reward, "--reward_kinds", f"{reward}=bradley_terry"]
            + ["--selection", "best_worst", "--output_dir", folders[reward]],
        )
        assert result.returncode == 0, result.stdout[-4000:]
        assert f"{repeats * len(PROMPTS)} pairs" in result.stdout
    return folders


def sd3_lora_change(model, lora_folder, prompt="a photo of a red ball"):
    """A trained LoRA in the stock StableDiffusion3Pipeline: (its rank as the pipeline reads it, the largest change it
    makes to a 64 px image drawn in 2 steps from seed 0)."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    def render(pipeline):
        pipeline.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)
        return pipeline(prompt, num_inference_steps=2, height=64, width=64, output_type="np", generator=generator)

    pipeline = StableDiffusion3Pipeline.from_pretrained(str(model))
    before = render(pipeline).images
    pipeline.load_lora_weights(str(lora_folder))
    (config,) = pipeline.transformer.peft_config.values()
    return config.r, float(abs(render(pipeline).images - before).max())


def other_family_refusal(script, found, tmp_path):
    """The one error line of `script` given a pipeline folder whose model_index.json names `found`."""
    import json

    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": found}))
    argv = ["--pretrained_model_name_or_path", model, "--dataset_name", tmp_path, "--output_dir", tmp_path / "o"]
    return one_line_error(run_python(script, argv))
