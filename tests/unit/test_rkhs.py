"""RKHS neural ODEs: the Matérn kernel and its random features, kappa, lambda(delta), the H-gradient, the PL bounds."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from resnode import metrics, rkhs

NU = 3.0


def test_matern_closed_form_is_the_fourier_transform_of_the_spectrum():
    # d = 1: k(r) = int cos(w r) rho(w) dw with rho ∝ (1 + w^2/nu)^{-(1/2 + nu)}, normalised
    rho = lambda w: (1 + w**2 / NU) ** (-(0.5 + NU))  # noqa: E731
    mass = integrate.quad(rho, -np.inf, np.inf)[0]
    for r in (0.0, 0.3, 1.0, 2.5):
        quad = integrate.quad(lambda w: np.cos(w * r) * rho(w), -np.inf, np.inf, limit=200)[0] / mass
        assert rkhs.matern(r, NU) == pytest.approx(quad, abs=1e-7)
    # d = 3: the Monte Carlo mean of cos(w.h) over the sampler
    w = rkhs.sample_spectrum(200_000, 3, NU, torch.Generator().manual_seed(0))
    for r in (0.5, 1.0, 2.0):
        mc = torch.cos(w @ torch.tensor([0.0, r, 0.0], dtype=torch.float64)).mean().item()
        assert mc == pytest.approx(float(rkhs.matern(r, NU)), abs=5 / math.sqrt(200_000))
    assert rkhs.matern(0.0, NU) == 1.0 and 0 < rkhs.matern(5.0, NU) < rkhs.matern(1.0, NU)


def test_sampler_moments():
    gen = torch.Generator().manual_seed(1)
    w = rkhs.sample_spectrum(400_000, 2, NU, gen)
    assert (w[:, 0] ** 2).mean().item() == pytest.approx(rkhs.spectral_moments(NU)[0], rel=0.03)
    nu = 6.0  # the empirical fourth moment needs E w^8 < inf (nu > 4) to concentrate
    w = rkhs.sample_spectrum(400_000, 2, nu, gen)
    m2, m4 = rkhs.spectral_moments(nu)
    assert m2 == pytest.approx(nu / (2 * (nu - 1))) and m4 == pytest.approx(3 * nu**2 / (4 * (nu - 1) * (nu - 2)))
    assert (w[:, 1] ** 2).mean().item() == pytest.approx(m2, rel=0.02)
    assert (w[:, 1] ** 4).mean().item() == pytest.approx(m4, rel=0.05)
    g = rkhs._gamma(200_000, 0.7, torch.Generator().manual_seed(2), torch.float64)  # the shape < 1 branch
    assert g.mean().item() == pytest.approx(0.7, rel=0.02) and g.var().item() == pytest.approx(0.7, rel=0.04)


def test_random_features_converge_like_one_over_sqrt_p():
    x = torch.randn(30, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = rkhs.matern_matrix(x, None, NU)
    ps = [100, 400, 1600, 6400]
    errors = [np.mean([(rkhs.FourierFeatures.matern(p, 3, NU, seed=s).kernel(x) - exact).abs().max().item()
                       for s in range(6)]) for p in ps]
    assert metrics.loglog_slope(ps, errors) == pytest.approx(-0.5, abs=0.12)
    f = rkhs.FourierFeatures.matern(50, 3, NU)
    torch.testing.assert_close(torch.diag(f.kernel(x)), torch.ones(30, dtype=torch.float64))


def test_kappa_bounds():
    assert rkhs.kappa_slide_bound(NU) == pytest.approx(1 + math.sqrt(NU / (NU - 1)) + math.sqrt(3 * NU**2 / ((NU - 1) * (NU - 2))))
    assert rkhs.kappa_slide_bound(NU) == pytest.approx(rkhs.kappa_moment_bound(NU, scale2=1.0))
    assert rkhs.kappa_moment_bound(NU) < rkhs.kappa_slide_bound(NU)
    for bad in (2.0, 1.5, -1.0, float("nan")):
        with pytest.raises(ValueError, match="nu"):
            rkhs.kappa_slide_bound(bad)
    with pytest.raises(ValueError, match="nu"):
        rkhs.matern(1.0, 0.0)


def test_regularity_pieces_bound_v_and_converge_to_the_moments():
    nu = 6.0
    f = rkhs.FourierFeatures.matern(40_000, 2, nu, seed=4)
    one, lip, curv = f.regularity(restarts=8, iterations=50)
    m2, m4 = rkhs.spectral_moments(nu)
    assert one == 1 and lip == pytest.approx(math.sqrt(m2), rel=0.03) and curv == pytest.approx(math.sqrt(m4), rel=0.08)
    # d = 1: the max over unit h of mean (w.h)^4 is mean w^4 itself
    g = rkhs.FourierFeatures.matern(500, 1, NU, seed=5)
    assert g.regularity()[2] == pytest.approx(math.sqrt((g.omega**4).mean().item()))
    # |v(x)| + |Dv(x)| + |D^2 v(x)| <= kappa_p |Theta|_F for a scalar v = theta.phi
    small = rkhs.FourierFeatures.matern(64, 3, NU, seed=6)
    kappa = small.kappa()
    gen = torch.Generator().manual_seed(7)
    for _ in range(5):
        theta = torch.randn(small.width, generator=gen, dtype=torch.float64)
        x = torch.randn(3, generator=gen, dtype=torch.float64)
        v = lambda z: (small(z[None]) @ theta)[0]  # noqa: E731
        dv = torch.autograd.functional.jacobian(v, x)
        d2v = torch.autograd.functional.hessian(v, x)
        total = v(x).abs() + dv.norm() + torch.linalg.matrix_norm(d2v, ord=2)
        assert total.item() <= kappa * theta.norm().item() + 1e-12
        # each sup is attained along theta = the feature direction: |D phi(x)| does not depend on x
        jac = torch.autograd.functional.jacobian(lambda z: small(z[None])[0], x)
        assert torch.linalg.matrix_norm(jac, ord=2).item() == pytest.approx(small.regularity()[1])


def test_lambda_delta_configurations():
    lam = [rkhs.min_eigenvalue(rkhs.matern_matrix(rkhs.line_points(n, 0.4, 2), None, NU)) for n in (2, 4, 8, 16)]
    assert all(a >= b for a, b in zip(lam, lam[1:])) and lam[-1] > 0  # nested sets: Cauchy interlacing
    deltas = np.array([0.05, 0.08, 0.12, 0.2])
    lam = [rkhs.min_eigenvalue(rkhs.matern_matrix(rkhs.line_points(20, d), None, NU)) for d in deltas]
    assert metrics.loglog_slope(deltas, lam) == pytest.approx(2 * NU, abs=0.5)  # lambda ~ delta^{2 nu}
    x = rkhs.random_separated(30, 0.5, 3, seed=1)
    assert x.shape == (30, 3) and rkhs.separation(x) >= 0.5
    assert rkhs.grid_points(3, 0.5, 2).shape == (9, 2) and rkhs.separation(rkhs.grid_points(3, 0.5, 2)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="delta"):
        rkhs.line_points(3, 0.0)
    with pytest.raises(ValueError, match="x must be"):
        rkhs.separation(torch.zeros(1, 2))


def _problem(seed=0, n=9, d=3, copies=2, p=40, steps=5, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    a, b = rkhs.lifting(d, copies)
    f = rkhs.FourierFeatures.matern(p, d * copies, NU, seed=seed)
    x0 = torch.randn(n, d, generator=gen, dtype=torch.float64) @ a.T
    y = torch.randn(n, d, generator=gen, dtype=torch.float64)
    theta = scale * torch.randn(steps, d * copies, f.width, generator=gen, dtype=torch.float64)
    return f, x0, b, y, theta


def test_lifting():
    a, b = rkhs.lifting(3, 4)
    assert a.shape == (12, 3) and b.shape == (3, 12)
    torch.testing.assert_close(torch.linalg.svdvals(a), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(b @ a, torch.eye(3, dtype=torch.float64) / 2)
    with pytest.raises(ValueError, match="copies"):
        rkhs.lifting(3, 0)


def test_gradient_against_autograd_and_the_kernel_formula():
    f, x0, b, y, theta = _problem()
    ev = rkhs.evaluate(theta, f, x0, b, y)
    t = theta.clone().requires_grad_()
    xs = rkhs.flow(t, f, x0)
    loss = ((xs[-1] @ b.T - y) ** 2).sum() / len(y)
    loss.backward()
    assert ev.loss == pytest.approx(loss.item())
    torch.testing.assert_close(ev.grad, t.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ev.states, xs.detach())
    steps, n = theta.shape[0], len(y)
    # |grad_H F|^2 = T sum |dF/dTheta_t|^2 = (4/(N^2 T)) sum_t sum_ij k(x_i^t, x_j^t) p_i^{t+1}.p_j^{t+1}
    kernel_form = sum((f.kernel(ev.states[s]) * (ev.adjoints[s + 1] @ ev.adjoints[s + 1].T)).sum().item()
                      for s in range(steps)) * 4 / (n**2 * steps)
    assert ev.h_grad_norm2 == pytest.approx(kernel_form, rel=1e-10)
    # H-gradient: a step -tau T dF/dTheta decreases F by about tau |grad_H F|^2
    tau = 1e-6
    assert rkhs.evaluate(theta - tau * steps * ev.grad, f, x0, b, y).loss == pytest.approx(
        ev.loss - tau * ev.h_grad_norm2, rel=1e-9)


def test_pl_bounds_hold_at_random_points():
    for seed in range(6):
        f, x0, b, y, theta = _problem(seed=seed, scale=0.5 * seed)
        lip = f.regularity()[1]
        check = rkhs.pl_check(theta, f, x0, b, y, lip=lip, kappa=f.kappa())
        assert check.lower <= check.ratio <= check.upper
        assert check.upper <= check.upper_slide * (1 + 1e-12)  # prod (1 + a_t) <= e^{sum a_t} <= e^{kappa R}
        assert check.min_separation >= check.separation_bound * (1 - 1e-12)
        assert check.min_lambda > 0 and check.radius == pytest.approx(rkhs.h_norm(theta))


def test_gradient_descent_from_zero_decreases_the_loss():
    f, x0, b, y, _ = _problem(n=6, p=100)
    seen = []
    theta, hist = rkhs.gradient_descent(f, x0, b, y, steps=4, iterations=30, lr=0.5, record_every=10,
                                        on_record=lambda k, th: seen.append(k))
    assert seen == [0, 10, 20, 30] and hist["radius"][0] == 0
    assert np.all(np.diff(hist["loss"]) < 0) and hist["loss"][-1] < 0.5 * hist["loss"][0]
    with pytest.raises(FloatingPointError, match="lr"):
        rkhs.gradient_descent(f, x0, b, y * float("nan"), steps=4, iterations=2, lr=0.5)


def test_bad_arguments():
    f = rkhs.FourierFeatures.matern(10, 3, NU)
    with pytest.raises(ValueError, match="omega"):
        rkhs.FourierFeatures(torch.zeros(3))
    with pytest.raises(ValueError, match="x must be"):
        f(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="theta"):
        rkhs.flow(torch.zeros(2, 3, 10), f, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="p must"):
        rkhs.sample_spectrum(0, 2, NU)
    with pytest.raises(ValueError, match="b must"):
        rkhs.evaluate(torch.zeros(2, 3, 20), f, torch.zeros(4, 3), torch.zeros(3, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="lr"):
        rkhs.gradient_descent(f, torch.zeros(4, 3), torch.eye(3), torch.zeros(4, 3), steps=2, iterations=1, lr=0.0)


def test_ball_bounds_hold_everywhere_in_the_ball():
    f, x0, b, _, _ = _problem(seed=1, scale=0.0)
    lip = f.regularity()[1]
    lam0 = rkhs.min_eigenvalue(f.kernel(x0))
    n = len(x0)
    m0, M0 = rkhs.ball_pl_bounds(0.0, lam0=lam0, n=n, lip=lip, b=b)
    smin, smax = torch.linalg.svdvals(b)[[-1, 0]].tolist()
    assert m0 == pytest.approx(4 / n * smin**2 * lam0) and M0 == pytest.approx(4 * smax**2)
    edge = math.sqrt(lam0) / (math.sqrt(n) * lip)  # where the certified lambda bound reaches 0
    gen = torch.Generator().manual_seed(5)
    for fraction in (0.1, 0.5, 0.9):
        R = fraction * edge
        m, M = rkhs.ball_pl_bounds(R, lam0=lam0, n=n, lip=lip, b=b)
        assert 0 < m < m0 and M > M0
        for _ in range(4):  # random fields on the sphere |v|_H = R, random targets: m(R) <= |grad|^2 / F <= M(R)
            theta = torch.randn(3, f.dim, f.width, generator=gen, dtype=torch.float64)
            theta *= R / rkhs.h_norm(theta)
            y = torch.randn(n, b.shape[0], generator=gen, dtype=torch.float64)
            ev = rkhs.evaluate(theta, f, x0, b, y)
            assert m <= ev.h_grad_norm2 / ev.loss <= M
    assert rkhs.ball_pl_bounds(2 * edge, lam0=lam0, n=n, lip=lip, b=b)[0] == 0  # beyond: no certificate
    with pytest.raises(ValueError, match="radius"):
        rkhs.ball_pl_bounds(-1.0, lam0=lam0, n=n, lip=lip, b=b)


def test_slide_bounds_and_the_localisation_cap():
    b = torch.eye(2, 4, dtype=torch.float64)
    radii = np.linspace(0.0, 2.0, 201)
    m, M = rkhs.slide_pl_bounds(radii, n=5, kappa=1.5, delta=0.3, lam_hat=lambda s: s**2, b=b)
    np.testing.assert_allclose(m, 4 / 5 * (0.3 * np.exp(-1.5 * radii)) ** 2 * np.exp(-3 * radii), rtol=1e-12)
    np.testing.assert_allclose(M, 4 * np.exp(3 * radii), rtol=1e-12)
    # m^2 R^2 / M = c R^2 e^{-15 R}: maximal at R = 2/15
    cap, best = rkhs.localisation_cap(radii, m, M)
    assert best == pytest.approx(2 / 15, abs=0.01)
    assert cap == pytest.approx(((4 / 5 * 0.09) ** 2 / 4) * (2 / 15) ** 2 * math.exp(-2), rel=1e-3)
    with pytest.raises(ValueError, match="same length"):
        rkhs.localisation_cap(radii, m[:-1], M)
