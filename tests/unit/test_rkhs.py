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
    with pytest.raises(FloatingPointError, match="before any step"):  # NaN targets: the data's fault, not lr's
        rkhs.gradient_descent(f, x0, b, y * float("nan"), steps=4, iterations=2, lr=0.5)
    with pytest.raises(FloatingPointError, match="diverges; lower the learning rate lr=10000"):
        rkhs.gradient_descent(f, x0, b, y, steps=4, iterations=30, lr=1e4)


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


def test_kernel_cap_and_the_features_that_carry_it():
    x0 = rkhs.random_separated(6, 0.8, 2, seed=3)
    b = torch.eye(1, 2, dtype=torch.float64)
    radii = np.geomspace(1e-4, 1.0, 400)
    cap, radius, lam0 = rkhs.kernel_ball_cap(x0, nu=NU, b=b, radii=radii)
    lip = math.sqrt(rkhs.spectral_moments(NU)[0])
    assert lam0 == pytest.approx(rkhs.min_eigenvalue(rkhs.matern_matrix(x0, None, NU)))
    m, M = rkhs.ball_pl_bounds(radii, lam0=lam0, n=6, lip=lip, b=b)
    assert (cap, radius) == rkhs.localisation_cap(radii, m, M)
    # (sqrt(lam0) - sqrt(N) lip R)^4 R^2 is largest at R = sqrt(lam0) / (3 sqrt(N) lip); (1 - lip R)^4 e^{-2 lip R} moves it a little
    assert radius == pytest.approx(math.sqrt(lam0) / (3 * math.sqrt(6) * lip), rel=0.1)
    # many features: the model's own cap at that radius tends to the kernel's
    wide = rkhs.FourierFeatures.matern(200_000, 2, NU, seed=1)
    assert rkhs.features_cap(wide, x0, radius=radius, b=b) == pytest.approx(cap, rel=0.1)
    assert rkhs.features_cap(wide, x0, radius=radius, b=b, lip=lip) == pytest.approx(cap, rel=0.05)
    # the proposition's count: fewer than N/2 features give a singular kernel matrix (2p < N columns), so no draw passes
    few = rkhs.feature_count(x0, nu=NU, b=b, ps=[1, 2], draws=3, radii=radii)
    assert few.fraction == [0.0, 0.0] == few.fraction_lambda and few.p_star == math.inf == few.p_star_lambda
    count = rkhs.feature_count(x0, nu=NU, b=b, ps=[2 ** k for k in range(2, 17)], draws=4, seed=2, radii=radii)
    assert count.cap == cap and count.radius == radius and count.fraction[-2:] == [1.0, 1.0]
    assert count.p_star_lambda <= count.p_star < math.inf  # the Lipschitz constant converges too
    i = count.ps.index(count.p_star)
    assert count.fraction[i] == 1 and (i == 0 or count.fraction[i - 1] < 1 or count.fraction[i - 2] < 1)
    with pytest.raises(ValueError, match="ps"):
        rkhs.feature_count(x0, nu=NU, b=b, ps=[], draws=2)


def test_increasing_fit_floor_is_isotonic_regression():
    x = np.linspace(-1.5, 1.5, 8)
    assert rkhs.increasing_fit_floor(x, -x) == pytest.approx(np.var(x))  # y = -x: the best increasing map is the mean
    assert rkhs.increasing_fit_floor(x, x**3) == 0  # an increasing target is fitted exactly
    gen = np.random.default_rng(0)
    for _ in range(20):  # against brute force: the best nondecreasing fit of 5 points over a fine grid of values
        xs, ys = gen.permutation(5).astype(float), gen.normal(size=5)
        floor = rkhs.increasing_fit_floor(xs, ys)
        from sklearn.isotonic import IsotonicRegression
        fit = IsotonicRegression().fit_transform(xs, ys)
        assert floor == pytest.approx(np.mean((fit - ys) ** 2), abs=1e-12)
        levels = np.sort(gen.uniform(-3, 3, size=(2000, 5)), axis=1)  # random nondecreasing fits are never better
        assert (((levels - ys[np.argsort(xs)]) ** 2).mean(axis=1) >= floor - 1e-12).all()
    with pytest.raises(ValueError, match="distinct"):
        rkhs.increasing_fit_floor([0.0, 0.0], [1.0, 2.0])


def test_keeps_order():
    states = torch.tensor([[0.0, 1.0, 2.0], [0.1, 1.5, 1.6], [0.0, 3.0, 4.0]], dtype=torch.float64)[..., None]
    assert rkhs.keeps_order(states)
    states[1, 2, 0] = 1.4  # the last two points cross at the middle step
    assert not rkhs.keeps_order(states)
    with pytest.raises(ValueError, match="states"):
        rkhs.keeps_order(torch.zeros(3, 4, 2))


def test_relu_features_are_lipschitz_but_not_twice_differentiable():
    relu = rkhs.ReLUFeatures.gaussian(50, 3, seed=1)
    gen = torch.Generator().manual_seed(2)
    x0, u = torch.randn(3, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64)
    u /= u.norm()
    kinks = relu.kinks(x0, u)
    assert torch.diag(relu.weight @ (x0[:, None] + kinks[None] * u[:, None])).abs().max() < 1e-12  # feature j vanishes at s_j
    for _ in range(5):  # |D phi(x)| <= lipschitz() everywhere
        x = torch.randn(3, generator=gen, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(lambda z: relu(z[None])[0], x)
        assert torch.linalg.matrix_norm(jac, ord=2).item() <= relu.lipschitz() + 1e-12
    # centred at a kink, the second difference of v = theta . phi is |theta_j| |w_j . u| h / sqrt(p): q2 ~ 1/h
    theta = torch.randn(1, 50, generator=gen, dtype=torch.float64)
    j = int(torch.argmin(kinks.abs()))
    gaps = (kinks - kinks[j]).abs()
    gaps[j] = float("inf")
    hs = np.array([1e-3, 1e-4, 1e-5]) * min(1.0, gaps.min().item())
    q1, q2 = rkhs.difference_quotients(lambda z: relu(z) @ theta.T, x0, u, kinks[j:j + 1], hs)
    exact = theta[0, j].abs().item() * abs((relu.weight[j] @ u).item()) / math.sqrt(50)
    np.testing.assert_allclose(q2 * hs, exact, rtol=1e-6)
    assert (q1 <= relu.lipschitz() * theta.norm().item() + 1e-12).all()


def test_difference_quotients_of_smooth_fields():
    gen = torch.Generator().manual_seed(3)
    a, e = torch.randn(4, generator=gen, dtype=torch.float64), torch.randn(2, generator=gen, dtype=torch.float64)
    x0, u = torch.randn(4, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)
    u /= u.norm()
    quadratic = lambda z: (z @ a)[:, None] ** 2 * e[None]  # noqa: E731  D^2 v[u, u] = 2 (a.u)^2 e, constant
    q1, q2 = rkhs.difference_quotients(quadratic, x0, u, np.linspace(-1, 1, 11), [1e-1, 1e-2])
    np.testing.assert_allclose(q2, 2 * (a @ u).item() ** 2 * e.norm().item(), rtol=1e-6)
    # Fourier features: q2 stays under sup |D^2 phi| |Theta| and settles as h -> 0 (Condition 1)
    f = rkhs.FourierFeatures.matern(300, 4, NU, seed=4)
    theta = torch.randn(2, f.width, generator=gen, dtype=torch.float64)
    theta /= theta.norm()
    q1, q2 = rkhs.difference_quotients(lambda z: f(z) @ theta.T, x0, u, np.linspace(-1, 1, 201), [1e-2, 1e-3, 1e-4])
    assert (q2 <= f.regularity()[2] + 1e-9).all() and (q1 <= f.lipschitz() + 1e-9).all()
    assert q2[-1] == pytest.approx(q2[-2], rel=1e-3)
    with pytest.raises(ValueError, match="hs"):
        rkhs.difference_quotients(quadratic, x0, u, [0.0], [0.0])
