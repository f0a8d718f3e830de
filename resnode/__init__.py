"""resnode: deep residual networks as discretisations of neural ODEs and SDEs, as a small PyTorch library.

Submodules are imported on first use (``resnode.sweep``, ``resnode.plotting``...), so that ``import resnode`` costs
little more than torch: a sweep starts one kernel per point, and matplotlib, scipy and pandas are only paid for by
the code that uses them.
"""

import importlib

from .models import ResNet, euler, heun, step_size

__version__ = "0.1.0"

_SUBMODULES = ("adjoint", "checkpoints", "conv_regimes", "data", "engine", "flow", "images", "init", "linear", "metrics",
               "models", "native", "ode", "plotting", "polyak", "profiles", "records", "recorders", "regimes", "rkhs",
               "sde", "sgd", "sweep", "tangent_kernel", "train")

__all__ = [*_SUBMODULES, "ResNet", "euler", "heun", "step_size", "__version__"]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'resnode' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
