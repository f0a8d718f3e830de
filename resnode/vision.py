"""Small image ResNets and their training loop (Sander et al. Section 4, Fig. 3(c) and Fig. 4).

The network of the authors' simple CIFAR experiments: a 5x5 stride-3 stem convolution to 16
channels with batch norm and ReLU, then ``N`` residual blocks ``conv3x3-BN-ReLU-conv3x3-BN`` (the
last batch norm initialised at zero, so every block starts as the identity) integrated by Euler or
Heun with step ``1/N``, by exact backprop or by the memory-free adjoint, then 4x4 average pooling
and a linear classifier.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from . import _checks
from .adjoint import ResidualStack
from .data import Dataset


class ConvBlock(nn.Module):
    """Residual function ``conv3x3 - BN - ReLU - conv3x3 - BN``; ``zero_init`` zeroes the last batch norm."""

    def __init__(self, channels: int, zero_init: bool = True):
        super().__init__()
        channels = _checks.positive_int("channels", channels)
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels))
        if zero_init:
            nn.init.zeros_(self.body[-1].weight)
            nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class TinyResNet(nn.Module):
    """Stem, a ``ResidualStack`` of ``depth`` steps (Heun holds ``depth + 1`` blocks), pooling and a linear head."""

    def __init__(self, depth: int, method: str = "euler", mode: str = "backprop", in_channels: int = 3,
                 channels: int = 16, classes: int = 10, zero_init: bool = True):
        super().__init__()
        depth = _checks.positive_int("depth", depth)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, 5, stride=3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
        blocks = [ConvBlock(channels, zero_init) for _ in range(depth + (method == "heun"))]
        self.stack = ResidualStack(blocks, method=method, mode=mode)
        self.head = nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.LazyLinear(classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stack(self.stem(x)))


def error_rate(model: nn.Module, data: Dataset, batch_size: int = 1000) -> float:
    """Percentage of misclassified examples (model in eval mode, restored afterwards)."""
    was_training = model.training
    model.eval()
    wrong = 0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            wrong += (model(data.inputs[i:i + batch_size]).argmax(1) != data.targets[i:i + batch_size]).sum().item()
    model.train(was_training)
    return 100.0 * wrong / len(data)


def train_classifier(model: nn.Module, train: Dataset, test: Dataset, epochs: int, batch_size: int = 256,
                     lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4,
                     milestones: tuple[int, ...] | None = None, seed: int = 0, checkpoint: str | Path | None = None,
                     stop_after: int | None = None, progress: bool = False) -> dict[str, list[float]]:
    """SGD with momentum and step decay (lr / 10 at each milestone epoch; by default at 1/3 and 2/3 of the run,
    the authors' 30 and 60 of 90). Returns per-epoch training loss, test error (%) and seconds.

    With ``checkpoint``, model, optimiser and history are saved after every epoch and a run resumes
    from the file if it exists, so an interrupted run loses at most one epoch. ``stop_after`` ends this
    call after that many epochs in total (a time-sliced job resumes it later from the checkpoint).
    """
    epochs = _checks.positive_int("epochs", epochs)
    batch_size = _checks.positive_int("batch_size", batch_size)
    milestones = milestones if milestones is not None else (math.ceil(epochs / 3), math.ceil(2 * epochs / 3))
    with torch.no_grad():
        model(train.inputs[:2])  # materialise the lazy head before the optimiser sees the parameters
    optimiser = torch.optim.SGD(model.parameters(), lr=_checks.positive_float("lr", lr), momentum=momentum,
                                weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimiser, milestones=list(milestones), gamma=0.1)
    history: dict[str, list[float]] = {"loss": [], "test_error": [], "seconds": []}
    if checkpoint is not None and Path(checkpoint).exists():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        history = state["history"]
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(len(train), generator=generator)  # drawn every epoch, so a resumed run matches
        if epoch < len(history["loss"]):
            continue
        if stop_after is not None and epoch >= stop_after:
            break
        model.train()
        start, total = time.perf_counter(), 0.0
        batches = range(0, len(train), batch_size)
        for i in tqdm(batches, disable=not progress, desc=f"epoch {epoch + 1}/{epochs}", leave=False):
            index = order[i:i + batch_size]
            loss = nn.functional.cross_entropy(model(train.inputs[index]), train.targets[index])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} in epoch {epoch + 1}; lower the learning rate")
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(index)
        schedule.step()
        history["loss"].append(total / len(train))
        history["seconds"].append(time.perf_counter() - start)
        history["test_error"].append(error_rate(model, test))
        if checkpoint is not None:
            torch.save({"model": model.state_dict(), "optimiser": optimiser.state_dict(),
                        "schedule": schedule.state_dict(), "history": history}, checkpoint)
    return history


__all__ = ["ConvBlock", "TinyResNet", "error_rate", "train_classifier"]
