"""MPS, the Multi-dimensional Preference Score (Zhang et al., CVPR 2024), rebuilt on transformers' CLIP.

MPS is the CLIP ViT-H/14 of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` fine-tuned on MHP preferences, with a
"cross model" that lets the image tokens attend to the prompt tokens that matter for a condition. For the
overall score the condition is OVERALL_CONDITION below. For one image and its prompt the authors compute
(Kwai-Kolors/MPS: `trainer/models/clip_model.py`, `trainer/models/cross_modeling.py`, and the scorer
`infer_one_sample` of `eval_overall_mps_on_hpdv2.py` / `eval_overall_mps_on_imagereward.py`):

    text_tokens  = text_projection(text tower(prompt))             # (77, D): every token, after the final LayerNorm
    text_pooled  = text_projection(its first end-of-text token)    # (D,): CLIP's usual text embedding
    condition    = text_projection(text tower(OVERALL_CONDITION))  # (77, D)
    image_tokens = visual_projection(image tower(image))           # (257, D): every token, before post_layernorm
    relevance    = max over condition tokens of condition @ text_tokens.T, divided by its maximum    # (77,)
    mask         = 0 where relevance > 0.3, -inf elsewhere         # the prompt tokens the condition is about
    image_feature = cross_model(image_tokens, text_tokens, mask)[class token]
    MPS          = logit_scale.exp() * cos(text_pooled, image_feature)

- The cross model (their `Cross_model(dim=1024, layer_num=4, heads=16)`, after lucidrains' CoCa) is 4 layers of
  [cross-attention from the image tokens to the masked prompt tokens, plus a parallel SwiGLU feed-forward] then
  [self-attention of the image tokens with rotary position embeddings, plus a parallel SwiGLU feed-forward], each
  residual around a pre-LayerNorm with a learned scale and a zero bias. Attention is multi-query: 16 query heads
  of 64 share one key/value head of 64; no linear layer has a bias; no causal mask.
- Prompts and the condition are tokenized with the CLIP BPE of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`, padded
  to 77 tokens and passed without an attention mask, so the padding tokens are among the prompt tokens the cross
  model may attend to, as in the authors' code. Images go through that repository's CLIPImageProcessor
  (shortest side to 224, bicubic, centre crop, OpenAI mean/std).
- Two readings are fixed here. (1) The threshold: the authors' scorer uses 0.3, the forward of their training
  module (which their README's two-image example calls) 0.01; we take the scorer's 0.3 (`condition_threshold`
  changes it). (2) Their relevance is divided by its maximum over the whole batch, and their scorer is called
  on one image at a time; we divide per image, so that a score does not depend on the rest of its batch.
- Units: the score as the model outputs it, logit_scale.exp() (the checkpoint's learned temperature) times a
  cosine. MPS is trained with a softmax over the scores of two images, so it is a Bradley-Terry logit.

Weights: the authors publish one file, `MPS_overall_checkpoint.pth`, on Google Drive (linked from the README of
https://github.com/Kwai-Kolors/MPS), not on the hub. It is a whole pickled model (their scorer calls
`torch.load(path)` and gets their module back), which `weights_only=True` refuses; this loader reads state dicts
only (safetensors, or `torch.load(..., weights_only=True)`). Convert the file once:

    python -m examples.rewards.convert_mps --checkpoint MPS_overall_checkpoint.pth --output_dir models/mps
    python -m examples.eval.score --run_dirs generated/sdxl --reward_models mps --reward_model_paths mps=models/mps

The conversion (`convert_checkpoint`) is the one place that reads a pickled model, and it runs nothing the file
names: its unpickler resolves only torch's `weights_only` allow-list (tensor and parameter rebuild functions,
storages, dtypes, OrderedDict) and inert empty modules standing in for the classes that hold the weights (the
authors' `trainer.*`, those of the transformers version they pickled with, torch.nn's), so neither their
repository nor its pinned versions are needed. Any other global (`os.system`, `builtins.eval`, ...) stops the
conversion with one line that names it, before it is built. It writes
`MPS_overall_state_dict.safetensors`: the tensors of their module, `model.*` (the CLIP model) and
`cross_model.*`, under their own names, which this module's classes keep. The CLIP config, tokenizer and image
processor come from `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`, or from the folder when it holds them (the tiny
stand-in does). The forward pass is tested against a direct re-implementation of the authors' code on the
same weights (tests/tools/test_mps.py).
"""

import pickle
import re
import types
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch._weights_only_unpickler import _get_allowed_globals

from examples.lib.files import write_atomically

from .base import RewardInputError, RewardModel
from .clip_rewards import LAION_CLIP_H_14, has_processor_files


MPS_GITHUB = "https://github.com/Kwai-Kolors/MPS"
MPS_CHECKPOINT_FILENAME = "MPS_overall_checkpoint.pth"  # the authors' file: a pickled model
MPS_STATE_DICT_FILENAME = "MPS_overall_state_dict.safetensors"  # what convert_checkpoint writes
STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
OVERALL_CONDITION = (
    "light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, structure, "
    "instance, texture, quantity, attributes, position, number, location, word, things."
)
CONDITION_THRESHOLD = 0.3  # the authors' scorer (their training forward uses 0.01)
CONVERT_COMMAND = "python -m examples.rewards.convert_mps --checkpoint FILE --output_dir DIR"
NO_HUB_WEIGHTS = (
    f"MPS has no weights on the Hugging Face hub: download {MPS_CHECKPOINT_FILENAME} from the link in the README "
    f"of {MPS_GITHUB}, convert it once ({CONVERT_COMMAND}) and pass DIR (score.py: --reward_model_paths mps=DIR)."
)


class ScaleOnlyLayerNorm(nn.Module):
    """LayerNorm with a learned scale and a zero bias; the bias is a buffer, in the state dict as in theirs."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


class SwiGLU(nn.Module):
    def forward(self, x):
        x, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * x


class Residual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, *args):
        return self.fn(x, *args) + x


class RotaryEmbedding(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, length):
        positions = torch.arange(length, device=self.inv_freq.device, dtype=self.inv_freq.dtype)
        angles = positions[:, None] * self.inv_freq[None, :]
        return torch.cat((angles, angles), dim=-1)  # (length, dim)


def apply_rotary(x, angles):
    first, second = x.chunk(2, dim=-1)
    return x * angles.cos() + torch.cat((-second, first), dim=-1) * angles.sin()


def split_heads(x, heads):
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, N, H * Dh) -> (B, H, N, Dh)


def merge_heads(x):
    return x.transpose(1, 2).flatten(2)  # (B, H, N, Dh) -> (B, N, H * Dh)


def multi_query_attention(queries, keys, values, mask=None):
    """queries (B, H, N, Dh), already scaled; one key/value head (B, T, Dh) for all of them; additive mask (B, T)."""
    scores = queries @ keys.unsqueeze(1).transpose(-1, -2)  # (B, H, N, T)
    if mask is not None:
        scores = scores + mask[:, None, None, :]
    return merge_heads(scores.softmax(dim=-1) @ values.unsqueeze(1))  # (B, N, H * Dh)


class CrossAttention(nn.Module):
    """The image tokens attend to the prompt tokens the mask keeps; a SwiGLU feed-forward runs beside it."""

    def __init__(self, dim, heads, dim_head, ff_mult):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        self.norm = ScaleOnlyLayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff = nn.Sequential(
            nn.Linear(dim, 2 * ff_mult * dim, bias=False), SwiGLU(), nn.Linear(ff_mult * dim, dim, bias=False)
        )

    def forward(self, x, context, mask):
        x = self.norm(x)  # the context (prompt tokens) is not normalised
        keys, values = self.to_kv(context).chunk(2, dim=-1)
        attended = multi_query_attention(split_heads(self.to_q(x), self.heads) * self.scale, keys, values, mask)
        return self.to_out(attended) + self.ff(x)


class ParallelTransformerBlock(nn.Module):
    """Self-attention with rotary embeddings and a SwiGLU feed-forward, from one fused projection."""

    def __init__(self, dim, heads, dim_head, ff_mult):
        super().__init__()
        self.heads, self.scale = heads, dim_head**-0.5
        self.norm = ScaleOnlyLayerNorm(dim)
        self.rotary_emb = RotaryEmbedding(dim_head)
        self.split_sizes = (heads * dim_head, dim_head, dim_head, 2 * ff_mult * dim)  # q, k, v, feed-forward in
        self.fused_attn_ff_proj = nn.Linear(dim, sum(self.split_sizes), bias=False)
        self.attn_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff_out = nn.Sequential(SwiGLU(), nn.Linear(ff_mult * dim, dim, bias=False))

    def forward(self, x):
        x = self.norm(x)
        queries, keys, values, ff = self.fused_attn_ff_proj(x).split(self.split_sizes, dim=-1)
        angles = self.rotary_emb(x.shape[1])
        queries = apply_rotary(split_heads(queries, self.heads), angles) * self.scale
        attended = multi_query_attention(queries, apply_rotary(keys, angles), values)
        return self.attn_out(attended) + self.ff_out(ff)


class CrossModel(nn.Module):
    """The authors' `Cross_model`: image tokens (B, N, D), prompt tokens (B, T, D), mask (B, T) -> (B, N, D)."""

    def __init__(self, dim, layers, heads, dim_head, ff_mult):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    Residual(CrossAttention(dim, heads, dim_head, ff_mult)),
                    Residual(ParallelTransformerBlock(dim, heads, dim_head, ff_mult)),
                ]
            )
            for _ in range(layers)
        )

    def forward(self, image_tokens, text_tokens, mask):
        for cross_attention, self_attention in self.layers:
            image_tokens = self_attention(cross_attention(image_tokens, text_tokens, mask))
        return image_tokens


class MPSNetwork(nn.Module):
    """The authors' module: `model` (a transformers CLIPModel) and `cross_model`, with their tensor names."""

    def __init__(self, clip_config, layers=4, heads=16, dim_head=64, ff_mult=4):
        super().__init__()
        from transformers import CLIPModel

        self.model = CLIPModel(clip_config)
        self.cross_model = CrossModel(clip_config.projection_dim, layers, heads, dim_head, ff_mult)

    def text_tokens(self, input_ids):
        """(B, 77) token ids -> every token projected (B, 77, D), and the end-of-text token projected (B, D)."""
        text = self.model.text_model(input_ids=input_ids)  # no attention mask: padding takes part, as in theirs
        return self.model.text_projection(text.last_hidden_state), self.model.text_projection(text.pooler_output)

    def image_tokens(self, pixel_values):
        """(B, 3, S, S) -> every token of the last layer projected (B, 1 + patches, D), without post_layernorm."""
        return self.model.visual_projection(self.model.vision_model(pixel_values=pixel_values).last_hidden_state)

    @staticmethod
    def condition_mask(text_tokens, condition_tokens, threshold):
        """0 for the prompt tokens related to the condition, -inf for the others: (B, T)."""
        relevance = torch.einsum("bcd,btd->bct", condition_tokens, text_tokens).amax(dim=1)  # (B, T)
        relevance = relevance / relevance.amax(dim=-1, keepdim=True)  # per image (see the module docstring)
        return torch.where(relevance > threshold, 0.0, float("-inf")).to(text_tokens.dtype)

    def forward(self, pixel_values, input_ids, condition_tokens, threshold=CONDITION_THRESHOLD):
        """condition_tokens: `text_tokens(condition ids)[0]`, (B, T, D) or (1, T, D). Returns MPS (B,) in float32."""
        text_tokens, text_pooled = self.text_tokens(input_ids)
        mask = self.condition_mask(text_tokens, condition_tokens.expand_as(text_tokens), threshold)
        image_feature = self.cross_model(self.image_tokens(pixel_values), text_tokens, mask)[:, 0]  # class token
        cosine = (F.normalize(text_pooled.float(), dim=-1) * F.normalize(image_feature.float(), dim=-1)).sum(-1)
        return self.model.logit_scale.exp().float() * cosine  # (B,)


def cross_model_shape(state_dict):
    """(layers, heads, dim_head, ff_mult) of the cross model whose tensors `state_dict` holds."""
    layers = len({m.group(1) for key in state_dict for m in [re.match(r"cross_model\.layers\.(\d+)\.", key)] if m})
    dim_head = state_dict["cross_model.layers.0.0.fn.to_kv.weight"].shape[0] // 2
    heads = state_dict["cross_model.layers.0.0.fn.to_q.weight"].shape[0] // dim_head
    ff_in, dim = state_dict["cross_model.layers.0.0.fn.ff.0.weight"].shape
    return layers, heads, dim_head, ff_in // (2 * dim)


def check_mps_state_dict(state_dict, path):
    """A {name: tensor} dict with the authors' `model.*` and `cross_model.*` names, or a RewardInputError."""
    is_tensor_dict = isinstance(state_dict, dict) and all(torch.is_tensor(value) for value in state_dict.values())
    needed = ("model.logit_scale", "cross_model.layers.0.0.fn.to_kv.weight", "cross_model.layers.0.0.fn.ff.0.weight")
    if not is_tensor_dict or any(key not in state_dict for key in needed):
        raise RewardInputError(
            f"{str(path)!r} is not an MPS state dict (expected tensors named model.* and cross_model.*, as "
            f"{CONVERT_COMMAND} writes them); convert the authors' {MPS_CHECKPOINT_FILENAME} with that command."
        )
    return state_dict


def load_mps_state_dict(path):
    """A state dict file (.safetensors, or .pt/.pth/.bin read with weights_only=True) -> {name: tensor}."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return check_mps_state_dict(load_file(path), path)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only refuses the classes of a pickled model
        raise RewardInputError(
            f"{str(path)!r} is a pickled model, not a state dict, and is not unpickled here; convert it once "
            f"with {CONVERT_COMMAND.replace('FILE', str(path))} and pass DIR (see examples/rewards/mps.py)."
        ) from error
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if isinstance(state_dict, dict):  # "module." prefixes: saved from DistributedDataParallel
        state_dict = {str(key).removeprefix("module."): value for key, value in state_dict.items()}
    return check_mps_state_dict(state_dict, path)


class _AbsentClass(nn.Module):
    """Stands in for a class that holds weights (the authors' `trainer.*`, which this environment lacks, and
    transformers' and torch.nn's, which it may have in another version): it takes the pickled attributes
    (parameters, buffers, submodules), all that `state_dict()` reads, and none of the real class's code runs."""

    def __init__(self, *args, **kwargs):
        super().__init__()


class _AllowListUnpickler(pickle.Unpickler):
    """Resolves only what a pickled model's weights need; any other global is refused before it is built.

    find_class is the one door through which a pickle reaches code (GLOBAL, STACK_GLOBAL and the EXT codes all
    pass it), so what it returns is all the file can call or build: torch's own `weights_only` allow-list, or an
    inert stand-in. Names are mapped from Python 2 first, as pickle does, since torch.save writes protocol 2.
    """

    # the authors' classes, transformers', torch.nn's, and the activation functions modules keep (F.gelu is
    # torch._C._nn.gelu): kept as attributes, never called
    STAND_IN_PREFIXES = ("trainer.", "transformers.", "torch.nn.", "torch._C._nn.")

    def find_class(self, module, name):
        if (module, name) in NAME_MAPPING:
            module, name = NAME_MAPPING[(module, name)]
        elif module in IMPORT_MAPPING:
            module = IMPORT_MAPPING[module]
        full_name = f"{module}.{name}"
        if full_name in _get_allowed_globals():
            return _get_allowed_globals()[full_name]
        if full_name.startswith(self.STAND_IN_PREFIXES):
            return type(name, (_AbsentClass,), {"__module__": module})
        raise RewardInputError(
            f"names {full_name}, which is neither a tensor, a storage nor a class that holds weights; it is not a "
            f"checkpoint this converter accepts (the authors' pickled {MPS_CHECKPOINT_FILENAME}) and was not "
            "unpickled further."
        )


def convert_checkpoint(checkpoint, output_dir):
    """The authors' pickled MPS_overall_checkpoint.pth -> output_dir/MPS_overall_state_dict.safetensors.

    weights_only=True would refuse the stand-ins, and takes no pickle_module, so this loads with weights_only=False
    and an Unpickler that allows less than weights_only=True does: a file naming anything else is refused.
    """
    from safetensors.torch import save_file

    allow_list_pickle = types.ModuleType("allow_list_pickle")  # torch.load's pickle_module: our Unpickler
    allow_list_pickle.Unpickler = _AllowListUnpickler
    allow_list_pickle.load = lambda file, **kwargs: _AllowListUnpickler(file, **kwargs).load()
    try:
        loaded = torch.load(checkpoint, map_location="cpu", weights_only=False, pickle_module=allow_list_pickle)
    except RewardInputError as refused:
        raise RewardInputError(f"--checkpoint {str(checkpoint)!r} {refused}") from None
    except Exception as error:  # a text file, a truncated zip or pickle: torch and pickle raise many kinds
        raise RewardInputError(
            f"--checkpoint {str(checkpoint)!r} could not be read as a pickled checkpoint ({type(error).__name__}: "
            f"{' '.join(str(error).split())[:200]}); expected the authors' whole {MPS_CHECKPOINT_FILENAME} (a cut "
            "download?)."
        ) from None
    state_dict = loaded.state_dict() if isinstance(loaded, nn.Module) else loaded
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if isinstance(state_dict, dict):
        state_dict = {str(key).removeprefix("module."): value for key, value in state_dict.items()}
    check_mps_state_dict(state_dict, checkpoint)
    output_path = Path(output_dir) / MPS_STATE_DICT_FILENAME
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().clone().contiguous() for key, value in state_dict.items()}
    write_atomically(output_path, lambda path: save_file(tensors, path))
    return output_path


class MPS(RewardModel):
    """MPS (overall): logit_scale.exp() * cos(prompt embedding, condition-masked cross-attended image embedding).

    `path`: a state dict file, or a folder with `MPS_overall_state_dict.safetensors` (or one other state dict
    file) and optionally the CLIP config.json, tokenizer and preprocessor_config.json; there is no hub copy, so
    None is an error that says how to get and convert the authors' checkpoint. `processor_path`: where the
    config, tokenizer and image processor come from when the folder lacks them (default the authors', LAION's
    CLIP-ViT-H-14). `condition_threshold`: see the module docstring.
    """

    name = "mps"
    display_name = "MPS"
    kind = "bradley_terry"  # trained with a softmax over logit_scale * cos of two images: a logit-scale reward
    local_weights = f"an MPS state dict file, or a folder with {MPS_STATE_DICT_FILENAME} (from {CONVERT_COMMAND})"

    @classmethod
    def weights_source(cls, path=None):
        if path is None:
            raise RewardInputError(NO_HUB_WEIGHTS)
        return super().weights_source(path)

    def __init__(
        self,
        path=None,
        processor_path=None,
        device=None,
        dtype=torch.float32,
        batch_size=16,
        condition_threshold=CONDITION_THRESHOLD,
    ):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor
        from transformers.initialization import no_init_weights

        if path is None:
            raise RewardInputError(NO_HUB_WEIGHTS)
        state_dict_path = self.find_state_dict(Path(path))
        folder = Path(path) if Path(path).is_dir() else None
        has_clip_files = folder is not None and has_processor_files(folder) and (folder / "config.json").is_file()
        self.path = str(state_dict_path)
        self.processor_path = str(processor_path or (folder if has_clip_files else LAION_CLIP_H_14))
        self.condition_threshold = condition_threshold
        self.tokenizer = AutoTokenizer.from_pretrained(self.processor_path)
        self.image_processor = CLIPImageProcessor.from_pretrained(self.processor_path)
        state_dict = load_mps_state_dict(state_dict_path)
        with no_init_weights():  # every weight is loaded below (a missing one is an error)
            network = MPSNetwork(CLIPConfig.from_pretrained(self.processor_path), *cross_model_shape(state_dict))
        missing, unexpected = network.load_state_dict(state_dict, strict=False)
        missing = [key for key in missing if not key.endswith("position_ids")]
        unexpected = [key for key in unexpected if not key.endswith("position_ids")]  # a buffer in older CLIPs
        if missing or unexpected:
            raise RewardInputError(
                f"{self.path!r} does not fit MPS on the CLIP config of {self.processor_path!r}: missing {missing[:5]} "
                f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}); expected the authors' overall "
                "checkpoint, converted, with the config of laion/CLIP-ViT-H-14-laion2B-s32B-b79K."
            )
        self.network = network.to(device=self.device, dtype=self.dtype).eval()
        self.context_length = min(
            self.tokenizer.model_max_length, network.model.config.text_config.max_position_embeddings
        )
        with torch.no_grad():  # the same for every prompt: computed once
            self.condition_tokens = self.network.text_tokens(self.input_ids([OVERALL_CONDITION]).to(self.device))[0]

    @staticmethod
    def find_state_dict(path):
        if path.is_file():
            return path
        if not path.is_dir():
            raise RewardInputError(f"MPS path {str(path)!r} does not exist; expected {MPS.local_weights}.")
        if (path / MPS_STATE_DICT_FILENAME).is_file():
            return path / MPS_STATE_DICT_FILENAME
        candidates = sorted(p for p in path.iterdir() if p.suffix in STATE_DICT_SUFFIXES)
        if len(candidates) != 1:
            raise RewardInputError(
                f"Expected {MPS_STATE_DICT_FILENAME} (or one state dict file) in the MPS folder {str(path)!r}, "
                f"found {[p.name for p in candidates]}; convert the authors' checkpoint with {CONVERT_COMMAND}."
            )
        return candidates[0]

    def input_ids(self, texts):
        """Texts -> (N, 77) ids, padded to the full context as the authors tokenize; no attention mask is used."""
        return self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt"
        )["input_ids"]

    def _score_batch(self, images, prompts):
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return self.network(
            pixel_values.to(self.device, self.dtype),
            self.input_ids(prompts).to(self.device),
            self.condition_tokens,
            self.condition_threshold,
        )
