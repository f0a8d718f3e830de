"""resnode: deep residual networks as discretisations of neural ODEs and SDEs, as a small PyTorch library."""

from . import adjoint, data, init, linear, metrics, models, ode, plotting, polyak, profiles, rkhs, tangent_kernel, train, vision
from .models import ResNet, euler, heun, step_size

__version__ = "0.1.0"

__all__ = ["adjoint", "data", "init", "linear", "metrics", "models", "ode", "plotting", "polyak", "profiles", "rkhs",
           "tangent_kernel", "train", "vision", "ResNet", "euler", "heun", "step_size", "__version__"]
