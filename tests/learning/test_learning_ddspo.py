"""DDSPO learns the tiny world's preference from a degraded prompt, judged on the images it generates.

DDSPO needs no labelled pairs: the preference is carried by a word of the caption c that the degraded caption c⁻
lacks, and the reference model must already follow that word a little. Here the word is the ball's position. The
positional base (fixture `positional_world`, examples/tiny_world/pretrain_tiny_world.py with
--position_caption_share) is pre-trained on captions that name the ball's half ("a photo of a red ball at the
top" / "... at the bottom"), 30 % of them naming the wrong half, so its samples follow the word only partly.
examples/ddspo/generate_pairs.py draws the pairs from that base (x0_w from c = "... at the top", x0_l from
c⁻ = DEGRADED, same seeds); train_ddspo.py trains on them; the trained and the base model sample the same seeds for
c (examples/eval/generate.py) and the toy_ball judge (examples/rewards/toy_ball.py) says where each ball sits.
The flipped variant swaps c and c⁻ (--caption_column negative_caption --negative_caption_column caption), which
should move the images the other way.

Settings: the base is pre-trained with every caption positional (--position_caption_share 1, noise 0.3,
--snr_gamma 5, 3000 steps; with share 0.5, or without min-SNR weighting, the tiny UNet ignores the word); c⁻ names
the other half (the base never sees a plain caption); 96 pairs at guidance 5; full fine-tuning, learning rate 1e-5,
batch 8, 150 steps, beta 1000, paired negatives. beta is far below the authors' 16000: the tiny model's reference
predictions for c and c⁻ differ by ~1e-4 in MSE, and with 16000 the loss saturates within a few steps.

Measured (192 images, guidance 5) on the shipped positional base (examples/tiny_world/bases/, built with two
threads by the current recipe): base 0.58 in the top half for c; after 150 steps (training seed 0) DDSPO 0.78 with
colour match 0.92, flipped 0.41 with colour 0.98. Earlier builds of the recipe, all with the settings above: one
with two threads (base 0.45 for c, 0.36 for c⁻) moved to 0.70 and 0.71 (training seeds 0 and 1, colour 0.90 and
0.85), flipped 0.27 and 0.27 (colour 0.91 and 0.86); after 125 steps 0.66 and 0.66, flipped 0.29 and 0.32; after
100 steps 0.63, flipped 0.34. A one-thread build (base 0.50 for c, 0.38 for c⁻) after 150 steps: DDSPO 0.69 (colour
0.92), flipped 0.33 (colour 0.77); others (base 0.58 with two threads, 0.54 with one) moved to 0.72-0.78 and
0.30-0.39 with colour 0.92 or more; on the one-thread one, with the sign of ddspo_loss's logit flipped, the first
DDSPO test failed (0.54 -> 0.32). With lr 2e-5 or 200 steps the colour match fell to 0.83-0.88. The thresholds are
test_learning's.
"""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from kit import (
    DEGRADED,
    MIN_CHANGE,
    MIN_COLOR_MATCH,
    TINY_WORLD_BASES,
    TOP,
    generate_and_judge,
    launch,
    run_python,
    share,
)


NUM_PAIRS = 96  # 16 per colour
TRAINING = ["--train_batch_size", 8, "--max_train_steps", 150, "--learning_rate", 1e-5, "--lr_scheduler", "constant"]
# --cache_latents: each pair encoded once instead of at every step; the trained weights are bit-identical to an
# uncached run's (checked for every script these tests launch), and the learning runs take a third less CPU.
TRAINING += ["--cache_latents"]
DDSPO = ["--beta_ddspo", 1000, "--negative_mode", "paired"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def positional_world():
    """The tiny pipeline pre-trained on positional captions, shipped beside conftest's `tiny_world`."""
    return {"model": str(TINY_WORLD_BASES / "tiny-world-positional-sdxl")}


@pytest.fixture(scope="module")
def pairs(positional_world, tmp_path_factory):
    """DDSPO's pairs drawn by the base: x0_w from c, x0_l from c⁻, the same seed for both."""
    folder = tmp_path_factory.mktemp("ddspo-pairs")
    rows = {
        "caption": [TOP[i % len(TOP)] for i in range(NUM_PAIRS)],
        "negative_caption": [DEGRADED[i % len(DEGRADED)] for i in range(NUM_PAIRS)],
    }
    pq.write_table(pa.table(rows), folder / "prompts.parquet")
    args = ["--pretrained_model_name_or_path", positional_world["model"], "--dataset", folder / "prompts.parquet"]
    args += ["--resolution", 64, "--num_inference_steps", 20, "--guidance_scale", 5, "--batch_size", 96]
    args += ["--seed", 1000, "--output_dir", folder / "pairs"]
    result = run_python("examples/ddspo/generate_pairs.py", args)
    assert result.returncode == 0, result.stdout[-4000:]
    return str(folder / "pairs")


@pytest.fixture(scope="module")
def positional_base_verdicts(positional_world, tmp_path_factory):
    return generate_and_judge(positional_world, tmp_path_factory.mktemp("generated"), "base", prompts=TOP)


def train_ddspo(positional_world, pairs, output_dir, flipped=False, seed=0):
    columns = ("negative_caption", "caption") if flipped else ("caption", "negative_caption")
    args = ["--pretrained_model_name_or_path", positional_world["model"], "--dataset_name", pairs]
    args += ["--caption_column", columns[0], "--negative_caption_column", columns[1]]
    args += ["--resolution", 64, "--seed", seed, "--lr_warmup_steps", 0, "--checkpointing_steps", 1000]
    args += ["--report_to", "none", "--output_dir", output_dir, *TRAINING, *DDSPO]
    launch("train_ddspo.py", args)
    return output_dir


@pytest.fixture(scope="module")
def degraded_verdicts(positional_world, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("generated")
    return generate_and_judge(positional_world, output_dir, "base-degraded", prompts=DEGRADED)


def test_positional_base_follows_the_word_only_partly(positional_base_verdicts, degraded_verdicts):
    assert share(positional_base_verdicts, "found") >= 0.95
    assert share(positional_base_verdicts, "color_match") >= 0.95
    assert share(positional_base_verdicts, "top") > share(degraded_verdicts, "top")  # the word is in the base ...
    assert 0.35 <= share(positional_base_verdicts, "top") <= 0.75  # ... with room to sharpen it


@pytest.mark.parametrize("flipped", [False, True], ids=["c", "flipped"])
def test_ddspo_moves_generated_balls_toward_c(flipped, positional_world, pairs, positional_base_verdicts, tmp_path):
    output_dir = train_ddspo(positional_world, pairs, tmp_path / "train", flipped=flipped)
    name = "ddspo-flipped" if flipped else "ddspo"
    weights = ["--unet_path", output_dir]
    verdicts = generate_and_judge(positional_world, tmp_path / "generated", name, *weights, prompts=TOP)
    assert verdicts.keys() == positional_base_verdicts.keys()  # the same prompts and seeds
    before, after = share(positional_base_verdicts, "top"), share(verdicts, "top")
    print(
        f"{name}: top-half share for c {before:.3f} -> {after:.3f}, colour match {share(verdicts, 'color_match'):.3f}"
    )
    change = before - after if flipped else after - before
    assert change >= MIN_CHANGE, f"{name}: top-half share for c {before:.3f} -> {after:.3f}"
    assert share(verdicts, "color_match") >= MIN_COLOR_MATCH, f"{name}: colour match {share(verdicts, 'color_match')}"
