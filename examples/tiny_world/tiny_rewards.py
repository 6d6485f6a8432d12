#!/usr/bin/env python
r"""Write tiny, randomly initialised stand-ins of every registered reward model, in their real on-disk formats.

Nothing is downloaded. Each folder loads through the same code as the published weights, so the
loaders, the converters and the eval tools can be tested offline; the scores mean nothing.

    python -m examples.tiny_world.tiny_rewards --output_dir tiny_rewards
    python -m examples.eval.score --run_dirs generated/base --reward_models pickscore hpsv21 \
        --reward_model_paths pickscore=tiny_rewards/pickscore hpsv21=tiny_rewards/hpsv21

- pickscore, clipscore: a transformers CLIP folder (model, tokenizer, image processor);
- aesthetic: the same plus the MLP head as `sac+logos+ava1-l14-linearMSE.pth` (keys `layers.*`);
- hpsv21: an open_clip checkpoint `HPS_v2.1_compressed.pt` (`{"state_dict": ...}` in open_clip's
  names) with its `open_clip_config.json`, and tokenizer files;
- imagereward: `ImageReward.pt` in ImageReward's own (BLIP) names, `med_config.json`,
  `vision_config.json` and a BERT `vocab.txt`;
- mps: `MPS_overall_state_dict.safetensors` (what `python -m examples.rewards.convert_mps` makes of the authors'
  pickled checkpoint: their CLIP model and cross model, in their names) with the tiny CLIP's config.json,
  tokenizer and image processor.
The tokenizers are byte-level CLIP BPE (with <|endoftext|> as the largest id, as in CLIP) and a
small WordPiece vocabulary. Every model of examples/rewards/registry.py has a writer in STAND_INS
below, except those that need an optional package (vqascore) or no weights (toy_ball);
`write_tiny_reward_models` checks it.
"""

import argparse
import json
import os
from pathlib import Path

import torch

from examples.rewards.clip_rewards import AESTHETIC_HEAD_FILENAME, aesthetic_mlp
from examples.rewards.hps import HPS_V21_FILENAME, OPEN_CLIP_CONFIG_NAME
from examples.rewards.image_reward import IMAGE_REWARD_FILENAME, MED_CONFIG_FILENAME, VISION_CONFIG_FILENAME
from examples.rewards.mps import MPS_STATE_DICT_FILENAME, MPSNetwork
from examples.tiny_world.world import bytes_to_unicode


TINY_IMAGE_SIZE, TINY_PATCH_SIZE, TINY_WIDTH, TINY_LAYERS, TINY_HEADS, TINY_EMBED_DIM = 32, 8, 32, 2, 4, 16
WORDS = ["a", "photo", "of", "ball", "red", "green", "blue", "yellow", "purple", "cyan", "the", "cat", "dog"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output_dir", type=str, required=True, help="Folder that receives one sub-folder per reward model."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    return parser.parse_args(argv)


def write_clip_tokenizer(folder):
    """A CLIP BPE tokenizer with merges for WORDS; <|startoftext|>, <|endoftext|> take the last two ids."""
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    alphabet = bytes_to_unicode()
    tokens, merges = alphabet + [c + "</w>" for c in alphabet], []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            tokens.append(pieces[0])
    tokens = list(dict.fromkeys(tokens)) + ["<|startoftext|>", "<|endoftext|>"]
    (Path(folder) / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (Path(folder) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    tokenizer.save_pretrained(folder)
    return tokenizer


def write_clip_image_processor(folder, image_size=TINY_IMAGE_SIZE):
    from transformers import CLIPImageProcessor

    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(folder)


def random_state_dict(shapes, generator):
    """Random tensors for a {name: shape} table: LayerNorm-like weights near 1, everything else small."""
    state_dict = {}
    for name, shape in shapes.items():
        values = 0.02 * torch.randn(shape, generator=generator)
        is_norm_weight = name.endswith("weight") and any(part in name for part in ("norm", "ln_", "LayerNorm"))
        state_dict[name] = values + 1.0 if is_norm_weight else values
    return state_dict


def tiny_clip_config(tokenizer):
    """Two layers of width 32 per tower, 32 px images, 16-dimensional embeddings."""
    from transformers import CLIPConfig

    common = dict(
        hidden_size=TINY_WIDTH,
        intermediate_size=37,
        num_attention_heads=TINY_HEADS,
        num_hidden_layers=TINY_LAYERS,
        projection_dim=TINY_EMBED_DIM,
    )
    config = CLIPConfig(
        projection_dim=TINY_EMBED_DIM,
        text_config=dict(
            common,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(common, image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH_SIZE),
    )
    return config


def write_tiny_hf_clip(folder, seed):
    """A transformers CLIP folder (model, tokenizer, image processor) of `tiny_clip_config`."""
    from transformers import CLIPModel

    tokenizer = write_clip_tokenizer(folder)
    write_clip_image_processor(folder)
    torch.manual_seed(seed)
    CLIPModel(tiny_clip_config(tokenizer)).save_pretrained(folder)
    return folder


def write_tiny_aesthetic(folder, seed):
    write_tiny_hf_clip(folder, seed)
    torch.manual_seed(seed + 1)
    head = aesthetic_mlp(TINY_EMBED_DIM)
    torch.save(
        {f"layers.{key}": value for key, value in head.state_dict().items()}, Path(folder) / AESTHETIC_HEAD_FILENAME
    )
    return folder


def tiny_open_clip_config(vocab_size):
    return {
        "embed_dim": TINY_EMBED_DIM,
        "vision_cfg": {
            "image_size": TINY_IMAGE_SIZE,
            "layers": TINY_LAYERS,
            "width": TINY_WIDTH,
            "head_width": TINY_WIDTH // TINY_HEADS,
            "patch_size": TINY_PATCH_SIZE,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": vocab_size,
            "width": TINY_WIDTH,
            "heads": TINY_HEADS,
            "layers": TINY_LAYERS,
        },
    }


def open_clip_shapes(model_cfg):
    """Parameter names and shapes of an open_clip CLIP (open_clip/model.py, transformer.py)."""
    vision, text, embed_dim = model_cfg["vision_cfg"], model_cfg["text_cfg"], model_cfg["embed_dim"]

    def resblocks(prefix, width, layers):
        shapes = {}
        for i in range(layers):
            block = f"{prefix}.{i}."
            shapes.update(
                {
                    block + "ln_1.weight": (width,),
                    block + "ln_1.bias": (width,),
                    block + "attn.in_proj_weight": (3 * width, width),
                    block + "attn.in_proj_bias": (3 * width,),
                    block + "attn.out_proj.weight": (width, width),
                    block + "attn.out_proj.bias": (width,),
                    block + "ln_2.weight": (width,),
                    block + "ln_2.bias": (width,),
                    block + "mlp.c_fc.weight": (4 * width, width),
                    block + "mlp.c_fc.bias": (4 * width,),
                    block + "mlp.c_proj.weight": (width, 4 * width),
                    block + "mlp.c_proj.bias": (width,),
                }
            )
        return shapes

    grid = vision["image_size"] // vision["patch_size"]
    shapes = {
        "visual.class_embedding": (vision["width"],),
        "visual.positional_embedding": (grid * grid + 1, vision["width"]),
        "visual.conv1.weight": (vision["width"], 3, vision["patch_size"], vision["patch_size"]),
        "visual.ln_pre.weight": (vision["width"],),
        "visual.ln_pre.bias": (vision["width"],),
        **resblocks("visual.transformer.resblocks", vision["width"], vision["layers"]),
        "visual.ln_post.weight": (vision["width"],),
        "visual.ln_post.bias": (vision["width"],),
        "visual.proj": (vision["width"], embed_dim),
        "token_embedding.weight": (text["vocab_size"], text["width"]),
        "positional_embedding": (text["context_length"], text["width"]),
        **resblocks("transformer.resblocks", text["width"], text["layers"]),
        "ln_final.weight": (text["width"],),
        "ln_final.bias": (text["width"],),
        "text_projection": (text["width"], embed_dim),
    }
    return shapes


def write_tiny_hps(folder, seed):
    """An open_clip-format HPS checkpoint, as `xswu/HPSv2` ships it, with a tiny config."""
    os.makedirs(folder, exist_ok=True)
    tokenizer = write_clip_tokenizer(folder)
    model_cfg = tiny_open_clip_config(len(tokenizer))
    state_dict = random_state_dict(open_clip_shapes(model_cfg), torch.Generator().manual_seed(seed))
    state_dict["visual.proj"] *= 10  # CLIP-like projection scale, so cosines spread beyond a few 1e-3
    state_dict["text_projection"] *= 10
    state_dict["logit_scale"] = torch.tensor(4.6052)  # log(100), as a trained CLIP
    torch.save({"epoch": 1, "name": "tiny-hps", "state_dict": state_dict}, Path(folder) / HPS_V21_FILENAME)
    (Path(folder) / OPEN_CLIP_CONFIG_NAME).write_text(
        json.dumps(
            {
                "model_cfg": model_cfg,
                "preprocess_cfg": {
                    "mean": [0.48145466, 0.4578275, 0.40821073],
                    "std": [0.26862954, 0.26130258, 0.27577711],
                },
            },
            indent=2,
        )
    )
    return folder


def write_bert_vocab(folder):
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    characters = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    vocab = special + WORDS + characters + ["##" + c for c in characters]
    (Path(folder) / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    return len(dict.fromkeys(vocab))


def image_reward_shapes(vision, med):
    """ImageReward.pt names and shapes (BLIP_Pretrain + MLP: models/vit.py, models/med.py, ImageReward.py)."""
    width, hidden, inner = vision["hidden_size"], med["hidden_size"], med["intermediate_size"]
    grid = vision["image_size"] // vision["patch_size"]
    shapes = {
        "blip.visual_encoder.cls_token": (1, 1, width),
        "blip.visual_encoder.pos_embed": (1, grid * grid + 1, width),
        "blip.visual_encoder.patch_embed.proj.weight": (width, 3, vision["patch_size"], vision["patch_size"]),
        "blip.visual_encoder.patch_embed.proj.bias": (width,),
        "blip.visual_encoder.norm.weight": (width,),
        "blip.visual_encoder.norm.bias": (width,),
        "blip.text_encoder.embeddings.word_embeddings.weight": (med["vocab_size"], hidden),
        "blip.text_encoder.embeddings.position_embeddings.weight": (med["max_position_embeddings"], hidden),
        "blip.text_encoder.embeddings.LayerNorm.weight": (hidden,),
        "blip.text_encoder.embeddings.LayerNorm.bias": (hidden,),
        "blip.vision_proj.weight": (TINY_EMBED_DIM, width),
        "blip.vision_proj.bias": (TINY_EMBED_DIM,),
        "blip.text_proj.weight": (TINY_EMBED_DIM, hidden),
        "blip.text_proj.bias": (TINY_EMBED_DIM,),
    }
    for i in range(vision["num_hidden_layers"]):
        block = f"blip.visual_encoder.blocks.{i}."
        shapes.update(
            {
                block + "norm1.weight": (width,),
                block + "norm1.bias": (width,),
                block + "attn.qkv.weight": (3 * width, width),
                block + "attn.qkv.bias": (3 * width,),
                block + "attn.proj.weight": (width, width),
                block + "attn.proj.bias": (width,),
                block + "norm2.weight": (width,),
                block + "norm2.bias": (width,),
                block + "mlp.fc1.weight": (4 * width, width),
                block + "mlp.fc1.bias": (4 * width,),
                block + "mlp.fc2.weight": (width, 4 * width),
                block + "mlp.fc2.bias": (width,),
            }
        )
    for i in range(med["num_hidden_layers"]):
        layer = f"blip.text_encoder.encoder.layer.{i}."
        for attention, key_width in (("attention", hidden), ("crossattention", width)):
            shapes.update(
                {
                    f"{layer}{attention}.self.query.weight": (hidden, hidden),
                    f"{layer}{attention}.self.query.bias": (hidden,),
                    f"{layer}{attention}.self.key.weight": (hidden, key_width),
                    f"{layer}{attention}.self.key.bias": (hidden,),
                    f"{layer}{attention}.self.value.weight": (hidden, key_width),
                    f"{layer}{attention}.self.value.bias": (hidden,),
                    f"{layer}{attention}.output.dense.weight": (hidden, hidden),
                    f"{layer}{attention}.output.dense.bias": (hidden,),
                    f"{layer}{attention}.output.LayerNorm.weight": (hidden,),
                    f"{layer}{attention}.output.LayerNorm.bias": (hidden,),
                }
            )
        shapes.update(
            {
                layer + "intermediate.dense.weight": (inner, hidden),
                layer + "intermediate.dense.bias": (inner,),
                layer + "output.dense.weight": (hidden, inner),
                layer + "output.dense.bias": (hidden,),
                layer + "output.LayerNorm.weight": (hidden,),
                layer + "output.LayerNorm.bias": (hidden,),
            }
        )
    return shapes


def write_tiny_image_reward(folder, seed):
    """ImageReward's files (`ImageReward.pt` in its own names, `med_config.json`) at toy size."""
    os.makedirs(folder, exist_ok=True)
    # + [DEC] and [ENC], as init_tokenizer() adds (30522 + 2 in the real model)
    vocab_size = write_bert_vocab(folder) + 2
    vision = {
        "image_size": TINY_IMAGE_SIZE,
        "patch_size": TINY_PATCH_SIZE,
        "hidden_size": TINY_WIDTH,
        "num_hidden_layers": TINY_LAYERS,
        "num_attention_heads": TINY_HEADS,
    }
    med = {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": TINY_WIDTH,
        "initializer_range": 0.02,
        "intermediate_size": 37,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 64,
        "model_type": "bert",
        "num_attention_heads": TINY_HEADS,
        "num_hidden_layers": TINY_LAYERS,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": vocab_size,
        "encoder_width": TINY_WIDTH,
        "add_cross_attention": True,
    }
    generator = torch.Generator().manual_seed(seed)
    state_dict = random_state_dict(image_reward_shapes(vision, med), generator)
    state_dict["blip.text_encoder.embeddings.position_ids"] = torch.arange(med["max_position_embeddings"]).unsqueeze(0)
    head = aesthetic_mlp(TINY_WIDTH)
    for name, value in head.state_dict().items():
        fan_in = value.shape[-1] if value.ndim == 2 else 1
        state_dict[f"mlp.layers.{name}"] = torch.randn(value.shape, generator=generator) / fan_in**0.5  # outputs ~1
    torch.save(state_dict, Path(folder) / IMAGE_REWARD_FILENAME)
    (Path(folder) / MED_CONFIG_FILENAME).write_text(json.dumps(med, indent=2))
    (Path(folder) / VISION_CONFIG_FILENAME).write_text(json.dumps(vision, indent=2))
    return folder


def write_tiny_mps(folder, seed):
    """MPS as its conversion writes it (`MPS_overall_state_dict.safetensors`, the authors' tensor names), with the
    tiny CLIP's config.json, tokenizer and image processor beside it; a cross model of 2 layers, 2 heads of 8."""
    from safetensors.torch import save_file

    tokenizer = write_clip_tokenizer(folder)
    write_clip_image_processor(folder)
    config = tiny_clip_config(tokenizer)
    config.save_pretrained(folder)
    torch.manual_seed(seed)
    network = MPSNetwork(config, layers=2, heads=2, dim_head=8, ff_mult=4)
    save_file(
        {key: value.contiguous() for key, value in network.state_dict().items()},
        Path(folder) / MPS_STATE_DICT_FILENAME,
    )
    return folder


# One writer per reward model of examples/rewards/registry.py: (folder, seed) -> folder.
STAND_INS = {
    "pickscore": write_tiny_hf_clip,
    "clipscore": write_tiny_hf_clip,
    "aesthetic": write_tiny_aesthetic,
    "hpsv21": write_tiny_hps,
    "imagereward": write_tiny_image_reward,
    "mps": write_tiny_mps,
}


def reward_models_without_stand_in():
    """Registered reward models with no writer in STAND_INS, leaving out those that need an optional package
    and those that have no weights (toy_ball)."""
    from examples.rewards.registry import REWARD_MODELS

    return [
        name
        for name, model in REWARD_MODELS.items()
        if name not in STAND_INS
        and getattr(model, "optional_dependency", None) is None
        and getattr(model, "needs_weights", True)
    ]


def write_tiny_reward_models(output_dir, seed=0):
    """Write every stand-in under `output_dir`; returns {reward name: folder}, ready for `load_reward_model`."""
    missing = reward_models_without_stand_in()
    if missing:
        raise RuntimeError(
            f"Reward models {missing} are registered in examples/rewards/registry.py but have no tiny stand-in; "
            "add a writer for each to STAND_INS in examples/tiny_world/tiny_rewards.py."
        )
    output_dir = Path(output_dir)
    return {
        name: str(write(output_dir / name, seed + offset)) for offset, (name, write) in enumerate(STAND_INS.items())
    }


def main(argv=None):
    args = parse_args(argv)
    for name, folder in write_tiny_reward_models(args.output_dir, args.seed).items():
        print(f"{name}: {folder}")


if __name__ == "__main__":
    main()
