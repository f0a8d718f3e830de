"""The (clipped) gradient flow of Marion et al. eqs. (4)-(5), discretised by gradient descent on the fused engine.

Residual weights move by ``Z_k <- Z_k + dt * pi(-L d loss / d Z_k)`` (the factor ``L`` of eq. (4); ``pi``
coordinate-wise clipping of the whole right-hand side at ``clip``, eq. (5), so no coordinate moves by
more than ``dt * clip`` per update); the input and output maps are fixed (Appendix E). The
loss is ``scale * (1/n) sum_i ||h_L(x_i) - y_i||^2``: ``scale = 1`` is the paper's, ``scale = 1/d`` the
authors' code's (a mean over coordinates too). ``S`` copies run at once when the weights carry a copy
dimension after depth; ``dt`` may then hold one step per copy (a learning-rate sweep in one pass).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from . import _checks, checkpoints, engine, train


def loss_and_grads(x: Tensor, y: Tensor, weights: dict[str, Tensor], spec: engine.Residual, scale: float = 1.0,
                   workspace: engine.Workspace | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss (shape ``(S,)`` with copies, else ``()``) and its gradients in the residual weights, fused."""
    trace = engine.forward(x, weights["W"], weights.get("V"), weights.get("b"), spec, workspace)
    residual = trace.states[-1] - y
    n = x.shape[-2]
    loss = scale / n * residual.square().sum((-2, -1))
    _, gW, gV, gb = engine.backward((2 * scale / n) * residual, trace, weights["W"], weights.get("V"),
                                    weights.get("b"), spec, workspace)
    grads = {"W": gW, "V": gV, "b": gb}
    return loss, {name: grads[name] for name in weights}


def _per_copy(dt, weights: dict[str, Tensor]) -> dict[str, Tensor | float]:
    """``dt`` as a float, or a ``(S,)`` tensor reshaped to broadcast against each ``(L, S, ...)`` weight."""
    if isinstance(dt, Tensor) and dt.dim() == 1:
        if (dt <= 0).any():
            raise ValueError("every dt must be positive")
        return {n: dt.to(w).reshape(1, -1, *(1,) * (w.dim() - 2)) for n, w in weights.items()}
    value = _checks.positive_float("dt", dt)
    return {n: value for n in weights}


def _recorder_state(recorder) -> dict:
    """What a checkpoint keeps of a recorder: its attributes (less what its ``__getstate__`` leaves out)."""
    state = recorder.__getstate__() if hasattr(recorder, "__getstate__") else recorder.__dict__
    return dict(state or {})  # object.__getstate__ gives None for an object without attributes


def gradient_flow(x: Tensor, y: Tensor, weights: dict[str, Tensor], spec: engine.Residual, steps: int, dt,
                  *, clip: float | None = None, scale: float = 1.0, recorders: Sequence = (),
                  progress: bool = False, cache_dir: str | os.PathLike | None = None, name: str = "flow",
                  checkpoint_every: int | None = None) -> dict[str, Tensor]:
    """Run ``steps`` updates of the (clipped) gradient flow from ``weights`` (``W``, and ``V`` / ``b`` if present).

    ``x``: inputs already lifted (``h_0 = A x``), ``(n, q)``, or ``(S, n, q)``; ``y``: targets of ``h_L`` (the
    output map ``B`` is the identity, as in Appendix E's synthetic runs), of the same shape. Every recorder is
    updated at ``t = 0 .. steps``. A loss that is not finite, or grows beyond
    :data:`resnode.train.DIVERGENCE_FACTOR` times its first value in any copy, raises
    :class:`resnode.train.DivergenceError` (lower ``dt``).

    ``cache_dir``: the weights, the iteration and the recorders' state are saved there
    (:mod:`resnode.checkpoints`, file ``name`` plus a hash of the run's configuration: the starting weights, the
    data, ``spec``, ``steps``, ``dt``, ``clip``, ``scale`` and the recorders' starting state) every
    ``checkpoint_every`` updates (by default every ``2^20 / L`` updates, a minute or so of work at any depth) and
    at the end; a run with the same configuration resumes from its file, bit for bit, and another never adopts it.
    Returns the trained weights (new tensors; the arguments are not modified).
    """
    steps = _checks.positive_int("steps", steps)
    if clip is not None:
        clip = _checks.positive_float("clip", clip)
    if not set(weights) <= {"W", "V", "b"} or "W" not in weights:
        raise ValueError(f"weights must name W and optionally V and b; got {sorted(weights)}")
    _checks.same_dtype(x=x, y=y, **weights)
    weights = {n: w.detach().clone() for n, w in weights.items()}
    copies = weights["W"].dim() - 3
    if copies and x.dim() == 2:
        x = x.expand(weights["W"].shape[1], *x.shape).contiguous()
    if copies and y.dim() == 2:
        y = y.expand(weights["W"].shape[1], *y.shape)
    outputs = (*x.shape[:-1], weights["W"].shape[-1])
    if tuple(y.shape) != outputs:
        raise ValueError(f"y must have the shape of the outputs h_L, {outputs}; got {tuple(y.shape)} "
                         "(a target of another shape would be broadcast against them)")
    rate = _per_copy(dt, weights)
    depth = weights["W"].shape[0]
    if checkpoint_every is None:
        checkpoint_every = max(1, 2**20 // depth)
    checkpoint_every = _checks.positive_int("checkpoint_every", checkpoint_every)
    recorders = list(recorders)
    start, target, first = 0, None, None
    if cache_dir:
        key = dict(steps=steps, dt=dt.tolist() if isinstance(dt, Tensor) else dt, clip=clip, scale=scale,
                   spec=repr(spec), start=checkpoints.digest(weights), data=checkpoints.digest([x, y]),
                   recorders=[type(r).__name__ for r in recorders],
                   recorder_start=checkpoints.digest([r.__dict__ for r in recorders]))
        target = checkpoints.path(cache_dir, name, key)
        saved = checkpoints.load(target, key)
        if saved is not None:
            start, weights, first = saved["t"], saved["weights"], saved["first"]
            for recorder, state in zip(recorders, saved["recorders"], strict=True):
                if hasattr(recorder, "__setstate__"):
                    recorder.__setstate__(state)
                else:
                    recorder.__dict__.update(state)
    save = lambda t: checkpoints.save(target, {"t": t, "weights": weights, "first": first,
                                               "recorders": [_recorder_state(r) for r in recorders]}, key)
    workspace = engine.Workspace()
    bar = tqdm(total=steps, initial=min(start, steps), disable=not progress, desc=f"gradient flow, L={depth}")
    with torch.no_grad():
        for t in range(start, steps + 1):
            loss, grads = loss_and_grads(x, y, weights, spec, scale, workspace)
            first = loss.clone() if first is None else first
            train.check_divergence(loss, first, t, "dt")
            for recorder in recorders:
                recorder.update(t, weights, loss)
            if t == steps:
                break
            for name_, w in weights.items():
                velocity = grads[name_].mul_(-depth)  # the right-hand side of eq. (4)
                if clip is not None:
                    velocity.clamp_(-clip, clip)  # eq. (5)
                if isinstance(rate[name_], float):
                    w.add_(velocity, alpha=rate[name_])
                else:
                    w.addcmul_(velocity, rate[name_])
            bar.update(1)
            if target is not None and (t + 1) % checkpoint_every == 0:
                save(t + 1)
    bar.close()
    if target is not None:
        save(steps + 1)  # t = steps + 1: finished, nothing left to record
    return weights


__all__ = ["loss_and_grads", "gradient_flow"]
