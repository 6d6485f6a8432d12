"""The tiny world's pieces: a tiny SDXL (or SD1.x-style) pipeline built from configs, and the pictures and
Pick-a-Pic-format pairs of its balls. A library: make_tiny_assets.py (the command line), pretrain_tiny_world.py,
the tests and the benchmark build from it.

Nothing is downloaded: the models are randomly initialised from small configs and the CLIP tokenizer is a
byte-level vocabulary written on the spot. The result loads with the same code paths as the real assets
(`StableDiffusionXLPipeline.from_pretrained`, `datasets.load_dataset`). The balls' colours are those the
`toy_ball` reward knows (examples/rewards/toy_ball.py).
"""

import io
import json
import os

import numpy as np

from examples.rewards.toy_ball import COLORS


# UNet sizes. "tiny": ~1 M parameters, fast enough for end-to-end tests. "bench": ~24 M parameters,
# big enough that a training step is dominated by the UNet's arithmetic, as on a real SDXL, so
# speed and memory ratios between methods mean something on the CPU.
UNET_PRESETS = {
    "tiny": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        norm_num_groups=8,
    ),
    "bench": dict(
        block_out_channels=(64, 128, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 8),
        transformer_layers_per_block=(1, 1, 1),
        norm_num_groups=32,
    ),
}
DEFAULT_RESOLUTION = {"tiny": 64, "bench": 256}
DEFAULT_VAE_FIT_STEPS = {"tiny": 120, "bench": 20}


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------
def bytes_to_unicode():
    """GPT-2/CLIP byte-level alphabet: 256 printable unicode characters, one per byte."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_clip_tokenizer_files(folder):
    """A byte-level CLIP vocabulary with a handful of merges (the colour words become single tokens)."""
    os.makedirs(folder, exist_ok=True)
    alphabet = bytes_to_unicode()
    vocab_list = ["<|startoftext|>", "<|endoftext|>"] + alphabet + [c + "</w>" for c in alphabet]
    merges = []
    for word in list(COLORS) + ["photo", "ball", "of"]:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in vocab_list:
                vocab_list.append(pieces[0])
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return len(vocab)


# ----------------------------------------------------------------------------------------------
# Pipeline
# ----------------------------------------------------------------------------------------------
def build_tiny_sdxl_pipeline(output_dir, seed=0, resolution=64, unet_preset="tiny", vae_fit_steps=120):
    """Save a small SDXL pipeline (UNet of `unet_preset`, two CLIP text encoders, VAE) to `output_dir`.

    Returns the number of UNet parameters.
    """
    import tempfile

    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tok_dir:
        vocab_size = write_clip_tokenizer_files(tok_dir)
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
        tokenizer_2 = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)

    text_config = tiny_text_config(vocab_size)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))

    # SDXL's text_time embedding: 6 micro-conditioning ids x addition_time_embed_dim + pooled width (32).
    unet = UNet2DConditionModel(
        sample_size=resolution // 8,
        in_channels=4,
        out_channels=4,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,  # both text encoders' hidden states, concatenated
        **UNET_PRESETS[unet_preset],
    )
    vae = tiny_vae(resolution)
    fit_tiny_vae(vae, resolution, seed, steps=vae_fit_steps)

    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
        num_train_timesteps=1000,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(output_dir)
    return sum(p.numel() for p in unet.parameters())


def tiny_text_config(vocab_size):
    """A 3-layer CLIP text encoder of width 32 (with a 32-wide projection, used by SDXL's second encoder)."""
    return dict(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        layer_norm_eps=1e-5,
        vocab_size=vocab_size,
        projection_dim=32,
        hidden_act="gelu",
        max_position_embeddings=77,
    )


def tiny_vae(resolution):
    """An AutoencoderKL with four blocks (8, 16, 32, 32): 64 px images give 8x8 latents (fit it with fit_tiny_vae)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 16, 32, 32],
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
    )


def build_tiny_sd_pipeline(
    output_dir, seed=0, resolution=64, prediction_type="epsilon", unet_preset="tiny", vae_fit_steps=120
):
    """Save a small SD1.x-style pipeline (one CLIP text encoder, no SDXL micro-conditioning) to `output_dir`:
    the UNet shapes of `unet_preset` with cross-attention on the encoder's 32-wide hidden states, the same VAE and
    tokenizer as the SDXL one, and an epsilon- or v-prediction scheduler. Returns the number of UNet parameters.
    """
    import tempfile

    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tok_dir:
        vocab_size = write_clip_tokenizer_files(tok_dir)
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_text_config(vocab_size)))
    unet = UNet2DConditionModel(
        sample_size=resolution // 8, in_channels=4, out_channels=4, cross_attention_dim=32, **UNET_PRESETS[unet_preset]
    )
    vae = tiny_vae(resolution)
    fit_tiny_vae(vae, resolution, seed, steps=vae_fit_steps)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
        num_train_timesteps=1000,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(output_dir)
    return sum(p.numel() for p in unet.parameters())


def fit_tiny_vae(vae, resolution, seed, steps=120, batch_size=8):
    """Make the random VAE behave like a trained one, in a few seconds on the CPU.

    A randomly initialised AutoencoderKL maps every image to nearly the same latent (the class of
    an image is ~5 % of the latent variance), which buries any preference signal. A short
    reconstruction fit on this dataset's kind of images fixes that; the log-variance head is then
    pinned to exp(-30) (a trained VAE's posterior is nearly deterministic) and scaling_factor set
    so latents have unit variance, as for real VAEs.
    """
    import torch

    rng = np.random.default_rng(seed + 1)
    colors = list(COLORS)

    def image_batch(n):
        images = np.stack(
            [
                make_image(colors[rng.integers(len(colors))], ("top", "bottom")[rng.integers(2)], rng, resolution)
                for _ in range(n)
            ]
        )
        return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1

    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    for _ in range(steps):
        images = image_batch(batch_size)
        reconstruction = vae.decode(vae.encode(images).latent_dist.mode()).sample
        loss = (reconstruction - images).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        logvar_rows = slice(vae.config.latent_channels, 2 * vae.config.latent_channels)
        vae.quant_conv.weight[logvar_rows] = 0
        vae.quant_conv.bias[logvar_rows] = -30.0
        latents = vae.encode(image_batch(32)).latent_dist.mode()
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    vae.eval()


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------
def make_image(color_name, half, rng, resolution):
    """A (H, W, 3) uint8 image: a soft ball of `color_name` on a dark background, in the `half` ("top"/"bottom")
    of the picture."""
    yy, xx = np.mgrid[0:resolution, 0:resolution].astype(np.float32) / resolution
    center_x = rng.uniform(0.3, 0.7)
    center_y = rng.uniform(0.2, 0.35) if half == "top" else rng.uniform(0.65, 0.8)
    radius = rng.uniform(0.12, 0.18)
    mask = np.exp(-((yy - center_y) ** 2 + (xx - center_x) ** 2) / (2 * radius**2))[..., None]
    color = np.array(COLORS[color_name], dtype=np.float32) * rng.uniform(0.8, 1.0)
    background = rng.uniform(10, 60, size=3).astype(np.float32)
    image = background * (1 - mask) + color * mask + rng.normal(0, 6, size=(resolution, resolution, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def encode_png(array):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def make_pairs(num_pairs, rng, resolution, num_ties=0):
    """Rows in the Pick-a-Pic v2 schema: jpg_0, jpg_1 (encoded bytes), label_0, caption."""
    color_names = list(COLORS)
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": []}
    for i in range(num_pairs + num_ties):
        color = color_names[rng.integers(len(color_names))]
        winner = encode_png(make_image(color, "top", rng, resolution))
        loser = encode_png(make_image(color, "bottom", rng, resolution))
        is_tie = i >= num_pairs
        winner_first = bool(rng.integers(2))  # both orders occur, as in Pick-a-Pic
        rows["caption"].append(f"a photo of a {color} ball")
        rows["jpg_0"].append(winner if winner_first else loser)
        rows["jpg_1"].append(loser if winner_first else winner)
        rows["label_0"].append(0.5 if is_tie else (1.0 if winner_first else 0.0))
    return rows


def build_tiny_pickapic(output_dir, num_train_pairs=384, num_test_pairs=96, num_ties=4, seed=0, resolution=64):
    """Write train.parquet and test.parquet; `datasets.load_dataset(output_dir)` finds both splits."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(output_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n, ties in (("train", num_train_pairs, num_ties), ("test", num_test_pairs, 0)):
        rows = make_pairs(n, rng, resolution, num_ties=ties)
        table = pa.table(
            {
                "caption": pa.array(rows["caption"], pa.string()),
                "jpg_0": pa.array(rows["jpg_0"], pa.binary()),
                "jpg_1": pa.array(rows["jpg_1"], pa.binary()),
                "label_0": pa.array(rows["label_0"], pa.float64()),
            }
        )
        pq.write_table(table, os.path.join(output_dir, f"{split}.parquet"))
    return output_dir


# ----------------------------------------------------------------------------------------------
# SD3 (flow matching)
# ----------------------------------------------------------------------------------------------
T5_WORDS = list(COLORS) + ["a", "photo", "of", "ball", "at", "the", "top", "bottom", "in", "half"]


def tiny_t5_tokenizer(model_max_length=256):
    """A T5 tokenizer (transformers' T5Tokenizer, a sentencepiece-style Unigram model) made on the spot: the tiny
    world's words as single pieces, every printable ASCII character as a fallback piece, <pad>=0, </s>=1, <unk>=2 as
    in T5."""
    import string

    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{word}", -1.0) for word in T5_WORDS]
    vocab += [(character, -5.0) for character in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def build_tiny_sd3_pipeline(output_dir, seed=0, resolution=64, num_layers=2, vae_fit_steps=120, shift=3.0):
    """Save a small StableDiffusion3Pipeline to `output_dir`, built from configs; returns the transformer's parameters.

    The SD3 layout in miniature: an SD3Transformer2DModel (MMDiT) of `num_layers` joint blocks on 16-channel latents
    (patch size 2), two CLIPTextModelWithProjection encoders of different widths (32 and 48, as SD3's 768 and 1280
    differ) whose hidden states are concatenated and padded to the T5 width, a T5 encoder (width 96 = the
    transformer's joint_attention_dim), a 16-latent-channel AutoencoderKL whose config carries shift_factor and
    scaling_factor (latents = (z − shift) × scale), and FlowMatchEulerDiscreteScheduler with `shift` (SD3's 3.0).
    The VAE is fitted to the tiny world's images for `vae_fit_steps` as the SDXL builder's is (fit_tiny_vae; 0 for a
    pipeline that only has to run), then shift_factor and scaling_factor give its latents of those images zero mean
    and unit variance, as SD3's do for real images.
    """
    import tempfile

    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tok_dir:
        clip_vocab_size = write_clip_tokenizer_files(tok_dir)
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
        tokenizer_2 = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    tokenizer_3 = tiny_t5_tokenizer()

    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**tiny_text_config(clip_vocab_size)))
    wider = dict(tiny_text_config(clip_vocab_size), hidden_size=48, intermediate_size=64, projection_dim=48)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**wider))
    t5_width = 96
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_3),
            d_model=t5_width,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",  # T5 v1.1, SD3's text_encoder_3
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    transformer = SD3Transformer2DModel(
        sample_size=resolution // 8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=num_layers,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=t5_width,
        caption_projection_dim=64,  # = the blocks' width, heads x head dim
        pooled_projection_dim=32 + 48,  # both CLIP encoders' pooled projections, concatenated
        pos_embed_max_size=max(resolution // 16, 4),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 16, 32, 32],
        latent_channels=16,
        norm_num_groups=8,
        sample_size=resolution,
        shift_factor=0.0,
        scaling_factor=1.0,
    )
    fit_tiny_vae(vae, resolution, seed, steps=vae_fit_steps)  # also pins the posterior's variance near 0
    rng = np.random.default_rng(seed + 2)
    colors, halves = list(COLORS), ("top", "bottom")
    images = np.stack([make_image(colors[i % len(colors)], halves[i % 2], rng, resolution) for i in range(32)])
    with torch.no_grad():
        latents = vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist.mode()
    vae.register_to_config(shift_factor=float(latents.mean()), scaling_factor=float(1.0 / latents.std()))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(output_dir)
    return sum(p.numel() for p in transformer.parameters())


# ----------------------------------------------------------------------------------------------
# SANA (flow matching, linear attention)
# ----------------------------------------------------------------------------------------------
GEMMA_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")


def tiny_gemma_tokenizer():
    """A Gemma tokenizer (transformers' GemmaTokenizer: a BPE model with byte fallback, spaces read as "▁") made on the
    spot: <pad>=0, <eos>=1, <bos>=2, <unk>=3, <mask>=4 and the 256 byte pieces <0x00>...<0xFF> as in Gemma, every
    printable ASCII character and the newline as a single piece, so that any text (SANA's long complex human
    instruction among them) reads without <unk>, and the tiny world's words as single pieces, with the leading "▁"
    and without it (a prompt's first word has none, as in Gemma). <bos> starts every text and padding goes to the
    right, as SANA's tokenizer does."""
    import string

    from transformers import GemmaTokenizer

    pieces = list(GEMMA_SPECIAL_TOKENS) + [f"<0x{byte:02X}>" for byte in range(256)]
    pieces += ["▁", "\n"] + list(string.ascii_letters + string.digits + string.punctuation)
    merges = []
    for word in [f"▁{word}" for word in T5_WORDS] + T5_WORDS:  # the "▁" words' merges rank first
        parts = list(word)
        while len(parts) > 1:
            merges.append((parts[0], parts[1]))
            parts = [parts[0] + parts[1]] + parts[2:]
            pieces.append(parts[0])
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
    return GemmaTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), add_bos_token=True, padding_side="right")


def build_tiny_sana_pipeline(output_dir, seed=0, resolution=64, num_layers=2, flow_shift=3.0):
    """Save a small SanaPipeline to `output_dir`, built from configs; returns the transformer's parameters.

    The SANA layout in miniature: a SanaTransformer2DModel (linear-attention DiT) of `num_layers` blocks on 32-channel
    latents, patch size 1 and no positional embedding as SANA 1600M 1024px has; a Gemma2Model (width 32 = the
    transformer's caption_channels, 8192 positions as gemma-2-2b, room for the pipeline's complex human instruction and
    its 300 prompt tokens) with tiny_gemma_tokenizer; an AutoencoderDC with SANA's 32 latent channels, ResBlock stages
    then EfficientViT (linear attention) stages, strided-conv downsampling and interpolating upsampling, but 4 stages
    (8, 16, 32, 32 channels: 8x downsampling, 8x8 latents at 64 px) where SANA's has 6 (32x, 32x32 latents at 1024 px);
    and the scheduler the SANA diffusers repositories ship, DPMSolverMultistepScheduler on flow sigmas
    (use_flow_sigmas, prediction_type "flow_prediction") with `flow_shift` (SANA's 3.0 up to 2K px).

    The VAE is not fitted: fit_tiny_vae works on an AutoencoderKL's posterior (latent_dist, quant_conv) and
    AutoencoderDC's encoder is deterministic, so the pipeline only has to run. Its scaling_factor gives its latents
    of the tiny world's images unit variance, as SANA's 0.41407 does for real images (no shift_factor: SANA has
    none). The transformer's sample_size is the latent side (resolution / 8), so the pipeline's resolution binning,
    whose bins start at 512 px, is turned off when it draws (`use_resolution_binning=False`).
    """
    import torch
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    tokenizer = tiny_gemma_tokenizer()
    gemma_width = 32
    text_encoder = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tokenizer),
            hidden_size=gemma_width,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            query_pre_attn_scalar=8,  # = head_dim, as gemma-2-2b's 256
            max_position_embeddings=8192,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        )
    )
    latent_channels = 32
    transformer = SanaTransformer2DModel(
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_attention_heads=4,
        attention_head_dim=16,
        num_layers=num_layers,
        num_cross_attention_heads=4,
        cross_attention_head_dim=16,
        cross_attention_dim=64,  # = the blocks' width, heads x head dim
        caption_channels=gemma_width,
        mlp_ratio=2.5,
        sample_size=resolution // 8,
        patch_size=1,
        interpolation_scale=None,
    )
    block_types = ("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock")
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=latent_channels,
        attention_head_dim=8,
        encoder_block_types=block_types,
        decoder_block_types=block_types,
        encoder_block_out_channels=(8, 16, 32, 32),
        decoder_block_out_channels=(8, 16, 32, 32),
        encoder_layers_per_block=(1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1),
        encoder_qkv_multiscales=((), (), (5,), (5,)),
        decoder_qkv_multiscales=((), (), (5,), (5,)),
        upsample_block_type="interpolate",
        downsample_block_type="Conv",
        decoder_norm_types=("batch_norm", "batch_norm", "rms_norm", "rms_norm"),
        decoder_act_fns=("relu", "relu", "silu", "silu"),
        scaling_factor=1.0,
    ).eval()
    rng = np.random.default_rng(seed + 2)
    colors, halves = list(COLORS), ("top", "bottom")
    images = np.stack([make_image(colors[i % len(colors)], halves[i % 2], rng, resolution) for i in range(32)])
    with torch.no_grad():
        latents = vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1).latent
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    scheduler = DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=flow_shift
    )
    pipe = SanaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    pipe.save_pretrained(output_dir)
    return sum(p.numel() for p in transformer.parameters())
