"""Cont, Rossier & Xu's smoothness statistics (Table 2.2), exponent fits and trend/noise split (Steps 1-4)."""

import math

import numpy as np
import pytest
import torch

from resnode import regimes


def smooth(depth, beta=0.0, d=3):
    """``A_k = L^-beta f(k / L)`` with ``f(t)_{ij} = sin(2 pi t + i) cos(j t)``: a C^1 trend, ``|f'| <= 2 pi + 1``."""
    t = torch.arange(depth, dtype=torch.float64)[:, None, None] / depth
    i = torch.arange(d, dtype=torch.float64)[None, :, None]
    j = torch.arange(d, dtype=torch.float64)[None, None, :]
    return depth**-beta * torch.sin(2 * math.pi * t + i) * torch.cos(j * t)


def brownian(depth, beta, d=3, seed=0, sigma=1.0):
    """Remark 1: i.i.d. ``N(0, sigma^2 L^(1 - 2 beta))`` entries = ``L^(1-beta)`` x Brownian increments on ``1/L``."""
    g = torch.Generator().manual_seed(seed)
    return sigma * depth ** (0.5 - beta) * torch.randn(depth, d, d, generator=g, dtype=torch.float64)


def test_smooth_weights_have_constant_max_norm_and_vanishing_increments():
    depths = [64, 128, 256, 512, 1024]
    maxima = [regimes.max_norm(smooth(L)) for L in depths]
    increments = [regimes.increment_norm(smooth(L), 0.0) for L in depths]
    exact = torch.linalg.vector_norm(smooth(1)[0])  # t = 0 maximises ||f|| (cos(j t) <= 1 and sin^2 sums to the same)
    assert max(abs(m - maxima[-1]) for m in maxima) < 1e-3 * maxima[-1]
    assert regimes.exponent(depths, increments, "increment") == pytest.approx(-1.0, abs=0.02)  # O(1/L)
    assert all(L * inc < 3 * (2 * math.pi + 1) for L, inc in zip(depths, increments))  # Lipschitz bound, 3x3 entries
    assert exact > 0
    # Scaling regime 1 with beta: max norm ~ L^-beta, cumulative sum ~ L^(1 - beta), both fits give beta
    for beta in (0.2, 0.5):
        maxima = [regimes.max_norm(smooth(L, beta)) for L in depths]
        sums = [regimes.cumsum_norm(smooth(L, beta)) for L in depths]
        assert regimes.exponent(depths, maxima, "max") == pytest.approx(beta, abs=1e-3)
        assert regimes.exponent(depths, sums, "cumsum") == pytest.approx(beta, abs=0.01)


def test_cumulative_sum_running_max_and_root_sum_of_squares():
    A = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-3.0, 0.0]])
    assert regimes.cumsum_norm(A) == pytest.approx(2.0)  # running max, not the final |sum| = 1
    assert regimes.root_sum_squares(A) == pytest.approx(math.sqrt(11))
    assert regimes.increment_norm(A, 0.5) == pytest.approx(math.sqrt(3) * 4)
    assert regimes.quadratic_variation(A) == pytest.approx(0 + 16)
    stats = regimes.statistics(A, 0.5)
    assert set(stats) == set(regimes.STATISTICS)
    with pytest.raises(ValueError, match="beta"):
        regimes.increment_norm(A, -1)
    with pytest.raises(ValueError, match="stack"):
        regimes.max_norm(torch.ones(3))


def test_iid_gaussian_weights_are_brownian_increments():
    """Remark 1: cumulative sums grow like L^(1 - beta), the beta-scaled increments grow (no smooth limit), the
    quadratic variation of the rescaled cumulative sum L^(beta - 1) sum_{j<k} A_j tends to d^2 (finite)."""
    beta, d = 0.3, 3
    depths = [256, 1024, 4096, 16384]
    sums = [np.mean([regimes.cumsum_norm(brownian(L, beta, d, s)) for s in range(6)]) for L in depths]
    assert regimes.exponent(depths, sums, "cumsum") == pytest.approx(beta, abs=0.05)
    increments = [regimes.increment_norm(brownian(L, beta, d), beta) for L in depths]
    assert regimes.exponent(depths, increments, "increment") > 0.4  # L^(1/2) up to log factors
    for L in depths:
        path = regimes.rescaled_cumsum(brownian(L, beta, d), beta, grid=L)  # grid = L: every layer
        assert regimes.quadratic_variation(path) == pytest.approx(d * d, rel=4 / math.sqrt(L * d * d) + 0.02)


def test_exponent_fit_recovers_a_planted_beta():
    rng = np.random.default_rng(0)
    depths = np.unique(np.floor(2 ** (np.arange(5, 40) / 3)).astype(int))
    for beta in (0.0, 0.2, 0.5):
        values = 1.7 * depths**-beta * np.exp(0.05 * rng.standard_normal(len(depths)))
        assert regimes.exponent(depths, values) == pytest.approx(beta, abs=0.03)
        assert regimes.exponent(depths, values * depths, "cumsum") == pytest.approx(beta, abs=0.03)
        assert regimes.exponent(depths, values, "rss") == pytest.approx(-beta, abs=0.03)


def test_rescaled_cumsum_and_trend_are_consistent():
    L, G, beta = 400, 100, 0.25
    A = smooth(L, beta)
    path = regimes.rescaled_cumsum(A, beta, G)
    assert path.shape == (G + 1, 3, 3) and torch.all(path[0] == 0)
    torch.testing.assert_close(path[-1], L ** (beta - 1) * A.sum(0))
    trend = regimes.trend(path, L, beta)
    torch.testing.assert_close(regimes.rescaled_cumsum(trend, beta, G), path)  # L multiple of G: exact
    noise = regimes.noise(A, trend, beta)
    assert noise.shape == (L + 1, 3, 3) and noise[L // G * np.arange(G + 1)].abs().max() < 1e-12


def test_trend_noise_split_recovers_planted_trend_and_brownian_noise():
    """Scaling regime 2 (2.3): A_k = L^-beta A_bar(k/L) + L^(1-beta) dW_k, with an independent Brownian W (scale
    sigma) in each depth. Averaging I^L over 4 depths recovers int A_bar up to the mean noise; the noise path left
    over has quadratic variation sigma^2 d^2 (1 - 1/4 + ...), finite and non-zero; a smooth A has none."""
    beta, sigma, G, d = 0.5, 0.05, 200, 3
    depths = [1600, 2000, 2400, 3200]
    stacks = {L: smooth(L, beta, d) + brownian(L, beta, d, seed=L, sigma=sigma) for L in depths}
    split = regimes.decompose(stacks, beta, G)
    integral = regimes.rescaled_cumsum(smooth(G * 16, beta, d), beta, G)  # int_0^t A_bar, to O(1/(16 G))
    assert (regimes.mean_path(stacks, beta, G) - integral).abs().max() < 4 * sigma / 2  # the mean of 4 noises
    for L in depths:
        trend, noise = split[L]
        error = (trend - smooth(L, beta, d)).abs().max() * L**beta
        assert error < 4.5 * G**0.5 * sigma / 2  # that mean noise seen through a difference on 1/G
        qv = regimes.quadratic_variation(noise)
        assert 0.5 * sigma**2 * d * d < qv < 1.2 * sigma**2 * d * d
    clean = regimes.decompose({L: smooth(L, beta, d) for L in depths}, beta, G)
    for L in depths:
        trend, noise = clean[L]
        assert regimes.noise_fraction(smooth(L, beta, d), trend) < 0.02
        assert regimes.quadratic_variation(noise) < 1e-6
    with pytest.raises(ValueError, match="mean_over"):
        regimes.decompose(stacks, beta, G, mean_over=[7])


def test_trend_has_no_grid_aliasing_when_the_grid_does_not_divide_the_depth():
    """With G not dividing L, the cells of the grid hold floor or ceil of L/G layers. The trend must not depend on that:
    a constant A is its own trend at every G, and a smooth A keeps a noise share that hardly moves from G = 128 to 129
    (counting whole layers per cell gave shares of about 0.2 here, alternating with the cell sizes)."""
    beta = 0.2
    for L in (322, 406, 645):
        constant = torch.ones(L, 2, 2, dtype=torch.float64) * L**-beta
        for G in (128, 129, 500):
            path = regimes.rescaled_cumsum(constant, beta, G)
            torch.testing.assert_close(path, torch.linspace(0, 1, G + 1, dtype=torch.float64)[:, None, None]
                                       * torch.ones(2, 2, dtype=torch.float64))  # I(t) = t exactly
            trend, noise = regimes.decompose({L: constant}, beta, G)[L]
            torch.testing.assert_close(trend, constant)
            assert noise.abs().max() < 1e-12
        shares = [regimes.noise_fraction(smooth(L, beta), regimes.decompose({L: smooth(L, beta)}, beta, G)[L][0])
                  for G in (128, 129)]
        assert max(shares) < 0.02 and abs(shares[0] - shares[1]) < 0.01
        # the trend integrates back to I_bar at every layer: L^(beta - 1) sum_{j<k} trend_j = I_bar(k / L)
        G = 128
        path = regimes.rescaled_cumsum(smooth(L, beta), beta, G)
        trend = regimes.trend(path, L, beta)
        sums = L ** (beta - 1) * torch.cat([torch.zeros(1, 3, 3, dtype=torch.float64), trend.cumsum(0)])
        t = torch.arange(L + 1, dtype=torch.float64) / L * G
        i = t.floor().long().clamp(max=G - 1)
        expected = path[i] + (t - i)[:, None, None] * (path[i + 1] - path[i])
        torch.testing.assert_close(sums, expected)
