"""The benchmark's images section runs (its smoke mode; nothing is timed here)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_images_benchmark_smoke(tmp_path):
    out = tmp_path / "results.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--only", "images", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    records = json.loads(out.read_text())
    names = {r["name"] for r in records}
    assert {"marion: eager float32", "resnet101: channels_last + bf16 autocast", "step memory, adjoint"} <= names
    memory = {(r["stage3_blocks"], r["name"]): r["step_bytes"] for r in records if "step_bytes" in r}
    assert memory[4, "step memory, adjoint"] == memory[2, "step memory, adjoint"]  # constant in the stage's depth
    assert memory[4, "step memory, backprop"] > memory[2, "step memory, backprop"]
