"""Every public function makes its tensors on its inputs' device: run on the ``meta`` device (shapes only, no data),
where mixing in a tensor made on the CPU raises. A CUDA run is the same test with ``device="cuda"``."""

import pytest
import torch

from resnode import adjoint, models, ode

DEVICES = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_ode_solve_runs_on_the_inputs_device(device):
    residual = models.Perceptron(3, 5)
    weights = [torch.randn(9, *s, device=device) for s in residual.shapes]  # 8 intervals, 9 knots
    field = ode.InterpolatedField(residual, weights)
    grid, states = ode.solve(field, torch.randn(4, 3, device=device), 8, substeps=2)
    assert grid.device.type == states.device.type == device and states.shape == (17, 4, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_resnet_and_its_lipschitz_bounds_run_on_the_inputs_device(device):
    net = models.ResNet(models.Perceptron(3, 5), 6).to(device)
    assert net(torch.randn(4, 3, device=device)).device.type == device
    free = models.StateFree(3)
    a, b = (torch.randn(6, 3, device=device),), (torch.randn(6, 3, device=device),)
    assert free.segment_lipschitz(a, b).device.type == device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_reconstruction_error_runs_on_the_inputs_device(device, method):
    residual = models.Perceptron(3, 5)
    weights = [0.1 * torch.randn(6, *s) for s in residual.shapes]
    blocks = adjoint.layers(residual, weights)
    stack = adjoint.ResidualStack(blocks, method=method).to(device)
    error = adjoint.reconstruction_error(torch.randn(4, 3, device=device), list(stack.blocks), method=method)
    assert error.device.type == device and error.shape == (4,)


@pytest.mark.parametrize("device", DEVICES)
def test_crops_and_flips_run_on_the_images_device(device):
    from resnode import images

    out = images.crop_and_flip(torch.randn(4, 3, 8, 8, device=device), torch.Generator().manual_seed(0), padding=2)
    assert out.device.type == device and out.shape == (4, 3, 8, 8)
