"""MPS (examples/rewards/mps.py) on a tiny random stand-in, against the authors' forward pass written out here."""

import json
import os
import re
import shutil
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from kit import OFFLINE_ENV, REPO, read_csv, run_python, write_run
from PIL import Image

from examples.lib.cli import InputError
from examples.rewards import RewardInputError, convert_mps, load_reward_model, mps, reward_weights_source
from examples.tiny_world.tiny_rewards import write_tiny_mps


PROMPTS = ["a photo of a red ball", "a blue cat", "the dog of a photo", "a yellow ball"]
TINY_HEADS = 2  # write_tiny_mps's cross model: 2 heads of 8
# the condition of the authors' scorer (eval_overall_mps_on_hpdv2.py) for the overall preference
AUTHORS_CONDITION = (
    "light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, structure, instance, "
    "texture, quantity, attributes, position, number, location, word, things."
)


pytestmark = pytest.mark.usefixtures("hub_cache_in_a_temporary_folder")  # nothing here may read or fill ~/.cache


@pytest.fixture(scope="module")
def tiny_mps(tmp_path_factory):
    return write_tiny_mps(tmp_path_factory.mktemp("tiny") / "mps", seed=0)


def tiny_state_dict(folder):
    from safetensors.torch import load_file

    return load_file(f"{folder}/{mps.MPS_STATE_DICT_FILENAME}")


def authors_cross_model(sd, query, context, mask, heads):
    """trainer/models/cross_modeling.py's Cross_model, on the raw tensors: per layer, Residual(CrossAttention(...,
    parallel_ff=True)) then Residual(ParallelTransformerBlock(...)), with their einsums and their max subtraction."""

    def layer_norm(x, prefix):  # their LayerNorm: a weight, and a zero `bias` buffer
        return F.layer_norm(x, x.shape[-1:], sd[prefix + "weight"], sd[prefix + "bias"])

    def swiglu(x):
        x, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * x

    def split(t):  # rearrange(t, "b n (h d) -> b h n d", h=heads)
        return t.reshape(t.shape[0], t.shape[1], heads, -1).permute(0, 2, 1, 3)

    def merge(t):  # rearrange(t, "b h n d -> b n (h d)")
        return t.permute(0, 2, 1, 3).reshape(t.shape[0], t.shape[2], -1)

    def rotate_half(t):  # rearrange(t, "... (j d) -> ... j d", j=2), then cat(-x2, x1)
        x1, x2 = t.reshape(*t.shape[:-1], 2, -1).unbind(dim=-2)
        return torch.cat((-x2, x1), dim=-1)

    layers = len({key.split(".")[2] for key in sd if key.startswith("cross_model.layers.")})
    for i in range(layers):
        p = f"cross_model.layers.{i}.0.fn."
        x = layer_norm(query, p + "norm.")
        dim_head = sd[p + "to_kv.weight"].shape[0] // 2
        q = split(x @ sd[p + "to_q.weight"].T) * dim_head**-0.5
        k, v = (context @ sd[p + "to_kv.weight"].T).chunk(2, dim=-1)
        sim = torch.einsum("b h i d, b j d -> b h i j", q, k)
        sim = sim + mask.unsqueeze(1).repeat(1, heads, 1, 1)
        sim = sim - sim.amax(dim=-1, keepdim=True)
        out = merge(torch.einsum("b h i j, b j d -> b h i d", sim.softmax(dim=-1), v)) @ sd[p + "to_out.weight"].T
        out = out + swiglu(x @ sd[p + "ff.0.weight"].T) @ sd[p + "ff.2.weight"].T
        query = out + query

        p = f"cross_model.layers.{i}.1.fn."
        x = layer_norm(query, p + "norm.")
        ff_inner = sd[p + "ff_out.1.weight"].shape[1]
        q, k, v, ff = (x @ sd[p + "fused_attn_ff_proj.weight"].T).split(
            (heads * dim_head, dim_head, dim_head, 2 * ff_inner), dim=-1
        )
        q = split(q)
        inv_freq = sd[p + "rotary_emb.inv_freq"]
        freqs = torch.einsum("i , j -> i j", torch.arange(query.shape[1], dtype=inv_freq.dtype), inv_freq)
        positions = torch.cat((freqs, freqs), dim=-1)
        q, k = (t * positions.cos() + rotate_half(t) * positions.sin() for t in (q, k))
        sim = torch.einsum("b h i d, b j d -> b h i j", q * dim_head**-0.5, k)
        sim = sim - sim.amax(dim=-1, keepdim=True)
        out = merge(torch.einsum("b h i j, b j d -> b h i d", sim.softmax(dim=-1), v))
        query = out @ sd[p + "attn_out.weight"].T + swiglu(ff) @ sd[p + "ff_out.1.weight"].T + query
    return query


@torch.no_grad()
def authors_mps_scores(folder, images, prompts, threshold=0.3):
    """eval_overall_mps_on_hpdv2.py's `infer_one_sample`, one image at a time as there: their XCLIPModel is a
    transformers CLIPModel whose get_text_features returns (text_projection(last_hidden_state),
    text_projection(pooler_output)) and get_image_features visual_projection(last_hidden_state)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    sd = tiny_state_dict(folder)
    clip = CLIPModel(CLIPConfig.from_pretrained(folder)).eval()
    clip.load_state_dict({key.removeprefix("model."): value for key, value in sd.items() if key.startswith("model.")})
    tokenizer, processor = AutoTokenizer.from_pretrained(folder), CLIPImageProcessor.from_pretrained(folder)

    def tokenize(caption):
        return tokenizer(
            caption, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
        ).input_ids

    def get_text_features(input_ids):
        outputs = clip.text_model(input_ids=input_ids)
        return clip.text_projection(outputs[0]), clip.text_projection(outputs[1])

    scores, kept_tokens = [], []
    for image, prompt in zip(images, prompts):
        text_input = tokenize(prompt)
        condition_batch = tokenize(AUTHORS_CONDITION).repeat(text_input.shape[0], 1)
        text_f, text_features = get_text_features(text_input)
        image_f = clip.visual_projection(
            clip.vision_model(pixel_values=processor(image, return_tensors="pt")["pixel_values"])[0]
        )
        condition_f, _ = get_text_features(condition_batch)
        sim_text_condition = torch.einsum("b i d, b j d -> b j i", text_f, condition_f)
        sim_text_condition = torch.max(sim_text_condition, dim=1, keepdim=True)[0]
        sim_text_condition = sim_text_condition / sim_text_condition.max()
        mask = torch.where(sim_text_condition > threshold, 0, float("-inf"))
        kept_tokens.append(int((mask == 0).sum()))
        mask = mask.repeat(1, image_f.shape[1], 1)
        image_features = authors_cross_model(sd, image_f, text_f, mask, TINY_HEADS)[:, 0, :]
        image_features = image_features / image_features.norm(dim=-1, keepdim=True)
        text_features = text_features / text_features.norm(dim=-1, keepdim=True)
        scores.append((clip.logit_scale.exp() * text_features @ image_features.T)[0, 0])
    return torch.stack(scores), kept_tokens


@pytest.mark.parametrize("threshold", [0.3, 0.6])
def test_mps_equals_the_authors_forward_pass_on_the_same_weights(tiny_mps, images, threshold):
    reward = load_reward_model("mps", path=tiny_mps, device="cpu", condition_threshold=threshold)
    expected, kept_tokens = authors_mps_scores(tiny_mps, images, PROMPTS, threshold)
    torch.testing.assert_close(reward.score(images, PROMPTS), expected, rtol=1e-5, atol=1e-5)
    assert mps.OVERALL_CONDITION == AUTHORS_CONDITION
    assert all(0 < kept < 77 for kept in kept_tokens)  # the condition's mask keeps some prompt tokens, drops others
    assert expected.std() > 0.1  # the tiny checkpoint separates the images: the comparison is not between constants


def test_mps_scores_are_deterministic_and_do_not_depend_on_the_batch(tiny_mps, images):
    reward = load_reward_model("mps", path=tiny_mps, device="cpu", batch_size=3)
    scores = reward.score(images, PROMPTS)
    assert torch.equal(reward.score(images, PROMPTS), scores)
    one_at_a_time = torch.cat([reward.score([image], [prompt]) for image, prompt in zip(images, PROMPTS)])
    torch.testing.assert_close(one_at_a_time, scores, rtol=1e-5, atol=1e-5)
    assert reward.kind == "bradley_terry" and reward.condition_threshold == 0.3


def test_mps_loads_its_state_dict_file_given_directly(tiny_mps, images):
    from_folder = load_reward_model("mps", path=tiny_mps, device="cpu").score(images, PROMPTS)
    state_dict_file = f"{tiny_mps}/{mps.MPS_STATE_DICT_FILENAME}"
    from_file = load_reward_model("mps", path=state_dict_file, processor_path=tiny_mps, device="cpu")
    assert torch.equal(from_file.score(images, PROMPTS), from_folder)


def test_a_pickled_model_is_refused_with_a_one_line_error_that_says_to_convert_it(tiny_mps, tmp_path):
    folder = shutil.copytree(tiny_mps, tmp_path / "pickled")
    (folder / mps.MPS_STATE_DICT_FILENAME).unlink()
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), folder / mps.MPS_CHECKPOINT_FILENAME)  # a whole module
    with pytest.raises(
        RewardInputError, match=r"is a pickled model, not a state dict.*python -m examples\.rewards\.convert_mps"
    ):
        load_reward_model("mps", path=str(folder), device="cpu")
    with pytest.raises(RewardInputError) as error:
        load_reward_model("mps", path=str(folder / mps.MPS_CHECKPOINT_FILENAME), processor_path=tiny_mps, device="cpu")
    assert "\n" not in str(error.value)


def test_a_state_dict_without_the_cross_model_is_refused(tiny_mps, tmp_path):
    folder = shutil.copytree(tiny_mps, tmp_path / "clip_only")
    state_dict = tiny_state_dict(tiny_mps)
    (folder / mps.MPS_STATE_DICT_FILENAME).unlink()
    torch.save({key: value for key, value in state_dict.items() if key.startswith("model.")}, folder / "clip.pt")
    with pytest.raises(RewardInputError, match="is not an MPS state dict"):
        load_reward_model("mps", path=str(folder), device="cpu")


def test_without_a_path_mps_says_where_its_weights_are_and_how_to_convert_them():
    with pytest.raises(RewardInputError, match=r"MPS_overall_checkpoint\.pth.*Kwai-Kolors/MPS.*mps=DIR") as error:
        reward_weights_source("mps")  # what score.py asks first, before loading anything
    assert "\n" not in str(error.value)
    with pytest.raises(RewardInputError, match="no weights on the Hugging Face hub"):
        load_reward_model("mps")


AUTHORS_CLASSES = {  # our class -> (the authors' module, their class name)
    mps.MPSNetwork: ("trainer.models.clip_model", "CLIPModel"),
    mps.CrossModel: ("trainer.models.cross_modeling", "Cross_model"),
    mps.Residual: ("trainer.models.cross_modeling", "Residual"),
    mps.CrossAttention: ("trainer.models.cross_modeling", "CrossAttention"),
    mps.ParallelTransformerBlock: ("trainer.models.cross_modeling", "ParallelTransformerBlock"),
    mps.ScaleOnlyLayerNorm: ("trainer.models.cross_modeling", "LayerNorm"),
    mps.RotaryEmbedding: ("trainer.models.cross_modeling", "RotaryEmbedding"),
    mps.SwiGLU: ("trainer.models.cross_modeling", "SwiGLU"),
}


def save_as_the_authors_pickled_model(network, path, monkeypatch):
    """torch.save of the whole module, its classes renamed to the authors' (`trainer.models.*`, with `model` an
    XCLIPModel subclass of transformers' CLIPModel), as their MPS_overall_checkpoint.pth is; then their modules
    are gone again, as they are for a user without their repository."""
    from transformers import CLIPModel

    packages = {name: types.ModuleType(name) for name in ("trainer", "trainer.models")}
    for module_name in ("trainer.models.clip_model", "trainer.models.cross_modeling"):
        packages[module_name] = types.ModuleType(module_name)
    authors = {}
    for ours, (module_name, class_name) in [
        *AUTHORS_CLASSES.items(),
        (CLIPModel, ("trainer.models.clip_model", "XCLIPModel")),
    ]:
        authors[ours] = type(class_name, (ours,), {"__module__": module_name, "__qualname__": class_name})
        setattr(packages[module_name], class_name, authors[ours])
    for module in network.modules():
        if type(module) in authors:
            module.__class__ = authors[type(module)]
    with monkeypatch.context() as patch:
        for name, module in packages.items():
            patch.setitem(sys.modules, name, module)
        torch.save(network, path)
    assert "trainer" not in sys.modules


def run_conversion(checkpoint, output_dir):
    """`python -m examples.rewards.convert_mps`, as the module docstring says to run it, in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "examples.rewards.convert_mps", "--checkpoint", checkpoint, "--output_dir", output_dir],
        cwd=REPO,
        env={**os.environ, **OFFLINE_ENV},
        capture_output=True,
        text=True,
    )


def save_a_checkpoint_whose_pickle_calls(function, args, path):
    """torch.save of what looks like a state dict, one of whose values unpickles as function(*args)."""

    class Payload:
        def __reduce__(self):
            return function, args

    torch.save({"model.logit_scale": torch.ones(()), "cross_model.payload": Payload()}, path)


PAYLOADS = {  # what a malicious pickle would run: each creates the file it is given
    "open": lambda path: (open, (str(path), "w")),
    "os.system": lambda path: (os.system, (f"touch {path}",)),
}


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_a_checkpoint_that_names_any_other_global_is_refused_in_one_line_before_it_runs(payload, tmp_path):
    written_by_the_payload = tmp_path / "written_by_the_payload"
    function, args = PAYLOADS[payload](written_by_the_payload)
    checkpoint = tmp_path / mps.MPS_CHECKPOINT_FILENAME
    save_a_checkpoint_whose_pickle_calls(function, args, checkpoint)

    result = run_conversion(checkpoint, tmp_path / "converted")
    assert not written_by_the_payload.exists()  # the payload did not run
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    error_lines = [line for line in result.stderr.splitlines() if "RuntimeWarning" not in line]  # runpy's, not ours
    assert len(error_lines) == 1, result.stderr
    assert f"names {function.__module__}.{function.__name__}," in error_lines[0]  # io.open, posix.system
    assert "is not a checkpoint this converter accepts" in error_lines[0]
    assert not (tmp_path / "converted").exists()


def test_the_conversion_refuses_a_global_in_process_too(tmp_path):
    written_by_the_payload = tmp_path / "written_by_the_payload"
    checkpoint = tmp_path / mps.MPS_CHECKPOINT_FILENAME
    save_a_checkpoint_whose_pickle_calls(open, (str(written_by_the_payload), "w"), checkpoint)
    with pytest.raises(RewardInputError) as error:
        mps.convert_checkpoint(checkpoint, tmp_path / "converted")
    assert not written_by_the_payload.exists()
    assert re.search(r"names io\.open, .*not a checkpoint this converter accepts", str(error.value))
    assert "\n" not in str(error.value)
    with pytest.raises(InputError, match=r"names io\.open, "):
        convert_mps.main(
            convert_mps.parse_args(["--checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "c")])
        )
    assert not written_by_the_payload.exists()


def test_the_authors_pickled_checkpoint_converts_to_their_state_dict_without_their_code(
    tiny_mps, images, tmp_path, monkeypatch
):
    from transformers import CLIPConfig

    state_dict = tiny_state_dict(tiny_mps)
    network = mps.MPSNetwork(CLIPConfig.from_pretrained(tiny_mps), *mps.cross_model_shape(state_dict))
    network.load_state_dict(state_dict)
    network.half()  # the published checkpoint is scored in half precision
    checkpoint = tmp_path / mps.MPS_CHECKPOINT_FILENAME
    save_as_the_authors_pickled_model(network, checkpoint, monkeypatch)

    result = run_conversion(checkpoint, tmp_path / "converted")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert mps.MPS_STATE_DICT_FILENAME in result.stdout
    converted = tiny_state_dict(tmp_path / "converted")
    assert sorted(converted) == sorted(state_dict)
    for key, value in state_dict.items():
        torch.testing.assert_close(converted[key].float(), value.half().float(), rtol=0, atol=0)
    reward = load_reward_model("mps", path=str(tmp_path / "converted"), processor_path=tiny_mps, device="cpu")
    half_weights = {key: value.half().float() for key, value in state_dict.items()}
    reference = load_reward_model("mps", path=tiny_mps, device="cpu")
    reference.network.load_state_dict(half_weights)
    with torch.no_grad():
        reference.condition_tokens = reference.network.text_tokens(reference.input_ids([mps.OVERALL_CONDITION]))[0]
    torch.testing.assert_close(reward.score(images, PROMPTS), reference.score(images, PROMPTS), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_score_py_writes_an_mps_column_from_a_local_copy(tiny_mps, images, tmp_path):
    run_dir = write_run(tmp_path / "base", PROMPTS, images)
    result = run_python(
        "examples/eval/score.py",
        [
            "--run_dirs",
            run_dir,
            "--reward_models",
            "mps",
            "--reward_model_paths",
            f"mps={tiny_mps}",
            "--device",
            "cpu",
        ],
    )
    assert result.returncode == 0, result.stdout[-3000:]
    rows = read_csv(run_dir / "scores.csv")
    written = [Image.open(run_dir / row["image"]).convert("RGB") for row in rows]
    expected, _ = authors_mps_scores(tiny_mps, written, [row["prompt"] for row in rows])
    torch.testing.assert_close(torch.tensor([float(row["mps"]) for row in rows]), expected, rtol=1e-5, atol=1e-5)
    sources = json.loads((run_dir / "scores.csv.sources.json").read_text())
    assert sources["mps"] == reward_weights_source("mps", tiny_mps)
