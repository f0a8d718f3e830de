"""recorders.Clock: the training's own time, kept across a resumed run, and the process's peak memory."""

import pickle
import time

import numpy as np
import torch

from resnode import engine, flow, recorders


def test_clock_sums_the_time_between_updates_and_not_the_gap_of_a_resume():
    clock = recorders.Clock()
    assert np.isnan(clock.per_iteration)
    clock.update(0, {}, torch.tensor(0.0))
    time.sleep(0.05)
    clock.update(1, {}, torch.tensor(0.0))
    assert clock.updates == 1 and 0.04 < clock.seconds < 1.0
    assert clock.peak_rss_bytes > 10 * 2**20  # a Python process with torch: tens of MB at least
    resumed = pickle.loads(pickle.dumps(clock))  # as a checkpoint stores it
    time.sleep(0.2)  # the gap between the checkpoint and the resumption
    resumed.update(2, {}, torch.tensor(0.0))  # the first update after resuming only starts the clock again
    assert resumed.updates == 1 and resumed.seconds == clock.seconds
    time.sleep(0.05)
    resumed.update(3, {}, torch.tensor(0.0))
    assert resumed.updates == 2 and 0.08 < resumed.seconds < 0.2 + clock.seconds


def test_clock_in_a_checkpointed_gradient_flow(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 10, 3, generator=g, dtype=torch.float64)
    weights = {"W": torch.randn(4, 3, generator=g, dtype=torch.float64).expand(8, 4, 3).clone(),
               "V": torch.zeros(8, 3, 4, dtype=torch.float64)}
    spec = engine.Residual("gelu", step=1 / 8)
    clock = recorders.Clock()
    flow.gradient_flow(x, y, weights, spec, steps=5, dt=0.05, recorders=[clock], cache_dir=tmp_path)
    assert clock.updates == 5 and clock.seconds > 0
    reloaded = recorders.Clock()  # a finished run read back from its checkpoint: the totals of the run that trained
    flow.gradient_flow(x, y, weights, spec, steps=5, dt=0.05, recorders=[reloaded], cache_dir=tmp_path)
    assert reloaded.updates == 5 and reloaded.seconds == clock.seconds
