"""One checkpointed training of each kind, run as a process that the fault-injection tests kill.

    python resumable.py KIND CACHE_DIR OUT

trains (``flow``: the gradient flow of Marion et al. on the fused engine; ``sgd``: Cont et al.'s SGD over several
depths; ``images``: a convolutional ResNet by ``images.fit``) with its checkpoints in CACHE_DIR, resuming from them,
and saves what the run produced to OUT (``torch.save``) when it finishes.
"""

import sys

import torch

from resnode import engine, flow, images, recorders, sgd
from resnode.data import Dataset


def train_flow(cache_dir):
    g = torch.Generator().manual_seed(0)
    depth, n, q, m = 64, 32, 6, 8
    x, y = torch.randn(2, n, q, generator=g, dtype=torch.float64)
    weights = {"W": torch.randn(m, q, generator=g, dtype=torch.float64).expand(depth, m, q).clone(),
               "V": torch.zeros(depth, q, m, dtype=torch.float64)}
    spec = engine.Residual("gelu", step=1 / depth, inner=q**-0.5, outer=m**-0.5)
    losses, increments = recorders.Loss(), recorders.MaxIncrement([0, 100, 200, 300], copies=0)
    final = flow.gradient_flow(x, y, weights, spec, 300, 0.05, clip=1.0, recorders=[losses, increments],
                               cache_dir=cache_dir, name="flow", checkpoint_every=4)
    return {"weights": final, "losses": torch.from_numpy(losses.values),
            "max_V": torch.from_numpy(increments.result("V")[0]), "times": losses.times}


def train_sgd(cache_dir):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(4, 4, generator=g, dtype=torch.float64))
    runs = sgd.train_depths(x, y, [3, 5, 8, 13, 21, 34, 55, 89], "tanh", "shared", copies=2, cache_dir=cache_dir,
                            batch_size=8, max_updates=300, max_epochs=40, lr=0.05, stop_loss=1e-6)
    return {depth: {"weights": run.weights, "epoch_losses": torch.from_numpy(run.epoch_losses),
                    "updates": torch.from_numpy(run.updates)} for depth, run in runs.items()}


def train_images(cache_dir):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(96) % 3
    x = (0.3 + 0.2 * y[:, None, None, None] + 0.1 * torch.randn(96, 1, 12, 12, generator=g)).clamp(0, 1)
    data = Dataset(x, y, "three brightness classes, 12x12")
    torch.manual_seed(0)
    net = images.marion_resnet(6, "gelu", "iid", in_channels=1, classes=3, image_size=12)
    history = images.fit(net, data, data, 8, batch_size=16, lr=0.05, augmentation=True, device="cpu",
                         cache_dir=cache_dir, name="images")
    kept = {k: v for k, v in history.items() if k not in ("seconds", "images_per_second")}  # timings differ by run
    return {"model": net.state_dict(), "history": kept}


if __name__ == "__main__":
    torch.set_num_threads(1)
    kind, cache_dir, out = sys.argv[1:]
    result = {"flow": train_flow, "sgd": train_sgd, "images": train_images}[kind](cache_dir)
    torch.save(result, out)
