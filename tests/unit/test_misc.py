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
    with pytest.raises(FloatingPointError, match="before any step"):  # NaN from the start: not the learning rate's fault
        train.fit([w], lambda step: (w**2).sum() * float("nan"), steps=1, lr=0.1)
    with pytest.raises(FloatingPointError, match="became nan at iteration 1: lower the learning rate"):
        train.fit([w], lambda step: (w**2).sum() * (float("nan") if step else 1.0), steps=3, lr=0.1)


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


def test_training_along_a_continuation_from_a_zero_loss_is_not_divergence():
    # The first loss of a continuation from the network's own output is exactly 0; a later loss of order one is
    # the target moving, not the iteration diverging.
    start = torch.linspace(0.0, 1.0, 5)[:, None]
    w = torch.nn.Parameter(torch.ones(1, 1))
    goal = train.continuation(start, -start, ramp_steps=20)
    history = train.fit([w], lambda step: (start @ w - goal(step)).pow(2).mean(), steps=40, lr=0.05)
    assert history[0] == 0 and max(history) > 1e-3 and history[-1] < max(history)


def test_reversed_pairs_measures_the_final_order_and_does_not_count_merging():
    x = np.linspace(0.0, 1.0, 5)
    assert metrics.reversed_pairs(x, 2 * x + 1) == 0.0  # increasing maps keep every pair's order
    assert metrics.reversed_pairs(x, -(x**2)) == 1.0  # decreasing maps reverse all 5 * 4 / 2 pairs
    assert metrics.reversed_pairs(x, np.full(5, 0.3)) == 0.0  # a collapse is not a reversal
    y = np.array([0.0, 2.0, 1.0, 3.0, 4.0])  # one swapped pair (1, 2) of 10
    assert metrics.reversed_pairs(x, y) == pytest.approx(0.1)
    # Kendall's tau without ties: tau = 1 - 2 * fraction (scipy's definition).
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=30), rng.normal(size=30)
    concordant = sum(np.sign((u[i] - u[j]) * (v[i] - v[j])) for i in range(30) for j in range(i + 1, 30))
    assert 1 - 2 * metrics.reversed_pairs(u, v) == pytest.approx(concordant / (30 * 29 / 2))
    # Ties in x or y are not reversals (merged trajectories); leading dimensions broadcast (layers, copies).
    assert metrics.reversed_pairs([0.0, 0.0, 1.0], [1.0, 0.0, 0.0]) == pytest.approx(1 / 3)
    assert metrics.reversed_pairs(np.zeros(4), -x[:4]) == 0.0
    paths = np.stack([np.stack([x, -x]), np.stack([x, x**3])])  # (2 layers, 2 copies, 5 points)
    np.testing.assert_array_equal(metrics.reversed_pairs(x, paths), [[0.0, 1.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="2 points"):
        metrics.reversed_pairs([1.0], [2.0])


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


def test_coinciding_groups_curves_a_plot_would_draw_on_top_of_each_other():
    base = np.array([1.0, 2.0, 4.0])
    curves = np.stack([base, 1.005 * base, 2 * base, 2.01 * base, base])
    # rows 0-1 agree to 0.5 %, rows 2-3 to 0.5 %; row 4 equals row 0 but is not consecutive to it
    assert metrics.coinciding(curves, 0.01) == [[0, 1], [2, 3], [4]]
    assert metrics.coinciding(curves, 0.001) == [[0], [1], [2], [3], [4]]
    assert metrics.coinciding(curves, 1.0) == [[0, 1, 2], [3, 4]]  # |2 base - base| = max |base|: just within rtol = 1
    # on linear axes a difference is measured against the curve's largest value; on log axes, point by point
    decades = np.array([[1e-6, 1e-3, 1.0], [2e-6, 1e-3, 1.0]])  # the first point doubles: invisible on a linear axis
    assert metrics.coinciding(decades, 0.01) == [[0, 1]]
    assert metrics.coinciding(decades, 0.01, log=True) == [[0], [1]]
    assert metrics.coinciding(decades, 1.01, log=True) == [[0, 1]]  # a factor 2 is within rtol = 1.01 on a log axis
    # the comparison is with the group's first row, so a slow drift does not chain into one group
    drift = np.array([[1.0], [1.008], [1.016], [1.024]])
    assert metrics.coinciding(drift, 0.01) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError):
        metrics.coinciding(np.ones(3), 0.01)
    with pytest.raises(ValueError):
        metrics.coinciding(-decades, 0.01, log=True)
    with pytest.raises(ValueError):
        metrics.coinciding(curves, float("nan"))
