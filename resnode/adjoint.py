"""Memory-free backpropagation through residual stacks by reverse-time reconstruction (Sander et al. Section 4).

The forward pass keeps only the output. The backward pass walks the layers backwards, rebuilding
each input from the next state, by reverse-time Euler (eq. (6)) ``x_n ~ x_{n+1} - f_n(x_{n+1}) / N``
or by the Heun inverse (eq. (9)), then takes one vector-Jacobian product per step (eq. (7)) at the
rebuilt input. Memory is constant in depth; the gradients are approximate, with errors that vanish
with depth at the orders of Props 4 and 6. ``backward="backprop"`` runs the same network with exact
autograd, as the reference, and ``backward="checkpoint"`` with :func:`torch.utils.checkpoint` (exact, memory
``O(sqrt(N))``).

Blocks are any ``nn.Module`` objects (fully connected layers, conv blocks with batch norm, the same module
repeated for weight tying), or the layers of stacked weights (:class:`StackedLayers`, as
:class:`resnode.models.ResNet` holds them). Batch norm keeps its training-mode semantics: the backward pass uses
batch statistics of the rebuilt inputs and does not update the running statistics a second time.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from . import _checks

METHODS = ("euler", "heun")
BACKWARDS = ("backprop", "adjoint", "checkpoint")


def num_steps(method: str, blocks: Sequence[nn.Module]) -> int:
    """Euler takes one step per block; Heun (eq. (8)) ``N`` steps over ``N + 1`` blocks."""
    steps = len(blocks) - (_checks.one_of("method", method, METHODS) == "heun")
    if steps < 1:
        raise ValueError(f"{method} needs at least {1 + (method == 'heun')} blocks; got {len(blocks)}")
    return steps


def forward_step(method: str, blocks: Sequence[nn.Module], n: int, x: Tensor, step: float) -> Tensor:
    """Step ``n``: Euler ``x + step f_n(x)`` (eq. (1)) or Heun ``x + step/2 (f_n(x) + f_{n+1}(x + step f_n(x)))`` (eq. (8))."""
    here = blocks[n](x)
    if method == "euler":
        return x + step * here
    return x + 0.5 * step * (here + blocks[n + 1](x + step * here))


def inverse_step(method: str, blocks: Sequence[nn.Module], n: int, x: Tensor, step: float) -> Tensor:
    """Approximate inverse of step ``n``: reverse Euler ``x - step f_n(x)`` (eq. (6)), or the Heun inverse
    ``y = x - step f_{n+1}(x)``, ``x - step/2 (f_{n+1}(x) + f_n(y))`` (eq. (9))."""
    if method == "euler":
        return x - step * blocks[n](x)
    ahead = blocks[n + 1](x)
    return x - 0.5 * step * (ahead + blocks[n](x - step * ahead))


@contextlib.contextmanager
def frozen_running_stats(blocks: Sequence[nn.Module]):
    """Batch norms use batch statistics but leave their running statistics alone (momentum 0) inside."""
    norms = {id(m): m for b in blocks if isinstance(b, nn.Module) for m in b.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    saved = {key: m.momentum for key, m in norms.items()}
    try:
        for m in norms.values():
            m.momentum = 0.0
        yield
    finally:
        for key, m in norms.items():
            m.momentum = saved[key]


def _unique_parameters(blocks: Sequence[nn.Module]) -> list[nn.Parameter]:
    seen, out = set(), []
    for block in blocks:
        for p in block.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


class StackedLayers(Sequence):
    """The layers of stacked weights as blocks: block ``n`` is ``h -> residual(h, *(w[n] for w in weights))``.

    ``own`` replaces the weights of some layers (the backward pass gives them leaf copies that collect gradients).
    Built by :class:`resnode.models.ResNet` for its adjoint and checkpointed backward passes."""

    def __init__(self, residual: Callable, weights: Sequence[Tensor], own: dict[int, tuple[Tensor, ...]] | None = None):
        self.residual, self.weights, self.own = residual, tuple(weights), own or {}

    def __len__(self) -> int:
        return len(self.weights[0])

    def __getitem__(self, n: int) -> Callable[[Tensor], Tensor]:
        theta = self.own[n] if n in self.own else tuple(w[n] for w in self.weights)
        return lambda h: self.residual(h, *theta)


def _reverse_sweep(x: Tensor, grad: Tensor, method: str, step: float, blocks: Sequence, local) -> Tensor:
    """The backward pass of the adjoint: from the output ``x`` and its cotangent ``grad``, rebuild each step's input
    (eq. (6) or (9)) and take the step's vector-Jacobian product there (eq. (7)). ``local(n)`` gives the blocks to
    differentiate step ``n`` with, the tensors whose gradients it needs, and a function receiving those gradients.
    Returns the cotangent of the input."""
    for n in reversed(range(num_steps(method, blocks))):
        with torch.no_grad():
            x = inverse_step(method, blocks, n, x, step)
        step_blocks, tensors, receive = local(n)
        with torch.enable_grad():
            rebuilt = x.detach().requires_grad_()
            out = forward_step(method, step_blocks, n, rebuilt, step)
            vjps = torch.autograd.grad(out, [rebuilt, *tensors], grad, allow_unused=True)
        grad = vjps[0]
        receive(vjps[1:])
    return grad


class _Reconstructed(torch.autograd.Function):
    """Module blocks: forward without storing activations; backward by :func:`_reverse_sweep`."""

    @staticmethod
    def forward(ctx, x, method, blocks, step, *parameters):
        with torch.no_grad():
            for n in range(num_steps(method, blocks)):
                x = forward_step(method, blocks, n, x, step)
        ctx.method, ctx.blocks, ctx.step = method, blocks, step
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        method, blocks = ctx.method, ctx.blocks
        parameters = _unique_parameters(blocks)
        index = {id(p): i for i, p in enumerate(parameters)}
        grads: list[Tensor | None] = [None] * len(parameters)
        own = [list(block.parameters()) for block in blocks]

        def local(n):
            tensors = own[n] + [p for p in own[n + 1] if all(p is not q for q in own[n])] if method == "heun" else own[n]

            def receive(vjps):
                for p, g in zip(tensors, vjps):
                    if g is not None:
                        i = index[id(p)]
                        grads[i] = g if grads[i] is None else grads[i] + g
            return blocks, tensors, receive

        with frozen_running_stats(blocks):
            grad = _reverse_sweep(x, grad, method, ctx.step, blocks, local)
        return (grad, None, None, None, *grads)


class _ReconstructedStacked(torch.autograd.Function):
    """Stacked weights: the same, with each step's gradients written into the rows of the stacked gradients."""

    @staticmethod
    def forward(ctx, x, method, residual, step, *weights):
        layers = StackedLayers(residual, weights)
        with torch.no_grad():
            for n in range(num_steps(method, layers)):
                x = forward_step(method, layers, n, x, step)
        ctx.method, ctx.residual, ctx.step = method, residual, step
        ctx.save_for_backward(x, *weights)
        return x

    @staticmethod
    def backward(ctx, grad):
        x, *weights = ctx.saved_tensors
        method, residual = ctx.method, ctx.residual
        grads = [torch.zeros_like(w) for w in weights]

        def local(n):
            rows = (n, n + 1) if method == "heun" else (n,)
            own = {k: tuple(w[k].detach().requires_grad_() for w in weights) for k in rows}

            def receive(vjps):
                for (k, i), g in zip(((k, i) for k in rows for i in range(len(weights))), vjps):
                    if g is not None:
                        grads[i][k] += g
            return StackedLayers(residual, weights, own), [t for k in rows for t in own[k]], receive

        grad = _reverse_sweep(x, grad, method, ctx.step, StackedLayers(residual, weights), local)
        return (grad, None, None, None, *grads)


def integrate(x: Tensor, blocks: Sequence, step: float | None = None, method: str = "euler",
              backward: str = "adjoint") -> Tensor:
    """Run the residual stack ``blocks`` (``nn.Module`` s, or :class:`StackedLayers`) on ``x`` (Euler, eq. (1), or
    Heun, eq. (8)); step ``1/N`` by default.

    ``backward="adjoint"`` stores only the output and rebuilds activations in the backward pass;
    ``"backprop"`` is plain autograd; ``"checkpoint"`` stores ``sqrt(N)`` states (:func:`checkpointed`).
    """
    steps = num_steps(method, blocks)
    _checks.one_of("backward", backward, BACKWARDS)
    step = 1.0 / steps if step is None else _checks.positive_float("step", step)
    if torch.is_grad_enabled() and backward == "checkpoint":
        return checkpointed(x, blocks, max(1, round(math.sqrt(steps))), step, method)
    if torch.is_grad_enabled() and backward == "adjoint":
        if isinstance(blocks, StackedLayers):
            return _ReconstructedStacked.apply(x, method, blocks.residual, step, *blocks.weights)
        return _Reconstructed.apply(x, method, tuple(blocks), step, *_unique_parameters(blocks))
    for n in range(steps):
        x = forward_step(method, blocks, n, x, step)
    return x


class ResidualStack(nn.Module):
    """An ``nn.Module`` around :func:`integrate`: blocks, method and backward pass (switchable at any time)."""

    def __init__(self, blocks: Sequence[nn.Module], method: str = "euler", backward: str = "adjoint",
                 step: float | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.method = _checks.one_of("method", method, METHODS)
        self.backward = _checks.one_of("backward", backward, BACKWARDS)
        self.step = step
        num_steps(method, self.blocks)

    def forward(self, x: Tensor) -> Tensor:
        """The stack's output from its input ``x`` (:func:`integrate`)."""
        return integrate(x, list(self.blocks), self.step, self.method, self.backward)


class Layer(nn.Module):
    """One residual block ``h -> f(h, *weights)`` with its own parameters (for functional residuals of ``models``)."""

    def __init__(self, residual: Callable, weights: Sequence[Tensor]):
        super().__init__()
        self.residual = residual
        for i, w in enumerate(weights):
            self.register_parameter(f"theta{i}", nn.Parameter(w.detach().clone()))

    def forward(self, h: Tensor) -> Tensor:
        """The residual ``f(h, *weights)`` of the block at ``h`` (not ``h`` plus it: the stack adds the step)."""
        # the parameters in registration order: unpacking an nn.ParameterList instead adds ~15 us per call (measured:
        # 97 against 82 us for a q = 16, m = 32 perceptron on 256 inputs), and the adjoint calls each block three times
        return self.residual(h, *self._parameters.values())


def layers(residual: Callable, stacked: Sequence[Tensor]) -> list[Layer]:
    """One ``Layer`` per depth index of stacked weights ``(depth, ...)`` (as built by ``resnode.init``)."""
    return [Layer(residual, theta) for theta in zip(*(w.unbind(0) for w in stacked))]


def checkpointed(x: Tensor, blocks: Sequence, segments: int, step: float | None = None, method: str = "euler") -> Tensor:
    """The stack under :func:`torch.utils.checkpoint`: only segment boundaries are stored (memory ~ segments +
    N/segments), each segment run again in the backward pass; exact gradients."""
    from torch.utils.checkpoint import checkpoint

    steps = num_steps(method, blocks)
    step = 1.0 / steps if step is None else step
    size = math.ceil(steps / _checks.positive_int("segments", segments))

    def run(h, start):
        for n in range(start, min(start + size, steps)):
            h = forward_step(method, blocks, n, h, step)
        return h

    for start in range(0, steps, size):
        x = checkpoint(run, x, start, use_reentrant=False)
    return x


class _DepthField(nn.Module):
    """The piecewise-constant field ``phi(s, x) = f_{floor(N s)}(x)`` of an Euler stack, for torchdiffeq."""

    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, s: Tensor, x: Tensor) -> Tensor:
        n = min(int(torch.floor(s * len(self.blocks) + 1e-9)), len(self.blocks) - 1)
        return self.blocks[n](x)


def torchdiffeq_adjoint(x: Tensor, blocks: Sequence[nn.Module]) -> Tensor:
    """The same Euler network through ``torchdiffeq.odeint_adjoint`` (fixed step ``1/N``): the usual memory-free
    baseline, which integrates the adjoint ODE backwards with the same Euler steps."""
    from torchdiffeq import odeint_adjoint

    field = _DepthField(blocks)
    times = torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device)
    return odeint_adjoint(field, x, times, method="euler", options={"step_size": 1.0 / len(blocks)},
                          adjoint_params=tuple(field.parameters()))[-1]


def reconstruction_error(x: Tensor, blocks: Sequence[nn.Module], step: float | None = None,
                         method: str = "euler") -> Tensor:
    """``max_n ||x~_n - x_n||`` (norm over all but the first, batch, dimension): the activations rebuilt
    backwards from the output against the forward ones (Props 3 and 5). One value per batch row."""
    steps = num_steps(method, blocks)
    step = 1.0 / steps if step is None else step
    with torch.no_grad(), frozen_running_stats(blocks):
        states = [x]
        for n in range(steps):
            states.append(forward_step(method, blocks, n, states[-1], step))
        rebuilt, worst = states[-1], torch.zeros(len(x), dtype=x.dtype, device=x.device)
        for n in reversed(range(steps)):
            rebuilt = inverse_step(method, blocks, n, rebuilt, step)
            worst = torch.maximum(worst, (rebuilt - states[n]).flatten(1).norm(dim=1))
    return worst


def gradient_errors(loss: Callable[[nn.Module], Tensor], stack: nn.Module, relative: bool = True) -> dict[str, float]:
    """Error ``||g_adjoint - g_backprop||`` of each named parameter's gradient, divided by ``||g_backprop||``
    if ``relative`` (Props 4 and 6 bound the absolute error; Fig. 3(c) shows the relative one), and under
    ``"(all)"`` the same for all parameters' gradients concatenated.
    ``loss(stack)`` must be deterministic (no dropout; batch norm in training mode is fine: its running
    statistics are restored between the two passes). ``stack``: anything with a ``backward`` attribute
    (:class:`ResidualStack`, :class:`resnode.models.ResNet`)."""
    saved = stack.backward
    buffers = {k: v.clone() for k, v in stack.state_dict().items() if not isinstance(v, nn.Parameter)}
    grads = {}
    for backward in ("adjoint", "backprop"):
        stack.backward = backward
        stack.load_state_dict({**stack.state_dict(), **buffers})
        stack.zero_grad(set_to_none=True)
        loss(stack).backward()
        grads[backward] = {name: p.grad.detach().clone() for name, p in stack.named_parameters() if p.grad is not None}
    stack.backward = saved
    stack.zero_grad(set_to_none=True)
    # A parameter whose exact gradient is zero up to rounding (a conv bias before batch norm) has no relative error.
    floor = 1e-9 * max(g.norm() for g in grads["backprop"].values())
    out = {name: ((grads["adjoint"][name] - g).norm() / (g.norm() if relative else 1)).item()
           for name, g in grads["backprop"].items() if g.norm() > floor or not relative}
    exact = torch.cat([g.flatten() for g in grads["backprop"].values()])
    approx = torch.cat([grads["adjoint"][name].flatten() for name in grads["backprop"]])
    out["(all)"] = ((approx - exact).norm() / (exact.norm() if relative else 1)).item()
    return out


def saved_tensor_bytes(run: Callable[[], Tensor]) -> int:
    """Bytes of the tensors autograd keeps for the backward pass while building ``run()``'s graph.

    A CPU measurement of activation memory that counts tensors, not the process (each storage once).
    """
    storages: dict[int, int] = {}

    def pack(t: Tensor):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    del out
    return sum(storages.values())


__all__ = ["METHODS", "BACKWARDS", "StackedLayers", "num_steps", "forward_step", "inverse_step", "frozen_running_stats", "integrate",
           "ResidualStack", "Layer", "layers", "checkpointed", "torchdiffeq_adjoint", "reconstruction_error", "gradient_errors", "saved_tensor_bytes"]
