"""resnode.sweep on a tiny chapter-shaped notebook: records per point, failure isolation, resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time

import nbformat
import papermill
import pytest

from resnode import records, sweep

CELLS = [
    ("profile: str = \"smoke\"  # profile\nseed: int = 0  # seed\nmode: str = \"ok\"  # ok, fail (a claim fails), "
     "crash (an error), slow\nlog: str = \"\"  # a file each finished run appends its seed to", ["parameters"]),
    ("import time\nfrom resnode import profiles, records\nparams = profiles.parameters(globals())\n"
     "cfg = profiles.settings(params, smoke=dict(n=2), book=dict(n=3), paper=dict(n=4))\n"
     "record = records.Record('99_tiny', cfg)", []),
    ("if mode == 'slow':\n    time.sleep(3)\nif mode == 'crash':\n    import os\n    os.write(2, b'kernel stderr: boom')\n"
     "    raise RuntimeError('boom')\n"
     "with record.claim('holds', 'the seed is small'):\n    record.figures(seed_squared=seed ** 2)\n"
     "    assert mode != 'fail', 'asked to fail'", ["nbval-check-output"]),
    ("if log:\n    open(log, 'a').write(f'{seed}\\n')\nrecord.publish();", ["remove-output"]),
]


@pytest.fixture
def tiny(tmp_path):
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for source, tags in CELLS:
        cell = nbformat.v4.new_code_cell(source)
        if tags:
            cell.metadata["tags"] = tags
        notebook.cells.append(cell)
    path = tmp_path / "99_tiny.ipynb"
    nbformat.write(notebook, str(path))
    return path


def test_a_grid_leaves_one_record_per_point_and_isolates_failures(tiny, tmp_path):
    points = sweep.grid(seed=[0, 3], mode=["ok", "fail", "crash"])
    results = sweep.run(tiny, points, tmp_path / "out", workers=2, survey=True, progress=False)
    by = {(r["point"]["seed"], r["point"]["mode"]): r for r in results}
    assert [r["point"] for r in results] == points  # in the order asked
    assert by[3, "ok"]["status"] == "done" and by[3, "ok"]["claims"]["holds"]["figures"] == {"seed_squared": 9}
    assert by[3, "ok"]["settings"] == {"n": 2, "profile": "smoke", "seed": 3, "mode": "ok", "log": ""}
    # survey mode: the failed claim is recorded and the run ends normally
    assert by[0, "fail"]["status"] == "done" and by[0, "fail"]["claims"]["holds"]["passed"] is False
    # an error stops that point only, and is recorded with its message
    assert by[0, "crash"]["status"] == "failed" and "boom" in by[0, "crash"]["error"]
    folder = tmp_path / "out" / "99_tiny"
    assert len(list(folder.glob("*.json"))) == 6 and len(list(folder.glob("*.ipynb"))) == 6
    # the kernel's standard error is kept beside its point, not printed where the sweep runs
    [crash_log] = folder.glob("seed=0,mode=crash.*.log")
    assert "kernel stderr: boom" in crash_log.read_text()
    [stored] = folder.glob("seed=3,mode=ok.*.ipynb")
    assert nbformat.read(str(stored), as_version=4).metadata["resnode"]["record"]["claims"]["holds"]["passed"] is True
    assert records.load(stored.with_suffix(".json")) == by[3, "ok"]
    rows = records.summary(records.study([r for r in results if r["status"] == "done"], varied="seed,mode"))
    assert rows[0]["passed"] == 2 and rows[0]["runs"] == 4


def test_without_survey_a_failed_claim_fails_the_point_and_names_the_claim(tiny, tmp_path):
    [result] = sweep.run(tiny, [{"mode": "fail"}], tmp_path / "out", progress=False)
    assert result["status"] == "failed" and "claim 'holds' failed" in result["error"]


def test_unknown_parameters_are_refused_before_anything_runs(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"no parameter\(s\) 'depth'.*log, mode, profile, seed"):
        sweep.run(tiny, [{"depth": 3}], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    # and the notebook itself refuses one injected by papermill directly
    with pytest.raises(papermill.PapermillExecutionError, match="unknown parameter"):
        papermill.execute_notebook(str(tiny), str(tmp_path / "x.ipynb"), parameters={"depth": 3}, progress_bar=False)


def test_a_killed_sweep_resumes_and_runs_no_finished_point_twice(tiny, tmp_path):
    log = tmp_path / "finished.log"
    out = tmp_path / "out"
    command = [sys.executable, "-m", "resnode.sweep", str(tiny), "--out", str(out), "-p", "mode", "slow", "-p", "log",
               str(log), "--grid", "seed=0:4", "--workers", "1"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "99_tiny").glob("*.json"))) < 1:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the sweep, its worker and the kernel
    process.wait()
    finished_before = len(list((out / "99_tiny").glob("*.json")))
    assert 1 <= finished_before < 4
    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "4 of 4 points done" in rerun.stdout
    seeds = [int(line) for line in log.read_text().split()]
    assert sorted(set(seeds)) == [0, 1, 2, 3]
    # points with a record were not run again; only a point killed mid-way may have run twice
    assert len(seeds) <= 4 + 1
    for seed in range(4):
        [path] = (out / "99_tiny").glob(f"seed={seed}.*.json")
        data = json.loads(path.read_text())
        assert data["status"] == "done" and data["claims"]["holds"]["figures"]["seed_squared"] == seed ** 2


@pytest.fixture
def dask_cluster(tmp_path):
    """A real Dask scheduler and two single-threaded workers on localhost, as separate processes."""
    pytest.importorskip("distributed")
    scheduler_file = tmp_path / "scheduler.json"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--scheduler-file",
                                  str(scheduler_file), "--host", "127.0.0.1", "--port", "0", "--no-dashboard"],
                                 start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 60
    while not scheduler_file.exists() and time.time() < deadline:
        time.sleep(0.2)
    workers = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
                                 str(scheduler_file), "--nthreads", "1", "--no-nanny", "--no-dashboard",
                                 "--name", f"w{i}"], start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env) for i in range(2)]
    address = json.loads(scheduler_file.read_text())["address"]
    from distributed import Client

    with Client(address, timeout=60) as client:
        client.wait_for_workers(2, timeout=60)
    yield address, workers
    for process in [*workers, scheduler]:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_a_dask_cluster_gives_the_local_records_even_when_a_worker_dies(tiny, tmp_path, dask_cluster):
    address, workers = dask_cluster
    points = sweep.grid(seed=[0, 1, 2, 3], mode=["slow"])
    local = sweep.run(tiny, points, tmp_path / "local", workers=2, progress=False)
    killer_done = []

    def kill_one_worker_mid_sweep():
        started = time.time()
        while time.time() - started < 60:  # once the first kernel of the cluster runs, kill a worker
            if any((tmp_path / "cluster" / "99_tiny").glob("*.ipynb")):
                break
            time.sleep(0.1)
        time.sleep(1.0)
        os.killpg(workers[0].pid, signal.SIGKILL)
        killer_done.append(True)

    import threading

    killer = threading.Thread(target=kill_one_worker_mid_sweep)
    killer.start()
    remote = sweep.run(tiny, points, tmp_path / "cluster", scheduler=address, progress=False)
    killer.join()
    assert killer_done and workers[0].poll() is not None  # a worker did die during the sweep
    assert [r["status"] for r in remote] == ["done"] * 4
    assert [r["claims"] for r in remote] == [r["claims"] for r in local]
    assert len(list((tmp_path / "cluster" / "99_tiny").glob("*.json"))) == 4  # one record per point, exactly
