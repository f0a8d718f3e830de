"""The benchmark script runs (its smoke mode; nothing is timed here)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_script_smoke(tmp_path):
    out = tmp_path / "results.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--only", "engine",
                             "adjoint", "sweep", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    records = json.loads(out.read_text())
    names = {r["name"] for r in records}
    assert {"adjoint-euler", "engine vs autograd-unbind", "gradient-flow run peak memory", "one point, alone"} <= names
    assert all(r["max_relative_difference"] < 1e-5 for r in records if "max_relative_difference" in r)
