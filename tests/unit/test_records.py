"""Records of a run (resnode.records) and the chapters' parameter checks (resnode.profiles)."""

import json
import math

import nbformat
import numpy as np
import pytest
import torch

from resnode import profiles, records


def make_record(**settings):
    return records.Record("99_test", {"profile": "smoke", "seed": 0, **settings})


def test_a_claim_that_holds_is_recorded_with_its_figures_at_full_precision(tmp_path):
    record = make_record()
    third = 1 / 3
    with record.claim("slope", "the slope is -1"):
        record.figures(slope=third, values=torch.tensor([1.0, 2.5]), count=np.int64(3))
        assert third < 1
    assert record.claims["slope"]["passed"] is True
    path = records.save(record.data, tmp_path / "r.json")
    back = records.load(path)
    assert back["claims"]["slope"]["figures"] == {"slope": third, "values": [1.0, 2.5], "count": 3}
    assert back["claims"]["slope"]["figures"]["slope"] == third  # bit for bit through JSON
    assert back["provenance"]["torch"] == torch.__version__ and back["settings"]["seed"] == 0


def test_a_failed_claim_raises_naming_it_or_is_recorded_in_survey_mode(monkeypatch, capsys):
    monkeypatch.delenv(records.SURVEY_ENV, raising=False)
    record = make_record()
    with pytest.raises(records.ClaimFailed, match="'bound'.*holds"):
        with record.claim("bound", "the bound holds"):
            record.figures(ratio=0.5)
            assert 0.5 > 1, "ratio below 1"
    assert record.claims["bound"]["passed"] is False and record.claims["bound"]["figures"] == {"ratio": 0.5}
    monkeypatch.setenv(records.SURVEY_ENV, "1")
    with record.claim("other", "another claim"):
        assert False, "fails"
    other = record.claims["other"]
    assert other["passed"] is False and other["figures"] == {} and other["error"].startswith("fails")
    assert "CLAIM FAILED (other)" in capsys.readouterr().out
    # a claim's figures go to the claim; outside a claim, to the run
    record.figures(total=2)
    assert record.data["figures"] == {"total": 2}


def test_other_errors_propagate_and_names_must_be_identifiers():
    record = make_record()
    with pytest.raises(KeyError):
        with record.claim("broken", "raises something else"):
            {}["missing"]
    assert record.claims["broken"]["passed"] is None
    with pytest.raises(ValueError, match="identifier"):
        record.figures(**{"a b": 1})
    with pytest.raises(ValueError, match="identifier"):
        with record.claim("with:colon", "x"):
            pass
    with pytest.raises(ValueError, match="twice"):
        with record.claim("broken", "again"):
            pass
    with pytest.raises(TypeError, match="record holds"):
        record.figures(thing=object())
    record.figures(nan=float("nan"), inf=float("inf"))
    assert record.data["figures"] == {"nan": "nan", "inf": "inf"}  # valid JSON


def test_from_notebook_reads_the_published_record_or_the_metadata(tmp_path):
    record = make_record()
    with record.claim("c", "s"):
        record.figures(x=1.5)
    notebook = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("record.publish()")
    cell.outputs = [nbformat.v4.new_output("display_data", data={records.MIME: {"old": True}}),
                    nbformat.v4.new_output("display_data", data={records.MIME: record.data, "text/plain": "r"})]
    notebook.cells = [cell]
    path = tmp_path / "out.ipynb"
    nbformat.write(notebook, str(path))
    assert records.from_notebook(path)["claims"]["c"]["figures"] == {"x": 1.5}  # the last one published
    notebook.metadata["resnode"] = {"record": {"format": records.FORMAT, "status": "done"}}
    nbformat.write(notebook, str(path))
    assert records.from_notebook(path)["status"] == "done"
    empty = nbformat.v4.new_notebook()
    nbformat.write(empty, str(tmp_path / "empty.ipynb"))
    assert records.from_notebook(tmp_path / "empty.ipynb") is None


def test_load_refuses_what_is_not_a_record(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a resnode record"):
        records.load(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("{truncated")
    with pytest.raises(ValueError, match="cannot read the record .*y.json"):
        records.load(tmp_path / "y.json")


def test_save_is_atomic(tmp_path, monkeypatch):
    path = records.save({"format": records.FORMAT, "a": 1}, tmp_path / "r.json")
    real_replace = records.os.replace

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(records.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        records.save({"format": records.FORMAT, "a": 2}, path)
    monkeypatch.setattr(records.os, "replace", real_replace)
    assert records.load(path)["a"] == 1  # the old file is intact


def study_of(outcomes):
    runs = []
    for seed, (passed, value) in enumerate(outcomes):
        record = make_record(seed=seed)
        if passed is not None:
            record.claims["c"] = {"statement": "c holds", "passed": passed, "figures": {"v": value, "l": [1, 2]}}
        runs.append(record.data)
    return records.study(runs, varied="seed")


def test_summary_counts_seeds_that_passed_and_the_spread_of_each_figure():
    # the third run stopped before the claim: it counts as not passed
    rows = records.summary(study_of([(True, 1.0), (False, 3.0), (None, None), (True, 2.0)]))
    assert rows == [{"claim": "c", "statement": "c holds", "passed": 2, "runs": 4, "figure": "v", "min": 1.0,
                     "median": 2.0, "max": 3.0}]
    table = records.summary_markdown(study_of([(True, 1.0)]))
    assert "| c: c holds | 1 of 1 | v | 1 | 1 | 1 |" in table
    with pytest.raises(ValueError, match="one chapter"):
        records.study([make_record().data, records.Record("98_other", {"profile": "smoke"}).data])


def test_parameters_are_coerced_to_their_declared_types():
    namespace = {"__annotations__": {"profile": str, "seed": int, "depths": list[int] | None, "flag": bool,
                                     "lr": float | None, "steps": int | None},
                 "profile": "book", "seed": "3", "depths": "16,32", "flag": "false", "lr": "1e-3", "steps": "None"}
    values = profiles.parameters(namespace)
    assert values == {"profile": "book", "seed": 3, "depths": [16, 32], "flag": False, "lr": 1e-3, "steps": None}
    assert namespace["depths"] == [16, 32] and namespace["flag"] is False  # written back
    for text, expected in [("yes", True), ("0", False), ("TRUE", True), ("off", False)]:
        namespace["flag"] = text
        assert profiles.parameters(namespace)["flag"] is expected
    namespace["depths"] = "[8, 64]"
    assert profiles.parameters(namespace)["depths"] == [8, 64]
    namespace["seed"] = np.int64(4)
    assert profiles.parameters(namespace)["seed"] == 4
    # the form papermill can read for a sweep axis: a plain `list` or `float`, None meaning the profile's value
    plain = {"__annotations__": {"profile": str, "depths": list, "lr": float}, "profile": "smoke", "depths": "8,16",
             "lr": "None"}
    assert profiles.parameters(plain) == {"profile": "smoke", "depths": [8, 16], "lr": None}


@pytest.mark.parametrize("name, value, message", [
    ("seed", "abc", "'seed' must be an int"),
    ("seed", True, "'seed' must be an int"),
    ("seed", 2.5, "'seed' must be an int"),
    ("flag", "maybe", "'flag' must be a bool"),
    ("depths", "16,abc", "'depths' must be list"),
    ("lr", "fast", "'lr' must be"),
    ("profile", 3, "'profile' must be a string"),
])
def test_a_parameter_of_the_wrong_type_is_refused_naming_it(name, value, message):
    namespace = {"__annotations__": {"profile": str, "seed": int, "depths": list[int] | None, "flag": bool,
                                     "lr": float | None},
                 "profile": "book", "seed": 0, "depths": None, "flag": True, "lr": None, name: value}
    with pytest.raises(TypeError, match=message):
        profiles.parameters(namespace)


def test_unknown_parameters_and_profiles_are_refused():
    namespace = {"__annotations__": {"profile": str, "seed": int}, "profile": "book", "seed": 0, "depths": [1, 2],
                 "math": math, "_private": 1}
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) 'depths'.*profile, seed"):
        profiles.parameters(namespace)
    del namespace["depths"]
    namespace["profile"] = "fast"
    with pytest.raises(ValueError, match="profile must be one of 'smoke', 'book', 'paper'"):
        profiles.parameters(namespace)


def test_settings_take_the_profile_and_parameters_override_unless_none():
    cfg = profiles.settings({"profile": "book", "depths": None, "seed": 2}, smoke={"depths": [1]}, book={"depths": [2]},
                            paper={"depths": [3]})
    assert cfg.depths == [2] and cfg.seed == 2 and cfg.profile == "book"
    cfg = profiles.settings({"profile": "smoke", "depths": [5]}, smoke={"depths": [1]}, book={"depths": [2]},
                            paper={"depths": [3]})
    assert cfg.depths == [5]
    assert profiles.settings("paper", smoke={"a": 1}, book={"a": 2}, paper={"a": 3}).a == 3
    with pytest.raises(ValueError, match="different settings"):
        profiles.settings("book", smoke={"a": 1}, book={"b": 2}, paper={"a": 3})
