"""The fused engine against autograd, with its depth loops compiled and through torch; the gradient flow
(4)-(5); the recorders."""

import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from resnode import engine, flow, models, native, recorders

KINDS = ("matrix", "scalar", "none")


@pytest.fixture(params=["compiled", "torch"])
def loops(request, monkeypatch):
    """Runs a test with the engine's depth loops in C (``resnode.native``), then through torch."""
    compiled = request.param == "compiled"
    if compiled and shutil.which("cc") is None:
        pytest.skip("no C compiler: the engine runs its loops through torch")
    monkeypatch.setattr(native, "enabled", compiled)
    if compiled:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a compiler that is there must build the kernels
            assert native.kernels(torch.float64, 4, 6) is not None
    return request.param


def autograd_resnet(h0, W, V, b, spec):
    """The same network written with autograd, layer by layer (the reference)."""
    sigma = models.activation(spec.activation)
    h = h0
    for k in range(W.shape[0]):
        pre = spec.inner * h @ W[k].mT + (0 if b is None else b[k].unsqueeze(-2))
        act = sigma(pre)
        if V is None:
            r = act
        elif V.dim() == W.dim():
            r = act @ V[k].mT
        else:
            r = V[k].reshape(*V.shape[1:], 1, 1) * act
        h = h + spec.step * spec.outer * r
    return h


def draw(kind, lead=(), depth=23, n=5, q=4, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = 6 if kind == "matrix" else q

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    V = {"matrix": lambda: rand(depth, *lead, q, m), "scalar": lambda: rand(depth, *lead), "none": lambda: None}[kind]()
    return rand(*lead, n, q), rand(depth, *lead, m, q), V, (rand(depth, *lead, m) if bias else None)


@pytest.mark.parametrize("activation", models.ACTIVATIONS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lead", [(), (3,)])
def test_fused_gradients_match_autograd(activation, kind, lead, loops):
    h0, W, V, b = draw(kind, lead, bias=kind != "none")
    spec = engine.Residual(activation, step=1 / 23, inner=0.5, outer=0.7, block=5)  # blocks of 5 over 23 layers
    inputs = [t for t in (h0, W, V, b) if t is not None]
    probe = torch.randn(*lead, 5, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    fused = engine.resnet(h0, W, V, b, spec=spec)
    reference = autograd_resnet(h0, W, V, b, spec)
    assert torch.allclose(fused, reference, rtol=0, atol=1e-13)
    for mine, theirs in zip(torch.autograd.grad((fused * probe).sum(), inputs),
                            torch.autograd.grad((reference * probe).sum(), inputs)):
        assert (mine - theirs).norm() <= 1e-12 * theirs.norm()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gelu_and_its_derivative_equal_torch_on_the_whole_line(dtype, loops):
    x = torch.linspace(-45, 45, 9001, dtype=dtype).requires_grad_()  # far tails: Phi underflows, x phi(x) too
    act = torch.nn.functional.gelu(x)
    (slope,) = torch.autograd.grad(act.sum(), x)
    ours = engine.activation_derivative("gelu", act.detach(), x.detach())
    assert torch.allclose(ours, slope, rtol=0, atol=4 * torch.finfo(dtype).eps)
    h0, W = torch.eye(3, dtype=dtype), torch.linspace(-40, 40, 9, dtype=dtype).reshape(1, 3, 3)
    pre = h0 @ W[0].mT
    states = engine.forward(h0, W, None, None, engine.Residual("gelu")).states  # h1 = h0 + gelu(W h0)
    assert torch.allclose(states[1] - h0, torch.nn.functional.gelu(pre), rtol=0, atol=4 * torch.finfo(dtype).eps * 40)
    W.requires_grad_()
    (through,) = torch.autograd.grad(engine.resnet(h0, W, None, None, spec=engine.Residual("gelu")).sum(), W)
    w = W[0].detach().requires_grad_()
    (expected,) = torch.autograd.grad(torch.nn.functional.gelu(w).sum(), w)
    assert torch.allclose(through[0], expected, rtol=0, atol=4 * torch.finfo(dtype).eps)  # d sum h1 / dW = GELU'(W)


def test_fused_gradient_passes_gradcheck(loops):
    h0, W, V, b = draw("matrix", depth=4, n=3, q=2)
    spec = engine.Residual("gelu", step=0.25, block=3)
    assert torch.autograd.gradcheck(lambda *a: engine.resnet(*a, spec=spec), (h0, W, V, b))


def test_batched_copies_equal_separate_runs(loops):
    h0, W, V, b = draw("matrix", lead=(3,))
    spec = engine.Residual("tanh", step=0.1)
    together = engine.resnet(h0, W, V, b, spec=spec)
    for s in range(3):  # W[:, s] and b[:, s] are not contiguous
        alone = engine.resnet(h0[s], W[:, s], V[:, s], b[:, s], spec=spec)
        assert torch.allclose(together[s], alone, rtol=0, atol=1e-14)


@pytest.mark.parametrize("q, m, n", [(1, 1, 1), (3, 5, 7), (7, 2, 4), (16, 32, 100), (33, 17, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", models.ACTIVATIONS)
def test_compiled_loops_equal_the_torch_loops(q, m, n, dtype, activation, monkeypatch):
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(q * m + n)
    h0 = torch.randn(2, n, q, generator=g, dtype=dtype)
    W, V, b = (torch.randn(9, 2, *shape, generator=g, dtype=dtype) for shape in ((m, q), (q, m), (m,)))
    W = 10 * W  # pre-activations of size 10: the tails (softplus above its threshold 20, saturated sigmoid)
    probe = torch.randn(2, n, q, generator=g, dtype=dtype)
    spec = engine.Residual(activation, step=0.3 / 9, inner=q**-0.5, outer=m**-0.5, block=4)
    results = {}
    for compiled in (True, False):
        monkeypatch.setattr(native, "enabled", compiled)
        trace = engine.forward(h0, W, V, b, spec)
        results[compiled] = (trace.states.clone(), trace.acts.clone(), *engine.backward(probe, trace, W, V, b, spec))
    tolerance = 50 * torch.finfo(dtype).eps
    for mine, theirs in zip(*results.values()):
        assert (mine - theirs).norm() <= tolerance * theirs.norm()


def test_compiled_float32_loops_round_no_worse_than_torch(monkeypatch):
    """Against float64, over 256 layers: each update is summed apart before it is added to the state (as BLAS
    does). Adding the terms into the state one by one made the float32 error 6 times larger."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(1)
    h0, y = torch.randn(2, 100, 16, generator=g)
    W, V = torch.randn(256, 32, 16, generator=g), 0.1 * torch.randn(256, 16, 32, generator=g)
    spec = engine.Residual("gelu", step=1 / 256, inner=16**-0.5, outer=32**-0.5)
    exact = flow.loss_and_grads(h0.double(), y.double(), {"W": W.double(), "V": V.double()}, spec)
    error = {}
    for compiled in (True, False):
        monkeypatch.setattr(native, "enabled", compiled)
        loss, grads = flow.loss_and_grads(h0, y, {"W": W, "V": V}, spec)
        error[compiled] = max([abs(loss.item() / exact[0].item() - 1)]
                              + [((grads[k].double() - exact[1][k]).norm() / exact[1][k].norm()).item() for k in "WV"])
    assert error[True] <= 1.5 * error[False] + 1e-8, error


def test_torch_loops_switch_the_compiled_loops_off_and_back(monkeypatch):
    monkeypatch.setattr(native, "enabled", True)
    h0 = torch.zeros(2, 3)
    with native.torch_loops():
        assert not native.usable(h0)
        with pytest.raises(RuntimeError), native.torch_loops():
            raise RuntimeError  # restored on the way out of an error too
        assert not native.enabled
    assert native.enabled and native.usable(h0)


def test_without_a_compiler_the_engine_warns_and_runs_its_loops_through_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setenv("RESNODE_CACHE", str(tmp_path))
    native.kernels.cache_clear()
    try:
        h0, W, V, b = draw("matrix")
        spec = engine.Residual("tanh", step=0.1)
        with pytest.warns(RuntimeWarning, match="compiled engine loops are unavailable"):
            out = engine.resnet(h0, W, V, b, spec=spec)
        assert torch.allclose(out, autograd_resnet(h0, W, V, b, spec), rtol=0, atol=1e-13)
        assert not list(tmp_path.rglob("*.so"))
    finally:
        native.kernels.cache_clear()


def test_compiled_kernels_are_cached_on_disk(tmp_path, monkeypatch):
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("RESNODE_CACHE", str(tmp_path))
    native.kernels.cache_clear()
    try:
        assert native.kernels(torch.float32, 5, 3) is not None
        (built,) = tmp_path.rglob("*.so")
        stamp = built.stat().st_mtime_ns
        native.kernels.cache_clear()
        assert native.kernels(torch.float32, 5, 3) is not None and built.stat().st_mtime_ns == stamp
        assert native.kernels(torch.float16, 5, 3) is None  # other dtypes run through torch
    finally:
        native.kernels.cache_clear()


def test_a_truncated_cached_kernel_is_rebuilt_not_loaded(tmp_path, monkeypatch):
    # loading a truncated .so would crash the process with SIGBUS; its checksum catches it first
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("RESNODE_CACHE", str(tmp_path))
    # built by another process: this one must not have it mapped while it is cut short
    build = "import torch; from resnode import native; assert native.kernels(torch.float64, 4, 2) is not None"
    subprocess.run([sys.executable, "-c", build], check=True)
    native.kernels.cache_clear()
    try:
        (built,) = tmp_path.rglob("*.so")
        whole = built.read_bytes()
        built.write_bytes(whole[: len(whole) // 3])
        lib = native.kernels(torch.float64, 4, 2)
        assert lib is not None and built.read_bytes() == whole  # compiled again, bit for bit the same library
    finally:
        native.kernels.cache_clear()


def test_bad_shapes_and_parameters_raise():
    h0, W, V, b = draw("matrix")
    with pytest.raises(ValueError, match="V must be"):
        engine.resnet(h0, W, V[:, :2], b)
    with pytest.raises(ValueError, match="without V"):
        engine.resnet(h0, W, None, b)
    with pytest.raises(ValueError, match="activation"):
        engine.Residual("swish")
    with pytest.raises(ValueError, match="step"):
        engine.Residual("tanh", step=-1.0)


def marion_problem(depth=16, copies=None, seed=0):
    """Weight-tied W, V = 0 (Marion et al.'s initialisation), Gaussian inputs and targets."""
    g = torch.Generator().manual_seed(seed)
    lead = () if copies is None else (copies,)
    x, y = torch.randn(2, 10, 3, generator=g, dtype=torch.float64)
    W = torch.randn(*lead, 4, 3, generator=g, dtype=torch.float64).expand(depth, *lead, 4, 3).clone()
    V = torch.zeros(depth, *lead, 3, 4, dtype=torch.float64)
    spec = engine.Residual("gelu", step=1 / depth, inner=3**-0.5, outer=4**-0.5)
    return x, y, {"W": W, "V": V}, spec


def test_gradient_flow_is_gradient_descent_with_the_depth_factor():
    x, y, weights, spec = marion_problem()
    trained = flow.gradient_flow(x, y, weights, spec, steps=3, dt=0.05)
    W, V = (weights[n].clone().requires_grad_() for n in ("W", "V"))
    opt = torch.optim.SGD([W, V], lr=0.05 * 16)  # eq. (4): dZ_k/dt = -L dl/dZ_k
    for _ in range(3):
        opt.zero_grad()
        ((autograd_resnet(x, W, V, None, spec) - y).square().sum(-1).mean()).backward()
        opt.step()
    assert torch.allclose(trained["W"], W, atol=1e-13) and torch.allclose(trained["V"], V, atol=1e-13)


def test_clipping_bounds_every_coordinate_of_the_update():
    x, y, weights, spec = marion_problem()
    dt = 0.05
    free = flow.gradient_flow(x, y, weights, spec, steps=1, dt=dt)
    free_moved = (free["V"] - weights["V"]).abs()
    clip = free_moved.median().item() / dt  # half the coordinates above the clip, half below
    trained = flow.gradient_flow(x, y, weights, spec, steps=1, dt=dt, clip=clip)
    moved = (trained["V"] - weights["V"]).abs()
    assert moved.max() <= dt * clip * (1 + 1e-12)  # eq. (5): pi bounds the whole right-hand side
    assert free_moved.max() > dt * clip  # the clip was active somewhere...
    small = free_moved < dt * clip
    assert small.any() and torch.allclose(moved[small], free_moved[small])  # ...and left the rest alone


def test_learning_rate_sweep_in_one_pass_equals_separate_runs():
    x, y, weights, spec = marion_problem(copies=2)
    dts = torch.tensor([0.02, 0.1], dtype=torch.float64)
    together = flow.gradient_flow(x, y, weights, spec, steps=4, dt=dts)
    for s in range(2):
        alone = flow.gradient_flow(x, y, {n: w[:, s] for n, w in weights.items()}, spec, steps=4, dt=float(dts[s]))
        assert torch.allclose(together["V"][:, s], alone["V"], atol=1e-14)


def test_loss_decreases_and_divergence_is_reported():
    x, y, weights, spec = marion_problem()
    losses = recorders.Loss()
    flow.gradient_flow(x, y, weights, spec, steps=50, dt=0.05, recorders=[losses])
    assert losses.values.shape == (51,) and losses.values[-1] < 0.9 * losses.values[0]
    with pytest.raises(FloatingPointError):
        flow.gradient_flow(x, y, weights, spec, steps=50, dt=1e4)


class Killed(Exception):
    pass


class Interrupt:
    """A recorder that stops the run at iteration ``at``, as a killed process would, while ``armed``."""

    armed = True  # a class attribute: restoring a checkpoint does not re-arm it

    def __init__(self, at):
        self.at = at

    def update(self, t, weights, loss):
        if t == self.at and Interrupt.armed:
            raise Killed


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    x, y, weights, spec = marion_problem()
    full_losses = recorders.Loss()
    full = flow.gradient_flow(x, y, weights, spec, steps=9, dt=0.05, recorders=[full_losses])
    with pytest.raises(Killed):
        flow.gradient_flow(x, y, weights, spec, steps=9, dt=0.05, recorders=[recorders.Loss(), Interrupt(7)],
                           cache_dir=tmp_path, name="run", checkpoint_every=3)
    (path,) = tmp_path.glob("run-*.pt")
    assert torch.load(path, weights_only=True)["state"]["t"] == 6
    losses, Interrupt.armed = recorders.Loss(), False
    resumed = flow.gradient_flow(x, y, weights, spec, steps=9, dt=0.05, recorders=[losses, Interrupt(7)],
                                 cache_dir=tmp_path, name="run", checkpoint_every=3)
    assert torch.equal(resumed["V"], full["V"]) and losses.times == list(range(10))
    assert np.array_equal(losses.values, full_losses.values)


def test_a_flow_never_adopts_the_checkpoint_of_another_configuration(tmp_path):
    """Chapters 04 and 05 share a cache folder; a 5-step call must not return a 20-step run's weights."""
    x, y, weights, spec = marion_problem()
    long = flow.gradient_flow(x, y, weights, spec, steps=20, dt=0.05, cache_dir=tmp_path, name="run")
    short = flow.gradient_flow(x, y, weights, spec, steps=5, dt=0.05, cache_dir=tmp_path, name="run")
    assert torch.equal(short["V"], flow.gradient_flow(x, y, weights, spec, steps=5, dt=0.05)["V"])
    assert not torch.equal(short["V"], long["V"])
    deeper = {n: torch.repeat_interleave(w, 2, dim=0) for n, w in weights.items()}
    wide = flow.gradient_flow(x, y, deeper, engine.Residual(spec.activation, step=spec.step / 2), steps=5, dt=0.05,
                              cache_dir=tmp_path, name="run")
    assert wide["V"].shape[0] == 2 * weights["V"].shape[0] and len(list(tmp_path.glob("run-*.pt"))) == 3


def test_flow_refuses_targets_that_would_broadcast_and_mixed_dtypes():
    x, y, weights, spec = marion_problem()
    with pytest.raises(ValueError, match="y must have the shape of the outputs"):
        flow.gradient_flow(x, y[:, :1], weights, spec, steps=2, dt=0.05)
    with pytest.raises(TypeError, match="one dtype"):
        flow.gradient_flow(x.float(), y, weights, spec, steps=2, dt=0.05)


def test_a_loss_growing_a_million_times_without_overflowing_is_divergence():
    from resnode import train
    with pytest.raises(train.DivergenceError, match=r"grew from 1 to 2e\+06.*lower dt"):
        train.check_divergence(2e6, 1.0, 7, "dt")
    with pytest.raises(train.DivergenceError, match=r"copies \[1\].*lower dt"):
        train.check_divergence(torch.tensor([0.5, 3e7]), torch.tensor([1.0, 2.0]), 3, "dt")
    train.check_divergence(torch.tensor([0.5, 3e5]), torch.tensor([1.0, 2.0]), 3, "dt")  # grown 1.5e5 times: allowed


def test_max_increment_of_known_weights():
    depth = 5
    V = torch.arange(depth, dtype=torch.float64).reshape(depth, 1, 1).expand(depth, 2, 2) ** 2  # increments 2(2k+1)
    rec = recorders.MaxIncrement([0, 1], names=("V",))
    rec.update(0, {"V": V}, torch.tensor(0.0))
    rec.update(1, {"V": V / 2}, torch.tensor(0.0))
    top, l2 = rec.result("V")
    assert np.allclose(top, [2 * 7, 2 * 7])  # ||.||_F of a 2x2 block of equal entries is 2 |entry|
    squares = sum((2 * (2 * k + 1)) ** 2 for k in range(4))
    assert np.allclose(l2, [0.0, np.sqrt(squares)])  # sums t < T


@pytest.mark.parametrize("chunk_bytes", [1, 100, 2**20])
def test_increments_in_reused_buffers_equal_the_direct_formula(chunk_bytes):
    g = torch.Generator().manual_seed(0)
    buffers = {}
    for stacked, lead in ((torch.randn(37, 3, 4, generator=g), 0), (torch.randn(37, 2, 3, 4, generator=g), 1),
                          (torch.randn(37, 3, 4, generator=g), 0), (torch.randn(1, 3, generator=g), 0)):
        direct = torch.linalg.vector_norm((stacked[1:] - stacked[:-1]).flatten(start_dim=1 + lead), dim=-1)
        assert torch.equal(recorders.increments(stacked, lead, buffers, chunk_bytes), direct)
    rec = recorders.MaxIncrement([0], names=("W",))
    rec.update(0, {"W": torch.randn(9, 2, 2, generator=g)}, torch.tensor(0.0))
    assert rec._buffers and "_buffers" not in rec.__getstate__()  # a checkpoint does not carry them


def test_distance_to_a_reference_on_a_finer_grid():
    fine = torch.linspace(0, 1, 16, dtype=torch.float64).reshape(16, 1, 1)
    snaps = recorders.Snapshots([0], names=("V",))
    snaps.update(0, {"V": fine}, torch.tensor(0.0))
    dist = recorders.DistanceTo(snaps, names=("V",))
    dist.update(0, {"V": fine[::4] + 0.5}, torch.tensor(0.0))
    assert np.allclose(dist.values["V"], [0.5])
    with pytest.raises(ValueError, match="multiple"):
        dist.update(0, {"V": fine[:5]}, torch.tensor(0.0))


def test_a_checkpoint_keeps_distances_but_not_their_reference(tmp_path):
    x, y, weights, spec = marion_problem()
    fine = {name: torch.repeat_interleave(w, 2, dim=0) + 0.1 for name, w in weights.items()}  # a 2L-layer grid
    reference = {t: fine for t in range(10)}
    full = recorders.DistanceTo(reference)
    flow.gradient_flow(x, y, weights, spec, steps=9, dt=0.05, recorders=[full])
    Interrupt.armed = True
    with pytest.raises(Killed):
        flow.gradient_flow(x, y, weights, spec, steps=9, dt=0.05, recorders=[recorders.DistanceTo(reference), Interrupt(7)],
                           cache_dir=tmp_path, name="run", checkpoint_every=3)
    (path,) = tmp_path.glob("run-*.pt")
    saved = torch.load(path, weights_only=True)["state"]["recorders"][0]
    assert "reference" not in saved and len(saved["times"]) == 6  # t = 0 .. 5 recorded before the save at 6
    Interrupt.armed = False
    resumed = recorders.DistanceTo(reference)
    flow.gradient_flow(x, y, weights, spec, steps=9, dt=0.05, recorders=[resumed, Interrupt(7)],
                       cache_dir=tmp_path, name="run", checkpoint_every=3)
    assert resumed.times == list(range(10)) and resumed.reference is not None
    for name in weights:
        assert np.array_equal(resumed.values[name], full.values[name]) and full.values[name].shape == (10,)


def test_fused_resnet_module_equals_the_autograd_one():
    g = torch.Generator().manual_seed(3)
    residual = models.Perceptron(dim=1, width=8, activation="relu", scaled=False, bias=True)
    nets = [models.ResNet(residual, 30, init=("zero", "iid", "iid"), scaling="1", copies=2, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(3), fused=fused) for fused in (False, True)]
    for net in nets:
        net.weights[0].data.normal_(generator=g)
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.linspace(0.5, 1.5, 7, dtype=torch.float64)[:, None].expand(2, 7, 1)
    outs = [net(x) for net in nets]
    assert torch.allclose(outs[0], outs[1], atol=1e-12)
    assert torch.allclose(nets[0](x, trajectory=True), nets[1](x, trajectory=True), atol=1e-12)
    grads = [torch.autograd.grad(o.sum(), list(net.parameters())) for o, net in zip(outs, nets)]
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-12)
    with pytest.raises(ValueError, match="fused"):
        models.ResNet(models.Linear(2), 4, fused=True)
