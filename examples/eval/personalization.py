#!/usr/bin/env python
r"""Personalization scores of generate.py runs (MaPO Table 2): DINOv2 similarity to the target images, SigLIP score.

    python -m examples.eval.personalization --run_dirs generated_dog/dreambooth generated_dog/mapo \
        --target_dir dog --prompt_replace "sks dog=dog"

adds two columns to each run's `scores.csv` (the table score.py writes, one row per image), so that
compare.py reports them beside score.py's columns (Table 2's other metric, Aesthetics, is score.py's
`aesthetic`):

- `dinov2`: 100 x the mean, over the target images, of the cosine similarity between the DINOv2
  embedding of the generated image and that of each target image (embeddings as
  examples/mapo/measure_mismatch.py makes them: Dinov2Model's pooled output, the layer-normed CLS
  token, L2-normalised). One value per generated image, that is per seed; compare.py then averages
  over each prompt's seeds and over prompts. A target image scored against itself alone gives 100.
- `siglip`: 100 x sigmoid(exp(logit_scale) x cos(image, text) + logit_bias), the probability SigLIP's
  sigmoid loss was trained to give a matching pair, of each image against its own prompt (after
  --prompt_replace). Texts are padded to the text tower's full length (64 tokens for the published
  models) and given without an attention mask, as SigLIP was trained (its text tower pools the last
  position). Table 2's 61.6-73.6 is most likely this probability (the paper does not define its
  score); 100 x cos of matching SigLIP pairs sits near 10-20.

The target folder is a DreamBooth-style folder (what train_mapo_personalization_sdxl.py --instance_data_dir reads):
its png/jpg/jpeg/webp/bmp files are the targets; other files (captions, metadata.jsonl) are ignored,
image files that do not decode are skipped with a warning that counts them, and a folder without a
readable image stops the run.

Resumable as score.py is: scores already in scores.csv are kept, the table is rewritten after every
batch, a model with nothing left to score is not loaded, and other columns of the table are left as
they are. Which weights (and for dinov2, which target images, by content hash; for siglip, which
--prompt_replace) made each column is recorded in `scores.csv.sources.json`; a run asking for
other ones stops before loading anything.
"""

import argparse
import hashlib
import io
from functools import partial
from pathlib import Path

from examples.lib.cli import HelpFormatter, InputError, parse_checked_args, run_tool
from examples.lib.embeddings import embed, load_dinov2
from examples.lib.runs import check_run_dirs, describe_source, fill_column, open_runs, summary_lines


METRICS = ("dinov2", "siglip")
# the image files train_mapo_personalization_sdxl.py reads from an --instance_data_dir
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument(
        "--run_dirs", type=str, nargs="+", required=True, help="Folders written by generate.py (with manifest.jsonl)."
    )
    inputs.add_argument(
        "--target_dir",
        type=str,
        default=None,
        help="Folder of the subject's target images (the personalization training images); needed for dinov2.",
    )
    inputs.add_argument(
        "--metrics", type=str, nargs="+", default=list(METRICS), choices=METRICS, help="Columns to compute."
    )
    inputs.add_argument(
        "--scores_filename", type=str, default="scores.csv", help="Score table in each run folder (score.py's)."
    )
    inputs.add_argument(
        "--skip_missing_images",
        action="store_true",
        help="Leave images listed in the manifest but missing on disk unscored (counted) instead of stopping.",
    )

    models = parser.add_argument_group("models")
    models.add_argument(
        "--dinov2_model_name_or_path",
        type=str,
        default="facebook/dinov2-base",
        help="DINOv2 (transformers Dinov2Model with its image processor): a hub id or a local folder.",
    )
    models.add_argument(
        "--siglip_model_name_or_path",
        type=str,
        default="google/siglip-so400m-patch14-384",
        help="SigLIP (transformers SiglipModel with its tokenizer and image processor): a hub id or a local folder.",
    )
    models.add_argument(
        "--prompt_replace",
        type=str,
        nargs="*",
        default=[],
        metavar="OLD=NEW",
        help='Replacements applied, in order, to each prompt before SigLIP reads it, e.g. "sks dog=dog": the '
        "subject's identifier means nothing to SigLIP. The prompt column itself is left unchanged.",
    )

    compute = parser.add_argument_group("compute")
    compute.add_argument("--batch_size", type=int, default=16, help="Images per forward pass.")
    compute.add_argument(
        "--device", type=str, default=None, help="Device of the models (default: cuda if available, else cpu)."
    )
    return parse_checked_args(parser, check_args, input_args)


def check_args(args):
    """Refuse bad settings before any image is read or model loaded; parse --prompt_replace."""
    if args.batch_size <= 0:
        raise InputError(f"--batch_size must be positive, got {args.batch_size}.")
    if len(set(args.metrics)) != len(args.metrics):
        raise InputError(f"--metrics lists a metric twice: {args.metrics}.")
    if "dinov2" in args.metrics and args.target_dir is None:
        raise InputError("dinov2 compares each image with the subject's target images: give --target_dir FOLDER.")
    if args.target_dir is not None and not Path(args.target_dir).is_dir():
        raise InputError(
            f"--target_dir {args.target_dir!r} is not a folder; expected a folder of the subject's target images."
        )
    args.prompt_replace = parse_prompt_replace(args.prompt_replace)
    check_run_dirs(args.run_dirs)


def parse_prompt_replace(items):
    """[(old, new)] from OLD=NEW strings (split at the first =)."""
    pairs = []
    for item in items:
        old, separator, new = item.partition("=")
        if not separator or not old:
            raise InputError(f'--prompt_replace entries look like OLD=NEW (e.g. "sks dog=dog"), got {item!r}.')
        pairs.append((old, new))
    return pairs


def siglip_prompt(prompt, replacements):
    for old, new in replacements:
        prompt = prompt.replace(old, new)
    return " ".join(prompt.split())


def read_target_images(target_dir):
    """(names, RGB PIL images, sha256 of the names and bytes of those images, [(name, reason)] of image files that
    do not decode); files without an image suffix, hidden files and sub-folders are not looked at."""
    from PIL import Image, UnidentifiedImageError

    names, images, skipped, digest = [], [], [], hashlib.sha256()
    for child in sorted(Path(target_dir).iterdir()):
        if child.is_dir() or child.name.startswith(".") or child.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        data = child.read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as opened:
                image = opened.convert("RGB")  # decodes every pixel: a truncated file fails here
        except UnidentifiedImageError:
            skipped.append((child.name, "not an image format PIL reads"))
            continue
        except Exception as error:  # any other decoder error (a truncated file): skip, count and say why
            skipped.append((child.name, f"{type(error).__name__}: {error}"))
            continue
        names.append(child.name)
        images.append(image)
        digest.update(f"{child.name}\0".encode())
        digest.update(hashlib.sha256(data).digest())
    if not images:
        found = f"{len(skipped)} image files that do not decode" if skipped else "no image file"
        raise InputError(
            f"--target_dir {str(target_dir)!r} holds {found}; expected the subject's target images "
            f"({'/'.join(suffix[1:] for suffix in IMAGE_SUFFIXES)})."
        )
    return names, images, digest.hexdigest(), skipped


def model_source(name_or_path, metric):
    """The weights record of a model folder or hub id, as score.py keeps them: found without loading the model."""
    from examples.rewards.base import HUB_REPO_ID, RewardInputError, hash_local_weights, hub_source

    flag = f"--{metric}_model_name_or_path"
    path = Path(name_or_path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise InputError(f"{flag} {name_or_path!r} is a folder without config.json; expected a model folder.")
        return {"path": str(path.resolve()), "sha256": hash_local_weights(path)}
    if not HUB_REPO_ID.match(name_or_path):
        raise InputError(f"{flag} {name_or_path!r} does not exist; expected a model folder or a hub id.")
    try:
        return hub_source(name_or_path, "config.json", metric)
    except RewardInputError:
        raise InputError(
            f"The {metric} model {name_or_path!r} is neither in the local hub cache nor reachable (offline?); "
            f"download it once online, or pass {flag} with a local copy."
        ) from None


def dinov2_similarity(generated_embeddings, target_embeddings):
    """100 x the mean cosine similarity of each generated image to the target images: (B, D), (T, D) -> (B,).

    Both inputs are L2-normalised, so a cosine is a dot product."""
    return 100 * (generated_embeddings @ target_embeddings.T).mean(dim=1)


def siglip_scores(model, tokenizer, image_processor, images, prompts, device):
    """100 x sigmoid(exp(logit_scale) * cos + logit_bias) of each image with its own prompt, (B,)."""
    import torch
    import torch.nn.functional as F

    # SigLIP was trained on texts padded to the full length, without a mask; its text tower pools the last position
    length = model.config.text_config.max_position_embeddings
    input_ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")[
        "input_ids"
    ]
    pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        image_embeddings = model.get_image_features(pixel_values=pixel_values.to(device)).pooler_output
        text_embeddings = model.get_text_features(input_ids=input_ids.to(device)).pooler_output
    cosine = (F.normalize(image_embeddings.float(), dim=-1) * F.normalize(text_embeddings.float(), dim=-1)).sum(-1)
    logits = model.logit_scale.exp().float() * cosine + model.logit_bias.float()  # (B,)
    return 100 * torch.sigmoid(logits)


def first_line(error):
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def load_siglip_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except ImportError as error:  # the published SigLIP tokenizer is a SentencePiece model
        raise InputError(
            f"SigLIP's tokenizer ({path}) needs a package that is not installed: {first_line(error)} "
            "Install it (pip install sentencepiece) and rerun."
        ) from error


def load_siglip(path, device):
    from transformers import AutoImageProcessor, SiglipModel

    tokenizer, image_processor = load_siglip_tokenizer(path), AutoImageProcessor.from_pretrained(path)
    return SiglipModel.from_pretrained(path).to(device).eval(), tokenizer, image_processor


class Scorer:
    """One metric's model: score(image paths, prompts) and score_batch(PIL images, prompts) -> tensor (B,)."""

    @classmethod
    def loaded(cls, metric, args, target_images, source):
        """A Scorer with its model loaded; InputError when the model cannot load."""
        scorer = cls(metric, args, target_images)
        try:
            scorer.load()
        except OSError as error:  # e.g. a tokenizer or processor file missing from a local copy
            raise InputError(
                f"Could not load {metric} from {describe_source(source)}: {first_line(error)} "
                f"Expected a complete model; pass --{metric}_model_name_or_path with a local copy."
            ) from error
        return scorer

    def __init__(self, metric, args, target_images):
        from examples.rewards.base import resolve_device

        self.metric, self.args, self.target_images = metric, args, target_images
        self.device = resolve_device(args.device)

    def load(self):
        if self.metric == "dinov2":
            self.model, self.processor = load_dinov2(self.args.dinov2_model_name_or_path, self.device)
            self.target_embeddings = self.embed(self.target_images)  # (T, D), once per run of the tool
        else:
            self.model, self.tokenizer, self.processor = load_siglip(self.args.siglip_model_name_or_path, self.device)

    def embed(self, images):
        return embed(self.model, self.processor, images, self.args.batch_size, self.device)

    def score(self, paths, prompts):
        from PIL import Image

        images = []
        for path in paths:
            with Image.open(path) as opened:
                images.append(opened.convert("RGB"))
        return self.score_batch(images, prompts)

    def score_batch(self, images, prompts):
        if self.metric == "dinov2":
            return dinov2_similarity(self.embed(images), self.target_embeddings)
        texts = [siglip_prompt(prompt, self.args.prompt_replace) for prompt in prompts]
        return siglip_scores(self.model, self.tokenizer, self.processor, images, texts, self.device)


def metric_sources(args, target_digest):
    """What made each column: the model's weights; for dinov2 the target images, for siglip --prompt_replace."""
    sources = {}
    if "dinov2" in args.metrics:
        targets = {"path": str(Path(args.target_dir).resolve()), "sha256": target_digest}
        sources["dinov2"] = [model_source(args.dinov2_model_name_or_path, "dinov2"), targets]
    if "siglip" in args.metrics:
        sources["siglip"] = [model_source(args.siglip_model_name_or_path, "siglip")]
        if args.prompt_replace:
            sources["siglip"].append({"prompt_replace": [list(pair) for pair in args.prompt_replace]})
    return sources


def main(args):
    runs = open_runs(args)
    target_images, target_digest = [], None
    if "dinov2" in args.metrics:
        target_names, target_images, target_digest, skipped = read_target_images(args.target_dir)
        print(f"targets: {len(target_images)} images in {args.target_dir}: {target_names}")
        if skipped:
            print(
                f"warning: skipped {len(skipped)} image files of {args.target_dir} that do not decode: "
                + "; ".join(f"{name} ({reason})" for name, reason in skipped),
                flush=True,
            )
    # Which weights (and targets) each column would come from, before any model is loaded: unreachable weights
    # stop here, and so do other ones than those that made the scores already in a table.
    sources = metric_sources(args, target_digest)
    for run in runs:
        for metric in args.metrics:
            run.check_source(metric, sources[metric], adopt_unrecorded=False)
        for metric in args.metrics:
            run.add_reward_column(metric)
            run.sources[metric] = sources[metric]

    if "siglip" in args.metrics and any(run.pending("siglip") for run in runs):
        load_siglip_tokenizer(args.siglip_model_name_or_path)  # a missing package stops the run before DINOv2 works

    summary = {}
    for metric in args.metrics:
        model_source = sources[metric][:1]  # the weights, without the targets or --prompt_replace
        load_scorer = partial(Scorer.loaded, metric, args, target_images, model_source)
        summary[metric] = fill_column(runs, metric, load_scorer, args.batch_size)

    for run in runs:
        run.save()
    lines = summary_lines("personalization", runs, summary)
    for run in runs:
        means = []
        for metric in args.metrics:
            values = [scores[metric] for scores in run.scores.values() if metric in scores]
            if values:
                means.append(f"{metric} {sum(values) / len(values):.2f}")
        lines.append(f"   {run.scores_path}: mean over images {', '.join(means)}")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    run_tool(main, parse_args)
