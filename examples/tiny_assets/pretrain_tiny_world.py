#!/usr/bin/env python
r"""Prototype (issue 8): a tiny SDXL base model worth aligning, and a scorer that judges its images.

The tiny pipeline of examples/tiny_assets/make_tiny_assets.py has a randomly initialised UNet, so
its samples are grey blobs and nothing a preference method does can be seen in them. This script
pre-trains that UNet (same ~1 M-parameter shapes) with ordinary denoising on the tiny world's
images (a ball of one of six colours in the top or bottom half, captions "a photo of a <colour>
ball", both halves equally often), with caption dropout for classifier-free guidance, then samples
the saved pipeline and judges the images with plain-numpy functions (where is the ball, is it the
caption's colour, and a Bradley-Terry-style score).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 python examples/tiny_world/pretrain_prototype.py \
        --output_dir /tmp/tiny_world --grid_path /tmp/tiny_world_grid.png

Steps (each cached: a finished output folder whose fingerprint matches the settings is reused):
1. build the tiny pipeline with make_tiny_assets.build_tiny_sdxl_pipeline (or take --base_pipeline);
2. refit its VAE a little longer (--vae_refit_steps): the 120-step fit of make_tiny_assets keeps the
   ball's position but decodes every colour as the same grey-green, so no UNet could draw a red ball;
3. encode a balanced pool of images once (VAE posterior means x scaling_factor);
4. pre-train the UNet: epsilon MSE, t ~ U{0..999} with a DDPMScheduler built from the pipeline's
   scheduler config (a deep copy: pipeline runs change a scheduler's timesteps), SDXL conditioning
   as the training scripts build it (penultimate hidden states of both encoders, pooled output of
   the second, add_time_ids (64, 64, 0, 0, 64, 64)), the caption replaced by zeros with probability
   --cfg_dropout (what the pipeline feeds as the unconditional branch: force_zeros_for_empty_prompt);
   AdamW, warm-up then cosine decay, an EMA of the weights is what is saved;
5. save the pipeline and tiny_world.json (fingerprint, settings, timings);
6. sample --num_samples images (the six captions in turn, fixed per-image seeds) with the pipeline's
   own Euler scheduler, score them, print the metrics and write a PNG grid.
"""

import argparse
import copy
import hashlib
import inspect
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tiny_assets"))
import make_tiny_assets  # noqa: E402


COLOR_NAMES = list(make_tiny_assets.COLORS)
COLOR_TABLE = np.array([make_tiny_assets.COLORS[name] for name in COLOR_NAMES], dtype=np.float32)
# make_image scales the ball's colour by U(0.8, 1.0) and the soft mask never quite reaches 1 at the
# centre, so the brightest pixels of a ball sit near 0.9 x its table colour.
TYPICAL_BRIGHTNESS = 0.9
FORMAT_VERSION = 1  # bump when the recipe changes in a way the settings do not show


# ----------------------------------------------------------------------------------------------
# Scorer: plain numpy on (H, W, 3) uint8 RGB images
# ----------------------------------------------------------------------------------------------
def caption_color(caption):
    """The colour word of a tiny-world caption ("a photo of a red ball" -> "red"), or None."""
    words = caption.lower().replace(",", " ").split()
    for name in COLOR_NAMES:
        if name in words:
            return name
    return None


def find_ball(image, border=4, min_peak=60.0, relative_threshold=0.5, max_area=0.35, min_pixels=12):
    """Locate the ball: pixels far (in RGB) from the background, the median colour of the image's border.

    Returns a dict: found (a compact blob clearly off the background: its 99.5th-percentile distance
    from the background >= min_peak, at least min_pixels and at most max_area of the image above
    relative_threshold x that peak), center_y / center_x (distance-weighted centroid of those
    pixels, as fractions of the height / width: 0 = top / left), color (mean RGB of the ball's core,
    the pixels within 80 % of the peak distance), background (RGB), peak (RGB distance), area (fraction).
    """
    image = np.asarray(image, dtype=np.float32)
    height, width, _ = image.shape
    ring = np.concatenate(
        [
            image[:border].reshape(-1, 3),
            image[-border:].reshape(-1, 3),
            image[:, :border].reshape(-1, 3),
            image[:, -border:].reshape(-1, 3),
        ]
    )
    background = np.median(ring, axis=0)
    distance = np.linalg.norm(image - background, axis=-1)
    peak = float(np.percentile(distance, 99.5))
    mask = distance > relative_threshold * peak
    area = float(mask.mean())
    found = bool(peak >= min_peak and mask.sum() >= min_pixels and area <= max_area)
    weights = (distance - relative_threshold * peak).clip(min=0) * mask
    total = max(float(weights.sum()), 1e-6)
    yy, xx = np.mgrid[0:height, 0:width]
    core = distance >= 0.8 * peak
    return {
        "found": found,
        "center_y": float((weights * yy).sum() / total) / height,
        "center_x": float((weights * xx).sum() / total) / width,
        "color": image[core].mean(axis=0) if core.any() else background,
        "background": background,
        "peak": peak,
        "area": area,
    }


def color_log_probs(rgb, temperature=40.0):
    """log p(colour | rgb) over COLOR_NAMES: softmax of -||rgb - 0.9 colour||^2 / (2 temperature^2)."""
    logits = -((COLOR_TABLE * TYPICAL_BRIGHTNESS - np.asarray(rgb, np.float32)) ** 2).sum(-1) / (2 * temperature**2)
    logits = logits - logits.max()
    return logits - np.log(np.exp(logits).sum())


def nearest_color(rgb):
    return COLOR_NAMES[int(np.argmax(color_log_probs(rgb)))]


def score_image(image, caption, height_weight=4.0, color_weight=1.0, min_log_prob=-10.0):
    """Judge one generated image against its caption.

    Returns a dict: found, top (ball centre in the top half), color (nearest table colour of the
    ball's core), color_match (that colour is the caption's), center_y, and score, a
    Bradley-Terry-style scalar (P(a preferred to b) = sigmoid(score_a - score_b), see bt_probability):

        score = height_weight * (1 - 2 center_y) + color_weight * max(log p(caption colour | ball), min_log_prob)

    (1 - 2 center_y is +1 at the top edge, -1 at the bottom). An image without a ball gets the worst
    score: -height_weight + color_weight * min_log_prob.
    """
    ball = find_ball(image)
    wanted = caption_color(caption)
    if not ball["found"]:
        return {
            "found": False,
            "top": False,
            "color": None,
            "color_match": False,
            "center_y": ball["center_y"],
            "score": -height_weight + color_weight * min_log_prob,
        }
    log_probs = color_log_probs(ball["color"])
    color = COLOR_NAMES[int(np.argmax(log_probs))]
    color_term = max(float(log_probs[COLOR_NAMES.index(wanted)]), min_log_prob) if wanted else 0.0
    return {
        "found": True,
        "top": ball["center_y"] < 0.5,
        "color": color,
        "color_match": color == wanted,
        "center_y": ball["center_y"],
        "score": height_weight * (1.0 - 2.0 * ball["center_y"]) + color_weight * color_term,
    }


def bt_probability(score_a, score_b):
    """Bradley-Terry: probability that the image scored score_a is preferred to the one scored score_b."""
    return 1.0 / (1.0 + np.exp(-(np.asarray(score_a, np.float64) - np.asarray(score_b, np.float64))))


def bootstrap_interval(values, num_resamples=2000, seed=0, level=0.95):
    """Mean of 0/1 (or real) values and its percentile-bootstrap interval."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(num_resamples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(values.mean()), float(low), float(high)


# ----------------------------------------------------------------------------------------------
# Settings and cache
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="/tmp/tiny_world", help="Receives base-sdxl/ and tiny-world-sdxl/.")
    parser.add_argument(
        "--base_pipeline", default=None, help="An existing make_tiny_assets pipeline (default: build one)."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae_refit_steps", type=int, default=500)
    parser.add_argument("--vae_ball_weight", type=float, default=2.0)
    parser.add_argument("--vae_refit_lr", type=float, default=2e-3)
    parser.add_argument("--vae_refit_batch_size", type=int, default=16)
    parser.add_argument("--num_train_images", type=int, default=1536)
    parser.add_argument("--train_steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--warmup_steps", type=int, default=100)
    parser.add_argument("--weight_decay", type=float, default=1e-2)
    parser.add_argument("--cfg_dropout", type=float, default=0.1, help="Share of captions replaced by zeros.")
    parser.add_argument("--snr_gamma", type=float, default=0.0, help="min-SNR-gamma loss weighting; 0: plain MSE.")
    parser.add_argument("--ema_decay", type=float, default=0.995, help="0 saves the raw weights.")
    parser.add_argument("--force", action="store_true", help="Rebuild even if a matching cache exists.")
    # sampling and scoring
    parser.add_argument("--num_samples", type=int, default=96)
    parser.add_argument("--sample_steps", type=int, default=20)
    parser.add_argument("--guidance_scale", type=float, default=5.0)
    parser.add_argument("--sample_seed", type=int, default=1234)
    parser.add_argument("--grid_path", default="/tmp/tiny_world_grid.png")
    return parser.parse_args(argv)


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
)


def fingerprint(args):
    """Hash of everything the pre-trained pipeline depends on: the settings, this recipe's version,
    the source of the make_tiny_assets pieces it is built from, and the base pipeline's path if given."""
    sources = "".join(
        inspect.getsource(obj)
        for obj in (
            make_tiny_assets.build_tiny_sdxl_pipeline,
            make_tiny_assets.fit_tiny_vae,
            make_tiny_assets.make_image,
            make_tiny_assets.write_clip_tokenizer_files,
        )
    )
    key = {
        "format_version": FORMAT_VERSION,
        "settings": {name: getattr(args, name) for name in TRAIN_SETTINGS},
        "colors": make_tiny_assets.COLORS,
        "unet_preset": make_tiny_assets.UNET_PRESETS["tiny"],
        "base_pipeline": os.path.abspath(args.base_pipeline) if args.base_pipeline else None,
        "make_tiny_assets_source": hashlib.sha256(sources.encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=list).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Pre-training
# ----------------------------------------------------------------------------------------------
def image_batch(rng, n, resolution=64, colors=None, halves=None):
    """n tiny-world images as a float tensor in [-1, 1], with their colour and half indices."""
    import torch

    colors = rng.integers(len(COLOR_NAMES), size=n) if colors is None else colors
    halves = rng.integers(2, size=n) if halves is None else halves
    images = np.stack(
        [
            make_tiny_assets.make_image(COLOR_NAMES[c], ("top", "bottom")[h], rng, resolution)
            for c, h in zip(colors, halves)
        ]
    )
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1, colors, halves


def refit_vae(vae, steps, lr, batch_size, seed, resolution=64, ball_weight=2.0):
    """Continue make_tiny_assets.fit_tiny_vae's reconstruction fit (Adam, one-cycle lr) and re-derive
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
    start = time.perf_counter()
    for step in range(steps):
        if (step + 1) % max(1, steps // 5) == 0:
            print(f"  VAE refit step {step + 1}/{steps} ({time.perf_counter() - start:.0f} s)", flush=True)
        images, _, _ = image_batch(rng, batch_size, resolution)
        reconstruction = vae.decode(vae.encode(images).latent_dist.mode()).sample
        background = images[:, :, :4, :4].mean(dim=(2, 3), keepdim=True)
        weight = 1 + ball_weight * (images - background).norm(dim=1, keepdim=True)
        loss = ((reconstruction - images).pow(2) * weight).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
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
    colors, halves = np.arange(n) % len(COLOR_NAMES), (np.arange(n) // len(COLOR_NAMES)) % 2
    latents = []
    with torch.no_grad():
        for begin in range(0, n, 128):
            images, _, _ = image_batch(rng, min(128, n - begin), resolution, colors[begin:], halves[begin:])
            latents.append(pipe.vae.encode(images).latent_dist.mode() * pipe.vae.config.scaling_factor)
    latents = torch.cat(latents)
    prompt_embeds, pooled_embeds = encode_prompts(pipe, [f"a photo of a {c} ball" for c in COLOR_NAMES])
    colors_t = torch.from_numpy(colors).long()
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
    start = time.perf_counter()
    for step in range(args.train_steps):
        index = torch.randint(0, n, (args.batch_size,), generator=generator)
        x0 = latents[index]
        keep = (torch.rand(args.batch_size, generator=generator) >= args.cfg_dropout).float()
        embeds = prompt_embeds[colors_t[index]] * keep[:, None, None]
        pooled = pooled_embeds[colors_t[index]] * keep[:, None]
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
        if (step + 1) % max(1, args.train_steps // 10) == 0:
            print(
                f"  step {step + 1}/{args.train_steps}: loss {np.mean(losses[-100:]):.4f} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    timings["pretrain_s"] = time.perf_counter() - start
    if ema is not None:
        with torch.no_grad():
            for average, parameter in zip(ema, unet.parameters()):
                parameter.copy_(average)
    unet.eval()
    pipe.save_pretrained(out_path)
    return timings, float(np.mean(losses[-100:]))


# ----------------------------------------------------------------------------------------------
# Sampling and report
# ----------------------------------------------------------------------------------------------
def sample(pipe_path, args):
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(pipe_path)
    pipe.set_progress_bar_config(disable=True)
    captions = [f"a photo of a {COLOR_NAMES[i % len(COLOR_NAMES)]} ball" for i in range(args.num_samples)]
    generators = [torch.Generator().manual_seed(args.sample_seed + i) for i in range(args.num_samples)]
    start = time.perf_counter()
    with torch.no_grad():
        images = pipe(
            prompt=captions,
            num_inference_steps=args.sample_steps,
            guidance_scale=args.guidance_scale,
            generator=generators,
            output_type="np",
        ).images
    seconds = time.perf_counter() - start
    return captions, (np.clip(images, 0, 1) * 255).round().astype(np.uint8), seconds


def write_grid(images, captions, results, path, scale=2):
    """One row per colour: a swatch of the caption's colour, then that caption's samples; under each
    image a bar, white where the scorer found the ball in the top half, grey for bottom, black for none."""
    from PIL import Image

    size = images.shape[1]
    rows = [[] for _ in COLOR_NAMES]
    for image, caption, result in zip(images, captions, results):
        tile = np.zeros((size + 4, size + 2, 3), np.uint8)
        tile[:size, :size] = image
        tile[size + 1 :, :size] = 255 if result["top"] else (110 if result["found"] else 0)
        rows[COLOR_NAMES.index(caption_color(caption))].append(tile)
    width = max(len(r) for r in rows)
    lines = []
    for name, row in zip(COLOR_NAMES, rows):
        swatch = np.zeros((size + 4, 16, 3), np.uint8)
        swatch[8:-8, 2:-4] = make_tiny_assets.COLORS[name]
        row = row + [np.zeros((size + 4, size + 2, 3), np.uint8)] * (width - len(row))
        lines.append(np.concatenate([swatch] + row, axis=1))
    grid = np.concatenate(lines, axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def main(argv=None):
    args = parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    output_dir = Path(args.output_dir)
    out_path = output_dir / "tiny-world-sdxl"
    info_path = out_path / "tiny_world.json"
    key = fingerprint(args)
    info = json.loads(info_path.read_text()) if info_path.exists() else None
    if info is not None and info.get("fingerprint") == key and not args.force:
        print(f"cached: {out_path} (fingerprint {key}); pre-training times of that build: {info['timings']}")
    else:
        timings = {}
        base_path = args.base_pipeline
        if base_path is None:  # rebuilt on every cache miss: make_tiny_assets may have changed since
            base_path = output_dir / "base-sdxl"
            start = time.perf_counter()
            make_tiny_assets.build_tiny_sdxl_pipeline(str(base_path), seed=args.seed)
            timings["build_base_s"] = time.perf_counter() - start
        trained, final_loss = pretrain(args, str(base_path), str(out_path))
        timings.update(trained)
        info = {
            "fingerprint": key,
            "settings": {name: getattr(args, name) for name in TRAIN_SETTINGS},
            "timings": timings,
            "final_loss": final_loss,
        }
        info_path.write_text(json.dumps(info, indent=2) + "\n")
        print(f"built: {out_path} (fingerprint {key}), final loss {final_loss:.4f}")
        print("times: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
        print(
            f"pre-training wall time (VAE refit + data + UNet): "
            f"{trained['vae_refit_s'] + trained['data_s'] + trained['pretrain_s']:.1f} s"
        )

    captions, images, seconds = sample(str(out_path), args)
    results = [score_image(image, caption) for image, caption in zip(images, captions)]
    found = [r["found"] for r in results]
    top = [r["top"] for r in results]
    match = [r["color_match"] for r in results]
    print(
        f"sampling: {len(images)} images, {args.sample_steps} Euler steps, "
        f"guidance {args.guidance_scale}: {seconds:.1f} s"
    )
    for name, values in (("ball found", found), ("ball in top half", top), ("colour matches caption", match)):
        mean, low, high = bootstrap_interval(values)
        print(f"  {name}: {mean:.3f} (95 % bootstrap interval {low:.3f}-{high:.3f})")
    found_idx = [i for i, f in enumerate(found) if f]
    if found_idx:
        print(
            f"  among found balls: top {np.mean([top[i] for i in found_idx]):.3f}, "
            f"colour match {np.mean([match[i] for i in found_idx]):.3f}"
        )
    caption_colors = [caption_color(c) for c in captions]
    for label, values in (("top-half share", top), ("colour match", match)):
        shares = {
            name: round(float(np.mean([v for v, c in zip(values, caption_colors) if c == name])), 2)
            for name in COLOR_NAMES
        }
        print(f"  {label} per caption colour: {shares}")
    confusion = {}
    for r, c in zip(results, captions):
        confusion.setdefault(caption_color(c), []).append(r["color"] or "-")
    off = "; ".join(f"{k}: {dict(Counter(v).most_common())}" for k, v in confusion.items() if set(v) != {k})
    print(f"  drawn colours per caption: {off or 'all as captioned'}")
    print(f"  mean score {np.mean([r['score'] for r in results]):.2f}")
    write_grid(images, captions, results, args.grid_path)
    print(f"grid: {args.grid_path}")


if __name__ == "__main__":
    main()
