"""The README's quick start runs as printed, and says what it claims (the adjoint's gradients close to backprop's,
the Euler error under Prop. 1's bound)."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_quick_start_runs():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    numbers = re.findall(r"[0-9.]+e[-+][0-9]+", result.stdout)
    gradient, error, bound = map(float, numbers)
    assert gradient < 1e-2 and error <= bound
