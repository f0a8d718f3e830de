"""The engine's depth loops in C (``kernels.c``), compiled on first use for each state dimension, hidden
width and scalar type, and loaded with ``ctypes``.

The code is compiled for the machine it runs on (``-march=native``) and cached (``$RESNODE_CACHE`` or
``~/.cache/resnode``) under a name that hashes the source, the compiler command and the CPU's flags, so a
change of any of them compiles afresh. Where no C compiler (``$CC``, else ``cc``) or no vectorised C
math library (glibc's libmvec) is found, :func:`kernels` warns and returns ``None``, and the engine runs
its loops through torch. ``RESNODE_NATIVE=0`` in the environment (or ``native.enabled = False``) asks
for the torch loops.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp-simd", "-shared", "-fPIC", "-Wl,-z,defs")
LIBRARIES = ("-lmvec", "-lm")
ACTIVATION_CODES = {"tanh": 0, "relu": 1, "gelu": 2, "softplus": 3, "sigmoid": 4, "identity": 5}
V_MATRIX, V_SCALAR, V_NONE = 0, 1, 2
_REAL = {torch.float32: ("float", ctypes.c_float), torch.float64: ("double", ctypes.c_double)}

enabled = os.environ.get("RESNODE_NATIVE", "1") != "0"
"""Whether the engine may use the compiled loops (tests switch it off to run the torch loops)."""


def _cpu() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        return next((line for line in info.splitlines() if line.startswith("flags")), "") + platform.processor()
    except OSError:
        return platform.processor() + platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("RESNODE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "resnode"
    return Path(root) / "kernels"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _compile(command: list[str], target: Path) -> None:
    """Build ``target`` and its ``.sha256`` beside it, each moved in place whole (parallel workers may race)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        subprocess.run([*command, "-o", str(built), *LIBRARIES], check=True, capture_output=True, text=True)
        checksum = Path(scratch) / (target.name + ".sha256")
        checksum.write_text(_digest(built))
        os.replace(checksum, target.with_name(target.name + ".sha256"))
        os.replace(built, target)


def _intact(target: Path) -> bool:
    """Whether a cached library is the one that was built: loading a truncated ``.so`` crashes the process (SIGBUS)."""
    checksum = target.with_name(target.name + ".sha256")
    try:
        return target.is_file() and _digest(target) == checksum.read_text().strip()
    except OSError:
        return False


@functools.cache
def kernels(dtype: torch.dtype, dim: int, width: int) -> ctypes.CDLL | None:
    """The compiled ``resnode_forward`` / ``resnode_backward`` for ``Q = dim``, ``M = width`` and ``dtype``
    (``float32`` or ``float64``), or ``None`` where they cannot be built (a warning says why)."""
    if dtype not in _REAL:
        return None
    name, real = _REAL[dtype]
    command = [*shlex.split(os.environ.get("CC", "cc")), *FLAGS, f"-DQ={dim}", f"-DM={width}", f"-DREAL={name}",
               *(["-DREAL_IS_DOUBLE"] if name == "double" else []), str(SOURCE)]
    key = hashlib.sha256("\n".join([SOURCE.read_text(), *command[:-1], _cpu()]).encode()).hexdigest()[:20]
    target = _cache_dir() / f"engine-{name}-q{dim}-m{width}-{key}.so"
    try:
        if not _intact(target):  # absent, truncated, or from an older resnode without a checksum
            _compile(command, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", None) or str(error)
        warnings.warn(f"resnode: the compiled engine loops are unavailable ({detail.strip()[:300]}); "
                      "running them through torch instead", RuntimeWarning, stacklevel=3)
        return None
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    lib.resnode_forward.argtypes = [integer, integer, integer, integer, integer, real, *(pointer,) * 6]
    lib.resnode_backward.argtypes = [*(integer,) * 5, real, real, *(pointer,) * 10]
    lib.resnode_forward.restype = lib.resnode_backward.restype = None
    return lib


@contextlib.contextmanager
def torch_loops():
    """Inside, the engine runs its depth loops through torch (as on a GPU), whatever ``enabled`` was."""
    global enabled
    saved, enabled = enabled, False
    try:
        yield
    finally:
        enabled = saved


def usable(*tensors: Tensor | None) -> bool:
    """Whether the compiled loops may run on these tensors: enabled, on the CPU, float32 or float64, one dtype."""
    present = [t for t in tensors if t is not None]
    return (enabled and all(t.device.type == "cpu" and t.dtype == present[0].dtype for t in present)
            and present[0].dtype in _REAL)


def address(tensor: Tensor | None) -> int | None:
    """The data pointer of a contiguous tensor (``None`` stays ``None``, a null pointer in C)."""
    if tensor is None:
        return None
    if not tensor.is_contiguous():
        raise ValueError("the compiled loops need contiguous tensors")
    return tensor.data_ptr()


__all__ = ["SOURCE", "FLAGS", "LIBRARIES", "ACTIVATION_CODES", "enabled", "kernels", "torch_loops", "usable",
           "address"]
