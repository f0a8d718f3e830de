"""Initialisations across depth, in particular the Gaussian-process (smooth) one."""

import pytest
import torch

from resnode import init


def test_gaussian_process_has_the_rbf_covariance():
    g = torch.Generator().manual_seed(0)
    n, lengthscale = 40, 0.15
    samples = init.gaussian_process(n, 1 / n, (20000,), lengthscale, std=2.0, generator=g)
    assert samples.shape == (n, 20000)
    empirical = samples @ samples.T / samples.shape[1]
    s = torch.arange(n, dtype=torch.float64) / n
    target = 4.0 * init.rbf_kernel(s[:, None] - s[None, :], lengthscale)
    assert (empirical - target).abs().max() < 0.15  # 20,000 samples: entry-wise std about 0.04
    assert (empirical - target).abs().mean() < 0.04


@pytest.mark.parametrize("lengthscale", [0.15, 1e9])
def test_gaussian_process_covariance_at_any_lengthscale(lengthscale):
    """The circulant path (0.15) and the direct one (a length-scale far beyond the grid, where the circulant padding
    would need terabytes): same RBF covariance; at 1e9 every depth holds the same value (correlation 1)."""
    g = torch.Generator().manual_seed(1)
    n = 12
    samples = init.gaussian_process(n, 1 / n, (20000,), lengthscale, generator=g)
    assert samples.shape == (n, 20000) and torch.isfinite(samples).all()
    s = torch.arange(n, dtype=torch.float64) / n
    target = init.rbf_kernel(s[:, None] - s[None, :], lengthscale)
    assert (samples @ samples.T / samples.shape[1] - target).abs().max() < 0.06  # entry-wise std about 0.01


def test_smooth_weights_have_small_increments_and_iid_do_not():
    g = torch.Generator().manual_seed(1)
    for depth in (64, 512):
        smooth = init.init_weights("smooth", depth, [(4, 4)], lengthscale=0.2, generator=g, dtype=torch.float64)[0]
        iid = init.init_weights("iid", depth, [(4, 4)], generator=g, dtype=torch.float64)[0]
        smooth_step = (smooth[1:] - smooth[:-1]).abs().max().item()
        iid_step = (iid[1:] - iid[:-1]).abs().max().item()
        # A GP path with length-scale l has increments about |ds| / l: of order 1/depth.
        assert smooth_step < 20 / (0.2 * depth)
        assert iid_step > 1.0


def test_tied_and_zero():
    tied, zero = init.init_weights(("tied", "zero"), 5, [(2, 3), (3,)])
    assert torch.equal(tied, tied[:1].expand(5, 2, 3))
    assert tied.abs().sum() > 0 and not zero.any()


def test_bad_kind_or_count():
    with pytest.raises(ValueError, match="init"):
        init.init_weights("gaussian", 4, [(2,)])
    with pytest.raises(ValueError, match="one per weight"):
        init.init_weights(("zero",), 4, [(2,), (2,)])
    with pytest.raises(ValueError, match="lengthscale"):
        init.gaussian_process(4, 0.25, (1,), lengthscale=-1.0)


def test_alternating_flips_sign_every_layer():
    (w,) = init.init_weights("alternating", 7, [(3, 2)], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(w[1:], -w[:-1])
    torch.testing.assert_close(w[::2], w[0].expand(4, 3, 2))


def test_coarsen_samples_the_same_function():
    fine = init.init_weights("smooth", 17, [(2,)], spacing=1 / 16, lengthscale=0.3, generator=torch.Generator().manual_seed(0))
    (coarse,) = init.coarsen(fine, 4)
    assert coarse.shape == (5, 2)
    torch.testing.assert_close(coarse, fine[0][::4])
    with pytest.raises(ValueError, match="divide"):
        init.coarsen(fine, 3)
