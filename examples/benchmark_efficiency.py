#!/usr/bin/env python
"""Seconds per step, peak memory and the largest batch that fits, for each method, against its floor.

Runs the real training scripts (`train_mapo_sdxl.py`, `train_diffusion_dpo_sdxl.py`) as
subprocesses on the same model, resolution, per-device batch and seed, with cached latents and
without, and reads the `training_summary.json` each run writes. Then it measures each method's
floor in a separate process (so peak memories do not mix):

- MaPO floor: one UNet forward + backward on the 2B batch (winners and losers of B pairs) and the
  optimizer step, the least a reference-free pairwise objective can cost;
- Diffusion-DPO floor: the same plus one batched no-grad forward of the reference (a frozen copy
  with full fine-tuning, the same network with adapters off with LoRA).

It prints one markdown table (method, latents, s/step, floor s/step, ratio, peak memory, floor
peak memory, largest batch in the memory budget) and MaPO's ratios to Diffusion-DPO, and writes
`benchmark.md` and `benchmark.json` to --output_dir.

    # The 24 M-parameter UNet at 32x32 latents (assets built on the fly, ~1 min):
    python examples/benchmark_efficiency.py --output_dir benchmark
    # Your own model and data, on a GPU, as the MaPO paper's Table 4 ran:
    python examples/benchmark_efficiency.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --dataset_name yuvalkirstain/pickapic_v2 --resolution 1024 --train_batch_size 4 \\
        --mixed_precision bf16 --gradient_checkpointing --use_8bit_adam --memory_budget_gb 80
    # A one-minute smoke test on the 1 M-parameter tiny UNet:
    python examples/benchmark_efficiency.py --quick --output_dir /tmp/benchmark-quick

Peak memory is the training loop's own (the scripts' `peak_memory_bytes`; the floor's step loop,
measured the same way with the scripts' `PeakMemory`): CUDA's allocator peak on a GPU and the
process's peak resident set size (RSS) on the CPU, each reset when the loop starts. RSS still
counts what is resident then: the Python interpreter, the imported libraries (~0.5 GiB) and the
models, in the training runs and in the floor alike. Every run passes `--skip_final_save`: the
runs are measured, and their weights are not written.

On a GPU the largest batch is searched with short runs (doubling, then bisection) up to the
dataset's number of training pairs: a larger batch cannot be measured on it, and a search that
reaches it reports "≥ N (dataset size)" (`max_batch_capped` in benchmark.json).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
METHODS = {
    "mapo": {"label": "MaPO", "script": "train_mapo_sdxl.py", "needs_reference": False, "args": ["--beta_mapo", "8"]},
    "diffusion-dpo": {
        "label": "Diffusion-DPO",
        "script": "train_diffusion_dpo_sdxl.py",
        "needs_reference": True,
        "args": ["--beta_dpo", "5000"],
    },
}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
GIB = 2**30


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output_dir",
        type=str,
        default="benchmark-efficiency",
        help="Where benchmark.md, benchmark.json and the runs' folders go.",
    )
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help=(
            "SDXL pipeline to benchmark (default: build the 24 M-parameter bench pipeline, or the tiny one with "
            "--quick, in --output_dir)."
        ),
    )
    parser.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="Preference dataset for the runs (default: built with the pipeline).",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Training resolution (default: 256 for the bench model, 64 with --quick).",
    )
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="Methods to benchmark."
    )
    parser.add_argument(
        "--latents",
        nargs="+",
        default=["cached", "uncached"],
        choices=["cached", "uncached"],
        help="cached: --cache_latents (the loop runs only the UNet); uncached: VAE and text encoders every step.",
    )
    parser.add_argument(
        "--train_batch_size", type=int, default=None, help="Preference pairs per device (default: 4, 2 with --quick)."
    )
    parser.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help=(
            "Optimizer steps per timed run; the scripts report the median after the first 2 (default: 12, 4 with "
            "--quick)."
        ),
    )
    parser.add_argument(
        "--floor_steps",
        type=int,
        default=None,
        help="Timed floor steps after --floor_warmup_steps (default: 10, 3 with --quick).",
    )
    parser.add_argument(
        "--floor_warmup_steps", type=int, default=2, help="Untimed floor steps first (allocation, kernel selection)."
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help=(
            "Run every timed run and floor this many times, interleaved, and report medians (steadier on a busy "
            "machine)."
        ),
    )
    parser.add_argument(
        "--memory_probe_batch_size",
        type=int,
        default=None,
        help=(
            "Second per-device batch whose peak memory gives the memory per sample on the CPU (default: twice "
            "--train_batch_size, 8 with --quick)."
        ),
    )
    parser.add_argument(
        "--memory_probe_steps", type=int, default=3, help="Steps of the run at --memory_probe_batch_size."
    )
    parser.add_argument(
        "--memory_budget_gb",
        type=float,
        default=None,
        help=(
            "Memory budget for the largest-batch column, GiB (default: the GPU's memory, or the machine's RAM on the "
            "CPU)."
        ),
    )
    parser.add_argument(
        "--lora_rank", type=int, default=None, help="Benchmark LoRA of this rank instead of full fine-tuning."
    )
    parser.add_argument(
        "--mixed_precision",
        type=str,
        default="no",
        choices=["no", "fp16", "bf16"],
        help="Passed to the scripts; the floor uses the same.",
    )
    parser.add_argument(
        "--gradient_checkpointing", action="store_true", help="Passed to the scripts; the floor uses the same."
    )
    parser.add_argument("--use_8bit_adam", action="store_true", help="Passed to the scripts; the floor uses the same.")
    parser.add_argument(
        "--num_threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS of every run (CPU). 1 keeps timings steady on a shared machine.",
    )
    parser.add_argument(
        "--launcher",
        type=str,
        default="python",
        choices=["python", "accelerate"],
        help="Start the scripts with plain python (one process) or `accelerate launch --num_processes 1`.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of every run and of the floor's inputs.")
    parser.add_argument(
        "--quick", action="store_true", help="Reduced setting for tests: the tiny UNet at 8x8 latents and a few steps."
    )
    # Internal: the benchmark measures each floor in a child process of itself.
    parser.add_argument("--measure_floor", type=str, default=None, choices=list(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--floor_output", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    defaults = {"train_batch_size": (4, 2), "max_train_steps": (12, 4), "floor_steps": (10, 3)}
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if (args.pretrained_model_name_or_path is None) != (args.dataset_name is None):
        parser.error(
            "--pretrained_model_name_or_path and --dataset_name go together: give both, or neither to build the "
            "benchmark's own assets."
        )
    if args.pretrained_model_name_or_path is not None and args.resolution is None:
        parser.error("--resolution is required with --pretrained_model_name_or_path (e.g. 1024 for SDXL).")
    if args.max_train_steps < 3:
        parser.error(
            "--max_train_steps must be at least 3 (the scripts time the steps after the first 2), got "
            f"{args.max_train_steps}."
        )
    if args.memory_probe_batch_size is None:
        args.memory_probe_batch_size = 8 if args.quick else 2 * args.train_batch_size
    if args.memory_probe_batch_size == args.train_batch_size:
        parser.error(
            "--memory_probe_batch_size must differ from --train_batch_size (two batch sizes give the memory per "
            "sample)."
        )
    for name in ("train_batch_size", "floor_steps", "memory_probe_steps", "num_threads", "repeats"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}.")
    return args


# ----------------------------------------------------------------------------------------------
# Floor: the network passes an objective needs, and nothing else (runs in its own process)
# ----------------------------------------------------------------------------------------------
def import_training_script():
    """`train_diffusion_dpo_sdxl` as a module (no training runs on import): the floor takes the scripts' own LoRA
    set-up, reference forward and per-phase peak memory from it, so that it measures what the scripts do."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import train_diffusion_dpo_sdxl

    return train_diffusion_dpo_sdxl


def measure_floor(args, method, batch_size):
    """Median seconds per step and peak memory of the floor of `method` at `batch_size` pairs per device.

    Same UNet, optimizer settings (the scripts' AdamW defaults), LoRA set-up, reference forward, gradient
    checkpointing and precision as the training scripts; random inputs shaped as the scripts build them (2B
    latents, the two text encoders' hidden states, pooled embeddings, SDXL time ids). The peak is that of the
    step loop alone (`PeakMemory`, reset when the loop starts), as the scripts report their training loop's.
    """
    script = import_training_script()
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    memory = script.PeakMemory(device)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    lora = bool(args.lora_rank)
    # As the scripts load them: with LoRA the UNet in the weight dtype, with full fine-tuning in float32 and the
    # reference a frozen copy in the weight dtype.
    unet = UNet2DConditionModel.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="unet", dtype=weight_dtype if lora else torch.float32
    ).to(device)
    reference = None
    if lora:
        script.add_lora_adapters(unet, args.lora_rank, None, args.mixed_precision)
    elif METHODS[method]["needs_reference"]:
        reference = UNet2DConditionModel.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="unet", dtype=weight_dtype
        )
        reference.requires_grad_(False).eval().to(device)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=1e-7, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-7, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    config = unet.config
    n = 2 * batch_size  # winners and losers in one call
    latent_size = args.resolution // 8
    pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    sequence_length = text_sequence_length(args.pretrained_model_name_or_path)
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)

    def inputs():
        conditioning = {
            "encoder_hidden_states": torch.randn(n, sequence_length, config.cross_attention_dim, device=device),
            "added_cond_kwargs": {
                "text_embeds": torch.randn(n, pooled_dim, device=device),
                "time_ids": torch.rand(n, 6, device=device) * args.resolution,
            },
        }
        return (
            torch.randn(n, config.in_channels, latent_size, latent_size, device=device),
            torch.randint(0, 1000, (n,), device=device),
            conditioning,
            torch.randn(n, config.out_channels, latent_size, latent_size, device=device),
        )

    def step(noisy_latents, timesteps, conditioning, target):
        with autocast:
            model_pred = unet(noisy_latents, timesteps, **conditioning).sample
            if METHODS[method]["needs_reference"]:
                ref_pred = script.reference_prediction(unet, reference, lora, noisy_latents, timesteps, conditioning)
        loss = F.mse_loss(model_pred.float(), target)
        if METHODS[method]["needs_reference"]:
            # The reference output enters the loss, as in DPO, without a gradient.
            loss = loss + 0.0 * ref_pred.float().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = []
    with memory.phase("training"):  # the scripts reset the counter where their training loop starts, too
        for index in range(args.floor_warmup_steps + args.floor_steps):
            batch = inputs()  # drawn outside the timed region: the scripts' data comes from the loader
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            step(*batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if index >= args.floor_warmup_steps:
                seconds.append(time.perf_counter() - started)
    return {
        "seconds_per_step_median": statistics.median(seconds),
        "peak_memory_bytes": memory.peaks["training"],
        "peak_memory_kind": memory.kind,
        "train_batch_size": batch_size,
        "unet_parameters": sum(p.numel() for name, p in unet.named_parameters() if "lora_" not in name),
    }


def text_sequence_length(model_path):
    """Token length of the text encoders' hidden states (77 for SDXL's CLIP tokenizers)."""
    config = Path(model_path, "tokenizer", "tokenizer_config.json")
    if config.exists():
        length = json.loads(config.read_text()).get("model_max_length")
        if isinstance(length, int) and length < 100_000:
            return length
    return 77


# ----------------------------------------------------------------------------------------------
# Running the scripts and the floors
# ----------------------------------------------------------------------------------------------
def child_env(args):
    return {
        **os.environ,
        **OFFLINE_ENV,
        "OMP_NUM_THREADS": str(args.num_threads),
        "MKL_NUM_THREADS": str(args.num_threads),
    }


def run(cmd, args, log_path):
    """Run a child process, keep its output in `log_path`, and stop with the tail of the log if it fails."""
    with open(log_path, "w") as log:
        result = subprocess.run(
            [str(c) for c in cmd], cwd=REPO, env=child_env(args), stdout=log, stderr=subprocess.STDOUT
        )
    if result.returncode != 0:
        tail = Path(log_path).read_text()[-4000:]
        raise RuntimeError(
            f"{' '.join(str(c) for c in cmd)} failed with exit code {result.returncode}; log {log_path}:\n{tail}"
        )


def run_training(args, method, cached, batch_size, steps, output_dir):
    """One training run of `method`'s script; returns its training_summary.json."""
    script = REPO / METHODS[method]["script"]
    if args.launcher == "accelerate":
        launcher = [
            Path(sys.executable).parent / "accelerate",
            "launch",
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            args.mixed_precision,
            "--dynamo_backend",
            "no",
        ]
    else:
        launcher = [sys.executable]
    cmd = [
        *launcher,
        script,
        *METHODS[method]["args"],
        "--pretrained_model_name_or_path",
        args.pretrained_model_name_or_path,
        "--dataset_name",
        args.dataset_name,
        "--resolution",
        args.resolution,
        "--train_batch_size",
        batch_size,
        "--max_train_steps",
        steps,
        "--seed",
        args.seed,
        "--lr_warmup_steps",
        0,
        "--checkpointing_steps",
        10**9,
        "--validation_steps",
        10**9,
        "--report_to",
        "none",
        "--mixed_precision",
        args.mixed_precision,
        "--output_dir",
        output_dir,
        "--skip_final_save",  # the runs are measured, not kept: no 10 GB UNet per full fine-tuning run
    ]
    if cached:
        cmd += ["--cache_latents", "--latents_cache_dir", Path(args.output_dir, "latents_cache")]
    if args.lora_rank:
        cmd += ["--lora_rank", args.lora_rank]
    if args.gradient_checkpointing:
        cmd += ["--gradient_checkpointing"]
    if args.use_8bit_adam:
        cmd += ["--use_8bit_adam"]
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    run(cmd, args, Path(output_dir, "train.log"))
    summary = json.loads(Path(output_dir, "training_summary.json").read_text())
    summary["num_train_pairs"] = train_pairs_in_log(Path(output_dir, "train.log").read_text())
    return summary


def train_pairs_in_log(log):
    """The number of training pairs a run's loader drew from (`Num pairs = N` in the scripts' log), or None."""
    found = re.search(r"Num pairs = (\d+)", log)
    return int(found.group(1)) if found else None


def run_floor(args, method, batch_size, output_path):
    """Measure a floor in a fresh process of this script, so its peak memory is its own."""
    passthrough = [
        "--pretrained_model_name_or_path",
        args.pretrained_model_name_or_path,
        "--dataset_name",
        args.dataset_name,
        "--resolution",
        args.resolution,
        "--seed",
        args.seed,
        "--mixed_precision",
        args.mixed_precision,
        "--train_batch_size",
        batch_size,
        "--floor_steps",
        args.floor_steps,
        "--floor_warmup_steps",
        args.floor_warmup_steps,
        "--measure_floor",
        method,
        "--floor_output",
        output_path,
    ]
    if args.lora_rank:
        passthrough += ["--lora_rank", args.lora_rank]
    if args.gradient_checkpointing:
        passthrough += ["--gradient_checkpointing"]
    if args.use_8bit_adam:
        passthrough += ["--use_8bit_adam"]
    run([sys.executable, Path(__file__).resolve(), *passthrough], args, Path(output_path).with_suffix(".log"))
    return json.loads(Path(output_path).read_text())


DEVICE_PROBE = """
import json, platform, torch
cuda = torch.cuda.is_available()
print(json.dumps({"cuda": cuda, "torch": torch.__version__, "python": platform.python_version(),
                  "gpu": torch.cuda.get_device_name(0) if cuda else None,
                  "gpu_memory": torch.cuda.get_device_properties(0).total_memory if cuda else None}))
"""


def device_info(args):
    """Torch, GPU and memory facts, asked of a child process: this process never imports torch. It stays
    small, so that where a run's peak RSS can only be read as `ru_maxrss` (which a child inherits from its
    parent at the fork; the scripts' `PeakMemory` falls back to it off Linux) the parent adds little."""
    output = subprocess.run(
        [sys.executable, "-c", DEVICE_PROBE], env=child_env(args), capture_output=True, text=True, check=True
    ).stdout
    info = json.loads(output.strip().splitlines()[-1])
    cpu = "unknown CPU"
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    info["ram"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    info["description"] = (
        f"{os.cpu_count()} cores ({cpu}), {info['ram'] / GIB:.0f} GiB RAM, {info['gpu'] or 'no GPU'}, "
        f"torch {info['torch']}, Python {info['python']}"
    )
    return info


def memory_budget_bytes(args, info):
    if args.memory_budget_gb is not None:
        return int(args.memory_budget_gb * GIB)
    return info["gpu_memory"] if info["cuda"] else info["ram"]


def estimate_max_batch_cpu(peak_small, batch_small, peak_large, batch_large, budget):
    """Largest per-device batch under `budget` from peaks at two batch sizes: intercept + slope * B (CPU estimate)."""
    per_sample = (peak_large - peak_small) / (batch_large - batch_small)
    intercept = peak_small - per_sample * batch_small
    if per_sample <= 0:
        return None, per_sample, intercept  # RSS did not grow with the batch: no estimate
    return max(0, int((budget - intercept) // per_sample)), per_sample, intercept


def search_max_batch(fits, start, cap):
    """Largest batch in [0, `cap`] for which `fits(batch)` holds: doubling from `start`, then bisection.

    `fits` must be monotone (true up to some batch, false above). A batch larger than `cap`, the dataset's
    number of training pairs, cannot be measured (the loader's batches stop growing there, and so does the
    memory), so `fits` is never asked about one. Returns (batch, capped): capped is True when `cap` itself
    fits, i.e. the largest batch is at least `cap` and the dataset is too small to say more.
    """
    if cap < 1:
        raise ValueError(f"the dataset has no training pairs to search a batch size with (cap {cap})")
    start = min(max(start, 1), cap)
    if not fits(start):
        low, high = 0, start
    else:
        low = start
        while True:
            if low >= cap:
                return cap, True
            candidate = min(2 * low, cap)
            if not fits(candidate):
                high = candidate
                break
            low = candidate
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low, False


def search_max_batch_gpu(args, method, cached, budget, start, cap, work_dir):
    """Largest per-device batch whose run finishes within `budget` of CUDA memory (`search_max_batch`), at most
    `cap`, the dataset's number of training pairs; returns (batch, capped).

    A batch fits when a short run of the script succeeds and its training loop's CUDA peak stays within the
    budget; an out-of-memory failure counts as not fitting. Runs on GPUs only; the tests check
    `search_max_batch` with a stand-in for `fits` (the machines this project is tested on have no GPU).
    """

    def fits(batch_size):
        try:
            summary = run_training(
                args,
                method,
                cached,
                batch_size,
                max(3, args.memory_probe_steps),
                Path(work_dir, f"batch-{batch_size}"),
            )
        except RuntimeError as error:
            if "out of memory" in str(error).lower():
                return False
            raise
        return summary["peak_memory_bytes"] <= budget

    return search_max_batch(fits, start, cap)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def fmt_gib(value):
    return f"{value / GIB:.2f} GiB"


def fmt_max_batch(row):
    """The max-batch cell: the batch, "n/a" without an estimate, or a lower bound where the search reached the
    dataset's size (a larger batch cannot be measured on it)."""
    if row["max_batch"] is None:
        return "n/a"
    if row.get("max_batch_capped"):
        return f"≥ {row['max_batch']} (dataset size)"
    return str(row["max_batch"])


def render_markdown(report):
    setting = report["setting"]
    on_gpu = setting["peak_memory_kind"] == "cuda"
    latent_size = setting["resolution"] // 8
    if on_gpu:
        search = "doubling, then bisection, of short runs, up to the dataset's number of training pairs."
    else:
        search = (
            f"estimate from the peaks at {setting['train_batch_size']} and {setting['memory_probe_batch_size']} "
            "pairs (intercept + per-pair slope)."
        )
    lines = [
        f"Model: {setting['model']} (UNet {setting['unet_parameters'] / 1e6:.1f} M parameters), "
        f"{setting['resolution']} px ({latent_size}x{latent_size} latents), {setting['train_batch_size']} pairs per "
        f"device, {setting['training']}, {setting['threads']} thread(s); s/step: median of "
        f"{setting['timed_steps'] - 2} steps after 2 (floor: {setting['floor_steps']} after "
        f"{setting['floor_warmup_steps']}), median over {setting['repeats']} run(s).",
        f"Peak memory of the training loop (the floor's step loop): "
        f"{'CUDA allocator peak' if on_gpu else 'peak RSS of the process'}; max batch in a "
        f"{fmt_gib(setting['memory_budget_bytes'])} budget: {search}",
        f"Machine: {report['machine']}.",
        "",
        "| method | latents | s/step | floor s/step | ratio to floor | peak memory | floor peak memory "
        "| memory ratio to floor | max batch in budget |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['method']} | {row['latents']} | {row['seconds_per_step']:.3f} "
            f"| {row['floor_seconds_per_step']:.3f} | {row['time_ratio_to_floor']:.2f}x "
            f"| {fmt_gib(row['peak_memory_bytes'])} | {fmt_gib(row['floor_peak_memory_bytes'])} "
            f"| {row['memory_ratio_to_floor']:.2f}x | {fmt_max_batch(row)} |"
        )
    if report["mapo_vs_dpo"]:
        lines += ["", "| MaPO / Diffusion-DPO | latents | time | peak memory | max batch |", "|---|---|---|---|---|"]
        for latents, ratios in report["mapo_vs_dpo"].items():
            batch = f"{ratios['max_batch']:.2f}x" if ratios["max_batch"] is not None else "n/a"
            lines.append(f"| | {latents} | {ratios['time']:.2f}x | {ratios['memory']:.2f}x | {batch} |")
    if report["targets"]:
        lines += [
            "",
            "Targets (cached latents, the issue's): "
            + "; ".join(f"{name}: {'met' if met else 'NOT met'}" for name, met in report["targets"].items()),
        ]
    return "\n".join(lines) + "\n"


def build_assets(args):
    """The bench (or, with --quick, tiny) pipeline and dataset, built once in --output_dir/assets by
    make_tiny_assets.py."""
    preset = "tiny" if args.quick else "bench"
    args.resolution = args.resolution or {"tiny": 64, "bench": 256}[preset]
    root = Path(args.output_dir, "assets")
    model, dataset = root / f"{preset}-sdxl", root / f"{preset}-pickapic"
    if not (model / "model_index.json").exists() or not (dataset / "train.parquet").exists():
        pairs = max(32, max(args.train_batch_size, args.memory_probe_batch_size) * args.max_train_steps)
        print(f"building the {preset} assets in {root} ...", flush=True)
        run(
            [
                sys.executable,
                REPO / "examples" / "tiny_assets" / "make_tiny_assets.py",
                "--unet_preset",
                preset,
                "--output_dir",
                root,
                "--resolution",
                args.resolution,
                "--num_train_pairs",
                pairs,
                "--num_test_pairs",
                8,
                "--num_ties",
                0,
                "--seed",
                args.seed,
            ],
            args,
            Path(args.output_dir, "make_assets.log"),
        )
    args.pretrained_model_name_or_path, args.dataset_name = str(model), str(dataset)


def main(args):
    if args.measure_floor is not None:
        result = measure_floor(args, args.measure_floor, args.train_batch_size)
        Path(args.floor_output).write_text(json.dumps(result))
        return result

    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    if args.pretrained_model_name_or_path is None:
        build_assets(args)
    info = device_info(args)
    on_gpu = info["cuda"]
    budget = memory_budget_bytes(args, info)
    runs_dir = Path(args.output_dir, "runs")
    batch, probe_batch = args.train_batch_size, args.memory_probe_batch_size

    if "cached" in args.latents:
        # Build the latents cache once, untimed: the timed runs below reuse it, as a user's later runs do.
        print("building the latents cache ...", flush=True)
        run_training(args, args.methods[0], True, batch, 1, runs_dir / "cache-build")

    # Every repeat runs every floor and every case once, so a slow spell of the machine hits all alike.
    floor_runs = {method: [] for method in args.methods}
    case_runs = {(method, latents): [] for latents in args.latents for method in args.methods}
    for repeat in range(args.repeats):
        for method in args.methods:
            print(f"[{repeat + 1}/{args.repeats}] floor of {METHODS[method]['label']} ...", flush=True)
            floor_runs[method].append(run_floor(args, method, batch, runs_dir / f"floor-{method}-{repeat}.json"))
        for method, latents in case_runs:
            print(
                f"[{repeat + 1}/{args.repeats}] {METHODS[method]['label']}, {latents} latents: "
                f"{args.max_train_steps} steps ...",
                flush=True,
            )
            case_runs[method, latents].append(
                run_training(
                    args,
                    method,
                    latents == "cached",
                    batch,
                    args.max_train_steps,
                    runs_dir / f"{method}-{latents}-{repeat}",
                )
            )

    def median_of(runs, key):
        return statistics.median(run[key] for run in runs)

    floors = {
        method: {key: median_of(runs, key) for key in ("seconds_per_step_median", "peak_memory_bytes")}
        for method, runs in floor_runs.items()
    }
    rows = []
    for (method, latents), runs in case_runs.items():
        label, cached = METHODS[method]["label"], latents == "cached"
        seconds, peak = median_of(runs, "seconds_per_step_median"), median_of(runs, "peak_memory_bytes")
        per_sample, capped = None, False
        if on_gpu:
            num_pairs = runs[0]["num_train_pairs"]
            if num_pairs is None:
                raise RuntimeError(
                    f"No 'Num pairs = N' in the log of {runs_dir / f'{method}-{latents}-0'}: the batch search needs "
                    "the dataset's number of training pairs (its cap)."
                )
            max_batch, capped = search_max_batch_gpu(
                args, method, cached, budget, batch, num_pairs, runs_dir / f"{method}-{latents}-search"
            )
        else:
            probe = run_training(
                args,
                method,
                cached,
                probe_batch,
                args.memory_probe_steps,
                runs_dir / f"{method}-{latents}-batch{probe_batch}",
            )
            max_batch, per_sample, _ = estimate_max_batch_cpu(
                peak, batch, probe["peak_memory_bytes"], probe_batch, budget
            )
        floor = floors[method]
        rows.append(
            {
                "method": label,
                "latents": latents,
                "seconds_per_step": seconds,
                "floor_seconds_per_step": floor["seconds_per_step_median"],
                "time_ratio_to_floor": seconds / floor["seconds_per_step_median"],
                "peak_memory_bytes": peak,
                "floor_peak_memory_bytes": floor["peak_memory_bytes"],
                "memory_ratio_to_floor": peak / floor["peak_memory_bytes"],
                "max_batch": max_batch,
                # True when the search reached the dataset's size: the largest batch is at least max_batch.
                "max_batch_capped": capped,
                "memory_per_sample_bytes": per_sample,
                "peak_memory_kind": runs[0]["peak_memory_kind"],
                "seconds_per_step_runs": [run["seconds_per_step_median"] for run in runs],
                "floor_seconds_per_step_runs": [run["seconds_per_step_median"] for run in floor_runs[method]],
            }
        )

    by_key = {(row["method"], row["latents"]): row for row in rows}
    mapo_vs_dpo = {}
    for latents in args.latents:
        mapo, dpo = by_key.get(("MaPO", latents)), by_key.get(("Diffusion-DPO", latents))
        if mapo and dpo:
            mapo_vs_dpo[latents] = {
                "time": mapo["seconds_per_step"] / dpo["seconds_per_step"],
                "memory": mapo["peak_memory_bytes"] / dpo["peak_memory_bytes"],
                "max_batch": (
                    mapo["max_batch"] / dpo["max_batch"]
                    if all(row["max_batch"] and not row["max_batch_capped"] for row in (mapo, dpo))
                    else None  # no estimate, or only a lower bound (the dataset's size): no ratio
                ),
            }
    targets = {}
    cached_rows = [row for row in rows if row["latents"] == "cached"]
    if cached_rows:
        targets["every method within 1.15x of its floor"] = all(
            row["time_ratio_to_floor"] <= 1.15 for row in cached_rows
        )
    if "cached" in mapo_vs_dpo:
        targets["MaPO time <= 0.85x Diffusion-DPO"] = mapo_vs_dpo["cached"]["time"] <= 0.85
        if not args.lora_rank:
            targets["MaPO peak memory < Diffusion-DPO (full fine-tuning)"] = mapo_vs_dpo["cached"]["memory"] < 1.0

    unet_parameters = next(iter(floor_runs.values()))[0]["unet_parameters"] if floor_runs else None
    report = {
        "machine": info["description"],
        "setting": {
            "model": args.pretrained_model_name_or_path,
            "unet_parameters": unet_parameters,
            "resolution": args.resolution,
            "train_batch_size": batch,
            "training": f"LoRA rank {args.lora_rank}" if args.lora_rank else "full fine-tuning",
            "mixed_precision": args.mixed_precision,
            "gradient_checkpointing": args.gradient_checkpointing,
            "use_8bit_adam": args.use_8bit_adam,
            "timed_steps": args.max_train_steps,
            "floor_steps": args.floor_steps,
            "floor_warmup_steps": args.floor_warmup_steps,
            "threads": args.num_threads,
            "repeats": args.repeats,
            "memory_probe_batch_size": None if on_gpu else probe_batch,
            "memory_budget_bytes": budget,
            "peak_memory_kind": "cuda" if on_gpu else "rss",
        },
        "rows": rows,
        "mapo_vs_dpo": mapo_vs_dpo,
        "targets": targets,
        "floor_runs": floor_runs,
    }
    markdown = render_markdown(report)
    Path(args.output_dir, "benchmark.md").write_text(markdown, encoding="utf-8")
    Path(args.output_dir, "benchmark.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(markdown, flush=True)
    return report


if __name__ == "__main__":
    main(parse_args())
