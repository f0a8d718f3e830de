"""Deep linear ResNets ``Pi^N = (I + theta_N / N) ... (I + theta_1 / N)`` (Sander et al. Section 3.2).

Training them on ``L = ||Pi^N - B||_Sigma^2 = Tr((Pi^N - B) Sigma (Pi^N - B)^T)`` (eq. (5)) is deep
matrix factorisation. Products over all layers before and after each layer are computed by parallel
prefix products (``log2 N`` batched matrix products), so the closed-form gradient costs
``O(N d^3)`` arithmetic in ``O(log N)`` Python steps and depths of thousands train in seconds.
Layers are indexed from 0 here: ``theta[n]`` is the paper's ``theta_{n+1}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import _checks
from .train import check_divergence


def _check_weights(thetas: Tensor) -> None:
    if thetas.ndim < 3 or thetas.shape[-1] != thetas.shape[-2]:
        raise ValueError(f"thetas must be (depth, ..., d, d); got shape {tuple(thetas.shape)}")


def prefix_products(factors: Tensor) -> Tensor:
    """``P[n] = F[n] @ F[n-1] @ ... @ F[0]`` for stacked square ``factors`` (first dimension: layers).

    Hillis-Steele scan: after the round with shift ``k``, ``P[n]`` holds the product of the ``2k``
    factors ending at ``n``.
    """
    out, shift = factors, 1
    while shift < len(factors):
        out = torch.cat([out[:shift], out[shift:] @ out[:-shift]])
        shift *= 2
    return out


def suffix_products(factors: Tensor) -> Tensor:
    """``S[n] = F[N-1] @ ... @ F[n+1] @ F[n]``, the mirror image of ``prefix_products``."""
    out, shift = factors, 1
    while shift < len(factors):
        out = torch.cat([out[shift:] @ out[:-shift], out[-shift:]])
        shift *= 2
    return out


def products(thetas: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(Pi, before, after)``: the network ``Pi^N`` and, for each layer ``n``, the products of the layers
    before it (``F[n-1] ... F[0]``, the paper's ``Pi_{n:}``) and after it (``F[N-1] ... F[n+1]``, ``Pi_{:n}``)."""
    _check_weights(thetas)
    depth, eye = thetas.shape[0], torch.eye(thetas.shape[-1], dtype=thetas.dtype).expand_as(thetas[:1])
    factors = eye + thetas / depth
    prefix, suffix = prefix_products(factors), suffix_products(factors)
    return prefix[-1], torch.cat([eye, prefix[:-1]]), torch.cat([suffix[1:], eye])


def sigma_norm2(a: Tensor, covariance: Tensor) -> Tensor:
    """``||A||_Sigma^2 = Tr(A Sigma A^T)``."""
    return torch.einsum("...ij,jk,...ik->...", a, covariance, a)


def loss_and_gradient(thetas: Tensor, target: Tensor, covariance: Tensor) -> tuple[Tensor, Tensor]:
    """``L = ||Pi^N - B||_Sigma^2`` and its exact gradient ``grad_n = (2/N) after_n^T (Pi^N - B) Sigma before_n^T``.

    The paper writes ``N grad_n = Pi_{:n}^T (Pi^N - B) Sigma Pi_{n:}^T``, without the factor 2 that
    the derivative of the square brings (its Appendix A.2 then carries constants for either).
    """
    total, before, after = products(thetas)
    residual = total - target
    gradient = (2 / thetas.shape[0]) * after.mT @ (residual @ covariance) @ before.mT
    return sigma_norm2(residual, covariance), gradient


def assumption_1(thetas: Tensor, target: Tensor, covariance: Tensor) -> dict[str, float]:
    """Sander et al. Assumption 1: ``sqrt(l(0)) < m / (4 sqrt(2 M e^3))`` and ``||theta_n(0)|| <= 1/4`` (spectral norm)."""
    eigenvalues = torch.linalg.eigvalsh(covariance)
    m, M = eigenvalues.min().item(), eigenvalues.max().item()
    loss, _ = loss_and_gradient(thetas, target, covariance)
    return {"sqrt_loss": math.sqrt(loss.item()), "loss_limit": m / (4 * math.sqrt(2 * M * math.e**3)),
            "max_weight_norm": torch.linalg.matrix_norm(thetas, ord=2).max().item(), "weight_limit": 0.25,
            "m": m, "M": M}


@dataclass
class FlowRecord:
    """Statistics of one gradient-flow run, kept at the recorded times (memory independent of the step count)."""

    times: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    max_increment: list[float] = field(default_factory=list)  # N max_n ||theta_{n+1} - theta_n|| (Prop. 2)
    max_norm: list[float] = field(default_factory=list)  # max_n ||theta_n||, spectral norm
    max_moved: list[float] = field(default_factory=list)  # max_n ||theta_n(t) - theta_n(0)||: how far training moved them
    moved_increment: list[float] = field(default_factory=list)  # N max_n ||d_{n+1} - d_n||, d_n = theta_n(t) - theta_n(0)
    pl_low: list[float] = field(default_factory=list)  # min_n N^2 ||grad_n||^2 / (m l)
    pl_high: list[float] = field(default_factory=list)  # max_n N^2 ||grad_n||^2 / (M l)
    snapshots: list[Tensor] = field(default_factory=list)  # theta at the snapshot times

    def as_tensors(self) -> dict[str, Tensor]:
        """Each statistic as a float64 tensor ``(records,)`` under its field name, and the snapshots stacked as
        ``"snapshots"`` ``(snapshots, depth, ..., d, d)`` if any were kept."""
        out = {k: torch.tensor(v, dtype=torch.float64) for k, v in vars(self).items() if k != "snapshots"}
        if self.snapshots:
            out["snapshots"] = torch.stack(self.snapshots)
        return out


def gradient_flow(thetas: Tensor, target: Tensor, covariance: Tensor, time: float, dt: float,
                  record_every: int = 1, snapshot_times: list[float] | None = None) -> tuple[Tensor, FlowRecord]:
    """Integrate the rescaled gradient flow ``d theta_n / dt = -N grad_n`` (Sander et al. Section 3.2) by explicit Euler.

    Gradient descent with learning rate ``N dt`` for ``round(time / dt)`` steps. Every
    ``record_every`` steps (and at the end) the statistics of ``FlowRecord`` are kept; ``theta`` is
    also kept at the steps nearest to ``snapshot_times``. Besides the weights' increments across depth
    (Prop. 2's ``||theta_{n+1} - theta_n|| <= C/N``), the record keeps those of the change ``theta(t) - theta(0)``
    that training made, which start at 0: Prop. 2 and Lemma 2 say it is smooth in depth too.
    """
    _check_weights(thetas)
    time, dt = _checks.positive_float("time", time), _checks.positive_float("dt", dt)
    record_every = _checks.positive_int("record_every", record_every)
    depth, steps = thetas.shape[0], round(time / dt)
    eigenvalues = torch.linalg.eigvalsh(covariance)
    m, M = eigenvalues.min().item(), eigenvalues.max().item()
    snapshot_steps = {round(t / dt) for t in (snapshot_times or [])}
    record, theta = FlowRecord(), thetas.clone()
    spectral = lambda a: torch.linalg.matrix_norm(a, ord=2)
    first = None
    for step in range(steps + 1):
        loss, gradient = loss_and_gradient(theta, target, covariance)
        first = loss.item() if first is None else first
        check_divergence(loss, first, step, "dt")
        if step % record_every == 0 or step == steps:
            scaled = depth**2 * torch.linalg.matrix_norm(gradient).square()  # N^2 ||grad_n||_F^2 for each n
            record.times.append(step * dt)
            record.loss.append(loss.item())
            record.max_increment.append(depth * spectral(theta.diff(dim=0)).max().item() if depth > 1 else 0.0)
            record.max_norm.append(spectral(theta).max().item())
            moved = theta - thetas
            record.max_moved.append(spectral(moved).max().item())
            record.moved_increment.append(depth * spectral(moved.diff(dim=0)).max().item() if depth > 1 else 0.0)
            record.pl_low.append((scaled.min() / (m * loss)).item() if loss > 0 else math.inf)
            record.pl_high.append((scaled.max() / (M * loss)).item() if loss > 0 else 0.0)
        if step in snapshot_steps:
            record.snapshots.append(theta.clone())
        if step < steps:
            theta = theta - dt * depth * gradient
    return theta, record


def depth_function(thetas: Tensor, s: Tensor) -> Tensor:
    """``psi_N(s) = theta_{floor(N s)}`` (the paper's piecewise-constant weights in depth), for ``s`` in [0, 1]."""
    depth = thetas.shape[0]
    return thetas[torch.clamp((s * depth).floor().long(), max=depth - 1)]


__all__ = ["prefix_products", "suffix_products", "products", "sigma_norm2", "loss_and_gradient", "assumption_1",
           "FlowRecord", "gradient_flow", "depth_function"]
