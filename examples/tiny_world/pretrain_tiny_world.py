#!/usr/bin/env python
r"""Pre-train the tiny SDXL pipeline into a base model worth aligning: it draws the tiny world's balls.

make_tiny_assets.py builds the ~1 M-parameter pipeline with a randomly initialised UNet, whose samples
are grey blobs: nothing a preference method does could be seen in them. This script trains that UNet
(same shapes) with ordinary denoising on the tiny world's images (a ball of one of six colours in the
top or bottom half, captioned "a photo of a <colour> ball", both halves equally often), with caption
dropout for classifier-free guidance. Its samples show one ball of the caption's colour, in the top
half about half of the time: the raters' preference (top half) is not in the base model, so an
objective that learns it moves the share, and examples/rewards/toy_ball.py can see it.

The two bases the demo and the learning tests use ship, built by this script, in examples/tiny_world/bases/
(examples/tiny_world/README.md). To rebuild them in place, with the thread count each was built with (it decides
the rounding: another count builds a slightly different base):

    OMP_NUM_THREADS=1 python -m examples.tiny_world.pretrain_tiny_world --output_dir examples/tiny_world/bases --force
    # -> examples/tiny_world/bases/tiny-world-sdxl: README command 1's base, tests/conftest.py's `tiny_world`
    OMP_NUM_THREADS=2 python -m examples.tiny_world.pretrain_tiny_world --output_dir examples/tiny_world/bases \
        --force --position_caption_share 1.0 --position_caption_noise 0.3 --snr_gamma 5 --train_steps 3000
    # -> examples/tiny_world/bases/tiny-world-positional-sdxl: the DDSPO learning test's base
    OMP_NUM_THREADS=1 python -m examples.tiny_world.pretrain_tiny_world --output_dir examples/tiny_world/bases \
        --force --family sd3
    # -> examples/tiny_world/bases/tiny-world-sd3: the flow scripts' base (a StableDiffusion3Pipeline)

Each folder is a whole pipeline (StableDiffusionXLPipeline or StableDiffusion3Pipeline reads it) with tiny_world.json:
the fingerprint, recipe version, settings, thread count, torch and diffusers versions, and timings. A folder whose
fingerprint matches (the settings, this recipe's source, world.py's pieces, the torch and diffusers versions) is
kept as it is; one built otherwise is refused (no build is replaced by surprise); --force rebuilds either. About
6, 7 and 7 minutes on 2 idle cores; two threads on cores that other processes keep busy run several times slower.
TINY_WORLD_REBUILD=1 pytest tests/learning/test_tiny_world_bases.py rebuilds each into a scratch folder and checks
that it draws what the shipped one draws.

Steps (each prints a line at least every 15 s):
1. build the tiny pipeline with world.build_tiny_sdxl_pipeline (in a scratch folder);
2. refit its VAE longer, weighting the ball's pixels (--vae_refit_steps): the 120-step fit of
   make_tiny_assets keeps the ball's position but decodes every colour as one grey-green, so no UNet
   could draw a red ball through it;
3. encode a balanced pool of --num_train_images images once (VAE posterior means x scaling_factor);
4. pre-train the UNet: epsilon MSE, t ~ U{0..999} with a DDPMScheduler built from the pipeline's
   scheduler config, SDXL conditioning as the training scripts build it (penultimate hidden states
   of both encoders, pooled output of the second, add_time_ids (64, 64, 0, 0, 64, 64)), the caption
   replaced by zeros with probability --cfg_dropout (what the pipeline feeds as the unconditional
   branch: force_zeros_for_empty_prompt); AdamW, warm-up then cosine decay; the EMA of the weights is
   what is saved;
5. save the pipeline and tiny_world.json.

--family sd3 walks the same steps with world.build_tiny_sd3_pipeline (2 joint blocks, a 16-channel VAE): after the
refit, the VAE's shift_factor and scaling_factor are re-derived (latents = (z - shift) x scale, zero mean and unit
variance); the transformer learns rectified flow (x_t = (1 - sigma) x0 + sigma eps, target eps - x0, sigma drawn by
--weighting_scheme and read from the FlowMatchEulerDiscreteScheduler's table with its shift 3.0), conditioned as
StableDiffusion3Pipeline.encode_prompt builds it (CLIP-L, CLIP-G and T5 at the pipeline's default 256 tokens); a
dropped caption gets the encoded empty prompt, which is what the pipeline feeds as the unconditional branch.
"""

import argparse
import contextlib
import copy
import hashlib
import inspect
import json
import math
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from examples.lib.cli import InputError, finite_float, run_tool
from examples.lib.files import check_writable_folder
from examples.tiny_world import world
from utils.diffusion import (
    FLOW_TIMESTEP_SAMPLINGS,
    flow_matching_noisy_and_target,
    flow_matching_sigmas,
    sample_flow_matching_u,
)


COLOR_NAMES = list(world.COLORS)
FORMAT_VERSION = 1  # bump when the recipe changes in a way the settings do not show
PIPELINE_FOLDER = "tiny-world-sdxl"
SD3_PIPELINE_FOLDER = "tiny-world-sd3"
FAMILY_BATCH_SIZE = {"sdxl": 64, "sd3": 32}  # --batch_size where not given: the MMDiT's step is slower
PROGRESS_EVERY_S = 15
POSITION_WORDS = ("at the top", "at the bottom")  # halves 0 and 1 of world.make_image
INFO_FILE = "tiny_world.json"


# ----------------------------------------------------------------------------------------------
# Settings and cache
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output_dir",
        default="tiny_assets",
        help=f"Receives {PIPELINE_FOLDER}/ (examples/tiny_world/bases rebuilds the shipped base).",
    )
    parser.add_argument(
        "--family",
        default="sdxl",
        choices=list(FAMILY_BATCH_SIZE),
        help=f"sdxl: the tiny SDXL (UNet, epsilon) as the two SDXL bases; sd3: the tiny StableDiffusion3Pipeline "
        f"(world.build_tiny_sd3_pipeline: MMDiT, rectified flow) -> {SD3_PIPELINE_FOLDER}/.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the weights, the images and the training draws.")
    vae = parser.add_argument_group("VAE refit")
    vae.add_argument("--vae_refit_steps", type=int, default=500, help="Reconstruction steps (one-cycle Adam).")
    vae.add_argument(
        "--vae_ball_weight", type=finite_float, default=2.0, help="Extra weight of pixels off the background."
    )
    vae.add_argument("--vae_refit_lr", type=finite_float, default=2e-3, help="Peak learning rate of the refit.")
    vae.add_argument("--vae_refit_batch_size", type=int, default=16, help="Images per refit step.")
    unet = parser.add_argument_group("UNet (sdxl) or transformer (sd3) pre-training")
    unet.add_argument("--num_train_images", type=int, default=1536, help="Balanced pool: colours x halves.")
    unet.add_argument("--train_steps", type=int, default=1500, help="Optimizer steps.")
    unet.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help=f"Images per step (default: {FAMILY_BATCH_SIZE['sdxl']} for sdxl, {FAMILY_BATCH_SIZE['sd3']} for sd3).",
    )
    unet.add_argument("--learning_rate", type=finite_float, default=1e-3, help="Peak learning rate (cosine decay).")
    unet.add_argument("--warmup_steps", type=int, default=100, help="Linear warm-up steps.")
    unet.add_argument("--weight_decay", type=finite_float, default=1e-2, help="AdamW weight decay.")
    unet.add_argument(
        "--cfg_dropout",
        type=finite_float,
        default=0.1,
        help="Share of captions replaced by the unconditional branch's embeddings: zeros for sdxl, the encoded "
        "empty prompt for sd3 (what each pipeline feeds).",
    )
    unet.add_argument(
        "--snr_gamma", type=finite_float, default=0.0, help="min-SNR-gamma loss weighting (sdxl only); 0: plain MSE."
    )
    unet.add_argument(
        "--weighting_scheme",
        default="logit_normal",
        choices=list(FLOW_TIMESTEP_SAMPLINGS),
        help="sd3: density of u, then sigma from the scheduler's table with its shift (3.0), as diffusers' SD3 "
        "scripts draw it (utils.sample_flow_matching_u, utils.flow_matching_sigmas).",
    )
    unet.add_argument(
        "--ema_decay", type=finite_float, default=0.995, help="EMA of the weights that is saved; 0: raw."
    )
    unet.add_argument(
        "--position_caption_share",
        type=finite_float,
        default=0.0,
        help="Share of training captions that name the ball's half ('a photo of a red ball at the top'); the rest "
        "are plain. 0: plain captions only (the base of README command 1). The tiny UNet learns the word slowly; "
        "top-half share (guidance 5) for '... at the top' / '... at the bottom': share 0.5, 1500 or 3000 steps: "
        "0.44-0.50 / 0.46; share 1, noise 0.3, --snr_gamma 5, 3000 steps (the DDSPO learning test's base): "
        "0.45-0.54 / 0.36-0.41 (builds with two or one threads); share 1, noise 0, --snr_gamma 5, 3000 steps: "
        "1.0 / 0.0.",
    )
    unet.add_argument(
        "--position_caption_noise",
        type=finite_float,
        default=0.3,
        help="Share of those positional captions that name the wrong half, so the word is a weak cue to sharpen.",
    )
    parser.add_argument(
        "--pipeline_folder",
        default=None,
        help=f"Name of the pipeline folder in --output_dir (default: {PIPELINE_FOLDER}, or "
        f"tiny-world-positional-sdxl with --position_caption_share; {SD3_PIPELINE_FOLDER} for --family sd3).",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="Rebuild the folder even if it holds a build: one of the same fingerprint, or one of other settings or "
        "another recipe (refused without --force).",
    )
    args = parser.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = FAMILY_BATCH_SIZE[args.family]
    positive = ("vae_refit_batch_size", "num_train_images", "train_steps", "batch_size", "learning_rate")
    for name in positive:
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}.")
    if args.vae_refit_steps < 0 or args.warmup_steps < 0:
        parser.error("--vae_refit_steps and --warmup_steps must not be negative.")
    if not 0 <= args.cfg_dropout < 1 or not 0 <= args.ema_decay < 1:
        parser.error("--cfg_dropout and --ema_decay must lie in [0, 1).")
    if not 0 <= args.position_caption_share <= 1 or not 0 <= args.position_caption_noise <= 1:
        parser.error("--position_caption_share and --position_caption_noise must lie in [0, 1].")
    if args.family == "sd3" and (args.snr_gamma != 0 or args.position_caption_share != 0):
        parser.error(
            "--snr_gamma and --position_caption_share are sdxl settings; --family sd3 trains plain captions with "
            "rectified flow (--weighting_scheme). Leave them at 0."
        )
    if args.family == "sdxl" and args.weighting_scheme != "logit_normal":
        parser.error("--weighting_scheme is an sd3 setting; the sdxl family draws t ~ U{0..999}. Leave it out.")
    if args.pipeline_folder is None and args.family == "sd3":
        args.pipeline_folder = SD3_PIPELINE_FOLDER
    elif args.pipeline_folder is None:
        args.pipeline_folder = "tiny-world-positional-sdxl" if args.position_caption_share > 0 else PIPELINE_FOLDER
    return args


TRAIN_SETTINGS = (
    "seed",
    "vae_refit_steps",
    "vae_refit_lr",
    "vae_refit_batch_size",
    "vae_ball_weight",
    "num_train_images",
    "train_steps",
    "batch_size",
    "learning_rate",
    "warmup_steps",
    "weight_decay",
    "cfg_dropout",
    "ema_decay",
    "snr_gamma",
    "position_caption_share",
    "position_caption_noise",
)
# The sd3 recipe's settings: the sdxl-only ones left out, the family and the flow timestep density in.
SD3_TRAIN_SETTINGS = (
    "family",
    *(
        name
        for name in TRAIN_SETTINGS
        if name not in ("snr_gamma", "position_caption_share", "position_caption_noise")
    ),
    "weighting_scheme",
)


def train_settings(args):
    """{name: value} of the settings that decide the build (recorded in tiny_world.json, hashed by fingerprint)."""
    names = SD3_TRAIN_SETTINGS if args.family == "sd3" else TRAIN_SETTINGS
    return {name: getattr(args, name) for name in names}


def fingerprint(args):
    """Hash of everything the pre-trained pipeline depends on: the settings, this recipe's version and
    source, the source of the world.py pieces it is built from, and the torch and diffusers versions."""
    import diffusers
    import torch

    if args.family == "sd3":
        pieces = (
            world.build_tiny_sd3_pipeline,
            world.tiny_t5_tokenizer,
            world.tiny_text_config,
            world.fit_tiny_vae,
            world.make_image,
            world.write_clip_tokenizer_files,
            image_batch,
            refit_vae,
            refit_vae_shift_and_scale,
            pretrain_sd3,
        )
    else:
        pieces = (
            world.build_tiny_sdxl_pipeline,
            world.tiny_text_config,
            world.tiny_vae,
            world.fit_tiny_vae,
            world.make_image,
            world.write_clip_tokenizer_files,
            image_batch,
            refit_vae,
            encode_prompts,
            pretrain,
        )
    sources = "".join(inspect.getsource(obj) for obj in pieces)
    key = {
        "format_version": FORMAT_VERSION,
        "settings": train_settings(args),
        "colors": world.COLORS,
        "unet_preset": world.UNET_PRESETS["tiny"],
        "source": hashlib.sha256(sources.encode()).hexdigest(),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=list).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Pre-training
# ----------------------------------------------------------------------------------------------
def image_batch(rng, n, resolution=64, colors=None, halves=None):
    """n tiny-world images as a float tensor in [-1, 1], with their colour and half indices: drawn at random, or
    the first n of `colors` and `halves` where given."""
    import torch

    colors = rng.integers(len(COLOR_NAMES), size=n) if colors is None else colors[:n]
    halves = rng.integers(2, size=n) if halves is None else halves[:n]
    images = np.stack(
        [world.make_image(COLOR_NAMES[c], ("top", "bottom")[h], rng, resolution) for c, h in zip(colors, halves)]
    )
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1, colors, halves


class Progress:
    """When a loop of `steps` steps prints a line: after its first and last step, and whenever PROGRESS_EVERY_S
    seconds have passed since the last line, so that a build on a slow or busy machine never looks stuck."""

    def __init__(self, steps):
        self.steps = steps
        self.start = self.last_line = time.perf_counter()

    def due(self, step):
        now = time.perf_counter()
        if step in (0, self.steps - 1) or now - self.last_line >= PROGRESS_EVERY_S:
            self.last_line = now
            return True
        return False

    @property
    def elapsed_s(self):
        return time.perf_counter() - self.start


@contextlib.contextmanager
def heartbeat(what):
    """Prints "<what> (N s)" every PROGRESS_EVERY_S seconds until the block ends: for a step that prints nothing."""
    done = threading.Event()
    start = time.perf_counter()

    def beat():
        while not done.wait(PROGRESS_EVERY_S):
            print(f"  {what} ({time.perf_counter() - start:.0f} s)", flush=True)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def refit_vae(vae, steps, lr, batch_size, seed, resolution=64, ball_weight=2.0):
    """Continue world.fit_tiny_vae's reconstruction fit (Adam, one-cycle lr) and re-derive
    scaling_factor; the log-variance head stays pinned (mode() gives it no gradient).

    The squared error of a pixel is weighted by 1 + ball_weight x its distance (in [-1, 1] RGB units)
    from the image's top-left 4x4 corner, i.e. from the background: the ball is ~10 % of the pixels,
    and an unweighted fit learns the ball's colour last (500 weighted steps decode the colours as
    well as 800 unweighted ones)."""
    import torch

    if steps <= 0:
        return
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 101])
    vae.train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    progress = Progress(steps)
    for step in range(steps):
        images, _, _ = image_batch(rng, batch_size, resolution)
        reconstruction = vae.decode(vae.encode(images).latent_dist.mode()).sample
        background = images[:, :, :4, :4].mean(dim=(2, 3), keepdim=True)
        weight = 1 + ball_weight * (images - background).norm(dim=1, keepdim=True)
        loss = ((reconstruction - images).pow(2) * weight).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress.due(step):
            print(
                f"  VAE refit step {step + 1}/{steps}: loss {loss.item():.4f} ({progress.elapsed_s:.0f} s)", flush=True
            )
    vae.eval()
    with torch.no_grad():
        logvar_rows = slice(vae.config.latent_channels, 2 * vae.config.latent_channels)
        vae.quant_conv.weight[logvar_rows] = 0
        vae.quant_conv.bias[logvar_rows] = -30.0
        latents = torch.cat([vae.encode(image_batch(rng, 64, resolution)[0]).latent_dist.mode() for _ in range(4)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))


def encode_prompts(pipe, prompts):
    """As train_mapo_sdxl.encode_prompts: penultimate hidden states of both encoders, pooled of the second."""
    import torch

    embeds = []
    with torch.no_grad():
        for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            length = tokenizer.model_max_length
            ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
            ids = ids.input_ids
            outputs = encoder(ids, output_hidden_states=True)
            embeds.append(outputs.hidden_states[-2])
    return torch.cat(embeds, dim=-1), outputs.text_embeds


def pretrain(args, base_path, out_path):
    import torch
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    timings = {}
    torch.manual_seed(args.seed)
    pipe = StableDiffusionXLPipeline.from_pretrained(base_path)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor

    start = time.perf_counter()
    print(f"tiny world base: refitting the VAE ({args.vae_refit_steps} steps)", flush=True)
    refit_vae(
        pipe.vae,
        args.vae_refit_steps,
        args.vae_refit_lr,
        args.vae_refit_batch_size,
        args.seed,
        resolution,
        args.vae_ball_weight,
    )
    timings["vae_refit_s"] = time.perf_counter() - start

    # A balanced pool: colour i % 6, half (i // 6) % 2, encoded once.
    start = time.perf_counter()
    rng = np.random.default_rng([args.seed, 202])
    n = args.num_train_images
    print(f"tiny world base: encoding {n} training images", flush=True)
    colors, halves = np.arange(n) % len(COLOR_NAMES), (np.arange(n) // len(COLOR_NAMES)) % 2
    latents = []
    with torch.no_grad():
        for begin in range(0, n, 128):
            images, _, _ = image_batch(rng, min(128, n - begin), resolution, colors[begin:], halves[begin:])
            latents.append(pipe.vae.encode(images).latent_dist.mode() * pipe.vae.config.scaling_factor)
    latents = torch.cat(latents)
    captions = [f"a photo of a {c} ball" for c in COLOR_NAMES]
    if args.position_caption_share > 0:  # rows 6-11: "... at the top", 12-17: "... at the bottom"
        captions += [f"a photo of a {c} ball {POSITION_WORDS[h]}" for h in (0, 1) for c in COLOR_NAMES]
    prompt_embeds, pooled_embeds = encode_prompts(pipe, captions)
    colors_t, halves_t = torch.from_numpy(colors).long(), torch.from_numpy(halves).long()
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
    timings["data_s"] = time.perf_counter() - start

    unet = pipe.unet
    unet.train()
    noise_scheduler = DDPMScheduler.from_config(copy.deepcopy(dict(pipe.scheduler.config)))
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    alphas_cumprod = noise_scheduler.alphas_cumprod.float()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)

    def lr_lambda(step):
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        progress = (step - args.warmup_steps) / max(1, args.train_steps - args.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    ema = [p.detach().clone() for p in unet.parameters()] if args.ema_decay > 0 else None
    generator = torch.Generator().manual_seed(args.seed)
    losses = []
    print(f"tiny world base: pre-training the UNet ({args.train_steps} steps of {args.batch_size} images)", flush=True)
    start = time.perf_counter()
    progress = Progress(args.train_steps)
    for step in range(args.train_steps):
        index = torch.randint(0, n, (args.batch_size,), generator=generator)
        x0 = latents[index]
        keep = (torch.rand(args.batch_size, generator=generator) >= args.cfg_dropout).float()
        caption_index = colors_t[index]
        if args.position_caption_share > 0:  # (no extra draws otherwise: the plain recipe's stream is unchanged)
            positional = torch.rand(args.batch_size, generator=generator) < args.position_caption_share
            wrong = (torch.rand(args.batch_size, generator=generator) < args.position_caption_noise).long()
            named_half = halves_t[index] ^ wrong  # the half the caption names: the image's, or with noise the other
            caption_index = torch.where(positional, len(COLOR_NAMES) * (1 + named_half) + caption_index, caption_index)
        embeds = prompt_embeds[caption_index] * keep[:, None, None]
        pooled = pooled_embeds[caption_index] * keep[:, None]
        noise = torch.randn(x0.shape, generator=generator)
        timesteps = torch.randint(0, num_train_timesteps, (args.batch_size,), generator=generator)
        noisy = noise_scheduler.add_noise(x0, noise, timesteps)
        prediction = unet(
            noisy,
            timesteps,
            encoder_hidden_states=embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.expand(args.batch_size, -1)},
        ).sample
        loss = (prediction - noise).pow(2).mean(dim=(1, 2, 3))
        if args.snr_gamma > 0:  # min-SNR-gamma weighting for epsilon prediction: min(SNR, gamma) / SNR
            snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
            loss = loss * snr.clamp(max=args.snr_gamma) / snr
        loss = loss.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if ema is not None:
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for average, parameter in zip(ema, unet.parameters()):
                    average.lerp_(parameter.detach(), 1 - decay)
        losses.append(loss.item())
        if progress.due(step):
            print(
                f"  UNet step {step + 1}/{args.train_steps}: loss {np.mean(losses[-100:]):.4f} "
                f"({progress.elapsed_s:.0f} s)",
                flush=True,
            )
    timings["pretrain_s"] = time.perf_counter() - start
    if ema is not None:
        with torch.no_grad():
            for average, parameter in zip(ema, unet.parameters()):
                parameter.copy_(average)
    unet.eval()
    for component in (pipe, pipe.unet, pipe.vae):  # else the scratch folder's path is written into their configs
        component.register_to_config(_name_or_path=Path(out_path).name)
    pipe.save_pretrained(out_path)
    return timings, float(np.mean(losses[-100:]))


def refit_vae_shift_and_scale(vae, seed, resolution=64):
    """SD3's latent normalisation for the refitted 16-channel VAE: shift_factor and scaling_factor such that
    (z - shift_factor) x scaling_factor has zero mean and unit variance over a balanced batch of tiny-world images
    (refit_vae sets only a scaling_factor, for latents taken as centred)."""
    import torch

    rng = np.random.default_rng([seed, 303])
    count = 8 * len(COLOR_NAMES)
    colors, halves = np.arange(count) % len(COLOR_NAMES), (np.arange(count) // len(COLOR_NAMES)) % 2
    with torch.no_grad():
        latents = vae.encode(image_batch(rng, count, resolution, colors, halves)[0]).latent_dist.mode()
    vae.register_to_config(shift_factor=float(latents.mean()), scaling_factor=float(1.0 / latents.std()))


def pretrain_sd3(args, base_path, out_path):
    """The sd3 family's steps 2-5: as `pretrain`, with the transformer trained by rectified flow.

    x_t = (1 - sigma) x0 + sigma eps, target eps - x0 (utils.flow_matching_noisy_and_target), sigma drawn by
    --weighting_scheme and read from the FlowMatchEulerDiscreteScheduler's table with its shift (what the
    pipeline samples with); timestep sigma x 1000; conditioning from StableDiffusion3Pipeline.encode_prompt with
    the pipeline's default max_sequence_length (the sampler sees the same T5 length); a dropped caption gets the
    encoded empty prompt, the pipeline's unconditional branch (negative_prompt "")."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    timings = {}
    torch.manual_seed(args.seed)
    pipe = StableDiffusion3Pipeline.from_pretrained(base_path)
    resolution = pipe.transformer.config.sample_size * pipe.vae_scale_factor

    start = time.perf_counter()
    print(f"tiny world base: refitting the VAE ({args.vae_refit_steps} steps)", flush=True)
    refit_vae(
        pipe.vae,
        args.vae_refit_steps,
        args.vae_refit_lr,
        args.vae_refit_batch_size,
        args.seed,
        resolution,
        args.vae_ball_weight,
    )
    refit_vae_shift_and_scale(pipe.vae, args.seed, resolution)
    timings["vae_refit_s"] = time.perf_counter() - start

    start = time.perf_counter()
    rng = np.random.default_rng([args.seed, 202])
    n = args.num_train_images
    print(f"tiny world base: encoding {n} training images", flush=True)
    colors, halves = np.arange(n) % len(COLOR_NAMES), (np.arange(n) // len(COLOR_NAMES)) % 2
    shift_factor, scaling_factor = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    latents = []
    with torch.no_grad():
        for begin in range(0, n, 128):
            images, _, _ = image_batch(rng, min(128, n - begin), resolution, colors[begin:], halves[begin:])
            latents.append((pipe.vae.encode(images).latent_dist.mode() - shift_factor) * scaling_factor)
        latents = torch.cat(latents)
        captions = [f"a photo of a {c} ball" for c in COLOR_NAMES] + [""]  # row 6: the unconditional branch
        prompt_embeds, _, pooled_embeds, _ = pipe.encode_prompt(
            captions, None, None, do_classifier_free_guidance=False
        )
    colors_t = torch.from_numpy(colors).long()
    timings["data_s"] = time.perf_counter() - start

    transformer = pipe.transformer
    transformer.train()
    scheduler_config = copy.deepcopy(dict(pipe.scheduler.config))
    num_train_timesteps, shift = scheduler_config["num_train_timesteps"], scheduler_config["shift"]
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)

    def lr_lambda(step):
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        progress = (step - args.warmup_steps) / max(1, args.train_steps - args.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    ema = [p.detach().clone() for p in transformer.parameters()] if args.ema_decay > 0 else None
    generator = torch.Generator().manual_seed(args.seed)
    losses = []
    print(
        f"tiny world base: pre-training the transformer ({args.train_steps} steps of {args.batch_size} images)",
        flush=True,
    )
    start = time.perf_counter()
    progress = Progress(args.train_steps)
    for step in range(args.train_steps):
        index = torch.randint(0, n, (args.batch_size,), generator=generator)
        x0 = latents[index]
        keep = torch.rand(args.batch_size, generator=generator) >= args.cfg_dropout
        caption_index = torch.where(keep, colors_t[index], len(COLOR_NAMES))
        noise = torch.randn(x0.shape, generator=generator)
        u = sample_flow_matching_u(args.weighting_scheme, [generator] * args.batch_size)
        sigmas = flow_matching_sigmas(u, num_train_timesteps, shift)
        noisy, target = flow_matching_noisy_and_target(x0, noise, sigmas)
        prediction = transformer(
            hidden_states=noisy,
            timestep=sigmas * num_train_timesteps,
            encoder_hidden_states=prompt_embeds[caption_index],
            pooled_projections=pooled_embeds[caption_index],
        ).sample
        loss = (prediction - target).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if ema is not None:
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for average, parameter in zip(ema, transformer.parameters()):
                    average.lerp_(parameter.detach(), 1 - decay)
        losses.append(loss.item())
        if progress.due(step):
            print(
                f"  transformer step {step + 1}/{args.train_steps}: loss {np.mean(losses[-100:]):.4f} "
                f"({progress.elapsed_s:.0f} s)",
                flush=True,
            )
    timings["pretrain_s"] = time.perf_counter() - start
    if ema is not None:
        with torch.no_grad():
            for average, parameter in zip(ema, transformer.parameters()):
                parameter.copy_(average)
    transformer.eval()
    # else the scratch folder's path is written into their configs
    for component in (pipe, pipe.transformer, pipe.vae):
        component.register_to_config(_name_or_path=Path(out_path).name)
    pipe.save_pretrained(out_path)
    return timings, float(np.mean(losses[-100:]))


def build(args):
    """The pre-trained pipeline's folder: reused when its fingerprint matches, else (re)built. Returns (path, info)."""
    import diffusers
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    output_dir = Path(args.output_dir)
    out_path = output_dir / args.pipeline_folder
    info_path = out_path / INFO_FILE
    check_writable_folder(out_path, "--output_dir/--pipeline_folder")
    key = fingerprint(args)
    info = json.loads(info_path.read_text()) if info_path.is_file() else None
    if info is not None and info.get("fingerprint") == key and not args.force:
        print(f"tiny world base: {out_path} is up to date (fingerprint {key}), reused")
        return out_path, info
    if info is not None and info.get("fingerprint") != key and not args.force:
        raise InputError(
            f"{out_path} holds a base built by other settings or another recipe (fingerprint "
            f"{info.get('fingerprint')}, now {key}); pass --force to rebuild it there, or give another --output_dir."
        )
    reason = "--force" if info is not None else "no earlier build"
    print(f"tiny world base: building {out_path} ({reason}; fingerprint {key})", flush=True)
    info_path.unlink(missing_ok=True)  # a build interrupted from here on is never taken for a finished one
    timings = {}
    start = time.perf_counter()
    builder, train = (
        (world.build_tiny_sd3_pipeline, pretrain_sd3)
        if args.family == "sd3"
        else (world.build_tiny_sdxl_pipeline, pretrain)
    )
    with tempfile.TemporaryDirectory(prefix=f"tiny-{args.family}-") as base_path:
        print(f"tiny world base: building the untrained pipeline (world.{builder.__name__})", flush=True)
        with heartbeat("still building the untrained pipeline"):
            builder(base_path, seed=args.seed)
        timings["build_base_s"] = time.perf_counter() - start
        trained, final_loss = train(args, base_path, str(out_path))
    timings.update(trained)
    timings["total_s"] = time.perf_counter() - start
    info = {
        "fingerprint": key,
        "format_version": FORMAT_VERSION,
        "settings": train_settings(args),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "timings": timings,
        "final_loss": final_loss,
    }
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    print(
        f"== tiny world base built: {out_path} in {timings['total_s']:.0f} s "
        f"(VAE refit {timings['vae_refit_s']:.0f} s, {'transformer' if args.family == 'sd3' else 'UNet'} "
        f"{timings['pretrain_s']:.0f} s), final loss {final_loss:.4f}"
    )
    return out_path, info


def main(args):
    build(args)


if __name__ == "__main__":
    run_tool(main, parse_args)
