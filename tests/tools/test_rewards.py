"""The reward-model library (examples/rewards) on tiny random stand-ins written in the real on-disk formats."""

import importlib.util
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from examples.rewards import (
    KINDS,
    REWARD_MODELS,
    RewardInputError,
    RewardModel,
    convert_open_clip_state_dict,
    load_reward_model,
    preference_probability,
    reward_weights_source,
)
from examples.rewards.image_reward import IMAGE_REWARD_FILENAME, REWARD_STD
from examples.tiny_world.tiny_rewards import STAND_INS, reward_models_without_stand_in, write_tiny_reward_models


PROMPTS = ["a photo of a red ball", "a blue cat", "the dog of a photo"]
OPENAI_CLIP_MEAN, OPENAI_CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


pytestmark = pytest.mark.usefixtures("hub_cache_in_a_temporary_folder")  # nothing here may read or fill ~/.cache


@pytest.mark.parametrize("name", list(REWARD_MODELS))
def test_each_reward_loads_from_a_local_tiny_checkpoint_and_scores_a_batch_deterministically(
    name, tiny_rewards, images
):
    needs_weights = getattr(REWARD_MODELS[name], "needs_weights", True)
    if needs_weights and name not in STAND_INS:
        pytest.skip(
            f"{name} has no tiny stand-in: it needs the optional package {REWARD_MODELS[name].optional_dependency}"
        )
    path = tiny_rewards[name] if needs_weights else None
    reward = load_reward_model(name, path=path, device="cpu", batch_size=2)
    scores = reward.score(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    assert torch.equal(reward.score(images, PROMPTS), scores)  # same input, same scores
    batched_differently = reward.score(images, PROMPTS, batch_size=3)
    torch.testing.assert_close(batched_differently, scores, rtol=1e-5, atol=1e-5)  # batching does not matter
    assert reward.kind in KINDS and reward.name == name
    assert reward.device == torch.device("cpu") and reward.dtype == torch.float32


def test_every_registered_reward_model_has_a_tiny_stand_in_unless_it_needs_an_optional_package(monkeypatch, tmp_path):
    assert reward_models_without_stand_in() == []

    class NewReward(RewardModel):
        name, display_name, kind = "newreward", "New", "bradley_terry"

    monkeypatch.setitem(REWARD_MODELS, NewReward.name, NewReward)
    assert reward_models_without_stand_in() == ["newreward"]
    with pytest.raises(RuntimeError, match=r"\['newreward'\].*STAND_INS"):
        write_tiny_reward_models(tmp_path)


def test_rewards_read_image_paths_as_well_as_pil_images(tiny_rewards, images, tmp_path):
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    reward = load_reward_model("pickscore", path=tiny_rewards["pickscore"], device="cpu")
    torch.testing.assert_close(reward.score(paths, PROMPTS), reward.score(images, PROMPTS))


def clip_reference(folder):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    return (
        CLIPModel.from_pretrained(folder).eval(),
        AutoTokenizer.from_pretrained(folder),
        CLIPImageProcessor.from_pretrained(folder),
    )


@torch.no_grad()
def test_pickscore_is_logit_scale_times_the_cosine_of_clip_embeddings(tiny_rewards, images):
    model, tokenizer, processor = clip_reference(tiny_rewards["pickscore"])
    image_features = model.get_image_features(
        pixel_values=processor(images=images, return_tensors="pt")["pixel_values"]
    ).pooler_output
    text_features = model.get_text_features(**tokenizer(PROMPTS, padding=True, return_tensors="pt")).pooler_output
    expected = model.logit_scale.exp() * F.cosine_similarity(image_features, text_features)
    scores = load_reward_model("pickscore", path=tiny_rewards["pickscore"], device="cpu").score(images, PROMPTS)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_clipscore_is_weight_times_the_positive_part_of_the_cosine(tiny_rewards, images):
    model, tokenizer, processor = clip_reference(tiny_rewards["clipscore"])
    image_features = model.get_image_features(
        pixel_values=processor(images=images, return_tensors="pt")["pixel_values"]
    ).pooler_output
    text_features = model.get_text_features(**tokenizer(PROMPTS, padding=True, return_tensors="pt")).pooler_output
    cosine = F.cosine_similarity(image_features, text_features)
    reward = load_reward_model(
        "clipscore", path=tiny_rewards["clipscore"], device="cpu", weight=2.5
    )  # Hessel et al.'s w
    torch.testing.assert_close(reward.score(images, PROMPTS), 2.5 * cosine.clamp_min(0), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_aesthetic_score_is_the_mlp_of_the_normalised_clip_image_embedding(tiny_rewards, images):
    model, _, processor = clip_reference(tiny_rewards["aesthetic"])
    embedding = F.normalize(
        model.get_image_features(
            pixel_values=processor(images=images, return_tensors="pt")["pixel_values"]
        ).pooler_output,
        dim=-1,
    )
    head = torch.load(f"{tiny_rewards['aesthetic']}/sac+logos+ava1-l14-linearMSE.pth", weights_only=True)
    hidden = embedding
    for layer in (0, 2, 4, 6, 7):  # Linear layers; the Dropouts between them are identities at inference
        hidden = hidden @ head[f"layers.{layer}.weight"].T + head[f"layers.{layer}.bias"]
    scores = load_reward_model("aesthetic", path=tiny_rewards["aesthetic"], device="cpu").score(
        images, PROMPTS[:1] * 3
    )
    torch.testing.assert_close(scores, hidden.squeeze(-1), rtol=1e-5, atol=1e-6)


def open_clip_reference_features(state_dict, config, pixel_values, input_ids, eot_token_id):
    """open_clip's CLIP forward pass (model.py, transformer.py) written directly on its state dict."""

    def resblocks(x, prefix, layers, heads, causal):
        for i in range(layers):
            p = f"{prefix}.{i}."
            h = F.layer_norm(x, x.shape[-1:], state_dict[p + "ln_1.weight"], state_dict[p + "ln_1.bias"])
            q, k, v = F.linear(h, state_dict[p + "attn.in_proj_weight"], state_dict[p + "attn.in_proj_bias"]).chunk(
                3, dim=-1
            )
            split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
            attention = (
                F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=causal)
                .transpose(1, 2)
                .reshape(h.shape)
            )
            x = x + F.linear(attention, state_dict[p + "attn.out_proj.weight"], state_dict[p + "attn.out_proj.bias"])
            h = F.layer_norm(x, x.shape[-1:], state_dict[p + "ln_2.weight"], state_dict[p + "ln_2.bias"])
            x = x + F.linear(
                F.gelu(F.linear(h, state_dict[p + "mlp.c_fc.weight"], state_dict[p + "mlp.c_fc.bias"])),
                state_dict[p + "mlp.c_proj.weight"],
                state_dict[p + "mlp.c_proj.bias"],
            )
        return x

    vision, text = config["vision_cfg"], config["text_cfg"]
    patches = (
        F.conv2d(pixel_values, state_dict["visual.conv1.weight"], stride=vision["patch_size"])
        .flatten(2)
        .transpose(1, 2)
    )
    x = (
        torch.cat([state_dict["visual.class_embedding"].expand(len(patches), 1, -1), patches], dim=1)
        + state_dict["visual.positional_embedding"]
    )
    x = F.layer_norm(x, x.shape[-1:], state_dict["visual.ln_pre.weight"], state_dict["visual.ln_pre.bias"])
    x = resblocks(
        x, "visual.transformer.resblocks", vision["layers"], vision["width"] // vision["head_width"], causal=False
    )
    image_features = (
        F.layer_norm(x[:, 0], x.shape[-1:], state_dict["visual.ln_post.weight"], state_dict["visual.ln_post.bias"])
        @ state_dict["visual.proj"]
    )
    x = state_dict["token_embedding.weight"][input_ids] + state_dict["positional_embedding"][: input_ids.shape[1]]
    x = resblocks(x, "transformer.resblocks", text["layers"], text["heads"], causal=True)
    x = F.layer_norm(x, x.shape[-1:], state_dict["ln_final.weight"], state_dict["ln_final.bias"])
    text_features = (
        x[torch.arange(len(x)), input_ids.argmax(dim=-1)] @ state_dict["text_projection"]
    )  # open_clip pools the argmax id (EOT)
    assert (input_ids.argmax(dim=-1) == (input_ids == eot_token_id).int().argmax(dim=-1)).all()
    return image_features, text_features


def resize_max_size_reference(image, size, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
    """HPS v2's validation transform written with PIL and numpy: ToTensor, then open_clip's ResizeMaxSize(size) (long
    side to `size`, bicubic, zero padding split [w // 2, h // 2, w - w // 2, h - h // 2]), then Normalize.

    torchvision resizes the float tensor with torch's antialiased bicubic, which is PIL's bicubic on float ("F")
    images; the new size is rounded with Python's round, as ResizeMaxSize does.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255  # (H, W, 3)
    height, width = pixels.shape[:2]
    scale = size / max(height, width)
    if scale != 1.0:
        new_height, new_width = round(height * scale), round(width * scale)
        channels = [
            np.asarray(
                Image.fromarray(np.ascontiguousarray(pixels[..., c])).resize((new_width, new_height), Image.BICUBIC)
            )
            for c in range(3)
        ]
        pixels = np.stack(channels, axis=-1)
    pad_h, pad_w = size - pixels.shape[0], size - pixels.shape[1]
    pixels = np.pad(pixels, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    pixels = (pixels - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return torch.from_numpy(pixels.transpose(2, 0, 1).astype(np.float32))  # (3, size, size)


@pytest.fixture(scope="module")
def non_square_images():
    """Wide, tall, smaller than the 32 px input (padded unevenly), and 32 px long already; 33 * 32 / 64 = 16.5 and
    45 * 32 / 64 = 22.5 round to even (16, 22) as Python's round does."""
    rng = np.random.default_rng(1)
    sizes = [(64, 33), (45, 64), (20, 13), (32, 20)]  # (width, height)
    return [Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)) for w, h in sizes]


def test_hps_preprocessing_shrinks_the_long_side_and_pads_as_the_authors_scorer_does(tiny_rewards, non_square_images):
    reward = load_reward_model("hpsv21", path=tiny_rewards["hpsv21"], device="cpu")
    expected = torch.stack([resize_max_size_reference(image, 32) for image in non_square_images])
    torch.testing.assert_close(reward.pixel_values(non_square_images), expected, rtol=0, atol=1e-4)
    black = (0 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    assert torch.allclose(expected[0, :, :8], black.view(3, 1, 1).expand(3, 8, 32))  # 64 x 33 -> 32 x 16: 8 rows above


@torch.no_grad()
def test_hps_on_transformers_clip_equals_open_clip_forward_pass_on_the_same_weights(tiny_rewards, non_square_images):
    folder = tiny_rewards["hpsv21"]
    reward = load_reward_model("hpsv21", path=folder, device="cpu")
    config = json.loads(open(f"{folder}/open_clip_config.json").read())["model_cfg"]
    state_dict = torch.load(f"{folder}/HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    prompts = PROMPTS + ["a cat"]
    pixel_values = torch.stack([resize_max_size_reference(image, 32) for image in non_square_images])
    input_ids = reward.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    image_features, text_features = open_clip_reference_features(
        state_dict, config, pixel_values, input_ids, reward.tokenizer.eos_token_id
    )
    expected = 100 * F.cosine_similarity(image_features, text_features)  # hpsv2.score's cosine, x 100 as in papers
    torch.testing.assert_close(reward.score(non_square_images, prompts), expected, rtol=1e-4, atol=1e-4)
    assert expected.std() > 1  # the tiny checkpoint separates the images: the comparison is not between constants


def test_hps_cleans_prompts_as_open_clip_before_tokenizing(tiny_rewards, images):
    # open_clip's SimpleTokenizer: ftfy.fix_text, html.unescape twice, whitespace runs -> one space, lower case
    reward = load_reward_model("hpsv21", path=tiny_rewards["hpsv21"], device="cpu")
    messy = ["A  photo\tof a <RED> ball &amp;amp; a cafÃ©", " the&nbsp;DOG\n\nof a photo ", "a &lt;blue&gt; cat"]
    clean = ["a photo of a <red> ball & a café", "the dog of a photo", "a <blue> cat"]
    torch.testing.assert_close(reward.score(images, messy), reward.score(images, clean), rtol=0, atol=0)
    assert torch.equal(reward.input_ids(messy), reward.input_ids(clean))


def test_open_clip_checkpoints_with_tensors_a_plain_clip_lacks_are_refused(tiny_rewards):
    state_dict = torch.load(f"{tiny_rewards['hpsv21']}/HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    state_dict["transformer.resblocks.0.ls_1.gamma"] = torch.ones(32)  # layer scale, which transformers' CLIP lacks
    with pytest.raises(RewardInputError, match="ls_1.gamma"):
        convert_open_clip_state_dict(state_dict)


def test_image_reward_checkpoint_in_its_own_names_loads_with_only_the_unused_projections_left_over(tiny_rewards):
    reward = load_reward_model("imagereward", path=tiny_rewards["imagereward"], device="cpu")
    assert sorted(reward.unused_tensors) == sorted(
        [
            "blip.text_encoder.embeddings.position_ids",
            "blip.text_proj.bias",
            "blip.text_proj.weight",
            "blip.vision_proj.bias",
            "blip.vision_proj.weight",
        ]
    )


def test_image_reward_is_normalised_by_its_published_mean_and_std(tiny_rewards, images, tmp_path):
    shifted = tmp_path / "imagereward_shifted"
    shutil.copytree(tiny_rewards["imagereward"], shifted)
    state_dict = torch.load(shifted / IMAGE_REWARD_FILENAME, weights_only=True)
    state_dict["mlp.layers.7.bias"] += REWARD_STD  # raw reward + std -> normalised reward + 1
    torch.save(state_dict, shifted / IMAGE_REWARD_FILENAME)
    original = load_reward_model("imagereward", path=tiny_rewards["imagereward"], device="cpu").score(images, PROMPTS)
    moved = load_reward_model("imagereward", path=str(shifted), device="cpu").score(images, PROMPTS)
    torch.testing.assert_close(moved - original, torch.ones(3), rtol=0, atol=1e-5)


def test_weights_source_of_a_local_copy_is_its_content_hash_wherever_it_lies(tiny_rewards, tmp_path):
    source = reward_weights_source("pickscore", tiny_rewards["pickscore"])
    assert [set(entry) for entry in source] == [{"path", "sha256"}]
    moved = shutil.copytree(tiny_rewards["pickscore"], tmp_path / "moved")
    assert reward_weights_source("pickscore", moved)[0]["sha256"] == source[0]["sha256"]
    (moved / "config.json").write_text((moved / "config.json").read_text().replace("32", "33", 1))
    assert reward_weights_source("pickscore", moved)[0]["sha256"] != source[0]["sha256"]


def test_weights_source_of_published_weights_is_the_cached_hub_commit_offline(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "models--xswu--HPSv2" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "HPS_v2.1_compressed.pt").write_bytes(b"weights")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(commit)
    assert reward_weights_source("hpsv21") == [{"hub": "xswu/HPSv2", "revision": commit}]


def test_weights_that_cannot_be_reached_are_a_one_sentence_error_before_loading(tmp_path):
    with pytest.raises(
        RewardInputError, match=r"PickScore_v1.*neither in the local hub cache nor reachable.*pickscore=PATH"
    ) as error:
        reward_weights_source("pickscore")  # offline, with an empty cache
    assert "\n" not in str(error.value)
    with pytest.raises(RewardInputError, match="do not exist; expected an open_clip checkpoint file"):
        reward_weights_source("hpsv21", str(tmp_path / "missing"))


def test_a_missing_checkpoint_file_names_what_was_expected(tmp_path):
    with pytest.raises(RewardInputError, match="ImageReward.pt"):
        load_reward_model("imagereward", path=str(tmp_path), device="cpu")
    with pytest.raises(RewardInputError, match="open_clip_config.json"):
        load_reward_model("hpsv21", path=str(tmp_path), device="cpu")


def test_unknown_reward_model_name_lists_the_known_ones():
    with pytest.raises(RewardInputError, match="pickscore"):
        load_reward_model("pikscore")


@pytest.mark.skipif(importlib.util.find_spec("t2v_metrics") is not None, reason="t2v_metrics is installed")
def test_vqascore_without_its_optional_package_says_how_to_install_it():
    with pytest.raises(RewardInputError, match="pip install t2v-metrics"):
        load_reward_model("vqascore")
    assert REWARD_MODELS["vqascore"].kind == "probability"


def test_bad_inputs_are_clear_errors(tiny_rewards, images, tmp_path):
    reward = load_reward_model("pickscore", path=tiny_rewards["pickscore"], device="cpu")
    with pytest.raises(RewardInputError, match="3 images and 2 prompts"):
        reward.score(images, PROMPTS[:2])
    with pytest.raises(RewardInputError, match="does not exist"):
        reward.score([tmp_path / "missing.png"], PROMPTS[:1])


def test_preference_probability_follows_the_kind_of_the_score():
    # Bradley-Terry (CaPO Eq. 2): sigmoid of the difference; probability-like (Eq. 28, alpha = 1): s / (s + s').
    assert preference_probability(2.0, 1.0, "bradley_terry").item() == pytest.approx(1 / (1 + math.exp(-1)))
    assert preference_probability(0.8, 0.2, "probability").item() == pytest.approx(0.8)
    assert preference_probability(0.5, 0.5, "probability", alpha=3).item() == pytest.approx(0.5)
    assert preference_probability(0.0, 0.0, "probability").item() == pytest.approx(0.5)
    with pytest.raises(RewardInputError):
        preference_probability(1.0, 0.0, "logits")
