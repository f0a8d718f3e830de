"""resnode: deep residual networks as discretisations of neural ODEs and SDEs, as a small PyTorch library."""

from . import (adjoint, conv_regimes, data, init, linear, metrics, models, ode, plotting, polyak, profiles, records,
               regimes, rkhs, sde, sgd, sweep, tangent_kernel, train, vision)
from .models import ResNet, euler, heun, step_size

__version__ = "0.1.0"

__all__ = ["adjoint", "conv_regimes", "data", "init", "linear", "metrics", "models", "ode", "plotting", "polyak",
           "profiles", "records", "regimes", "rkhs", "sde", "sgd", "sweep", "tangent_kernel", "train", "vision", "ResNet", "euler", "heun",
           "step_size", "__version__"]
