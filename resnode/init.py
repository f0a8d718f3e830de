"""Initialisations of stacked residual weights across depth: zero, tied, i.i.d., smooth (Gaussian process), alternating.

The smooth kind samples every entry as an independent zero-mean Gaussian process in depth with the
RBF covariance ``K(s, s') = std^2 exp(-(s - s')^2 / (2 l^2))`` on the grid ``s_k = k * spacing``
(Marion et al. Section 4.3), exactly up to rounding, by circulant embedding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _checks

INIT_KINDS = ("zero", "tied", "iid", "smooth", "alternating")


def rbf_kernel(lag: Tensor, lengthscale: float) -> Tensor:
    """``exp(-lag^2 / (2 l^2))``, the covariance of the smooth initialisation."""
    lengthscale = _checks.positive_float("lengthscale", lengthscale)
    return torch.exp(-0.5 * (lag / lengthscale) ** 2)


def gaussian_process(num_points: int, spacing: float, shape: Sequence[int] = (), lengthscale: float = 0.1,
                     std: float = 1.0, generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float64) -> Tensor:
    """Samples of a stationary RBF Gaussian process on ``k * spacing``, ``k < num_points``: shape ``(num_points, *shape)``.

    Circulant embedding: the Toeplitz covariance is embedded in a circulant one of size ``M`` (a
    power of two, padded until the kernel has decayed below 1e-12), whose eigenvalues are an FFT.
    When that padding would exceed ``8 * num_points`` (a length-scale far beyond the grid's span), the
    ``num_points x num_points`` covariance is factorised directly (its eigendecomposition, negative
    rounding-level eigenvalues set to zero), so that the memory stays ``O(num_points^2)``.
    """
    n = _checks.positive_int("num_points", num_points)
    spacing = _checks.positive_float("spacing", spacing)
    lengthscale = _checks.positive_float("lengthscale", lengthscale)
    std = _checks.positive_float("std", std)
    count = math.prod(shape)
    reach = lengthscale * math.sqrt(2 * math.log(1e12)) / spacing
    if reach > 8 * n:
        lags = torch.arange(n, dtype=torch.float64) * spacing
        eigenvalues, vectors = torch.linalg.eigh(rbf_kernel(lags[:, None] - lags[None, :], lengthscale))
        factor = vectors * eigenvalues.clamp(min=0).sqrt()
        values = factor @ torch.randn(n, count, generator=generator, dtype=torch.float64)
        return (std * values).reshape(n, *shape).to(dtype)
    size = 2 ** math.ceil(math.log2(max(2 * (n - 1) + 2 * math.ceil(reach), 2)))
    j = torch.arange(size, dtype=torch.float64)
    row = rbf_kernel(torch.minimum(j, size - j) * spacing, lengthscale)
    eigenvalues = torch.fft.fft(row).real
    if eigenvalues.min() < -1e-8 * eigenvalues.max():
        raise RuntimeError("circulant embedding is not positive semi-definite; increase the padding")
    scale = torch.sqrt(eigenvalues.clamp(min=0) / size)
    pairs = (count + 1) // 2
    samples = []
    for start in range(0, pairs, 256):  # chunks bound the memory of the FFT at large depth
        k = min(256, pairs - start)
        z = torch.complex(torch.randn(size, k, generator=generator, dtype=torch.float64),
                          torch.randn(size, k, generator=generator, dtype=torch.float64))
        y = torch.fft.fft(scale[:, None] * z, dim=0)[:n]
        samples += [y.real, y.imag]
    values = torch.cat(samples, dim=1)[:, :count] if count else torch.zeros(n, 0, dtype=torch.float64)
    return (std * values).reshape(n, *shape).to(dtype)


def _one(kind: str, depth: int, shape: Sequence[int], std: float, lengthscale: float, spacing: float,
         generator: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    _checks.one_of("init", kind, INIT_KINDS)
    if kind == "zero":
        return torch.zeros(depth, *shape, dtype=dtype)
    if kind == "tied":
        return (std * torch.randn(*shape, generator=generator, dtype=dtype)).expand(depth, *shape).clone()
    if kind == "alternating":
        signs = 1.0 - 2.0 * (torch.arange(depth) % 2).to(dtype)
        tied = std * torch.randn(*shape, generator=generator, dtype=dtype)
        return signs.reshape(depth, *(1,) * len(shape)) * tied
    if kind == "iid":
        return std * torch.randn(depth, *shape, generator=generator, dtype=dtype)
    return gaussian_process(depth, spacing, shape, lengthscale, std, generator, dtype)


def init_weights(kind: str | Sequence[str], depth: int, shapes: Sequence[Sequence[int]], *, std: float = 1.0,
                 lengthscale: float = 0.1, spacing: float | None = None,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> tuple[Tensor, ...]:
    """Stacked weights ``(depth, *shape)`` for each shape in ``shapes``, all of one kind or one kind per tensor.

    Kinds: ``zero``; ``tied`` (one N(0, std^2) draw repeated over depth, Marion et al.'s weight-tied
    init); ``iid`` (independent N(0, std^2) per layer); ``smooth`` (Gaussian process across depth,
    marginal N(0, std^2), RBF length-scale ``lengthscale`` on the grid ``k * spacing``,
    ``spacing = 1/depth`` by default); ``alternating`` (a tied draw times ``(-1)^k``: the oscillating
    weights of Sander et al.'s second counterexample, Section 3.1).
    """
    depth = _checks.positive_int("depth", depth)
    std = _checks.positive_float("std", std)
    lengthscale = _checks.positive_float("lengthscale", lengthscale)
    kinds = (kind,) * len(shapes) if isinstance(kind, str) else tuple(kind)
    if len(kinds) != len(shapes):
        raise ValueError(f"init must be one kind or one per weight tensor ({len(shapes)}); got {kind!r}")
    spacing = 1.0 / depth if spacing is None else spacing
    return tuple(_one(k, depth, tuple(s), std, lengthscale, spacing, generator, dtype) for k, s in zip(kinds, shapes))


def coarsen(weights: Sequence[Tensor], depth: int) -> tuple[Tensor, ...]:
    """The knots ``s = n / depth`` of weights drawn on a finer grid ``s = k / K`` (``K + 1`` knots, ``depth``
    dividing ``K``): every depth then samples one and the same function of ``s``."""
    finest = weights[0].shape[0] - 1
    depth = _checks.positive_int("depth", depth)
    if finest % depth:
        raise ValueError(f"depth {depth} must divide the finest grid's {finest} intervals")
    return tuple(w[:: finest // depth] for w in weights)


__all__ = ["INIT_KINDS", "rbf_kernel", "gaussian_process", "init_weights", "coarsen"]
