"""The diffusive regime (Cont, Rossier, Xu 2022, Sections 4-5): activation, Brownian paths, limits, Jacobians."""

import math

import pytest
import torch

from resnode import metrics, sde


def test_curved_tanh_satisfies_assumption_1_with_chosen_curvature():
    for c in (0.0, 1.0, -0.5):
        sigma = sde.CurvedTanh(c)
        z = torch.zeros((), dtype=torch.float64, requires_grad=True)
        s = sigma(z)
        (d1,) = torch.autograd.grad(s, z, create_graph=True)
        (d2,) = torch.autograd.grad(d1, z, create_graph=True)
        (d3,) = torch.autograd.grad(d2, z)
        s, d1, d2 = s.detach(), d1.detach(), d2.detach()
        assert float(s) == 0.0 and math.isclose(float(d1), 1.0) and math.isclose(float(d2), c, abs_tol=1e-12)
        assert math.isclose(float(d3), -2.0, abs_tol=1e-12)  # sigma'''(0) = tanh'''(0) = -2 for every c
        x = torch.linspace(-4, 4, 41, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(sigma(x).sum(), x)
        torch.testing.assert_close(sigma.derivative(x.detach()), grad)


def test_coarse_increments_are_sums_of_the_fine_path():
    grid = sde.BrownianGrid.sample(64, 3, 2, generator=torch.Generator().manual_seed(0))
    path = grid.path()
    for L in (1, 4, 16, 64):
        torch.testing.assert_close(grid.coarse(L), path[:: 64 // L].diff(dim=0))
    torch.testing.assert_close(grid.coarse(1)[0], path[-1])
    bm = sde.GridBrownian(grid)
    torch.testing.assert_close(bm(0.25, 0.5), path[32] - path[16])
    with pytest.raises(ValueError, match="depth"):
        grid.coarse(5)
    with pytest.raises(ValueError, match="fine grid"):
        bm(0.0, 0.3)


def test_quadratic_variation_and_diffusion_of_the_noise():
    noise = sde.Noise(3, s_A=0.7, s_b=0.4)
    h = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    dB = torch.randn(200000, noise.channels, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dA, db = noise.split(dB)
    xi = (dA @ h) + db
    torch.testing.assert_close((noise.diffusion(h.expand(5, 3)) @ dB[:5, :, None])[..., 0], xi[:5])
    # q(h) = E[(dW^A h + dW^b)_i^2] / dt with dt = 1 here: Ito's correction term.
    torch.testing.assert_close((xi * xi).mean(0), noise.q(h), rtol=0.02, atol=0)
    jac = torch.autograd.functional.jacobian(noise.q, h)
    torch.testing.assert_close(noise.q_jacobian(h), jac)


def test_product_of_one_plus_increments_converges_to_geometric_brownian_motion_at_rate_one_half():
    # Linear sigma, scalar noise, no drift: h_L = prod(1 + dW_k) -> exp(W_1 - 1/2) (Ito, not exp(W_1)).
    grid = sde.BrownianGrid.sample(1024, 4000, 1, generator=torch.Generator().manual_seed(2))
    W = grid.path()
    gbm = torch.exp(W - 0.5 * torch.linspace(0, 1, 1025, dtype=torch.float64)[:, None, None])
    depths, errors = [8, 16, 32, 64, 128], []
    for L in depths:
        dW = grid.coarse(L)
        h = sde.resnet(torch.ones(1, dtype=torch.float64), dW[..., None], torch.zeros_like(dW), 1.0, lambda z: z)
        errors.append(sde.strong_error(h, sde.on_grid(gbm, L)))
    assert abs(metrics.loglog_slope(depths, errors) + 0.5) < 0.1
    # Without Ito's -t/2 the error does not vanish.
    assert sde.strong_error(h, sde.on_grid(torch.exp(W), 128)) > 5 * errors[-1]


def test_torchsde_and_hand_written_euler_maruyama_agree_on_the_same_path():
    g = torch.Generator().manual_seed(3)
    drift = sde.SmoothDrift.sample(2, scale=0.5, generator=g)
    noise = sde.Noise(2, 0.5, 0.5)
    grid = sde.BrownianGrid.sample(256, 8, noise.channels, generator=g)
    x = torch.tensor([0.5, -0.3], dtype=torch.float64)
    H = sde.solve_sde(drift, noise, 1.0, x, grid, 64)
    He, _ = sde.euler_maruyama(drift, noise, 1.0, x, grid, 64)
    torch.testing.assert_close(H, He)


def test_resnet_jacobians_match_autograd():
    g = torch.Generator().manual_seed(4)
    drift = sde.SmoothDrift.sample(3, generator=g)
    noise = sde.Noise(3, 0.5, 0.5)
    grid = sde.BrownianGrid.sample(6, 2, noise.channels, generator=g)
    sigma = sde.CurvedTanh(1.0)
    A, b, delta = sde.regime2_weights(drift, noise, grid, 6)
    x = torch.randn(3, generator=g, dtype=torch.float64)
    states = sde.resnet(x, A, b, delta, sigma)
    J = sde.resnet_jacobians(states, A, b, delta, sigma)
    for k in (0, 2, 5, 6):
        for p in range(2):
            out = lambda h: sde.resnet(h, A[k:, p], b[k:, p], delta, sigma)[-1]
            torch.testing.assert_close(J[k, p], torch.autograd.functional.jacobian(out, states[k, p]))


def test_neural_ode_limit_of_regime_1_at_rate_one_and_its_jacobian():
    g = torch.Generator().manual_seed(5)
    drift = sde.SmoothDrift.sample(2, scale=0.5, generator=g)
    sigma = sde.CurvedTanh(1.0)
    x = torch.randn(4, 2, generator=g, dtype=torch.float64)
    H, JH = sde.solve_ode(drift, x, 128, sigma=sigma)
    lim = sde.backprop_limit(JH)
    depths, err, jerr = [8, 16, 32, 64], [], []
    for L in depths:
        A, b, delta = sde.regime1_weights(drift, L)
        h = sde.resnet(x, A[:, None], b[:, None], delta, sigma)
        err.append(sde.strong_error(h, sde.on_grid(H, L)))
        jerr.append(sde.strong_error(sde.resnet_jacobians(h, A[:, None], b[:, None], delta, sigma), sde.on_grid(lim, L),
                                     matrix=True))
    assert abs(metrics.loglog_slope(depths, err) + 1) < 0.1 and abs(metrics.loglog_slope(depths, jerr) + 1) < 0.1


def test_invalid_arguments():
    with pytest.raises(ValueError, match="steps"):
        sde.BrownianGrid.sample(0, 1, 1)
    with pytest.raises(ValueError, match="channels"):
        drift = sde.SmoothDrift.sample(2)
        sde.regime2_weights(drift, sde.Noise(2), sde.BrownianGrid.sample(4, 1, 3), 4)
    with pytest.raises(ValueError, match="shapes"):
        sde.strong_error(torch.zeros(3, 2), torch.zeros(4, 2))


def test_explosion_scale_is_where_the_ito_drift_alone_blows_up():
    """Along the diagonal H = r u, u = (1, 1)/sqrt(2), the drift c/2 q(H) of (4.19) with s_b = 0 is (r^2 / R*) u, so
    r(t) = r_0 / (1 - r_0 t / R*): finite at t = 1 from r_0 < R*, infinite before t = 1 from r_0 > R*."""
    d, c, s_A = 2, 1.0, 0.3
    noise = sde.Noise(d, s_A, 0.0)
    R = noise.explosion_scale(c)
    assert R == pytest.approx(2 / (c * s_A**2 * math.sqrt(d)))
    assert sde.Noise(d, 0.0, 0.5).explosion_scale(c) == math.inf and noise.explosion_scale(0.0) == math.inf
    assert sde.Noise(d, s_A, 0.5).explosion_scale(-c) == R  # the curvature's sign only turns the direction
    still = sde.SmoothDrift(torch.zeros(3, d, d, dtype=torch.float64), torch.zeros(2, d, dtype=torch.float64))
    field = sde.LimitSDE(still, noise, c)
    u = torch.ones(d, dtype=torch.float64) / math.sqrt(d)
    for r in (0.5, 3.0, 10.0):
        torch.testing.assert_close(field.f(0.0, r * u), r**2 / R * u)
    steps = 20000  # Euler on r' = r^2 / R*, through the SDE's drift, from r_0 = 0.9 R*: r(1) = 9 R*
    h = 0.9 * R * u
    for k in range(steps):
        h = h + field.f(k / steps, h) / steps
    assert h.norm().item() == pytest.approx(9 * R, rel=0.01)
    h = 1.1 * R * u  # from 1.1 R*: blow-up at t = 1/1.1
    for k in range(steps):
        h = h + field.f(k / steps, h) / steps
        if not torch.isfinite(h).all() or h.norm() > 1e12:
            break
    assert k / steps < 1 / 1.1 + 0.01

