"""The playground's metrics on plain arrays of 2-D points, and the interval over seeds.

Numpy only, so that they can be checked on hand-made point sets without a model.
"""

import math

import numpy as np


# Two-sided 95 % quantiles of Student's t by degrees of freedom; above 30 the normal's 1.96 is within 2 %.
T_QUANTILE_975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    12: 2.179,
    15: 2.131,
    20: 2.086,
    30: 2.042,
}


def mode_accuracy(points, centres, label):
    """Share of `points` (N, 2) whose nearest of the `centres` (K, 2) is centre number `label`."""
    points, centres = np.asarray(points, dtype=np.float64), np.asarray(centres, dtype=np.float64)
    squared_distances = ((points[:, None, :] - centres[None, :, :]) ** 2).sum(axis=-1)  # (N, K)
    return float((squared_distances.argmin(axis=1) == label).mean())


def sliced_wasserstein(points, other_points, num_directions=64):
    """Sliced 2-Wasserstein distance between two sets of N points each (N, 2).

    The directions are evenly spaced on the half circle, so the average over them is exact for a shift:
    two sets that differ by a translation v are |v| / sqrt(2) apart.
    """
    points, other_points = np.asarray(points, dtype=np.float64), np.asarray(other_points, dtype=np.float64)
    if points.shape != other_points.shape:
        raise ValueError(f"Expected two point sets of the same shape, got {points.shape} and {other_points.shape}.")
    angles = np.arange(num_directions) * math.pi / num_directions
    directions = np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (P, 2)
    projected = np.sort(points @ directions.T, axis=0)  # (N, P)
    projected_other = np.sort(other_points @ directions.T, axis=0)
    return float(np.sqrt(((projected - projected_other) ** 2).mean()))


def spread(points):
    """Root-mean-square distance of the points (N, 2) from their mean: sigma * sqrt(2) for an isotropic Gaussian."""
    points = np.asarray(points, dtype=np.float64)
    return float(np.sqrt(((points - points.mean(axis=0)) ** 2).sum(axis=1).mean()))


def t_quantile(degrees_of_freedom):
    """The 97.5 % quantile of Student's t, from the table (the nearest listed degrees of freedom at or below)."""
    listed = [dof for dof in T_QUANTILE_975 if dof <= degrees_of_freedom]
    return 1.96 if degrees_of_freedom > 30 else T_QUANTILE_975[max(listed)]


def interval(values):
    """(mean, half-width of the 95 % t-interval, n) over the finite values; NaN marks a diverged seed and is left
    out of the mean, and the caller names it. The half-width is NaN below two values."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return math.nan, math.nan, 0
    if len(finite) == 1:
        return float(finite[0]), math.nan, 1
    half_width = t_quantile(len(finite) - 1) * finite.std(ddof=1) / math.sqrt(len(finite))
    return float(finite.mean()), float(half_width), len(finite)


def intervals_overlap(values, other_values):
    """Whether the 95 % t-intervals of two sets of per-seed values overlap (or either cannot be computed, so that
    more seeds are what it needs)."""
    mean, half_width, _ = interval(values)
    other_mean, other_half_width, _ = interval(other_values)
    return not abs(mean - other_mean) > half_width + other_half_width
