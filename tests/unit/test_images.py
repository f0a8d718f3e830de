"""The image-training module: the papers' networks (initialisations, steps, tying), the adjoint per stage, the
data pipeline (crops, flips, ImageNet transforms, batches that do not depend on the workers), the training loop
(schedules, checkpoints keyed by the configuration, exact resume) and the smoothness metric."""

import copy
import math

import numpy as np
import pytest
import torch

from resnode import adjoint, checkpoints, data, images, metrics, train
from resnode.data import Dataset


def toy_images(n=48, channels=1, size=12, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = (0.3 + 0.2 * y[:, None, None, None].float() + 0.05 * torch.randn(n, channels, size, size, generator=g)).clamp(0, 1)
    return Dataset(x, y, f"toy images ({n})")


# --- networks ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", list(images.ACTIVATIONS))
def test_tied_initialisation_gives_zero_increments_and_iid_does_not(activation):
    torch.manual_seed(0)
    tied = images.marion_resnet(5, activation, "tied", in_channels=1, image_size=12)
    iid = images.marion_resnet(5, activation, "iid", in_channels=1, image_size=12)
    assert images.smoothness(tied.stages[0].stack) == {"conv1": 0.0, "conv2": 0.0}
    blocks = tied.stages[0].stack.blocks
    assert len({id(p) for b in blocks for p in b.parameters()}) == 5 * len(list(blocks[0].parameters()))  # not shared
    increments = images.smoothness(iid.stages[0].stack)
    # two independent default (Kaiming-uniform) 16x16x3x3 kernels: ||A - B||_F^2 has mean 2 * 2304 / 3 / fan_in
    expected = math.sqrt(2 * 16 * 16 * 9 * (1 / (16 * 9)) / 3)
    assert 0.8 * expected < increments["conv1"] < 1.2 * expected


def test_marion_network_shapes_and_zero_residual_at_initialisation():
    torch.manual_seed(0)
    net = images.marion_resnet(4, "gelu", "iid", in_channels=3, image_size=32)
    x = torch.rand(5, 3, 32, 32)
    h = net.stem(x)
    assert h.shape == (5, 16, 10, 10)  # the authors' 10x10 map
    torch.testing.assert_close(net.stages[0](h), h)  # bn2 at zero: every block is 0
    assert net(x).shape == (5, 10) and net.head[-1].in_features == 64
    assert images.marion_resnet(3, image_size=28, in_channels=1).head[-1].in_features == 64  # 28 -> 9 -> 2


def constant_block(channels, value):
    block = images.ConvBNBlock(channels)
    torch.nn.init.constant_(block.bn2.bias, value)  # bn2's weight is 0: the block returns `value` everywhere
    return block


@pytest.mark.parametrize("depth", [1, 3, 7])
def test_the_step_is_one_over_depth(depth):
    # L blocks each returning the constant b: h_L = h_0 + L * (1/L) * b = h_0 + b whatever the depth
    net = images.marion_resnet(depth, in_channels=1, image_size=12, block=lambda c: constant_block(c, 0.25))
    h = torch.randn(2, 16, 3, 3)
    torch.testing.assert_close(net.stages[0](h), h + 0.25)


def test_sander_stages_step_tying_and_adjoint_stages():
    blocks, widths = (2, 3, 5), (2, 4, 8)
    scaled = images.sander_resnet(blocks, widths, tied=True, in_channels=1, adjoint_stages=(3,))
    plain = images.sander_resnet(blocks, widths, tied=False, scaling=False, in_channels=1)
    assert [s.stack.step for s in plain.stages] == [1.0, 1.0, 1.0]
    assert [len(s.stack.blocks) for s in scaled.stages] == [1, 2, 4]
    assert [s.tied for s in scaled.stages] == [False, True, True] and not any(s.tied for s in plain.stages)
    assert [s.stack.backward for s in scaled.stages] == ["backprop", "backprop", "adjoint"]
    # tied: one block's parameters per stage, whatever its depth
    one = sum(p.numel() for p in scaled.stages[2].stack.blocks[0].parameters())
    assert sum(p.numel() for p in scaled.stages[2].stack.parameters()) == one
    x = torch.rand(3, 1, 16, 16)
    assert scaled(x).shape == (3, 10) and plain(x).shape == (3, 10)
    images.set_backward(scaled, "backprop")
    assert all(s.stack.backward == "backprop" for s in scaled.stages)
    with pytest.raises(ValueError, match="adjoint_stages"):
        images.sander_resnet(blocks, widths, adjoint_stages=(4,))


def test_resnet101_has_the_papers_blocks():
    net = images.sander_resnet(images.RESNET101)
    assert [1 + len(s.stack.blocks) for s in net.stages] == [3, 4, 23, 3]
    assert [s.stack.step for s in net.stages] == [None] * 4  # 1/(n-1) per stage
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(42.5e6, rel=0.01)  # ResNet-101 for CIFAR-10


def test_untying_a_tied_network_keeps_its_function_at_the_same_depth_and_converges_with_depth():
    torch.manual_seed(0)
    tied = images.sander_resnet((2, 4), (2, 4), tied=True, in_channels=1).double().eval()
    for block in tied.stages[1].stack.blocks[:1]:  # make the residual non-trivial
        torch.nn.init.normal_(block.body[-1].weight, 1.0, 0.3)
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    same = images.transfer(tied, images.sander_resnet((2, 4), (2, 4), in_channels=1).double().eval())
    assert not same.stages[1].tied
    torch.testing.assert_close(same(x), tied(x))
    # deeper untied copies integrate the same ODE with finer steps: the output converges, error ~ 1/N (Euler)
    outs = {}
    for n in (8, 16, 32, 64):
        deep = images.transfer(tied, images.sander_resnet((2, n), (2, 4), in_channels=1).double().eval())
        outs[n] = deep(x)
    gaps = [(outs[n] - outs[2 * n]).norm().item() for n in (8, 16, 32)]
    assert -1.3 < metrics.loglog_slope([8, 16, 32], gaps) < -0.7


def stage_gradient_errors(depths, activation):
    """Relative error of the adjoint's gradient for one stage of identical conv-BN blocks (float64): a tied stage
    untied into ``n`` copies, as in Sander et al.'s Table 2."""
    block = lambda channels, width: images.ConvBNBlock(channels, activation)
    torch.manual_seed(0)
    tied = images.sander_resnet((1, 2), (2, 2), tied=True, in_channels=1, block=block).double()
    torch.nn.init.normal_(tied.stages[1].stack.blocks[0].bn2.weight, 1.0, 0.2)  # a non-zero residual
    x = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.arange(8) % 10
    errors = []
    for n in depths:
        net = images.transfer(tied, images.sander_resnet((1, n + 1), (2, 2), in_channels=1, block=block).double())
        stage = net.stages[1]
        with torch.no_grad():
            h = stage.transition(net.stages[0](net.stem(x)))
        loss = lambda stack: torch.nn.functional.cross_entropy(net.head(stage.after(stack(h))), y)
        errors.append(adjoint.gradient_errors(loss, stage.stack)["(all)"])
    return errors


def test_adjoint_gradients_of_a_stage_converge_like_one_over_depth():
    # Sander et al. Prop. 4: with step 1/N and smooth residuals independent of N, the adjoint's gradient error is
    # O(1/N). (With ReLU the Jacobian jumps where a pre-activation changes sign, and the decay is slower.)
    depths = [4, 8, 16]
    errors = stage_gradient_errors(depths, "gelu")
    assert errors[0] < 0.5
    assert -1.3 < metrics.loglog_slope(depths, errors) < -0.8


def test_adjoint_of_a_marion_stack_is_exact_while_its_residuals_are_zero():
    torch.manual_seed(0)
    net = images.marion_resnet(6, "gelu", "iid", in_channels=1, image_size=12, backward="adjoint").double()
    x, y = torch.rand(8, 1, 12, 12, dtype=torch.float64), torch.arange(8) % 10
    h = net.stem(x).detach()
    loss = lambda stack: torch.nn.functional.cross_entropy(net.head(stack(h)), y)
    assert adjoint.gradient_errors(loss, net.stages[0].stack)["(all)"] < 1e-10


def test_increments_are_the_frobenius_norms_of_consecutive_differences():
    net = images.marion_resnet(3, in_channels=1, image_size=12, init="tied")
    stack = net.stages[0].stack
    with torch.no_grad():
        stack.blocks[1].conv1.weight.add_(1.0)  # differs from blocks 0 and 2 by all-ones (2304 entries)
    torch.testing.assert_close(images.increments(stack, "conv1"), torch.full((2,), 48.0, dtype=torch.float64))
    assert images.smoothness(stack) == {"conv1": pytest.approx(48.0, rel=1e-6), "conv2": 0.0}
    assert images.across_depth(stack, "conv2").shape == (3, 16, 16, 3, 3)


# --- data pipeline ----------------------------------------------------------------------------------------

def test_crop_and_flip_are_windows_of_the_padded_image_and_mirror_images():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(images.crop_and_flip(x, g, padding=0, flip=False), x)
    padded = torch.nn.functional.pad(x, (2,) * 4)
    for seed in range(20):
        out = images.crop_and_flip(x, torch.Generator().manual_seed(seed), padding=2)
        for i in range(2):
            windows = [padded[i, :, r:r + 4, c:c + 4] for r in range(5) for c in range(5)]
            assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)
    flipped = [images.crop_and_flip(x, torch.Generator().manual_seed(s), padding=0) for s in range(40)]
    assert any(torch.equal(f[0], x[0].flip(-1)) for f in flipped) and any(torch.equal(f[0], x[0]) for f in flipped)


def test_imagenet_transforms_shapes_and_constant_images():
    image = torch.full((3, 40, 60), 0.25)
    g = torch.Generator().manual_seed(0)
    crop = images.random_resized_crop(image, 24, g)
    assert crop.shape == (3, 24, 24)
    torch.testing.assert_close(crop, torch.full_like(crop, 0.25))
    centre = images.resize_center_crop(image, 24)
    assert centre.shape == (3, 24, 24)
    ramp = torch.linspace(0, 1, 60).expand(3, 40, 60).contiguous()
    out = images.resize_center_crop(ramp, 24)  # the centre crop of a horizontal ramp is centred on 0.5
    assert abs(out.mean().item() - 0.5) < 1e-3


def test_batches_do_not_depend_on_the_number_of_workers():
    source = images.TensorImages(toy_images(40), mean=(0.5,), std=(0.25,), augmentation=True)
    serial = list(images.batches(source, 16, seed=3, epoch=2))
    parallel = list(images.batches(source, 16, seed=3, epoch=2, workers=2))
    assert len(serial) == 3 and [len(y) for _, y in serial] == [16, 16, 8]
    for (a, ya), (b, yb) in zip(serial, parallel):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    other = list(images.batches(source, 16, seed=3, epoch=3))
    assert not torch.equal(serial[0][1], other[0][1])  # another epoch, another order
    order = torch.cat([y for _, y in images.batches(source, 16)])
    assert torch.equal(order, source.targets)  # evaluation: in order


def test_learning_rate_schedules():
    assert images.learning_rate(0, 10, 0.1, "cosine") == pytest.approx(0.1)
    assert images.learning_rate(5, 10, 0.1, "cosine") == pytest.approx(0.05)
    steps = [images.learning_rate(e, 90, 0.1, "step", milestones=(30, 60)) for e in (0, 29, 30, 59, 60, 89)]
    assert steps == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert images.learning_rate(7, 10, 0.02, "constant") == 0.02
    with pytest.raises(ValueError, match="schedule"):
        images.learning_rate(0, 10, 0.1, "linear")


# --- training ---------------------------------------------------------------------------------------------

def train_run(tmp_path, stops, lr=0.05, augmentation=True, seed=0):
    train, test = toy_images(48), toy_images(24, seed=1)
    history = None
    for stop in stops:  # each call is a fresh process: a new network, everything else from the checkpoint
        torch.manual_seed(seed)
        net = images.marion_resnet(2, "gelu", "iid", in_channels=1, classes=3, image_size=12)
        history = images.fit(net, train, test, 3, batch_size=16, lr=lr, seed=seed, augmentation=augmentation,
                             device="cpu", cache_dir=tmp_path, name="toy", stop_after=stop)
    return history, net


def test_training_learns_and_resumes_bit_for_bit(tmp_path):
    straight, net_a = train_run(tmp_path / "a", [None])
    resumed, net_b = train_run(tmp_path / "b", [1, 2, None])
    assert straight["loss"][-1] < straight["loss"][0] and straight["train_error"][-1] < straight["train_error"][0]
    for key in ("loss", "train_error", "test_error", "test_loss", "lr"):
        assert straight[key] == resumed[key]
    for (k, a), b in zip(net_a.state_dict().items(), net_b.state_dict().values()):
        assert torch.equal(a, b), k
    assert straight["peak_memory"] == [None] * 3 and all(v > 0 for v in straight["images_per_second"])


def test_checkpoints_are_keyed_by_the_configuration(tmp_path):
    train_run(tmp_path, [1], lr=0.05)
    train_run(tmp_path, [1], lr=0.02)  # another learning rate: another file, not a resume of the first
    files = sorted(tmp_path.glob("toy-*.pt"))
    assert len(files) == 2
    keys = [torch.load(f, weights_only=True)["key"]["training"]["lr"] for f in files]
    assert sorted(keys) == [0.02, 0.05]
    history, _ = train_run(tmp_path, [None], lr=0.05)  # resumes the lr = 0.05 run from its epoch 1
    fresh, _ = train_run(tmp_path / "fresh", [None], lr=0.05)
    assert history["loss"] == fresh["loss"]
    target = files[0]
    state = checkpoints.load(target, torch.load(target, weights_only=True)["key"])
    assert len(state["history"]["loss"]) in (1, 3)


def test_fit_trains_only_the_given_parameters_and_applies_group_factors():
    torch.manual_seed(0)
    net = images.sander_resnet((1, 3), (2, 2), in_channels=1, classes=3, adjoint_stages=(2,))
    before = copy.deepcopy(net.state_dict())
    images.fit(net, toy_images(32, size=8), toy_images(16, size=8, seed=1), 1, batch_size=16, lr=0.05,
               device="cpu", parameters=net.stages[1].stack.parameters())
    after = net.state_dict()
    changed = {k for k in before if before[k].dtype.is_floating_point and not torch.equal(before[k], after[k])}
    weights = {k for k in changed if "running" not in k and "num_batches" not in k}
    assert weights and all(k.startswith("stages.1.stack.") for k in weights)
    groups = images.residual_groups(net, 4.0)
    assert groups[0]["lr_factor"] == 4.0 and len(groups[0]["params"]) == len(list(net.stages[1].stack.parameters()))


def test_clip_norm_bounds_every_step():
    # one SGD step without momentum or weight decay moves the parameters by lr times the (clipped) gradient
    torch.manual_seed(0)
    net = images.marion_resnet(2, "relu", "iid", in_channels=1, classes=3, image_size=12)
    before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
    images.fit(net, toy_images(16), toy_images(8), 1, batch_size=16, lr=0.1, momentum=0.0, weight_decay=0.0,
               schedule="constant", clip_norm=1e-3, device="cpu")
    after = torch.cat([p.detach().flatten() for p in net.parameters()])
    assert (after - before).norm().item() == pytest.approx(0.1 * 1e-3, rel=1e-3)
    with pytest.raises(ValueError, match="clip_norm"):
        images.fit(net, toy_images(16), toy_images(8), 1, clip_norm=0.0, device="cpu")


def test_a_diverging_run_names_its_batch_and_epoch():
    torch.manual_seed(0)
    net = images.marion_resnet(2, "relu", "iid", in_channels=1, classes=3, image_size=12)
    with pytest.raises(train.DivergenceError, match=r"iteration \d+ of epoch \d.*lower the learning rate lr"):
        images.fit(net, toy_images(32), toy_images(16), 2, batch_size=16, lr=1e12, weight_decay=0, device="cpu")


@pytest.mark.parametrize("targets, message", [(torch.zeros(0, dtype=torch.long), "holds no examples"),
                                              (torch.zeros(8, 3, dtype=torch.long), "one integer class index"),
                                              (torch.zeros(8), "one integer class index"),
                                              (torch.zeros(5, dtype=torch.long), "one integer class index")])
def test_fit_refuses_empty_data_and_targets_that_are_not_class_indices(targets, message):
    inputs = torch.rand(len(targets) if len(targets) == 0 else 8, 1, 12, 12)
    bad = data.Dataset(inputs, targets, "bad")
    net = images.marion_resnet(2, in_channels=1, classes=3, image_size=12)
    with pytest.raises(ValueError, match=message):
        images.fit(net, bad, toy_images(8), 1, device="cpu")


def test_a_network_with_a_lazy_head_trains():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    history = images.fit(net, toy_images(32), toy_images(16), 2, batch_size=16, lr=0.05, device="cpu")
    assert len(history["loss"]) == 2 and net[-1].weight.shape == (3, 4 * 10 * 10)


def test_step_memory_of_an_adjoint_stack_does_not_grow_with_depth():
    memory = {}
    for mode in ("backprop", "adjoint"):
        for depth in (4, 16):
            torch.manual_seed(0)
            net = images.marion_resnet(depth, in_channels=1, image_size=12, backward=mode)
            measured = images.step_memory(net, torch.rand(8, 1, 12, 12), torch.arange(8) % 10)
            assert measured["measure"] == "saved tensors"
            memory[mode, depth] = measured["bytes"]
    assert memory["adjoint", 16] == memory["adjoint", 4]
    assert memory["backprop", 16] > 3 * memory["backprop", 4] > 3 * memory["adjoint", 4]


def test_evaluate_and_device_resolution():
    net = images.marion_resnet(2, in_channels=1, image_size=12, classes=3)
    result = images.evaluate(net, toy_images(24), device="cpu")
    assert 0 <= result["error"] <= 100 and result["loss"] > 0
    assert images.resolve_device("cpu").type == "cpu"
    assert images.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device"):
        images.resolve_device("tpu")


# --- ImageNet-style folders -------------------------------------------------------------------------------

def write_folder(root, classes=("cat", "dog", "eel"), per_class=3, splits=("train", "val"), size=(20, 28)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for i, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for j in range(per_class):
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                pixels[..., 0] = 40 * i  # the red channel gives the class
                Image.fromarray(pixels).save(folder / f"{j}.{'png' if j % 2 else 'jpg'}", quality=95)
    return root


def test_image_folder_reads_classes_in_order_and_interleaves_a_limit(tmp_path):
    write_folder(tmp_path)
    folder = data.image_folder("train", root=tmp_path)
    assert folder.classes == ("cat", "dog", "eel") and len(folder) == 9
    assert folder.targets.tolist() == [0, 1, 2] * 3  # round robin over the classes
    image = folder.load(1)
    assert image.dtype == torch.uint8 and image.shape == (3, 20, 28)
    assert abs(image[0].float().mean().item() - 40) < 8  # class 1's red channel (a JPEG: nearly)
    small = data.image_folder("val", root=tmp_path, limit=4)
    assert small.targets.tolist() == [0, 1, 2, 0] and "val" in small.name


def test_image_folder_missing_or_corrupt(tmp_path, monkeypatch):
    monkeypatch.setenv("RESNODE_IMAGENET", str(tmp_path / "nowhere"))
    with pytest.raises(data.DatasetNotFoundError, match="RESNODE_IMAGENET"):
        data.image_folder("train")
    write_folder(tmp_path / "in", splits=("train",))
    monkeypatch.setenv("RESNODE_IMAGENET", str(tmp_path / "in"))
    assert len(data.image_folder("train")) == 9
    (tmp_path / "in" / "train" / "cat" / "9.jpg").write_bytes(b"not an image")
    folder = data.image_folder("train")
    with pytest.raises(ValueError, match="9.jpg"):
        folder.load(list(map(str, folder.files)).index(str(tmp_path / "in" / "train" / "cat" / "9.jpg")))


def test_training_on_an_image_folder(tmp_path):
    write_folder(tmp_path, per_class=4)
    train = images.FolderImages(data.image_folder("train", root=tmp_path), crop=16)
    test = images.FolderImages(data.image_folder("val", root=tmp_path), crop=16, augmentation=False)
    x, y = train.batch(torch.arange(5), torch.Generator().manual_seed(0))
    assert x.shape == (5, 3, 16, 16) and y.tolist() == [0, 1, 2, 0, 1]
    a, _ = test.batch(torch.arange(3), None)
    b, _ = test.batch(torch.arange(3), torch.Generator().manual_seed(1))  # no augmentation: the same either way
    assert torch.equal(a, b)
    torch.manual_seed(0)
    net = images.sander_resnet((1, 2), (2, 2), stem="imagenet", classes=3)
    history = images.fit(net, train, test, 1, batch_size=6, device="cpu")
    assert len(history["test_error"]) == 1


def test_synthetic_images_are_learnable_shapes():
    images_ = data.synthetic_images(60, channels=2, size=12, classes=3, seed=4)
    assert images_.inputs.shape == (60, 2, 12, 12) and images_.inputs.min() >= 0 and images_.inputs.max() <= 1
    assert torch.bincount(images_.targets).tolist() == [20, 20, 20]
    assert torch.equal(images_.inputs, data.synthetic_images(60, channels=2, size=12, classes=3, seed=4).inputs)
