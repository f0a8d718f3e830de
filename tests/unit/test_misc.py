"""Profiles, rate fits, the training loop and the plotting helpers."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch

from resnode import metrics, plotting, profiles, train


def test_loglog_slope_recovers_exponents():
    x = np.array([2.0, 4, 8, 16])
    assert metrics.loglog_slope(x, 3 * x**-1.5) == pytest.approx(-1.5)
    with pytest.raises(ValueError, match="positive"):
        metrics.loglog_slope(x, -x)


def test_profiles():
    s = profiles.settings("smoke", smoke={"n": 1}, book={"n": 2}, paper={"n": 3})
    assert s.n == 1 and s.profile == "smoke"
    with pytest.raises(ValueError, match="profile"):
        profiles.settings("quick", smoke={"n": 1}, book={"n": 2}, paper={"n": 3})
    with pytest.raises(ValueError, match="different settings"):
        profiles.settings("book", smoke={"n": 1}, book={"m": 2}, paper={"n": 3})


def test_fit_minimises_a_quadratic():
    w = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
    history = train.fit([w], lambda step: ((w - 1) ** 2).sum(), steps=200, lr=0.1, optimizer="sgd")
    assert history[-1] < 1e-10 < history[0]
    with pytest.raises(ValueError, match="optimizer"):
        train.fit([w], lambda step: (w**2).sum(), steps=1, lr=0.1, optimizer="lbfgs")
    with pytest.raises(FloatingPointError, match="learning rate"):
        train.fit([w], lambda step: (w**2).sum() * float("nan"), steps=1, lr=0.1)


def test_plotting_helpers():
    import matplotlib.pyplot as plt

    plotting.use_book_style()
    fig, ax = plt.subplots()
    plotting.reference_slope(ax, [1, 10], 1.0, -1.0)
    plotting.ran_on(fig, "synthetic data, smoke profile")
    assert ax.lines[0].get_ydata()[-1] == pytest.approx(0.1)
    assert any("smoke profile" in t.get_text() for t in fig.texts)
    plt.close(fig)


def test_continuation_moves_the_target_linearly_then_stops():
    start, end = torch.zeros(3), torch.tensor([1.0, -2.0, 4.0])
    target = train.continuation(start, end, ramp_steps=4)
    torch.testing.assert_close(target(0), start)
    torch.testing.assert_close(target(1), end / 4)
    torch.testing.assert_close(target(4), end)
    torch.testing.assert_close(target(100), end)
    with pytest.raises(ValueError, match="ramp_steps"):
        train.continuation(start, end, ramp_steps=0)
    with pytest.raises(ValueError, match="same shape"):
        train.continuation(start, end[:2], ramp_steps=3)


def test_crossings_counts_order_swaps():
    x = np.linspace(0.0, 1.0, 5)
    assert metrics.crossings(np.stack([x, 2 * x, x + 1])) == 0  # increasing maps keep the order
    assert metrics.crossings(np.stack([x, -x])) == 10  # a reversal swaps all 5 * 4 / 2 pairs once
    assert metrics.crossings(np.stack([x, -x, x])) == 20  # and back
    with pytest.raises(ValueError, match="paths"):
        metrics.crossings(x)


def test_exponential_rate_recovers_a_linear_convergence_rate_and_flags_a_power_law():
    t = np.linspace(0, 50, 60)
    rate, r2 = metrics.exponential_rate(t, 3 * np.exp(-0.2 * t))
    assert rate == pytest.approx(0.2) and r2 == pytest.approx(1.0)
    rate, r2 = metrics.exponential_rate(t + 1, 1 / (t + 1))  # a power law is not a straight line in log scale
    assert r2 < 0.9
    with pytest.raises(ValueError):
        metrics.exponential_rate(t, -np.ones_like(t))
    with pytest.raises(ValueError):
        metrics.exponential_rate([0, 1], [1, 2])


def test_uniform_exponential_rate_is_the_largest_rate_that_bounds_the_whole_run():
    t = np.arange(0, 100, 10.0)
    assert metrics.uniform_exponential_rate(t, 5 * np.exp(-0.03 * t)) == pytest.approx(0.03)
    slowing = np.exp(-0.05 * t) + 1e-3  # fast, then stuck: the bound is set by the end of the run
    r = metrics.uniform_exponential_rate(t, slowing)
    assert r == pytest.approx(-np.log(slowing[-1] / slowing[0]) / t[-1])
    assert np.all(slowing <= np.exp(-r * t) * slowing[0] * (1 + 1e-12)) and r < 0.05
    with pytest.raises(ValueError):
        metrics.uniform_exponential_rate(t + 1, slowing)  # must start at t = 0
    with pytest.raises(ValueError):
        metrics.uniform_exponential_rate(t, -slowing)
