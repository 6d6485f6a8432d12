"""Rewards built on a transformers CLIP model: PickScore, CLIPScore and the LAION aesthetic predictor.

What was checked (against the authors' published code and model cards):
- PickScore (Kirstain et al. 2023): model `yuvalkirstain/PickScore_v1`, processor
  `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`; score = logit_scale.exp() * cos(image, text), texts
  tokenized with padding, truncation at 77 tokens. This is the ~22 scale of MaPO Table 1.
- LAION aesthetic predictor v2 (`improved-aesthetic-predictor`): CLIP ViT-L/14 image embedding
  (`openai/clip-vit-large-patch14`, projected, L2-normalised) -> MLP 768-1024-128-64-16-1 with
  dropouts and no activations, weights `sac+logos+ava1-l14-linearMSE.pth` (state-dict keys
  `layers.{0,2,4,6,7}.*`). The hub copy used by default is `camenduru/improved-aesthetic-predictor`,
  a byte-for-byte mirror of the file in the authors' GitHub repository (the authors publish it on
  GitHub only); pass `head_path` to use another copy.
- CLIPScore: Hessel et al. (2021) define CLIP-S = w * max(cos, 0) with w = 2.5 on ViT-B/32. We
  report 100 * max(cos, 0) on ViT-L/14 (`openai/clip-vit-large-patch14`), the convention of
  torchmetrics' CLIPScore and of most text-to-image papers; `weight` changes w.
"""

from pathlib import Path

import torch
import torch.nn.functional as F

from .base import RewardInputError, RewardModel, hub_source


LAION_CLIP_H_14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
OPENAI_CLIP_L_14 = "openai/clip-vit-large-patch14"


def has_tokenizer_files(path):
    """True for a local folder that holds a tokenizer."""
    folder = Path(path)
    return folder.is_dir() and any((folder / name).exists() for name in ("tokenizer.json", "vocab.json", "vocab.txt"))


def has_processor_files(path):
    """True for a local folder that holds a tokenizer and an image-processor config."""
    return has_tokenizer_files(path) and (Path(path) / "preprocessor_config.json").exists()


def load_clip_processor(path):
    from transformers import AutoTokenizer, CLIPImageProcessor

    return AutoTokenizer.from_pretrained(path), CLIPImageProcessor.from_pretrained(path)


def load_clip_model(path, device, dtype):
    from transformers import CLIPModel

    if Path(path).exists() and not (Path(path) / "config.json").exists():
        raise RewardInputError(
            f"Expected a transformers CLIP model folder (with config.json) at {str(path)!r}, found none."
        )
    return CLIPModel.from_pretrained(path, dtype=dtype).to(device).eval()


class ClipReward(RewardModel):
    """Shared plumbing: a CLIP model, its tokenizer and image processor, and normalised embeddings."""

    kind = "bradley_terry"
    default_model = OPENAI_CLIP_L_14
    default_processor = OPENAI_CLIP_L_14
    default_weights = ((OPENAI_CLIP_L_14, "config.json"),)
    hub_weights_file = "config.json"
    local_weights = "a transformers CLIP folder (with config.json) or a hub repository id"

    def __init__(self, path=None, processor_path=None, device=None, dtype=torch.float32, batch_size=16):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        self.path = str(path or self.default_model)
        self.processor_path = str(processor_path or self.default_processor_path(path))
        self.model = load_clip_model(self.path, self.device, self.dtype)
        self.tokenizer, self.image_processor = load_clip_processor(self.processor_path)

    def default_processor_path(self, path):
        """The published model's processor; a local folder's own files when it has them; else the hub id given."""
        if path is None or str(path) == self.default_model:
            return self.default_processor
        if Path(path).is_dir():
            return path if has_processor_files(path) else self.default_processor
        return path

    def image_embeddings(self, images):
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        features = self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.dtype)).pooler_output
        return F.normalize(features.float(), dim=-1)  # (B, D)

    def text_embeddings(self, prompts):
        max_length = min(
            self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings
        )  # 77 for CLIP
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        features = self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
        ).pooler_output
        return F.normalize(features.float(), dim=-1)  # (B, D)


class PickScore(ClipReward):
    """PickScore v1: a CLIP-H/14 fine-tuned on Pick-a-Pic preferences; score = logit_scale.exp() * cos."""

    name = "pickscore"
    display_name = "PickScore"
    default_model = "yuvalkirstain/PickScore_v1"
    default_processor = LAION_CLIP_H_14
    default_weights = ((default_model, "config.json"),)

    def _score_batch(self, images, prompts):
        cosine = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)  # (B,)
        return self.model.logit_scale.exp().float() * cosine


class CLIPScore(ClipReward):
    """CLIPScore = weight * max(cos(image, text), 0); weight 100 by default (torchmetrics' scale)."""

    name = "clipscore"
    display_name = "CLIPScore"

    def __init__(self, path=None, processor_path=None, device=None, dtype=torch.float32, batch_size=16, weight=100.0):
        super().__init__(path=path, processor_path=processor_path, device=device, dtype=dtype, batch_size=batch_size)
        self.weight = weight

    def _score_batch(self, images, prompts):
        cosine = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)  # (B,)
        return self.weight * cosine.clamp_min(0)


AESTHETIC_HEAD_REPO = "camenduru/improved-aesthetic-predictor"
AESTHETIC_HEAD_FILENAME = "sac+logos+ava1-l14-linearMSE.pth"


def aesthetic_mlp(input_size):
    """The improved-aesthetic-predictor MLP; its ReLUs are commented out in the authors' code, so none here."""
    return torch.nn.Sequential(
        torch.nn.Linear(input_size, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    )


def load_aesthetic_head(head_path, input_size):
    state_dict = torch.load(head_path, map_location="cpu", weights_only=True)
    state_dict = {key.removeprefix("layers."): value for key, value in state_dict.items()}
    found_input_size = state_dict["0.weight"].shape[1] if "0.weight" in state_dict else None
    if found_input_size != input_size:
        raise RewardInputError(
            f"The aesthetic head {head_path!r} expects {found_input_size}-dimensional CLIP embeddings, but the CLIP "
            f"model produces {input_size}; the published head goes with {OPENAI_CLIP_L_14} (768)."
        )
    head = aesthetic_mlp(input_size)
    head.load_state_dict(state_dict)
    return head.eval()


class LaionAesthetic(ClipReward):
    """LAION aesthetic predictor v2 (sac+logos+ava1, linear MSE): roughly 1-10."""

    name = "aesthetic"
    display_name = "Aesthetic"
    # An aesthetic rating is no Bradley-Terry logit by training, but CaPO (Appendix B.1) applies the
    # Bradley-Terry model to VILA's 1-10 aesthetic score; we do the same for this one.
    kind = "bradley_terry"
    default_weights = ((OPENAI_CLIP_L_14, "config.json"), (AESTHETIC_HEAD_REPO, AESTHETIC_HEAD_FILENAME))
    local_weights = f"a transformers CLIP folder (with config.json, and {AESTHETIC_HEAD_FILENAME} beside it)"

    @classmethod
    def weights_source(cls, path=None):
        source = super().weights_source(path)
        if path is not None and not (Path(path) / AESTHETIC_HEAD_FILENAME).is_file():  # the head comes from the hub
            source.append(hub_source(AESTHETIC_HEAD_REPO, AESTHETIC_HEAD_FILENAME, cls.name))
        return source

    def __init__(
        self, path=None, head_path=None, processor_path=None, device=None, dtype=torch.float32, batch_size=16
    ):
        super().__init__(path=path, processor_path=processor_path, device=device, dtype=dtype, batch_size=batch_size)
        if head_path is None:
            local_head = Path(self.path) / AESTHETIC_HEAD_FILENAME
            if local_head.is_file():
                head_path = local_head
            else:
                from huggingface_hub import hf_hub_download

                head_path = hf_hub_download(AESTHETIC_HEAD_REPO, AESTHETIC_HEAD_FILENAME)
        self.head_path = str(head_path)
        self.head = load_aesthetic_head(self.head_path, self.model.config.projection_dim).to(self.device)

    def _score_batch(self, images, prompts):
        return self.head(self.image_embeddings(images)).squeeze(-1)  # (B,), prompts are not used
