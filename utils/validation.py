"""Validation by reward: the win-rate of a model's images against the base model's, and the best validation step.

examples/eval/compare.py computes its win-rates with the same `win_rate`, so a run's logged win-rate and a table
made afterwards from generated and scored images agree.
"""

import numpy as np


def win_rate(model_scores, baseline_scores):
    """CaPO Appendix B.2 for one prompt: the share of the K x K' one-to-one comparisons the model wins, a tie half."""
    model_scores, baseline_scores = np.asarray(model_scores)[:, None], np.asarray(baseline_scores)[None, :]
    return float(((model_scores > baseline_scores) + 0.5 * (model_scores == baseline_scores)).mean())


def best_validation_step(win_rates):
    """The step with the highest win-rate in {step: win-rate}; the earliest of equal ones (None when empty)."""
    best = None
    for step in sorted(win_rates):
        if best is None or win_rates[step] > win_rates[best]:
            best = step
    return best


def validation_image_seed(seed, *indices):
    """The seed of one image, SeedSequence((seed, *indices)): (i, k) for image k of prompt i. The examples' tools
    seed their images with this function (examples/lib/sampling.py's `image_seed`; a pair tool passes its row index),
    so that a checkpoint drawn with examples/eval/generate.py and the same --seed renders the images its validation
    scored. Independent of K, of the other prompts and of how the work is split."""
    return int(np.random.SeedSequence((seed, *indices)).generate_state(1)[0])


def reward_validation_metrics(scores, base_scores):
    """{reward: scores (P, K)} of a model and {reward: scores (P, K')} of the base on the same prompts -> per reward
    `win_rate_<reward>` (the mean over prompts of `win_rate`, as compare.py averages it) and `reward_<reward>` (the
    mean score), and `win_rate`, the mean of the rewards' win-rates."""
    metrics = {}
    for name, prompt_scores in scores.items():
        prompt_win_rates = [win_rate(model, base) for model, base in zip(prompt_scores, base_scores[name])]
        metrics[f"win_rate_{name}"] = float(np.mean(prompt_win_rates))
        metrics[f"reward_{name}"] = float(np.mean(prompt_scores))
    return {"win_rate": float(np.mean([metrics[f"win_rate_{name}"] for name in scores])), **metrics}
