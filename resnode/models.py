"""Residual networks as integrators: the scaled forward rule, Euler and Heun steps, residual functions.

A ResNet of depth ``N`` iterates ``h_{k+1} = h_k + a_N f(h_k, theta_k)`` (Sander et al. eq. (1);
Marion et al. eq. (3) with ``a_N = 1/N``). Its weights are a tuple of *stacked* tensors whose first
dimension is depth; any further leading dimensions (after depth) broadcast, so one call runs
several independent networks (seeds) at once when the state carries the same leading dimensions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from . import _checks
from .init import init_weights

Weights = tuple[Tensor, ...]

SCALINGS = ("1/L", "1/sqrt(L)", "L^-beta", "1")

_ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], float]] = {
    # name: (function, Lipschitz constant)
    "tanh": (torch.tanh, 1.0),
    "relu": (torch.relu, 1.0),
    "gelu": (nn.functional.gelu, 1.129),  # max of GELU' is 1.1289 at x = sqrt(2)
    "softplus": (nn.functional.softplus, 1.0),
    "sigmoid": (torch.sigmoid, 0.25),
    "identity": (lambda x: x, 1.0),
}
ACTIVATIONS = tuple(_ACTIVATIONS)


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """The activation function called ``name`` (one of ``ACTIVATIONS``)."""
    return _ACTIVATIONS[_checks.one_of("activation", name, ACTIVATIONS)][0]


def step_size(depth: int, scaling: str = "1/L", beta: float | None = None) -> float:
    """The residual step ``a_L`` of ``h_{k+1} = h_k + a_L f(h_k)``: ``1/L``, ``1/sqrt(L)``, ``L^-beta`` or ``1``."""
    depth = _checks.positive_int("depth", depth)
    _checks.one_of("scaling", scaling, SCALINGS)
    if scaling == "L^-beta":
        if beta is None:
            raise ValueError("beta is required when scaling='L^-beta'")
        return float(depth) ** (-_checks.positive_float("beta", beta))
    if beta is not None:
        raise ValueError(f"beta is only used with scaling='L^-beta', not {scaling!r}")
    return {"1/L": 1.0 / depth, "1/sqrt(L)": depth**-0.5, "1": 1.0}[scaling]


class Perceptron:
    """Two-layer perceptron residual ``f(h; V, W) = V sigma(W h / sqrt(q)) / sqrt(m)`` (Marion et al. eq. (3)).

    ``h`` has ``q`` features, the hidden layer ``m`` units; ``V`` is ``(q, m)`` and ``W`` is ``(m, q)``.
    With ``scaled=False`` the ``1/sqrt(m)`` and ``1/sqrt(q)`` factors are dropped, as in the
    authors' synthetic scripts; with ``bias=True`` a hidden bias ``b`` (``(m,)``) enters as
    ``sigma(W h / sqrt(q) + b)``. Leading dimensions of ``h`` and of the weights broadcast.
    """

    def __init__(self, dim: int, width: int, activation: str = "tanh", scaled: bool = True, bias: bool = False):
        self.dim = _checks.positive_int("dim", dim)
        self.width = _checks.positive_int("width", width)
        self.activation = _checks.one_of("activation", activation, ACTIVATIONS)
        self.sigma, self.sigma_lipschitz = _ACTIVATIONS[activation]
        self.scaled = bool(scaled)
        self.inner = 1 / math.sqrt(dim) if scaled else 1.0
        self.outer = 1 / math.sqrt(width) if scaled else 1.0
        self.bias = bool(bias)

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """Shapes of one layer's ``(V, W)``, or ``(V, W, b)`` with a bias."""
        return ((self.dim, self.width), (self.width, self.dim)) + (((self.width,),) if self.bias else ())

    def __call__(self, h: Tensor, V: Tensor, W: Tensor, b: Tensor | None = None) -> Tensor:
        pre = self.inner * (h @ W.mT)
        if b is not None:
            pre = pre + b.unsqueeze(-2)
        return self.outer * (self.sigma(pre) @ V.mT)

    def segment_lipschitz(self, a: Weights, b: Weights) -> Tensor:
        """A bound on the Lipschitz constant in ``h`` of ``f(., theta)`` for every ``theta`` on the segment [a, b].

        By convexity of the spectral norm, ``||V(u)|| <= max(||V_a||, ||V_b||)`` (same for ``W``).
        """
        (Va, Wa), (Vb, Wb) = a[:2], b[:2]
        v = torch.maximum(torch.linalg.matrix_norm(Va, ord=2), torch.linalg.matrix_norm(Vb, ord=2))
        w = torch.maximum(torch.linalg.matrix_norm(Wa, ord=2), torch.linalg.matrix_norm(Wb, ord=2))
        return self.sigma_lipschitz * self.inner * self.outer * v * w


class Linear:
    """Linear residual ``f(h; theta) = theta h`` (Sander et al. Section 3.2); ``theta`` is ``(dim, dim)``."""

    def __init__(self, dim: int):
        self.dim = _checks.positive_int("dim", dim)

    @property
    def shapes(self) -> tuple[tuple[int, int]]:
        return ((self.dim, self.dim),)

    def __call__(self, h: Tensor, theta: Tensor) -> Tensor:
        return h @ theta.mT

    def segment_lipschitz(self, a: Weights, b: Weights) -> Tensor:
        return torch.maximum(torch.linalg.matrix_norm(a[0], ord=2), torch.linalg.matrix_norm(b[0], ord=2))


class StateFree:
    """Residual ``f(h; theta) = theta ** power`` that ignores ``h`` (Sander et al. Section 3.1).

    ``power=1`` gives the affine field ``phi(x, s) = a s + b`` on which Prop. 1 is tight, and the
    growing counterexample ``theta_n = n``; ``power=2`` the alternating one ``theta_n = (-1)^n``.
    ``theta`` is ``(dim,)``; it is broadcast over the batch dimension of ``h``.
    """

    def __init__(self, dim: int, power: int = 1):
        self.dim = _checks.positive_int("dim", dim)
        self.power = _checks.positive_int("power", power)

    @property
    def shapes(self) -> tuple[tuple[int]]:
        return ((self.dim,),)

    def __call__(self, h: Tensor, theta: Tensor) -> Tensor:
        return (theta**self.power).unsqueeze(-2).expand_as(h)

    def segment_lipschitz(self, a: Weights, b: Weights) -> Tensor:
        return torch.zeros(a[0].shape[:-1], dtype=a[0].dtype, device=a[0].device)


def _layers(weights: Sequence[Tensor]) -> list[Weights]:
    """Split stacked weights into one tuple per layer (``unbind`` keeps the backward linear in depth)."""
    if len(weights) == 0:
        raise ValueError("weights must hold at least one stacked tensor")
    depth = weights[0].shape[0]
    if any(w.shape[0] != depth for w in weights):
        raise ValueError(f"all stacked weights must share their first (depth) dimension; got {[tuple(w.shape) for w in weights]}")
    return list(zip(*(w.unbind(0) for w in weights)))


def euler(h: Tensor, f: Callable, weights: Sequence[Tensor], step: float | None = None,
          trajectory: bool = False) -> Tensor:
    """ResNet forward ``h_{k+1} = h_k + step f(h_k, theta_k)`` for ``k < N = len(weights[0])`` (Sander et al. eq. (1)).

    ``step`` defaults to ``1/N``. Returns the output, or all ``N + 1`` states stacked if ``trajectory``.
    """
    layers = _layers(weights)
    step = 1.0 / len(layers) if step is None else step
    states = [h]
    for theta in layers:
        h = h + step * f(h, *theta)
        if trajectory:
            states.append(h)
    return torch.stack(states) if trajectory else h


def heun(h: Tensor, f: Callable, weights: Sequence[Tensor], step: float | None = None,
         trajectory: bool = False) -> Tensor:
    """HeunNet forward (Sander et al. eq. (8)): ``N`` steps over ``N + 1`` stacked weights ``theta_0..theta_N``.

    ``y = h_k + step f(h_k, theta_k)``, ``h_{k+1} = h_k + step/2 (f(h_k, theta_k) + f(y, theta_{k+1}))``;
    ``step`` defaults to ``1/N``.
    """
    layers = _layers(weights)
    if len(layers) < 2:
        raise ValueError("heun needs at least two stacked weights (theta_0 and theta_1) for one step")
    step = 1.0 / (len(layers) - 1) if step is None else step
    states = [h]
    for theta, theta_next in zip(layers[:-1], layers[1:]):
        f_here = f(h, *theta)
        f_next = f(h + step * f_here, *theta_next)
        h = h + 0.5 * step * (f_here + f_next)
        if trajectory:
            states.append(h)
    return torch.stack(states) if trajectory else h


INTEGRATORS = {"euler": euler, "heun": heun}


class ResNet(nn.Module):
    """A trainable residual network: stacked weights of a residual function, integrated by Euler or Heun.

    ``depth`` is the number of residual steps; Heun holds ``depth + 1`` weights. ``init`` is a kind of
    ``resnode.init.INIT_KINDS`` (or one per weight tensor); ``scaling`` picks the step of ``step_size``.
    With ``copies=S``, ``S`` independent networks run at once (seeds): every weight tensor gets a
    dimension of size ``S`` after depth, and inputs must be ``(S, batch, dim)``. With ``fused=True`` a
    perceptron ResNet (Euler) runs on ``resnode.engine`` (same values, hand-written backward, several
    times faster); the default is autograd through the plain loop, the reference.
    """

    def __init__(self, residual, depth: int, init="iid", scaling: str = "1/L", beta: float | None = None,
                 integrator: str = "euler", std: float = 1.0, lengthscale: float = 0.1,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                 copies: int | None = None, fused: bool = False):
        super().__init__()
        if fused and not (isinstance(residual, Perceptron) and integrator == "euler"):
            raise ValueError("fused=True needs a Perceptron residual and the euler integrator")
        self.fused = bool(fused)
        self.residual = residual
        self.depth = _checks.positive_int("depth", depth)
        self.integrator = _checks.one_of("integrator", integrator, tuple(INTEGRATORS))
        self.step = step_size(depth, scaling, beta)
        knots = depth + (integrator == "heun")
        shapes = residual.shapes if copies is None else [(_checks.positive_int("copies", copies),) + s for s in residual.shapes]
        weights = init_weights(init, knots, shapes, std=std, lengthscale=lengthscale,
                               spacing=1.0 / depth, generator=generator, dtype=dtype)
        self.weights = nn.ParameterList(nn.Parameter(w) for w in weights)

    def forward(self, h: Tensor, trajectory: bool = False) -> Tensor:
        if self.fused:
            from . import engine  # engine imports this module

            r = self.residual
            spec = engine.Residual(r.activation, step=self.step, inner=r.inner, outer=r.outer)
            V, W, *b = self.weights
            if trajectory:
                with torch.no_grad():
                    return engine.forward(h, W, V, b[0] if b else None, spec).states
            return engine.resnet(h, W, V, b[0] if b else None, spec=spec)
        return INTEGRATORS[self.integrator](h, self.residual, tuple(self.weights), self.step, trajectory)


__all__ = ["Weights", "SCALINGS", "ACTIVATIONS", "activation", "step_size", "Perceptron", "Linear", "StateFree",
           "euler", "heun", "INTEGRATORS", "ResNet"]
