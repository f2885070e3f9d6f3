"""Runs that survive what machines do to them: every state a kill can leave in the middle of a save resumes and ends
equal to the uninterrupted run; a torn metrics line is dropped; SIGTERM and Ctrl-C stop at the next safe point and
--resume continues bit for bit (one process, and two under torchrun); a run whose updates are all skipped stops; a
full disk stops the run with the previous checkpoint intact."""
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_srl_loop import EXAMPLE, loop_args, short_prompt

import grpo
import srl
from machinery import checkpoints

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = [dict(EXAMPLE, id=f"e{i}", problem=f"Compute {i}+3+4.") for i in range(5)]


def varied(completion, example):  # varies within every group, so that every step updates the model
    return (sum(map(ord, completion)) % 97) / 97


def run(folder, **flags):
    args = loop_args(folder, EXAMPLES, **dict(dict(max_steps=5, save_every=2), **flags))
    return srl.train(args, short_prompt, varied)


def weights(run_folder):
    return load_file(str(run_folder / "last" / "model.safetensors"))


def logged_steps(run_folder):
    return [json.loads(line)["step"] for line in open(run_folder / "metrics.jsonl")]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run of 5 steps, and copies of its run folder as it stood after steps 2 and 4."""
    root = tmp_path_factory.mktemp("straight")
    run(root / "a", max_steps=2)
    shutil.copytree(root / "a" / "run", root / "after2")
    resume(root / "a", max_steps=4)
    shutil.copytree(root / "a" / "run", root / "after4")
    resume(root / "a")
    return root


def resume(folder, **flags):
    args = loop_args(folder, EXAMPLES, **dict(dict(max_steps=5, save_every=2), **flags))
    args.resume = True
    return srl.train(args, short_prompt, varied)


def crash_state(name, after2, after4, out):
    """Build by hand what a kill at one instant of a save leaves in the run folder `out`."""
    shutil.copytree(after2, out)  # the run at step 2, its metrics up to step 2
    last, tmp, old = out / "last", out / "last.tmp", out / "last.old"
    newer = after4 / "last"
    if name == "writing the new checkpoint":  # last/ whole, last.tmp half-written
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes((newer / "model.safetensors").read_bytes()[:1000])
    elif name == "new checkpoint whole, before the renames":  # last/ (step 2) and a whole last.tmp (step 4)
        shutil.copytree(newer, tmp)
    elif name == "between the renames":  # last.old (step 2) and a whole last.tmp (step 4), no last/
        os.replace(last, old)
        shutil.copytree(newer, tmp)
    elif name == "after the renames":  # last/ (step 4) and last.old (step 2) not yet removed
        os.replace(last, old)
        shutil.copytree(newer, last)
    elif name == "before the first save":  # killed before last/ was ever written: metrics only
        shutil.rmtree(last)
        shutil.rmtree(out / "best", ignore_errors=True)
    elif name == "a torn metrics line":  # a kill or a full disk in the middle of a line
        with open(out / "metrics.jsonl", "a") as f:
            f.write('{"reward_mean": 0.41, "step": 3, "kept_gr')
    elif name == "best/ moved aside":  # best/ between its renames
        if (out / "best").exists():
            os.replace(out / "best", out / "best.old")
    if name in ("new checkpoint whole, before the renames", "between the renames", "after the renames"):
        with open(out / "metrics.jsonl", "a") as f:  # the newer checkpoint's steps were logged before its save
            f.writelines(line + "\n" for line in (after4 / "metrics.jsonl").read_text().splitlines()[2:])


CRASHES = ["writing the new checkpoint", "new checkpoint whole, before the renames", "between the renames",
           "after the renames", "before the first save", "a torn metrics line", "best/ moved aside"]


@pytest.mark.parametrize("crash", CRASHES)
def test_every_crash_state_of_a_save_resumes_to_the_uninterrupted_run(crash, straight, tmp_path, capsys):
    crash_state(crash, straight / "after2", straight / "after4", tmp_path / "run")
    capsys.readouterr()
    resume(tmp_path)
    printed = capsys.readouterr()
    assert "--overwrite" not in printed.out + printed.err  # never suggested while a checkpoint can be continued
    expected = weights(straight / "a" / "run")
    got = weights(tmp_path / "run")
    assert all(torch.equal(expected[k], got[k]) for k in expected), crash
    assert logged_steps(tmp_path / "run") == [1, 2, 3, 4, 5], crash
    assert not any(p.name.endswith((".tmp", ".old")) for p in (tmp_path / "run").iterdir())
    if crash == "a torn metrics line":
        assert "dropped 1 torn line" in printed.out
    if crash == "between the renames":
        assert "finished the save" in printed.out


def test_a_full_disk_stops_the_run_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    import safetensors.torch
    real, calls = safetensors.torch.save_file, {"n": 0}

    def full_disk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second save of last/ (step 4): the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(SystemExit) as stopped:
        run(tmp_path, max_steps=5, save_every=2, eval_every=0)
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # (not the progress bar)
    assert stopped.value.code == 2 and len(err) == 1 and str(tmp_path / "run" / "last") in err[0]
    assert "No space left on device" in err[0] and "intact" in err[0]
    assert checkpoints.load_training_state(tmp_path / "run" / "last")["step"] == 2  # the previous one, whole
    assert not (tmp_path / "run" / "last.tmp").exists()


def test_a_run_whose_updates_are_all_skipped_stops(tmp_path, monkeypatch, capsys):
    logprobs = grpo.completion_logprobs

    def not_finite(*args, **kwargs):  # as a NaN gradient from a broken attention backward would make them
        logp, *rest = logprobs(*args, **kwargs)
        return (logp * float("nan"), *rest)

    monkeypatch.setattr(grpo, "completion_logprobs", not_finite)
    with pytest.raises(SystemExit) as stopped:
        run(tmp_path, max_steps=10, save_every=10, max_skipped_steps=3)
    err = capsys.readouterr().err
    assert stopped.value.code == 1 and "stopped at step 3" in err and "--lr" in err and "attention" in err
    log = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [entry["skipped_steps"] for entry in log] == [1, 2, 3]


# -----------------------------------------------------------------------------------------------------------------
# Signals, sent to real processes

DRIVER = """
import os, sys, time
import srl
from test_interrupts import varied
from test_srl_loop import short_prompt
reward = varied
if os.environ.get("SLOW_REWARD"):  # a step of seconds: a signal sent during it lands before it ends
    def reward(completion, example):
        time.sleep(float(os.environ["SLOW_REWARD"]))
        return varied(completion, example)
args = srl.training_arguments("", "", "", 0.01).parse_args(sys.argv[1:])
srl.train(args, short_prompt, reward)
"""
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")


def driver_command(tmp_path, processes=1):
    data = tmp_path / "srl_train.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    (tmp_path / "driver.py").write_text(DRIVER)
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return launcher + [str(tmp_path / "driver.py"), "--model", "tiny", "--data", str(data), "--batch-prompts", "2",
                       "--group-size", "4", "--max-new-tokens", "12", "--eval-every", "0", "--lr", "1e-3",
                       "--save-every", "100", "--device", "cpu", "--max-steps", "8"]


def finish(command):
    """Run a command to its end; if it fails, its own output is the assertion's message."""
    done = subprocess.run(command, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def signal_at_step(command, out, step, signum, second=False, env=ENV):
    """Start the run, send signum once its log holds `step` lines; returns the finished process's result."""
    process = subprocess.Popen(command + ["--out", str(out)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= step:
            break
        time.sleep(0.05)
    process.send_signal(signum)
    if second:
        time.sleep(0.5)
        process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=300)
    return process.returncode, stdout, stderr


@pytest.mark.slow
def test_sigterm_then_resume_is_bit_identical(tmp_path):
    """SIGTERM at a random step (the seed is printed): the run finishes that step or drops it, writes last/, says
    so, exits with 128 + 15; --resume then ends with the weights of the uninterrupted run, each step logged once."""
    command = driver_command(tmp_path)
    finish(command + ["--out", str(tmp_path / "straight")])
    seed = random.randrange(10 ** 6)
    step = random.Random(seed).randint(1, 6)
    print(f"SIGTERM once the log holds {step} steps (seed {seed})")
    code, stdout, stderr = signal_at_step(command, tmp_path / "run", step, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, stderr[-2000:]
    stopped_at = checkpoints.load_training_state(tmp_path / "run" / "last")["step"]
    assert f"stopped at step {stopped_at}: --resume continues" in stdout and step <= stopped_at < 8
    finish(command + ["--out", str(tmp_path / "run"), "--resume"])
    expected, got = weights(tmp_path / "straight"), weights(tmp_path / "run")
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert logged_steps(tmp_path / "run") == list(range(1, 9))


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(tmp_path):
    """The second Ctrl-C comes 0.5 s after the first, inside a step of 4 s (8 rewards of 0.5 s): were the run to
    finish that step in the meantime, it would exit 130 and the test could not tell one Ctrl-C from two."""
    code, stdout, stderr = signal_at_step(driver_command(tmp_path), tmp_path / "run", 1, signal.SIGINT, second=True,
                                          env=dict(ENV, SLOW_REWARD="0.5"))
    assert code == -signal.SIGINT, (code, stdout[-500:], stderr[-1500:])  # killed by the signal itself
    assert "stopping after the step in progress" in stdout


@pytest.mark.slow
def test_sigterm_under_torchrun_stops_every_process_at_the_same_step(tmp_path):
    """torchrun forwards SIGTERM to its two processes (gloo): both stop at the same step, the checkpoint holds it,
    and --resume under torchrun ends with the weights of the uninterrupted two-process run."""
    command = driver_command(tmp_path, processes=2)
    finish(command + ["--out", str(tmp_path / "straight")])
    code, stdout, stderr = signal_at_step(command, tmp_path / "run", 2, signal.SIGTERM)
    assert code != 0
    stopped_at = checkpoints.load_training_state(tmp_path / "run" / "last")["step"]
    assert stdout.count(f"stopped at step {stopped_at}: --resume continues") == 1 and 2 <= stopped_at < 8, stderr
    finish(command + ["--out", str(tmp_path / "run"), "--resume"])
    expected, got = weights(tmp_path / "straight"), weights(tmp_path / "run")
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) == 0
    assert logged_steps(tmp_path / "run") == list(range(1, 9))


def test_resuming_a_finished_run_says_there_is_nothing_left(straight, tmp_path, capsys):
    shutil.copytree(straight / "a" / "run", tmp_path / "run")
    capsys.readouterr()
    resume(tmp_path)
    out = capsys.readouterr().out
    assert "nothing left to do" in out and "finished its 5 steps" in out
    assert logged_steps(tmp_path / "run") == [1, 2, 3, 4, 5]
