"""
Running a study's stages: each stage is its ordinary command line (python sft.py ..., python srl.py ...), run as a
process with its output in a log file, up to `jobs` at once, with a line every half minute saying how far each is.
A stopped study goes on where it stopped: a training stage that began continues with --resume, and an evaluation
whose summary is written is not run again (resumable). quickstart.py and study/gsm8k.py run their stages here.
"""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python(script, *args):
    """The command line of one of the project's scripts (at the top level), each argument a string."""
    return [sys.executable, str(ROOT / script), *map(str, args)]


def module(name, *args):
    """The command line of a module of the project run as a script (python -m study.gsm8k ...)."""
    return [sys.executable, "-m", name, *map(str, args)]


def logged(folder, stages):
    """{name: command} -> {name: (command, <folder>/<name>.log)}"""
    return {name: (command, Path(folder) / f"{name}.log") for name, command in stages.items()}


def resumable(folder, stages):
    """The stages of {name: command} still to run, logged in folder: a training stage whose --out holds a begun run
    continues it (--resume; a finished one has nothing left to do), an evaluation whose --out holds its summary
    is left out."""
    todo = {}
    for name, command in stages.items():
        out = Path(command[command.index("--out") + 1])
        if not (out / "summary.json").exists():
            todo[name] = [*command, "--resume"] if (out / "metrics.jsonl").exists() else command
    return logged(folder, todo)


def run_stages(stages, jobs, threads, every=30):
    """Run {name: (command, log path)}, at most `jobs` at a time, each with threads // jobs CPU threads, saying
    every `every` seconds how far each running stage is. Raises RuntimeError with the log's tail when a stage fails
    (the others are stopped). Returns {name: seconds}."""
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, threads // max(1, min(jobs, len(stages))))))
    waiting, running, seconds, said = list(stages.items()), {}, {}, time.time()
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                name, (command, log) = waiting.pop(0)
                print(f"=== {name}: python {' '.join(map(str, command[1:]))}", flush=True)
                with open(log, "w") as f:
                    running[name] = (subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env,
                                                      cwd=ROOT), time.time(), log)
            time.sleep(0.2)
            for name, (process, started, log) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[name]
                seconds[name] = time.time() - started
                if process.returncode != 0:
                    tail = Path(log).read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"stage {name} failed (exit {process.returncode}); end of {log}:\n{tail}")
                print(f"    {name} done in {seconds[name]:.0f} s", flush=True)
            if running and time.time() - said > every:
                said = time.time()
                print("    running: " + "; ".join(progress(name, started, log) for name, (_, started, log)
                                                 in running.items()), flush=True)
    except KeyboardInterrupt:  # Ctrl-C reached every stage too: each stops after its step, its last/ written
        for process, _, _ in running.values():
            process.wait()
        raise
    except BaseException:  # a failed stage: the others get one SIGTERM and stop the same way
        for process, _, _ in running.values():
            process.terminate()
        for process, _, _ in running.values():
            process.wait()
        raise
    return seconds


def progress(name, started, log):
    """"srl 252 s, 45% of its 60, about 5 min left": the last progress bar a stage's log holds (a stage may show
    several bars, one after another: the time left is that of the bar in progress, at its own pace so far)."""
    tail = Path(log).read_text(errors="replace")[-2000:]
    bars = re.findall(r"(\d+)/(\d+) \[([0-9:]+)<", tail)
    said = f"{name} {time.time() - started:.0f} s"
    if bars:
        done, total, elapsed = int(bars[-1][0]), int(bars[-1][1]), bars[-1][2]
        spent = sum(int(part) * 60 ** i for i, part in enumerate(reversed(elapsed.split(":"))))
        said += f", {done / max(total, 1):.0%} of its {total}"
        if 0 < done < total:
            said += f", about {max(1, round(spent * (total - done) / done / 60))} min left"
    return said
