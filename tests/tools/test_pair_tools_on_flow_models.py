"""The pair tools on flow pipelines, run with plain `python` as a user would: DDSPO's generate_pairs and MaPO's
build_pairs draw from the tiny SD3 (conftest `tiny_sd3`) and SANA (conftest `tiny_sana`) folders, with each
pipeline's own sampler, and write the pairs the flow training scripts read."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from kit import finished_line, pair_args, pixels, read_pairs, run_tool, write_lines


pytestmark = pytest.mark.slow

CAPTIONS = ["a photo of a red ball", "a photo of a blue ball"]


@pytest.fixture(params=["sd3", "sana"])
def flow_model(request):
    return request.getfixturevalue(f"tiny_{request.param}")


def images_differ(row, first, second, tmp_path):
    paths = []
    for column in (first, second):
        paths.append(tmp_path / f"{column}.png")
        paths[-1].write_bytes(row[column])
    a, b = (pixels(path) for path in paths)
    return a.shape == (64, 64, 3) and np.abs(a - b).max() > 0


def test_generate_pairs_draws_a_winner_from_c_and_a_loser_from_c_minus(flow_model, tmp_path):
    negatives = ["a red", "photo blue ball"]
    table = {"caption": CAPTIONS, "negative_caption": negatives, "prompt_index": [0, 1], "variant": [0, 0]}
    (tmp_path / "negatives").mkdir()
    pq.write_table(pa.table(table), tmp_path / "negatives" / "train.parquet")
    args = pair_args(flow_model, tmp_path / "pairs", "--dataset", tmp_path / "negatives", "--seed", 0)
    result = run_tool("examples/ddspo/generate_pairs.py", [*args, "--guidance_scale", 4.5])
    assert "2 pairs written" in finished_line(result, "generate_pairs")
    rows = read_pairs(tmp_path / "pairs")
    assert [(row["caption"], row["negative_caption"]) for row in rows] == list(zip(CAPTIONS, negatives))
    assert all(images_differ(row, "jpg_w", "jpg_l", tmp_path) for row in rows)


def test_build_pairs_draws_the_chosen_and_rejected_prefixes_from_one_seed(flow_model, tmp_path):
    prompts = write_lines(tmp_path / "prompts.txt", CAPTIONS)
    prefixes = ["--chosen_prefix", "a cartoon of", "--rejected_prefix", "a sketch of"]
    result = run_tool(
        "examples/mapo/build_pairs.py", pair_args(flow_model, tmp_path / "pairs", "--prompts", prompts, *prefixes)
    )
    assert "2 pairs written" in finished_line(result, "build_pairs")
    rows = read_pairs(tmp_path / "pairs")
    assert [row["chosen_prompt"] for row in rows] == [f"a cartoon of {caption}" for caption in CAPTIONS]
    assert all(images_differ(row, "jpg_0", "jpg_1", tmp_path) for row in rows)
