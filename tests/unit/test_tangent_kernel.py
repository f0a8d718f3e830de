"""The tangent kernel of eq. (3) in the flow's metric against autograd Jacobians; Definition 1's ratio; the init closed form."""

import math

import pytest
import torch
from torch.func import jacrev

from resnode import tangent_kernel as tk


def setup(train_io=True, n=5, d=2, d_out=2, q=5, m=3, depth=4, rho=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    if not train_io:
        d = d_out = q
    params = tk.initialise(d, q, m, depth, d_out, train_io=train_io, generator=g)
    params = tk.perturb(params, rho, train_io=train_io, generator=g)  # away from init: every block of Theta is non-zero
    x = tk.sphere(n, d, math.sqrt(q), generator=g)
    y = 0.5 * torch.randn(n, d_out, generator=g, dtype=torch.float64)
    return x, y, params


def autograd_kernel(x, params, train_io):
    """``J G J^T`` with the Jacobians of the stacked outputs from torch.func.jacrev and the metric ``G`` of flow (4)."""
    names = ["A", "V", "W", "B"] if train_io else ["V", "W"]
    depth = params["W"].shape[0]

    def outputs(*blocks):
        return tk.forward(x, {**params, **dict(zip(names, blocks))}).outputs.reshape(-1)

    jacobians = jacrev(outputs, argnums=tuple(range(len(names))))(*(params[k] for k in names))
    theta = 0
    for name, J in zip(names, jacobians):
        J = J.reshape(J.shape[0], -1)
        theta = theta + (depth if name in ("V", "W") else 1) * J @ J.T
    return theta


@pytest.mark.parametrize("train_io", [True, False])
def test_kernel_equals_jacobian_gram(train_io):
    x, _, params = setup(train_io)
    theta = tk.tangent_kernel(x, params, train_io=train_io)
    reference = autograd_kernel(x, params, train_io)
    assert theta.shape == (x.shape[0] * (params["B"].shape[0] if train_io else x.shape[1]),) * 2
    torch.testing.assert_close(theta, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(theta, theta.T, rtol=0, atol=1e-14)


@pytest.mark.parametrize("train_io", [True, False])
def test_pl_ratio_is_the_gradient_norm_of_definition_1(train_io):
    x, y, params = setup(train_io, seed=1)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    value = tk.loss(x, y, leaves)
    grads = dict(zip(leaves, torch.autograd.grad(value, list(leaves.values()))))
    depth = params["W"].shape[0]
    lhs = depth * (grads["V"].square().sum() + grads["W"].square().sum())  # L sum_k |d_{Z_k} l|^2
    if train_io:
        lhs = lhs + grads["A"].square().sum() + grads["B"].square().sum()
    ratio = tk.pl_ratio(x, y, params, train_io=train_io)
    assert ratio == pytest.approx((lhs / value).item(), rel=1e-10)
    theta = tk.tangent_kernel(x, params, train_io=train_io)
    assert ratio >= tk.pl_constant(theta, x.shape[0]) - 1e-12  # the worst case over targets is a lower bound


def test_pl_constant_is_attained_by_the_worst_targets():
    x, _, params = setup(True, seed=2)
    theta = tk.tangent_kernel(x, params)
    _, vectors = torch.linalg.eigh(theta)
    out = tk.forward(x, params).outputs
    y = out - vectors[:, 0].reshape(out.shape)  # residual along the bottom eigenvector
    assert tk.pl_ratio(x, y, params, theta=theta) == pytest.approx(tk.pl_constant(theta, x.shape[0]), rel=1e-9)


@pytest.mark.parametrize("train_io", [True, False])
def test_init_closed_form_and_its_rank(train_io):
    g = torch.Generator().manual_seed(3)
    n, d, d_out, depth = 8, 3, 3, 3
    q = 6 if train_io else d
    if not train_io:
        d_out = d
    for m in (2, 16):
        params = tk.initialise(d, q, m, depth, d_out, train_io=train_io, generator=g)
        x = tk.sphere(n, d, math.sqrt(q), generator=g)
        theta = tk.tangent_kernel(x, params, train_io=train_io)
        closed = tk.init_kernel(x, params["W"][0], params.get("A") if train_io else None, d_out, train_io=train_io)
        torch.testing.assert_close(theta, closed, rtol=1e-12, atol=1e-13)
        rank_bound = d_out * (min(m, n) + (d if train_io else 0))
        eig = torch.linalg.eigvalsh(theta)
        assert torch.linalg.matrix_rank(theta, hermitian=True, rtol=1e-10) <= rank_bound
        if rank_bound < n * d_out:  # m + d < n (or m < n): Theta is singular, mu_hat = 0 to rounding
            assert abs(eig[0]) < 1e-12 * eig[-1]
            assert abs(tk.pl_constant(theta, n)) < 1e-12 * eig[-1]
        else:
            assert eig[0] > 1e-6 * eig[-1]


def test_init_kernel_does_not_depend_on_depth():
    g = torch.Generator().manual_seed(4)
    x = tk.sphere(6, 2, 2.0, generator=g)
    thetas = []
    for depth in (1, 7):
        g.manual_seed(5)
        thetas.append(tk.tangent_kernel(x, tk.initialise(2, 4, 3, depth, 2, generator=g)))
    torch.testing.assert_close(thetas[0], thetas[1], rtol=1e-12, atol=1e-13)


def test_perturb_stays_in_the_neighbourhood():
    g = torch.Generator().manual_seed(6)
    params = tk.initialise(2, 5, 3, 4, 2, generator=g)
    moved = tk.perturb(params, 0.3, generator=g)
    for name in ("V", "W"):
        torch.testing.assert_close(torch.linalg.vector_norm((moved[name] - params[name]).flatten(1), dim=1),
                                   torch.full((4,), 0.15, dtype=torch.float64))
    for name in ("A", "B"):
        assert torch.linalg.vector_norm(moved[name] - params[name]).item() == pytest.approx(0.3)
    frozen = tk.perturb(params, 0.3, train_io=False, generator=g)
    assert torch.equal(frozen["A"], params["A"]) and torch.equal(frozen["B"], params["B"])
    assert torch.linalg.vector_norm(tk.sphere(7, 3, 2.5, generator=g), dim=1).sub(2.5).abs().max() < 1e-12


def test_bad_arguments_raise():
    x, y, params = setup(True)
    with pytest.raises(ValueError, match="params"):
        tk.tangent_kernel(x, {"W": params["W"]})
    with pytest.raises(ValueError, match="V must be"):
        tk.tangent_kernel(x, {**params, "V": params["V"][:, :, :2]})
    with pytest.raises(ValueError, match="A must be"):
        tk.tangent_kernel(x, {**params, "A": params["A"][:2]})
    with pytest.raises(ValueError, match="without A"):
        tk.tangent_kernel(x, {k: v for k, v in params.items() if k != "A"})
    with pytest.raises(ValueError, match="train_io"):
        tk.tangent_kernel(x, params, train_io="yes")
    with pytest.raises(ValueError, match="activation"):
        tk.tangent_kernel(x, params, activation="swish")
    with pytest.raises(ValueError, match="y must be"):
        tk.pl_ratio(x, y[:, :1], params)
    with pytest.raises(ValueError, match="theta"):
        tk.pl_constant(torch.eye(7, dtype=torch.float64), 5)
    with pytest.raises(ValueError, match="n must"):
        tk.pl_constant(torch.eye(10, dtype=torch.float64), 0)
    with pytest.raises(ValueError, match="q must be >= d"):
        tk.initialise(3, 4, 2, 2, 3)
    with pytest.raises(ValueError, match="d, q and d_out"):
        tk.initialise(3, 4, 2, 2, train_io=False)
    with pytest.raises(ValueError, match="depth"):
        tk.initialise(2, 4, 2, 0)
    with pytest.raises(ValueError, match="rho"):
        tk.perturb(params, -1.0)
    with pytest.raises(ValueError, match="radius"):
        tk.sphere(3, 2, 0.0)


def test_perturb_common_random_numbers_and_coherent_moves():
    g = torch.Generator().manual_seed(7)
    moved = {}
    for depth in (2, 9):
        params = tk.initialise(2, 5, 3, depth, 2, generator=torch.Generator().manual_seed(8))
        moved[depth] = tk.perturb(params, 0.4, generator=g.manual_seed(9))
        assert list(moved[depth]) == list(params)  # same keys, same order
    for name in ("A", "B"):  # drawn first: the same move of A and B at every depth
        assert torch.equal(moved[2][name], moved[9][name])
    params = tk.initialise(2, 5, 3, 6, 2, generator=g)
    tied = tk.perturb(params, 0.4, coherent=True, generator=g)
    for name in ("V", "W"):
        delta = tied[name] - params[name]
        torch.testing.assert_close(delta, delta[:1].expand_as(delta), rtol=0, atol=0)  # one direction for all layers
        torch.testing.assert_close(torch.linalg.vector_norm(delta.flatten(1), dim=1),
                                   torch.full((6,), 0.2, dtype=torch.float64))
    assert tk.distances(tied, params)["Z"].item() == pytest.approx(0.4)
    assert tk.distances(tied, params)["A"].item() == pytest.approx(0.4)


def autograd_step(x, y, params, dt):
    """One explicit Euler step of the flow (4) from autograd gradients: rate 1 on A and B, L on every Z_k."""
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    grads = dict(zip(leaves, torch.autograd.grad(tk.loss(x, y, leaves), list(leaves.values()))))
    depth = params["W"].shape[0]
    return {k: params[k] - dt * (depth if k in ("V", "W") else 1) * grads[k] for k in params}


@pytest.mark.parametrize("train_io", [True, False])
def test_gradient_flow_steps_are_the_flow_4(train_io):
    x, y, params = setup(train_io, seed=3)
    stepped, history = tk.gradient_flow(x, y, params, 1, 0.05)
    reference = autograd_step(x, y, params, 0.05)
    for name in params:
        torch.testing.assert_close(stepped[name], reference[name], rtol=1e-10, atol=1e-12)
    assert history["loss"][0] == pytest.approx(tk.loss(x, y, params).item(), rel=1e-12)
    assert history["loss"][1] == pytest.approx(tk.loss(x, y, stepped).item(), rel=1e-12)
    assert history["Z"][0] == 0 and history["Z"][1] == pytest.approx(tk.distances(stepped, params)["Z"].item())
    assert ("A" in history and history["A"] is not None) == train_io


def test_gradient_flow_copies_are_independent_runs_and_descend():
    g = torch.Generator().manual_seed(11)
    runs = []
    for _ in range(3):
        x = tk.sphere(6, 2, 2.0, generator=g)
        runs.append((x, 0.3 * torch.randn(6, 2, generator=g, dtype=torch.float64),
                     tk.initialise(2, 4, 5, 3, 2, generator=g)))
    xs, ys = torch.stack([r[0] for r in runs]), torch.stack([r[1] for r in runs])
    together, history = tk.gradient_flow(xs, ys, tk.stack([r[2] for r in runs]), 40, 0.05, every=10, snapshots=[20])
    assert history["t"].tolist() == [0, 10, 20, 30, 40] and history["loss"].shape == (5, 3)
    assert sorted(history["snapshots"]) == [20]
    for j, (x, y, params) in enumerate(runs):
        alone, alone_history = tk.gradient_flow(x, y, params, 40, 0.05, every=10)
        for name in params:
            torch.testing.assert_close(tk.select(together, j)[name], alone[name], rtol=1e-10, atol=1e-12)
        assert alone_history["loss"] == pytest.approx(history["loss"][:, j], rel=1e-10)
        assert (torch.all(tk.select(tk.stack([p for _, _, p in runs]), j)["W"] == params["W"]))
    assert (history["loss"][1:] < history["loss"][:-1]).all()  # small step: gradient descent decreases the loss
    assert tk.loss(xs[0], ys[0], tk.select(together, 0)).item() == pytest.approx(history["loss"][-1, 0], rel=1e-12)


def test_training_helpers_refuse_bad_arguments():
    x, y, params = setup(True)
    with pytest.raises(ValueError, match="x and y"):
        tk.gradient_flow(x, y[:3], params, 2, 0.1)
    with pytest.raises(ValueError, match="params may only"):
        tk.gradient_flow(x, y, {**params, "b": params["A"]}, 2, 0.1)
    with pytest.raises(ValueError, match="V must be"):
        tk.gradient_flow(x, y, {**params, "V": params["V"][:, :, :2]}, 2, 0.1)
    with pytest.raises(ValueError, match="dt"):
        tk.gradient_flow(x, y, params, 2, 0.0)
    with pytest.raises(ValueError, match="steps"):
        tk.gradient_flow(x, y, params, 0, 0.1)
    with pytest.raises(ValueError, match="copy dimension"):
        tk.select(params, 0)
    with pytest.raises(ValueError, match="at least one"):
        tk.stack([])
    with pytest.raises(ValueError, match="coherent"):
        tk.perturb(params, 0.1, coherent="yes")
