"""quickstart.py: the miniature study runs every arm through the stages' own command lines and reports each one.

The study's outcome is not asserted here (it is a measurement: see the README); these tests check the machinery
at the smallest sizes. The run test starts every stage as a subprocess (a minute or so); deselect with -m "not slow"."""
import json
import re
import shutil
import statistics

import pytest

import quickstart
from study import plot
from study.report import mean_std, table
from study.stages import progress
from tasks import synthetic


def test_sparkline():
    assert plot.sparkline([0.0, 0.5, 1.0]) == "▁▄█"
    assert plot.sparkline([-1.0, -1.0]) == "▁▁"


def test_table_reports_mean_std_and_every_seed():
    results = {"base": {"accuracy": [0.02, 0.04], "avg@4": [0.01, 0.03], "every_step_right": [0.0, 0.02]},
               "rlvr": {"accuracy": [0.0, 0.1], "avg@4": [0.0, 0.05], "every_step_right": [0.0, 0.0],
                        "kept_group_rate": [0.125, 0.375]}}
    rows = table(results, quickstart.columns(4)).splitlines()
    assert rows[0].startswith("| arm | held-out greedy (%) | avg@4 (%) | greedy, every step right (%)")
    # mean and sample std over the seeds, in percent: 3.0 +- 1.4 and 5.0 +- 7.1
    assert rows[2] == "| base | 3.0 ± 1.4 | 2.0 ± 1.4 | 1.0 ± 1.4 |  | 2.0, 4.0 |"
    assert rows[3] == "| rlvr | 5.0 ± 7.1 | 2.5 ± 3.5 | 0.0 ± 0.0 | 0.25 | 0.0, 10.0 |"
    assert mean_std([0.5]) == (0.5, 0.0)


def test_every_step_right_needs_steps_and_no_wrong_one():
    problem = "Start with 10. Subtract 2, twice. What number do you end with?"
    assert synthetic.every_step_right(problem, "1. Subtract 2: 10 - 2 = 8.\n2. Subtract 2: 8 - 2 = 6.")
    # the right number reached by one slipped step (applied twice) is not a solution with every step right
    assert not synthetic.every_step_right(problem, "1. Subtract 2: 10 - 2 = 6. The answer is \\boxed{6}.")
    assert not synthetic.every_step_right(problem, "The answer is \\boxed{6}.")


def test_check_steps_counts_right_and_slipped_steps():
    problem = "Start with 17. Add 3, 3 times. What number do you end with?"
    expert = "1. Add 3: 17 + 3 = 20.\n2. Add 3: 20 + 3 = 23.\n3. Add 3: 23 + 3 = 26. The answer is \\boxed{26}."
    assert synthetic.check_steps(problem, expert) == (3, 3, 0)
    # step 2 applies the operation twice (the slip); step 3 is right from where step 2 left it; the answer is wrong
    slipped = "1. Add 3: 17 + 3 = 20.\n2. Add 3: 20 + 3 = 26.\n3. Add 3: 26 + 3 = 29. The answer is \\boxed{29}."
    assert synthetic.check_steps(problem, slipped) == (3, 2, 1)
    # other arithmetic is neither; a step out of order ends the count; text that is no step counts nothing
    assert synthetic.check_steps(problem, "1. Add 3: 17 + 3 = 21.\n2. Add 3: 21 + 3 = 24.") == (2, 1, 0)
    assert synthetic.check_steps(problem, "1. Add 3: 17 + 3 = 20.\n3. Add 3: 20 + 3 = 23.") == (1, 1, 0)
    assert synthetic.check_steps(problem, "I think it is 26.") == (0, 0, 0)
    down = "Start with 30. Subtract 4, twice. What number do you end with?"
    assert synthetic.check_steps(down, "1. Subtract 4: 30 - 4 = 22.\n2. Subtract 4: 22 - 4 = 18.") == (2, 1, 1)


@pytest.mark.slow
def test_study_runs_every_arm(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # the text picture, whatever is installed
    out = tmp_path / "study"
    study = ["--out", str(out), "--ablations", "--warm-problems", "24", "--train-problems", "8", "--val-problems", "2",
             "--test-problems", "3", "--hard-steps", "2", "--warm-epochs", "1", "--sft-epochs", "1", "--rl-steps", "2",
             "--prompts", "2", "--group-size", "2", "--srl-new-tokens", "8", "--solution-tokens", "8", "--samples", "2"]
    quickstart.main(study)
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    arms = ["base", "sft", "rlvr", "sft_rlvr", "srl", "srl_rlvr", "srl_no_ds", "srl_one_step"]
    assert list(summary["arms"]) == arms
    assert summary["settings"]["seeds"] == [0] and summary["settings"]["rollouts_per_rl_stage"] == 2 * 2 * 2
    for arm in arms:
        result = summary["arms"][arm]
        assert len(result["accuracy"]) == 1 and 0.0 <= result["accuracy"][0] <= 1.0
        assert 0.0 <= result["avg@2"][0] <= 1.0
        assert 0.0 <= result["every_step_right"][0] <= result["accuracy"][0]
        eval_summary = json.loads((out / "seed0" / "eval" / arm / "summary.json").read_text().splitlines()[0])
        assert eval_summary["results"]["test"]["problems"] == 3  # the held-out test problems, all of them
        assert f"| {arm} |" in printed
    for arm in ["rlvr", "sft_rlvr", "srl", "srl_rlvr", "srl_no_ds", "srl_one_step"]:
        metrics = [json.loads(line) for line in (out / "seed0" / arm / "metrics.jsonl").read_text().splitlines()]
        # the same sampling budget for every RL stage: each step draws --prompts groups once, never more
        assert [m["groups_drawn"] for m in metrics] == [2, 2]
        assert summary["arms"][arm]["reward_curve"] == [[m["reward_mean"] for m in metrics]]
        assert summary["arms"][arm]["kept_group_rate"] == [statistics.mean(m["kept_group_rate"] for m in metrics)]
    # dynamic sampling off keeps every group, whatever the rewards
    assert summary["arms"]["srl_no_ds"]["kept_group_rate"] == [1.0]
    # the held-out test problems reach no training file, and the one-step data keeps the same split
    data = out / "seed0" / "data"
    test_ids = {json.loads(line)["id"] for line in (data / "test.jsonl").read_text().splitlines()}
    for name in ("srl_train", "rlvr_train", "sft_train", "srl_val", "rlvr_val"):
        assert not test_ids & {json.loads(line)["id"] for line in (data / f"{name}.jsonl").read_text().splitlines()}
    one_step_file = out / "seed0" / "data_one_step" / "srl_train.jsonl"
    one_step = [json.loads(line) for line in one_step_file.read_text().splitlines()]
    train_ids = {json.loads(line)["id"] for line in (data / "rlvr_train.jsonl").read_text().splitlines()}
    assert {e["id"] for e in one_step} == train_ids and all(e["previous_steps"] == [] for e in one_step)
    # the warm start fitted its own tokenizer: the base's vocabulary is not the 259 byte-level tokens
    assert json.loads((out / "seed0" / "base" / "last" / "config.json").read_text())["vocab_size"] != 259
    assert "SRL: mean step-similarity reward" in printed and "kept-group rate" in printed  # the text picture
    assert "held-out greedy accuracy (%): base" in printed
    quickstart.main(["--out", str(out), "--probe", str(out / "seed0" / "base" / "last")])
    probe = capsys.readouterr().out
    srl_val = (out / "seed0" / "data" / "srl_val.jsonl").read_text().splitlines()
    assert "steps of whole solutions: greedy right" in probe and f"({len(srl_val)} examples)" in probe

    # the same command again, as after a stop: the finished training stages continue (nothing left), the written
    # evaluations are kept, the one not yet run runs, and the numbers are the ones of the first run
    shutil.rmtree(out / "seed0" / "eval" / "srl")
    quickstart.main(study)
    again = capsys.readouterr().out
    started = re.findall(r"^=== (\S+): .*$", again, re.M)
    assert [name for name in started if name.startswith("eval_")] == ["eval_srl"]
    trained = re.findall(r"^=== (?!eval_|seed )\S+: .*$", again, re.M)
    assert trained and [line for line in trained if not line.endswith(" --resume")] == []
    assert json.loads((out / "summary.json").read_text())["arms"] == summary["arms"]


def test_tune_extends_the_grid_while_the_best_rate_is_at_its_edge(tmp_path, monkeypatch, capsys):
    """The search scores lr x {1/3, 1, 3} per method, then goes a factor of 3 further while the best is at an edge."""
    peak = {"sft": 3e-3, "rlvr": 9e-4, "srl": 1e-6}  # the validation score is highest at these rates
    monkeypatch.setattr(quickstart, "prepare_seed", lambda args, seed: (tmp_path, {}))

    def fake_run_arms(args, seed, work, arms_dir, lrs, arms, problems_file):
        assert problems_file == "rlvr_val.jsonl"  # never the held-out test problems
        method = arms[0]
        distance = abs(__import__("math").log(lrs[method] / peak[method]))
        return {"base": {"accuracy": 0.0}, method: {"avg@4": 1 / (1 + distance), "accuracy": 0.5}}, {}

    monkeypatch.setattr(quickstart, "run_arms", fake_run_arms)
    args = quickstart.parse_args(["--out", str(tmp_path), "--tune"])
    quickstart.tune(args, {"sft": 3e-3, "rlvr": 1e-4, "srl": 1e-4}, ["sft", "rlvr", "srl"])
    rows = json.loads((tmp_path / "tune.json").read_text())
    tried = {m: [r["lr"] for r in rows if r["method"] == m] for m in peak}
    assert tried["sft"] == pytest.approx([1e-3, 3e-3, 9e-3])                      # best inside: no extension
    assert tried["rlvr"] == pytest.approx([1e-4 / 3, 1e-4, 3e-4, 9e-4, 2.7e-3])   # up twice, then inside
    assert tried["srl"] == pytest.approx([1e-4 / 3, 1e-4, 3e-4, 1e-4 / 9, 1e-4 / 27, 1e-4 / 81])  # at most 3 more


def test_a_running_stage_says_how_far_it_is(tmp_path):
    log = tmp_path / "base.log"
    log.write_text("3 examples\rsft:  44%|####4     | 1650/3750 [04:12<05:21, 6.5step/s]\rsft:  45%|####5     | "
                   "1688/3750 [04:18<05:08, 6.6step/s]")
    said = progress("base", __import__("time").time() - 258, log)
    assert said.startswith("base 25") and "45% of its 3750, about 5 min left" in said  # 258 s x 2062 / 1688 left
    log.write_text("loading\n")
    assert progress("data", __import__("time").time(), log) == "data 0 s"
