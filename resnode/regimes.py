"""Scaling regimes of trained weights across depth (Cont, Rossier & Xu, Sections 2-3).

Weights of one network are a stack ``(L, ...)`` (layer first; trailing dimensions are one layer's tensor,
a matrix ``A_k`` or a vector ``b_k``); norms are Frobenius norms of one layer's tensor.

- Table 2.2: :func:`max_norm`, :func:`cumsum_norm`, :func:`increment_norm`, :func:`root_sum_squares`;
  Step 4: :func:`quadratic_variation`.
- Steps 1-2: :func:`exponent` (log-log slope of a statistic over depths).
- Step 3, eq. (2.4): :func:`rescaled_cumsum`, :func:`mean_path` (the trend integral averaged over depths),
  :func:`trend`, :func:`noise` (the path ``W^A`` left over).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from . import _checks, metrics


def _stack(A) -> Tensor:
    A = torch.as_tensor(A)
    if A.dim() < 2 or len(A) < 2:
        raise ValueError(f"A must be a stack (L, ...) of at least 2 layer tensors; got shape {tuple(A.shape)}")
    return A


def _norms(A: Tensor) -> Tensor:
    return torch.linalg.vector_norm(A.flatten(1), dim=1)


def max_norm(A) -> float:
    """Table 2.2, maximum norm: ``max_k ||A_k||``. Scaling regime 1 (2.2) makes it ``~ L^-beta ||A_bar||_inf``."""
    return float(_norms(_stack(A)).max())


def cumsum_norm(A) -> float:
    """Table 2.2, cumulative sum norm: ``max_k ||sum_{j <= k} A_j||`` (the running maximum; the authors' code keeps
    only the total sum ``k = L - 1``). Under either regime it grows like ``L^(1 - beta)`` (Step 1, by (2.4))."""
    return float(_norms(torch.cumsum(_stack(A), 0)).max())


def increment_norm(A, beta: float) -> float:
    """Table 2.2, beta-scaled norm of increments: ``L^beta max_k ||A_{k+1} - A_k||`` (Step 2). It vanishes like
    ``1/L`` when ``L^beta A_k = A_bar(k/L)`` with ``A_bar`` Lipschitz; it does not vanish in Scaling regime 2."""
    A = _stack(A)
    return float(len(A) ** _checks.nonnegative_float("beta", beta) * _norms(A[1:] - A[:-1]).max())


def root_sum_squares(A) -> float:
    """Table 2.2, root sum of squares: ``(sum_k ||A_k||^2)^(1/2)``."""
    return float(torch.linalg.vector_norm(_stack(A)))


def quadratic_variation(path) -> float:
    """Step 4: ``sum_k ||W_{k+1} - W_k||^2`` of a path ``W`` ``(K + 1, ...)`` (the trace of the quadratic
    variation tensor ``[W]_1``). For a Brownian motion sampled on ``K`` steps it tends to ``t`` x the number of
    coordinates; for a Lipschitz path it is ``O(1/K)``."""
    W = _stack(path)
    return float((W[1:] - W[:-1]).square().sum())


STATISTICS = ("max", "cumsum", "increment", "rss")


def statistics(A, beta: float = 0.0) -> dict[str, float]:
    """The four quantities of Table 2.2 for one stack ``(L, ...)`` (``beta`` scales the increments)."""
    return {"max": max_norm(A), "cumsum": cumsum_norm(A), "increment": increment_norm(A, beta),
            "rss": root_sum_squares(A)}


def exponent(depths: Sequence[int], values: Sequence[float], statistic: str = "max") -> float:
    """Steps 1-2: the scaling exponent ``beta`` from a log-log fit of a statistic over depths.

    ``"max"``: ``max_k ||A_k|| ~ L^-beta`` (the authors' fit), ``beta = -slope``; ``"cumsum"``: the cumulative
    sum norm ``~ L^(1 - beta)`` (Step 1), ``beta = 1 - slope``; anything else (``"increment"``, ``"rss"``):
    the slope itself.
    """
    statistic = _checks.one_of("statistic", statistic, STATISTICS)
    slope = metrics.loglog_slope(depths, values)
    if statistic == "max":
        return -slope
    if statistic == "cumsum":
        return 1 - slope
    return slope


def _at_fraction(values: Tensor, numerator: Tensor, denominator: int) -> Tensor:
    """``values`` (``(M + 1, ...)``, taken at the integers) linearly interpolated at ``numerator / denominator``: the
    integer part and the fraction are computed exactly, so a point that falls on an integer reads that row."""
    whole = torch.div(numerator, denominator, rounding_mode="floor")
    fraction = ((numerator - whole * denominator).to(values.dtype) / denominator).reshape(-1, *(1,) * (values.dim() - 1))
    padded = torch.cat([values, values[-1:]])  # the last point reads its row with fraction 0
    return padded[whole] + fraction * (padded[whole + 1] - padded[whole])


def rescaled_cumsum(A, beta: float, grid: int = 500) -> Tensor:
    """Step 3: ``I^L(t_i) = L^(beta - 1) int_0^(t_i L) A_floor(u) du`` on ``t_i = i / grid``, shape ``(grid + 1, ...)``.

    That is ``L^(beta - 1) sum_{k < t_i L} A_k`` when ``t_i L`` is an integer (``L`` a multiple of ``grid``), and the
    cumulative sum interpolated linearly between layers otherwise: a layer that straddles ``t_i L`` counts with the
    fraction of it below. (Counting whole layers instead would give the cells of the grid ``floor`` or ``ceil`` of
    ``L / grid`` layers, and a smooth ``A`` a trend that alternates with the cell sizes.) By (2.4) it tends to
    ``int_0^t A_bar_s ds + W^A_t`` in Scaling regime 2 (and to the integral alone in regime 1).
    """
    A = _stack(A)
    grid = _checks.positive_int("grid", grid)
    depth = len(A)
    sums = torch.cat([torch.zeros_like(A[:1]), torch.cumsum(A, 0)])
    return depth ** (_checks.nonnegative_float("beta", beta) - 1) * _at_fraction(sums, torch.arange(grid + 1) * depth, grid)


def mean_path(stacks: Mapping[int, Tensor] | Sequence[Tensor], beta: float, grid: int = 500) -> Tensor:
    """Step 3: the average over depths of :func:`rescaled_cumsum`, ``I_bar(t) ~ int_0^t A_bar_s ds``. Networks
    trained at different depths share the trend; their noise parts average out (partly): the authors average 4
    depths (``denoising.py``)."""
    stacks = list(stacks.values()) if isinstance(stacks, Mapping) else list(stacks)
    if not stacks:
        raise ValueError("stacks must hold at least one stack of weights")
    return torch.stack([rescaled_cumsum(A, beta, grid) for A in stacks]).mean(0)


def trend(path: Tensor, depth: int, beta: float) -> Tensor:
    """Step 3: the trend weights of a depth-``L`` network from ``I_bar`` on ``t_i = i / G`` (``path``, ``(G + 1, ...)``):
    ``A_bar^L_k = L^(1 - beta) (I_bar((k + 1) / L) - I_bar(k / L))`` with ``I_bar`` interpolated linearly between the
    grid points, shape ``(L, ...)``.

    So ``A_bar^L_k`` is ``L^-beta`` times the mean over ``[k/L, (k+1)/L]`` of the finite difference
    ``G (I_bar(t_{i+1}) - I_bar(t_i))``, an estimate of ``A_bar``: a layer inside one grid cell gets that cell's rate (for
    ``L`` a multiple of ``G``, every layer), a layer across a cell boundary the mean of the two. And
    ``L^(beta - 1) sum_{j < k} A_bar^L_j = I_bar(k / L)`` exactly, at every ``k``.
    """
    depth = _checks.positive_int("depth", depth)
    grid = len(path) - 1
    if grid < 1:
        raise ValueError("path must hold at least two grid points")
    at_layers = _at_fraction(path, torch.arange(depth + 1) * grid, depth)  # I_bar(k / L), k = 0..L
    return depth ** (1 - _checks.nonnegative_float("beta", beta)) * (at_layers[1:] - at_layers[:-1])


def noise(A, trend_weights: Tensor, beta: float) -> Tensor:
    """Step 3: the noise path ``W^{A,L}_k = L^(beta - 1) sum_{j < k} (A_j - A_bar^L_j)``, ``k = 0 .. L``, by (2.3)."""
    A = _stack(A)
    if trend_weights.shape != A.shape:
        raise ValueError(f"trend_weights must have the shape of A {tuple(A.shape)}; got {tuple(trend_weights.shape)}")
    residual = torch.cumsum(A - trend_weights, 0)
    return len(A) ** (_checks.nonnegative_float("beta", beta) - 1) * torch.cat([torch.zeros_like(A[:1]), residual])


def decompose(stacks: Mapping[int, Tensor], beta: float, grid: int = 500,
              mean_over: Sequence[int] | None = None) -> dict[int, tuple[Tensor, Tensor]]:
    """Step 3 for every depth of ``stacks``: ``{L: (trend weights (L, ...), noise path (L + 1, ...))}``, the trend
    integral averaged over the depths ``mean_over`` (default: all)."""
    chosen = list(stacks) if mean_over is None else list(mean_over)
    missing = [L for L in chosen if L not in stacks]
    if missing:
        raise ValueError(f"mean_over names depths without weights: {missing}")
    path = mean_path([stacks[L] for L in chosen], beta, grid)
    out = {}
    for depth, A in stacks.items():
        smooth = trend(path, len(A), beta).to(A)
        out[depth] = (smooth, noise(A, smooth, beta))
    return out


def noise_fraction(A, trend_weights: Tensor) -> float:
    """``||A - A_bar^L|| / ||A||`` over all layers: the share of the weights the trend leaves unexplained."""
    A = _stack(A)
    return float(torch.linalg.vector_norm(A - trend_weights) / torch.linalg.vector_norm(A))


__all__ = ["max_norm", "cumsum_norm", "increment_norm", "root_sum_squares", "quadratic_variation", "STATISTICS",
           "statistics", "exponent", "rescaled_cumsum", "mean_path", "trend", "noise", "decompose", "noise_fraction"]
