"""The neural ODE behind a ResNet: interpolating vector fields, reference solutions, Euler's error and its bound.

Sander, Ablin, Peyré (NeurIPS 2022), Section 3.1. A field ``phi(x, s)`` *interpolates* the ResNet
``x_{n+1} = x_n + f(x_n, theta_n) / N`` when ``phi(., n/N) = f(., theta_n)`` (Definition 1); the ResNet
is then the explicit Euler scheme of ``dx/ds = phi(x, s)`` with step ``1/N``, and Prop. 1 bounds
``||x_n - x(n/N)|| <= (e^L - 1) C_N / (2 N L)`` with ``C_N = sup ||d_s phi + d_x phi[phi]||``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import _checks

INTERPOLATIONS = ("weights", "residuals")


def _against(u: Tensor | float, like: Tensor) -> Tensor | float:
    """Reshape the per-time coefficient ``u`` (number, scalar or ``(P,)``) to broadcast against ``like``."""
    return u if isinstance(u, float) else u.reshape(u.shape + (1,) * (like.ndim - u.ndim))


class InterpolatedField:
    """The field ``phi(x, s)`` that interpolates a ResNet linearly between knots ``s = n/N``, ``n = 0..N``.

    ``weights`` are stacked tensors with ``N + 1`` knots. ``mode='weights'`` interpolates the weights,
    ``phi(x, s) = f(x, (1-u) theta_n + u theta_{n+1})``; ``mode='residuals'`` the residuals,
    ``phi(x, s) = (1-u) f(x, theta_n) + u f(x, theta_{n+1})``, with ``u = N s - n`` (Section 3.1).
    Called as ``field(s, x)`` (torchdiffeq's order); ``s`` may be a scalar or a vector of times
    matching the first dimension of ``x`` (then ``x`` is ``(P, *batch, d)`` with at least one batch
    dimension), so one call evaluates a whole trajectory.
    """

    def __init__(self, residual: Callable, weights: Sequence[Tensor], mode: str = "weights"):
        self.residual = residual
        self.weights = tuple(weights)
        self.mode = _checks.one_of("mode", mode, INTERPOLATIONS)
        knots = self.weights[0].shape[0]
        if knots < 2 or any(w.shape[0] != knots for w in self.weights):
            raise ValueError("weights must be stacked tensors sharing a first dimension of at least 2 knots")
        self.intervals = knots - 1

    def _locate(self, s: Tensor) -> tuple[Tensor, Tensor]:
        scaled = s * self.intervals
        n = torch.clamp(torch.floor(scaled.detach()), 0, self.intervals - 1).long()
        return n, scaled - n

    def __call__(self, s: Tensor, x: Tensor) -> Tensor:
        s = torch.as_tensor(s, dtype=x.dtype)
        if s.ndim == 0 and not s.requires_grad:
            # A plain scalar time (the ODE solver's case): integer indexing gives views, much faster.
            scaled = float(s) * self.intervals
            n = min(max(int(scaled), 0), self.intervals - 1)
            u = scaled - n
        else:
            n, u = self._locate(s)
        left = tuple(w[n] for w in self.weights)
        right = tuple(w[n + 1] for w in self.weights)
        if self.mode == "weights":
            theta = tuple(a + _against(u, a) * (b - a) for a, b in zip(left, right))
            return self.residual(x, *theta)
        f_left, f_right = self.residual(x, *left), self.residual(x, *right)
        return f_left + _against(u, f_left) * (f_right - f_left)

    def lipschitz_bound(self) -> Tensor:
        """``L``: a bound on the Lipschitz constant of ``phi`` in ``x``, uniform in ``s`` (max over segments).

        Needs ``residual.segment_lipschitz``; valid for both modes since the residual interpolation
        is a convex combination of the two end residuals.
        """
        if not hasattr(self.residual, "segment_lipschitz"):
            raise TypeError(f"{type(self.residual).__name__} has no segment_lipschitz method")
        left = tuple(w[:-1] for w in self.weights)
        right = tuple(w[1:] for w in self.weights)
        return self.residual.segment_lipschitz(left, right).amax(dim=0)


def solve(field: Callable, x0: Tensor, depth: int, substeps: int = 8, method: str = "rk4") -> tuple[Tensor, Tensor]:
    """Solve ``dx/ds = field(s, x)`` on [0, 1] on a fixed grid aligned with the knots ``n/N``.

    Each of the ``N = depth`` intervals (one per layer of the ResNet the ODE interpolates) is split into
    ``substeps`` steps, so a field that is only piecewise smooth in ``s`` is integrated at full order. Returns the grid and the states on it,
    shape ``(N * substeps + 1, *x0.shape)``. ``rk4`` is torchdiffeq's fixed-grid RK4 (the 3/8 rule);
    for an ``InterpolatedField`` it runs here, with the weights at every stage interpolated ahead of
    the loop (the same scheme, several times faster); other methods and fields go to torchdiffeq.
    """
    depth = _checks.positive_int("depth", depth)
    substeps = _checks.positive_int("substeps", substeps)
    grid = torch.linspace(0.0, 1.0, depth * substeps + 1, dtype=x0.dtype, device=x0.device)
    if method == "rk4" and isinstance(field, InterpolatedField) and field.intervals == depth:
        return grid, _rk38_interpolated(field, x0, substeps)
    from torchdiffeq import odeint  # imported here: it pulls in scipy (a second at import) for the methods only it has

    return grid, odeint(field, x0, grid, method=method)


def _rk38_interpolated(field: InterpolatedField, x0: Tensor, substeps: int, chunk: int = 256) -> Tensor:
    """The 3/8-rule RK4 over the knot grid of ``field``: stages at ``s, s + h/3, s + 2h/3, s + h``."""
    U = 3 * substeps + 1  # stage offsets u within a knot interval: (j + c) / substeps, c in {0, 1/3, 2/3}, and 1
    u = torch.tensor([(j + c) / substeps for j in range(substeps) for c in (0.0, 1 / 3, 2 / 3)] + [1.0], dtype=x0.dtype,
                     device=x0.device)
    h = 1.0 / (field.intervals * substeps)
    x, states = x0, [x0]
    for start in range(0, field.intervals, chunk):
        stop = min(start + chunk, field.intervals)
        left = tuple(w[start:stop] for w in field.weights)
        right = tuple(w[start + 1:stop + 1] for w in field.weights)
        if field.mode == "weights":  # theta at every stage of the chunk: (chunk * U, ...)
            thetas = [(a.unsqueeze(1) + _against(u, b[:1]) * (b - a).unsqueeze(1)).flatten(0, 1) for a, b in zip(left, right)]
            stages = list(zip(*(t.unbind(0) for t in thetas)))

            def f(i: int, y: Tensor) -> Tensor:
                return field.residual(y, *stages[i])
        else:  # the residuals at both ends of the interval, blended
            ends = list(zip(zip(*(w.unbind(0) for w in left)), zip(*(w.unbind(0) for w in right))))
            weights = u.tolist()

            def f(i: int, y: Tensor) -> Tensor:
                theta_left, theta_right = ends[i // U]
                f_left = field.residual(y, *theta_left)
                return f_left + weights[i % U] * (field.residual(y, *theta_right) - f_left)
        for n in range(stop - start):
            for j in range(substeps):
                i = n * U + 3 * j
                k1 = f(i, x)
                k2 = f(i + 1, torch.add(x, k1, alpha=h / 3))
                k3 = f(i + 2, torch.add(x, torch.add(k2, k1, alpha=-1 / 3), alpha=h))
                k4 = f(i + 3, torch.add(x, (k1 - k2).add_(k3), alpha=h))
                x = torch.add(x, torch.add(k1, k4).add_(torch.add(k2, k3), alpha=3), alpha=h / 8)
                states.append(x)
    return torch.stack(states)


def second_derivative(field: Callable, times: Tensor, states: Tensor) -> Tensor:
    """``x''(s) = d_s phi + d_x phi[phi]`` at every ``(times[i], states[i])`` in one batched forward-mode pass.

    ``states`` is ``(P, *batch, d)`` with at least one batch dimension (see ``InterpolatedField``).

    The integrand of ``C_N`` in Prop. 1: one Jacobian-vector product with tangent ``(1, phi)``.
    """
    velocity = field(times, states)
    _, acceleration = torch.func.jvp(field, (times, states), (torch.ones_like(times), velocity))
    return acceleration


def euler_error(resnet_states: Tensor, ode_states: Tensor) -> Tensor:
    """``max_n ||x_n - x(n/N)||`` over the ``N + 1`` grid points (first dimension), norm over the last one."""
    if resnet_states.shape != ode_states.shape:
        raise ValueError(f"state shapes differ: {tuple(resnet_states.shape)} vs {tuple(ode_states.shape)}")
    return torch.linalg.vector_norm(resnet_states - ode_states, dim=-1).amax(dim=0)


def euler_bound(lipschitz: Tensor | float, curvature: Tensor | float, depth: int) -> Tensor:
    """Prop. 1: ``(e^L - 1) C_N / (2 N L)`` if ``L > 0``, ``C_N / (2 N)`` if ``L = 0``."""
    depth = _checks.positive_int("depth", depth)
    lipschitz = torch.as_tensor(lipschitz, dtype=torch.float64)
    curvature = torch.as_tensor(curvature, dtype=torch.float64)
    if not (lipschitz >= 0).all() or not (curvature >= 0).all() or not torch.isfinite(lipschitz).all():
        raise ValueError("lipschitz and curvature must be non-negative numbers, and lipschitz finite (NaN is neither)")
    growth = torch.where(lipschitz > 0, torch.expm1(lipschitz) / torch.where(lipschitz > 0, lipschitz, 1.0), 1.0)
    return growth * curvature / (2 * depth)


def consistency(residual: Callable, weights: Sequence[Tensor], x0: Tensor, mode: str = "weights",
                substeps: int = 8) -> dict[str, Tensor]:
    """Measure Prop. 1 for one ResNet: its distance to the interpolating ODE and the bound.

    ``weights`` hold ``N + 1`` knots; the ResNet uses the first ``N``. Returns ``error`` (max over
    layers), ``curvature`` (sup of ``||x''||`` along the reference trajectory: the ``||x''||_inf`` of
    the proof of Prop. 1, at most ``C_N``), ``lipschitz`` (when the residual provides a bound) and
    ``bound``. ``x0`` is ``(*batch, d)`` with at least one batch dimension; reductions run over
    time only, so the batch dimensions stay and one call measures many inputs and seeds.
    """
    from .models import euler

    field = InterpolatedField(residual, weights, mode)
    depth = field.intervals
    grid, ode_states = solve(field, x0, depth, substeps)
    resnet_states = euler(x0, residual, tuple(w[:-1] for w in weights), 1.0 / depth, trajectory=True)
    error = euler_error(resnet_states, ode_states[::substeps])
    # At a knot the jvp sees one side of the kink of phi in s: a one-sided limit of x'', still a value it takes.
    # Sampled at the knots and mid-intervals (every half interval when substeps allow), in chunks.
    every = max(substeps // 2, 1)
    times, states = grid[:-1:every], ode_states[:-1:every]
    curvature = torch.stack([
        torch.linalg.vector_norm(second_derivative(field, times[i:i + 2048], states[i:i + 2048]), dim=-1).amax(dim=0)
        for i in range(0, len(times), 2048)
    ]).amax(dim=0)
    out = {"error": error, "curvature": curvature}
    if hasattr(residual, "segment_lipschitz"):
        lipschitz = field.lipschitz_bound()
        out["lipschitz"] = lipschitz
        out["bound"] = euler_bound(lipschitz.reshape(lipschitz.shape + (1,) * (curvature.ndim - lipschitz.ndim)),
                                   curvature, depth)
    return out


__all__ = ["INTERPOLATIONS", "InterpolatedField", "solve", "second_derivative", "euler_error", "euler_bound",
           "consistency"]
