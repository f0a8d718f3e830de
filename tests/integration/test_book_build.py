"""The chapters are stored as they should be, and the book builds from them with warnings as errors."""

import json
import subprocess

import pytest
from conftest import CHAPTERS


def test_there_is_at_least_one_chapter():
    assert CHAPTERS


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_chapter_is_stored_executed_and_parameterised(chapter):
    cells = json.loads(chapter.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    parameters = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(parameters) == 1, "one cell tagged 'parameters' (papermill reads it)"
    assert 'profile: str = "book"' in "".join(parameters[0]["source"])
    counts = [c["execution_count"] for c in code]
    assert None not in counts and counts == sorted(counts), "run the whole notebook in order before committing"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, "a stored cell output is an error"
    # claim cells: outputs compared by nbval ('nbval-check-output'), or, where the printed figures come from
    # training whose last digits change with the CPU's kernels, run and asserted but not compared ('claim-output-varies')
    claims = [c for c in code if {"nbval-check-output", "claim-output-varies"} & set(c.get("metadata", {}).get("tags", []))]
    assert claims and all("assert" in "".join(c["source"]) for c in claims), "claim cells assert and are checked"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_papermill_lists_every_parameter(chapter):
    # papermill --help-notebook (and a reader planning a sweep) sees the parameters it can parse; a comment
    # with quotes or '=' hides the parameter from it
    import papermill

    cells = json.loads(chapter.read_text())["cells"]
    source = "".join(next(c for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))["source"])
    names = [line.split(":")[0].strip() for line in source.splitlines() if line.strip() and not line.startswith("#")]
    assert list(papermill.inspect_notebook(str(chapter))) == names


def test_book_builds_without_warnings(root, tmp_path):
    result = subprocess.run(["jupyter-book", "build", str(root), "-W", "--keep-going", "--path-output", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    html = tmp_path / "_build" / "html"
    assert (html / "book" / "intro.html").exists()
    for chapter in CHAPTERS:
        page = (html / "book" / f"{chapter.stem}.html").read_text()
        assert "Traceback" not in page and "<img" in page, f"{chapter.stem}: missing figures or an error shown"
