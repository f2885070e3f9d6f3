"""walkthrough.py, one SRL step in slow motion: it runs top to bottom, and each cell prints what it explains."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_walkthrough_runs_and_prints_every_piece():
    done = subprocess.run([sys.executable, "walkthrough.py"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(Path.home())})
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert out.count("STEP: ") == 3 and "Write the next step." in out  # the split solution, the prompt
    assert len(re.findall(r"^rollout \d: monologue", out, re.M)) == 8  # G rollouts
    assert re.search(r"M = \d+, T = \d+ \+ \d+, R = 2M/T = (\d\.\d+) = step_similarity \1", out)  # R = 2M/T
    assert "srl_reward -1.0" in out and "a group of equal rewards: False" in out  # -1, dynamic sampling
    assert re.search(r"loss -?\d\.\d+, ratio mean 1\.000, clipped tokens 0%", out)  # one update: the ratio is 1
    assert re.search(r"the same batch again: ratio mean \d\.\d+", out)
    assert re.search(r"mean reward of 64 samples: -?\d\.\d+ before, -?\d\.\d+ after", out)
