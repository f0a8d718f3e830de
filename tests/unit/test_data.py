"""Data loaders, tested on small files written in each dataset's own format."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from resnode import data


def write_idx(path, array, type_code=0x08):
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


@pytest.fixture
def fashion_dir(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("t10k", 5)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    return tmp_path


def test_fashion_mnist_reads_idx_files(fashion_dir):
    train = data.fashion_mnist("train", root=fashion_dir)
    test = data.fashion_mnist("test", root=fashion_dir, limit=3)
    assert train.inputs.shape == (12, 1, 28, 28) and len(test) == 3
    assert 0.0 <= train.inputs.min() and train.inputs.max() <= 1.0
    raw = data.read_idx(fashion_dir / "train-images-idx3-ubyte.gz")
    torch.testing.assert_close(train.inputs[:, 0] * 255, torch.as_tensor(raw, dtype=torch.float32))
    assert train.targets.dtype == torch.long and "Fashion-MNIST train" in train.name


def test_fashion_mnist_from_environment_variable(fashion_dir, monkeypatch):
    monkeypatch.setenv("RESNODE_FASHION_MNIST", str(fashion_dir))
    assert len(data.fashion_mnist("test")) == 5


def test_idx_checks_magic_and_size(tmp_path):
    bad_magic = tmp_path / "bad.gz"
    with gzip.open(bad_magic, "wb") as handle:
        handle.write(b"\x01\x02\x08\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(bad_magic)
    truncated = tmp_path / "short.gz"
    with gzip.open(truncated, "wb") as handle:
        handle.write(b"\x00\x00\x08\x01" + struct.pack(">I", 10) + b"abc")
    with pytest.raises(ValueError, match="announces shape"):
        data.read_idx(truncated)


def test_fashion_mnist_rejects_wrong_image_size(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((2, 27, 28), dtype=np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(2, dtype=np.uint8))
    with pytest.raises(ValueError, match="28x28"):
        data.fashion_mnist(root=tmp_path)


def test_missing_dataset_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.delenv("RESNODE_CIFAR10", raising=False)
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.cifar10(root=tmp_path / "nowhere")
    message = str(info.value)
    assert "cifar-10" in message and "nowhere" in message and "RESNODE_CIFAR10" in message
    assert "cs.toronto.edu" in message


def write_cifar(folder, n=4, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist(), b"batch_label": name.encode()}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
        batches[name] = batch
    return batches


def test_cifar10_reads_python_batches(tmp_path):
    batches = write_cifar(tmp_path / "cifar-10-batches-py")
    train = data.cifar10("train", root=tmp_path / "cifar-10-batches-py")
    test = data.cifar10("test", root=tmp_path / "cifar-10-batches-py")
    assert train.inputs.shape == (20, 3, 32, 32) and test.inputs.shape == (4, 3, 32, 32)
    # channel-major rows: the first 1,024 values are the red plane of image 0
    first = batches["data_batch_1"][b"data"][0]
    torch.testing.assert_close(train.inputs[0, 0].flatten() * 255, torch.as_tensor(first[:1024], dtype=torch.float32))
    assert train.targets[:4].tolist() == batches["data_batch_1"][b"labels"]


def test_cifar10_rejects_malformed_batches(tmp_path):
    folder = tmp_path / "c"
    write_cifar(folder)
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({b"data": np.zeros((2, 100), dtype=np.uint8), b"labels": [0, 1]}, handle)
    with pytest.raises(ValueError, match="3072"):
        data.cifar10("test", root=folder)


def test_synthetic_and_digits():
    a, b = data.synthetic_gaussian(10, 4, seed=1), data.synthetic_gaussian(10, 4, seed=1)
    assert torch.equal(a.inputs, b.inputs) and a.targets.shape == (10, 4)
    digits = data.digits()
    assert digits.inputs.shape == (1797, 1, 8, 8) and set(digits.targets.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="split"):
        data.fashion_mnist("validation")


def test_synthetic_ode_follows_the_euler_scheme_and_is_normalised():
    train, test = data.synthetic_ode(n_train=20, n_test=5, dim=4, seed=3)
    assert train.inputs.shape == (20, 4) and test.targets.shape == (5, 4)
    for part in (train, test):
        torch.testing.assert_close(part.inputs.norm(dim=1), torch.ones(len(part), dtype=torch.float64))
        torch.testing.assert_close(part.targets.norm(dim=1), torch.ones(len(part), dtype=torch.float64))
    x = torch.rand(25, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1
    z = x.clone()
    for t in range(100):  # z_{t+1} = z_t + tanh(sin(5 pi t/100) z_t + cos(5 pi t/100)) / 10
        z = z + torch.tanh(np.sin(np.pi * t / 20) * z + np.cos(np.pi * t / 20)) / 10
    torch.testing.assert_close(train.targets, (z / z.norm(dim=1, keepdim=True))[:20])
    torch.testing.assert_close(train.inputs, (x / x.norm(dim=1, keepdim=True))[:20])


def test_embedded_images_are_25_dimensional_unit_vectors_with_one_hot_targets():
    g = torch.Generator().manual_seed(0)
    images = data.Dataset(torch.rand(6, 1, 28, 28, generator=g), torch.tensor([0, 3, 9, 1, 1, 5]), "test images")
    emb = data.embedded_images(images, seed=2)
    assert emb.inputs.shape == (6, 25) and emb.targets.shape == (6, 25)
    torch.testing.assert_close(emb.inputs.norm(dim=1), torch.ones(6, dtype=torch.float64))
    assert torch.equal(emb.targets.argmax(1), images.targets) and emb.targets.sum() == 6 and emb.targets[:, 10:].sum() == 0
    # the two convolutions are linear + bias: a conv of a constant image is the same constant everywhere
    flat = data.random_conv_embedding(torch.ones(1, 1, 28, 28, dtype=torch.float64))
    torch.testing.assert_close(flat, torch.full((1, 25), 0.2, dtype=torch.float64))
    assert "test images" in emb.name and torch.equal(data.embedded_images(images, seed=2).inputs, emb.inputs)
    with pytest.raises(ValueError, match="images"):
        data.random_conv_embedding(torch.ones(2, 3, 28, 28))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_reads_batches_pickled_with_any_protocol(tmp_path, protocol):
    folder = tmp_path / "c"
    batches = write_cifar(folder)
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump(batches["test_batch"], handle, protocol=protocol)
    assert data.cifar10("test", root=folder).targets.tolist() == batches["test_batch"][b"labels"]


class RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_a_cifar10_batch_that_would_run_code_is_refused_without_running_it(tmp_path, monkeypatch):
    folder = tmp_path / "c"
    write_cifar(folder)
    monkeypatch.chdir(tmp_path)
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({b"data": RunsCode(), b"labels": [0]}, handle)
    with pytest.raises(ValueError, match="test_batch.*posix.system|test_batch.*os.system"):
        data.cifar10("test", root=folder)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("content, message", [
    (lambda good: good[: len(good) // 2], "cannot read the CIFAR-10 batch"),  # truncated
    (lambda good: bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)), "cannot read the CIFAR-10"),
    (lambda good: pickle.dumps({b"pixels": np.zeros((1, 3072), np.uint8)}), r"expected a dict with b'data'"),
    (lambda good: pickle.dumps([1, 2]), "not a CIFAR-10 batch"),
    (lambda good: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0.5, 1]}), "integer labels"),
    (lambda good: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}), "labels in 0..9"),
    (lambda good: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "2 integer labels"),
    (lambda good: pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}), "uint8"),
])
def test_a_corrupted_cifar10_batch_is_refused_naming_the_file(tmp_path, content, message):
    folder = tmp_path / "c"
    write_cifar(folder)
    good = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(content(good))
    with pytest.raises(ValueError, match=message) as error:
        data.cifar10("test", root=folder)
    assert "test_batch" in str(error.value)


@pytest.mark.parametrize("corrupt", ["truncate", "flip", "plain"])
def test_a_corrupted_idx_file_is_refused_naming_the_file(fashion_dir, corrupt):
    path = fashion_dir / "t10k-images-idx3-ubyte.gz"
    raw = path.read_bytes()
    if corrupt == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif corrupt == "flip":
        middle = len(raw) // 2  # inside the compressed data (the CRC at the end catches it)
        path.write_bytes(raw[:middle] + bytes([raw[middle] ^ 0xFF]) + raw[middle + 1:])
    else:
        path.write_bytes(b"this is not gzip at all")
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        data.fashion_mnist("test", root=fashion_dir)


def test_fashion_mnist_labels_outside_0_to_9_and_empty_files_are_refused(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 200, 255], dtype=np.uint8))
    with pytest.raises(ValueError, match="labels must lie in 0..9"):
        data.fashion_mnist("test", root=tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((0, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(0, dtype=np.uint8))
    with pytest.raises(ValueError, match="no images"):
        data.fashion_mnist("test", root=tmp_path)
