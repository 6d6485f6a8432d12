"""examples/playground_2d: the metrics on hand-made point sets, bad input, the objectives imported from the scripts
(never a copy), a reduced run end to end, and the default run against the committed numbers its README quotes."""

import ast
import json
import math
import re

import numpy as np
import pytest
from kit import REPO, run_python

from examples.playground_2d import metrics


PLAYGROUND = "examples/playground_2d/playground.py"
COMMITTED = REPO / "docs" / "toy2d"
COMMITTED_SWEEP = COMMITTED / "sweep"
# A rerun of the default setting must give every committed mean to within this much, or half its interval's
# half-width where that is wider (docs/toy2d/results.md, examples/playground_2d/README.md).
ABSOLUTE_TOLERANCE = 0.01
REDUCED = [
    "--reference_steps", 30, "--finetune_steps", 4, "--samples_per_class", 16, "--sampling_steps", 4,
    "--betas", 100, 1000, "--mapo_betas", 8, "--shifts", 0, 2, "--capo_groups_per_class", 2,
    "--reference_points_per_class", 40, "--batch_size", 8,
]  # fmt: skip
SCRIPT_FUNCTIONS = [
    ("train_diffusion_dpo_sdxl", "diffusion_dpo_loss"),
    ("train_diffusion_dpo_sdxl", "sft_loss"),
    ("train_mapo_sdxl", "mapo_loss"),
    ("train_ddspo", "ddspo_loss"),
    ("train_capo", "capo_loss"),
    ("examples.lib.calibration", "calibrate"),
    ("examples.lib.calibration", "select_pairs"),
]


# ----------------------------------------------------------------------------------------------
# The metrics, on point sets whose answers are known
# ----------------------------------------------------------------------------------------------
CENTRES = np.array([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]])


def test_mode_accuracy_is_the_share_of_points_nearest_their_own_centre():
    points = np.array([[1.9, 0.1], [2.5, -0.3], [0.6, 0.1], [-1.5, 0.2]])  # nearest centres: 0, 0, 0, 1
    assert metrics.mode_accuracy(points, CENTRES, 0) == 0.75
    assert metrics.mode_accuracy(points, CENTRES, 1) == 0.25
    assert metrics.mode_accuracy(points, CENTRES, 2) == 0.0


def test_sliced_wasserstein_of_a_translated_set_is_the_shift_over_root_two():
    points = np.random.default_rng(0).standard_normal((50, 2))
    shift = np.array([3.0, -4.0])
    assert metrics.sliced_wasserstein(points, points + shift) == pytest.approx(5.0 / math.sqrt(2), rel=1e-9)


def test_sliced_wasserstein_is_zero_for_the_same_points_in_another_order():
    points = np.random.default_rng(1).standard_normal((30, 2))
    assert metrics.sliced_wasserstein(points, points[::-1]) == pytest.approx(0.0, abs=1e-12)
    assert metrics.sliced_wasserstein(points, points * 2) > 0.1


def test_sliced_wasserstein_refuses_sets_of_different_sizes():
    with pytest.raises(ValueError, match="same shape"):
        metrics.sliced_wasserstein(np.zeros((3, 2)), np.zeros((4, 2)))


def test_spread_of_a_square_is_its_half_diagonal_wherever_it_sits():
    square = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert metrics.spread(square) == pytest.approx(math.sqrt(2))
    assert metrics.spread(square + 7.0) == pytest.approx(math.sqrt(2))


def test_interval_is_the_student_t_interval_and_leaves_out_diverged_seeds():
    mean, half_width, n = metrics.interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (mean, n) == (3.0, 5)
    assert half_width == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5))
    assert metrics.interval([1.0, math.nan, 3.0])[::2] == (2.0, 2)


def test_intervals_overlap_unless_the_means_are_further_apart_than_the_two_half_widths():
    assert not metrics.intervals_overlap([1.0, 1.1, 0.9, 1.0, 1.0], [0.0, 0.1, -0.1, 0.0, 0.0])
    assert metrics.intervals_overlap([1.0, 3.0, -1.0, 1.0, 1.0], [0.0, 0.1, -0.1, 0.0, 0.0])
    assert metrics.intervals_overlap([1.0], [0.0, 0.1, -0.1])  # one seed has no interval: more seeds are needed


def test_the_sweep_gap_is_the_mean_of_the_per_seed_differences_paired_by_seed():
    from examples.playground_2d import report

    members = [{"beta": 10.0, "seed": seed} for seed in range(5)]
    dpo = np.array([[0.5], [0.9], [0.6], [0.8], [0.7]])
    ddspo = dpo + np.array([[0.10], [0.12], [0.08], [0.10], [0.10]])  # the seeds' spread is far wider than the gap
    blank = np.zeros((5, 1))
    runs = {
        "dpo": {"members": members, "mode_acc": dpo, "swd": blank, "spread": blank},
        "ddspo": {"members": members, "mode_acc": ddspo, "swd": blank, "spread": blank},
    }
    reference = {"members": [{"seed": seed} for seed in range(5)], "mode_acc": blank, "swd": blank, "spread": blank}
    gap = report.sweep_round({"reference": reference, "runs": runs})["gaps"][0]
    assert gap["beta"] == 10.0 and gap["n"] == 5 and gap["mean"] == pytest.approx(0.10)
    assert gap["half_width"] == pytest.approx(2.776 * np.std([0.10, 0.12, 0.08, 0.10, 0.10], ddof=1) / math.sqrt(5))
    assert gap["intervals_overlap"]  # unpaired, the two methods' intervals cannot tell them apart


def test_a_diverged_seed_is_named_in_the_table_not_dropped():
    from examples.playground_2d import report

    run = {"members": [{"seed": s} for s in range(5)], "swd": np.array([[0.1], [0.2], [np.nan], [0.3], [0.2]])}
    row = report.summary_row("Diffusion-DPO, β = 100", run, "swd")
    assert row["n"] == 4 and row["diverged"] == [2]
    assert report.seeds_cell([row]) == "4 of 5 (diverged: seed 2)"


# ----------------------------------------------------------------------------------------------
# Bad input: one line, before torch
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags,message",
    [
        (["--num_classes", 0], "--num_classes must be at least 2"),
        (["--shifts", 0, -1], "--shifts are distances and cannot be negative"),
        (["--num_seeds", 4], "--num_seeds must be at least 5"),
        (["--sweep_betas", 1, 0], "--sweep_betas must be positive"),
        (["--sweep_betas", 1, "inf"], "'inf' is not a finite number"),
        (
            ["--experiments", "beta_sweep", "--sweep_more_seeds", 5],
            "--sweep_more_seeds must be more than --num_seeds (5)",
        ),
    ],
    ids=["zero classes", "negative shift", "four seeds", "zero sweep beta", "infinite sweep beta", "five more seeds"],
)
def test_a_setting_that_cannot_run_stops_with_one_line(tmp_path, flags, message):
    result = run_python(PLAYGROUND, [*flags, "--output_dir", tmp_path / "out"], timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stdout, result.stdout
    errors = [line for line in result.stdout.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], result.stdout
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# The objectives are the scripts' own
# ----------------------------------------------------------------------------------------------
def playground_sources():
    return sorted((REPO / "examples" / "playground_2d").glob("*.py"))


def test_the_playground_defines_no_loss_of_its_own():
    """A copy of an objective or of CaPO's pipeline in the playground would drift from the scripts unnoticed."""
    imported_names = {name for _, name in SCRIPT_FUNCTIONS} | {"log_u_over_expm1", "sigmoid_loss_weight"}
    for path in playground_sources():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.Lambda, ast.AsyncFunctionDef)):
                name = getattr(node, "name", "<lambda>")
                assert name not in imported_names and not name.endswith("_loss"), f"{path.name} defines {name}"
            if isinstance(node, ast.Attribute) and node.attr in {"logsigmoid", "log_sigmoid", "softplus"}:
                raise AssertionError(f"{path.name} computes a log-sigmoid itself (line {node.lineno})")


def test_a_reduced_run_goes_end_to_end_through_every_script_objective(tmp_path, monkeypatch):
    import importlib

    from examples.playground_2d import playground

    calls = {}
    for module_name, function_name in SCRIPT_FUNCTIONS:
        module = importlib.import_module(module_name)
        original = getattr(module, function_name)

        def counted(*args, _original=original, _name=function_name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, function_name, counted)
    summary = playground.main(playground.parse_args([*map(str, REDUCED), "--output_dir", str(tmp_path)]))
    assert sorted(calls) == sorted(name for _, name in SCRIPT_FUNCTIONS), calls
    for name in ("results.md", "results.json", "modes.png", "mismatch.png", "capo.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    table = (tmp_path / "results.md").read_text()
    for row in ("| reference |", "| Diffusion-DPO, β = 1000 |", "| DDSPO, β = 100 |", "| MaPO, β = 8 |", "| CaPO,"):
        assert row in table, row
    assert all(row["n"] == 5 for row in summary["summary"]["modes"]["mode_acc"])


def test_a_reduced_beta_sweep_reruns_with_more_seeds_only_where_the_intervals_overlap(tmp_path, monkeypatch):
    from examples.playground_2d import playground, report

    sweep_round = report.sweep_round

    def overlapping_at_one_only(round_):  # the verdicts are fixed here; the rule has its own test above
        summary = sweep_round(round_)
        for gap in summary["gaps"]:
            gap["intervals_overlap"] = gap["beta"] == 1.0
        return summary

    monkeypatch.setattr(report, "sweep_round", overlapping_at_one_only)
    flags = [*REDUCED, "--experiments", "beta_sweep", "--sweep_betas", 1, 100, "--sweep_more_seeds", 6]
    record = playground.main(playground.parse_args([*map(str, flags), "--output_dir", str(tmp_path)]))
    for name in ("results.md", "results.json", "beta_sweep.png", "beta_sweep_samples_round1.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    first, second = record["summary"]["beta_sweep"]
    assert first["seeds"] == [0, 1, 2, 3, 4] and [gap["beta"] for gap in first["gaps"]] == [1.0, 100.0]
    assert second["seeds"] == list(range(5, 11)) and [gap["beta"] for gap in second["gaps"]] == [1.0]
    table = (tmp_path / "results.md").read_text()
    for number, betas, seeds in ((1, [1, 100], 5), (2, [1], 6)):
        section = table.split(f"### Round {number}:", 1)[1].split("###", 1)[0]
        rows = re.findall(r"^\| (Diffusion-DPO|DDSPO), β = (\d+) \| .* \| (\d+) \|$", section, re.M)
        assert rows == [(method, str(beta), str(seeds)) for method in ("Diffusion-DPO", "DDSPO") for beta in betas]
    gaps = table.split("### The gap in mode accuracy", 1)[1]
    assert re.search(
        r"^\| 1 \| [+-]\d\.\d{3} ± \d\.\d{3} \| overlap \| [+-]\d\.\d{3} ± \d\.\d{3} \| overlap \|$", gaps, re.M
    )
    assert re.search(r"^\| 100 \| [+-]\d\.\d{3} ± \d\.\d{3} \| apart \| – \| not run \|$", gaps, re.M), gaps


# ----------------------------------------------------------------------------------------------
# The committed numbers: the playground README quotes them, a default run reproduces them
# ----------------------------------------------------------------------------------------------
def table_lines(markdown, heading):
    section = markdown.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| |")]


@pytest.mark.parametrize("heading", ["Class modes (DDSPO Fig. 2)", "Reference mismatch (MaPO §3.1)"])
def test_the_readme_quotes_the_committed_table(heading):
    readme = (REPO / "examples" / "playground_2d" / "README.md").read_text()
    lines = table_lines((COMMITTED / "results.md").read_text(), heading)
    assert lines
    missing = [line for line in lines if line not in readme]
    assert not missing, f"examples/playground_2d/README.md lacks {missing}"


def test_the_committed_sweep_table_is_what_its_results_json_renders():
    from examples.playground_2d import report

    record = json.loads((COMMITTED_SWEEP / "results.json").read_text())
    assert report.markdown(record["summary"], record["settings"]) == (COMMITTED_SWEEP / "results.md").read_text()


def test_the_readme_quotes_the_committed_sweep():
    """The gap table, and every mean ± half-width the README's β-sweep section quotes, come from docs/toy2d/sweep."""
    readme = (REPO / "examples" / "playground_2d" / "README.md").read_text()
    committed = (COMMITTED_SWEEP / "results.md").read_text()
    gap_table = committed.split("### The gap in mode accuracy", 1)[1].split("\n## ", 1)[0]
    gap_lines = [line for line in gap_table.splitlines() if line.startswith("| ") and not line.startswith("| β |")]
    assert len(gap_lines) == len(json.loads((COMMITTED_SWEEP / "results.json").read_text())["settings"]["sweep_betas"])
    missing = [line for line in gap_lines if line not in readme]
    assert not missing, f"examples/playground_2d/README.md lacks {missing}"
    section = readme.split("## β sweep", 1)[1].split("\n## ", 1)[0]
    quoted = re.findall(r"[+-]?\d\.\d{3} ± \d\.\d{3}", section)
    assert len(quoted) > len(gap_lines)
    not_committed = [number for number in quoted if number not in committed]
    assert not not_committed, f"the README's β sweep quotes {not_committed}, not in {COMMITTED_SWEEP}/results.md"


def committed_means(summary):
    """{(table, metric, row name, column): (mean, half-width)} of a results.json summary."""
    means = {}
    for table in ("modes", "capo"):
        for metric, rows in summary.get(table, {}).items():
            for row in rows:
                means[(table, metric, row["name"], "")] = (row["mean"], row["half_width"])
    for row in summary.get("mismatch", []):
        for shift, cell in zip(row["shifts"], row["cells"]):
            means[("mismatch", "swd", row["name"], f"d = {shift:g}")] = (cell["mean"], cell["half_width"])
    return means


@pytest.mark.slow
def test_the_default_run_reproduces_the_committed_numbers(tmp_path):
    """The whole default setting (about 1.5 minutes on one core)."""
    result = run_python(PLAYGROUND, ["--output_dir", tmp_path], timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]
    committed = committed_means(json.loads((COMMITTED / "results.json").read_text())["summary"])
    rerun = committed_means(json.loads((tmp_path / "results.json").read_text())["summary"])
    assert rerun.keys() == committed.keys()
    off = []
    for key, (mean, half_width) in committed.items():
        tolerance = max(ABSOLUTE_TOLERANCE, 0.5 * half_width if math.isfinite(half_width) else 0.0)
        if not abs(rerun[key][0] - mean) <= tolerance:
            off.append(f"{key}: committed {mean:.4f}, rerun {rerun[key][0]:.4f}, tolerance {tolerance:.4f}")
    assert not off, "\n".join(off)
    assert re.search(r"\| reference \|", (tmp_path / "results.md").read_text())
