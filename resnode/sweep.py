"""Sweeps of a chapter over a grid of parameters: one papermill run and one record per point, resumable.

Each point runs its notebook with papermill into ``OUT/<stem>/<point>.ipynb`` and leaves ``<point>.json``
beside it: the record that the chapter published (:mod:`resnode.records`) with the point's parameters and
status, also stored in the output notebook's metadata. A point whose JSON says it finished is not run again,
so a killed sweep resumes where it stopped; a point that fails is recorded with its error and the others go
on. Points run on a local process pool (one worker per core by default), or on a Dask distributed cluster.
:func:`table` aggregates the records (CSV, Parquet), :func:`plot` draws a figure's mean and spread over seeds.

From the command line::

    python -m resnode.sweep book/04_finite_time_gradient_flow.ipynb --out runs -p profile smoke \
        --grid seed=0:4 --grid "depths=[[8, 16], [32, 64]]" --csv runs/04.csv
    python -m resnode.sweep book/01_euler_consistency.ipynb --out runs -p profile book --grid seed=0:10 \
        --survey --study book/results/01_euler_consistency.book-seeds.json

On a cluster, start a scheduler and workers that see the same files, and pass its address::

    dask scheduler --scheduler-file sched.json &
    dask worker --scheduler-file sched.json --nthreads 1 &   # one per core or node; one notebook kernel each
    python -m resnode.sweep NOTEBOOK --out runs --grid seed=0:100 --scheduler tcp://HOST:8786

On SLURM, dask-jobqueue starts the workers as jobs (``pip install dask-jobqueue``)::

    from dask_jobqueue import SLURMCluster
    cluster = SLURMCluster(cores=1, processes=1, memory="16GB", walltime="04:00:00", job_extra_directives=["--gres=gpu:1"])
    cluster.scale(jobs=20)
    resnode.sweep.run(NOTEBOOK, points, "runs", scheduler=cluster.scheduler_address)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import itertools
import os
import re
import sys
import time
import traceback
from collections.abc import Iterable, Mapping
from pathlib import Path

from tqdm import tqdm

from . import records

__all__ = ["grid", "zipped", "point_name", "run_point", "run", "table", "plot", "collect", "main"]


def grid(**axes: Iterable) -> list[dict]:
    """Every combination of the axes' values (the last axis varies fastest)."""
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*(list(v) for v in axes.values()))]


def zipped(**axes: Iterable) -> list[dict]:
    """The axes' values taken together, position by position; every axis must have the same length."""
    columns = {name: list(values) for name, values in axes.items()}
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
        raise ValueError(f"zipped axes need the same length; got {({k: len(v) for k, v in columns.items()})}")
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def point_name(point: Mapping, varied: Iterable[str] | None = None) -> str:
    """A file name for a point: its ``name=value`` pairs for the ``varied`` names (all by default), then a short hash
    of every parameter, so that points that differ only in a fixed parameter never share a file."""
    import hashlib
    import json

    varied = list(point) if varied is None else [k for k in point if k in set(varied)]
    text = ",".join(f"{k}={point[k]}" for k in varied)
    digest = hashlib.sha1(json.dumps(point, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return (re.sub(r"[^A-Za-z0-9=,._+-]", "_", text)[:120] or "point") + "." + digest


@contextlib.contextmanager
def _stderr_to(path: Path):
    """Send this process's file descriptor 2, which the notebook's kernel inherits, to ``path`` for the duration: the
    kernel's own messages (and a crashed kernel's last words) stay beside the point instead of in the caller's
    terminal or notebook."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def run_point(notebook: str, out: str, parameters: dict, survey: bool = False, kernel: str = "python3") -> dict:
    """Run one point with papermill and write its record beside the output notebook; returns the record. The
    kernel's standard error goes to ``<point>.log`` beside them.

    A failure does not raise: the record says ``status: "failed"`` with the error and the claims recorded so far
    are lost with the kernel (a claim that fails inside :meth:`resnode.records.Record.claim` is recorded, and with
    ``survey=True`` the run goes on past it).
    """
    import nbformat
    import papermill

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    env_before = os.environ.get(records.SURVEY_ENV)
    os.environ[records.SURVEY_ENV] = "1" if survey else "0"
    try:
        with _stderr_to(out.with_suffix(".log")):
            papermill.execute_notebook(notebook, str(out), parameters=parameters, kernel_name=kernel,
                                       cwd=str(Path(notebook).parent), progress_bar=False)
        record = records.from_notebook(out)
        if record is None:
            raise RuntimeError(f"{notebook} ran but published no record (its last cell calls record.publish())")
        record["status"] = "done"
    except Exception as error:  # isolate the failure: record it and let the sweep go on
        record = {"format": records.FORMAT, "chapter": Path(notebook).stem, "status": "failed",
                  "error": f"{type(error).__name__}: {error}"[-4000:], "traceback": traceback.format_exc()[-4000:],
                  "claims": {}, "figures": {}}
    finally:
        if env_before is None:
            os.environ.pop(records.SURVEY_ENV, None)
        else:
            os.environ[records.SURVEY_ENV] = env_before
    record["point"] = dict(parameters)
    record["notebook"] = Path(notebook).name
    record["point_wall_time_s"] = round(time.perf_counter() - started, 3)
    if out.exists():
        executed = nbformat.read(str(out), as_version=4)
        executed.metadata.setdefault("resnode", {})["record"] = record
        nbformat.write(executed, str(out))
    records.save(record, out.with_suffix(".json"))
    return record


def _check_parameters(notebook: str, points: list[dict]) -> None:
    import papermill

    known = set(papermill.inspect_notebook(notebook))
    for point in points:
        unknown = sorted(set(point) - known)
        if unknown:
            raise ValueError(f"{Path(notebook).name} has no parameter(s) {', '.join(map(repr, unknown))}; "
                             f"its parameters are: {', '.join(sorted(known))}")


def run(notebook: str | os.PathLike, points: Iterable[Mapping], out: str | os.PathLike, *, workers: int | None = None,
        scheduler: str | None = None, survey: bool = False, progress: bool = True, kernel: str = "python3") -> list[dict]:
    """Run ``notebook`` at every point (a dict of parameters); returns the records in the order of ``points``.

    Points run ``workers`` at a time on a local process pool (default: one per core), or, with ``scheduler``
    (``"tcp://HOST:PORT"``), as tasks of that Dask distributed cluster, whose workers must see ``out`` and the
    notebook at the same paths (one machine, or a shared file system). Dask reruns the point of a worker that
    dies on another worker. Points whose record in ``out`` says ``done`` with the same parameters are read back,
    not run again: a killed sweep resumes where it stopped.
    """
    notebook = str(Path(notebook).resolve())
    points = [dict(p) for p in points]
    _check_parameters(notebook, points)
    folder = Path(out).resolve() / Path(notebook).stem
    varied = [k for k in dict.fromkeys(k for p in points for k in p) if len({repr(p.get(k)) for p in points}) > 1]
    paths = [folder / f"{point_name(p, varied)}.ipynb" for p in points]
    if len(set(paths)) != len(paths):
        raise ValueError("two points have the same parameters")
    results: dict[int, dict] = {}
    todo = []
    for i, (point, path) in enumerate(zip(points, paths)):
        try:
            previous = records.load(path.with_suffix(".json"))
        except ValueError:  # none yet, or unreadable: run the point (again)
            previous = {}
        if previous.get("status") == "done" and previous.get("point") == point:
            results[i] = previous
        else:
            todo.append(i)
    bar = tqdm(total=len(points), initial=len(points) - len(todo), desc=f"sweep {Path(notebook).stem}",
               disable=not progress)
    arguments = {i: (notebook, str(paths[i]), points[i], survey, kernel) for i in todo}
    if scheduler:
        from distributed import Client, as_completed

        with Client(scheduler) as client:
            futures = {client.submit(run_point, *arguments[i], key=f"{Path(notebook).stem}-{paths[i].stem}",
                                     pure=False): i for i in todo}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
    elif todo:
        workers = workers or os.cpu_count() or 1
        with concurrent.futures.ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
            futures = {pool.submit(run_point, *arguments[i]): i for i in todo}
            for future in concurrent.futures.as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
    bar.close()
    return [results[i] for i in range(len(points))]


def table(results: Iterable[Mapping]):
    """Records as a long pandas table: one row per point, claim and scalar figure (``claim`` is empty for the run's
    own figures), with the point's parameters as columns, ``status``, ``passed``, ``figure`` and ``value``."""
    import pandas as pd

    rows = []
    for record in results:
        base = {**record.get("point", {}), "status": record.get("status"), "chapter": record.get("chapter")}
        entries = [("", None, record.get("figures", {}))]
        entries += [(name, c.get("passed"), c.get("figures", {})) for name, c in record.get("claims", {}).items()]
        for claim, passed, figures in entries:
            scalars = {k: v for k, v in figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if claim and not scalars:
                rows.append({**base, "claim": claim, "passed": passed, "figure": None, "value": None})
            for figure, value in scalars.items():
                rows.append({**base, "claim": claim, "passed": passed, "figure": figure, "value": float(value)})
        if not record.get("claims") and not record.get("figures"):
            rows.append({**base, "claim": None, "passed": None, "figure": None, "value": None})
    return pd.DataFrame(rows)


def plot(frame, x: str, figure: str, claim: str = "", over: str = "seed", ax=None, label: str | None = None):
    """Mean of one figure against the parameter ``x``, with its min-max band over ``over`` (seeds), from
    :func:`table`; returns the axes."""
    import matplotlib.pyplot as plt

    chosen = frame[(frame["figure"] == figure) & (frame["claim"] == claim)]
    if chosen.empty:
        raise ValueError(f"no figure {figure!r} in claim {claim!r}; figures: {sorted(frame['figure'].dropna().unique())}")
    stats = chosen.groupby(x)["value"].agg(["mean", "min", "max", "count"]).reset_index()
    ax = ax or plt.gca()
    line, = ax.plot(stats[x], stats["mean"], "o-", ms=3, label=label or f"{figure}: mean over {over}")
    ax.fill_between(stats[x], stats["min"], stats["max"], color=line.get_color(), alpha=0.2, lw=0)
    ax.set(xlabel=x, ylabel=figure)
    return ax


def collect(out: str | os.PathLike, notebook: str | None = None) -> list[dict]:
    """Every record of a sweep folder (or of one notebook's sub-folder), sorted by file name."""
    folder = Path(out) if notebook is None else Path(out) / Path(notebook).stem
    return [records.load(p) for p in sorted(folder.rglob("*.json"))]


def _axis(text: str) -> tuple[str, list]:
    name, _, values = text.partition("=")
    if not name or not values:
        raise argparse.ArgumentTypeError(f"an axis is NAME=V1,V2,..., NAME=START:STOP or NAME=[YAML list]; got {text!r}")
    if values.lstrip().startswith("["):
        import yaml

        parsed = yaml.safe_load(values)
        if not isinstance(parsed, list):
            raise argparse.ArgumentTypeError(f"{name}: expected a list, got {values!r}")
        return name, parsed
    if re.fullmatch(r"-?\d+:-?\d+", values):
        start, stop = map(int, values.split(":"))
        return name, list(range(start, stop))
    return name, [_value(v) for v in values.split(",")]


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"True": True, "False": False, "None": None}.get(text, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resnode.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", nargs="?", help="the chapter (or give it in --spec)")
    parser.add_argument("--spec", help="a YAML file with notebook, out, parameters (fixed), and grid or zip (axes)")
    parser.add_argument("--out", help="folder of the output notebooks and records")
    parser.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a parameter fixed for every point")
    parser.add_argument("--grid", action="append", default=[], type=_axis, metavar="NAME=VALUES",
                        help="an axis of the grid: NAME=1,2,4 or NAME=0:10 (every combination is run)")
    parser.add_argument("--zip", action="append", default=[], type=_axis, metavar="NAME=VALUES",
                        help="axes taken together, position by position, instead of every combination")
    parser.add_argument("--workers", type=int, default=None, help="points at a time (default: one per core)")
    parser.add_argument("--scheduler", help="address of a Dask distributed scheduler (tcp://HOST:PORT) to run the points on")
    parser.add_argument("--csv", help="write the aggregated table (one row per point, claim and figure) as CSV")
    parser.add_argument("--parquet", help="write the aggregated table as Parquet")
    parser.add_argument("--survey", action="store_true",
                        help="a failed claim is recorded and the run goes on (set for seed studies)")
    parser.add_argument("--study", help="also write the records as one study JSON (e.g. into book/results/)")
    args = parser.parse_args(argv)
    spec = {}
    if args.spec:
        import yaml

        spec = yaml.safe_load(Path(args.spec).read_text()) or {}
        unknown = set(spec) - {"notebook", "out", "parameters", "grid", "zip"}
        if unknown or ("grid" in spec and "zip" in spec):
            parser.error(f"a spec has notebook, out, parameters, and grid or zip; got {sorted(spec)}")
    args.notebook = args.notebook or spec.get("notebook")
    args.out = args.out or spec.get("out")
    if not args.notebook or not args.out:
        parser.error("give the notebook and --out (or both in --spec)")
    fixed = {**spec.get("parameters", {}), **{name: _value(value) for name, value in args.p}}
    if (args.grid or "grid" in spec) and (args.zip or "zip" in spec):
        parser.error("use --grid or --zip, not both")
    by_grid = bool(args.grid or "grid" in spec)
    axes = {**spec.get("grid", spec.get("zip", {})), **dict(args.grid or args.zip)}
    points = (grid if by_grid else zipped)(**axes) if axes else [{}]
    points = [{**fixed, **p} for p in points]
    results = run(args.notebook, points, args.out, workers=args.workers, scheduler=args.scheduler, survey=args.survey)
    if args.csv or args.parquet:
        frame = table(results)
        if args.csv:
            frame.to_csv(args.csv, index=False)
        if args.parquet:
            frame.to_parquet(args.parquet, index=False)
    failed = [r for r in results if r.get("status") != "done"]
    for r in failed:
        print(f"failed: {r['point']}: {r.get('error', '').splitlines()[-1] if r.get('error') else ''}")
    if args.study:
        varied = ",".join(axes) or "point"
        records.save(records.study(results, varied=varied, notebook=Path(args.notebook).name), args.study)
        print(f"study of {len(results)} runs written to {args.study}")
    print(f"{len(results) - len(failed)} of {len(results)} points done; records in {Path(args.out) / Path(args.notebook).stem}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
