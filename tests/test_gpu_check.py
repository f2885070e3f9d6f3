"""bench/gpu_check.py --smoke: the prepared GPU check runs end to end on CPU with a tiny shape, so it cannot rot."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_check(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke"], capture_output=True,
                            text=True, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")][2:]
    checks = [row.split(" | ")[0].removeprefix("| ") for row in table]
    assert len(checks) == 19 and not any("error:" in row or "FAIL" in row for row in table), "\n".join(table)
    assert checks[0].startswith("logits fp32") and checks[13].startswith("srl.py command line")
    assert checks[8].startswith("sampler, long-tailed") and "8 of 8 rows the same tokens" in table[8]
    assert "steps logged [1, 2, 3]" in table[13]
    assert checks[14].startswith("masked training backward") and "ours finite True" in table[14]
    assert checks[15].startswith("SRL step, LoRA 32") and checks[17].startswith("SRL step, LoRA 32")


def test_gpu_check_only_runs_the_checks_named(tmp_path):
    run = lambda *only: subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--only",
                                        *only], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    result = run("7b")
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")][2:]
    assert result.returncode == 0 and len(rows) == 1 and rows[0].startswith("| Qwen2.5-7B"), result.stdout
    result = run("7b", "nosuchcheck")
    assert result.returncode == 2 and "no check named nosuchcheck" in result.stderr
