"""The interface every reward model implements, and the helpers they share."""

import hashlib
import re
from pathlib import Path

import torch
from PIL import Image


KINDS = ("bradley_terry", "probability")


class RewardInputError(ValueError):
    """Bad images, prompts or checkpoint folders: the message says what was expected, what was found and what to do."""


HUB_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def hash_local_weights(path):
    """sha256 of a weights file, or of a folder's files (names and contents, sorted; hidden files skipped)."""
    path = Path(path)
    if path.is_file():
        files, root = [path], path.parent
    else:
        files, root = sorted(f for f in path.rglob("*") if f.is_file()), path
    digest = hashlib.sha256()
    for file in files:
        relative = file.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):  # e.g. the .cache/ of `hf download --local-dir`
            continue
        digest.update(f"{relative.as_posix()}\0".encode())
        with open(file, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def hub_source(repo_id, filename, reward_name):
    """{"hub": repo_id, "revision": the commit loading would use: the hub's newest online, the cached one offline}."""
    from huggingface_hub import HfApi, is_offline_mode, try_to_load_from_cache

    if not is_offline_mode():
        try:
            return {"hub": repo_id, "revision": HfApi().model_info(repo_id).sha}
        except Exception:  # the hub cannot be reached: loading falls back to the cache, and so do we
            pass
    cached = try_to_load_from_cache(repo_id, filename)
    if isinstance(cached, str):
        commit = Path(cached).parents[len(Path(filename).parts) - 1].name  # .../snapshots/<commit>/<filename>
        return {"hub": repo_id, "revision": commit}
    raise RewardInputError(
        f"The {reward_name} weights {repo_id!r} are neither in the local hub cache nor reachable "
        f"({'HF_HUB_OFFLINE is set' if is_offline_mode() else 'the hub did not answer'}); "
        f"download them once online, or give the path of a local copy "
        f"(score.py: --reward_model_paths {reward_name}=PATH)."
    )


def to_rgb_image(image):
    """A PIL image, or the path of an image file -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise RewardInputError(
                f"Image file {str(path)!r} does not exist; expected a path to an image (or a PIL image)."
            )
        with Image.open(path) as opened:
            return opened.convert("RGB")
    raise RewardInputError(f"Expected a PIL image or an image path, found {type(image).__name__}.")


def resolve_torch_dtype(dtype):
    """`torch.float16`, "fp16", "float16", "bf16", ... -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "no": torch.float32,
        "fp16": torch.float16,
        "float16": torch.float16,
        "half": torch.float16,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
    }
    if dtype not in names:
        raise RewardInputError(f"Unknown dtype {dtype!r}; expected one of {sorted(names)}.")
    return names[dtype]


def resolve_device(device):
    """None -> "cuda" when a GPU is visible, else "cpu"."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class RewardModel:
    """A text-to-image reward: `score(images, prompts)` -> float32 tensor of shape (N,), on the CPU.

    Subclasses set `name` (the registry key and score-table column), `display_name`, `kind` and
    implement `_score_batch`. `kind` tells how two scores of the same prompt become a preference
    probability (CaPO Eq. 2 and Eq. 28; see `preference_probability`):

    - "bradley_terry": the score is a logit-scale reward, P(x > x') = sigmoid(s - s');
    - "probability":   the score is a probability in [0, 1], P(x > x') = s / (s + s').
    """

    name = None
    display_name = None
    kind = None
    # (hub repository, a file it must hold) for each repository the published weights come from
    default_weights = ()
    # the file that a hub repository given as `path` must hold; None: `path` must be local
    hub_weights_file = None
    local_weights = "a local copy of the weights"  # what a local `path` is, for error messages

    @classmethod
    def weights_source(cls, path=None):
        """Which weights `cls(path=path)` would load, without loading them: a list of
        {"hub": repository, "revision": commit} and {"path": absolute path, "sha256": content hash}.

        Unreachable weights (not cached offline, a local path that does not exist) are a RewardInputError.
        """
        if path is None:
            return [hub_source(repo, filename, cls.name) for repo, filename in cls.default_weights]
        if Path(path).exists():
            return [{"path": str(Path(path).resolve()), "sha256": hash_local_weights(path)}]
        if cls.hub_weights_file is not None and HUB_REPO_ID.match(str(path)):
            try:
                return [hub_source(str(path), cls.hub_weights_file, cls.name)]
            except RewardInputError as error:
                raise RewardInputError(
                    f"The {cls.name} weights {str(path)!r} are not a local path, and no hub repository of that name "
                    f"is cached or reachable; expected {cls.local_weights}. Check the path, or download the "
                    "repository once online."
                ) from error
        raise RewardInputError(
            f"The {cls.name} weights {str(path)!r} do not exist; expected {cls.local_weights}. "
            f"Check the path (score.py: --reward_model_paths {cls.name}=PATH)."
        )

    def __init__(self, device=None, dtype=torch.float32, batch_size=16):
        if self.kind not in KINDS:
            raise TypeError(f"{type(self).__name__}.kind must be one of {KINDS}, found {self.kind!r}.")
        if batch_size <= 0:
            raise RewardInputError(f"batch_size must be positive, got {batch_size}.")
        self.device = resolve_device(device)
        self.dtype = resolve_torch_dtype(dtype)
        self.batch_size = batch_size

    def _score_batch(self, images, prompts):
        """RGB PIL images and their prompts (same length) -> tensor (B,)."""
        raise NotImplementedError

    @torch.no_grad()
    def score(self, images, prompts, batch_size=None):
        """Score each image against its own prompt. `images`: PIL images or paths; `prompts`: one string per image."""
        if isinstance(prompts, str):
            prompts = [prompts] * len(images)
        if len(images) != len(prompts):
            raise RewardInputError(
                f"Expected one prompt per image, found {len(images)} images and {len(prompts)} prompts."
            )
        bad = [i for i, prompt in enumerate(prompts) if not isinstance(prompt, str)]
        if bad:
            raise RewardInputError(f"Prompts must be strings; entries {bad[:5]} are {type(prompts[bad[0]]).__name__}.")
        batch_size = batch_size or self.batch_size
        scores = []
        for start in range(0, len(images), batch_size):
            batch_images = [to_rgb_image(image) for image in images[start : start + batch_size]]
            batch_scores = self._score_batch(batch_images, list(prompts[start : start + batch_size]))
            scores.append(batch_scores.detach().float().reshape(-1).cpu())
        if not scores:
            return torch.zeros(0)
        return torch.cat(scores)

    def __repr__(self):
        return (
            f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r}, device={str(self.device)!r}, "
            f"dtype={self.dtype})"
        )


def preference_probability(scores_a, scores_b, kind, alpha=1.0):
    """P(a > b) from two scores of the same prompt (CaPO Eq. 2 for Bradley-Terry rewards, Eq. 28 otherwise).

    `alpha` is the temperature of Eq. 28 (the paper uses 1); it is ignored for Bradley-Terry scores.
    """
    scores_a, scores_b = torch.as_tensor(scores_a, dtype=torch.float64), torch.as_tensor(scores_b, dtype=torch.float64)
    if kind == "bradley_terry":
        return torch.sigmoid(scores_a - scores_b)
    if kind == "probability":
        if (scores_a < 0).any() or (scores_b < 0).any():
            raise RewardInputError("Probability-like scores must be non-negative (Eq. 28 raises them to a power).")
        powered_a, powered_b = scores_a**alpha, scores_b**alpha
        total = powered_a + powered_b
        return torch.where(total > 0, powered_a / torch.where(total > 0, total, 1.0), 0.5)  # two zero scores: a tie
    raise RewardInputError(f"Unknown reward kind {kind!r}; expected one of {KINDS}.")
