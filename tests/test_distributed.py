"""Every stage under torchrun on CPU (gloo): the same command line with one process and with two gives the same
rollouts, rewards, kept groups, losses, parameters and files; --fsdp (FSDP2) too; and --resume continues."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))

# srl.train with the test's prompt and a reward that varies within every group (so every step updates), recording
# the groups each step keeps; the flags are srl.py's own
SRL_DRIVER = """
import json, sys
from pathlib import Path
import grpo, srl
args = srl.training_arguments("", "", "", 0.01).parse_args(sys.argv[1:])
collect = srl.collect_groups

def recording(*a, **k):
    kept, log = collect(*a, **k)
    if grpo.get_rank() == 0:
        with open(Path(args.out) / "kept.jsonl", "a") as f:
            f.write(json.dumps([[g.prompt, g.completions, g.rewards.tolist()] for g in kept]) + "\\n")
    return kept, log

srl.collect_groups = recording
srl.train(args, lambda ex: [{"role": "user", "content": ex["problem"]}],
          lambda completion, ex: (sum(map(ord, completion)) % 97) / 97)
"""


def launch(processes, script, *flags, cwd):
    """python script (one process, no torchrun), or torchrun with `processes` processes on this machine."""
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    result = subprocess.run(launcher + [str(script), *map(str, flags)], cwd=cwd, env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def metrics(run):
    return [json.loads(line) for line in open(run / "metrics.jsonl")]


def weights(run):
    return load_file(str(run / "last" / "model.safetensors"))


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_srl_with_one_and_two_processes_ddp_and_fsdp(tmp_path):
    """The same flags with 1 process, 2 processes (data parallel) and 2 processes with --fsdp, the last in two
    parts with --resume between: identical groups kept at step 1 (prompt, completions, rewards), identical logged
    rewards at every step, parameters within 1e-5 after 3 steps, and checkpoints that transformers loads."""
    examples = [{"id": f"e{i}", "problem": f"Compute {i}+3+4.", "target_step": "x"} for i in range(7)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    (tmp_path / "driver.py").write_text(SRL_DRIVER)
    flags = ["--model", "tiny", "--data", tmp_path / "train.jsonl", "--batch-prompts", "3", "--group-size", "4",
             "--max-new-tokens", "10", "--lr", "1e-4", "--eval-every", "0", "--device", "cpu"]
    runs = {name: tmp_path / name for name in ("one", "ddp", "fsdp")}
    launch(1, tmp_path / "driver.py", *flags, "--max-steps", "3", "--out", runs["one"], cwd=tmp_path)
    launch(2, tmp_path / "driver.py", *flags, "--max-steps", "3", "--out", runs["ddp"], cwd=tmp_path)
    launch(2, tmp_path / "driver.py", *flags, "--max-steps", "2", "--save-every", "2", "--out", runs["fsdp"],
           "--fsdp", cwd=tmp_path)
    launch(2, tmp_path / "driver.py", *flags, "--max-steps", "3", "--out", runs["fsdp"], "--fsdp", "--resume",
           cwd=tmp_path)
    kept = {name: [json.loads(line) for line in open(run / "kept.jsonl")] for name, run in runs.items()}
    assert kept["one"][0] and kept["ddp"][0] == kept["one"][0] and kept["fsdp"][0] == kept["one"][0]
    logged = {name: metrics(run) for name, run in runs.items()}
    for name in ("ddp", "fsdp"):
        assert [m["step"] for m in logged[name]] == [1, 2, 3] and {m["world_size"] for m in logged[name]} == {2}
        for key in ("reward_mean", "reward_std", "kept_groups", "groups_drawn", "sampled_tokens"):
            assert [m[key] for m in logged[name]] == [m[key] for m in logged["one"]], (name, key)
        for key in ("loss", "grad_norm", "entropy"):  # (the loss is ~0: advantages sum to zero in each group)
            assert [m[key] for m in logged[name]] == pytest.approx([m[key] for m in logged["one"]], rel=1e-4,
                                                                   abs=1e-6), (name, key)
    import model
    tiny, _ = model.load_model("tiny")
    initial = {k: v for k, v in tiny.state_dict().items() if k != "lm_head.weight"}
    moved = max_difference(weights(runs["one"]), initial)
    assert moved > 1e-4  # three AdamW steps of lr 1e-4 moved the weights: the comparison below is not vacuous
    for name in ("ddp", "fsdp"):
        difference = max_difference(weights(runs[name]), weights(runs["one"]))
        print(f"{name}: largest parameter difference from one process after 3 steps: {difference:.1e} "
              f"(the steps moved them by up to {moved:.1e})")
        assert difference <= 1e-5
    from transformers import AutoModelForCausalLM
    for name in ("ddp", "fsdp"):
        hf = AutoModelForCausalLM.from_pretrained(runs[name] / "last")
        state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # tied to the embedding
        assert max_difference(state, weights(runs[name])) == 0


@pytest.mark.slow
def test_rlvr_command_line_with_two_processes(tmp_path):
    """rlvr.py's own command line under torchrun logs what one process logs (a random tiny model never boxes the
    right answer: every group is dropped, as the docstring says) and writes best/ once."""
    problems = [{"id": f"p{i}", "problem": f"Compute {i}+5.", "answer": str(i + 5)} for i in range(5)]
    (tmp_path / "rlvr_train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    flags = ["--model", "tiny", "--data", tmp_path / "rlvr_train.jsonl", "--batch-prompts", "3", "--group-size", "2",
             "--max-new-tokens", "8", "--max-steps", "2", "--max-draws", "2", "--device", "cpu"]
    launch(1, ROOT / "rlvr.py", *flags, "--out", tmp_path / "one", cwd=tmp_path)
    launch(2, ROOT / "rlvr.py", *flags, "--out", tmp_path / "two", cwd=tmp_path)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["world_size"] for m in two] == [2, 2] and [m["world_size"] for m in one] == [1, 1]
    for key in ("reward_mean", "groups_drawn", "sampled_tokens", "truncation_rate", "response_length"):
        assert [m[key] for m in two] == [m[key] for m in one], key
    assert (tmp_path / "two" / "best" / "model.safetensors").exists()


@pytest.mark.slow
def test_sft_with_two_processes_equals_one(tmp_path):
    """sft.py with DDP: each process takes every other example of a batch of 3; the losses are those of one
    process on the same global batches, the weights agree, and only one metrics file is written."""
    records = [{"id": f"m{i}", "problem": f"{i}+{i}?", "solution": f"1. **Add.** {i}+{i}={2 * i}. \\boxed{{{2 * i}}}",
                "answer": str(2 * i)} for i in range(1, 7)]
    (tmp_path / "sft_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    flags = ["--data", tmp_path / "sft_train.jsonl", "--batch-size", "3", "--max-steps", "3", "--lr", "1e-3",
             "--device", "cpu"]
    launch(1, ROOT / "sft.py", *flags, "--out", tmp_path / "one", cwd=tmp_path)
    launch(2, ROOT / "sft.py", *flags, "--out", tmp_path / "two", cwd=tmp_path)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["loss"] for m in two] == pytest.approx([m["loss"] for m in one], rel=1e-5)
    assert [m["world_size"] for m in two] == [2, 2, 2]
    assert max_difference(weights(tmp_path / "two"), weights(tmp_path / "one")) <= 1e-5


@pytest.mark.slow
def test_evaluate_with_two_processes_writes_the_same_files_and_table(tmp_path):
    """evaluate.py shares the problems out over two processes and merges them: the same per-problem files (greedy
    and sampled completions, grades) and the same table as one process."""
    flags = ["--samples", "2", "--max-new-tokens", "12", "--device", "cpu"]
    out_one = launch(1, ROOT / "evaluate.py", *flags, "--out", tmp_path / "one", cwd=tmp_path)
    out_two = launch(2, ROOT / "evaluate.py", *flags, "--out", tmp_path / "two", cwd=tmp_path)
    assert (tmp_path / "two" / "builtin.jsonl").read_text() == (tmp_path / "one" / "builtin.jsonl").read_text()
    table = [line for line in out_one.splitlines() if line.startswith("|")]
    assert table and table == [line for line in out_two.splitlines() if line.startswith("|")]
    assert out_two.count("builtin {") == 1  # rank 0 alone prints and writes


@pytest.mark.slow
def test_a_per_sequence_loss_aggregation_adds_up_over_processes(tmp_path):
    """--loss-agg seq-mean-token-mean divides by the step's number of completions, counted over every process: two
    processes end with the weights of one."""
    examples = [{"id": f"e{i}", "problem": f"Compute {i}+3+4.", "target_step": "x"} for i in range(7)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    (tmp_path / "driver.py").write_text(SRL_DRIVER)
    flags = ["--model", "tiny", "--data", tmp_path / "train.jsonl", "--batch-prompts", "3", "--group-size", "4",
             "--max-new-tokens", "10", "--lr", "1e-4", "--eval-every", "0", "--device", "cpu", "--max-steps", "2",
             "--loss-agg", "seq-mean-token-mean"]
    launch(1, tmp_path / "driver.py", *flags, "--out", tmp_path / "one", cwd=tmp_path)
    launch(2, tmp_path / "driver.py", *flags, "--out", tmp_path / "two", cwd=tmp_path)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["loss"] for m in two] == pytest.approx([m["loss"] for m in one], rel=1e-4, abs=1e-6)
    assert max_difference(weights(tmp_path / "two"), weights(tmp_path / "one")) <= 1e-5
