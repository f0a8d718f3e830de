"""Cont et al.'s ResNet h + delta_k sigma(A_k h + b_k): fused gradients against autograd, SGD/Adam steps, copies."""

import numpy as np
import pytest
import torch

from resnode import sgd


def autograd_loss(x, y, A, b, delta, activation, shared):
    sigma = torch.tanh if activation == "tanh" else torch.relu
    h = x
    for k in range(A.shape[0]):
        scale = delta.abs() if shared else delta[k]
        h = h + scale * sigma(h @ A[k].mT + b[k])
    return (h - y).square().mean()


@pytest.mark.parametrize("activation,delta", [("tanh", "shared"), ("relu", "layer")])
def test_gradients_match_autograd(activation, delta):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randn(7, 4, generator=g, dtype=torch.float64)
    weights = sgd.init_weights(9, 4, delta, scale=30.0, seed=2)  # large enough that sigma is not linear
    weights["delta"] = weights["delta"] * 5 - (0.5 if delta == "shared" else 0)  # a negative shared delta: |delta|
    loss, grads = sgd.loss_and_grads(x, y, weights, activation)
    leaves = {n: w.clone().requires_grad_() for n, w in weights.items()}
    reference = autograd_loss(x, y, leaves["A"], leaves["b"], leaves["delta"], activation, delta == "shared")
    assert loss.item() == pytest.approx(reference.item(), rel=1e-12)
    for name, grad in zip(leaves, torch.autograd.grad(reference, list(leaves.values()))):
        torch.testing.assert_close(grads[name], grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(sgd.mse(x, y, weights, activation), reference.detach())


def test_one_sgd_step_is_minus_lr_gradient_and_copies_are_independent():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
    w0 = sgd.init_weights(6, 3, "layer", scale=5.0, seed=1)
    run = sgd.train(x, y, w0, "relu", lr=0.1, batch_size=8, max_updates=1, stop_loss=0.0)
    _, grads = sgd.loss_and_grads(x, y, w0, "relu")
    for name in w0:
        torch.testing.assert_close(run.weights[name], w0[name] - 0.1 * grads[name])
    assert run.updates == 1 and run.epoch_losses.shape == (1,)
    # two copies with two learning rates = two separate runs (same mini-batches)
    both = sgd.init_weights(6, 3, "shared", scale=5.0, copies=2, seed=3)
    rates = torch.tensor([0.05, 0.2], dtype=torch.float64)
    together = sgd.train(x, y, both, "tanh", lr=rates, batch_size=4, max_updates=6, stop_loss=0.0, optimizer="adam")
    for s in range(2):
        alone = sgd.train(x, y, {n: w[:, s] if w.dim() > 1 else w[s] for n, w in both.items()}, "tanh",
                          lr=float(rates[s]), batch_size=4, max_updates=6, stop_loss=0.0, optimizer="adam")
        for name in both:
            got = together.weights[name][:, s] if both[name].dim() > 1 else together.weights[name][s]
            torch.testing.assert_close(got, alone.weights[name])
        assert together.epoch_losses[:, s] == pytest.approx(alone.epoch_losses)


def test_adam_first_step_moves_every_coordinate_by_lr():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
    w0 = sgd.init_weights(5, 3, "layer", scale=5.0, seed=1)
    run = sgd.train(x, y, w0, "relu", lr=0.01, batch_size=8, max_updates=1, stop_loss=0.0, optimizer="adam")
    _, grads = sgd.loss_and_grads(x, y, w0, "relu")
    step = run.weights["A"] - w0["A"]
    moving = grads["A"].abs() > 1e-6
    torch.testing.assert_close(step[moving], -0.01 * torch.sign(grads["A"][moving]), rtol=1e-4, atol=0)


def test_early_stop_init_scales_and_checks():
    x = torch.zeros(16, 2, dtype=torch.float64)
    run = sgd.train(x, x, sgd.init_weights(4, 2), "tanh", batch_size=4, max_epochs=5, stop_loss=0.01)
    assert run.updates == 4 and len(run.epoch_losses) == 1  # one epoch, then its mean loss is below 0.01
    w = sgd.init_weights(400, 5, "layer", scale=0.01, seed=0)
    assert w["A"].std().item() == pytest.approx(0.01 / (400 * 5), rel=0.05)
    assert w["b"].std().item() == pytest.approx(0.01 / (400 * 5**0.5), rel=0.1)
    assert w["delta"].std().item() == pytest.approx(1 / 400, rel=0.1)
    assert sgd.init_weights(400, 5)["delta"].item() == pytest.approx(1 / 400)
    assert sgd.depth_grid(3, 10321, 2 ** (1 / 3))[-1] == 10321 and len(sgd.depth_grid(3, 10321, 2 ** (1 / 3))) == 36
    assert sgd.depth_grid(3, 942, 1.15)[-1] == 942 and sgd.depth_grid(3, 10, 2 ** (1 / 3)) == [3, 4, 5, 6, 8, 10]
    with pytest.raises(ValueError, match="optimizer"):
        sgd.train(x, x, sgd.init_weights(4, 2), "tanh", optimizer="rmsprop")
    with pytest.raises(ValueError, match="batch_size"):
        sgd.train(x, x, sgd.init_weights(4, 2), "tanh", batch_size=64)
    with pytest.raises(ValueError, match="delta"):
        sgd.init_weights(4, 2, "matrix")


def test_homogeneous_rescaling_and_rebuild_are_exact_for_relu():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    w = sgd.init_weights(7, 3, "layer", scale=20.0, seed=4)
    A, b = sgd.residual_scale(w)
    torch.testing.assert_close(A, w["delta"].abs()[:, None, None] * w["A"])
    rebuilt = sgd.with_residual(w, A, b)  # Remark 2: delta_k relu(.) = sign(delta_k) relu(|delta_k| .)
    torch.testing.assert_close(sgd.mse(x, x, rebuilt, "relu"), sgd.mse(x, x, w, "relu"))
    shared = sgd.init_weights(7, 3, "shared", seed=4)
    assert sgd.residual_scale(shared)[0] is shared["A"]


def test_train_depths_caches_and_resumes_and_another_configuration_never_adopts_a_run(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 2, generator=g, dtype=torch.float64), torch.randn(8, 2, generator=g, dtype=torch.float64)
    kwargs = dict(batch_size=4, max_updates=3, lr=0.1)
    first = sgd.train_depths(x, y, [3, 5], "tanh", "shared", cache_dir=tmp_path, **kwargs)
    assert sorted(p.name[:6] for p in tmp_path.iterdir()) == ["L00003", "L00005"]
    again = sgd.train_depths(x, y, [3, 5], "tanh", "shared", cache_dir=tmp_path, **kwargs)
    assert np.array_equal(first[5].epoch_losses, again[5].epoch_losses)
    assert all(torch.equal(first[5].weights[k], again[5].weights[k]) for k in first[5].weights)
    for change in (dict(lr=0.2), dict(x=x + 1)):  # other settings, other data: trained afresh, in their own files
        other = sgd.train_depths(change.pop("x", x), y, [3], "tanh", "shared", cache_dir=tmp_path, **{**kwargs, **change})
        assert not np.array_equal(other[3].epoch_losses, first[3].epoch_losses)
    assert len(list(tmp_path.iterdir())) == 4

