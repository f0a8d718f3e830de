"""Every chapter runs end to end under papermill with profile="smoke" at seeds 0-4, and every claim holds.

One class per seed: with ``--dist loadscope`` (tests/run.sh) each seed's chapters run in one worker and the
seeds spread over the workers.
"""

import papermill
import pytest
from conftest import CHAPTERS

from resnode import records

SEEDS = range(5)


def check_smoke_run(chapter, seed, tmp_path, monkeypatch):
    monkeypatch.setenv(records.SURVEY_ENV, "0")  # a failed claim fails the run
    out = tmp_path / chapter.name
    papermill.execute_notebook(str(chapter), str(out), parameters={"profile": "smoke", "seed": seed},
                               kernel_name="python3", cwd=str(chapter.parent), progress_bar=False)
    record = records.from_notebook(out)
    assert record is not None, "the chapter's last cell publishes its record"
    assert record["claims"] and all(c["passed"] for c in record["claims"].values())
    assert record["settings"]["seed"] == seed and record["profile"] == "smoke"
    # the committed seed study checked the claims this chapter makes now
    try:
        study = records.load(records.results_file(f"{chapter.stem}.book-seeds.json"))
    except FileNotFoundError:
        pytest.fail(f"no seed study for {chapter.stem} in book/results (see the chapter's last section)")
    studied = set().union(*(r["claims"] for r in study["records"]))
    assert studied == set(record["claims"]), "the seed study is stale: re-run it (the chapter's last section)"


def _seed_class(seed):
    @pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
    def test_every_claim_holds_with_the_smoke_profile(self, chapter, tmp_path, monkeypatch):
        check_smoke_run(chapter, seed, tmp_path, monkeypatch)

    return type(f"TestSeed{seed}", (), {"test_every_claim_holds_with_the_smoke_profile":
                                        test_every_claim_holds_with_the_smoke_profile})


for _seed in SEEDS:
    globals()[f"TestSeed{_seed}"] = _seed_class(_seed)
