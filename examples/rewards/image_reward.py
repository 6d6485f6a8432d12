"""ImageReward (Xu et al. 2023), run on transformers' BLIP modules instead of the `image-reward` package.

The `image-reward` package pins old transformers/timm/fairscale versions, so it is not a
requirement. Its scoring path is small and maps onto maintained code:

    image_embeds = BLIP ViT-L/16 (224 px)(image)                  # full token sequence, after the final LayerNorm
    text = BERT-base with cross-attention(prompt tokens, image_embeds)   # "med" text encoder, bidirectional
    reward = (MLP(text.last_hidden_state[:, 0]) - 0.16717362830052426) / 1.0333394966054072

- The ViT is timm-style (`blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`, LayerNorm
  eps 1e-6, GELU, MLP ratio 4, 16 heads of 64) = transformers' `BlipVisionModel` (fused qkv, no pre-norm,
  `post_layernorm`); the "med" BERT with `add_cross_attention` = `BlipTextModel(add_pooling_layer=False)`,
  whose parameter names are BLIP's own. The MLP is the aesthetic predictor's (768-1024-128-64-16-1, no
  activations). Prompts: `bert-base-uncased` tokenizer with [DEC]/[ENC] added, padded to 35 tokens;
  ImageReward does not replace [CLS] with [ENC] when scoring. Images: resize shortest side to 224
  (bicubic), centre crop, OpenAI CLIP mean/std.
- Checked against THUDM/ImageReward `ImageReward/ImageReward.py`, `ImageReward/utils.py`
  (`load`: `THUDM/ImageReward` files `ImageReward.pt`, `med_config.json`), `models/blip.py`
  (`create_vit('large', 224)`, `init_tokenizer`) and `models/med.py`. The ViT shape is fixed in
  ImageReward's code, not in `med_config.json`; a folder may override it with `vision_config.json`
  (the tiny stand-in does). Checkpoint tensors the score does not use (`blip.vision_proj`,
  `blip.text_proj`, ...) are ignored and counted; any tensor the score needs and the file lacks is an error.
"""

import json
import re
from pathlib import Path

import torch

from .base import RewardInputError, RewardModel
from .clip_rewards import aesthetic_mlp


IMAGE_REWARD_REPO = "THUDM/ImageReward"
IMAGE_REWARD_FILENAME = "ImageReward.pt"
MED_CONFIG_FILENAME = "med_config.json"
VISION_CONFIG_FILENAME = "vision_config.json"
BERT_TOKENIZER = "google-bert/bert-base-uncased"  # ImageReward loads "bert-base-uncased", now this repository
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072
MAX_PROMPT_TOKENS = 35
OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

# BLIP `create_vit("large", image_size=224)`
BLIP_VIT_LARGE = {
    "image_size": 224,
    "patch_size": 16,
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
}


class RewardHead(torch.nn.Module):
    """ImageReward's `MLP(768)`: keeps the checkpoint's `mlp.layers.*` names."""

    def __init__(self, input_size):
        super().__init__()
        self.layers = aesthetic_mlp(input_size)


class ImageRewardNetwork(torch.nn.Module):
    def __init__(self, vision_config, text_config):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision_model = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = RewardHead(text_config.hidden_size)

    def forward(self, pixel_values, input_ids, attention_mask):
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state  # (B, 1 + patches, D_vision)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        rewards = self.mlp.layers(text[:, 0, :].float()).squeeze(-1)  # (B,)
        return (rewards - REWARD_MEAN) / REWARD_STD


def blip_configs(med_config, vision_settings, tokenizer):
    """transformers BLIP vision and text configs from ImageReward's med_config.json (BERT fields) and the ViT shape."""
    from transformers import BlipTextConfig, BlipVisionConfig

    vision_config = BlipVisionConfig(
        hidden_size=vision_settings["hidden_size"],
        intermediate_size=4 * vision_settings["hidden_size"],
        num_hidden_layers=vision_settings["num_hidden_layers"],
        num_attention_heads=vision_settings["num_attention_heads"],
        image_size=vision_settings["image_size"],
        patch_size=vision_settings["patch_size"],
        hidden_act="gelu",
        layer_norm_eps=1e-6,  # BLIP's ViT: partial(nn.LayerNorm, eps=1e-6)
    )
    text_config = BlipTextConfig(
        vocab_size=med_config["vocab_size"],
        hidden_size=med_config["hidden_size"],
        encoder_hidden_size=vision_settings["hidden_size"],  # BLIP_Pretrain sets encoder_width = vision width
        intermediate_size=med_config["intermediate_size"],
        num_attention_heads=med_config["num_attention_heads"],
        num_hidden_layers=med_config["num_hidden_layers"],
        max_position_embeddings=med_config["max_position_embeddings"],
        hidden_act=med_config.get("hidden_act", "gelu"),
        layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        hidden_dropout_prob=med_config.get("hidden_dropout_prob", 0.0),
        attention_probs_dropout_prob=med_config.get("attention_probs_dropout_prob", 0.0),
        pad_token_id=med_config.get("pad_token_id", 0),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.sep_token_id,
        sep_token_id=tokenizer.sep_token_id,
        # transformers builds the cross-attention layers only for decoders; the forward pass stays bidirectional
        is_decoder=True,
    )
    return vision_config, text_config


VISION_RENAMES = [
    (r"^blip\.visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^blip\.visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^blip\.visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision_model.encoder.layers.\1.self_attn.qkv."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.mlp\.(fc\d)\.", r"vision_model.encoder.layers.\1.mlp.\2."),
    (r"^blip\.visual_encoder\.norm\.", "vision_model.post_layernorm."),
    (r"^blip\.text_encoder\.(?!embeddings\.position_ids)", "text_encoder."),
    (r"^mlp\.layers\.", "mlp.layers."),
]


def convert_image_reward_state_dict(state_dict):
    """ImageReward.pt names -> ImageRewardNetwork names. Returns (converted, names of unused tensors)."""
    converted, unused = {}, []
    for key, value in state_dict.items():
        for pattern, replacement in VISION_RENAMES:
            if re.match(pattern, key):
                converted[re.sub(pattern, replacement, key)] = value
                break
        else:
            unused.append(key)
    return converted, unused


class ImageReward(RewardModel):
    """ImageReward v1.0: a BLIP-based reward, normalised to zero mean and unit variance on its training data.

    `path`: None (download `THUDM/ImageReward`), or a folder with `ImageReward.pt`, `med_config.json`,
    optionally `vision_config.json` and BERT tokenizer files (else `google-bert/bert-base-uncased`).
    """

    name = "imagereward"
    display_name = "ImageReward"
    kind = "bradley_terry"  # trained with a pairwise ranking (Bradley-Terry) loss
    default_weights = ((IMAGE_REWARD_REPO, IMAGE_REWARD_FILENAME),)
    local_weights = f"a folder with {IMAGE_REWARD_FILENAME} and {MED_CONFIG_FILENAME}"

    def __init__(self, path=None, tokenizer_path=None, device=None, dtype=torch.float32, batch_size=16):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        from transformers import BertTokenizer, CLIPImageProcessor

        if path is None:
            from huggingface_hub import hf_hub_download

            checkpoint_path = Path(hf_hub_download(IMAGE_REWARD_REPO, IMAGE_REWARD_FILENAME))
            med_config_path = Path(hf_hub_download(IMAGE_REWARD_REPO, MED_CONFIG_FILENAME))
            folder = None
        else:
            folder = Path(path)
            checkpoint_path, med_config_path = folder / IMAGE_REWARD_FILENAME, folder / MED_CONFIG_FILENAME
            for needed in (checkpoint_path, med_config_path):
                if not needed.is_file():
                    raise RewardInputError(
                        f"Expected {needed.name} in the ImageReward folder {str(folder)!r}; found none."
                    )
        self.path = str(checkpoint_path)
        vision_settings = dict(BLIP_VIT_LARGE)
        if folder is not None and (folder / VISION_CONFIG_FILENAME).is_file():
            vision_settings.update(json.loads((folder / VISION_CONFIG_FILENAME).read_text()))
        if tokenizer_path is None:
            has_vocab = folder is not None and any(
                (folder / name).is_file() for name in ("vocab.txt", "tokenizer.json")
            )
            tokenizer_path = folder if has_vocab else BERT_TOKENIZER
        self.tokenizer = BertTokenizer.from_pretrained(str(tokenizer_path))
        self.tokenizer.add_special_tokens(
            {"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]}
        )  # init_tokenizer()
        vision_config, text_config = blip_configs(
            json.loads(med_config_path.read_text()), vision_settings, self.tokenizer
        )
        self.image_processor = CLIPImageProcessor(
            size={"shortest_edge": vision_settings["image_size"]},
            crop_size={"height": vision_settings["image_size"], "width": vision_settings["image_size"]},
            image_mean=OPENAI_CLIP_MEAN,
            image_std=OPENAI_CLIP_STD,
        )

        from transformers.initialization import no_init_weights

        with no_init_weights():  # every weight is loaded below (a missing one is an error)
            network = ImageRewardNetwork(vision_config, text_config)
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        converted, self.unused_tensors = convert_image_reward_state_dict(checkpoint.get("state_dict", checkpoint))
        missing, unexpected = network.load_state_dict(converted, strict=False)
        if missing or unexpected:
            raise RewardInputError(
                f"{str(checkpoint_path)!r} does not fit ImageReward's architecture: missing {missing[:5]} "
                f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}). "
                f"Expected the ImageReward.pt of {IMAGE_REWARD_REPO}."
            )
        self.network = network.to(device=self.device, dtype=self.dtype).eval()
        self.network.mlp.float()  # the head is tiny; ImageReward runs it in float32

    def _score_batch(self, images, prompts):
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"].to(
            self.device, self.dtype
        )
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS, return_tensors="pt"
        )
        return self.network(
            pixel_values, tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
        )
