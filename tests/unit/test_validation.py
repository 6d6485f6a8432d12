"""utils/validation.py: the win-rate that validation by reward logs and compare.py tables, and the best step."""

import numpy as np
import pytest

from examples.eval import compare
from utils.validation import (
    best_validation_step,
    describe_reward_validation,
    reward_validation_metrics,
    validation_image_seed,
    win_rate,
)


def test_win_rate_counts_every_one_of_the_k_by_k_prime_comparisons_and_a_tie_as_half():
    # model [1, 3] against base [1, 2, 4]: 1 ties 1 (1/2), loses to 2 and 4; 3 beats 1 and 2, loses to 4
    assert win_rate([1.0, 3.0], [1.0, 2.0, 4.0]) == pytest.approx((0.5 + 0 + 0 + 1 + 1 + 0) / 6)
    assert win_rate([2.0, 2.0], [2.0]) == 0.5


def test_win_rate_of_a_model_against_itself_is_one_half():
    scores = np.random.default_rng(0).normal(size=7)
    assert win_rate(scores, scores) == 0.5


def test_win_rate_is_not_symmetric_in_its_arguments():
    assert win_rate([5.0, 6.0], [1.0, 7.0]) == 0.5 and win_rate([5.0, 6.0], [1.0, 2.0]) == 1.0
    assert win_rate([1.0, 2.0], [5.0, 6.0]) == 0.0


def test_compare_tables_win_rates_with_the_function_the_training_scripts_log():
    assert compare.win_rate is win_rate


def test_best_validation_step_is_the_argmax_and_the_earliest_of_equal_win_rates():
    assert best_validation_step({0: 0.5, 100: 0.7, 200: 0.65}) == 100
    assert best_validation_step({0: 0.5, 200: 0.7, 100: 0.7, 300: 0.6}) == 100
    assert best_validation_step({0: 0.5, 100: 0.4}) == 0  # the base itself
    assert best_validation_step({}) is None
    assert best_validation_step({0: float("nan"), 100: 0.4, 200: float("nan")}) == 100  # nan is never the best
    assert best_validation_step({0: float("nan")}) is None


def test_reward_validation_metrics_average_prompts_then_rewards():
    base = {"a": np.array([[0.0, 1.0], [0.0, 1.0]]), "b": np.array([[0.0, 0.0], [0.0, 0.0]])}
    model = {"a": np.array([[2.0, 2.0], [0.5, 0.5]]), "b": np.array([[-1.0, -1.0], [-1.0, -1.0]])}
    metrics = reward_validation_metrics(model, base)
    assert metrics["win_rate_a"] == pytest.approx((1.0 + 0.5) / 2) and metrics["win_rate_b"] == 0.0
    assert metrics["win_rate"] == pytest.approx((0.75 + 0.0) / 2)
    assert metrics["reward_a"] == pytest.approx(1.25) and metrics["reward_b"] == -1.0
    assert reward_validation_metrics(base, base)["win_rate"] == 0.5
    assert metrics["unscored_a"] == metrics["unscored_b"] == 0


def test_a_score_that_is_not_a_number_is_left_out_and_counted_not_scored_as_a_loss():
    nan, inf = float("nan"), float("inf")
    base = {"a": np.array([[0.0, 1.0], [0.0, nan]])}
    model = {"a": np.array([[2.0, nan], [nan, -inf]])}
    metrics = reward_validation_metrics(model, base)
    # Prompt 0: the finite 2.0 beats both base images; prompt 1 has no finite model score and is left out.
    assert metrics["win_rate_a"] == metrics["win_rate"] == 1.0
    assert metrics["reward_a"] == 2.0 and metrics["unscored_a"] == 3
    line = describe_reward_validation(metrics, ["a"])
    assert line == "a 1.000 (mean reward 2) [3 images without a finite score, left out]"
    assert describe_reward_validation(reward_validation_metrics(base, base), ["a"]).endswith("left out]")
    nothing = reward_validation_metrics({"a": np.full((2, 2), nan)}, base)
    assert np.isnan(nothing["win_rate"]) and nothing["unscored_a"] == 4


def test_generate_py_seeds_its_images_with_the_function_the_scripts_seed_validation_images_with():
    from examples.eval import generate

    assert generate.image_seed is validation_image_seed  # tools/test_eval.py checks the seeds generate.py records
