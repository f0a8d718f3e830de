"""Small image ResNets and their training loop (Sander et al. Section 4, Fig. 3(c) and Fig. 4).

The network of the authors' simple CIFAR experiments: a 5x5 stride-3 stem convolution to 16
channels with batch norm and ReLU, then ``N`` residual blocks ``conv3x3-BN-ReLU-conv3x3-BN`` (the
last batch norm initialised at zero, so every block starts as the identity) integrated by Euler or
Heun with step ``1/N``, by exact backprop or by the memory-free adjoint, then 4x4 average pooling
and a linear classifier. The training loop (SGD with step or cosine decay, crops and flips, resume) also
trains the convolutional networks of Cont et al. (``conv_regimes``).
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
from .images import crop_and_flip


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


SCHEDULES = ("step", "cosine")


def sgd_epoch(model: nn.Module, optimiser: torch.optim.Optimizer, batches, epoch: int = 0,
              clip_norm: float | None = None) -> float:
    """One pass of cross-entropy SGD over ``(inputs, targets)`` batches (model in training mode); the mean loss.

    With ``clip_norm``, each step's gradient (all parameters together) is scaled down to that Euclidean norm when
    it is larger (``torch.nn.utils.clip_grad_norm_``), before weight decay and momentum. A non-finite loss raises
    ``FloatingPointError`` naming the epoch (without batch norm, too large a learning rate makes deep networks
    diverge).
    """
    model.train()
    total, count = 0.0, 0
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} in epoch {epoch + 1}; lower the learning rate")
        optimiser.zero_grad()
        loss.backward()
        if clip_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimiser.step()
        total, count = total + loss.item() * len(y), count + len(y)
    return total / count


def train_classifier(model: nn.Module, train: Dataset, test: Dataset, epochs: int, batch_size: int = 256,
                     lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4, schedule: str = "step",
                     milestones: tuple[int, ...] | None = None, augmentation: bool = False, seed: int = 0,
                     checkpoint: str | Path | None = None, stop_after: int | None = None,
                     progress: bool = False, clip_norm: float | None = None) -> dict[str, list[float]]:
    """Cross-entropy SGD with momentum and weight decay; the learning rate follows ``schedule``, stepped per epoch:

    - ``"step"``: divided by 10 at each milestone epoch (by default 1/3 and 2/3 of the run, Sander et al.'s
      30 and 60 of 90);
    - ``"cosine"``: annealed by a cosine over ``epochs`` (Cont et al., App. A).

    ``augmentation`` adds random crops and flips; ``clip_norm`` clips each step's gradient norm (:func:`sgd_epoch`).
    Batches go to the model's device. Returns per-epoch training loss, test error (%) and seconds. With ``checkpoint``, model, optimiser, schedule and history are saved after
    every epoch and a run resumes from the file if it exists, so an interrupted run loses at most one epoch;
    ``stop_after`` ends this call after that many epochs in total (a time-sliced job resumes it later).
    """
    epochs = _checks.positive_int("epochs", epochs)
    if clip_norm is not None:
        clip_norm = _checks.positive_float("clip_norm", clip_norm)
    batch_size = _checks.positive_int("batch_size", batch_size)
    _checks.one_of("schedule", schedule, SCHEDULES)
    device = next(model.parameters()).device
    with torch.no_grad():
        model(train.inputs[:2].to(device))  # materialise a lazy head before the optimiser sees the parameters
    optimiser = torch.optim.SGD(model.parameters(), lr=_checks.positive_float("lr", lr), momentum=momentum,
                                weight_decay=_checks.nonnegative_float("weight_decay", weight_decay))
    if schedule == "step":
        milestones = milestones if milestones is not None else (math.ceil(epochs / 3), math.ceil(2 * epochs / 3))
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimiser, milestones=list(milestones), gamma=0.1)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=epochs)
    history: dict[str, list[float]] = {"loss": [], "test_error": [], "seconds": []}
    if checkpoint is not None and Path(checkpoint).exists():
        state = torch.load(checkpoint, weights_only=False)
        for part, obj in (("model", model), ("optimiser", optimiser), ("schedule", scheduler)):
            obj.load_state_dict(state[part])
        history = state["history"]
    test_set = Dataset(test.inputs.to(device), test.targets.to(device), test.name)
    generator = torch.Generator().manual_seed(seed)
    for epoch in tqdm(range(epochs), disable=not progress, desc="epochs", leave=False):
        order = torch.randperm(len(train), generator=generator)  # drawn every epoch, so a resumed run matches
        if epoch < len(history["loss"]):
            continue
        if stop_after is not None and epoch >= stop_after:
            break
        start = time.perf_counter()
        batches = ((train.inputs[i].to(device), train.targets[i].to(device)) for i in order.split(batch_size))
        if augmentation:
            crops = torch.Generator().manual_seed(seed + 1 + epoch)
            batches = ((crop_and_flip(x, crops), y) for x, y in batches)
        history["loss"].append(sgd_epoch(model, optimiser, batches, epoch, clip_norm))
        scheduler.step()
        history["seconds"].append(time.perf_counter() - start)
        history["test_error"].append(error_rate(model, test_set))
        if checkpoint is not None:
            torch.save({"model": model.state_dict(), "optimiser": optimiser.state_dict(),
                        "schedule": scheduler.state_dict(), "history": history}, checkpoint)
    return history


__all__ = ["ConvBlock", "TinyResNet", "SCHEDULES", "sgd_epoch", "error_rate", "train_classifier"]
