"""CaPO's calibrated rewards (Eq. 7) and pair selection (§4.3), as pure functions on arrays of scores.

Used by capo/select_pairs.py (the pair dataset from scored runs) and the 2-D playground (playground_2d/toy.py), so
that the playground's CaPO pairs are made exactly as the tool makes them. docs/METHODS.md ("CaPO") states the rules.
"""

import numpy as np


SELECTIONS = ("best_worst", "sum", "frontier")
KINDS = ("bradley_terry", "probability")  # examples.rewards.KINDS, repeated so that --help needs no torch
TIE_TOLERANCE = 1e-9  # calibrated values closer than this are equal (sums in another order differ by ~1e-16)


def calibrate(scores, kind, temperature=1.0, alpha=1.0):
    """Calibrated rewards of one prompt's N images (CaPO Eq. 7): the mean win-rate against the other N-1.

    `scores`: (N,) raw scores of one reward. `kind`: "bradley_terry" (Eq. 2, with sigmoid((R_i - R_k) /
    temperature)) or "probability" (Eq. 28, exponent `alpha`). Returns a float64 array (N,) in [0, 1].
    """
    from examples.rewards import preference_probability

    scores = np.asarray(scores, dtype=np.float64)  # (N,)
    if scores.ndim != 1 or len(scores) < 2:
        raise ValueError(f"Calibration needs a 1-D array of at least 2 scores, got shape {scores.shape}.")
    if not np.isfinite(scores).all():
        raise ValueError("Calibration needs finite scores.")
    if kind == "bradley_terry":
        if not temperature > 0:
            raise ValueError(f"The Bradley-Terry temperature must be positive, got {temperature}.")
        scaled = scores / temperature
        win = preference_probability(scaled[:, None], scaled[None, :], kind).numpy()  # (N, N): P(x_i > x_k)
    elif kind == "probability":
        if temperature != 1.0:
            raise ValueError("A temperature applies to Bradley-Terry rewards; probability-like ones take alpha.")
        win = preference_probability(scores[:, None], scores[None, :], kind, alpha=alpha).numpy()  # (N, N)
    else:
        raise ValueError(f"Unknown reward kind {kind!r}; expected one of {KINDS}.")
    np.fill_diagonal(win, 0.0)  # Eq. 7 sums over k != i
    return win.sum(axis=1) / (len(scores) - 1)  # (N,)


def domination_matrix(points):
    """points (N, L) -> bool (N, N), [i, k] true iff point i dominates point k: >= in every coordinate, > in one."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim == 1:
        points = points[:, None]
    difference = points[:, None, :] - points[None, :, :]  # (N, N, L): point i minus point k
    at_least = (difference >= -TIE_TOLERANCE).all(axis=-1)
    better_somewhere = (difference > TIE_TOLERANCE).any(axis=-1)
    return at_least & better_somewhere


def non_dominated(points):
    """Indices of the upper frontier (the Pareto set): the points that no other point dominates."""
    return np.flatnonzero(~domination_matrix(points).any(axis=0))


def dominating_none(points):
    """Indices of the lower frontier: the points that dominate no other point."""
    return np.flatnonzero(~domination_matrix(points).any(axis=1))


def frontier_sets(points):
    """(X+, X-) of §4.3: upper and lower frontiers with the points on both removed. Both are empty exactly when
    no point dominates another (the frontiers coincide); otherwise neither is."""
    upper, lower = set(non_dominated(points).tolist()), set(dominating_none(points).tolist())
    return sorted(upper - lower), sorted(lower - upper)


def frontier_pairs(points, num_pairs, rng):
    """Up to `num_pairs` distinct (x+, x-) index pairs drawn uniformly from X+ x X- (§4.3); [] when the frontiers
    coincide. Uniform over the product is the same as drawing x+ from X+ and x- from X- independently."""
    positives, negatives = frontier_sets(points)
    if not positives or not negatives:
        return []
    num_pairs = min(num_pairs, len(positives) * len(negatives))
    drawn = rng.choice(len(positives) * len(negatives), size=num_pairs, replace=False)
    return [(positives[i // len(negatives)], negatives[i % len(negatives)]) for i in sorted(drawn.tolist())]


def best_worst_pair(values):
    """(argmax, argmin) of one value per image (best-of-N and worst-of-N, §4.3); None when all values tie.
    Ties for the best or the worst go to the first image listed."""
    values = np.asarray(values, dtype=np.float64)
    if values.max() - values.min() <= TIE_TOLERANCE:
        return None
    return int(np.argmax(values)), int(np.argmin(values))


def select_pairs(calibrated, selection, num_pairs=1, rng=None):
    """One prompt's pairs from its calibrated rewards (N, L) -> (list of (pos, neg) indices, skip reason or None).

    Skip reasons are keys of capo/select_pairs.py's PROMPT_SKIPS: "few_images", "tied" (every image has the same
    calibrated values), "coincident_frontiers" (frontier selection: no image dominates another).
    """
    calibrated = np.asarray(calibrated, dtype=np.float64)
    if calibrated.ndim == 1:
        calibrated = calibrated[:, None]
    if len(calibrated) < 2:
        return [], "few_images"
    if (calibrated.max(axis=0) - calibrated.min(axis=0) <= TIE_TOLERANCE).all():
        return [], "tied"
    if selection == "best_worst":
        if calibrated.shape[1] != 1:
            raise ValueError("best_worst selects with one reward; use sum or frontier for several.")
        pair = best_worst_pair(calibrated[:, 0])
    elif selection == "sum":
        pair = best_worst_pair(calibrated.sum(axis=1))
    elif selection == "frontier":
        pairs = frontier_pairs(calibrated, num_pairs, rng if rng is not None else np.random.default_rng(0))
        return pairs, None if pairs else "coincident_frontiers"
    else:
        raise ValueError(f"Unknown selection {selection!r}; expected one of {SELECTIONS}.")
    return ([pair], None) if pair is not None else ([], "tied")  # sum: rewards can cancel out exactly


def prompt_rng(seed, prompt_index):
    """The random draws of one prompt: independent of the other prompts and of the order they are read in."""
    return np.random.default_rng(np.random.SeedSequence((seed, prompt_index)))
