"""Records of a chapter's run: its claims, the figures they checked at full precision, and the provenance.

One format for every run of every chapter (``FORMAT``): the book profile re-run by the tests, a paper-scale
run committed to ``book/results/``, one point of a sweep. A chapter makes one :class:`Record` from its
settings, checks each claim inside :meth:`Record.claim`, and publishes the record in its last cell
(:meth:`Record.publish`): as an output of the notebook (read back by :func:`from_notebook`) and as myst-nb
``glue`` values, so that the prose quotes the record instead of copying numbers by hand.

Over seeds, :func:`study` gathers the records of one chapter run at several seeds and :func:`summary` says,
claim by claim, how many seeds passed and the spread of each figure.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import SimpleNamespace

import numpy as np

__all__ = ["FORMAT", "STUDY_FORMAT", "MIME", "SURVEY_ENV", "Record", "ClaimFailed", "provenance", "from_notebook",
           "load", "results_file", "save", "study", "summary", "summary_markdown", "seed_study", "glue"]

FORMAT = "resnode.record/1"
STUDY_FORMAT = "resnode.study/1"
MIME = "application/vnd.resnode.record+json"
SURVEY_ENV = "RESNODE_SURVEY"  # "1": a failed claim is recorded and printed, and the run goes on (seed studies)


class ClaimFailed(AssertionError):
    """A claim's assertion failed; the message names the claim."""


def _plain(value):
    """``value`` as JSON data at full precision: tensors and arrays become (nested) lists of Python numbers."""
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, (np.generic,)):
        return _plain(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # "nan", "inf": JSON has no literal for them
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a record holds numbers, strings, lists and dicts; got {type(value).__name__}")


def _check_name(kind: str, name: str) -> str:
    """Claim and figure names are identifiers, so that the prose can quote them (``{glue:text}`claim.figure:.3g```)."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"a {kind} name must be an identifier (letters, digits, _); got {name!r}")
    return name


def provenance() -> dict:
    """Where and with what a run ran: library versions, machine, CPU and its ATen kernel level, threads, device."""
    import torch

    from . import __version__

    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "resnode": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


class Record:
    """The record of one run of a chapter.

    ``chapter``: the notebook's stem (``"01_euler_consistency"``); ``settings``: the resolved parameters and
    profile settings (a mapping or the namespace of :func:`resnode.profiles.settings`), stored as they are.
    """

    def __init__(self, chapter: str, settings, *, seeds: Iterable[int] | None = None):
        values = vars(settings) if isinstance(settings, SimpleNamespace) else dict(settings)
        self.data = {
            "format": FORMAT,
            "chapter": chapter,
            "profile": values.get("profile"),
            "seeds": None if seeds is None else [int(s) for s in seeds],
            "settings": _plain(values),
            "claims": {},
            "figures": {},
            "provenance": provenance(),
        }
        self._started = time.perf_counter()

    @property
    def claims(self) -> dict:
        """The claims checked so far, by name: ``{"statement", "passed", "figures"}`` (and ``"error"`` if failed)."""
        return self.data["claims"]

    @contextlib.contextmanager
    def claim(self, name: str, statement: str):
        """Check one claim: the block computes its figures, :meth:`figures` records them, and it ``assert`` s.

        The claim passes when the block finishes. A failed ``assert`` marks it failed and raises
        :class:`ClaimFailed` naming it, unless ``RESNODE_SURVEY=1`` (a seed study), where the failure is printed and
        the run goes on. Any other exception propagates as it is.
        """
        _check_name("claim", name)
        if name in self.claims:
            raise ValueError(f"claim {name!r} is checked twice in this record")
        entry = self.claims[name] = {"statement": statement, "passed": None, "figures": {}}
        self._current = entry
        try:
            yield self
        except AssertionError as error:
            entry["passed"] = False
            entry["error"] = str(error) or "assertion failed"
            if os.environ.get(SURVEY_ENV) == "1":
                print(f"CLAIM FAILED ({name}): {statement}: {entry['error']}")
            else:
                raise ClaimFailed(f"claim {name!r} failed: {statement}: {entry['error']}") from error
        else:
            entry["passed"] = True
        finally:
            self._current = None

    def figures(self, **values) -> None:
        """Record figures at full precision: in the claim being checked, else in the run's own figures."""
        target = self._current["figures"] if getattr(self, "_current", None) else self.data["figures"]
        for key, value in values.items():
            target[_check_name("figure", key)] = _plain(value)

    def publish(self) -> dict:
        """End the run: add the wall time, display the record (MIME ``MIME``, read by :func:`from_notebook`), and glue
        every figure for the prose as ``name`` (the run's figures) or ``claim.name`` (a claim's)."""
        self.data["provenance"]["wall_time_s"] = round(time.perf_counter() - self._started, 3)
        from IPython.display import display

        display({MIME: self.data, "text/plain": f"<resnode record of {self.data['chapter']}>"}, raw=True)
        glue(self.data)
        return self.data


def glue(record: Mapping, prefix: str = "") -> None:
    """Glue a record's figures for myst-nb (``{glue:text}`` roles): ``prefix + name`` and ``prefix + claim.name``."""
    from myst_nb import glue as myst_glue

    for key, value in record["figures"].items():
        myst_glue(prefix + key, value, display=False)
    for claim, entry in record["claims"].items():
        for key, value in entry["figures"].items():
            myst_glue(f"{prefix}{claim}.{key}", value, display=False)


def from_notebook(path: str | os.PathLike) -> dict | None:
    """The record that an executed notebook published (its last one), or ``None`` if it published none."""
    import nbformat

    notebook = nbformat.read(str(path), as_version=4)
    stored = notebook.metadata.get("resnode", {}).get("record")
    if stored:
        return dict(stored)
    found = None
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if MIME in output.get("data", {}):
                found = output["data"][MIME]
    return None if found is None else json.loads(json.dumps(found))  # plain dicts, not nbformat's NotebookNode


def save(record: Mapping, path: str | os.PathLike) -> Path:
    """Write a record (or a study) as JSON, atomically: an interrupted write never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
    os.replace(partial, path)
    return path


def results_file(name: str) -> Path:
    """A file of the book's committed results, ``book/results/<name>``, found from the repository root or ``book/``."""
    here = Path.cwd()
    for folder in (here / "results", here / "book" / "results", Path(__file__).resolve().parents[1] / "book" / "results"):
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"no book/results/{name}: run the study or profile that writes it (see the chapter)")


def load(path: str | os.PathLike) -> dict:
    """Read a record or a study written by :func:`save`, checking its format."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read the record {path}: {error}") from None
    if data.get("format") not in (FORMAT, STUDY_FORMAT):
        raise ValueError(f"{path} is not a resnode record (format {data.get('format')!r})")
    return data


def study(records: Iterable[Mapping], **about) -> dict:
    """The records of one chapter at several seeds (or any other varied parameter), as one JSON object."""
    records = [dict(r) for r in records]
    chapters = {r["chapter"] for r in records}
    if len(chapters) != 1:
        raise ValueError(f"a study holds the records of one chapter; got {sorted(chapters)}")
    return {"format": STUDY_FORMAT, "chapter": chapters.pop(), **_plain(about), "records": records}


def summary(study_data: Mapping) -> list[dict]:
    """Claim by claim over a study's records: how many passed, and each scalar figure's min / median / max.

    Returns one row per (claim, figure): ``claim``, ``statement``, ``passed``, ``runs``, ``figure``, ``min``,
    ``median``, ``max`` (figures that are not single numbers are left out). A run that stopped before a claim
    counts as not passed.
    """
    records = study_data["records"]
    names = []
    for record in records:
        names += [n for n in record["claims"] if n not in names]
    rows = []
    for name in names:
        entries = [r["claims"].get(name) for r in records]
        statement = next(e["statement"] for e in entries if e)
        passed = sum(bool(e and e["passed"]) for e in entries)
        keys = []
        for e in entries:
            keys += [k for k in (e or {}).get("figures", {}) if k not in keys]
        numeric = [k for k in keys if all(isinstance((e or {}).get("figures", {}).get(k), (int, float))
                                          and not isinstance(e["figures"][k], bool) for e in entries if e)]
        base = {"claim": name, "statement": statement, "passed": passed, "runs": len(records)}
        if not numeric:
            rows.append({**base, "figure": None, "min": None, "median": None, "max": None})
        for key in numeric:
            values = np.array([e["figures"][key] for e in entries if e and key in e["figures"]], dtype=float)
            rows.append({**base, "figure": key, "min": float(values.min()), "median": float(np.median(values)),
                         "max": float(values.max())})
    return rows


def _number(value: float, digits: int) -> str:
    return f"{value:.{digits}g}" if value is not None else ""


def summary_markdown(study_data: Mapping, digits: int = 3) -> str:
    """:func:`summary` as a Markdown table (claim, seeds passed, figure, min / median / max), for a chapter to show."""
    rows = summary(study_data)
    varied = study_data.get("varied", "seed")
    lines = [f"| claim | passed ({varied}s) | figure | min | median | max |", "|---|---|---|---|---|---|"]
    previous = None
    for row in rows:
        first = row["claim"] != previous
        previous = row["claim"]
        claim = f"{row['claim']}: {row['statement']}".replace("|", "\\|") if first else ""
        passed = f"{row['passed']} of {row['runs']}" if first else ""
        figure = row["figure"].replace("|", "\\|") if row["figure"] else ""
        lines.append(f"| {claim} | {passed} | {figure} | {_number(row['min'], digits)} | "
                     f"{_number(row['median'], digits)} | {_number(row['max'], digits)} |")
    return "\n".join(lines)


def seed_study(chapter: str, profile: str = "book"):
    """The chapter's committed seed study, ``book/results/<chapter>.<profile>-seeds.json``, as a Markdown table to
    display (IPython), headed by when and where it ran; a note saying how to make it when there is none yet."""
    from IPython.display import Markdown

    name = f"{chapter}.{profile}-seeds.json"
    command = (f"python -m resnode.sweep book/{chapter}.ipynb --out runs -p profile {profile} --grid seed=0:10 "
               f"--survey --study book/results/{name}")
    try:
        data = load(results_file(name))
    except FileNotFoundError:
        return Markdown(f"*No seed study recorded yet.* Make it with `{command}`.")
    done = [r for r in data["records"] if r.get("status") == "done"]
    first = (done or data["records"])[0].get("provenance", {})
    head = (f"{len(data['records'])} runs of the `{profile}` profile ({len(done)} ran to the end), seeds "
            f"{', '.join(str(r.get('point', {}).get('seed', '?')) for r in data['records'])}; "
            f"{first.get('date', '?')[:10]}, {first.get('cpu', '?')} ({first.get('cpu_capability', '?')}), "
            f"resnode {first.get('resnode', '?')}, torch {first.get('torch', '?')}. Made by `{command}`.")
    return Markdown(head + "\n\n" + summary_markdown(data))
