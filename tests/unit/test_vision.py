"""Small image ResNets: shapes, identity at initialisation, adjoint mode, training with checkpoint/resume."""

import pytest
import torch

from resnode import adjoint, vision
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
