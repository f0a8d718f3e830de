"""Training loops for the book's small models."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from tqdm import tqdm

from . import _checks

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


def fit(parameters: Iterable[torch.nn.Parameter], loss: Callable[[int], torch.Tensor], steps: int, lr: float,
        optimizer: str = "adam", progress: bool = False, record_every: int = 1) -> list[float]:
    """Full-batch training: ``steps`` updates of ``optimizer`` on ``loss(step)``; returns the loss every ``record_every`` steps.

    ``loss`` receives the step index, so that its target may change during training (``continuation``).
    """
    steps = _checks.positive_int("steps", steps)
    lr = _checks.positive_float("lr", lr)
    record_every = _checks.positive_int("record_every", record_every)
    opt = OPTIMIZERS[_checks.one_of("optimizer", optimizer, tuple(OPTIMIZERS))](list(parameters), lr=lr)
    history = []
    for step in tqdm(range(steps), disable=not progress, desc="training"):
        opt.zero_grad()
        value = loss(step)
        if not torch.isfinite(value):
            raise FloatingPointError(f"loss became {value.item()} at step {step}; lower the learning rate")
        value.backward()
        opt.step()
        if step % record_every == 0:
            history.append(value.item())
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
