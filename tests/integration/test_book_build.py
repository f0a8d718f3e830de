"""The chapters are stored as they should be, and the book builds from them with warnings as errors."""

import json
import re
import subprocess

import pytest
from conftest import CHAPTERS

ROUNDING_LEVEL = re.compile(r"\d\.?\d*e-(?:1[0-9]|[2-9][0-9]|\d{3})\b")  # 1e-10 and below
BOUND_WORDS = re.compile(r"(<|≤|below|tol|under)\s*=?\s*$")


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
    # claim cells: checked by nbval against the committed outputs on every run, on any CPU
    tags = [set(c.get("metadata", {}).get("tags", [])) for c in code]
    assert not any("claim-output-varies" in t for t in tags), "every claim cell is checked (nbval-check-output)"
    claims = [c for c, t in zip(code, tags) if "nbval-check-output" in t]
    assert claims and all("record.claim(" in "".join(c["source"]) for c in claims), "claim cells check record.claim(...)"
    for index, claim in enumerate(claims):
        text = "".join("".join(o.get("text", "")) for o in claim.get("outputs", []))
        for match in ROUNDING_LEVEL.finditer(text):
            before = text[max(0, match.start() - 12):match.start()]
            assert BOUND_WORDS.search(before), (f"claim cell {index} prints {match.group(0)}: a rounding-level figure "
                                                "differs on another CPU; print the bound it meets instead")
    assert "record.publish()" in "".join(code[-1]["source"]), "the last cell publishes the run's record"


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
