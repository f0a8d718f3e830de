"""Small image ResNets: shapes, identity at initialisation, adjoint mode; the training loop (schedules, crops, resume)."""

import pytest
import torch

from resnode import adjoint, conv_regimes, vision
from resnode.data import Dataset


def images(n=48, channels=1, size=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = 0.1 * torch.randn(n, channels, size, size, generator=g)
    x += y[:, None, None, None].float()  # a learnable signal: the mean brightness gives the class
    return Dataset(x, y, "synthetic images")


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
@pytest.mark.parametrize("method", adjoint.METHODS)
def test_shapes_and_identity_at_initialisation(channels, size, method):
    torch.manual_seed(0)
    net = vision.TinyResNet(4, method=method, in_channels=channels)
    x = images(channels=channels, size=size).inputs[:5]
    assert net(x).shape == (5, 10)
    assert len(net.stack.blocks) == 4 + (method == "heun")
    h = net.stem(x)
    torch.testing.assert_close(net.stack(h), h)  # zero-initialised last batch norm: every block is 0


def test_adjoint_gradients_are_exact_at_initialisation_and_close_after_training():
    torch.manual_seed(0)
    data = images(channels=1)
    net = vision.TinyResNet(8, mode="adjoint", in_channels=1).double()
    x, y = data.inputs.double(), data.targets
    loss = lambda stack: torch.nn.functional.cross_entropy(net.head(stack(net.stem(x))), y)
    net(x[:2])
    assert adjoint.gradient_errors(loss, net.stack)["(all)"] < 1e-10
    for block in net.stack.blocks:  # a trained-looking network: non-zero residuals
        torch.nn.init.constant_(block.body[-1].weight, 0.3)
    assert 0 < adjoint.gradient_errors(loss, net.stack)["(all)"] < 0.1


def test_training_learns_and_resumes_exactly(tmp_path):
    data = images()
    runs = {}
    for name, stops in [("straight", [None]), ("resumed", [1, None])]:
        torch.manual_seed(0)
        net = vision.TinyResNet(2, in_channels=1, classes=3)
        for stop in stops:  # the second call picks up the checkpoint written by the first
            if name == "resumed" and stop is None:
                torch.manual_seed(1)
                net = vision.TinyResNet(2, in_channels=1, classes=3)  # a fresh process: all state from the file
            history = vision.train_classifier(net, data, data, epochs=3, batch_size=16, lr=0.05, stop_after=stop,
                                              checkpoint=tmp_path / "run.pt" if name == "resumed" else None)
        runs[name] = (history, net.state_dict())
    assert runs["straight"][0]["loss"] == pytest.approx(runs["resumed"][0]["loss"])
    assert runs["straight"][0]["loss"][-1] < runs["straight"][0]["loss"][0]
    assert runs["straight"][0]["test_error"][-1] < 50
    for k, v in runs["straight"][1].items():
        torch.testing.assert_close(v, runs["resumed"][1][k])


def test_cosine_training_with_crops_lowers_the_loss_and_resumes(tmp_path):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 2
    x = 0.3 * torch.randn(64, 1, 6, 6, generator=g) + y[:, None, None, None].float()
    data = Dataset(x, y, "two brightness classes")
    torch.manual_seed(0)
    net = conv_regimes.RegimeResNet((1, 1), (4, 8), in_channels=1, classes=2)
    history = vision.train_classifier(net, data, data, epochs=3, batch_size=16, lr=0.05, schedule="cosine",
                                      augmentation=True, checkpoint=tmp_path / "ck.pt")
    assert history["loss"][-1] < history["loss"][0]
    again = vision.train_classifier(net, data, data, epochs=3, batch_size=16, lr=0.05, schedule="cosine",
                                    checkpoint=tmp_path / "ck.pt")
    assert again["loss"] == history["loss"]  # nothing left to train: the checkpoint's history comes back


def test_sgd_epoch_returns_the_mean_loss_and_stops_on_divergence():
    torch.manual_seed(0)
    net = conv_regimes.RegimeResNet((1,), (4,), in_channels=1, classes=3)
    x, y = torch.randn(10, 1, 4, 4), torch.arange(10) % 3
    frozen = torch.optim.SGD(net.parameters(), lr=1e-12)
    with torch.no_grad():
        expected = float(torch.nn.functional.cross_entropy(net(x), y))
    assert vision.sgd_epoch(net, frozen, [(x[:4], y[:4]), (x[4:], y[4:])]) == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        net.head[-1].weight.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="epoch 3"):
        vision.sgd_epoch(net, frozen, [(x, y)], epoch=2)


def test_unknown_schedule_is_refused():
    net = vision.TinyResNet(1, in_channels=1, classes=3)
    with pytest.raises(ValueError, match="schedule"):
        vision.train_classifier(net, images(), images(), epochs=1, schedule="linear")


def test_clipping_scales_the_gradient_to_the_given_norm_and_leaves_small_ones_alone():
    torch.manual_seed(2)
    x, y = torch.randn(12, 1, 4, 4, dtype=torch.float64), torch.arange(12) % 3
    steps = {}
    for clip in (None, 1e-3, 1e3):
        torch.manual_seed(0)
        net = conv_regimes.RegimeResNet((1,), (4,), in_channels=1, classes=3).double()  # float64: exact differences
        before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
        plain = torch.optim.SGD(net.parameters(), lr=1.0)  # no momentum, no weight decay: the step is minus the gradient
        vision.sgd_epoch(net, plain, [(x, y)], clip_norm=clip)
        steps[clip] = before - torch.cat([p.detach().flatten() for p in net.parameters()])
    raw = steps[None].norm()
    assert raw > 1e-3
    assert steps[1e-3].norm() == pytest.approx(1e-3, rel=1e-4)  # scaled to the clip norm (torch divides by norm + 1e-6) ...
    torch.testing.assert_close(steps[1e-3] / steps[1e-3].norm(), steps[None] / raw)  # ... in the same direction
    torch.testing.assert_close(steps[1e3], steps[None])  # a larger clip norm changes nothing
    with pytest.raises(ValueError, match="clip_norm"):
        vision.train_classifier(net, images(), images(), epochs=1, clip_norm=0.0)
