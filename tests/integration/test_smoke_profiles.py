"""Every chapter runs end to end under papermill with profile="smoke" (seconds each)."""

import papermill
import pytest
from conftest import CHAPTERS


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_chapter_runs_with_the_smoke_profile(chapter, tmp_path):
    out = tmp_path / chapter.name
    papermill.execute_notebook(str(chapter), str(out), parameters={"profile": "smoke"}, kernel_name="python3",
                               cwd=str(chapter.parent), progress_bar=False)
    assert out.exists()
