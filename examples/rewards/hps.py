"""HPS v2.1 (Wu et al. 2023), run on transformers' CLIP instead of open_clip.

HPS v2.1 is an open_clip ViT-H-14 (the `laion2B-s32B-b79K` CLIP) fine-tuned on HPD v2; its
weights are the open_clip state dict in `xswu/HPSv2`/`HPS_v2.1_compressed.pt` (`{"state_dict": ...}`).
The authors' `hpsv2` package pins old torch/protobuf versions, and open_clip needs torchvision,
so neither is a requirement here: `convert_open_clip_state_dict` maps the open_clip weights onto a
`transformers.CLIPModel` of the same shape, which computes the same function:

- both towers are pre-LayerNorm transformers (ln_1 -> attention -> ln_2 -> MLP with GELU, eps 1e-5);
  open_clip's fused `in_proj_weight` splits into q/k/v projections;
- the text tower is causal and pools the first end-of-text token (open_clip takes the argmax of
  the token ids, the same position because <|endoftext|> is the largest id of CLIP's BPE vocabulary);
- the image tower pools the class token after `ln_post`; `proj`/`text_projection` are stored
  transposed (x @ proj) where transformers uses Linear weights.

Score = 100 * cos(image, text): `hpsv2.score` returns the cosine (about 0.30 for SDXL), and papers
(HPS v2 leaderboard, MaPO Table 1, DDSPO Table 2b) print it times 100.

Preprocessing is the authors' scorer's, not CLIP's: `hpsv2/img_score.py` builds its transforms with
`create_model_and_transforms(..., light_augmentation=True)`, whose validation transform is open_clip's
`image_transform(224, is_train=False, resize_longest_max=True)`: RGB, ToTensor, `ResizeMaxSize(224)`
(the LONG side to 224, bicubic, on the float tensor; then zero padding to 224 x 224, split as
[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2] for left, top, right, bottom), OpenAI
mean/std. A non-square image is therefore shrunk whole and framed by black bars, not centre-cropped.
`hps_pixel_values` reproduces it with torch: torchvision resizes a tensor with
`F.interpolate(mode="bicubic", align_corners=False, antialias=True)` (antialiasing is torchvision's
default since 0.17) and rounds the new size with Python's `round`. One quirk kept apart: ResizeMaxSize
skips both the resize and the padding when the long side is already 224 (`if scale != 1.0`), which
leaves a non-square image that the ViT cannot take; we still pad it.

Prompts are cleaned as open_clip's SimpleTokenizer does before BPE (`ftfy.fix_text`, HTML unescaped
twice, whitespace runs collapsed to one space, lower case), then tokenized with the CLIP BPE of
`laion/CLIP-ViT-H-14-laion2B-s32B-b79K`, padded to the 77-token context. Checked against open_clip's
`model_configs/ViT-H-14.json`, `tokenizer.py`, `hpsv2/img_score.py` and `hpsv2/src/open_clip/transform.py`;
the conversion is tested against a direct re-implementation of open_clip's forward pass, the
preprocessing against a re-implementation of ResizeMaxSize (tests/tools/test_rewards.py).
"""

import html
import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .base import RewardInputError, RewardModel
from .clip_rewards import LAION_CLIP_H_14, has_tokenizer_files


HPS_REPO = "xswu/HPSv2"
HPS_V21_FILENAME = "HPS_v2.1_compressed.pt"
OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"
OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

# open_clip's model_configs/ViT-H-14.json
VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}

# open_clip options that change the network in ways a plain CLIPModel does not reproduce.
UNSUPPORTED_OPTIONS = {
    "vision_cfg": (
        "ls_init_value",
        "attentional_pool",
        "no_ln_pre",
        "final_ln_after_pool",
        "pool_type",
        "global_average_pool",
        "timm_model_name",
        "pos_embed_type",
    ),
    "text_cfg": ("ls_init_value", "hf_model_name", "proj_bias", "pool_type", "no_causal_mask", "embed_cls"),
}
DEFAULTS_OF_UNSUPPORTED = {"pool_type": ("tok", "argmax"), "pos_embed_type": ("learnable",)}


def clip_config_from_open_clip(model_cfg, tokenizer):
    """transformers CLIPConfig for an open_clip `model_cfg` (a plain ViT CLIP with a causal text tower)."""
    from transformers import CLIPConfig

    for tower, options in UNSUPPORTED_OPTIONS.items():
        for option in options:
            value = model_cfg.get(tower, {}).get(option)
            if value not in (None, False, *DEFAULTS_OF_UNSUPPORTED.get(option, ())):
                raise RewardInputError(
                    f"open_clip option {tower}.{option}={value!r} is not supported by this HPS loader; "
                    "expected a plain ViT CLIP such as ViT-H-14."
                )
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    activation = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    vision_heads = vision["width"] // vision.get("head_width", 64)
    return CLIPConfig(
        projection_dim=model_cfg["embed_dim"],
        text_config=dict(
            vocab_size=text["vocab_size"],
            hidden_size=text["width"],
            intermediate_size=int(text["width"] * text.get("mlp_ratio", 4.0)),
            num_attention_heads=text["heads"],
            num_hidden_layers=text["layers"],
            max_position_embeddings=text["context_length"],
            hidden_act=activation,
            layer_norm_eps=1e-5,
            projection_dim=model_cfg["embed_dim"],
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=vision["width"],
            intermediate_size=int(vision["width"] * vision.get("mlp_ratio", 4.0)),
            num_attention_heads=vision_heads,
            num_hidden_layers=vision["layers"],
            image_size=vision["image_size"],
            patch_size=vision["patch_size"],
            hidden_act=activation,
            layer_norm_eps=1e-5,
            projection_dim=model_cfg["embed_dim"],
        ),
    )


def count_resblocks(state_dict, prefix):
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return len({int(match.group(1)) for key in state_dict for match in [pattern.match(key)] if match})


RESBLOCK_RENAMES = {
    "attn.out_proj": "self_attn.out_proj",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
TOP_LEVEL_RENAMES = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # (sic) transformers' name
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "logit_scale": "logit_scale",
}
TRANSPOSED_PROJECTIONS = {
    "text_projection": "text_projection.weight",
    "visual.proj": "visual_projection.weight",
}  # x @ proj -> Linear
IGNORED_OPEN_CLIP_KEYS = {"attn_mask"}  # the causal mask, a buffer some open_clip versions save


def convert_open_clip_state_dict(state_dict):
    """open_clip CLIP (ViT image tower, built-in text tower) weights -> transformers CLIPModel weights.

    Every tensor must find a place: a leftover (e.g. layer-scale `ls_1.gamma`) means an architecture
    this conversion does not reproduce, and is an error rather than a silently different model.
    """
    converted, used = {}, set(IGNORED_OPEN_CLIP_KEYS)

    def take(key):
        if key not in state_dict:
            raise RewardInputError(
                f"The open_clip checkpoint has no tensor {key!r}; expected a plain ViT CLIP such as ViT-H-14."
            )
        used.add(key)
        return state_dict[key]

    for source_prefix, target_prefix in (
        ("transformer.resblocks", "text_model.encoder.layers"),
        ("visual.transformer.resblocks", "vision_model.encoder.layers"),
    ):
        for layer in range(count_resblocks(state_dict, source_prefix)):
            source, target = f"{source_prefix}.{layer}.", f"{target_prefix}.{layer}."
            in_proj_weight, in_proj_bias = take(source + "attn.in_proj_weight"), take(source + "attn.in_proj_bias")
            for name, weight, bias in zip(
                ("q_proj", "k_proj", "v_proj"), in_proj_weight.chunk(3), in_proj_bias.chunk(3)
            ):
                converted[f"{target}self_attn.{name}.weight"], converted[f"{target}self_attn.{name}.bias"] = (
                    weight,
                    bias,
                )
            for old, new in RESBLOCK_RENAMES.items():
                for suffix in ("weight", "bias"):
                    converted[f"{target}{new}.{suffix}"] = take(f"{source}{old}.{suffix}")
    for old, new in TOP_LEVEL_RENAMES.items():
        converted[new] = take(old)
    for old, new in TRANSPOSED_PROJECTIONS.items():
        converted[new] = take(old).t().contiguous()
    leftover = sorted(set(state_dict) - used)
    if leftover:
        raise RewardInputError(
            f"open_clip tensors {leftover[:5]} ({len(leftover)} in all) have no place in a plain CLIP model; "
            "this loader supports plain ViT CLIPs such as ViT-H-14."
        )
    return converted


def load_open_clip_checkpoint(path):
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if isinstance(state_dict, dict):  # "module." prefixes: saved from DistributedDataParallel
        state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    if not isinstance(state_dict, dict) or "visual.proj" not in state_dict:
        raise RewardInputError(
            f"{str(path)!r} is not an open_clip CLIP checkpoint "
            "(expected a state dict, or {'state_dict': ...}, with 'visual.proj')."
        )
    return state_dict


def build_clip_from_open_clip(model_cfg, state_dict, tokenizer, device, dtype):
    from transformers import CLIPModel
    from transformers.initialization import no_init_weights

    config = clip_config_from_open_clip(model_cfg, tokenizer)
    converted = convert_open_clip_state_dict(state_dict)
    text_layers, vision_layers = (
        count_resblocks(state_dict, "transformer.resblocks"),
        count_resblocks(state_dict, "visual.transformer.resblocks"),
    )
    if (text_layers, vision_layers) != (config.text_config.num_hidden_layers, config.vision_config.num_hidden_layers):
        raise RewardInputError(
            f"The checkpoint has {text_layers} text and {vision_layers} image layers, the open_clip config "
            f"{config.text_config.num_hidden_layers} and {config.vision_config.num_hidden_layers}; "
            "give the config the checkpoint was trained with."
        )
    # every weight is loaded below (a missing one is an error); random init of ViT-H costs ~20 s
    with no_init_weights():
        model = CLIPModel(config)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    missing = [key for key in missing if not key.endswith("position_ids")]
    if missing or unexpected:
        raise RewardInputError(
            f"The converted open_clip weights do not fit the CLIP model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}."
        )
    return model.to(device=device, dtype=dtype).eval()


def hps_pixel_values(images, image_size, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
    """RGB PIL images -> (N, 3, image_size, image_size): HPS v2's ResizeMaxSize validation transform (see above)."""
    batch = []
    for image in images:
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)  # ToTensor, (3, H, W)
        height, width = pixels.shape[1:]
        scale = image_size / max(height, width)
        if scale != 1.0:
            size = (round(height * scale), round(width * scale))
            pixels = F.interpolate(pixels[None], size=size, mode="bicubic", align_corners=False, antialias=True)[0]
        pad_h, pad_w = image_size - pixels.shape[1], image_size - pixels.shape[2]
        batch.append(F.pad(pixels, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0))
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    return (torch.stack(batch) - mean) / std


def open_clip_clean(text):
    """open_clip SimpleTokenizer's cleaning: basic_clean (ftfy, HTML unescaped twice), whitespace_clean, lower."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


class HPSv21(RewardModel):
    """Human Preference Score v2.1: 100 * cos(image, text) of the HPS-fine-tuned ViT-H-14.

    `path`: None (download `xswu/HPSv2`/`HPS_v2.1_compressed.pt`), an open_clip checkpoint file
    (ViT-H-14 assumed), or a folder with `open_clip_config.json` (`{"model_cfg": ...}` as open_clip
    hub repositories write it; its optional `preprocess_cfg` mean/std are used), one checkpoint file,
    and optionally CLIP tokenizer files. `processor_path`: where the tokenizer comes from otherwise.
    """

    name = "hpsv21"
    display_name = "HPS v2.1"
    kind = "bradley_terry"  # trained with a softmax over cos * logit_scale: a logit-scale reward
    default_weights = ((HPS_REPO, HPS_V21_FILENAME),)
    local_weights = f"an open_clip checkpoint file, or a folder with {OPEN_CLIP_CONFIG_NAME} and one checkpoint"

    def __init__(self, path=None, processor_path=None, device=None, dtype=torch.float32, batch_size=16):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        from transformers import AutoTokenizer

        model_cfg, preprocess_cfg, checkpoint_path, local_tokenizer = VIT_H_14, {}, None, None
        if path is None:
            from huggingface_hub import hf_hub_download

            checkpoint_path = hf_hub_download(HPS_REPO, HPS_V21_FILENAME)
        elif Path(path).is_file():
            checkpoint_path = Path(path)
        elif Path(path).is_dir():
            model_cfg, preprocess_cfg, checkpoint_path = self.read_folder(Path(path))
            local_tokenizer = path if has_tokenizer_files(path) else None
        else:
            raise RewardInputError(f"HPS v2.1 path {str(path)!r} does not exist; expected {self.local_weights}.")
        self.path = str(checkpoint_path)
        self.processor_path = str(processor_path or local_tokenizer or LAION_CLIP_H_14)  # the tokenizer's files
        self.tokenizer = AutoTokenizer.from_pretrained(self.processor_path)
        state_dict = load_open_clip_checkpoint(checkpoint_path)
        self.model = build_clip_from_open_clip(model_cfg, state_dict, self.tokenizer, self.device, self.dtype)
        self.context_length = model_cfg["text_cfg"]["context_length"]
        self.image_size = model_cfg["vision_cfg"]["image_size"]
        self.image_mean = tuple(preprocess_cfg.get("mean", OPENAI_CLIP_MEAN))
        self.image_std = tuple(preprocess_cfg.get("std", OPENAI_CLIP_STD))

    @staticmethod
    def read_folder(folder):
        config_file = folder / OPEN_CLIP_CONFIG_NAME
        if not config_file.is_file():
            raise RewardInputError(
                f"Expected {OPEN_CLIP_CONFIG_NAME} in {str(folder)!r} (the open_clip model config); found none."
            )
        config = json.loads(config_file.read_text())
        model_cfg, preprocess_cfg = config.get("model_cfg", config), config.get("preprocess_cfg", {})
        preferred = folder / HPS_V21_FILENAME
        candidates = (
            [preferred]
            if preferred.is_file()
            else sorted(p for p in folder.iterdir() if p.suffix in (".pt", ".pth", ".bin"))
        )
        if len(candidates) != 1:
            raise RewardInputError(
                f"Expected one open_clip checkpoint (.pt/.pth/.bin, ideally {HPS_V21_FILENAME}) in {str(folder)!r}, "
                f"found {[p.name for p in candidates]}."
            )
        return model_cfg, preprocess_cfg, candidates[0]

    def pixel_values(self, images):
        """RGB PIL images -> (N, 3, S, S), as the authors' scorer prepares them (`hps_pixel_values`)."""
        return hps_pixel_values(images, self.image_size, self.image_mean, self.image_std)

    def input_ids(self, prompts):
        """Prompts -> (N, context_length) token ids, as open_clip's tokenizer makes them (cleaned first)."""
        # open_clip pads to the full context; the causal mask makes padding irrelevant to the pooled token.
        return self.tokenizer(
            [open_clip_clean(prompt) for prompt in prompts],
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )["input_ids"]

    def _score_batch(self, images, prompts):
        pixel_values = self.pixel_values(images).to(self.device, self.dtype)
        image_features = self.model.get_image_features(pixel_values=pixel_values).pooler_output
        text_features = self.model.get_text_features(input_ids=self.input_ids(prompts).to(self.device)).pooler_output
        cosine = (F.normalize(image_features.float(), dim=-1) * F.normalize(text_features.float(), dim=-1)).sum(-1)
        return 100.0 * cosine  # (B,)
