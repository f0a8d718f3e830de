"""Nothing is lost when a run is killed: each kind of checkpointed training, killed with SIGKILL at random moments
(while importing, training, or writing a checkpoint), then run again, ends bit for bit where an uninterrupted run
ends, and never leaves a checkpoint that cannot be read."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

PROGRAM = Path(__file__).with_name("resumable.py")
KILLS = 3


def launch(kind, cache_dir, out):
    return subprocess.Popen([sys.executable, str(PROGRAM), kind, str(cache_dir), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(process):
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    return stderr


def same(a, b, where="result"):
    """Bit-for-bit equality of nested dicts, lists, tensors and numbers."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def written(cache):
    """The checkpoints in ``cache`` and when each was last replaced."""
    return {path: path.stat().st_mtime_ns for path in cache.glob("*.pt")} if cache.exists() else {}


def kill_after_a_checkpoint(process, cache, delay, timeout=120):
    """SIGKILL ``process`` ``delay`` seconds after it next writes a checkpoint (or if it dies first: a failure)."""
    before, deadline = written(cache), time.monotonic() + timeout
    while written(cache) == before:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.002)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)


@pytest.mark.parametrize("kind", ["flow", "sgd", "images"])
def test_killed_runs_resume_to_the_uninterrupted_result_bit_for_bit(kind, tmp_path):
    finish(launch(kind, tmp_path / "straight", tmp_path / "straight.pt"))
    reference = torch.load(tmp_path / "straight.pt", weights_only=False)

    cache, rng = tmp_path / "killed", random.Random(f"{kind}-kills")
    process = launch(kind, cache, tmp_path / "killed.pt")  # killed at once: while importing, before any checkpoint
    time.sleep(rng.uniform(0.05, 0.5))
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    for _ in range(KILLS):  # killed at a random moment after a checkpoint: while training, or writing the next one
        kill_after_a_checkpoint(launch(kind, cache, tmp_path / "killed.pt"), cache, rng.uniform(0.0, 0.15))
    assert not (tmp_path / "killed.pt").exists(), "a run finished before it was killed: the kills test nothing"
    stderr = finish(launch(kind, cache, tmp_path / "killed.pt"))
    assert "could not be read" not in stderr  # the atomic writes never left a broken checkpoint
    assert not list(cache.glob("*.corrupt-*"))
    same(reference, torch.load(tmp_path / "killed.pt", weights_only=False))
