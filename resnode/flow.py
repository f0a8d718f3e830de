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
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from . import _checks, engine


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


def gradient_flow(x: Tensor, y: Tensor, weights: dict[str, Tensor], spec: engine.Residual, steps: int, dt,
                  *, clip: float | None = None, scale: float = 1.0, recorders: Sequence = (),
                  progress: bool = False, checkpoint: str | os.PathLike | None = None,
                  checkpoint_every: int | None = None) -> dict[str, Tensor]:
    """Run ``steps`` updates of the (clipped) gradient flow from ``weights`` (``W``, and ``V`` / ``b`` if present).

    ``x``: inputs already lifted (``h_0 = A x``), ``(n, q)``, or ``(S, n, q)``; ``y``: targets of ``h_L`` (the
    output map ``B`` is the identity, as in Appendix E's synthetic runs). Every recorder is updated at
    ``t = 0 .. steps``. With ``checkpoint``, the weights, the iteration and the recorders are saved there
    every ``checkpoint_every`` updates (by default every ``2^20 / L`` updates, a minute or so of work at any
    depth) and at the end, and a run finding the file resumes from it.
    Returns the trained weights (new tensors; the arguments are not modified).
    """
    steps = _checks.positive_int("steps", steps)
    if clip is not None:
        clip = _checks.positive_float("clip", clip)
    if not set(weights) <= {"W", "V", "b"} or "W" not in weights:
        raise ValueError(f"weights must name W and optionally V and b; got {sorted(weights)}")
    weights = {n: w.detach().clone() for n, w in weights.items()}
    copies = weights["W"].dim() - 3
    if copies and x.dim() == 2:
        x = x.expand(weights["W"].shape[1], *x.shape).contiguous()
    if copies and y.dim() == 2:
        y = y.expand(weights["W"].shape[1], *y.shape)
    rate = _per_copy(dt, weights)
    depth = weights["W"].shape[0]
    if checkpoint_every is None:
        checkpoint_every = max(1, 2**20 // depth)
    checkpoint_every = _checks.positive_int("checkpoint_every", checkpoint_every)
    recorders = list(recorders)
    start = 0
    path = None if checkpoint is None else Path(checkpoint)
    if path is not None and path.exists():
        saved = torch.load(path, weights_only=False)
        start, weights = saved["t"], saved["weights"]
        if len(saved["recorders"]) != len(recorders):
            raise ValueError(f"{path} holds {len(saved['recorders'])} recorders; this run passes {len(recorders)}")
        for mine, theirs in zip(recorders, saved["recorders"]):
            mine.__dict__.update(theirs.__dict__)
    workspace = engine.Workspace()
    bar = tqdm(total=steps, initial=start, disable=not progress, desc=f"gradient flow, L={depth}")
    with torch.no_grad():
        for t in range(start, steps + 1):
            loss, grads = loss_and_grads(x, y, weights, spec, scale, workspace)
            if not torch.isfinite(loss).all():
                raise FloatingPointError(f"loss became {loss} at iteration {t}; lower dt")
            for recorder in recorders:
                recorder.update(t, weights, loss)
            if t == steps:
                break
            for name, w in weights.items():
                velocity = grads[name].mul_(-depth)  # the right-hand side of eq. (4)
                if clip is not None:
                    velocity.clamp_(-clip, clip)  # eq. (5)
                if isinstance(rate[name], float):
                    w.add_(velocity, alpha=rate[name])
                else:
                    w.addcmul_(velocity, rate[name])
            bar.update(1)
            if path is not None and (t + 1) % checkpoint_every == 0:
                _save(path, t + 1, weights, recorders)
    bar.close()
    if path is not None:
        _save(path, steps + 1, weights, recorders)  # t = steps + 1: finished, nothing left to record
    return weights


def checkpoint_file(folder: str | os.PathLike, name: str) -> Path | None:
    """``folder/name.pt`` for a resumable run's ``checkpoint`` (``gradient_flow``, ``vision.train_classifier``), the
    folder created; ``None`` when ``folder`` is empty (a chapter's ``cache_dir`` left unset). The name must say
    everything that makes the run differ."""
    if not str(folder):
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder) / f"{name}.pt"


def _save(path: Path, t: int, weights: dict[str, Tensor], recorders: list) -> None:
    """Write atomically: a run killed while saving leaves the previous checkpoint intact."""
    partial = path.with_name(path.name + ".partial")
    torch.save({"t": t, "weights": weights, "recorders": recorders}, partial)
    os.replace(partial, path)


__all__ = ["loss_and_grads", "gradient_flow", "checkpoint_file"]
