"""resnode.checkpoints: atomic writes, configuration keys, safe loading."""

import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from resnode import checkpoints

KEY = {"depth": 8, "steps": 20, "dt": 0.25, "init": "smooth"}


def test_a_saved_state_comes_back_bit_for_bit_under_its_key(tmp_path):
    state = {"W": torch.randn(8, 3, 4, dtype=torch.float64), "step": 7, "losses": [1.5, 0.25], "name": "run"}
    target = checkpoints.path(tmp_path, "flow", KEY)
    checkpoints.save(target, state, KEY)
    back = checkpoints.load(target, dict(KEY))
    assert torch.equal(back["W"], state["W"]) and back["step"] == 7 and back["losses"] == [1.5, 0.25]
    assert checkpoints.load(tmp_path / "absent.pt", KEY) is None
    assert not list(tmp_path.glob(".*partial"))


def test_each_configuration_has_its_own_file_and_a_stale_one_is_refused_naming_what_differs(tmp_path):
    other = {**KEY, "steps": 5}
    assert checkpoints.path(tmp_path, "flow", KEY) != checkpoints.path(tmp_path, "flow", other)
    target = tmp_path / "shared.pt"
    checkpoints.save(target, {"step": 20}, KEY)
    with pytest.raises(checkpoints.StaleCheckpointError, match=r"shared.pt.*steps differ.*20.*5"):
        checkpoints.load(target, other)


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "foreign"])
def test_an_unreadable_checkpoint_is_moved_aside_and_never_adopted(tmp_path, damage):
    target = tmp_path / "run.pt"
    checkpoints.save(target, {"W": torch.ones(100)}, KEY)
    whole = target.read_bytes()
    target.write_bytes({"empty": b"", "truncated": whole[: len(whole) // 2], "garbage": os.urandom(300),
                        "foreign": pickle.dumps({"state": 1})}[damage])
    with pytest.warns(RuntimeWarning, match="run.pt could not be read.*starting this run afresh"):
        assert checkpoints.load(target, KEY) is None
    assert not target.exists() and len(list(tmp_path.glob("run.pt.corrupt-*"))) == 1


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_checkpoint_that_would_run_code_is_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "evil.pt"
    torch.save({"format": checkpoints.FORMAT, "key": KEY, "state": {"x": RunsCode()}}, target)
    with pytest.warns(RuntimeWarning, match="could not be read"):
        assert checkpoints.load(target, KEY) is None
    assert not (tmp_path / "PWNED").exists()


WRITER = """
import sys, torch
from resnode import checkpoints
target, key = sys.argv[1], {"n": 1}
big = {"W": torch.arange(4_000_000, dtype=torch.float64)}
i = 0
while True:
    big["step"] = i
    checkpoints.save(target, big, key)
    i += 1
"""


def test_killed_while_writing_leaves_a_whole_checkpoint(tmp_path):
    target = tmp_path / "run.pt"
    for delay in (0.6, 0.9, 1.3):
        process = subprocess.Popen([sys.executable, "-c", WRITER, str(target)])
        while not target.exists():
            time.sleep(0.01)
        time.sleep(delay)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        state = checkpoints.load(target, {"n": 1})  # never a half-written file
        assert state is not None and state["W"].numel() == 4_000_000 and float(state["W"][-1]) == 3_999_999
