"""Mini-batch SGD of Cont, Rossier & Xu's ResNet ``h_{k+1} = h_k + delta_k sigma(A_k h_k + b_k)`` (eq. (1.1)).

The network runs on the fused engine (``V = delta``, one scalar per layer). Two parametrisations of
``delta`` (Section 3.2 and the authors' ``FinalResNet``):

- ``"shared"``: one trainable scalar, the layers use ``|delta|``, initialised at ``1 / L`` (used with tanh);
- ``"layer"``: one trainable scalar per layer, initialised ``N(0, (1/L)^2)`` (used with ReLU).

Initialisation ``xavier-depth`` (the authors' code): ``A_k ~ N(0, (s / (L d))^2)``, ``b_k ~ N(0, (s / (L sqrt d))^2)``.
Training (Appendix A): SGD with a constant learning rate on the mean-square loss (mean over the batch
and the coordinates), samples reshuffled each epoch, stopped after an epoch whose mean mini-batch loss
is below ``stop_loss``, or after ``max_updates`` updates / ``max_epochs`` epochs. A copy dimension ``S``
after depth trains ``S`` same-depth networks at once (seeds or learning rates); each copy stops on its own.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from . import _checks, checkpoints, engine, flow
from .train import check_divergence

DELTAS = ("shared", "layer")
OPTIMIZERS = ("sgd", "adam")


def depth_grid(min_depth: int, max_depth: int, base: float) -> list[int]:
    """The authors' depth grid: the distinct ``floor(base^n) >= min_depth`` up to ``max_depth``
    (base ``2^(1/3)``: 3 .. 10,321 for the synthetic set; base 1.15: up to 942 for MNIST, Appendix A)."""
    min_depth, max_depth = _checks.positive_int("min_depth", min_depth), _checks.positive_int("max_depth", max_depth)
    base = _checks.positive_float("base", base)
    if base <= 1:
        raise ValueError(f"base must be > 1; got {base}")
    depths, n = [], 0
    while (value := int(np.floor(base**n * (1 + 1e-12)))) <= max_depth:
        if value >= min_depth and value not in depths:
            depths.append(value)
        n += 1
    return depths


def init_weights(depth: int, dim: int, delta: str = "shared", *, scale: float = 0.01, copies: int | None = None,
                 seed: int = 0, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """``{"A": (L, [S,] d, d), "b": (L, [S,] d), "delta": ((S,) or (), shared) or (L, [S]) (per layer)}``, ``xavier-depth``."""
    depth, dim = _checks.positive_int("depth", depth), _checks.positive_int("dim", dim)
    _checks.one_of("delta", delta, DELTAS)
    scale = _checks.positive_float("scale", scale)
    lead = () if copies is None else (_checks.positive_int("copies", copies),)
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(depth, *lead, dim, dim, generator=g, dtype=dtype) * (scale / (depth * dim))
    b = torch.randn(depth, *lead, dim, generator=g, dtype=dtype) * (scale / (depth * np.sqrt(dim)))
    if delta == "shared":
        d = torch.full(lead, 1 / depth, dtype=dtype)
    else:
        d = torch.randn(depth, *lead, generator=g, dtype=dtype) / depth
    return {"A": A, "b": b, "delta": d}


def _delta_kind(weights: dict[str, Tensor]) -> str:
    if set(weights) != {"A", "b", "delta"}:
        raise ValueError(f"weights must name A, b and delta; got {sorted(weights)}")
    A, delta = weights["A"], weights["delta"]
    if delta.shape == A.shape[1:-2]:
        return "shared"
    if delta.shape == A.shape[:-2]:
        return "layer"
    raise ValueError(f"delta must have shape {tuple(A.shape[1:-2])} (shared) or {tuple(A.shape[:-2])} (per layer); "
                     f"got {tuple(delta.shape)}")


def layer_scalars(weights: dict[str, Tensor]) -> Tensor:
    """The factors ``delta_k`` the layers use, ``(L, [S])``: ``|delta|`` repeated (shared) or ``delta_k`` (per layer)."""
    delta = weights["delta"]
    if _delta_kind(weights) == "shared":
        return delta.abs().expand(weights["A"].shape[:-2])
    return delta


def loss_and_grads(x: Tensor, y: Tensor, weights: dict[str, Tensor], activation: str,
                   workspace: engine.Workspace | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean-square loss ``(1 / (n d)) sum_i ||h_L(x_i) - y_i||^2`` (``()`` or ``(S,)``) and its gradients in
    ``A``, ``b`` and ``delta`` (the shared one through ``|delta|``): ``flow.loss_and_grads`` with ``V = delta_k``."""
    kind = _delta_kind(weights)
    fused = {"W": weights["A"], "V": layer_scalars(weights), "b": weights["b"]}
    loss, grads = flow.loss_and_grads(x, y, fused, engine.Residual(activation), scale=1 / x.shape[-1], workspace=workspace)
    gdelta = grads["V"].sum(0) * torch.sign(weights["delta"]) if kind == "shared" else grads["V"]
    return loss, {"A": grads["W"], "b": grads["b"], "delta": gdelta}


def mse(x: Tensor, y: Tensor, weights: dict[str, Tensor], activation: str) -> Tensor:
    """The mean-square loss of the network on ``(x, y)`` (``()`` or ``(S,)``)."""
    trace = engine.forward(x, weights["A"], layer_scalars(weights), weights["b"], engine.Residual(activation))
    return (trace.states[-1] - y).square().mean((-2, -1))


@dataclass
class Run:
    """A trained network: its ``weights``, the mean mini-batch loss of each epoch (``(epochs, [S])``) and the
    number of updates each copy made."""

    weights: dict[str, Tensor]
    epoch_losses: np.ndarray
    updates: np.ndarray


def train(x: Tensor, y: Tensor, weights: dict[str, Tensor], activation: str, *, lr=0.01, batch_size: int = 32,
          max_updates: int = 160, max_epochs: int = 5, stop_loss: float = 0.01, optimizer: str = "sgd",
          seed: int = 0, progress: bool = False) -> Run:
    """SGD of ``weights`` (see :func:`init_weights`) on ``(x, y)`` (``(n, d)``), Appendix A of Cont et al.

    ``lr``: a float, or a ``(S,)`` tensor with one learning rate per copy. The mini-batches (the same for every
    copy) are the ``floor(n / batch_size)`` consecutive blocks of a fresh permutation each epoch.
    ``optimizer``: ``"sgd"`` (the paper's text) or ``"adam"`` (torch's Adam with its default betas, the default
    of the authors' released code). Returns a :class:`Run`; the arguments are not modified.
    """
    _checks.one_of("optimizer", optimizer, OPTIMIZERS)
    kind = _delta_kind(weights)
    batch_size = _checks.positive_int("batch_size", batch_size)
    max_updates, max_epochs = _checks.positive_int("max_updates", max_updates), _checks.positive_int("max_epochs", max_epochs)
    stop_loss = _checks.nonnegative_float("stop_loss", stop_loss)
    if len(x) == 0:
        raise ValueError("x holds no samples")
    _checks.same_dtype(x=x, y=y, **weights)
    if x.dim() != 2 or y.shape != x.shape or x.shape[1] != weights["A"].shape[-1]:
        raise ValueError(f"x and y must be (n, d={weights['A'].shape[-1]}); got {tuple(x.shape)} and {tuple(y.shape)}")
    if batch_size > len(x):
        raise ValueError(f"batch_size must be at most the number of samples {len(x)}; got {batch_size}")
    copies = weights["A"].shape[1:-2]
    weights = {name: w.detach().clone() for name, w in weights.items()}
    if isinstance(lr, Tensor):
        if lr.shape != copies or (lr <= 0).any():
            raise ValueError(f"lr must be a positive number or a positive tensor of shape {tuple(copies)}; got {lr}")
        rate = lr.to(weights["A"]).clone()
    else:
        rate = torch.full(copies, _checks.positive_float("lr", lr), dtype=weights["A"].dtype)
    per_epoch = len(x) // batch_size
    g = torch.Generator().manual_seed(seed)
    workspace = engine.Workspace()
    adam = _Adam()
    losses, updates, done, first = [], np.zeros(copies, dtype=int), 0, None
    expand = (lambda t: t.expand(*copies, *t.shape)) if copies else (lambda t: t)
    bar = tqdm(total=min(max_updates, per_epoch * max_epochs), disable=not progress,
               desc=f"SGD, L={weights['A'].shape[0]}, {activation}, {kind} delta")
    with torch.no_grad():
        for _ in range(max_epochs):
            order = torch.randperm(len(x), generator=g)
            running = torch.zeros(copies, dtype=rate.dtype)
            steps = 0
            for i in range(per_epoch):
                if done >= max_updates:
                    break
                idx = order[i * batch_size:(i + 1) * batch_size]
                loss, grads = loss_and_grads(expand(x[idx]), expand(y[idx]), weights, activation, workspace)
                first = loss.clone() if first is None else first
                check_divergence(loss, first, done, "lr")
                for name, w in weights.items():
                    direction = grads[name] if optimizer == "sgd" else adam.direction(name, grads[name])
                    w.addcmul_(direction, _broadcast(rate, w, name, kind), value=-1)
                running += loss
                updates += (rate > 0).numpy().astype(int) if copies else int(rate > 0)
                steps += 1
                done += 1
                bar.update(1)
            if steps == 0:
                break
            mean = running / steps
            losses.append(mean.numpy().copy())
            rate = torch.where(mean < stop_loss, torch.zeros_like(rate), rate)  # this copy has converged
            if (rate == 0).all() or done >= max_updates:
                break
    bar.close()
    return Run(weights, np.array(losses), updates)


class _Adam:
    """Adam's step direction ``m_hat / (sqrt(v_hat) + eps)`` (Kingma & Ba; torch's defaults), one state per tensor."""

    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.betas, self.eps, self.state = betas, eps, {}

    def direction(self, name: str, grad: Tensor) -> Tensor:
        b1, b2 = self.betas
        t, m, v = self.state.get(name, (0, torch.zeros_like(grad), torch.zeros_like(grad)))
        t += 1
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        self.state[name] = (t, m, v)
        return (m / (1 - b1**t)).div_((v / (1 - b2**t)).sqrt_().add_(self.eps))


def _broadcast(rate: Tensor, w: Tensor, name: str, kind: str) -> Tensor:
    """The per-copy rate shaped against ``w``: ``(L, S, ...)`` for A, b and per-layer delta, ``(S,)`` for a shared delta."""
    if rate.dim() == 0:
        return rate
    if name == "delta" and kind == "shared":
        return rate
    return rate.reshape(1, -1, *(1,) * (w.dim() - 2))


def train_depths(x: Tensor, y: Tensor, depths: Sequence[int], activation: str, delta: str, *, scale: float = 0.01,
                 copies: int | None = None, seed: int = 0, cache_dir: str | os.PathLike | None = None,
                 progress: bool = False, **sgd) -> dict[int, Run]:
    """Train one network (or ``copies``) per depth from :func:`init_weights` (seeded by ``seed + depth``).

    ``sgd``: the keyword arguments of :func:`train`. With ``cache_dir`` (a folder), each depth's run is saved there
    when done (:mod:`resnode.checkpoints`: file ``L<depth>`` plus a hash of the settings and the data) and loaded
    instead of retrained when a run with the same settings finds it, so an interrupted sweep resumes with the
    depths it had finished.
    """
    settings = dict(activation=activation, delta=delta, scale=scale, copies=copies, seed=seed,
                    data=checkpoints.digest([x, y]),
                    **{k: (v.tolist() if isinstance(v, Tensor) else v) for k, v in sgd.items()})
    runs = {}
    for depth in tqdm(list(depths), disable=not progress, desc=f"depths ({activation}, {delta} delta)"):
        key = dict(settings, depth=int(depth))
        target = checkpoints.path(cache_dir, f"L{int(depth):05d}", key) if cache_dir else None
        saved = checkpoints.load(target, key) if target is not None else None
        if saved is not None:
            runs[depth] = Run(saved["weights"], saved["epoch_losses"], saved["updates"])
            continue
        weights = init_weights(depth, x.shape[1], delta, scale=scale, copies=copies, seed=seed + depth, dtype=x.dtype)
        runs[depth] = train(x, y, weights, activation, seed=seed + depth, **sgd)
        if target is not None:
            run = runs[depth]
            checkpoints.save(target, {"weights": run.weights, "epoch_losses": run.epoch_losses, "updates": run.updates}, key)
    return runs


def residual_scale(weights: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The tensors whose scaling is analysed (Section 3.2): ``(A_k, b_k)`` with a shared ``delta``; with one
    ``delta_k`` per layer, ``(|delta_k| A_k, |delta_k| b_k)`` (Remark 2: ReLU is 1-homogeneous, so
    ``delta_k relu(A_k h + b_k) = sign(delta_k) relu(|delta_k| A_k h + |delta_k| b_k)``)."""
    if _delta_kind(weights) == "shared":
        return weights["A"], weights["b"]
    scale = weights["delta"].abs()
    return scale[..., None, None] * weights["A"], scale[..., None] * weights["b"]


def with_residual(weights: dict[str, Tensor], A: Tensor, b: Tensor) -> dict[str, Tensor]:
    """Weights with the analysed tensors replaced by ``A`` and ``b`` (the inverse of :func:`residual_scale`):
    a shared ``delta`` is kept; per-layer ``delta_k`` become ``sign(delta_k)`` (exact for 1-homogeneous sigma)."""
    if A.shape != weights["A"].shape or b.shape != weights["b"].shape:
        raise ValueError(f"A and b must have shapes {tuple(weights['A'].shape)} and {tuple(weights['b'].shape)}")
    if _delta_kind(weights) == "shared":
        return {"A": A, "b": b, "delta": weights["delta"]}
    return {"A": A, "b": b, "delta": torch.sign(weights["delta"])}


__all__ = ["DELTAS", "OPTIMIZERS", "depth_grid", "init_weights", "layer_scalars", "loss_and_grads", "mse", "Run", "train",
           "train_depths", "residual_scale", "with_residual"]
