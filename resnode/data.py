"""Datasets of the book: synthetic Gaussian data, scikit-learn digits, Fashion-MNIST (IDX), CIFAR-10 (python format).

Nothing is downloaded. Each file-backed loader looks in, in order: the ``root`` argument, the
dataset's environment variable, then its default folder; a missing dataset raises
``DatasetNotFoundError`` naming the dataset, the folders searched and how to get it.
"""

from __future__ import annotations

import gzip
import io
import itertools
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import _checks


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where resnode looked for them."""


@dataclass(frozen=True)
class Dataset:
    """Inputs, targets and the name of what they are (every figure says which dataset it ran on)."""

    inputs: Tensor
    targets: Tensor
    name: str

    def __len__(self) -> int:
        return len(self.inputs)


_SOURCES = {
    "fashion-mnist": ("RESNODE_FASHION_MNIST", ["/usr/share/datasets/fashion-mnist"],
                      "install Debian's package (apt-get install dataset-fashion-mnist) or put the four "
                      "*-idx?-ubyte.gz files of github.com/zalandoresearch/fashion-mnist in a folder"),
    "cifar-10": ("RESNODE_CIFAR10", ["~/.cache/resnode/cifar-10-batches-py", "data/cifar-10-batches-py"],
                 "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and "
                 "extract it; the folder holds data_batch_1..5 and test_batch"),
}


def find_root(dataset: str, root: str | os.PathLike | None, required: list[str]) -> Path:
    """The first of (``root``, the dataset's environment variable, its defaults) holding every ``required`` file."""
    env, defaults, how = _SOURCES[_checks.one_of("dataset", dataset, tuple(_SOURCES))]
    candidates = [root] if root is not None else [os.environ.get(env)] + defaults
    tried = []
    for candidate in candidates:
        if not candidate:
            continue
        folder = Path(candidate).expanduser()
        tried.append(str(folder))
        if all((folder / name).is_file() for name in required):
            return folder
    where = ", ".join(tried) if tried else "nowhere"
    raise DatasetNotFoundError(
        f"{dataset} not found: looked in {where} for {', '.join(required)}. To get it, {how}; "
        f"then pass root=<folder> or set {env}=<folder>."
    )


def synthetic_gaussian(n: int, dim: int, out_dim: int | None = None, seed: int = 0,
                       dtype: torch.dtype = torch.float64) -> Dataset:
    """``n`` independent pairs ``x_i ~ N(0, I_dim)``, ``y_i ~ N(0, I_out_dim)`` (Marion et al. Section 5.1)."""
    n, dim = _checks.positive_int("n", n), _checks.positive_int("dim", dim)
    out_dim = dim if out_dim is None else _checks.positive_int("out_dim", out_dim)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=generator, dtype=dtype)
    y = torch.randn(n, out_dim, generator=generator, dtype=dtype)
    return Dataset(x, y, f"synthetic Gaussian (n={n}, d={dim}, seed={seed})")


def digits(dtype: torch.dtype = torch.float32) -> Dataset:
    """scikit-learn's 8x8 digits (1,797 images, 10 classes), pixels scaled to [0, 1], shape ``(n, 1, 8, 8)``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.images / 16.0, dtype=dtype).unsqueeze(1)
    return Dataset(x, torch.as_tensor(bunch.target, dtype=torch.long), "scikit-learn digits (8x8)")


_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or not): magic ``0x0000TTDD`` (T type, D dimensions), sizes, then the data.

    A file that cannot be read (truncated or corrupted gzip, not gzip at all) raises ``ValueError`` naming it."""
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"cannot read {path}: {type(error).__name__}: {error}. The file is truncated or corrupted: "
                         "download or install it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (magic bytes {raw[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(v) for v in np.frombuffer(raw[4:header], dtype=">u4"))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: IDX header announces shape {shape} ({expected} bytes) but the file has {len(raw)}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).copy()


_FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def fashion_mnist(split: str = "train", root: str | os.PathLike | None = None, limit: int | None = None,
                  dtype: torch.dtype = torch.float32) -> Dataset:
    """Fashion-MNIST from its IDX files: images ``(n, 1, 28, 28)`` in [0, 1], labels 0..9.

    Checks the magic numbers (2051 images, 2049 labels), the 28x28 size and that counts agree.
    ``limit`` keeps the first ``limit`` examples.
    """
    images_file, labels_file = _FASHION_FILES[_checks.one_of("split", split, tuple(_FASHION_FILES))]
    folder = find_root("fashion-mnist", root, [images_file, labels_file])
    images, labels = read_idx(folder / images_file), read_idx(folder / labels_file)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(f"{folder / images_file}: expected uint8 images of 28x28, got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{folder}: {len(images)} images but labels of shape {labels.shape}")
    if len(images) == 0:
        raise ValueError(f"{folder / images_file} holds no images")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{folder / labels_file}: Fashion-MNIST labels must lie in 0..9; found {labels.min()}..{labels.max()}")
    if limit is not None:
        limit = _checks.positive_int("limit", limit)
        images, labels = images[:limit], labels[:limit]
    x = torch.as_tensor(images.astype(np.float32) / 255.0, dtype=dtype).unsqueeze(1)
    return Dataset(x, torch.as_tensor(labels.astype(np.int64)), f"Fashion-MNIST {split} ({len(x)} images)")


_CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}

# What a CIFAR-10 python batch may ask its unpickler for: numpy arrays (its data), nothing else.
_CIFAR_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                  ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
                  ("numpy._core.numeric", "_frombuffer"),
                  ("_codecs", "encode")}  # bytes in a pickle written by Python 3 with protocol 2


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch and refuses any other object: a pickle can run code when it is loaded."""

    def find_class(self, module, name):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a CIFAR-10 batch never holds")
        return super().find_class(module, name)


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python-format batch: ``(data, labels)``, data uint8 ``(n, 3072)``, labels int64 in 0..9.

    The pickle is read by a restricted unpickler that builds dicts, lists, bytes, numbers and numpy arrays only;
    anything else, a truncated or corrupted file, or missing keys raise ``ValueError`` naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            batch = _BatchUnpickler(io.BytesIO(handle.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, OverflowError) as error:
        raise ValueError(f"cannot read the CIFAR-10 batch {path}: {type(error).__name__}: {error}. "
                         "Use the python version of CIFAR-10 (cifar-10-python.tar.gz), downloaded again") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{path} is not a CIFAR-10 batch: expected a dict with b'data' and b'labels', got {keys}")
    data, labels = np.asarray(batch[b"data"]), batch[b"labels"]
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: expected uint8 data of shape (n, 3072), got {data.dtype} {data.shape}")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data) or \
            not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v <= 9 for v in labels):
        raise ValueError(f"{path}: expected {len(data)} integer labels in 0..9 under b'labels'")
    return data, np.asarray(labels, dtype=np.int64)


def cifar10(split: str = "train", root: str | os.PathLike | None = None, limit: int | None = None,
            dtype: torch.dtype = torch.float32) -> Dataset:
    """CIFAR-10 from its python-format batches: images ``(n, 3, 32, 32)`` in [0, 1], labels 0..9.

    Each batch is a pickle holding ``b'data'`` (uint8 rows of 3,072 = 3x32x32 values, channel-major)
    and ``b'labels'``; it is read safely (:func:`read_cifar_batch`).
    """
    files = _CIFAR_FILES[_checks.one_of("split", split, tuple(_CIFAR_FILES))]
    folder = find_root("cifar-10", root, files)
    batches = [read_cifar_batch(folder / name) for name in files]
    x = np.concatenate([data.reshape(-1, 3, 32, 32) for data, _ in batches])
    y = np.concatenate([labels for _, labels in batches])
    if limit is not None:
        limit = _checks.positive_int("limit", limit)
        x, y = x[:limit], y[:limit]
    if len(x) == 0:
        raise ValueError(f"{folder}: the CIFAR-10 {split} batches hold no images")
    return Dataset(torch.as_tensor(x.astype(np.float32) / 255.0, dtype=dtype), torch.as_tensor(y),
                   f"CIFAR-10 {split} ({len(x)} images)")


def synthetic_ode(n_train: int = 1024, n_test: int = 256, dim: int = 10, seed: int = 0, steps: int = 100,
                  dtype: torch.dtype = torch.float64) -> tuple[Dataset, Dataset]:
    """Cont, Rossier & Xu's synthetic set (Section 3.2; the authors' ``generate_data_ODE``): ``(train, test)``.

    ``x ~ U([-1, 1]^dim)``; ``steps`` Euler steps ``z_{t+1} = z_t + tanh(sin(5 pi t / steps) z_t +
    cos(5 pi t / steps)) / sqrt(steps)`` from ``z_0 = x``, ``t = 0 .. steps - 1``; target ``y = z_steps``. Then
    ``x`` and ``y`` are each scaled to unit Euclidean norm (the code does this; the paper's text does not say).
    """
    n_train, n_test = _checks.positive_int("n_train", n_train), _checks.positive_int("n_test", n_test)
    dim, steps = _checks.positive_int("dim", dim), _checks.positive_int("steps", steps)
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n_train + n_test, dim, generator=generator, dtype=dtype).mul_(2).sub_(1)
    z = x.clone()
    for t in range(steps):
        angle = 5 * np.pi * t / steps
        z = z + torch.tanh(np.sin(angle) * z + np.cos(angle)) / np.sqrt(steps)
    x, z = x / x.norm(dim=1, keepdim=True), z / z.norm(dim=1, keepdim=True)
    name = f"synthetic ODE (d={dim}, seed={seed})"
    return (Dataset(x[:n_train], z[:n_train], f"{name} train ({n_train})"),
            Dataset(x[n_train:], z[n_train:], f"{name} test ({n_test})"))


def random_conv_embedding(images: Tensor, seed: int = 0) -> Tensor:
    """Cont, Rossier & Xu's untrained embedding (Section 3.2): ``Conv(1,1,k=5,s=2)`` then ``Conv(1,1,k=3,s=2)``.

    Weights and biases drawn as torch's default ``Conv2d`` initialisation, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``,
    from ``seed``. ``images`` ``(n, 1, 28, 28)`` -> ``(n, 25)`` (28 -> 12 -> 5), each row scaled to unit norm.
    """
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (n, 1, H, W); got shape {tuple(images.shape)}")
    generator = torch.Generator().manual_seed(seed)
    h = images
    for size in (5, 3):
        bound = 1 / size  # fan_in = 1 * size * size
        weight = (torch.rand(1, 1, size, size, generator=generator, dtype=images.dtype) * 2 - 1) * bound
        bias = (torch.rand(1, generator=generator, dtype=images.dtype) * 2 - 1) * bound
        h = torch.nn.functional.conv2d(h, weight, bias, stride=2)
    h = h.flatten(1)
    return h / h.norm(dim=1, keepdim=True)


def embedded_images(dataset: Dataset, seed: int = 0, pixel_scale: float = 255.0,
                    dtype: torch.dtype = torch.float64) -> Dataset:
    """Cont, Rossier & Xu's low-dimensional image embedding (Section 3.2, the authors' ``generate_mnist_resnet``).

    ``dataset``: 28x28 grey images in [0, 1] with labels 0..9 (the paper used MNIST; the book uses
    Fashion-MNIST, see :func:`fashion_mnist`). Pixels are multiplied by ``pixel_scale`` (the code feeds raw
    uint8 values), pushed through :func:`random_conv_embedding` and scaled to unit norm; the targets are 25-dim,
    one-hot in the first 10 coordinates, so the network maps R^25 to R^25.
    """
    images = dataset.inputs
    if images.dim() != 4 or images.shape[1:] != (1, 28, 28):
        raise ValueError(f"dataset must hold (n, 1, 28, 28) images; got {tuple(images.shape)}")
    labels = dataset.targets
    if labels.dim() != 1 or labels.min() < 0 or labels.max() > 9:
        raise ValueError("dataset targets must be labels in 0..9")
    x = random_conv_embedding(images.to(dtype) * _checks.positive_float("pixel_scale", pixel_scale), seed)
    y = torch.zeros_like(x)
    y[torch.arange(len(y)), labels] = 1.0
    return Dataset(x, y, f"{dataset.name}, random conv embedding (25-dim, seed={seed})")


# --- ImageNet-style folders and synthetic images (the image chapters) -------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_FOLDER_SOURCES = {
    "imagenet": ("RESNODE_IMAGENET", ["~/.cache/resnode/imagenet", "data/imagenet"],
                 "get ILSVRC-2012 from https://image-net.org (registration needed) and arrange it as "
                 "train/<class>/*.JPEG and val/<class>/*.JPEG (the validation images sorted into their classes, "
                 "as torchvision's ImageFolder expects)"),
}


@dataclass(frozen=True)
class ImageFolder:
    """An ImageNet-style folder ``<split>/<class>/<image>``: the image files, their class indices (classes in sorted
    order of their folder names, as torchvision's ``ImageFolder``), the class names and what they are. Images are
    decoded when asked for (:meth:`load`)."""

    files: tuple
    targets: Tensor
    classes: tuple
    name: str

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Tensor:
        """Image ``index`` as uint8 ``(3, H, W)`` (:func:`read_image`)."""
        return read_image(self.files[index])


def read_image(path: str | os.PathLike) -> Tensor:
    """One image file as uint8 RGB ``(3, H, W)``: torchvision's decoder where torchvision imports, else Pillow.
    Grey or palette images are converted to RGB. A file that cannot be decoded raises ``ValueError`` naming it."""
    path = Path(path)
    try:
        try:
            from torchvision.io import ImageReadMode, decode_image, read_file
        except Exception:  # torchvision is optional, and fails to import beside a CPU-only torch wheel
            from PIL import Image

            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"), dtype=np.uint8)
            return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except (OSError, ValueError, RuntimeError, SyntaxError) as error:
        raise ValueError(f"cannot decode the image {path}: {type(error).__name__}: {error}") from None


def image_folder(split: str = "train", root: str | os.PathLike | None = None, limit: int | None = None,
                 dataset: str = "imagenet") -> ImageFolder:
    """An ImageNet-style folder: ``<root>/<split>/<class>/<image files>`` (the layout of torchvision's
    ``ImageFolder``; the validation split must be sorted into class folders too).

    ``root`` is searched, then the dataset's environment variable (``RESNODE_IMAGENET``), then its default folders;
    a missing split raises :class:`DatasetNotFoundError` saying how to get the data. ``limit`` keeps that many
    images, taken in turn from each class (so a small limit still holds every class). Class indices follow the
    sorted class names of the ``train`` split when it exists beside ``split``, so that both splits agree.
    """
    env, defaults, how = _FOLDER_SOURCES[_checks.one_of("dataset", dataset, tuple(_FOLDER_SOURCES))]
    split = _checks.one_of("split", split, ("train", "val"))
    candidates = [root] if root is not None else [os.environ.get(env)] + defaults
    tried, folder = [], None
    for candidate in candidates:
        if not candidate:
            continue
        path = Path(candidate).expanduser()
        tried.append(str(path))
        if (path / split).is_dir() and any(p.is_dir() for p in (path / split).iterdir()):
            folder = path
            break
    if folder is None:
        raise DatasetNotFoundError(
            f"{dataset} not found: looked in {', '.join(tried) or 'nowhere'} for a {split}/ folder of class folders. "
            f"To get it, {how}; then pass root=<folder> or set {env}=<folder>.")
    naming = folder / ("train" if (folder / "train").is_dir() else split)
    classes = tuple(sorted(p.name for p in naming.iterdir() if p.is_dir()))
    index = {c: i for i, c in enumerate(classes)}
    per_class = []
    for c in sorted(p.name for p in (folder / split).iterdir() if p.is_dir()):
        if c not in index:
            raise ValueError(f"{folder / split / c}: class {c!r} is not among the {len(classes)} classes of {naming}")
        files = sorted(p for p in (folder / split / c).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        per_class.append([(f, index[c]) for f in files])
    interleaved = [item for group in itertools.zip_longest(*per_class) for item in group if item is not None]
    if limit is not None:
        interleaved = interleaved[:_checks.positive_int("limit", limit)]
    if not interleaved:
        raise ValueError(f"{folder / split} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    files, targets = zip(*interleaved)
    return ImageFolder(tuple(files), torch.tensor(targets, dtype=torch.long), classes,
                       f"{dataset} {split} ({len(files)} images, {len(classes)} classes)")


def synthetic_images(n: int, channels: int = 1, size: int = 28, classes: int = 10, seed: int = 0,
                     noise: float = 0.3, detail: int = 4, shift: int = 0) -> Dataset:
    """Images whose class a small convolutional network learns in seconds, for smoke runs: class ``c`` is a fixed
    random pattern ``P_c`` (a ``detail x detail`` Gaussian map drawn from ``seed``, upsampled bilinearly to ``size``);
    each image is ``clip(0.5 + a P_c + noise N, 0, 1)``, with a random contrast ``a`` in [0.5, 1], white Gaussian
    noise ``N``, and the pattern moved by up to ``shift`` pixels in each direction (periodically).
    Values in [0, 1], shape ``(n, channels, size, size)``; ``n / classes`` images of each class, in random order."""
    n, channels = _checks.positive_int("n", n), _checks.positive_int("channels", channels)
    size, classes = _checks.positive_int("size", size), _checks.positive_int("classes", classes)
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(classes, channels, _checks.positive_int("detail", detail), detail, generator=generator)
    patterns = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    patterns = 0.25 * patterns / patterns.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    labels = torch.arange(n) % classes
    labels = labels[torch.randperm(n, generator=generator)]
    contrast = 0.5 + 0.5 * torch.rand(n, 1, 1, 1, generator=generator)
    x = contrast * patterns[labels]
    if shift:
        moves = torch.randint(-shift, shift + 1, (n, 2), generator=generator)
        x = torch.stack([image.roll((int(dy), int(dx)), dims=(-2, -1)) for image, (dy, dx) in zip(x, moves)])
    x = 0.5 + x + noise * torch.randn(n, channels, size, size, generator=generator)
    return Dataset(x.clamp(0, 1), labels, f"synthetic images ({n}, {classes} classes, seed={seed})")


__all__ = ["DatasetNotFoundError", "Dataset", "find_root", "synthetic_gaussian", "digits", "read_idx",
           "fashion_mnist", "read_cifar_batch", "cifar10", "synthetic_ode", "random_conv_embedding",
           "embedded_images", "IMAGE_EXTENSIONS", "ImageFolder", "read_image", "image_folder", "synthetic_images"]
