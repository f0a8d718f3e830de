"""Convolutional scaling regimes: spectral norms of convolutions (Sedghi et al.), the paper's norms, the model."""

import math

import numpy as np
import pytest
import torch

from resnode import conv_regimes as cr
from resnode.data import Dataset


def kernel(c_out, c_in, k, seed=0):
    return torch.randn(c_out, c_in, k, k, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("c_out, c_in, k, n", [(3, 2, 3, 5), (4, 4, 3, 4), (2, 3, 3, 2), (2, 3, 5, 3), (2, 2, 3, 1)])
def test_singular_values_are_those_of_the_explicit_operator(c_out, c_in, k, n):
    # n < k exercises the wrap-around (folded) kernel
    K = kernel(c_out, c_in, k)
    M = cr.circular_conv_matrix(K, n)
    assert M.shape == (c_out * n * n, c_in * n * n)
    exact = torch.linalg.svdvals(M)
    fft = cr.conv_singular_values(K, n)
    assert len(fft) == n * n * min(c_out, c_in) == len(exact)
    torch.testing.assert_close(fft, exact, rtol=0, atol=1e-12)


def test_power_iteration_agrees_and_runs_until_it_converges():
    K = kernel(3, 2, 3, seed=2)
    assert cr.power_iteration_norm(K, 5) == pytest.approx(cr.conv_spectral_norm(K, 5), rel=1e-10)
    # two singular values 0.5 % apart: 300 iterations leave an error of 4e-7, the stopping rule goes on
    close = torch.diag(torch.tensor([1.0, 0.995], dtype=torch.float64)).reshape(2, 2, 1, 1)
    assert abs(cr.power_iteration_norm(close, 1, iterations=300) - 1) > 1e-7
    assert abs(cr.power_iteration_norm(close, 1) - 1) < 1e-11


def test_explicit_operator_is_the_padded_convolution():
    K, x = kernel(3, 2, 3), kernel(1, 2, 6, seed=1)
    y = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="circular"), K)
    torch.testing.assert_close(cr.circular_conv_matrix(K, 6) @ x.flatten(), y.flatten())


def test_one_by_one_kernel_has_the_matrix_norm_at_every_size():
    K = kernel(5, 3, 1)
    for n in (1, 4, 7):
        assert cr.conv_spectral_norm(K, n) == pytest.approx(float(torch.linalg.matrix_norm(K[:, :, 0, 0], 2)), rel=1e-12)
        # every frequency sees the same matrix: each singular value repeats n^2 times
        values = cr.conv_singular_values(K, n)
        torch.testing.assert_close(values[::n * n], torch.linalg.svdvals(K[:, :, 0, 0]))


def test_single_channel_norm_is_the_largest_dft_modulus_and_is_scale_equivariant():
    K = kernel(1, 1, 3)
    n = 8
    expected = torch.fft.fft2(K[0, 0], s=(n, n)).abs().max()
    assert cr.conv_spectral_norm(K, n) == pytest.approx(float(expected), rel=1e-12)
    assert cr.conv_spectral_norm(-2.5 * K, n) == pytest.approx(2.5 * float(expected), rel=1e-12)
    # a delta kernel is the identity; an averaging kernel has norm 1 (its DC component)
    delta = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    delta[0, 0, 1, 1] = 1
    assert cr.conv_spectral_norm(delta, n) == pytest.approx(1.0)
    assert cr.conv_spectral_norm(torch.full((1, 1, 3, 3), 1 / 9, dtype=torch.float64), n) == pytest.approx(1.0)


def test_norm_increases_with_the_image_size_towards_the_symbol_supremum():
    # the DFT frequencies of an n-grid are among those of a 2n-grid (folding the kernel samples its symbol),
    # so the norm is non-decreasing along n = 2, 4, 8, ... and bounded by the supremum of the symbol
    K = kernel(2, 2, 3, seed=3)
    norms = [cr.conv_spectral_norm(K, n) for n in (1, 2, 4, 8, 16, 32)]
    assert all(b >= a - 1e-12 for a, b in zip(norms, norms[1:]))
    assert norms[-1] <= cr.conv_spectral_norm(K, 512) + 1e-12


def test_statistics_on_planted_kernels():
    n = 4
    base = kernel(2, 2, 3, seed=5)
    base = base / cr.conv_spectral_norm(base, n)  # unit spectral norm
    L = 6
    scales = [0.5, 0.5, 3.0, 0.5, 0.5, 0.5]  # one large layer: a "sparse" profile
    kernels = [s * base for s in scales]
    stats = cr.scaling_statistics(kernels, [n] * L, beta=0.5)
    assert stats["maximum"] == pytest.approx(3.0)
    assert stats["root_ssq"] == pytest.approx(math.sqrt(5 * 0.25 + 9))
    assert stats["increment"] == pytest.approx(L**0.5 * 2.5)  # |3 - 0.5| times the unit norm
    np.testing.assert_allclose(cr.layer_norms(kernels, [n] * L), scales)
    # kernels of another shape or size are not compared with their neighbours
    mixed = [base, torch.zeros(2, 3, 3, 3, dtype=torch.float64), 2 * base, 5 * base]
    stats = cr.scaling_statistics(mixed, [n] * 4, beta=0.0)
    assert stats["increment"] == pytest.approx(3.0)
    assert math.isnan(cr.scaling_statistics([base, 2 * base], [n, 2])["increment"])


def test_statistics_of_a_smooth_profile_give_regime_one_exponents():
    # K_k = L^-beta f(k/L) K with f Lipschitz: max ~ L^-beta, increment (beta-scaled) ~ 1/L, root SSQ ~ L^(1/2 - beta)
    from resnode.metrics import loglog_slope

    base, beta, n = kernel(2, 2, 3, seed=7), 0.5, 4
    base = base / cr.conv_spectral_norm(base, n)
    depths = [8, 16, 32, 64]
    stats = [cr.scaling_statistics([L**-beta * (1 + math.sin(2 * k / L)) * base for k in range(L)], [n] * L, beta)
             for L in depths]
    assert loglog_slope(depths, [s["maximum"] for s in stats]) == pytest.approx(-beta, abs=0.02)
    assert loglog_slope(depths, [s["root_ssq"] for s in stats]) == pytest.approx(0.5 - beta, abs=0.02)
    assert loglog_slope(depths, [s["increment"] for s in stats]) == pytest.approx(-1.0, abs=0.02)


def test_fold_kernel_sums_taps_modulo_n():
    K = kernel(1, 1, 5)
    folded = cr.fold_kernel(K, 2)
    assert folded.shape == (1, 1, 2, 2)
    assert float(folded[0, 0, 0, 0]) == pytest.approx(float(K[0, 0, ::2, ::2].sum()))
    torch.testing.assert_close(cr.fold_kernel(K, 7)[..., :5, :5], K)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="kernel"):
        cr.conv_spectral_norm(torch.ones(3, 3), 4)
    with pytest.raises(ValueError, match="n must"):
        cr.conv_spectral_norm(kernel(1, 1, 3), 0)
    with pytest.raises(ValueError, match="sizes"):
        cr.layer_norms([kernel(1, 1, 3)], [4, 4])
    with pytest.raises(ValueError, match="which"):
        cr.RegimeResNet((1,), (4,)).kernels("B")
    with pytest.raises(ValueError, match="blocks and channels"):
        cr.RegimeResNet((1, 2), (4,))
    with pytest.raises(ValueError, match="depth"):
        cr.split_depth(1, 2)


def test_paper_depth_grid_and_table():
    assert all(sum(blocks) == L and len(blocks) == 4 for L, blocks in cr.PAPER_BLOCKS.items())
    assert sorted(cr.PAPER_BLOCKS) == [8, 11, 12, 14, 16, 18, 20, 24, 28, 33, 42, 50, 65, 80, 100, 121]
    assert set(cr.PAPER_TEST_ERROR) == set(cr.PAPER_BLOCKS) - {18}
    for depth in range(2, 40):
        for stages in (1, 2, 3, 4):
            if depth >= stages:
                blocks = cr.split_depth(depth, stages)
                assert sum(blocks) == depth and max(blocks) - min(blocks) <= 1 and min(blocks) >= 1
    assert cr.split_depth(10, 3, outer=1) == (1, 8, 1)
    assert cr.split_depth(11, 4, outer=2) == (2, 3, 4, 2)  # the paper's L = 11 row
    with pytest.raises(ValueError, match="depth must be at least 3"):
        cr.split_depth(2, 3, outer=1)
    with pytest.raises(ValueError, match="stages >= 3"):
        cr.split_depth(8, 2, outer=1)


def test_model_shapes_kernels_and_sizes():
    torch.manual_seed(0)
    net = cr.RegimeResNet((2, 3), (4, 8), in_channels=1, classes=7)
    assert net.depth == 5
    x = torch.randn(3, 1, 8, 8)
    assert net(x).shape == (3, 7)
    A, delta = net.kernels("A"), net.kernels("delta")
    assert [tuple(k.shape) for k in A] == [(4, 4, 3, 3)] * 2 + [(8, 4, 3, 3)] + [(8, 8, 3, 3)] * 2
    assert [tuple(k.shape) for k in delta] == [(4, 4, 3, 3)] * 2 + [(8, 8, 3, 3)] * 3
    assert net.input_sizes("A", 8) == [8, 8, 8, 4, 4]
    assert net.input_sizes("delta", 8) == [8, 8, 4, 4, 4]
    # the sizes are those the convolutions really see
    seen = []
    hooks = [b.conv1.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[-1])) for b in net.blocks]
    net(x)
    for h in hooks:
        h.remove()
    assert seen == net.input_sizes("A", 8)
    # the paper's L = 8 network (CIFAR size) has 8 A kernels and ends at 4x4 with 512 channels
    paper = cr.RegimeResNet(cr.PAPER_BLOCKS[8], (64, 128, 256, 512))
    assert paper.depth == 8 and paper.input_sizes("delta", 32)[-1] == 4
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in paper.modules())
    assert all(m.bias is None for m in paper.modules() if isinstance(m, torch.nn.Conv2d))


def test_block_is_equation_3_2():
    torch.manual_seed(1)
    block = cr.RegimeBlock(4, 4)
    h = torch.randn(2, 4, 5, 5)
    relu, conv = torch.relu, torch.nn.functional.conv2d
    expected = relu(h + conv(relu(conv(h, block.conv1.weight, padding=1)), block.conv2.weight, padding=1))
    torch.testing.assert_close(block(h), expected)
    with torch.no_grad():
        block.conv2.weight.zero_()
    torch.testing.assert_close(block(h), relu(h))  # delta = 0: the block is ReLU of the identity


def test_digits_split_is_disjoint_and_standardised():
    train, test = cr.image_data("digits", train_limit=600)
    assert train.inputs.shape == (600, 1, 8, 8) and test.inputs.shape == (500, 1, 8, 8)
    assert abs(float(train.inputs.mean())) < 1e-5 and float(train.inputs.std()) == pytest.approx(1.0, rel=1e-4)
    rows = {tuple(x.flatten().tolist()) for x in train.inputs}
    assert sum(tuple(x.flatten().tolist()) in rows for x in test.inputs) < 10  # digits holds a few duplicate images


def test_missing_cifar_raises_the_library_error(tmp_path, monkeypatch):
    from resnode.data import DatasetNotFoundError

    monkeypatch.setenv("RESNODE_CIFAR10", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="cifar-10"):
        cr.image_data("cifar-10")


def test_run_depth_measures_before_and_after():
    train, test = cr.image_data("digits", train_limit=64)
    out = cr.run_depth((1, 2, 1), (4, 8, 8), train, test, epochs=1, batch_size=32, lr=0.05)
    assert out["model"].depth == 4 and len(out["history"]["loss"]) == 1
    assert len(out["init"]["A"]["layers"]) == 4 and out["trained"]["A"]["maximum"] != out["init"]["A"]["maximum"]


def test_stage_starts_are_the_blocks_that_do_not_grow_with_depth():
    assert cr.stage_starts((1, 22, 1)) == [0, 1, 23]
    assert cr.stage_starts(cr.PAPER_BLOCKS[121]) == [0, 4, 35, 117]
    # with outer stages of fixed size, the number of stage starts is the same at every depth
    assert {len(cr.stage_starts(cr.split_depth(L, 3, outer=1))) for L in (5, 12, 48)} == {3}
    # they are the blocks where the shapes change, and block 0
    net = cr.RegimeResNet((2, 3, 2), (4, 8, 16), in_channels=1)
    changes = [k for k, b in enumerate(net.blocks) if not isinstance(b.shortcut, torch.nn.Identity)]
    assert cr.stage_starts((2, 3, 2)) == [0] + changes


def test_subset_statistics_on_a_planted_profile():
    n, L = 4, 7
    base = kernel(2, 2, 3, seed=11)
    base = base / cr.conv_spectral_norm(base, n)
    scales = [3.0, 0.5, 0.5, 1.0, 0.5, 0.5, 2.0]  # two large outer blocks, a flat middle with one bump
    kernels = [s * base for s in scales]
    norms, increments = cr.layer_norms(kernels, [n] * L), cr.increment_norms(kernels, [n] * L)
    np.testing.assert_allclose(increments, np.abs(np.diff(scales)), rtol=1e-12)
    middle = cr.subset_statistics(norms, increments, range(1, L - 1), beta=0.5)
    assert middle["maximum"] == pytest.approx(1.0) and middle["median"] == pytest.approx(0.5)
    assert middle["root_ssq"] == pytest.approx(math.sqrt(4 * 0.25 + 1)) and middle["count"] == 5
    assert middle["increment"] == pytest.approx(L**0.5 * 0.5)  # only increments inside the middle: |1 - 0.5|
    whole = cr.subset_statistics(norms, increments, range(L))
    assert whole["increment"] == pytest.approx(2.5) and whole["maximum"] == pytest.approx(3.0)
    # the full statistics are the subset statistics of every block
    full = cr.scaling_statistics(kernels, [n] * L, beta=0.5)
    assert full["maximum"] == pytest.approx(3.0) and full["increment"] == pytest.approx(L**0.5 * 2.5)
    # a subset without two consecutive blocks has no increment
    assert math.isnan(cr.subset_statistics(norms, increments, [0, 2, 4])["increment"])
    # a transition (another shape) is never compared with its neighbours
    mixed = [base, torch.zeros(2, 3, 3, 3, dtype=torch.float64), 2 * base]
    assert np.isnan(cr.increment_norms(mixed, [n] * 3)).all()
    with pytest.raises(ValueError, match="keep"):
        cr.subset_statistics(norms, increments, [L])
    with pytest.raises(ValueError, match="increments"):
        cr.subset_statistics(norms, increments[:-1], [0])


def test_update_statistics_measure_what_training_added():
    torch.manual_seed(3)
    net = cr.RegimeResNet((1, 3, 1), (4, 8, 8), in_channels=1)
    start = {w: [k.clone() for k in net.kernels(w)] for w in ("A", "delta")}
    assert max(cr.network_statistics(net, 8, reference=start)["A"]["layers"]) == 0.0  # nothing added yet
    with torch.no_grad():
        for k, block in enumerate(net.blocks):
            block.conv1.weight.mul_(1 + k)  # the update of A_k is k A_k(0)
    update = cr.network_statistics(net, 8, reference=start)["A"]
    initial = cr.layer_norms(start["A"], net.input_sizes("A", 8))
    np.testing.assert_allclose(update["layers"], np.arange(5) * initial, rtol=1e-6)
    assert np.isnan(update["increments"][0])  # A_0 is 4 -> 4 channels, A_1 4 -> 8: not compared
    # A_3 and A_4 (8 -> 8 channels, both on 4 x 4 inputs: the stride comes after A) are compared: 3 A_3(0) vs 4 A_4(0)
    assert update["increments"][3] == pytest.approx(cr.conv_spectral_norm(4 * start["A"][4] - 3 * start["A"][3], 4), rel=1e-6)
    twin = cr.RegimeResNet((1, 3, 1), (4, 8, 8), in_channels=1)
    twin.load_state_dict(net.state_dict())
    assert max(cr.network_statistics(net, 8, reference=twin)["delta"]["layers"]) == 0.0


def test_run_depth_trains_with_crops_lowers_the_loss_and_resumes_from_its_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 2
    x = 0.3 * torch.randn(64, 1, 6, 6, generator=g) + y[:, None, None, None].float()
    two = Dataset(x, y, "two brightness classes")
    kwargs = dict(batch_size=16, lr=0.05, augmentation=True, device="cpu", cache_dir=tmp_path, name="regimes")
    first = cr.run_depth((1, 1), (4, 8), two, two, epochs=3, **kwargs)
    assert first["history"]["loss"][-1] < first["history"]["loss"][0]
    assert first["history"]["lr"][-1] < first["history"]["lr"][0]  # cosine by default
    again = cr.run_depth((1, 1), (4, 8), two, two, epochs=3, **kwargs)  # nothing left to train: the checkpoint's run
    assert again["history"]["loss"] == first["history"]["loss"]
    assert all(torch.equal(a, b) for a, b in zip(first["model"].state_dict().values(), again["model"].state_dict().values()))


def test_run_depth_records_the_update():
    train, test = cr.image_data("digits", train_limit=64)
    out = cr.run_depth((1, 2, 1), (4, 8, 8), train, test, epochs=1, batch_size=32, lr=0.05)
    for which in ("A", "delta"):
        assert len(out["update"][which]["layers"]) == 4 and min(out["update"][which]["layers"]) > 0
        # the triangle inequality: |trained| <= |initial| + |update| per layer
        assert all(t <= i + u + 1e-9 for t, i, u in zip(out["trained"][which]["layers"], out["init"][which]["layers"],
                                                         out["update"][which]["layers"]))
