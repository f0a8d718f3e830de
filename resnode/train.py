"""Training loops for the book's small models."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from tqdm import tqdm

from . import _checks

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}

DIVERGENCE_FACTOR = 1e6
"""A loss this many times its first value means the iteration diverges (gradient steps on these losses never
legitimately raise them so far)."""


class DivergenceError(FloatingPointError):
    """The loss became NaN or infinite, or grew far beyond its first value: the step size is too large."""


def check_divergence(value, first, step: int | str, knob: str) -> None:
    """Raise :class:`DivergenceError` naming ``knob`` (the step size to lower) if the loss ``value`` at iteration
    ``step`` is not finite or exceeds ``DIVERGENCE_FACTOR`` times the first loss ``first``. ``value`` and ``first``
    are numbers or tensors of one loss per copy (every copy is checked). A first loss of 0 gives no scale
    (training along a ``continuation`` starts at its target: the loss is 0, then grows as the target moves), so
    then only a non-finite loss counts."""
    value = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    first = torch.as_tensor(first, dtype=torch.float64).detach().cpu().expand_as(value)
    where = "" if value.dim() == 0 else " in copies {}"
    if not torch.isfinite(first).all():  # the first loss: no step has been taken yet
        shown = first.item() if first.dim() == 0 else first.tolist()
        raise DivergenceError(f"the loss is {shown} before any step (iteration {step}): the data or the starting "
                              "weights hold NaN or inf, or the network overflows at its start; lowering a step size "
                              "cannot help")
    if not torch.isfinite(value).all():
        bad = (~torch.isfinite(value)).nonzero().flatten().tolist()
        shown = value.item() if value.dim() == 0 else value[~torch.isfinite(value)].tolist()
        raise DivergenceError(f"the loss became {shown} at iteration {step}{where.format(bad)}: lower {knob}")
    grown = (first != 0) & (value > DIVERGENCE_FACTOR * first.abs())
    if grown.any():
        i = grown.flatten().nonzero()[0].item()
        was, now = first.flatten()[i].item(), value.flatten()[i].item()
        raise DivergenceError(f"the loss grew from {was:.3g} to {now:.3g} by iteration {step}"
                              f"{where.format(grown.flatten().nonzero().flatten().tolist())} "
                              f"(more than {DIVERGENCE_FACTOR:.0e} times): the iteration diverges; lower {knob}")


def fit(parameters: Iterable[torch.nn.Parameter], loss: Callable[[int], torch.Tensor], steps: int, lr: float,
        optimizer: str = "adam", progress: bool = False, record_every: int = 1) -> list[float]:
    """Full-batch training: ``steps`` updates of ``optimizer`` on ``loss(step)``; returns the loss every ``record_every`` steps.

    ``loss`` receives the step index, so that its target may change during training (``continuation``).
    """
    steps = _checks.positive_int("steps", steps)
    lr = _checks.positive_float("lr", lr)
    record_every = _checks.positive_int("record_every", record_every)
    opt = OPTIMIZERS[_checks.one_of("optimizer", optimizer, tuple(OPTIMIZERS))](list(parameters), lr=lr)
    history, first = [], None
    for step in tqdm(range(steps), disable=not progress, desc="training"):
        opt.zero_grad()
        value = loss(step)
        current = value.item()
        first = current if first is None else first
        check_divergence(current, first, step, "the learning rate lr")
        value.backward()
        opt.step()
        if step % record_every == 0:
            history.append(current)
    return history


def continuation(start: torch.Tensor, end: torch.Tensor, ramp_steps: int) -> Callable[[int], torch.Tensor]:
    """Targets ``(1 - t) start + t end`` with ``t = min(1, step / ramp_steps)``: a homotopy from ``start`` to ``end``.

    Training along it keeps the network near a solution of a slowly moving problem (a continuation
    method) instead of descending on the final loss from the start.
    """
    ramp_steps = _checks.positive_int("ramp_steps", ramp_steps)
    if start.shape != end.shape:
        raise ValueError(f"start and end must have the same shape; got {tuple(start.shape)} and {tuple(end.shape)}")
    return lambda step: torch.lerp(start, end, min(1.0, step / ramp_steps))


__all__ = ["OPTIMIZERS", "DIVERGENCE_FACTOR", "DivergenceError", "check_divergence", "fit", "continuation"]
