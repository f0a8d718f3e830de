"""Bad input is refused with ValueError/TypeError naming the argument; diverging iterations stop and say what to
lower. Property-based (hypothesis) for the public constructors."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resnode import engine, init, models, ode, polyak, regimes, sde, train

ANY = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.floats(allow_nan=True, allow_infinity=True),
                st.text(max_size=5), st.just(np.int64(3)), st.just(np.float64("nan")))


def valid_size(value):
    return not isinstance(value, (bool, float, str, type(None))) and int(value) >= 1


def valid_number(value, low=0.0):
    return (not isinstance(value, (bool, str, type(None)))) and math.isfinite(float(value)) and float(value) > low


@settings(max_examples=150, deadline=None)
@given(dim=ANY, width=ANY, activation=st.one_of(st.sampled_from(models.ACTIVATIONS), st.text(max_size=6)))
def test_perceptron_accepts_exactly_positive_integer_sizes_and_known_activations(dim, width, activation):
    try:
        residual = models.Perceptron(dim, width, activation)
    except ValueError as error:
        assert not (valid_size(dim) and valid_size(width) and activation in models.ACTIVATIONS), error
        assert any(name in str(error) for name in ("dim", "width", "activation"))
    else:
        assert valid_size(dim) and valid_size(width) and activation in models.ACTIVATIONS
        assert residual.dim == int(dim) and residual.width == int(width)


@settings(max_examples=150, deadline=None)
@given(depth=ANY, std=ANY, lengthscale=ANY, kind=st.sampled_from(init.INIT_KINDS + ("wild",)),
       scaling=st.sampled_from(models.SCALINGS[:2] + ("1", "1/N")))
def test_resnet_refuses_every_bad_depth_scale_and_kind(depth, std, lengthscale, kind, scaling):
    valid = valid_size(depth) and valid_number(std) and valid_number(lengthscale) and kind in init.INIT_KINDS \
        and scaling in models.SCALINGS and (not valid_size(depth) or int(depth) <= 64)
    if valid_size(depth) and int(depth) > 64:
        return  # large depths are valid but slow; sizes are covered above
    try:
        net = models.ResNet(models.Perceptron(2, 3), depth, init=kind, std=std, lengthscale=lengthscale,
                            scaling=scaling)
    except ValueError as error:
        assert not valid, error
    else:
        assert valid and all(torch.isfinite(w).all() for w in net.weights)


@settings(max_examples=100, deadline=None)
@given(step=ANY, activation=st.one_of(st.sampled_from(models.ACTIVATIONS), st.text(max_size=6)))
def test_engine_residual_refuses_bad_steps_and_activations(step, activation):
    try:
        engine.Residual(activation, step=step)
    except (ValueError, TypeError) as error:
        assert not (valid_number(step) and activation in models.ACTIVATIONS), error
    else:
        assert valid_number(step) and activation in models.ACTIVATIONS


@pytest.mark.parametrize("call, message", [
    (lambda: init.rbf_kernel(torch.ones(3), 0.0), "lengthscale"),
    (lambda: init.init_weights("iid", 4, [(2,)], std=float("nan")), "std"),
    (lambda: ode.euler_bound(float("nan"), 1.0, 8), "lipschitz"),
    (lambda: ode.euler_bound(1.0, -1.0, 8), "curvature"),
    (lambda: polyak.polyak_bound(-1.0, 1.0, 2.0, 5), "f0"),
    (lambda: models.ResNet(models.Perceptron(2, 3), 4.0), "depth"),
])
def test_values_that_used_to_pass_silently_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_numpy_integers_are_integers():
    net = models.ResNet(models.Perceptron(2, 3), np.int64(8))
    assert net.depth == 8 and isinstance(net.depth, int)


def test_training_that_diverges_stops_and_names_the_step_size_to_lower():
    w = torch.nn.Parameter(torch.tensor([1.0]))
    with pytest.raises(train.DivergenceError, match="grew from .* lower the learning rate lr"):
        train.fit([w], lambda step: (w**4).sum(), steps=50, lr=10.0, optimizer="sgd")
    # gradient descent on a quadratic with a step above 2 / beta
    with pytest.raises(train.DivergenceError, match="lower the step"):
        polyak.descend(lambda th: (th**2).sum(), torch.ones(3, dtype=torch.float64), 1.5, 200)
    with pytest.raises(train.DivergenceError, match="lower the step"):
        polyak.complex_descent(torch.tensor([-1.0 + 3.0j], dtype=torch.complex128), 50.0, 50)
    # and a converging run is left alone
    _, losses = polyak.descend(lambda th: (th**2).sum(), torch.ones(3, dtype=torch.float64), 0.25, 50)
    assert losses[-1] < 1e-10


@pytest.mark.parametrize("call, message", [
    (lambda: sde.CurvedTanh(float("nan")), "curvature"),
    (lambda: sde.CurvedTanh(float("inf")), "curvature"),
    (lambda: regimes.exponent([4, 8, 16], [1.0, 2.0, 3.0], statistic="cumsun"), "statistic"),
])
def test_more_bad_values_are_refused_by_name(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_matern_at_the_ends_of_its_range():
    from resnode import rkhs

    k = rkhs.matern([0.0, float("inf")], 3.0)
    assert k[0] == 1.0 and k[1] == 0.0  # the limits, not 1.0 for both as nan_to_num made them
    with pytest.raises(ValueError, match="NaN"):
        rkhs.matern([float("nan")], 3.0)


@pytest.mark.parametrize("call, message", [
    (lambda: sde.Noise(2, s_A=-0.5), "s_A"),
    (lambda: sde.Noise(2, s_b=float("nan")), "s_b"),
    (lambda: sde.Noise(0), "dim"),
])
def test_noise_refuses_negative_or_nan_scales_and_empty_dimensions(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_nan_in_the_data_is_not_blamed_on_the_step_size():
    from resnode import sgd

    x = torch.randn(16, 3, dtype=torch.float64)
    x[2, 1] = float("nan")
    with pytest.raises(train.DivergenceError, match="before any step.*data or the starting weights"):
        sgd.train(x, x, sgd.init_weights(4, 3), "tanh", batch_size=16)
    with pytest.raises(TypeError, match="one dtype"):
        sgd.train(x.float(), x.float(), sgd.init_weights(4, 3), "tanh", batch_size=4)
    with pytest.raises(ValueError, match="no samples"):
        sgd.train(x[:0], x[:0], sgd.init_weights(4, 3), "tanh")
