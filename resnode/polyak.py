"""Polyak-Łojasiewicz (PL) conditions on small losses whose constants are known (Barboni, Peyré, Vialard, slides).

The PL inequality ``m f(theta) <= ||grad f(theta)||^2`` with a ``beta``-Lipschitz gradient makes gradient descent
with step ``1/beta`` converge linearly, ``f(theta_k) <= (1 - m / (2 beta))^k f(theta_0)`` (Polyak 1963). A neural ODE
with one time-independent linear field, ``x' = theta x``, has ``Phi_theta = exp(theta)``; learning ``-Id`` gives
``f(theta) = ||exp(theta) + Id||_F^2``, which is not PL: for a normal ``theta = U diag(z) U*`` every eigenvalue runs
gradient descent on ``|e^z + 1|^2``, and a real start drifts to ``Re z -> -inf`` where the gradient vanishes and the
loss does not. Its two-parameter version ``|e^{theta_1 + i theta_2} - c|^2`` is PL only locally, with
``||grad f||^2 / f = 4 e^{2 theta_1}`` in ``[4 e^{-2R}, 4 e^{2R}]`` on the ball of radius ``R`` (the slides drop the 4);
Liu, Zhu and Belkin's condition ``f(theta_0) <= m(rho)^2 R^2 / M(rho)``, ``rho = ||theta_0|| + R``, then keeps the
iterates within ``R`` of ``theta_0`` and the loss decaying at the local Polyak rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from . import _checks
from .train import check_divergence


def descend(loss: Callable[[Tensor], Tensor], theta0: Tensor, step: float, iterations: int) -> tuple[Tensor, Tensor]:
    """Gradient descent ``theta <- theta - step * grad loss(theta)`` (gradients by autograd).

    Returns the iterates ``(iterations + 1, *theta0.shape)`` and the losses ``(iterations + 1,)``.
    """
    step = _checks.positive_float("step", step)
    iterations = _checks.positive_int("iterations", iterations)
    theta = theta0.detach().clone()
    thetas, losses = [theta.clone()], []
    for k in range(iterations):
        theta.requires_grad_(True)
        value = loss(theta)
        (grad,) = torch.autograd.grad(value, theta)
        check_divergence(value.item(), losses[0].item() if losses else value.item(), k, "the step")
        losses.append(value.detach())
        theta = (theta - step * grad).detach()
        thetas.append(theta.clone())
    losses.append(loss(theta).detach())
    return torch.stack(thetas), torch.stack(losses)


def pl_ratio(loss: Callable[[Tensor], Tensor], theta: Tensor) -> Tensor:
    """``||grad f(theta)||^2 / f(theta)``: the largest ``m`` for which the PL inequality holds at ``theta``."""
    theta = theta.detach().clone().requires_grad_(True)
    value = loss(theta)
    (grad,) = torch.autograd.grad(value, theta)
    return (grad.square().sum() / value).detach()


def pl_ratios(loss: Callable[[Tensor], Tensor], thetas: Tensor) -> Tensor:
    """``pl_ratio`` at a batch of points: ``loss`` maps ``(B, ...)`` to ``(B,)``, one independent loss per row."""
    thetas = thetas.detach().clone().requires_grad_(True)
    values = loss(thetas)
    if values.shape != thetas.shape[:1]:
        raise ValueError(f"loss must return one value per row, shape {tuple(thetas.shape[:1])}, got {tuple(values.shape)}")
    (grads,) = torch.autograd.grad(values.sum(), thetas)
    return (grads.flatten(1).square().sum(1) / values).detach()


def polyak_bound(f0: float, m: float, beta: float, iterations: int) -> Tensor:
    """Polyak's bound ``f0 (1 - m / (2 beta))^k`` for ``k = 0 .. iterations`` (step ``1/beta``)."""
    m, beta = _checks.positive_float("m", m), _checks.positive_float("beta", beta)
    f0 = _checks.nonnegative_float("f0", f0)
    iterations = _checks.positive_int("iterations", iterations)
    if m > 2 * beta:
        raise ValueError(f"m must be at most 2 beta for a beta-smooth loss, got m={m}, beta={beta}")
    return f0 * (1 - m / (2 * beta)) ** torch.arange(iterations + 1, dtype=torch.float64)


def least_squares_constants(X: Tensor) -> tuple[float, float]:
    """``(m, beta)`` of ``f(theta) = ||X theta - y||^2``: ``m = 4 lambda_min(X X^T)``, ``beta = 2 lambda_max(X^T X)``.

    With fewer rows than columns ``f`` is not strongly convex (its minimisers form an affine subspace) yet it is
    PL as soon as ``X X^T`` is invertible: ``||grad f||^2 = 4 r^T X X^T r >= 4 lambda_min(X X^T) f``.
    """
    if X.dim() != 2:
        raise ValueError(f"X must be a matrix, got shape {tuple(X.shape)}")
    eig = torch.linalg.eigvalsh(X @ X.T)
    return 4 * eig[0].item(), 2 * eig[-1].item()


def exp_loss(theta: Tensor) -> Tensor:
    """``||exp(theta) + Id||_F^2``: a time-independent linear neural ODE learning ``-Id`` (slides, "obstruction")."""
    if theta.dim() != 2 or theta.shape[0] != theta.shape[1]:
        raise ValueError(f"theta must be a square matrix, got shape {tuple(theta.shape)}")
    eye = torch.eye(theta.shape[0], dtype=theta.dtype)
    return (torch.linalg.matrix_exp(theta) + eye).square().sum()


def complex_exp_gradient(z: Tensor, target: complex = -1.0) -> Tensor:
    """Gradient of ``|e^z - c|^2`` in ``(Re z, Im z)``, written as the complex number ``2 (e^z - c) conj(e^z)``."""
    ez = torch.exp(z)
    return 2 * (ez - target) * ez.conj()


def complex_descent(z0: Tensor, step: float, iterations: int, target: complex = -1.0) -> Tensor:
    """Gradient descent on ``|e^z - c|^2`` for each entry of the complex tensor ``z0``; returns ``(iterations + 1, ...)``.

    For a normal start ``theta_0 = U diag(z_0) U*``, the iterates of ``descend(exp_loss, ...)`` are
    ``U diag(z_k) U*`` with ``z_k`` these (the gradient ``2 exp(theta*) (exp(theta) + Id)`` stays diagonal in ``U``).
    """
    step = _checks.positive_float("step", step)
    iterations = _checks.positive_int("iterations", iterations)
    zs = [z0.clone()]
    first = (torch.exp(z0) - target).abs().square().max().item()
    for k in range(iterations):
        zs.append(zs[-1] - step * complex_exp_gradient(zs[-1], target))
        check_divergence((torch.exp(zs[-1]) - target).abs().square().max().item(), first, k + 1, "the step")
    return torch.stack(zs)


def rotation_loss(angle: float) -> Callable[[Tensor], Tensor]:
    """``f(theta) = |e^{theta_1 + i theta_2} - e^{i angle}|^2``: learning a rotation by ``angle`` (``pi`` gives ``-Id``)."""
    c, s = math.cos(angle), math.sin(angle)

    def loss(theta: Tensor) -> Tensor:
        radius = torch.exp(theta[..., 0])
        return (radius * torch.cos(theta[..., 1]) - c).square() + (radius * torch.sin(theta[..., 1]) - s).square()

    return loss


def local_pl_constants(radius: float) -> tuple[float, float]:
    """Sharp ``(m(R), M(R)) = (4 e^{-2R}, 4 e^{2R})`` of ``rotation_loss`` on the ball ``||theta|| <= R``.

    ``||grad f||^2 = 4 e^{2 theta_1} f`` exactly, and ``theta_1`` ranges over ``[-R, R]`` on the ball.
    """
    radius = _checks.nonnegative_float("radius", radius)
    return 4 * math.exp(-2 * radius), 4 * math.exp(2 * radius)


def local_smoothness(radius: float) -> float:
    """A Lipschitz constant of ``grad rotation_loss`` on ``||theta|| <= R``: ``beta(R) = 4 e^{2R} + 2 e^R``.

    The Hessian is ``4 e^{2 theta_1} e_1 e_1^T`` plus ``2 e^{theta_1}`` times a reflection.
    """
    radius = _checks.nonnegative_float("radius", radius)
    return 4 * math.exp(2 * radius) + 2 * math.exp(radius)


def localisation_margin(f0: float, start_norm: float, radius: float) -> float:
    """``m(rho)^2 R^2 / M(rho) - f(theta_0)`` with ``rho = ||theta_0|| + R``: Liu-Zhu-Belkin's condition holds iff ``>= 0``."""
    radius = _checks.positive_float("radius", radius)
    m, M = local_pl_constants(start_norm + radius)
    return m * m * radius * radius / M - f0


__all__ = ["descend", "pl_ratio", "pl_ratios", "polyak_bound", "least_squares_constants", "exp_loss",
           "complex_exp_gradient", "complex_descent", "rotation_loss", "local_pl_constants", "local_smoothness",
           "localisation_margin"]
