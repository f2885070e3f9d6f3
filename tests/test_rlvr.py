"""rlvr.py: the verifiable reward, and RLVR steps through the command line on a warm-started tiny model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from helpers import supervised_warm_start

import engine as E
import model as M
from evaluate import math_messages
from rlvr import math_reward

ROOT = Path(__file__).resolve().parents[1]


def test_math_reward():
    assert math_reward("so the answer is \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert math_reward("\\boxed{3} first, then \\boxed{4}", "4") == 1.0  # the last box counts
    assert math_reward("\\boxed{4} first, then \\boxed{3}", "4") == 0.0
    assert math_reward("the answer is 4", "4") == 0.0  # no \boxed{}: no reward
    assert math_reward("\\boxed{}", "4") == 0.0
    assert math_reward("\\boxed{12}", 12.0) == 1.0 and math_reward("\\boxed{21}", 12) == 0.0


def test_rlvr_steps_keep_mixed_groups_and_raise_accuracy(tmp_path):
    """Warm start: the model answers \\boxed{9} or \\boxed{8} about equally. RLVR keeps the groups that mix right
    and wrong answers (DAPO's filter), logs the statistics, and moves probability to the right answer."""
    torch.manual_seed(0)
    model, tokenizer = M.load_model("tiny")
    problem = {"id": "p", "problem": "Compute 2+3+4.", "answer": "9"}
    prompt = E.encode_chat(tokenizer, math_messages(problem["problem"]))
    targets = [tokenizer.encode(t, add_special_tokens=False) + model.stop_token_ids[:1]
               for t in ("\\boxed{9}", "\\boxed{8}")]
    supervised_warm_start(model, prompt, targets, steps=40, lr=3e-3)
    M.save_model(model, tokenizer, tmp_path / "warm")
    (tmp_path / "rlvr_train.jsonl").write_text(json.dumps(problem) + "\n")
    (tmp_path / "rlvr_val.jsonl").write_text(json.dumps(problem) + "\n")

    def accuracy(m, samples=256):
        outputs = E.generate(m, [prompt], 12, num_samples=samples, seed=1)
        return sum(math_reward(tokenizer.decode(o, skip_special_tokens=True), "9") for o in outputs) / samples

    before = accuracy(model)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(ROOT / "rlvr.py"), "--model", str(tmp_path / "warm"),
                    "--data", str(tmp_path / "rlvr_train.jsonl"), "--out", str(tmp_path / "run"),
                    "--max-steps", "12", "--batch-prompts", "1", "--group-size", "32", "--max-new-tokens", "12",
                    "--lr", "3e-4", "--eval-every", "6", "--device", "cpu"], check=True, env=env, cwd=tmp_path)
    log = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [entry["step"] for entry in log] == list(range(1, 13))
    for entry in log:
        assert 0.0 < entry["reward_mean"] < 1.0 and entry["kept_groups"] == 1 and entry["format_failure_rate"] == 0
        assert entry["kept_group_rate"] == 1 / entry["groups_drawn"]
    assert "val_score" in log[5] and "val_score" in log[11]
    after = accuracy(M.load_model(tmp_path / "run" / "last")[0])
    print(f"accuracy of 256 samples: {before:.3f} before, {after:.3f} after")
    assert after > before + 0.1, (before, after)
