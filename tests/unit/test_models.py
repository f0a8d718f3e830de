"""The forward rule, integrators and residual functions of resnode.models."""

import math

import pytest
import torch

from resnode import init, metrics, models


class Rotation:
    """f(x, theta) = theta J x: the flow of dx/ds = c(s) J x is a rotation by the integral of c."""

    shapes = ((),)

    def __call__(self, x, c):
        return c * torch.stack([-x[..., 1], x[..., 0]], dim=-1)


def _rotation_errors(integrator, depths):
    """Error at s = 1 for dx/ds = c(s) J x with c(s) = 1 + s^2, exact angle 4/3."""
    x0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    exact = torch.tensor([math.cos(4 / 3), math.sin(4 / 3)], dtype=torch.float64)
    errors = []
    for n in depths:
        knots = n + 1 if integrator is models.heun else n
        c = (1 + (torch.arange(knots, dtype=torch.float64) / n) ** 2,)
        errors.append((integrator(x0, Rotation(), c) - exact).norm().item())
    return errors


def test_euler_converges_at_order_one():
    depths = [32, 64, 128, 256, 512]
    assert metrics.loglog_slope(depths, _rotation_errors(models.euler, depths)) == pytest.approx(-1.0, abs=0.05)


def test_heun_converges_at_order_two():
    depths = [32, 64, 128, 256, 512]
    assert metrics.loglog_slope(depths, _rotation_errors(models.heun, depths)) == pytest.approx(-2.0, abs=0.05)


def test_euler_is_the_residual_recursion():
    torch.manual_seed(0)
    res = models.Perceptron(dim=3, width=5, activation="gelu")
    weights = init.init_weights("iid", 4, res.shapes, dtype=torch.float64)
    x = torch.randn(7, 3, dtype=torch.float64)
    h = x.clone()
    for k in range(4):
        V, W = weights[0][k], weights[1][k]
        h = h + 0.25 * (V @ torch.nn.functional.gelu(W @ h.T / math.sqrt(3))).T / math.sqrt(5)
    traj = models.euler(x, res, weights, trajectory=True)
    assert traj.shape == (5, 7, 3)
    torch.testing.assert_close(traj[-1], h)
    torch.testing.assert_close(traj[0], x)


def test_perceptron_scalings_and_bias():
    V, W, b = torch.randn(2, 6), torch.randn(6, 2), torch.randn(6)
    x = torch.randn(4, 2)
    scaled = models.Perceptron(2, 6, "tanh")(x, V, W)
    raw = models.Perceptron(2, 6, "tanh", scaled=False)(x, V, W)
    torch.testing.assert_close(scaled, torch.tanh(x @ W.T / math.sqrt(2)) @ V.T / math.sqrt(6))
    torch.testing.assert_close(raw, torch.tanh(x @ W.T) @ V.T)
    biased = models.Perceptron(2, 6, "tanh", scaled=False, bias=True)
    assert biased.shapes == ((2, 6), (6, 2), (6,))
    torch.testing.assert_close(biased(x, V, W, b), torch.tanh(x @ W.T + b) @ V.T)


def test_leading_dimensions_run_independent_networks():
    res = models.Perceptron(dim=2, width=4)
    weights = init.init_weights("iid", 6, [(3, *s) for s in res.shapes], dtype=torch.float64)
    x = torch.randn(3, 5, 2, dtype=torch.float64)
    together = models.euler(x, res, weights)
    for seed in range(3):
        alone = models.euler(x[seed], res, tuple(w[:, seed] for w in weights))
        torch.testing.assert_close(together[seed], alone)


def test_segment_lipschitz_bounds_the_jacobian():
    torch.manual_seed(1)
    res = models.Perceptron(dim=3, width=8, activation="tanh")
    a = tuple(torch.randn(s, dtype=torch.float64) for s in res.shapes)
    b = tuple(torch.randn(s, dtype=torch.float64) for s in res.shapes)
    bound = res.segment_lipschitz(a, b)
    for u in torch.linspace(0, 1, 11):
        theta = tuple((1 - u) * p + u * q for p, q in zip(a, b))
        for x in torch.randn(20, 3, dtype=torch.float64):
            jac = torch.autograd.functional.jacobian(lambda h: res(h, *theta), x)
            assert torch.linalg.matrix_norm(jac, ord=2) <= bound + 1e-12


def test_step_sizes():
    assert models.step_size(16) == 1 / 16
    assert models.step_size(16, "1/sqrt(L)") == 0.25
    assert models.step_size(16, "L^-beta", beta=0.75) == pytest.approx(1 / 8)
    assert models.step_size(16, "1") == 1.0


@pytest.mark.parametrize("call, match", [
    (lambda: models.step_size(-3), "depth"),
    (lambda: models.step_size(0), "depth"),
    (lambda: models.step_size(4, "1/L^2"), "scaling"),
    (lambda: models.step_size(4, "L^-beta"), "beta"),
    (lambda: models.Perceptron(2, 3, activation="swish"), "activation"),
    (lambda: models.ResNet(models.Linear(2), depth=-1), "depth"),
    (lambda: models.ResNet(models.Linear(2), depth=4, init="orthogonal"), "init"),
    (lambda: models.ResNet(models.Linear(2), depth=4, integrator="rk4"), "integrator"),
])
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_resnet_module_trains_and_heun_holds_one_more_knot():
    net = models.ResNet(models.Linear(2), depth=8, integrator="heun", init="zero", dtype=torch.float64)
    assert net.weights[0].shape == (9, 2, 2)
    x = torch.randn(16, 2, dtype=torch.float64)
    out = net(x)
    torch.testing.assert_close(out, x)  # zero residuals: identity
    out.sum().backward()
    assert net.weights[0].grad is not None


def test_copies_are_independent_networks():
    res = models.Perceptron(dim=2, width=3, bias=True)
    net = models.ResNet(res, 6, copies=3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.randn(3, 5, 2, dtype=torch.float64)
    together = net(x)
    for s in range(3):
        single = models.euler(x[s], res, tuple(w[:, s] for w in net.weights), net.step)
        torch.testing.assert_close(together[s], single)
    # The gradient of copy 0's loss touches only copy 0's weights.
    net(x)[0].sum().backward()
    assert all(w.grad[:, 1:].abs().max() == 0 and w.grad[:, 0].abs().max() > 0 for w in net.weights)
    with pytest.raises(ValueError, match="copies"):
        models.ResNet(res, 6, copies=0)
