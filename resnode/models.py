"""Residual networks as integrators: the scaled forward rule, Euler and Heun steps, residual functions.

A ResNet of depth ``N`` iterates ``h_{k+1} = h_k + a_N f(h_k, theta_k)`` (Sander et al. eq. (1);
Marion et al. eq. (3) with ``a_N = 1/N``). Its weights are a tuple of *stacked* tensors whose first
dimension is depth; any further leading dimensions (after depth) broadcast, so one call runs
several independent networks (seeds) at once when the state carries the same leading dimensions.
"""

from __future__ import annotations

import copy
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
        """Shape of one layer's ``theta``: ``((dim, dim),)``."""
        return ((self.dim, self.dim),)

    def __call__(self, h: Tensor, theta: Tensor) -> Tensor:
        return h @ theta.mT

    def segment_lipschitz(self, a: Weights, b: Weights) -> Tensor:
        """A bound on the Lipschitz constant in ``h`` of ``theta h`` for every ``theta`` on the segment [a, b]:
        ``max(||theta_a||, ||theta_b||)`` (spectral norm, convex), one value per leading index of the weights."""
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
        """Shape of one layer's ``theta``: ``((dim,),)``."""
        return ((self.dim,),)

    def __call__(self, h: Tensor, theta: Tensor) -> Tensor:
        return (theta**self.power).unsqueeze(-2).expand_as(h)

    def segment_lipschitz(self, a: Weights, b: Weights) -> Tensor:
        """The Lipschitz constant in ``h``, 0 on every segment (the residual ignores ``h``), shaped like the leading
        dimensions of the weights."""
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
METHODS = tuple(INTEGRATORS)
BACKWARDS = ("backprop", "adjoint", "checkpoint")


def _fresh_copies(block: nn.Module, count: int, init: str) -> list[nn.Module]:
    """``count`` independent copies of ``block``: each re-initialised (``"iid"``: every submodule with a
    ``reset_parameters`` draws afresh) or all starting as ``block`` (``"tied"``)."""
    copies = [copy.deepcopy(block) for _ in range(count)]
    if init == "tied":
        return copies
    for module in copies:
        resettable = [m for m in module.modules() if hasattr(m, "reset_parameters")]
        own = {id(p) for m in resettable for p in m.parameters(recurse=False)}
        if any(id(p) not in own for m in module.modules() for p in m.parameters(recurse=False)):
            raise ValueError(f"init='iid' draws each layer afresh through reset_parameters(), which some parameters of "
                             f"{type(block).__name__} lack; pass a function that builds a block instead, or init='tied'")
        for m in resettable:
            m.reset_parameters()
    return copies


class ResNet(nn.Module):
    """A residual network ``h_{k+1} = h_k + a_L f_k(h_k)``, ``k < L = depth`` (Sander et al. eq. (1), Marion et al.
    eq. (3) with ``a_L = 1/L``), integrated by Euler or Heun (eq. (8)), trained with one of three backward passes.
    ``forward(h, trajectory=False)`` maps ``h`` (``(batch, dim)``, or ``(copies, batch, dim)`` with ``copies``) to
    ``h_L``, or with ``trajectory`` to all ``L + 1`` states stacked (not with ``fused``).

    Parameters
    ----------
    block
        The residual function, in one of three forms:

        - a stacked residual of this module (:class:`Perceptron`, :class:`Linear`, :class:`StateFree`): one weight
          tensor per kind, stacked across depth in ``self.weights`` (``(L, ...)``; Heun ``(L + 1, ...)``), drawn by
          :func:`resnode.init.init_weights` with ``init`` (``"iid"``, ``"smooth"``, ``"tied"``, ``"zero"``,
          ``"alternating"``, or one kind per tensor), ``std``, ``lengthscale``, ``generator``, ``dtype``, ``copies``;
        - an :class:`torch.nn.Module`: one copy per layer in ``self.blocks``, each re-initialised
          (``init="iid"``: its submodules' ``reset_parameters()``) or all starting as ``block`` (``init="tied"``);
          with ``tied=True`` the one module is applied at every layer (weight tying);
        - a function of no arguments that returns a new block: called once per layer (``init`` is then its business).
    depth
        The number of residual steps ``L``.
    scaling
        The step ``a_L`` (:func:`step_size`): ``"1/L"``, ``"1/sqrt(L)"``, ``"L^-beta"`` (with ``beta``) or ``"1"``.
    method
        ``"euler"`` (eq. (1)) or ``"heun"`` (eq. (8), one more layer of weights).
    backward
        ``"backprop"`` (exact autograd, storing every activation), ``"adjoint"`` (Sander et al. Section 4: only the
        output is stored and the activations are rebuilt backwards, eqs. (6)/(9); memory constant in depth,
        gradients exact up to ``O(1/L)``, Props 4 and 6) or ``"checkpoint"`` (:func:`torch.utils.checkpoint` over
        ``sqrt(L)`` segments: exact gradients, memory ``O(sqrt(L))``). An attribute: a trained network switches
        in place (``net.backward = "backprop"``), keeping its parameters.
    fused
        A :class:`Perceptron` ResNet (Euler, backprop) on :mod:`resnode.engine`: the same values, a hand-written
        backward, several times faster on the CPU.
    """

    def __init__(self, block, depth: int, init="iid", scaling: str = "1/L", beta: float | None = None,
                 method: str = "euler", backward: str = "backprop", tied: bool = False, std: float = 1.0,
                 lengthscale: float = 0.1, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32, copies: int | None = None, fused: bool = False):
        super().__init__()
        self.depth = _checks.positive_int("depth", depth)
        self.method = _checks.one_of("method", method, METHODS)
        self.scaling = _checks.one_of("scaling", scaling, SCALINGS)
        self.step = step_size(depth, scaling, beta)
        self.backward = backward
        self.fused, self.tied = bool(fused), bool(tied)
        knots = depth + (method == "heun")
        if isinstance(block, nn.Module) or (callable(block) and not hasattr(block, "shapes")):
            if fused or copies is not None:
                raise ValueError("fused and copies are for the stacked residuals of resnode.models, not nn.Module blocks")
            if isinstance(block, nn.Module):
                if tied:
                    blocks = [block] * knots
                else:
                    blocks = _fresh_copies(block, knots, _checks.one_of("init", init, ("iid", "tied")))
            else:
                blocks = [block() for _ in range(1 if tied else knots)]
                if not all(isinstance(b, nn.Module) for b in blocks):
                    raise TypeError(f"a block factory must return nn.Module objects; got {type(blocks[0]).__name__}")
                blocks = blocks * knots if tied else blocks
            self.residual, self.blocks = None, nn.ModuleList(blocks)
            return
        if not hasattr(block, "shapes"):
            raise TypeError(f"block must be an nn.Module, a function returning one, or a stacked residual of "
                            f"resnode.models (Perceptron, Linear, StateFree); got {type(block).__name__}")
        if tied:
            raise ValueError("tied=True is for nn.Module blocks; stacked residuals start tied with init='tied'")
        if fused and not (isinstance(block, Perceptron) and method == "euler" and self.backward == "backprop"):
            raise ValueError("fused=True needs a Perceptron residual, the euler method and backward='backprop'")
        self.residual, self.blocks = block, None
        shapes = block.shapes if copies is None else [(_checks.positive_int("copies", copies),) + s for s in block.shapes]
        weights = init_weights(init, knots, shapes, std=std, lengthscale=lengthscale,
                               spacing=1.0 / depth, generator=generator, dtype=dtype)
        self.weights = nn.ParameterList(nn.Parameter(w) for w in weights)

    @property
    def backward(self) -> str:
        """The backward pass: ``"backprop"``, ``"adjoint"`` or ``"checkpoint"``; settable on a trained network."""
        return self._backward

    @backward.setter
    def backward(self, value: str) -> None:
        value = _checks.one_of("backward", value, BACKWARDS)
        if getattr(self, "fused", False) and value != "backprop":
            raise ValueError("a fused network has the engine's own (exact) backward; build it with fused=False")
        self._backward = value

    def extra_repr(self) -> str:
        """The depth, scaling and step, method, backward pass, block type, and ``tied`` / ``fused`` when set."""
        block = type(self.residual).__name__ if self.residual is not None else type(self.blocks[0]).__name__
        return (f"depth={self.depth}, scaling={self.scaling!r} (step {self.step:.3g}), method={self.method!r}, "
                f"backward={self.backward!r}, block={block}" + (", tied" if self.tied else "")
                + (", fused" if self.fused else ""))

    def forward(self, h: Tensor, trajectory: bool = False) -> Tensor:
        """``h_L`` (or every state ``h_0 .. h_L`` stacked, with ``trajectory``) from ``h = h_0``."""
        from . import adjoint  # adjoint imports this module

        if self.fused:
            from . import engine  # engine imports this module

            r = self.residual
            spec = engine.Residual(r.activation, step=self.step, inner=r.inner, outer=r.outer)
            V, W, *b = self.weights
            if trajectory:
                with torch.no_grad():
                    return engine.forward(h, W, V, b[0] if b else None, spec).states
            return engine.resnet(h, W, V, b[0] if b else None, spec=spec)
        if self.residual is not None and (trajectory or self.backward == "backprop"):
            return INTEGRATORS[self.method](h, self.residual, tuple(self.weights), self.step, trajectory)
        if trajectory:
            states = [h]
            for n in range(self.depth):
                states.append(adjoint.forward_step(self.method, self.blocks, n, states[-1], self.step))
            return torch.stack(states)
        blocks = list(self.blocks) if self.residual is None else adjoint.StackedLayers(self.residual, tuple(self.weights))
        return adjoint.integrate(h, blocks, self.step, self.method, self.backward)


__all__ = ["Weights", "SCALINGS", "ACTIVATIONS", "activation", "step_size", "Perceptron", "Linear", "StateFree",
           "euler", "heun", "INTEGRATORS", "METHODS", "BACKWARDS", "ResNet"]
