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


@pytest.fixture(scope="module")
def built_book(root, tmp_path_factory):
    """The book built from the stored outputs with warnings as errors; its HTML folder."""
    out = tmp_path_factory.mktemp("book")
    result = subprocess.run(["jupyter-book", "build", str(root), "-W", "--keep-going", "--path-output", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out / "_build" / "html"


def test_book_builds_without_warnings(built_book):
    assert (built_book / "book" / "intro.html").exists()
    for chapter in CHAPTERS:
        page = (built_book / "book" / f"{chapter.stem}.html").read_text()
        assert "Traceback" not in page and "<img" in page, f"{chapter.stem}: missing figures or an error shown"
    assert (built_book / "mathjax" / "tex-chtml.js").exists(), "MathJax is served by the book (tests/setup.sh)"
    assert "cdn.jsdelivr.net" not in (built_book / "book" / "intro.html").read_text()


def test_every_page_renders_offline_in_a_browser(root, built_book):
    """Headless Chromium, no network: maths typeset, images loaded, no console error, figures at >= 0.8 of their
    pixel width at 1280 px. Screenshots go to _build/screenshots/ for a person to look at."""
    from browser import check_pages

    problems = check_pages(built_book, root / "_build" / "screenshots")
    assert not problems, "\n".join(problems)


def test_the_api_reference_covers_every_public_name(root, built_book):
    """Every module declares its public names (``__all__``) and the book's API reference documents each of them."""
    import importlib

    for path in sorted((root / "resnode").glob("*.py")):
        if path.stem.startswith("_"):
            continue
        module = importlib.import_module(f"resnode.{path.stem}")
        assert hasattr(module, "__all__"), f"resnode.{path.stem} declares no __all__"
        page = (built_book / "api" / "resnode" / path.stem / "index.html").read_text()
        missing = [name for name in module.__all__ if f'id="resnode.{path.stem}.{name}"' not in page]
        assert not missing, f"resnode.{path.stem}: not in the API reference: {missing}"
