"""Convolutional ResNets of the papers' image experiments, their data pipeline and one training loop.

Models (every block type swappable: a builder takes a ``block`` factory):

- :func:`marion_resnet`: Marion et al. (2024) Section 5.2 and App. E: a 5x5 stride-3 stem to 16 channels with
  batch norm and ReLU, then ``L`` residual steps ``h + (1/L) bn2(conv2(sigma(bn1(conv1 h))))`` (:class:`ConvBNBlock`,
  the last batch norm at zero), 4x4 average pooling and a linear layer. ``init="tied"`` copies block 0's state into
  every block, as the authors' ``smooth_init``; ``"iid"`` keeps PyTorch's independent default initialisation.
- :func:`sander_resnet`: Sander et al. (2022) Section 5: ResNet-50/101-style stages, each one downsampling
  :class:`Bottleneck` then ``n - 1`` pre-activation bottlenecks (:class:`PreActBottleneck`) integrated with step
  ``1/(n-1)`` (``scaling=True``, their eq. (1)) or 1, tied (one block applied ``n - 1`` times) or untied, with
  exact backprop or the memory-free adjoint (``resnode.adjoint``) per stage; :func:`transfer` unties a tied network
  into a deeper one (their Table 2).

Training: :func:`fit`, cross-entropy SGD with momentum and weight decay, cosine / step / constant learning rate,
crops and flips, on ``device="auto"``, with channels_last (on by default: it speeds up these convolutions on CPUs
too), bf16 autocast and ``torch.compile`` (on for CUDA, off on the CPU by default) switchable, a DataLoader with
workers and pinned memory on a GPU,
a checkpoint every epoch (:mod:`resnode.checkpoints`, keyed by the run's configuration) and exact resume, and the
CUDA allocator's peak memory per epoch. Data: in-memory image tensors (:class:`resnode.data.Dataset`: CIFAR-10,
Fashion-MNIST, synthetic) or an ImageNet-style folder (:func:`resnode.data.image_folder`), with torchvision's
decoder where torchvision imports and plain torch transforms throughout.

Diagnostics: :func:`increments` and :func:`smoothness`, Marion et al.'s layer-averaged ``||conv_{k+1} - conv_k||_F``
(App. E); :func:`step_memory`, the memory one training step keeps.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from . import _checks, checkpoints, recorders
from .adjoint import BACKWARDS, METHODS, ResidualStack, gradient_errors, saved_tensor_bytes
from .data import Dataset, ImageFolder
from .train import check_divergence

__all__ = ["ACTIVATIONS", "INITS", "SCHEDULES", "NORMALISATION", "RESNET101", "MARION_TABLE1", "SANDER_TABLE1",
           "SANDER_TIED_IMAGENET", "SANDER_TABLE2", "resolve_device", "ConvBNBlock", "PreActBottleneck", "Bottleneck",
           "Stage", "ImageResNet", "marion_resnet", "sander_resnet", "tie", "transfer", "set_backward", "stage_gradient_error", "increments",
           "smoothness", "depth_statistics", "across_depth", "learning_rate", "residual_groups", "crop_and_flip", "random_resized_crop",
           "resize_center_crop", "TensorImages", "FolderImages", "batches", "evaluate", "fit", "step_memory"]

ACTIVATIONS = {"identity": nn.Identity, "gelu": nn.GELU, "relu": nn.ReLU}
INITS = ("tied", "iid")
SCHEDULES = ("cosine", "step", "constant")
RESNET101 = (3, 4, 23, 3)

# Per-channel means and standard deviations of the inputs (the authors' pipelines; Fashion-MNIST's own).
NORMALISATION = {
    "cifar-10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
}

# The papers' own numbers (accuracy, %). Marion et al. Table 1: CIFAR-10, L = 256, 180 epochs, median over 5 runs
# and interquartile range; ``smooth``: the paper's verdict on the trained weights (by inspection).
MARION_TABLE1 = {
    ("identity", "tied"): dict(train=56.5, train_iqr=0.1, test=59.8, test_iqr=0.7, smooth=True),
    ("identity", "iid"): dict(train=56.1, train_iqr=0.3, test=59.6, test_iqr=0.7, smooth=False),
    ("gelu", "tied"): dict(train=80.5, train_iqr=0.7, test=79.9, test_iqr=0.2, smooth=True),
    ("gelu", "iid"): dict(train=89.8, train_iqr=0.5, test=85.7, test_iqr=0.1, smooth=False),
    ("relu", "tied"): dict(train=97.4, train_iqr=0.6, test=88.1, test_iqr=0.1, smooth=False),
    ("relu", "iid"): dict(train=98.4, train_iqr=0.1, test=88.4, test_iqr=0.5, smooth=False),
}
# Sander et al. Table 1: ResNet-101 test accuracy without ("none") and with the 1/N step.
SANDER_TABLE1 = {"cifar-10": {"none": 95.5, "1/N": 95.5, "spread": 0.1}, "imagenet": {"none": 77.8, "1/N": 77.9}}
# Sander et al. Section 5.1: ImageNet, weight-tied within each stage, 1/N, blocks per stage -> accuracy (2 runs).
SANDER_TIED_IMAGENET = {4: 72.5, 8: 73.2, 16: 72.0}
# Sander et al. Table 2: tied pretraining, untied into a deeper network, fine-tuned with the adjoint.
SANDER_TABLE2 = {"cifar-10": {"before": 95.25, "before_spread": 0.2, "after": 95.65, "after_spread": 0.1},
                 "imagenet": {"before": 73.1, "after": 75.1}}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: the GPU when CUDA is available, else the CPU; otherwise ``torch.device(device)``."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _checks.one_of("device", str(device).split(":")[0], ("auto", "cpu", "cuda", "mps"))
    return torch.device(device)


# --- blocks -----------------------------------------------------------------------------------------------

class ConvBNBlock(nn.Module):
    """Marion et al.'s residual function ``bn2(conv2(sigma(bn1(conv1 h))))`` (App. E): 3x3 convolutions with bias,
    stride 1; with ``zero_init`` (the default) ``bn2`` starts at zero (weight and bias), so the block starts as 0 and
    the network as its stem."""

    def __init__(self, channels: int, activation: str = "gelu", zero_init: bool = True):
        super().__init__()
        channels = _checks.positive_int("channels", channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act = ACTIVATIONS[_checks.one_of("activation", activation, tuple(ACTIVATIONS))]()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)
        if zero_init:
            nn.init.zeros_(self.bn2.weight)
            nn.init.zeros_(self.bn2.bias)

    def forward(self, x: Tensor) -> Tensor:
        """The residual ``bn2(conv2(sigma(bn1(conv1 x))))`` (Marion et al. App. E), the shape of ``x``
        ``(batch, channels, H, W)``; the stack adds it, times the step, to ``x``."""
        return self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))


class PreActBottleneck(nn.Module):
    """Sander et al.'s residual function: ``ReLU - 1x1 - BN - ReLU - 3x3 - BN - ReLU - 1x1 - BN``, ``channels`` to
    ``channels`` through ``width`` (a quarter of ``channels`` in ResNet-101); convolutions without bias."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        channels, width = _checks.positive_int("channels", channels), _checks.positive_int("width", width)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(), nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(), nn.Conv2d(width, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        """The residual ``body(x)``, the shape of ``x`` ``(batch, channels, H, W)``; the stack adds it, times the
        step, to ``x``."""
        return self.body(x)


class Bottleneck(nn.Module):
    """The first block of a ResNet stage: ``ReLU(shortcut(x) + BN(1x1(ReLU(BN(3x3_stride(ReLU(BN(1x1 x))))))))`` with
    a 1x1 projection and batch norm as shortcut when the shape changes (He et al.'s bottleneck)."""

    def __init__(self, in_channels: int, width: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, out_channels, 1, bias=False),
                                  nn.BatchNorm2d(out_channels))
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        """The block's output ``ReLU(shortcut(x) + body(x))``: ``(batch, out_channels, H', W')``, ``H' = H`` and
        ``W' = W`` unless ``stride > 1``."""
        return torch.relu(self.shortcut(x) + self.body(x))


# --- networks ---------------------------------------------------------------------------------------------

class Stage(nn.Module):
    """``after(stack(transition(x)))``: an optional first block, a :class:`resnode.adjoint.ResidualStack` (Euler or
    Heun, backprop or adjoint, step ``step`` or ``1/N``), an optional map after it."""

    def __init__(self, blocks: Sequence[nn.Module], transition: nn.Module | None = None, step: float | None = None,
                 method: str = "euler", backward: str = "backprop", after: nn.Module | None = None):
        super().__init__()
        self.transition = transition if transition is not None else nn.Identity()
        self.stack = ResidualStack(blocks, method=method, backward=backward, step=step) if len(blocks) else None
        self.after = after if after is not None else nn.Identity()

    @property
    def tied(self) -> bool:
        """Whether every block of the stack is one module (weight tying)."""
        return self.stack is not None and len({id(b) for b in self.stack.blocks}) == 1 < len(self.stack.blocks)

    def forward(self, x: Tensor) -> Tensor:
        """``after(stack(transition(x)))`` (the stack skipped when it has no blocks)."""
        x = self.transition(x)
        if self.stack is not None:
            x = self.stack(x)
        return self.after(x)


class ImageResNet(nn.Module):
    """``head(stages(stem(x)))``; ``config`` describes the network (it keys the training checkpoints)."""

    def __init__(self, stem: nn.Module, stages: Sequence[Stage], head: nn.Module, config: Mapping | None = None):
        super().__init__()
        self.stem, self.stages, self.head = stem, nn.ModuleList(stages), head
        self.config = dict(config or {})

    def forward(self, x: Tensor) -> Tensor:
        """The class logits ``head(stages(stem(x)))`` of images ``x`` ``(batch, C, H, W)``."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)


def tie(blocks: Sequence[nn.Module]) -> None:
    """Weight-tied initialisation (Marion et al.'s ``smooth_init``): copy block 0's state (weights, biases, batch-norm
    statistics) into every block. The blocks stay separate parameters: training may untie them."""
    state = blocks[0].state_dict()
    for block in blocks[1:]:
        block.load_state_dict(state)


def marion_resnet(depth: int, activation: str = "gelu", init: str = "tied", channels: int = 16, in_channels: int = 3,
                  classes: int = 10, image_size: int = 32, method: str = "euler", backward: str = "backprop",
                  block: Callable[[int], nn.Module] | None = None, stem_bias: bool = False) -> ImageResNet:
    """Marion et al.'s CIFAR-10 network (App. E; the authors' code).

    A stem ``Conv5x5(stride 3, padding 1, no bias) - BN - ReLU`` to ``channels``, ``depth`` residual steps of :class:`ConvBNBlock` with step ``1/depth`` (Heun:
    ``depth + 1`` blocks), ``avg_pool(4)``, a linear layer. 32x32 inputs give a 10x10 map and 64 features.

    ``init``: ``"tied"`` (every block starts as block 0, :func:`tie`) or ``"iid"`` (PyTorch's default, independent).
    ``block(channels)`` replaces :class:`ConvBNBlock` (the activation is then the block's business). ``stem_bias``
    gives the stem convolution a bias (Marion et al.'s code has none).
    """
    depth = _checks.positive_int("depth", depth)
    _checks.one_of("init", init, INITS)
    make = block if block is not None else (lambda c: ConvBNBlock(c, activation))
    stem = nn.Sequential(nn.Conv2d(in_channels, channels, 5, stride=3, padding=1, bias=stem_bias),
                         nn.BatchNorm2d(channels), nn.ReLU())
    blocks = [make(channels) for _ in range(depth + (_checks.one_of("method", method, METHODS) == "heun"))]
    if init == "tied":
        tie(blocks)
    side = ((_checks.positive_int("image_size", image_size) - 3) // 3 + 1) // 4
    if side < 1:
        raise ValueError(f"image_size must be at least 12 (the stem and the 4x4 pooling); got {image_size}")
    head = nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(channels * side * side, classes))
    config = dict(kind="marion", depth=depth, activation=activation if block is None else getattr(block, "__name__", "custom"),
                  init=init, channels=channels, in_channels=in_channels, classes=classes, image_size=image_size,
                  method=method)
    return ImageResNet(stem, [Stage(blocks, method=method, backward=backward)], head, config)


def _kaiming(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def sander_resnet(blocks: Sequence[int] = RESNET101, widths: Sequence[int] = (64, 128, 256, 512), expansion: int = 4,
                  tied: bool = False, scaling: bool = True, adjoint_stages: Iterable[int] = (), stem: str = "cifar",
                  in_channels: int = 3, classes: int = 10, stem_stride: int = 1,
                  block: Callable[[int, int], nn.Module] | None = None) -> ImageResNet:
    """Sander et al.'s ResNets (Section 5, the authors' ``ResNetMemory101`` and ``IResNetAuto``).

    Stage ``s`` (numbered from 1, as the paper's "third layer") has ``blocks[s-1]`` blocks: a :class:`Bottleneck`
    from the previous stage's channels to ``expansion * widths[s-1]`` (stride 1 in stage 1, 2 after), then a
    residual stack of ``blocks[s-1] - 1`` :class:`PreActBottleneck` s ``x + step f_n(x)`` with ``step = 1/(blocks-1)``
    when ``scaling`` (eq. (1)), 1 otherwise (the usual ResNet), then ReLU. ``tied``: one block applied ``n - 1``
    times per stage. Stages in ``adjoint_stages`` train with the memory-free adjoint, the others with backprop.
    ``stem``: ``"cifar"`` (3x3 conv, stride ``stem_stride``, 1 in the paper) or ``"imagenet"`` (7x7 stride 2 and a
    3x3 stride-2 max pool).
    Convolutions start as torchvision's ResNets (Kaiming normal, fan out). ``block(channels, width)`` replaces the
    pre-activation bottleneck.
    """
    blocks = tuple(_checks.positive_int("blocks", b) for b in blocks)
    widths = tuple(_checks.positive_int("widths", w) for w in widths)
    if len(blocks) != len(widths):
        raise ValueError(f"blocks and widths need one entry per stage; got {len(blocks)} and {len(widths)}")
    adjoint_stages = sorted({int(s) for s in adjoint_stages})
    if any(not 1 <= s <= len(blocks) for s in adjoint_stages):
        raise ValueError(f"adjoint_stages are stage numbers 1..{len(blocks)}; got {adjoint_stages}")
    make = block if block is not None else PreActBottleneck
    first = widths[0]
    if _checks.one_of("stem", stem, ("cifar", "imagenet")) == "cifar":
        stem_net = nn.Sequential(nn.Conv2d(in_channels, first, 3, stride=_checks.positive_int("stem_stride", stem_stride),
                                           padding=1, bias=False), nn.BatchNorm2d(first), nn.ReLU())
    else:
        stem_net = nn.Sequential(nn.Conv2d(in_channels, first, 7, stride=2, padding=3, bias=False),
                                 nn.BatchNorm2d(first), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1))
    stages, channels = [], first
    for number, (count, width) in enumerate(zip(blocks, widths), start=1):
        out = expansion * width
        transition = Bottleneck(channels, width, out, stride=1 if number == 1 else 2)
        residual = [make(out, width)] * (count - 1) if tied else [make(out, width) for _ in range(count - 1)]
        step = None if scaling else 1.0
        stages.append(Stage(residual, transition, step=step, backward="adjoint" if number in adjoint_stages else "backprop",
                            after=nn.ReLU()))
        channels = out
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))
    model = ImageResNet(stem_net, stages, head, dict(kind="sander", blocks=list(blocks), widths=list(widths),
                                                     expansion=expansion, tied=tied, scaling=scaling, stem=stem, stem_stride=stem_stride,
                                                     in_channels=in_channels, classes=classes))
    _kaiming(model)
    return model


def transfer(source: ImageResNet, target: ImageResNet) -> ImageResNet:
    """Copy ``source`` into ``target`` (same stages and channels, any number of blocks): stem, each stage's first
    block and the head as they are, and target block ``j`` of a stack of ``M`` from source block
    ``floor(j N / M)`` of ``N``. From a tied network this is Sander et al.'s untying (Table 2): every block of the
    deeper, untied stack starts as the one tied block, and with step ``1/M`` the network integrates the same ODE
    with finer steps. Returns ``target``."""
    if len(source.stages) != len(target.stages):
        raise ValueError(f"source and target need the same number of stages; got {len(source.stages)} and {len(target.stages)}")
    target.stem.load_state_dict(source.stem.state_dict())
    target.head.load_state_dict(source.head.state_dict())
    for number, (a, b) in enumerate(zip(source.stages, target.stages), start=1):
        b.transition.load_state_dict(a.transition.state_dict())
        if (a.stack is None) != (b.stack is None):
            raise ValueError(f"stage {number}: one network has residual blocks there and the other none")
        if b.stack is not None:
            n, m = len(a.stack.blocks), len(b.stack.blocks)
            for j, block in enumerate(b.stack.blocks):
                block.load_state_dict(a.stack.blocks[j * n // m].state_dict())
    return target


def set_backward(model: ImageResNet, backward: str, stages: Iterable[int] | None = None) -> ImageResNet:
    """Switch the backward pass of the residual stacks of ``stages`` (numbered from 1; all when ``None``) to
    ``backward`` (``"backprop"``, ``"adjoint"`` or ``"checkpoint"``)."""
    _checks.one_of("backward", backward, BACKWARDS)
    chosen = range(1, len(model.stages) + 1) if stages is None else stages
    for number in chosen:
        stack = model.stages[number - 1].stack
        if stack is not None:
            stack.backward = backward
    return model


def stage_gradient_error(model: ImageResNet, stage: int, x: Tensor, y: Tensor, dtype: torch.dtype = torch.float64) -> float:
    """Relative error ``||g_adjoint - g_backprop|| / ||g_backprop||`` of the gradient of stage ``stage``'s residual
    stack (numbered from 1), all its parameters together, for the cross-entropy of ``model`` on one batch: eq. (7) at
    the activations rebuilt by reverse Euler (eq. (6)) against exact backprop (:func:`resnode.adjoint.gradient_errors`),
    batch norm in training mode, on a ``dtype`` copy of the network (the network itself is left as it is)."""
    net = copy.deepcopy(model).to(dtype=dtype, memory_format=torch.contiguous_format).train()
    chosen = net.stages[stage - 1]
    if chosen.stack is None:
        raise ValueError(f"stage {stage} has no residual stack")
    x = x.to(next(net.parameters()).device, dtype)
    with torch.no_grad():
        h = net.stem(x)
        for before in net.stages[:stage - 1]:
            h = before(h)
        h = chosen.transition(h)

    def loss(stack):
        z = chosen.after(stack(h))
        for after in net.stages[stage:]:
            z = after(z)
        return nn.functional.cross_entropy(net.head(z), y.to(z.device))

    return gradient_errors(loss, chosen.stack)["(all)"]


# --- smoothness across depth ------------------------------------------------------------------------------

def across_depth(stack: ResidualStack, name: str) -> Tensor:
    """The weights of the submodule ``name`` (e.g. ``"conv1"``) of every block, stacked: ``(L, *shape)``."""
    return torch.stack([block.get_submodule(name).weight.detach() for block in stack.blocks])


def increments(stack: ResidualStack, name: str) -> Tensor:
    """``||conv_{k+1} - conv_k||_F`` for ``k`` from 0 to ``L - 2``, of the submodule ``name`` across the blocks
    (float64)."""
    weights = across_depth(stack, name).double()
    if len(weights) < 2:
        raise ValueError("increments need at least two blocks")
    return recorders.increments(weights, 0)


def smoothness(stack: ResidualStack, names: Sequence[str] = ("conv1", "conv2")) -> dict[str, float]:
    """Marion et al.'s smoothness (App. E): the layer average of ``||conv_{i,k+1} - conv_{i,k}||_F`` for each conv
    ``i`` in ``names``."""
    return {name: float(increments(stack, name).mean()) for name in names}


def depth_statistics(stack: ResidualStack, initial: Mapping[str, Tensor] | None = None,
                     names: Sequence[str] = ("conv1", "conv2")) -> dict[str, dict]:
    """For each conv in ``names``: ``increments`` (``||W_{k+1} - W_k||_F``, k = 0..L-2), ``smoothness`` (their mean,
    :func:`smoothness`) and ``norm`` (the layer average of ``||W_k||_F``). With ``initial`` (``{name:
    across_depth(...)}`` taken at initialisation), also what training changed, ``U_k = W_k - W_k(0)``: ``update``
    (the layer average of ``||U_k||_F``) and ``update_increments`` (that of ``||U_{k+1} - U_k||_F``): an update
    smooth across depth has ``update_increments`` much smaller than ``update``; independent per-layer updates
    have it about ``sqrt(2)`` times larger."""
    out = {}
    for name in names:
        weights = across_depth(stack, name).double()
        steps = recorders.increments(weights, 0)
        entry = {"increments": steps.tolist(), "smoothness": float(steps.mean()),
                 "norm": float(weights.flatten(1).norm(dim=1).mean())}
        if initial is not None:
            update = weights - initial[name].double().to(weights.device)
            entry["update"] = float(update.flatten(1).norm(dim=1).mean())
            entry["update_increments"] = float(recorders.increments(update, 0).mean())
        out[name] = entry
    return out


# --- data pipeline ----------------------------------------------------------------------------------------

def _normalise(x: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> Tensor:
    if mean is None:
        return x
    shape = (1, -1, 1, 1)
    return (x - torch.tensor(mean, dtype=x.dtype).view(shape)) / torch.tensor(std, dtype=x.dtype).view(shape)


def crop_and_flip(x: Tensor, generator: torch.Generator, padding: int = 4, flip: bool = True) -> Tensor:
    """Random ``HxW`` crop of each image zero-padded by ``padding`` on every side, and a horizontal flip with
    probability 1/2 (torchvision's ``RandomCrop(size, padding)`` and ``RandomHorizontalFlip``, batched)."""
    b, c, h, w = x.shape
    device = x.device  # the draws come from a CPU generator, the indexing runs where x is
    if padding:
        x = nn.functional.pad(x, (padding,) * 4)
        dy, dx = torch.randint(0, 2 * padding + 1, (2, b), generator=generator).to(device)
        rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=device))[:, None, None, :]
        x = x[torch.arange(b, device=device)[:, None, None, None], torch.arange(c, device=device)[None, :, None, None],
              rows, cols]
    if flip:
        flips = (torch.rand(b, generator=generator) < 0.5).to(device)
        x = torch.where(flips[:, None, None, None], x.flip(-1), x)
    return x


def random_resized_crop(image: Tensor, size: int, generator: torch.Generator, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> Tensor:
    """torchvision's ``RandomResizedCrop``: an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``
    (ten tries, then the central crop of the nearest allowed ratio), resized to ``size x size`` (bilinear, antialiased).
    ``image``: ``(C, H, W)`` float."""
    _, height, width = image.shape
    area = height * width
    for _ in range(10):
        u = torch.rand(2, generator=generator, dtype=torch.float64)
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0].item())
        aspect = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1].item())
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            break
    else:
        aspect = width / height
        w, h = (width, round(width / ratio[0])) if aspect < ratio[0] else (
            (round(height * ratio[1]), height) if aspect > ratio[1] else (width, height))
        w, h = min(w, width), min(h, height)
        top, left = (height - h) // 2, (width - w) // 2
    crop = image[:, top:top + h, left:left + w]
    return nn.functional.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True,
                                     align_corners=False)[0]


def resize_center_crop(image: Tensor, size: int, resize: int | None = None) -> Tensor:
    """torchvision's ``Resize(resize)`` (shorter side, bilinear, antialiased; ``size * 256 / 224`` by default) then
    ``CenterCrop(size)``: the ImageNet evaluation transform. ``image``: ``(C, H, W)`` float."""
    resize = resize if resize is not None else round(size * 256 / 224)
    _, height, width = image.shape
    scale = resize / min(height, width)
    new = (max(size, round(height * scale)), max(size, round(width * scale)))
    image = nn.functional.interpolate(image[None], size=new, mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    return image[:, top:top + size, left:left + size]


class TensorImages:
    """Images held in memory (:class:`resnode.data.Dataset`, values in [0, 1]): training batches are cropped after
    ``padding`` and flipped (``augmentation``), every batch normalised by ``mean`` and ``std`` per channel."""

    def __init__(self, dataset: Dataset, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 augmentation: bool = False, padding: int = 4):
        self.dataset, self.mean, self.std = dataset, mean, std
        self.augmentation, self.padding = augmentation, padding
        self.name, self.targets = dataset.name, dataset.targets

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, index: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """The items ``index``: normalised images ``(batch, C, H, W)`` and their targets; the images are cropped and
        flipped first when ``augmentation`` is on and a ``generator`` is given (training batches)."""
        x = self.dataset.inputs[index]
        if generator is not None and self.augmentation:
            x = crop_and_flip(x, generator, self.padding)
        return _normalise(x, self.mean, self.std), self.dataset.targets[index]


class FolderImages:
    """Images decoded from an ImageNet-style folder (:class:`resnode.data.ImageFolder`): training images take a
    random resized crop of ``crop`` pixels and a flip (``augmentation``), evaluation images a resize and a centre
    crop; then ``mean`` / ``std`` normalisation (ImageNet's by default)."""

    def __init__(self, folder: ImageFolder, crop: int = 224, mean: Sequence[float] | None = NORMALISATION["imagenet"][0],
                 std: Sequence[float] | None = NORMALISATION["imagenet"][1], augmentation: bool = True):
        self.folder, self.crop, self.mean, self.std = folder, _checks.positive_int("crop", crop), mean, std
        self.augmentation = augmentation
        self.name, self.targets = folder.name, folder.targets

    def __len__(self) -> int:
        return len(self.folder)

    def batch(self, index: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Images ``(batch, C, crop, crop)`` of the items ``index``, decoded and normalised, and their targets: random
        resized crops and flips drawn from ``generator`` if ``augmentation``, else (or without one) centre crops."""
        images = []
        for i in index.tolist():
            image = self.folder.load(i).float() / 255
            if generator is not None and self.augmentation:
                image = random_resized_crop(image, self.crop, generator)
                if torch.rand(1, generator=generator).item() < 0.5:
                    image = image.flip(-1)
            else:
                image = resize_center_crop(image, self.crop)
            images.append(image)
        return _normalise(torch.stack(images), self.mean, self.std), self.folder.targets[index]


def _seed(*parts: int) -> int:
    """A 63-bit seed mixing ``parts`` (the run's seed, the epoch, the batch): streams that do not overlap."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class _Batches(torch.utils.data.Dataset):
    """One epoch's batches as the items of a map-style dataset: item ``i`` is batch ``i``, drawn with its own
    generator, so that any number of DataLoader workers gives the same batches."""

    def __init__(self, source, order: Tensor, batch_size: int, seed: int | None):
        self.source, self.parts, self.seed = source, order.split(batch_size), seed

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, i: int):
        generator = None if self.seed is None else torch.Generator().manual_seed(_seed(self.seed, i))
        return self.source.batch(self.parts[i], generator)


def batches(source, batch_size: int, seed: int | None = None, epoch: int = 0, workers: int = 0,
            pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over ``source`` (:class:`TensorImages` or :class:`FolderImages`) yielding ``(x, y)`` batches.

    With ``seed``, a training epoch: the order is a permutation drawn from ``(seed, epoch)`` and each batch's
    augmentation from ``(seed, epoch, batch)``; an epoch is the same whatever ran before it (a resumed run sees the
    batches an uninterrupted one would). Without, the examples in order, unaugmented (evaluation)."""
    n = len(source)
    if seed is None:
        order, stream = torch.arange(n), None
    else:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(seed, epoch, 0)))
        stream = _seed(seed, epoch, 1)
    dataset = _Batches(source, order, _checks.positive_int("batch_size", batch_size), stream)
    return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                                       pin_memory=pin_memory, persistent_workers=False)


# --- training ---------------------------------------------------------------------------------------------

def learning_rate(epoch: float, epochs: int, lr: float, schedule: str, milestones: Sequence[int] | None = None) -> float:
    """The learning rate at epoch ``epoch`` (from 0; fractional within an epoch): ``"cosine"``
    ``lr (1 + cos(pi epoch / epochs)) / 2`` (PyTorch's ``CosineAnnealingLR``), ``"step"`` ``lr / 10`` per milestone
    passed (by default at 1/3 and 2/3 of the run), ``"constant"`` ``lr``."""
    _checks.one_of("schedule", schedule, SCHEDULES)
    if schedule == "cosine":
        return lr * (1 + math.cos(math.pi * epoch / epochs)) / 2
    if schedule == "step":
        milestones = milestones if milestones is not None else (math.ceil(epochs / 3), math.ceil(2 * epochs / 3))
        return lr * 0.1 ** sum(epoch >= m for m in milestones)
    return lr


def _check_classification(data: Dataset) -> None:
    """Refuse what cross-entropy would take silently or fail on obscurely: no examples, targets that are not one class
    index per image."""
    if len(data) == 0:
        raise ValueError(f"the dataset {data.name!r} holds no examples")
    targets = data.targets
    if targets.dim() != 1 or len(targets) != len(data.inputs) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"the dataset {data.name!r} needs one integer class index per image: targets of shape "
                         f"({len(data.inputs)},); got {targets.dtype} of shape {tuple(targets.shape)}")
    if data.inputs.dim() != 4:
        raise ValueError(f"the dataset {data.name!r} needs images (n, channels, height, width); got shape "
                         f"{tuple(data.inputs.shape)}")


def _as_source(data, augmentation: bool):
    if isinstance(data, (TensorImages, FolderImages)):
        return data
    if isinstance(data, Dataset):
        _check_classification(data)
        return TensorImages(data, augmentation=augmentation)
    if isinstance(data, ImageFolder):
        return FolderImages(data, augmentation=augmentation)
    raise TypeError(f"training data must be a Dataset, an ImageFolder, TensorImages or FolderImages; got {type(data).__name__}")


def _groups(model: nn.Module, parameters) -> list[dict]:
    """Optimiser groups: every parameter of ``model``, or the given parameters, or the given groups
    (``{"params": [...], "lr_factor": f}``, the learning rate multiplied by ``f``); each parameter once."""
    if parameters is None:
        parameters = model.parameters()
    parameters = list(parameters)
    if not parameters or not isinstance(parameters[0], dict):
        parameters = [{"params": parameters}]
    groups, seen = [], set()
    for group in parameters:
        params = [p for p in group["params"] if id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            groups.append({"params": params, "lr_factor": _checks.positive_float("lr_factor", group.get("lr_factor", 1.0))})
    if not groups:
        raise ValueError("no parameters to train")
    return groups


def residual_groups(model: ImageResNet, factor: float) -> list[dict]:
    """Two optimiser groups for :func:`fit`: the parameters of the residual stacks, their learning rate multiplied
    by ``factor``, and all others. With ``factor = L`` this is the depth factor of Marion et al.'s gradient flow
    (eq. (4): ``dZ_k/dt = -L dl/dZ_k``), which makes the stack train at a rate independent of its depth."""
    residual = [p for stage in model.stages if stage.stack is not None for p in stage.stack.parameters()]
    ids = {id(p) for p in residual}
    return [{"params": residual, "lr_factor": factor}, {"params": [p for p in model.parameters() if id(p) not in ids]}]


def _fast_path(device: torch.device, value: bool | None) -> bool:
    return device.type == "cuda" if value is None else bool(value)


def _compile(model: nn.Module) -> None:
    """``torch.compile`` the network in place, part by part: the stem, each stage's first block and the head; a
    residual stack trained by backprop as one graph; one trained by the adjoint block by block (the reconstruction's
    ``autograd.Function`` stays eager). Another network is compiled whole."""
    if not isinstance(model, ImageResNet):
        model.compile()
        return
    model.stem.compile()
    model.head.compile()
    for stage in model.stages:
        stage.transition.compile()
        if stage.stack is not None and stage.stack.backward == "adjoint":
            for block in {id(b): b for b in stage.stack.blocks}.values():
                block.compile()
        elif stage.stack is not None:
            stage.stack.compile()


def evaluate(model: nn.Module, data, batch_size: int = 1000, device: str | torch.device = "auto",
             channels_last: bool | None = None, bf16: bool | None = None, workers: int | None = None) -> dict[str, float]:
    """``{"error": % misclassified, "loss": mean cross-entropy}`` of ``model`` (moved to ``device``; eval mode,
    restored) on ``data`` (unaugmented; ImageFolder images resized and centre-cropped)."""
    device = resolve_device(device)
    source = _as_source(data, augmentation=False)
    was_training = model.training
    workers = (min(8, os.cpu_count() or 1) if device.type == "cuda" else 0) if workers is None else workers
    memory = torch.contiguous_format if channels_last is False else torch.channels_last
    model.to(device=device, memory_format=memory)
    model.eval()
    wrong, total, count = 0, 0.0, 0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=_fast_path(device, bf16)):
        for x, y in batches(source, batch_size, workers=workers, pin_memory=device.type == "cuda"):
            x = x.to(device, non_blocking=True, memory_format=memory)
            y = y.to(device, non_blocking=True)
            out = model(x).float()
            wrong += (out.argmax(1) != y).sum().item()
            total += nn.functional.cross_entropy(out, y, reduction="sum").item()
            count += len(y)
    model.train(was_training)
    return {"error": 100.0 * wrong / count, "loss": total / count}


def fit(model: nn.Module, train, test, epochs: int, *, batch_size: int = 128, lr: float = 0.1, momentum: float = 0.9,
        weight_decay: float = 5e-4, schedule: str = "cosine", milestones: Sequence[int] | None = None,
        augmentation: bool = False, clip_norm: float | None = None, seed: int = 0, per_batch: bool = False,
        parameters: Iterable[nn.Parameter] | None = None, device: str | torch.device = "auto",
        channels_last: bool | None = None, bf16: bool | None = None, compile: bool | None = None,
        workers: int | None = None, cache_dir: str | Path | None = None, name: str = "run",
        key: Mapping | None = None, stop_after: int | None = None, progress: bool = False,
        test_batch_size: int = 1000) -> dict[str, list]:
    """Train ``model`` by cross-entropy SGD (momentum, weight decay on every parameter) for ``epochs`` epochs.

    - ``train``/``test``: :class:`resnode.data.Dataset` (in memory), :class:`resnode.data.ImageFolder`, or a
      :class:`TensorImages` / :class:`FolderImages` that says how to normalise and augment them; ``augmentation``
      applies to the first two (crops after 4-pixel padding and flips; random resized crops and flips).
    - ``schedule``: the learning rate of each epoch (:func:`learning_rate`: cosine, step with ``milestones``,
      constant), or of each batch with ``per_batch`` (the cosine then reaches 0 at the end of a short run, where
      PyTorch's epoch-wise ``CosineAnnealingLR``, as in the papers' code, still trains its last epoch at
      ``lr (1 + cos(pi (E-1)/E)) / 2``). ``parameters``: the parameters to train (all by default; Sander et al. fine-tune one stage), or
      optimiser groups ``{"params": [...], "lr_factor": f}`` (:func:`residual_groups`).
      ``clip_norm`` scales each step's gradient down to that norm when larger. A loss that is not finite or grows
      beyond :data:`resnode.train.DIVERGENCE_FACTOR` times the first batch's raises
      :class:`resnode.train.DivergenceError` naming the batch and the epoch.
    - ``device``: ``"auto"`` (a GPU when there is one), ``"cpu"``, ``"cuda"``. ``channels_last`` (``None``: on),
      ``bf16`` (autocast) and ``compile`` (:func:`torch.compile`, part by part; ``None``: on for CUDA, off on the CPU,
      where bf16 is slow without AMX and compiling takes minutes).
      ``workers``: DataLoader processes (``None``: 8 on CUDA, with pinned memory; 0 on the CPU).
    - ``cache_dir``: a checkpoint (:mod:`resnode.checkpoints`) after every epoch, named ``name`` plus a hash of the
      configuration (the training settings, ``seed``, ``model.config``, a digest of the starting weights, the
      data's names and ``key``); a run finds
      its own checkpoint and resumes, with the same batches and augmentations as an uninterrupted run (the data
      order of each epoch depends only on ``seed`` and the epoch). ``stop_after`` ends this call after that many
      epochs in total (a time-sliced job resumes later).

    Returns the history, one entry per epoch: ``loss`` and ``train_error`` (running, on the training batches, as
    the authors' trainers report them), ``test_error`` (%), ``test_loss``, ``lr``, ``seconds`` (training only),
    ``images_per_second``, and ``peak_memory`` (bytes, the CUDA allocator's peak during the epoch; ``None`` on
    the CPU). The model is left on ``device``.
    """
    epochs = _checks.positive_int("epochs", epochs)
    batch_size = _checks.positive_int("batch_size", batch_size)
    lr = _checks.positive_float("lr", lr)
    weight_decay = _checks.nonnegative_float("weight_decay", weight_decay)
    _checks.one_of("schedule", schedule, SCHEDULES)
    if clip_norm is not None:
        clip_norm = _checks.positive_float("clip_norm", clip_norm)
    device = resolve_device(device)
    cuda = device.type == "cuda"
    memory = torch.contiguous_format if channels_last is False else torch.channels_last
    use_bf16 = _fast_path(device, bf16)
    workers = (min(8, os.cpu_count() or 1) if cuda else 0) if workers is None else workers
    train_source, test_source = _as_source(train, augmentation), _as_source(test, False)

    model.to(device=device)
    if any(isinstance(m, nn.modules.lazy.LazyModuleMixin) for m in model.modules()):
        with torch.no_grad():  # give lazy layers their shapes before the optimiser sees them
            model.eval()(train_source.batch(torch.arange(min(2, len(train_source))), None)[0].to(device))
    model.to(memory_format=memory)
    groups = _groups(model, parameters)
    trained = [p for g in groups for p in g["params"]]
    optimiser = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    settings = dict(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
                    schedule=schedule, milestones=None if milestones is None else list(milestones),
                    augmentation=augmentation, clip_norm=clip_norm, seed=seed, per_batch=per_batch, trained=len(trained),
                    lr_factors=[g["lr_factor"] for g in groups])
    full_key = dict(training=settings, model=getattr(model, "config", type(model).__name__), start=checkpoints.digest(model.state_dict()),
                    train=train_source.name, test=test_source.name, **dict(key or {}))
    target = checkpoints.path(cache_dir, name, full_key) if cache_dir else None
    history: dict[str, list] = {k: [] for k in ("loss", "train_error", "test_error", "test_loss", "lr", "seconds",
                                                "images_per_second", "peak_memory")}
    state = checkpoints.load(target, full_key) if target is not None else None
    first = None  # the first batch's loss: the scale against which divergence is judged
    if state is not None:
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        history, first = state["history"], state.get("first")
    if _fast_path(device, compile):
        _compile(model)
    # parameters left out of the optimiser need no gradient: the backward stops where they start
    ids = {id(p) for p in trained}
    frozen = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        done = len(history["loss"])
        for epoch in tqdm(range(done, epochs), disable=not progress, desc="epochs", leave=False, initial=done, total=epochs):
            if stop_after is not None and epoch >= stop_after:
                break
            rate = learning_rate(epoch, epochs, lr, schedule, milestones)
            for group in optimiser.param_groups:
                group["lr"] = rate * group["lr_factor"]
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            model.train()
            start = time.perf_counter()
            total, wrong, count = 0.0, 0, 0
            loader = batches(train_source, batch_size, seed, epoch, workers, pin_memory=cuda)
            for b, (x, y) in enumerate(loader):
                if per_batch:
                    for group in optimiser.param_groups:
                        group["lr"] = learning_rate(epoch + b / len(loader), epochs, lr, schedule, milestones) * group["lr_factor"]
                x = x.to(device, non_blocking=True, memory_format=memory)
                y = y.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    out = model(x)
                    loss = nn.functional.cross_entropy(out.float(), y)
                value = loss.item()
                first = value if first is None else first
                check_divergence(value, first, f"{b + 1} of epoch {epoch + 1}", "the learning rate lr")
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                if clip_norm is not None:
                    nn.utils.clip_grad_norm_(trained, clip_norm)
                optimiser.step()
                total += value * len(y)
                wrong += (out.argmax(1) != y).sum().item()
                count += len(y)
            if cuda:
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            result = evaluate(model, test_source, test_batch_size, device, channels_last, bf16, workers)
            for k, v in (("loss", total / count), ("train_error", 100.0 * wrong / count), ("test_error", result["error"]),
                         ("test_loss", result["loss"]), ("lr", rate), ("seconds", seconds),
                         ("images_per_second", count / seconds),
                         ("peak_memory", torch.cuda.max_memory_allocated(device) if cuda else None)):
                history[k].append(v)
            if target is not None:
                checkpoints.save(target, {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                                          "optimiser": optimiser.state_dict(), "history": history, "first": first}, full_key)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return history


def step_memory(model: nn.Module, x: Tensor, y: Tensor) -> dict:
    """The memory one training step of ``model`` on ``(x, y)`` needs beyond the model, where ``x`` lives:

    - on CUDA, ``{"bytes": peak allocated during forward + backward - allocated before, "measure": "cuda"}``
      (``torch.cuda.reset_peak_memory_stats``, ``max_memory_allocated``);
    - on the CPU, ``{"bytes": the tensors autograd keeps for the backward, "measure": "saved tensors"}``
      (:func:`resnode.adjoint.saved_tensor_bytes`; the forward of an adjoint stack keeps its output only).
    """
    loss = lambda: nn.functional.cross_entropy(model(x), y)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        model.zero_grad(set_to_none=True)
        before = torch.cuda.memory_allocated(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        loss().backward()
        torch.cuda.synchronize(x.device)
        peak = torch.cuda.max_memory_allocated(x.device) - before
        model.zero_grad(set_to_none=True)
        return {"bytes": int(peak), "measure": "cuda"}
    return {"bytes": int(saved_tensor_bytes(loss)), "measure": "saved tensors"}
