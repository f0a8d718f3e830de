"""The forward rule, integrators and residual functions of resnode.models."""

import math

import pytest
import torch
from torch import nn

from resnode import adjoint, init, metrics, models


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
    (lambda: models.ResNet(models.Linear(2), depth=4, method="rk4"), "method"),
    (lambda: models.ResNet(models.Linear(2), depth=4, backward="recompute"), "backward"),
])
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_resnet_module_trains_and_heun_holds_one_more_knot():
    net = models.ResNet(models.Linear(2), depth=8, method="heun", init="zero", dtype=torch.float64)
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


# --- the front door: any block, three backward passes --------------------------------------------------------

def loss_and_grads(net, x):
    net.zero_grad(set_to_none=True)
    loss = net(x).square().sum()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("method", models.METHODS)
def test_stacked_weights_train_with_three_backward_passes_on_the_same_parameters(method):
    """Checkpointing is exact. The adjoint's relative gradient error falls like 1/L for Euler (Prop. 4: O(1/L^2)
    absolute, and each layer's gradient is O(1/L)); for Heun with smooth weights like 1/L^3, one order better than
    Prop. 6 (chapter 3 explains why). Both networks discretise one smooth draw (the coarser takes every 4th layer)."""
    fine = models.ResNet(models.Perceptron(3, 8), 64, init="smooth", method=method, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(0))
    x = torch.randn(20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    errors = []
    for depth in (16, 64):
        net = models.ResNet(models.Perceptron(3, 8), depth, init="zero", method=method, dtype=torch.float64)
        with torch.no_grad():
            for w, reference in zip(net.weights, fine.weights):
                w.copy_(reference[:: 64 // depth][: len(w)])
        parameters = list(net.parameters())
        exact_loss, exact = loss_and_grads(net, x)
        net.backward = "checkpoint"
        loss, grads = loss_and_grads(net, x)
        assert torch.equal(loss, exact_loss) and all(torch.allclose(a, b, rtol=1e-12, atol=1e-15) for a, b in zip(grads, exact))
        net.backward = "adjoint"
        loss, grads = loss_and_grads(net, x)
        assert torch.equal(loss, exact_loss) and list(net.parameters()) == parameters  # switched in place
        flat = lambda gs: torch.cat([g.flatten() for g in gs])
        errors.append(((flat(grads) - flat(exact)).norm() / flat(exact).norm()).item())
        assert errors[-1] == pytest.approx(adjoint.gradient_errors(lambda n: n(x).square().sum(), net)["(all)"], rel=1e-9)
    slope = math.log(errors[1] / errors[0]) / math.log(4)
    assert (abs(slope + 1) < 0.15 if method == "euler" else slope < -2.5), (errors, slope)


def test_module_blocks_untied_tied_and_shared():
    block = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4))
    iid = models.ResNet(block, 6, init="iid")
    weights = [b[0].weight for b in iid.blocks]
    assert len(iid.blocks) == 6 and not torch.equal(weights[0], weights[1])  # drawn afresh per layer
    tied = models.ResNet(block, 6, init="tied", method="heun")
    assert len(tied.blocks) == 7 and all(torch.equal(b[0].weight, block[0].weight) for b in tied.blocks)
    assert len({id(p) for p in tied.parameters()}) == 7 * 4  # separate parameters that start equal
    shared = models.ResNet(block, 6, tied=True)
    assert len(list(shared.parameters())) == 4 and shared.blocks[0] is shared.blocks[5] is block
    built = models.ResNet(lambda: nn.Linear(4, 4), 5, scaling="1")
    assert len({id(b) for b in built.blocks}) == 5 and built.step == 1.0
    x = torch.randn(10, 4)
    expected = x
    for b in iid.blocks:
        expected = expected + b(expected) / 6
    torch.testing.assert_close(iid(x), expected)
    assert iid(x, trajectory=True).shape == (7, 10, 4)
    text = repr(shared)
    assert "depth=6" in text and "method='euler'" in text and "backward='backprop'" in text and "tied" in text


def test_module_blocks_with_the_adjoint_keep_constant_memory_and_the_gradients_of_backprop():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    x = torch.randn(32, 4, dtype=torch.float64)
    memory = {}
    for depth in (32, 128):
        net = models.ResNet(block, depth, backward="adjoint")
        memory[depth] = adjoint.saved_tensor_bytes(lambda: net(x).sum())
        error = adjoint.gradient_errors(lambda n: n(x).square().sum(), net)["(all)"]
        assert error < 2.0 / depth
    assert memory[32] == memory[128]


def test_front_door_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="reset_parameters"):
        class Scale(nn.Module):
            def __init__(self):
                super().__init__()
                self.a = nn.Parameter(torch.ones(3))

            def forward(self, h):
                return self.a * h
        models.ResNet(Scale(), 4, init="iid")
    with pytest.raises(ValueError, match="fused"):
        models.ResNet(models.Perceptron(2, 3), 4, fused=True, backward="adjoint")
    net = models.ResNet(models.Perceptron(2, 3), 4, fused=True)
    with pytest.raises(ValueError, match="fused"):
        net.backward = "adjoint"
    with pytest.raises(TypeError, match="nn.Module"):
        models.ResNet(42, 4)
    with pytest.raises(ValueError, match="init"):
        models.ResNet(nn.Linear(2, 2), 4, init="smooth")
