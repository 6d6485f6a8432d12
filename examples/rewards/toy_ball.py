"""toy_ball: the tiny world's judge, a reward that looks at generated images (no weights, plain numpy).

The tiny world (examples/tiny_world) draws one soft ball of a caption's colour ("a photo of a red
ball") on a dark background, in the top or bottom half of the picture, and its raters prefer the
ball in the top half. This reward finds the ball in an image, measures how high it sits and
whether its colour is the caption's, and turns both into a Bradley-Terry score
(P(a preferred to b) = sigmoid(score_a - score_b)):

    score = height_weight * (1 - 2 center_y) + color_weight * max(log p(caption colour | ball), min_log_prob)

`center_y` is the ball's centre as a fraction of the height (0 = top edge), so the first term runs
from +height_weight (top) to -height_weight (bottom); an image with no ball gets the worst score.
`ToyBall.judge` returns the parts (found, top, colour, colour_match, center_y) for reports and tests.
"""

import numpy as np
import torch

from .base import RewardInputError, RewardModel


# The six colours of the tiny world (examples/tiny_world/world.py draws its balls in them), as RGB.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 220, 30),
    "purple": (150, 40, 200),
    "cyan": (30, 210, 210),
}
COLOR_NAMES = list(COLORS)
COLOR_TABLE = np.array([COLORS[name] for name in COLOR_NAMES], dtype=np.float32)
# make_image scales a ball's colour by U(0.8, 1.0) and its soft mask stays below 1 at the centre, so the
# brightest pixels of a ball sit near 0.9 x its table colour.
TYPICAL_BRIGHTNESS = 0.9
VERSION = 1  # recorded as the weights source: bump it when the scoring rule changes


def caption_color(caption):
    """The colour word of a tiny-world caption ("a photo of a red ball" -> "red"), or None."""
    words = caption.lower().replace(",", " ").split()
    for name in COLOR_NAMES:
        if name in words:
            return name
    return None


def find_ball(image, border=4, min_peak=60.0, relative_threshold=0.5, max_area=0.35, min_pixels=12):
    """Locate the ball in an (H, W, 3) RGB image: pixels far (in RGB) from the background, the median of its border.

    Returns found (a compact blob clearly off the background: its 99.5th-percentile distance from the
    background is at least min_peak, and between min_pixels and max_area of the image lie above
    relative_threshold x that peak), center_y / center_x (distance-weighted centroid of those pixels,
    as fractions of the height / width; 0 = top / left) and color (mean RGB of the ball's core, the
    pixels within 80 % of the peak distance).
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
    found = bool(peak >= min_peak and mask.sum() >= min_pixels and mask.mean() <= max_area)
    weights = (distance - relative_threshold * peak).clip(min=0) * mask
    total = max(float(weights.sum()), 1e-6)
    rows, columns = np.mgrid[0:height, 0:width]
    core = distance >= 0.8 * peak
    return {
        "found": found,
        "center_y": float((weights * rows).sum() / total) / height,
        "center_x": float((weights * columns).sum() / total) / width,
        "color": image[core].mean(axis=0) if core.any() else background,
    }


def color_log_probs(rgb, temperature=40.0):
    """log p(colour | rgb) over COLOR_NAMES: a softmax of -||rgb - 0.9 x table colour||^2 / (2 temperature^2)."""
    logits = -((COLOR_TABLE * TYPICAL_BRIGHTNESS - np.asarray(rgb, np.float32)) ** 2).sum(-1) / (2 * temperature**2)
    logits = logits - logits.max()
    return logits - np.log(np.exp(logits).sum())


class ToyBall(RewardModel):
    """The tiny world's judge (see the module docstring); `path` must be None: it has no weights."""

    name = "toy_ball"
    display_name = "Toy ball"
    kind = "bradley_terry"
    needs_weights = False  # examples/tiny_world/tiny_rewards.py needs no stand-in for it

    @classmethod
    def weights_source(cls, path=None):
        if path is not None:
            raise RewardInputError(
                f"toy_ball has no weights to load, but was given {str(path)!r}; leave it out of --reward_model_paths."
            )
        return [{"builtin": cls.name, "version": VERSION}]

    def __init__(
        self,
        path=None,
        device=None,
        dtype=torch.float32,
        batch_size=16,
        height_weight=4.0,
        color_weight=1.0,
        min_log_prob=-10.0,
    ):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        self.weights_source(path)
        self.height_weight, self.color_weight, self.min_log_prob = height_weight, color_weight, min_log_prob

    def judge(self, image, caption):
        """One image (PIL or array) against its caption: found, top, color, color_match, center_y, score."""
        ball = find_ball(np.asarray(image.convert("RGB") if hasattr(image, "convert") else image))
        wanted = caption_color(caption)
        if not ball["found"]:
            return {
                "found": False,
                "top": False,
                "color": None,
                "color_match": False,
                "center_y": ball["center_y"],
                "score": -self.height_weight + self.color_weight * self.min_log_prob,
            }
        log_probs = color_log_probs(ball["color"])
        color = COLOR_NAMES[int(np.argmax(log_probs))]
        color_term = max(float(log_probs[COLOR_NAMES.index(wanted)]), self.min_log_prob) if wanted else 0.0
        return {
            "found": True,
            "top": ball["center_y"] < 0.5,
            "color": color,
            "color_match": color == wanted,
            "center_y": ball["center_y"],
            "score": self.height_weight * (1.0 - 2.0 * ball["center_y"]) + self.color_weight * color_term,
        }

    def _score_batch(self, images, prompts):
        return torch.tensor([self.judge(image, prompt)["score"] for image, prompt in zip(images, prompts)])
