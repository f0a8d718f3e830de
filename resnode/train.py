"""Training loops for the book's small models."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm

from . import _checks

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


def fit(parameters: Iterable[torch.nn.Parameter], loss: Callable[[], torch.Tensor], steps: int, lr: float,
        optimizer: str = "adam", progress: bool = False, record_every: int = 1) -> list[float]:
    """Full-batch training: ``steps`` updates of ``optimizer`` on ``loss()``; returns the loss every ``record_every`` steps."""
    steps = _checks.positive_int("steps", steps)
    lr = _checks.positive_float("lr", lr)
    record_every = _checks.positive_int("record_every", record_every)
    opt = OPTIMIZERS[_checks.one_of("optimizer", optimizer, tuple(OPTIMIZERS))](list(parameters), lr=lr)
    history = []
    for step in tqdm(range(steps), disable=not progress, desc="training"):
        opt.zero_grad()
        value = loss()
        if not torch.isfinite(value):
            raise FloatingPointError(f"loss became {value.item()} at step {step}; lower the learning rate")
        value.backward()
        opt.step()
        if step % record_every == 0:
            history.append(value.item())
    return history
