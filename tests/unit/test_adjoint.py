"""Memory-free backward by reconstruction (Sander et al. Section 4): exactness, orders, batch norm, memory."""

import pytest
import torch
from torch import nn

from resnode import adjoint, init, metrics, models


class Shift(nn.Module):
    """f(x) = b: the reverse step is exact, so the adjoint gradient is exact."""

    def __init__(self, dim, generator):
        super().__init__()
        self.b = nn.Parameter(torch.randn(dim, generator=generator, dtype=torch.float64))

    def forward(self, x):
        return self.b.expand_as(x)


def perceptron_stack(depth, method, kind="smooth", seed=0, dim=4, width=8):
    """Weights theta(s) = A cos(2 pi s) + B sin(2 pi s) sampled at s = n / N (one function for every N), or i.i.d."""
    res = models.Perceptron(dim=dim, width=width, activation="tanh")
    knots = depth + (method == "heun")
    g = torch.Generator().manual_seed(seed)
    if kind == "smooth":
        s = torch.arange(knots, dtype=torch.float64) / depth
        weights = []
        for shape in res.shapes:
            a, b = 0.7 * torch.randn(2, *shape, generator=g, dtype=torch.float64)
            phase = (2 * torch.pi * s).reshape(-1, *(1,) * len(shape))
            weights.append(a * torch.cos(phase) + b * torch.sin(phase))
    else:
        weights = init.init_weights(kind, knots, res.shapes, std=0.7, generator=g, dtype=torch.float64)
    return adjoint.ResidualStack(adjoint.layers(res, weights), method=method)


def inputs(dim=4, n=16):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def square_loss(x):
    return lambda stack: stack(x).square().sum()


def largest_layer_error(stack):
    """max over parameters of ||g_adjoint - g_backprop||: the per-layer error of Props 4 and 6."""
    errors = adjoint.gradient_errors(square_loss(inputs()), stack, relative=False)
    return max(v for name, v in errors.items() if name != "(all)")


@pytest.mark.parametrize("method", adjoint.METHODS)
def test_exact_when_the_steps_are_exactly_invertible(method):
    g = torch.Generator().manual_seed(0)
    stack = adjoint.ResidualStack([Shift(3, g) for _ in range(6)], method=method)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    errors = adjoint.gradient_errors(lambda s: (s(x) ** 3).sum(), stack)
    assert max(errors.values()) < 1e-13
    # and the input gradient too
    grads = {}
    for backward in ("adjoint", "backprop"):
        stack.backward = backward
        x.grad = None
        (stack(x) ** 3).sum().backward()
        grads[backward] = x.grad.clone()
    torch.testing.assert_close(grads["adjoint"], grads["backprop"])


def measured_orders(method, depths=(16, 32, 64, 128)):
    """Fitted slopes against depth of the reconstruction error and of the largest per-layer gradient error."""
    rebuild, gradient = [], []
    for depth in depths:
        stack = perceptron_stack(depth, method)
        rebuild.append(adjoint.reconstruction_error(inputs(), list(stack.blocks), method=method).max().item())
        gradient.append(largest_layer_error(stack))
    return metrics.loglog_slope(depths, rebuild), metrics.loglog_slope(depths, gradient)


def test_euler_orders():
    """Props 3 and 4: reconstruction error O(1/N), per-layer gradient error O(1/N^2)."""
    rebuild, gradient = measured_orders("euler")
    assert abs(rebuild + 1) < 0.25
    assert abs(gradient + 2) < 0.25


def test_heun_orders_with_smooth_weights():
    """Props 5 and 6 with Delta_theta = O(1/N^2): reconstruction at least O(1/N^2), gradient at least O(1/N^3)."""
    rebuild, gradient = measured_orders("heun")
    assert rebuild < -2 + 0.25
    assert gradient < -3 + 0.25


def test_heun_needs_smooth_weights():
    """With i.i.d. weights Heun's reconstruction error no longer falls like 1/N^2 (Delta_theta / N term)."""
    depths = [16, 64, 256]
    rebuild = [adjoint.reconstruction_error(inputs(), list(perceptron_stack(d, "heun", kind="iid").blocks),
                                            method="heun").max().item() for d in depths]
    assert metrics.loglog_slope(depths, rebuild) > -1.5


class ConvBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                  nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x):
        return self.body(x)


def test_conv_blocks_with_batch_norm():
    torch.manual_seed(0)
    x = torch.randn(8, 4, 6, 6, dtype=torch.float64)
    errors = []
    for depth in (8, 32):
        stack = adjoint.ResidualStack([ConvBlock(4).double() for _ in range(depth)])
        errors.append(adjoint.gradient_errors(lambda s: s(x).square().mean(), stack)["(all)"])
        # running statistics move exactly as under backprop: one update per forward pass
        reference = {k: v.clone() for k, v in stack.state_dict().items()}
        means = {}
        for backward in ("adjoint", "backprop"):
            stack.load_state_dict(reference)
            stack.backward = backward
            stack(x).square().mean().backward()
            means[backward] = stack.blocks[0].body[0].running_mean.clone()
        torch.testing.assert_close(means["adjoint"], means["backprop"])
    assert errors[1] < 0.5 * errors[0] and errors[1] < 0.01


def test_memory_is_flat_in_depth_for_the_adjoint():
    x = inputs().requires_grad_()
    sizes = {}
    for backward in ("adjoint", "backprop"):
        sizes[backward] = []
        for depth in (16, 64):
            stack = perceptron_stack(depth, "euler")
            stack.backward = backward
            sizes[backward].append(adjoint.saved_tensor_bytes(lambda: stack(x).sum()))
    assert sizes["adjoint"][0] == sizes["adjoint"][1]
    assert sizes["backprop"][1] > 3.5 * sizes["backprop"][0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        adjoint.ResidualStack([nn.Identity()], method="rk4")
    with pytest.raises(ValueError, match="backward"):
        adjoint.integrate(torch.zeros(1, 1), [nn.Identity()], backward="recompute")
    with pytest.raises(ValueError, match="heun needs at least 2"):
        adjoint.integrate(torch.zeros(1, 1), [nn.Identity()], method="heun")


def test_baselines_compute_the_same_network():
    """torch.utils.checkpoint is exact; torchdiffeq's adjoint agrees with our adjoint's forward exactly."""
    stack = perceptron_stack(12, "euler")
    blocks = list(stack.blocks)
    x = inputs()
    exact = adjoint.integrate(x, blocks, backward="backprop")
    torch.testing.assert_close(adjoint.checkpointed(x, blocks, segments=3), exact)
    torch.testing.assert_close(adjoint.torchdiffeq_adjoint(x, blocks), exact)
    grads = {}
    for name, run in {"backprop": lambda: adjoint.integrate(x, blocks, backward="backprop"),
                      "checkpoint": lambda: adjoint.checkpointed(x, blocks, segments=3)}.items():
        stack.zero_grad()
        run().square().sum().backward()
        grads[name] = [p.grad.clone() for p in stack.parameters()]
    for a, b in zip(grads["checkpoint"], grads["backprop"]):
        torch.testing.assert_close(a, b)
