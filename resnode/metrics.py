"""Diagnostics shared by the chapters: fitted rates of convergence, the order of 1-D maps."""

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


def reversed_pairs(x, y):
    """Fraction of the pairs of points whose order ``y`` strictly reverses: ``#{i < j : (x_i - x_j)(y_i - y_j) < 0}``
    over the ``n (n - 1) / 2`` pairs of the ``n`` points.

    ``x`` and ``y`` are ``(..., points)`` (leading dimensions broadcast: copies, layers); returns an array of the
    leading shape, or a float for 1-D input. It measures the *final order* of a 1-D map (Sander et al. Fig. 1):
    0 for an increasing map, 1 for a strictly decreasing one of distinct points, and 0 for a map that merges
    points (a tie, in ``x`` or in ``y``, is not a reversal), so a network that collapsed its inputs to one value
    is not mistaken for one that reversed them. Without ties, Kendall's tau of ``y`` against ``x`` is
    ``1 - 2 * reversed_pairs(x, y)``. Between consecutive layers (``x = paths[:-1]``, ``y = paths[1:]``) it is
    0 for the flow of a 1-D ODE and for a ResNet layer ``h + a f(h)`` with ``a Lip(f) < 1``, which are increasing.
    """
    x, y = np.broadcast_arrays(np.asarray(x, dtype=float), np.asarray(y, dtype=float))
    if x.ndim == 0 or x.shape[-1] < 2:
        raise ValueError(f"x and y need a last dimension of at least 2 points; got shape {x.shape}")
    i, j = np.triu_indices(x.shape[-1], k=1)
    fraction = ((x[..., i] - x[..., j]) * (y[..., i] - y[..., j]) < 0).mean(-1)
    return float(fraction) if fraction.ndim == 0 else fraction


def coinciding(curves, rtol: float, log: bool = False) -> list[list[int]]:
    """Group the consecutive rows of ``curves`` (``(curves, points)``) that a plot would draw on top of each other.

    Row ``k`` joins the group of row ``k - 1`` when it is within ``rtol`` of that group's first row ``g``:
    ``max |c_k - c_g| <= rtol * max |c_g|`` on linear axes, ``max |log c_k - log c_g| <= log(1 + rtol)`` on
    logarithmic ones (``log=True``: every point relative to its own size, so that curves spanning decades are
    compared at every scale). Returns the groups as lists of row indices, in order; a figure draws one curve per
    group and names the rows it stands for, instead of drawing identical curves as if they were different data.
    """
    curves = np.asarray(curves, dtype=float)
    if curves.ndim != 2 or len(curves) == 0:
        raise ValueError(f"curves must be a non-empty (curves, points) array; got shape {curves.shape}")
    if not rtol >= 0:
        raise ValueError(f"rtol must be non-negative; got {rtol}")
    if log:
        if (curves <= 0).any():
            raise ValueError("coinciding(log=True) needs positive values")
        curves, close = np.log(curves), lambda c, g: np.abs(c - g).max() <= np.log1p(rtol)
    else:
        close = lambda c, g: np.abs(c - g).max() <= rtol * np.abs(g).max()
    groups = [[0]]
    for k in range(1, len(curves)):
        if close(curves[k], curves[groups[-1][0]]):
            groups[-1].append(k)
        else:
            groups.append([k])
    return groups


__all__ = ["loglog_slope", "exponential_rate", "uniform_exponential_rate", "reversed_pairs", "coinciding"]
