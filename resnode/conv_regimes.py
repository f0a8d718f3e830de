"""Scaling regimes of convolutional ResNets (Cont, Rossier & Xu, Section 3.3, Figs 11-12, Table 3.3).

The authors' CIFAR-10 network has no batch norm: a stem convolution and ReLU, then stages of blocks

    h_{k+1} = ReLU(S_k h_k + delta_k * ReLU(A_k * h_k))                                   (3.2)

(``*`` a convolution, ``S_k`` the identity or a 1x1 convolution where the shape changes), average
pooling and a linear head. Depth ``L`` is the number of blocks, i.e. of kernels ``A_k``. The weights
are measured by the spectral norms of the convolution operators, computed as in Sedghi, Gupta & Long
(2019): the circular convolution of a ``c_in x n x n`` image by a kernel is block-diagonalised by the
2-D DFT, so its singular values are those of the ``n^2`` matrices ``K_hat(u, v)`` (``c_out x c_in``),
the DFT of the kernel zero-padded to ``n x n``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import _checks, data
from .data import Dataset
from .images import fit

PAPER_BLOCKS = {8: (2, 2, 2, 2), 11: (2, 3, 4, 2), 12: (2, 3, 5, 2), 14: (3, 3, 5, 3), 16: (3, 4, 6, 3),
                18: (3, 4, 8, 3), 20: (3, 4, 10, 3), 24: (3, 4, 14, 3), 28: (3, 4, 18, 3), 33: (3, 4, 23, 3),
                42: (3, 8, 28, 3), 50: (3, 8, 36, 3), 65: (3, 8, 51, 3), 80: (4, 12, 60, 4), 100: (4, 18, 74, 4),
                121: (4, 31, 82, 4)}
"""Blocks per stage of the authors' CIFAR-10 runs (``cifar_run.py``), keyed by depth ``L``."""

PAPER_TEST_ERROR = {8: 6.64, 11: 6.37, 12: 6.32, 14: 5.98, 16: 6.25, 20: 5.98, 24: 6.24, 28: 7.03, 33: 6.13,
                    42: 6.21, 50: 6.32, 65: 6.19, 80: 6.30, 100: 6.20, 121: 6.37}
"""Table 3.3: CIFAR-10 test error (%) of the authors' networks (200 epochs, RTX 2080); depth 18 is not reported."""

PAPER_EXPONENTS = {"A": 0.0, "delta": 0.1}
"""Fig. 11: fitted exponents of the maximum norm, ``max_k ||A_k|| ~ L^-beta`` and ``max_k ||delta_k|| ~ L^-alpha``."""


def _check_kernel(kernel: Tensor, n: int) -> tuple[Tensor, int]:
    if not isinstance(kernel, Tensor) or kernel.ndim != 4:
        raise ValueError(f"kernel must be a tensor (c_out, c_in, k, k); got {getattr(kernel, 'shape', type(kernel))}")
    return kernel, _checks.positive_int("n", n)


def fold_kernel(kernel: Tensor, n: int) -> Tensor:
    """The ``(c_out, c_in, n, n)`` kernel of the same circular convolution on ``n x n`` images.

    A kernel smaller than the image is zero-padded; a larger one wraps around (taps ``p`` and ``p + n``
    hit the same pixel of a periodic image), so its taps are summed modulo ``n``.
    """
    kernel, n = _check_kernel(kernel, n)
    c_out, c_in, kh, kw = kernel.shape
    mh, mw = math.ceil(kh / n), math.ceil(kw / n)
    padded = F.pad(kernel, (0, mw * n - kw, 0, mh * n - kh))
    return padded.reshape(c_out, c_in, mh, n, mw, n).sum(dim=(2, 4))


def conv_singular_values(kernel: Tensor, n: int) -> Tensor:
    """All singular values (descending, float64) of the circular convolution of ``c_in x n x n`` images.

    Sedghi, Gupta & Long (2019), Thm 6: they are the singular values of the ``n^2`` matrices
    ``FFT2(kernel)[:, :, u, v]``. The paper (Section 3.3) keeps the largest.
    """
    symbol = torch.fft.fft2(fold_kernel(kernel.detach().double().cpu(), n))  # (c_out, c_in, n, n)
    values = torch.linalg.svdvals(symbol.permute(2, 3, 0, 1))  # (n, n, min(c_out, c_in))
    return values.flatten().sort(descending=True).values


def conv_spectral_norm(kernel: Tensor, n: int) -> float:
    """Operator norm (top singular value) of the circular convolution by ``kernel`` on ``n x n`` images."""
    return float(conv_singular_values(kernel, n)[0])


def _circular_conv(kernel: Tensor, x: Tensor) -> Tensor:
    kh, kw = kernel.shape[-2:]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"kernel must have odd spatial sizes for a centred circular convolution; got {kh}x{kw}")
    if kh // 2 > x.shape[-2] or kw // 2 > x.shape[-1]:
        raise ValueError(f"n must be at least half the kernel size; got n={x.shape[-1]} for a {kh}x{kw} kernel")
    return F.conv2d(F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2), mode="circular"), kernel)


def circular_conv_matrix(kernel: Tensor, n: int) -> Tensor:
    """The explicit ``(c_out n^2, c_in n^2)`` matrix of the circular convolution (``conv2d`` with circular padding).

    Column ``j`` is the image of the ``j``-th basis image; for checks on small sizes.
    """
    kernel, n = _check_kernel(kernel, n)
    c_in = kernel.shape[1]
    basis = torch.eye(c_in * n * n, dtype=kernel.dtype).reshape(-1, c_in, n, n)
    return _circular_conv(kernel.detach().cpu(), basis).reshape(c_in * n * n, -1).T


def power_iteration_norm(kernel: Tensor, n: int, iterations: int = 20000, seed: int = 0, tol: float = 1e-14) -> float:
    """Operator norm of the circular convolution by power iteration on ``T^T T`` (the adjoint by autograd), until the
    estimate changes by less than ``tol`` (relative) in one iteration, or after ``iterations``.

    The error after ``k`` iterations falls like ``(s_2 / s_1)^{2k}``: slowly when the two largest singular values are
    close (a trained kernel of chapter 10 needed about 400 iterations for ``1e-6``), hence the stopping rule rather
    than a fixed count."""
    kernel, n = _check_kernel(kernel, n)
    tol = _checks.positive_float("tol", tol)
    kernel = kernel.detach().double().cpu()
    x = torch.randn(1, kernel.shape[1], n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    norm = 0.0
    for _ in range(_checks.positive_int("iterations", iterations)):
        x = (x / x.norm()).requires_grad_(True)
        y = _circular_conv(kernel, x)
        (x,) = torch.autograd.grad(y, x, grad_outputs=y)  # T^T T x
        previous, norm = norm, float(x.norm().sqrt())
        if abs(norm - previous) <= tol * norm:
            break
    return norm


def layer_norms(kernels: Sequence[Tensor], sizes: Sequence[int]) -> np.ndarray:
    """``s_max(K_k)`` for each kernel, each at its input size ``sizes[k]`` (the per-layer profile)."""
    if len(kernels) != len(sizes) or len(kernels) == 0:
        raise ValueError(f"kernels and sizes need the same non-zero length; got {len(kernels)} and {len(sizes)}")
    return np.array([conv_spectral_norm(k, n) for k, n in zip(kernels, sizes)])


def increment_norms(kernels: Sequence[Tensor], sizes: Sequence[int]) -> np.ndarray:
    """``s_max(K_{k+1} - K_k)`` for ``k = 0..L-2``, at the common input size; ``nan`` where two consecutive kernels
    differ in shape or input size (a stage transition), so that they are never compared."""
    if len(kernels) != len(sizes):
        raise ValueError(f"kernels and sizes need the same length; got {len(kernels)} and {len(sizes)}")
    return np.array([conv_spectral_norm(b - a, n) if a.shape == b.shape and n == m else float("nan")
                     for a, b, n, m in zip(kernels, kernels[1:], sizes, sizes[1:])])


def scaling_statistics(kernels: Sequence[Tensor], sizes: Sequence[int], beta: float = 0.0) -> dict[str, float]:
    """The paper's norms (Table 2.2, spectral version of Section 3.3) of one network's kernels ``K_0..K_{L-1}``:

    ``maximum = max_k s_max(K_k)``, ``root_ssq = (sum_k s_max(K_k)^2)^{1/2}`` and
    ``increment = L^beta max_k s_max(K_{k+1} - K_k)`` over consecutive kernels of the same shape and size.
    """
    norms = layer_norms(kernels, sizes)
    increments = increment_norms(kernels, sizes)
    return subset_statistics(norms, increments, range(len(norms)), beta=beta, depth=len(norms))


def stage_starts(blocks: Sequence[int]) -> list[int]:
    """Index of the first block of each stage, for ``blocks`` per stage: block 0 (it follows the stem) and each
    block that changes the resolution and the channels. Their number does not grow with depth: they are the
    architecture's own blocks, the others the repeated blocks that depth adds."""
    blocks = tuple(_checks.positive_int("blocks", b) for b in blocks)
    return [int(s) for s in np.cumsum((0,) + blocks[:-1])]


def subset_statistics(norms: Sequence[float], increments: Sequence[float], keep, beta: float = 0.0,
                      depth: int | None = None) -> dict[str, float]:
    """The statistics of :func:`scaling_statistics` restricted to the blocks ``keep`` (indices into ``norms``).

    ``norms``: the per-layer norms ``s_max(K_k)``; ``increments``: :func:`increment_norms` (length ``len(norms) - 1``);
    an increment ``k -> k + 1`` counts only when both blocks are kept. Returns ``maximum``, ``median``, ``root_ssq``,
    ``increment`` (``depth^beta`` times the largest counted increment, ``depth`` defaulting to ``len(norms)``; ``nan``
    when none counts) and ``count`` (the number of kept blocks).
    """
    norms, increments = np.asarray(norms, dtype=float), np.asarray(increments, dtype=float)
    if len(increments) != max(len(norms) - 1, 0):
        raise ValueError(f"increments need length len(norms) - 1 = {len(norms) - 1}; got {len(increments)}")
    keep = sorted({int(k) for k in keep})
    if not keep or keep[0] < 0 or keep[-1] >= len(norms):
        raise ValueError(f"keep must hold indices in 0..{len(norms) - 1}; got {keep}")
    kept = norms[keep]
    pairs = [increments[k] for k in keep if k + 1 in keep and math.isfinite(increments[k])]
    depth = len(norms) if depth is None else depth
    return {"maximum": float(kept.max()), "median": float(np.median(kept)), "root_ssq": float(np.sqrt((kept**2).sum())),
            "increment": depth ** float(beta) * max(pairs) if pairs else float("nan"), "count": len(keep)}


class RegimeBlock(nn.Module):
    """``ReLU(S h + delta * ReLU(A * h))`` (eq. 3.2): ``A`` = ``conv1`` (3x3, stride), ``delta`` = ``conv2`` (3x3),
    ``S`` the identity or a 1x1 convolution (stride) when the shape changes; no batch norm, no biases."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False)
                         if stride != 1 or in_channels != channels else nn.Identity())

    def forward(self, h: Tensor) -> Tensor:
        """The block's output ``ReLU(S h + delta * ReLU(A * h))`` (Cont et al. eq. (3.2)) for ``h``
        ``(batch, in_channels, n, n)``: ``(batch, channels, n', n')``, ``n' = n`` unless the block has a stride."""
        return F.relu(self.shortcut(h) + self.conv2(F.relu(self.conv1(h))))


class RegimeResNet(nn.Module):
    """The authors' CIFAR ResNet without batch norm (paper-notes 3.5), with any channels and blocks per stage.

    ``RegimeResNet((4, 31, 82, 4), (64, 128, 256, 512))`` is their ``L = 121`` network; stage ``s > 0``
    halves the resolution in its first block. Depth = ``sum(blocks)``.
    """

    def __init__(self, blocks: Sequence[int], channels: Sequence[int], in_channels: int = 3, classes: int = 10):
        super().__init__()
        blocks = tuple(_checks.positive_int("blocks", b) for b in blocks)
        channels = tuple(_checks.positive_int("channels", c) for c in channels)
        if len(blocks) != len(channels) or not blocks:
            raise ValueError(f"blocks and channels need one entry per stage; got {len(blocks)} and {len(channels)}")
        self.blocks_per_stage, self.channels = blocks, channels
        self.stem = nn.Sequential(nn.Conv2d(_checks.positive_int("in_channels", in_channels), channels[0], 3,
                                            padding=1, bias=False), nn.ReLU())
        layers, width = [], channels[0]
        for stage, (count, c) in enumerate(zip(blocks, channels)):
            for i in range(count):
                layers.append(RegimeBlock(width, c, stride=2 if stage > 0 and i == 0 else 1))
                width = c
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(width, _checks.positive_int("classes", classes)))

    @property
    def depth(self) -> int:
        """The number of residual blocks ``L`` (of kernels ``A_k``), ``sum(blocks)``."""
        return len(self.blocks)

    def forward(self, x: Tensor) -> Tensor:
        """The class logits ``(batch, classes)`` of images ``x`` ``(batch, in_channels, n, n)``: stem, blocks, head."""
        return self.head(self.blocks(self.stem(x)))

    def kernels(self, which: str) -> list[Tensor]:
        """The kernels ``A_k`` (``which="A"``, conv1) or ``delta_k`` (``"delta"``, conv2), ``k = 0..L-1``, detached."""
        name = {"A": "conv1", "delta": "conv2"}[_checks.one_of("which", which, ("A", "delta"))]
        return [getattr(block, name).weight.detach() for block in self.blocks]

    def input_sizes(self, which: str, image_size: int) -> list[int]:
        """Spatial size of the input of each ``A_k`` or ``delta_k`` for square ``image_size`` images."""
        _checks.one_of("which", which, ("A", "delta"))
        n, sizes = _checks.positive_int("image_size", image_size), []
        for block in self.blocks:
            if which == "A":
                sizes.append(n)
            n = (n - 1) // block.conv1.stride[0] + 1  # 3x3 convolution, padding 1
            if which == "delta":
                sizes.append(n)
        return sizes


def split_depth(depth: int, stages: int, outer: int = 0) -> tuple[int, ...]:
    """Blocks per stage for ``depth`` blocks over ``stages`` stages.

    With ``outer = 0`` the split is as even as possible (later stages get the rest). With ``outer > 0`` the
    first and last stages keep ``outer`` blocks at every depth and the middle stages share the rest, as in the
    authors' grid (:data:`PAPER_BLOCKS`: 2 to 4 blocks in stages 1 and 4, the depth grows in stages 2 and 3).
    """
    depth, stages = _checks.positive_int("depth", depth), _checks.positive_int("stages", stages)
    if outer:
        outer = _checks.positive_int("outer", outer)
        if stages < 3:
            raise ValueError(f"outer > 0 needs stages >= 3 (a middle stage); got stages={stages}")
        if depth < 2 * outer + stages - 2:
            raise ValueError(f"depth must be at least {2 * outer + stages - 2} for stages={stages}, outer={outer}; "
                             f"got {depth}")
        return (outer, *split_depth(depth - 2 * outer, stages - 2), outer)
    if depth < stages:
        raise ValueError(f"depth must be at least stages={stages}; got {depth}")
    return tuple(depth // stages + (s >= stages - depth % stages) for s in range(stages))


def network_statistics(model: RegimeResNet, image_size: int, beta: float = 0.0,
                       reference: RegimeResNet | dict | None = None) -> dict[str, dict]:
    """Per-layer norms (``layers``), consecutive increments (``increments``, :func:`increment_norms`) and
    :func:`scaling_statistics` of the ``A`` and ``delta`` kernels of one network.

    With ``reference`` (a network of the same shape, or ``{"A": kernels, "delta": kernels}``), the kernels measured
    are ``K_k - K_k^ref``: with the initial network as reference, what training added.
    """
    out = {}
    for which in ("A", "delta"):
        kernels, sizes = model.kernels(which), model.input_sizes(which, image_size)
        if reference is not None:
            base = reference.kernels(which) if isinstance(reference, RegimeResNet) else reference[which]
            kernels = [k - b.to(k.device) for k, b in zip(kernels, base, strict=True)]
        out[which] = {"layers": layer_norms(kernels, sizes).tolist(),
                      "increments": increment_norms(kernels, sizes).tolist(), **scaling_statistics(kernels, sizes, beta)}
    return out


def image_data(dataset: str, train_limit: int | None = None, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Train and test sets standardised per channel with the training statistics.

    ``"digits"`` (scikit-learn, no official split): a seeded permutation, the last 500 images for the test;
    ``"cifar-10"``: the official split (raises ``DatasetNotFoundError`` where CIFAR-10 is absent).
    ``train_limit`` keeps the first images of the training set.
    """
    _checks.one_of("dataset", dataset, ("digits", "cifar-10"))
    if dataset == "cifar-10":
        train, test = data.cifar10("train", limit=train_limit), data.cifar10("test")
    else:
        full = data.digits()
        order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))
        keep = order[:-500] if train_limit is None else order[:-500][:_checks.positive_int("train_limit", train_limit)]
        train = Dataset(full.inputs[keep], full.targets[keep], f"scikit-learn digits 8x8, train ({len(keep)} images)")
        test = Dataset(full.inputs[order[-500:]], full.targets[order[-500:]], "scikit-learn digits 8x8, test (500 images)")
    mean = train.inputs.mean(dim=(0, 2, 3), keepdim=True)
    std = train.inputs.std(dim=(0, 2, 3), keepdim=True)
    return tuple(Dataset((d.inputs - mean) / std, d.targets, d.name) for d in (train, test))


def run_depth(blocks: Sequence[int], channels: Sequence[int], train: Dataset, test: Dataset, epochs: int,
              seed: int = 0, **training) -> dict:
    """Build a :class:`RegimeResNet` (seeded), train it with :func:`resnode.images.fit` (cosine schedule by default,
    as in App. A; ``training``: its keyword arguments, such as ``device``, ``cache_dir`` and ``name``) and measure its
    kernels before and after: ``{"model", "history", "init", "trained", "update"}``, the last three from
    :func:`network_statistics` (``update``: of the trained minus the initial kernels). The model comes back on the CPU."""
    torch.manual_seed(seed)
    model = RegimeResNet(blocks, channels, in_channels=train.inputs.shape[1], classes=int(train.targets.max()) + 1)
    size = train.inputs.shape[-1]
    initial = network_statistics(model, size)
    start = {which: [k.clone() for k in model.kernels(which)] for which in ("A", "delta")}
    history = fit(model, train, test, epochs, seed=seed, **{"schedule": "cosine", **training})
    model = model.cpu().to(memory_format=torch.contiguous_format)
    return {"model": model, "history": history, "init": initial, "trained": network_statistics(model, size),
            "update": network_statistics(model, size, reference=start)}


def save_results(path: str | Path, results: dict, parameters: dict) -> None:
    """Write a run's results with its provenance (parameters, device, library version, date) as JSON."""
    from . import __version__

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    record = {"parameters": parameters, "device": device, "resnode": __version__, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "results": results}
    Path(path).write_text(json.dumps(record, indent=1))


__all__ = ["PAPER_BLOCKS", "PAPER_TEST_ERROR", "PAPER_EXPONENTS", "fold_kernel", "conv_singular_values",
           "conv_spectral_norm", "circular_conv_matrix", "power_iteration_norm", "layer_norms", "increment_norms",
           "scaling_statistics", "stage_starts", "subset_statistics",
           "RegimeBlock", "RegimeResNet", "split_depth", "network_statistics",
           "image_data", "run_depth", "save_results"]
