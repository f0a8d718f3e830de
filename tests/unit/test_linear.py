"""Deep linear ResNets (Sander et al. Section 3.2): products, the closed-form gradient, the PL band."""

import math

import pytest
import torch

from resnode import linear


def naive_products(thetas):
    depth, d = thetas.shape[0], thetas.shape[-1]
    factors = [torch.eye(d, dtype=thetas.dtype) + t / depth for t in thetas]
    before, after = [], []
    for n in range(depth):
        b = torch.eye(d, dtype=thetas.dtype)
        for f in factors[:n]:
            b = f @ b
        a = torch.eye(d, dtype=thetas.dtype)
        for f in factors[n + 1:]:
            a = f @ a
        before.append(b)
        after.append(a)
    return after[0] @ factors[0], torch.stack(before), torch.stack(after)


def problem(d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(50, d, generator=g, dtype=torch.float64)
    covariance = x.T @ x / 50
    target = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64)
    return covariance, target, g


@pytest.mark.parametrize("depth", [1, 2, 7, 16])
def test_prefix_and_suffix_products_match_the_loop(depth):
    _, _, g = problem()
    thetas = torch.randn(depth, 3, 3, generator=g, dtype=torch.float64)
    for fast, slow in zip(linear.products(thetas), naive_products(thetas)):
        torch.testing.assert_close(fast, slow)


def test_gradient_matches_autograd():
    covariance, target, g = problem()
    thetas = (0.2 * torch.randn(12, 3, 3, generator=g, dtype=torch.float64)).requires_grad_()
    loss, gradient = linear.loss_and_gradient(thetas, target, covariance)
    (auto,) = torch.autograd.grad(loss, thetas)
    torch.testing.assert_close(gradient, auto)
    # and the loss is the data-space mean squared error when B comes from the data
    total = linear.products(thetas.detach())[0]
    direct = torch.einsum("ij,jk,ik->", total - target, covariance, total - target)
    torch.testing.assert_close(loss.detach(), direct)


def test_pl_band_holds_when_weights_are_below_one_half():
    """For ||theta_n|| <= 1/2: (4/e)(1 - 1/(2N))^... m l <= N^2 ||grad_n||^2 <= 4 e M l, with the exact gradient."""
    covariance, target, g = problem()
    depth = 32
    thetas = torch.randn(depth, 3, 3, generator=g, dtype=torch.float64)
    thetas = 0.5 * thetas / torch.linalg.matrix_norm(thetas, ord=2)[:, None, None]
    eig = torch.linalg.eigvalsh(covariance)
    loss, gradient = linear.loss_and_gradient(thetas, target, covariance)
    scaled = depth**2 * torch.linalg.matrix_norm(gradient).square()
    low = 4 * (1 - 1 / (2 * depth)) ** (2 * depth - 2)
    assert (scaled >= low * eig.min() * loss).all()
    assert (scaled <= 4 * math.e * eig.max() * loss).all()


def test_gradient_flow_decays_at_the_pl_rate_and_keeps_smoothness():
    covariance, _, g = problem()
    shift = 0.005 * torch.randn(3, 3, generator=g, dtype=torch.float64)
    for depth in (16, 64):
        s = (torch.arange(depth, dtype=torch.float64) / depth)[:, None, None]
        thetas = 0.08 * torch.sin(3 * s) * torch.ones(3, 3, dtype=torch.float64)
        target = linear.products(thetas)[0] + shift  # a small initial loss (Assumption 1)
        check = linear.assumption_1(thetas, target, covariance)
        assert check["sqrt_loss"] < check["loss_limit"] and check["max_weight_norm"] <= 0.25
        _, record = linear.gradient_flow(thetas, target, covariance, time=5.0, dt=0.01, record_every=50)
        r = record.as_tensors()
        assert (r["loss"] <= torch.exp(-4 / math.e * check["m"] * r["times"]) * r["loss"][0] * (1 + 1e-6)).all()
        assert r["max_norm"].max() < 0.5 and r["max_increment"].max() < 1.0
        assert r["max_moved"][0] == 0 and r["moved_increment"][0] == 0  # the change made by training starts at 0


def test_gradient_flow_records_the_change_made_by_training():
    # One step from theta(0): theta(dt) - theta(0) = -dt N grad(0), so the recorded change is the gradient's.
    covariance, _, g = problem()
    thetas = 0.1 * torch.randn(8, 3, 3, generator=g, dtype=torch.float64)
    target = torch.eye(3, dtype=torch.float64) + 0.3 * torch.randn(3, 3, generator=g, dtype=torch.float64)
    theta, record = linear.gradient_flow(thetas, target, covariance, time=0.01, dt=0.01)
    _, gradient = linear.loss_and_gradient(thetas, target, covariance)
    change = -0.01 * 8 * gradient
    torch.testing.assert_close(theta - thetas, change)
    spectral = torch.linalg.matrix_norm(change, ord=2)
    assert record.max_moved == [0.0, pytest.approx(spectral.max().item())]
    assert record.moved_increment[1] == pytest.approx(8 * torch.linalg.matrix_norm(change.diff(dim=0), ord=2).max().item())
    # and the weights' own increments are those of theta(dt), not of the change
    assert record.max_increment[1] == pytest.approx(8 * torch.linalg.matrix_norm(theta.diff(dim=0), ord=2).max().item())


def test_depth_function_and_bad_arguments():
    thetas = torch.arange(4, dtype=torch.float64).reshape(4, 1, 1).expand(4, 2, 2)
    s = torch.tensor([0.0, 0.24, 0.25, 0.99, 1.0])
    assert linear.depth_function(thetas, s)[:, 0, 0].tolist() == [0.0, 0.0, 1.0, 3.0, 3.0]
    with pytest.raises(ValueError, match="thetas"):
        linear.products(torch.zeros(3, 2, 3))
    with pytest.raises(ValueError, match="dt"):
        linear.gradient_flow(torch.zeros(3, 2, 2), torch.eye(2), torch.eye(2), time=1.0, dt=-1.0)
