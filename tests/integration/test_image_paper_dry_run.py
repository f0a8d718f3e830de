"""The image chapters' paper profiles run end to end on the CPU, one epoch, on small files generated in the real
formats (CIFAR-10's python batches, an ImageNet-style folder), and stop at once when the data are missing.

Settings that only size the run are reduced (one epoch, one run, narrow ResNet-101 stages, fewer tied depths);
the architectures' depths, the data pipelines, the checkpoints and the records are the paper profile's. Claims are
recorded, not asserted (survey mode): one epoch on random images says nothing about them.
"""

import pickle
import time

import numpy as np
import papermill
import pytest
from conftest import ROOT

from resnode import records

BOOK = ROOT / "book"


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cifar-10-batches-py")
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 8) for i in range(1, 6)] + [("test_batch", 10)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [int(v) for v in rng.integers(0, 10, n)],
                 b"batch_label": name.encode()}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)
    return folder


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for name in ("n01440764", "n01443537", "n01484850"):
            (root / split / name).mkdir(parents=True)
            for j in range(count):
                Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(root / split / name / f"{j}.JPEG", "JPEG")
    return root


def run_paper(chapter, tmp_path, monkeypatch, environment, **parameters):
    monkeypatch.setenv(records.SURVEY_ENV, "1")
    for key, value in environment.items():
        monkeypatch.setenv(key, str(value))
    out = tmp_path / f"{chapter}.ipynb"
    papermill.execute_notebook(str(BOOK / f"{chapter}.ipynb"), str(out), kernel_name="python3", cwd=str(BOOK), progress_bar=False,
                               parameters={"profile": "paper", "device": "cpu", "epochs": 1, "runs": 1,
                                           "cache_dir": str(tmp_path / "cache"), **parameters})
    record = records.from_notebook(out)
    assert record is not None and record["profile"] == "paper" and record["settings"]["epochs"] == 1
    assert record["claims"] and all(c["passed"] is not None for c in record["claims"].values())
    assert list((tmp_path / "cache").glob("*.pt")), "every training leaves its per-epoch checkpoint"
    return record


def test_marion_paper_profile_dry_run(cifar_dir, tmp_path, monkeypatch):
    record = run_paper("12_marion_cifar", tmp_path, monkeypatch, {"RESNODE_CIFAR10": cifar_dir})
    assert record["settings"]["depth"] == 256 and record["settings"]["dataset"] == "cifar-10"
    assert set(record["claims"]) == {"tied_start_is_constant_in_depth", "tied_smoother_than_iid",
                                     "training_updates_follow_the_start", "increments_fall_like_one_over_depth"}


def test_sander_paper_profile_dry_run_on_cifar(cifar_dir, tmp_path, monkeypatch):
    record = run_paper("13_sander_resnet101", tmp_path, monkeypatch, {"RESNODE_CIFAR10": cifar_dir}, width=4, tied_blocks=[2, 4],
                       finetune_epochs=1)
    settings = record["settings"]
    assert settings["untied_blocks"] == [3, 4, 23, 3] and settings["finetune_blocks"] == [4, 4, 64, 4]
    assert settings["widths"] == [4, 8, 16, 32] and record["figures"]["memory_measure"] == "saved tensors"


def test_sander_paper_profile_dry_run_on_an_image_folder(imagenet_dir, tmp_path, monkeypatch):
    record = run_paper("13_sander_resnet101", tmp_path, monkeypatch, {"RESNODE_IMAGENET": imagenet_dir}, dataset="imagenet",
                       width=2, crop=32, tied_blocks=[4, 8], finetune_epochs=1)
    settings = record["settings"]
    assert settings["dataset"] == "imagenet" and settings["finetune_blocks"] == [100, 100, 100, 100]
    assert settings["stem"] == "imagenet" and settings["finetune_whole"]


@pytest.mark.parametrize("chapter, variable", [("12_marion_cifar", "RESNODE_CIFAR10"), ("13_sander_resnet101", "RESNODE_CIFAR10")])
def test_paper_profile_without_the_data_stops_at_once(chapter, variable, tmp_path, monkeypatch):
    monkeypatch.setenv(variable, str(tmp_path / "nowhere"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/resnode copy either
    start = time.perf_counter()
    with pytest.raises(papermill.PapermillExecutionError) as failure:
        papermill.execute_notebook(str(BOOK / f"{chapter}.ipynb"), str(tmp_path / "out.ipynb"), kernel_name="python3",
                                   cwd=str(BOOK), progress_bar=False, parameters={"profile": "paper", "device": "cpu"})
    assert failure.value.ename == "DatasetNotFoundError" and "cifar-10" in failure.value.evalue
    assert "cifar.html" in failure.value.evalue  # says how to get it
    assert time.perf_counter() - start < 120
