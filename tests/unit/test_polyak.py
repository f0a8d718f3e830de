"""PL conditions on losses with known constants: Polyak's rate, the exp obstruction, local PL, localisation."""

import math

import pytest
import torch

from resnode import polyak



@pytest.fixture(autouse=True)
def float64_by_default():
    """These tests compare against closed forms in double precision; other test files keep float32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_least_squares_is_pl_without_strong_convexity_and_descends_at_polyaks_rate():
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(5, 12, generator=gen), torch.randn(5, generator=gen)
    m, beta = polyak.least_squares_constants(X)
    loss = lambda th: (X @ th - y).square().sum()
    assert torch.linalg.eigvalsh(2 * X.T @ X)[0] < 1e-10  # Hessian singular: not strongly convex
    for theta in torch.randn(20, 12, generator=gen):
        assert polyak.pl_ratio(loss, theta) >= m * (1 - 1e-10)
    _, losses = polyak.descend(loss, torch.zeros(12), 1 / beta, 200)
    bound = polyak.polyak_bound(losses[0].item(), m, beta, 200)
    assert (losses <= bound * (1 + 1e-9)).all()
    assert losses[-1] < 1e-3 * losses[0]


def test_polyak_bound_holds_for_a_nonconvex_pl_loss():
    loss = lambda x: (x.square() + 3 * torch.sin(x).square()).sum()
    grid = torch.linspace(-30, 30, 200001)
    grid = grid[grid != 0]
    m = ((2 * grid + 3 * torch.sin(2 * grid)).square() / (grid.square() + 3 * torch.sin(grid).square())).min().item()
    assert 0.3 < m < 0.4  # inf of f'^2 / f, attained near |x| = 2.2
    _, losses = polyak.descend(loss, torch.tensor([3.0]), 1 / 8, 300)  # |f''| = |2 + 6 cos 2x| <= 8
    assert (losses <= polyak.polyak_bound(losses[0].item(), m, 8.0, 300) * (1 + 1e-9)).all()


def test_matrix_descent_on_the_exp_loss_moves_each_eigenvalue_by_complex_descent():
    gen = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen))
    block = torch.zeros(4, 4)
    block[:2, :2] = torch.tensor([[0.2, -0.7], [0.7, 0.2]])  # eigenvalues 0.2 +- 0.7i
    block[2, 2], block[3, 3] = 0.3, -0.4
    thetas, losses = polyak.descend(polyak.exp_loss, Q @ block @ Q.T, 0.05, 60)
    zs = polyak.complex_descent(torch.tensor([0.2 + 0.7j, 0.2 - 0.7j, 0.3 + 0j, -0.4 + 0j]), 0.05, 60)
    key = lambda z: torch.sort(z.real * 10 + z.imag).values
    eig = torch.linalg.eigvals(thetas[-1])
    assert torch.allclose(key(eig), key(zs[-1]), atol=1e-9)
    assert torch.allclose(losses[-1], (torch.exp(zs[-1]) + 1).abs().square().sum(), atol=1e-9)


def test_a_real_start_stalls_while_an_off_axis_start_converges():
    zs = polyak.complex_descent(torch.tensor([0.0 + 0j, 0.0 + 0.5j]), 0.05, 3000)
    loss = (torch.exp(zs) + 1).abs().square()
    assert zs[-1, 0].real < -3 and zs[-1, 0].imag == 0 and loss[-1, 0] > 0.95
    assert loss[-1, 1] < 1e-12 and abs(zs[-1, 1].imag - math.pi) < 1e-5


def test_local_pl_constants_are_attained_on_the_sphere():
    loss = polyak.rotation_loss(math.pi)
    for R in (0.3, 1.0, 2.0):
        angles = torch.linspace(0, 2 * math.pi, 721)[:-1] + 1e-3
        ratios = polyak.pl_ratios(loss, R * torch.stack([torch.cos(angles), torch.sin(angles)], 1))
        assert ratios[5] == pytest.approx(polyak.pl_ratio(loss, R * torch.stack([torch.cos(angles[5]), torch.sin(angles[5])])))
        m, M = polyak.local_pl_constants(R)
        assert ratios.min() == pytest.approx(m, rel=1e-4) and ratios.max() == pytest.approx(M, rel=1e-4)


def test_local_smoothness_bounds_the_hessian_on_the_ball():
    loss = polyak.rotation_loss(0.4)
    gen = torch.Generator().manual_seed(2)
    for R in (0.5, 1.5):
        points = torch.randn(50, 2, generator=gen)
        points = R * points / points.norm(dim=1, keepdim=True) * torch.rand(50, 1, generator=gen)
        norms = [torch.linalg.matrix_norm(torch.autograd.functional.hessian(loss, p), 2) for p in points]
        assert max(norms) <= polyak.local_smoothness(R)


def test_liu_zhu_belkin_localisation_when_the_condition_holds():
    angle = 0.1
    loss = polyak.rotation_loss(angle)
    f0 = loss(torch.zeros(2)).item()
    R = 1 / 3
    assert polyak.localisation_margin(f0, 0.0, R) > 0
    m, _ = polyak.local_pl_constants(R)
    beta = polyak.local_smoothness(R)
    thetas, losses = polyak.descend(loss, torch.zeros(2), 1 / beta, 400)
    assert thetas.norm(dim=1).max() <= R
    assert (losses <= polyak.polyak_bound(f0, m, beta, 400) * (1 + 1e-9)).all()


@pytest.mark.parametrize("call", [
    lambda: polyak.descend(lambda t: t.sum(), torch.zeros(1), -1.0, 3),
    lambda: polyak.descend(lambda t: t.sum(), torch.zeros(1), 0.1, 0),
    lambda: polyak.polyak_bound(1.0, 3.0, 1.0, 5),
    lambda: polyak.exp_loss(torch.zeros(2, 3)),
    lambda: polyak.pl_ratios(lambda t: t.sum(), torch.ones(3, 2)),
    lambda: polyak.local_pl_constants(-1.0),
    lambda: polyak.localisation_margin(1.0, 0.0, 0.0),
    lambda: polyak.least_squares_constants(torch.zeros(3)),
])
def test_bad_arguments_raise(call):
    with pytest.raises(ValueError):
        call()
