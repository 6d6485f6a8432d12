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
    """The step with the highest win-rate in {step: win-rate}; the earliest of equal ones. A step whose win-rate is
    not a number (no image of it had a finite score) is never the best; None when no step has one."""
    best = None
    for step in sorted(win_rates):
        if np.isfinite(win_rates[step]) and (best is None or win_rates[step] > win_rates[best]):
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
    `win_rate_<reward>` (the mean over prompts of `win_rate`, as compare.py averages it), `reward_<reward>` (the
    mean score) and `unscored_<reward>` (the model's images without a finite score), and `win_rate`, the mean of the
    rewards' win-rates. As in compare.py, a nan or infinite score (a reward that failed on an image) is left out
    and counted, not scored as a loss: the win-rate of a prompt is over its finite scores, and a prompt without
    one on either side is left out (nan when every prompt is)."""
    metrics = {}
    for name, prompt_scores in scores.items():
        model_scores = [np.asarray(model, dtype=np.float64) for model in prompt_scores]
        finite_pairs = [
            (model[np.isfinite(model)], base[np.isfinite(base)])
            for model, base in zip(model_scores, (np.asarray(b, dtype=np.float64) for b in base_scores[name]))
        ]
        prompt_win_rates = [win_rate(model, base) for model, base in finite_pairs if len(model) and len(base)]
        finite = np.concatenate([model for model, _ in finite_pairs]) if finite_pairs else np.array([])
        metrics[f"win_rate_{name}"] = float(np.mean(prompt_win_rates)) if prompt_win_rates else float("nan")
        metrics[f"reward_{name}"] = float(np.mean(finite)) if len(finite) else float("nan")
        metrics[f"unscored_{name}"] = int(sum(model.size for model in model_scores) - len(finite))
    rates = [metrics[f"win_rate_{name}"] for name in scores if np.isfinite(metrics[f"win_rate_{name}"])]
    return {"win_rate": float(np.mean(rates)) if rates else float("nan"), **metrics}


def describe_reward_validation(metrics, names):
    """The log line's per-reward part: `name win-rate (mean reward r)`, and how many images had no finite score."""
    parts = []
    for name in names:
        part = f"{name} {metrics[f'win_rate_{name}']:.3f} (mean reward {metrics[f'reward_{name}']:.4g})"
        if metrics[f"unscored_{name}"]:
            part += f" [{metrics[f'unscored_{name}']} images without a finite score, left out]"
        parts.append(part)
    return ", ".join(parts)
