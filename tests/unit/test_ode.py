"""Interpolating neural ODEs and Prop. 1 of Sander, Ablin, Peyré (2022)."""

import math

import pytest
import torch

from resnode import init, models, ode


constant = models.StateFree(3)  # f(x, theta) = theta
square = models.StateFree(1, power=2)  # f(x, theta) = theta^2, the weight-interpolation counterexample


@pytest.mark.parametrize("mode", ode.INTERPOLATIONS)
def test_interpolation_matches_the_resnet_at_the_knots(mode):
    res = models.Perceptron(dim=3, width=6)
    weights = init.init_weights("iid", 9, res.shapes, dtype=torch.float64)
    field = ode.InterpolatedField(res, weights, mode)
    x = torch.randn(5, 3, dtype=torch.float64)
    for n in range(9):
        expected = res(x, *(w[n] for w in weights))
        torch.testing.assert_close(field(torch.tensor(n / 8, dtype=torch.float64), x), expected)
    # The vectorised path (one time per leading row) agrees with the scalar one.
    times = torch.rand(4, dtype=torch.float64)
    xs = torch.randn(4, 5, 3, dtype=torch.float64)
    batched = field(times, xs)
    for i in range(4):
        torch.testing.assert_close(batched[i], field(times[i].clone(), xs[i]))


def test_weight_and_residual_interpolation_differ_between_knots():
    res = models.Perceptron(dim=2, width=4)
    weights = init.init_weights("iid", 3, res.shapes, dtype=torch.float64)
    x = torch.randn(3, 2, dtype=torch.float64)
    s = torch.tensor(0.25, dtype=torch.float64)
    a = ode.InterpolatedField(res, weights, "weights")(s, x)
    b = ode.InterpolatedField(res, weights, "residuals")(s, x)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("depth", [4, 16, 100])
def test_bound_is_tight_on_an_affine_field(depth):
    """phi(x, s) = a s + b: the error is exactly ||a|| / (2N) and so is the bound (L = 0, C_N = ||a||)."""
    a = torch.tensor([0.6, -0.8, 1.2], dtype=torch.float64)
    b = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    thetas = (b + a * (torch.arange(depth + 1, dtype=torch.float64) / depth)[:, None],)
    out = ode.consistency(constant, thetas, torch.zeros(1, 3, dtype=torch.float64), "weights", substeps=2)
    exact = a.norm() / (2 * depth)
    torch.testing.assert_close(out["error"][0], exact)
    torch.testing.assert_close(out["curvature"][0], a.norm())
    torch.testing.assert_close(out["bound"][0], exact)


@pytest.mark.parametrize("depth", [8, 64])
def test_counterexamples_do_not_vanish_with_depth(depth):
    x0 = torch.zeros(1, 1, dtype=torch.float64)
    growing = (torch.arange(depth + 1, dtype=torch.float64)[:, None],)  # f(x, theta_n) = n
    out = ode.consistency(models.StateFree(1), growing, x0, "residuals", substeps=2)
    assert out["error"].item() == pytest.approx(0.5, abs=1e-10)
    alternating = ((-1.0) ** torch.arange(depth + 1, dtype=torch.float64)[:, None],)
    out = ode.consistency(square, alternating, x0, "weights", substeps=2)
    assert out["error"].item() == pytest.approx(2 / 3, abs=1e-10)


@pytest.mark.parametrize("seed", [0, 22])
def test_second_derivative_against_finite_differences(seed):
    gen = torch.Generator().manual_seed(seed)
    res = models.Perceptron(dim=2, width=5)
    weights = init.init_weights("smooth", 5, res.shapes, lengthscale=0.3, dtype=torch.float64, generator=gen)
    field = ode.InterpolatedField(res, weights, "weights")
    x0 = torch.randn(1, 2, dtype=torch.float64, generator=gen)
    grid, states = ode.solve(field, x0, 4, substeps=512)
    i = 700  # an interior point, away from the knots at multiples of 512
    h = grid[1] - grid[0]
    velocity = lambda j: field(grid[j], states[j])
    central = lambda k: (velocity(i + k) - velocity(i - k)) / (2 * k * h)
    fd = (4 * central(1) - central(2)) / 3  # Richardson: error O(h^4) instead of O(h^2)
    jvp = ode.second_derivative(field, grid[i:i + 1], states[i:i + 1])[0]
    torch.testing.assert_close(jvp, fd, atol=1e-8, rtol=1e-7)


def test_solve_against_a_closed_form():
    field = lambda s, x: -2 * s * x  # x(s) = x0 exp(-s^2)
    x0 = torch.tensor([1.0, 3.0], dtype=torch.float64)
    errors = [(ode.solve(field, x0, 10, substeps=k)[1][-1] - x0 * math.exp(-1.0)).norm().item() for k in (4, 8, 16)]
    assert errors[-1] < 1e-9
    assert errors[0] / errors[1] == pytest.approx(16, rel=0.1)  # fourth order
    assert errors[1] / errors[2] == pytest.approx(16, rel=0.1)


def test_bound_holds_for_a_random_resnet():
    res = models.Perceptron(dim=3, width=8)
    g = torch.Generator().manual_seed(3)
    for kind in ("smooth", "iid"):
        weights = init.init_weights(kind, 33, res.shapes, lengthscale=0.2, generator=g, dtype=torch.float64)
        for mode in ode.INTERPOLATIONS:
            out = ode.consistency(res, weights, torch.randn(10, 3, generator=g, dtype=torch.float64), mode)
            assert (out["error"] <= out["bound"]).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        ode.InterpolatedField(constant, (torch.zeros(3, 1),), "splines")
    with pytest.raises(ValueError, match="knots"):
        ode.InterpolatedField(constant, (torch.zeros(1, 1),))
    with pytest.raises(ValueError, match="depth"):
        ode.euler_bound(1.0, 1.0, 0)
    with pytest.raises(ValueError, match="depth"):
        ode.solve(lambda s, x: x, torch.zeros(1), -2)


@pytest.mark.parametrize("mode", ode.INTERPOLATIONS)
def test_solve_of_an_interpolated_field_is_torchdiffeqs_rk4(mode):
    # solve() integrates an InterpolatedField itself; it must be the same 3/8-rule scheme as torchdiffeq's rk4.
    from torchdiffeq import odeint

    gen = torch.Generator().manual_seed(1)
    res = models.Perceptron(dim=3, width=6, activation="gelu", bias=True)
    weights = init.init_weights("iid", 261, [(2,) + s for s in res.shapes], dtype=torch.float64, generator=gen)
    field = ode.InterpolatedField(res, weights, mode)
    x0 = torch.randn(2, 5, 3, dtype=torch.float64, generator=gen)
    grid, states = ode.solve(field, x0, 260, substeps=2)  # more intervals than one chunk of interpolated stages
    assert states.shape == (521, 2, 5, 3)
    torch.testing.assert_close(states, odeint(field, x0, grid, method="rk4"), atol=1e-13, rtol=1e-12)
