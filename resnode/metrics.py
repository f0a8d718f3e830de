"""Diagnostics shared by the chapters: fitted rates of convergence."""

from __future__ import annotations

import numpy as np


def loglog_slope(x, y) -> float:
    """Least-squares slope of ``log y`` against ``log x``: the exponent ``p`` of ``y ~ C x^p``."""
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape or len(x) < 2:
        raise ValueError(f"x and y need the same length, at least 2; got {len(x)} and {len(y)}")
    if (x <= 0).any() or (y <= 0).any():
        raise ValueError("loglog_slope needs positive x and y")
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def exponential_rate(t, values) -> tuple[float, float]:
    """Least-squares fit of ``log values = a - rate t``: ``(rate, R^2 of the fit)``.

    The rate of linear convergence ``values ~ C e^{-rate t}`` (Marion et al. eq. (10), Polyak's theorem);
    ``R^2`` near 1 says the decay is exponential over the range given.
    """
    t, values = np.asarray(t, dtype=float).ravel(), np.asarray(values, dtype=float).ravel()
    if t.shape != values.shape or len(t) < 3:
        raise ValueError(f"t and values need the same length, at least 3; got {len(t)} and {len(values)}")
    if (values <= 0).any():
        raise ValueError("exponential_rate needs positive values")
    logs = np.log(values)
    coef = np.polyfit(t, logs, 1)
    return float(-coef[0]), float(1 - (logs - np.polyval(coef, t)).var() / logs.var())


def uniform_exponential_rate(t, values) -> float:
    """The largest ``r`` with ``values(t) <= e^{-r t} values(0)`` at every recorded ``t > 0``:
    ``min_t -log(values(t) / values(0)) / t``, the rate of an exponential bound like Marion et al. eq. (10).
    ``t`` must start at 0."""
    t, values = np.asarray(t, dtype=float).ravel(), np.asarray(values, dtype=float).ravel()
    if t.shape != values.shape or len(t) < 2 or t[0] != 0 or (t[1:] <= 0).any():
        raise ValueError("t and values need the same length, at least 2, with t[0] = 0 and later t > 0")
    if (values <= 0).any():
        raise ValueError("uniform_exponential_rate needs positive values")
    return float(np.min(-np.log(values[1:] / values[0]) / t[1:]))


def crossings(paths) -> int:
    """Number of times two 1-D trajectories swap order from one layer to the next (Sander et al. Fig. 1).

    ``paths`` is ``(layers + 1, points)``. The flow of a 1-D ODE never lets trajectories meet, so
    for it this is 0; a ResNet layer ``h + a f(h)`` with ``a Lip(f) < 1`` is increasing, so 0 too.
    """
    paths = np.asarray(paths, dtype=float)
    if paths.ndim != 2:
        raise ValueError(f"paths must be (layers + 1, points); got shape {paths.shape}")
    order = np.sign(paths[:, :, None] - paths[:, None, :])  # (layers + 1, points, points)
    upper = np.triu(np.ones(paths.shape[1], dtype=bool), k=1)
    return int((order[1:] != order[:-1])[:, upper].sum())
