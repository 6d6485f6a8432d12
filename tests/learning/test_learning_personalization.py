"""MaPO personalization learns a subject in the tiny world, judged on the images it generates (not on its loss).

The subject is a look the base model draws only some of the time: a red ball in the bottom half. Six target images
of it, rendered by the tiny world's own renderer (world.make_image, as pretrain_tiny_world.py draws its training
images) and captioned "a photo of <sks> ball", train `train_mapo_personalization_sdxl.py` with the paper's recipe
(UNet and text-encoder LoRA, textual inversion of <sks> from "ball", beta 1024, the whole set in every batch) at
learning rates the tiny model needs. The trained model then draws "a photo of <sks> ball" for 64 seeds
(examples/eval/generate.py --lora_path, which loads the new token too) and the toy_ball judge says where each ball
sits and which colour it is. Two baselines draw the same seeds with the base model: "a photo of ball ball", the
prompt the rejected samples were drawn with, and "a photo of a red ball", the base's own words for the colour, so
that only the subject's half is left to learn.

Measured with these settings (64 images per prompt, the shipped tiny-world-sdxl base): the base draws the subject
0.33 of the time for "a photo of ball ball" (a red ball, mostly in the top half) and 0.52 for "a photo of a red
ball"; after 400 steps at learning rate 2e-3 (UNet LoRA, and text-encoder LoRA and token: 40x and 400x the paper's
5e-5 and 5e-6), training seeds 0 / 1 / 2 give 0.86 / 0.83 / 0.92 (red 1.00 each). The test asks for 20 points above
either baseline and 0.9 red: the smallest measured rise is 31 points, and the 95 % interval of one share at 64
images is about +-0.1. (800 steps at 1e-3, the setting before, gave 0.91 / 0.95 / 0.95 in twice the time.) With the
sign of the MaPO margin flipped in a copy of the script, 400 steps at 2e-3 give 0.28 and the test fails. On this
base a subject of another colour is a poorer test: "ball ball" is drawn red, and a blue ball in the top half rose
only from 0.50 to 0.64 (800 steps at 1e-3) and 0.69 (1200 steps). On the base this test was first written for (built
locally before the bases shipped, where "ball ball" was drawn yellow and the subject was a red ball in the top
half), broken by hand in a copy of the script the test failed: with the sign of the MaPO margin flipped the share
was 0.03, with chosen and rejected swapped 0.00; it did not tell MaPO from fine-tuning on the targets alone (the
margin term dropped: 0.66, which passes).
"""

import numpy as np
import pytest
from kit import generate_and_judge, launch
from PIL import Image

from examples.tiny_world.world import make_image


pytestmark = pytest.mark.slow

SUBJECT_COLOR, SUBJECT_HALF = "red", "bottom"
PLACEHOLDER, INITIALIZER = "<sks>", "ball"
CAPTION = f"a photo of {PLACEHOLDER} ball"
BASE_PROMPTS = [CAPTION.replace(PLACEHOLDER, INITIALIZER), f"a photo of a {SUBJECT_COLOR} ball"]
NUM_TARGETS = 6
EVAL_IMAGES = ["--images_per_prompt", 64]  # after generate_and_judge's own 32, so it wins
RECIPE = ["--lora_rank", 4, "--train_text_encoder", "--placeholder_token", PLACEHOLDER]
RECIPE += ["--initializer_token", INITIALIZER, "--beta_mapo", 1024, "--train_batch_size", NUM_TARGETS]
RECIPE += ["--learning_rate", 2e-3, "--text_encoder_lr", 2e-3, "--lr_scheduler", "constant", "--lr_warmup_steps", 0]
RECIPE += ["--max_train_steps", 400]
# The rejected samples are drawn as the evaluation draws: 20 steps at guidance 5 (generate_and_judge's settings).
RECIPE += ["--rejected_inference_steps", 20, "--rejected_guidance_scale", 5]
MIN_RISE = 0.2
MIN_COLOR_MATCH = 0.9


def subject_share(verdicts):
    """Share of the images that show the subject: a ball of its colour in its half."""
    shown = [v["color"] == SUBJECT_COLOR and v["top"] == (SUBJECT_HALF == "top") for v in verdicts.values()]
    return sum(shown) / len(shown)


def color_share(verdicts):
    colors = [verdict["color"] for verdict in verdicts.values()]
    return colors.count(SUBJECT_COLOR) / len(colors)


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    """NUM_TARGETS images of the subject, each captioned CAPTION in a <name>.txt beside it."""
    folder = tmp_path_factory.mktemp("subject")
    rng = np.random.default_rng(1234)
    for i in range(NUM_TARGETS):
        Image.fromarray(make_image(SUBJECT_COLOR, SUBJECT_HALF, rng, 64)).save(folder / f"subject-{i}.png")
        (folder / f"subject-{i}.txt").write_text(CAPTION + "\n")
    return folder


@pytest.fixture(scope="module")
def base_verdicts_by_prompt(tiny_world, tmp_path_factory):
    """{prompt: verdicts} of the base model, each prompt drawn alone: image k of every prompt starts from the noise
    of the trained model's image k (generate.py seeds by prompt index and k), so the comparison is paired."""
    verdicts = {}
    for number, prompt in enumerate(BASE_PROMPTS):
        output_dir = tmp_path_factory.mktemp(f"base-{number}")
        verdicts[prompt] = generate_and_judge(tiny_world, output_dir, "base", *EVAL_IMAGES, prompts=[prompt])
    return verdicts


def test_base_model_draws_the_subject_only_some_of_the_time(base_verdicts_by_prompt):
    rejected_prompt, color_prompt = BASE_PROMPTS
    assert color_share(base_verdicts_by_prompt[color_prompt]) >= 0.95
    assert subject_share(base_verdicts_by_prompt[color_prompt]) <= 0.65  # the colour's word does not give the half
    assert subject_share(base_verdicts_by_prompt[rejected_prompt]) <= 0.65


def test_personalization_teaches_the_new_token_the_subjects_colour_and_half(
    tiny_world, targets, base_verdicts_by_prompt, tmp_path
):
    output_dir = tmp_path / "train"
    args = ["--pretrained_model_name_or_path", tiny_world["model"], "--instance_data_dir", targets]
    args += ["--resolution", 64, "--seed", 0, "--checkpointing_steps", 10000, "--report_to", "none"]
    launch("train_mapo_personalization_sdxl.py", [*args, "--output_dir", output_dir, *RECIPE])
    verdicts = generate_and_judge(
        tiny_world, tmp_path / "generated", "personal", *EVAL_IMAGES, "--lora_path", output_dir, prompts=[CAPTION]
    )
    after = subject_share(verdicts)
    before = {prompt: subject_share(base_verdicts_by_prompt[prompt]) for prompt in BASE_PROMPTS}
    print(f"subject share: base {before}, trained {after:.3f} ({SUBJECT_COLOR} {color_share(verdicts):.3f})")
    for prompt, share in before.items():
        assert verdicts.keys() == base_verdicts_by_prompt[prompt].keys()  # the same seeds
        assert after - share >= MIN_RISE, f"subject share: base ({prompt!r}) {share:.3f} -> trained {after:.3f}"
    assert color_share(verdicts) >= MIN_COLOR_MATCH, f"{SUBJECT_COLOR} share {color_share(verdicts):.3f}"
