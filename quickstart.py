"""
The whole pipeline on the embedded default, on a CPU in about five minutes (two cores; three to four of the minutes
are the SFT warm start):

    python quickstart.py

data_prep (built-in problems) -> sft (tiny warm start: the <think>...</think> + step format) -> srl -> rlvr (from
SRL's best checkpoint) -> evaluate (RLVR's best on the held-out RLVR problems). Each stage is the ordinary
command line, run as a separate process and printed as it starts, and each reads only what the previous one wrote.
Everything goes to --workdir (default runs/quickstart/; emptied first), never to data/ or runs/<stage>/.
At the end: SRL's reward curve (the mean rollout reward per step, from srl/metrics.jsonl; a PNG when matplotlib
is installed, a text sparkline otherwise), the evaluation table and the time of each stage.

The tiny model starts from random weights, so its numbers are a smoke test of the machinery, not a result: expect
SRL rewards around 0.1-0.3 and an accuracy of 0. The step counts (flags below) are small enough for a CPU; for
real runs, call the stages yourself with --model qwen-1.5b on a GPU (the README shows how).
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from evaluate import summary_table

ROOT = Path(__file__).resolve().parent


def run_stage(name, script, *args, times):
    command = [sys.executable, str(ROOT / script), *map(str, args)]
    print(f"\n=== {name}: python {script} {' '.join(map(str, args))}", flush=True)
    started = time.time()
    subprocess.run(command, check=True, cwd=ROOT)
    times[name] = time.time() - started


def sparkline(values):
    """One character per value, from ▁ (the lowest) to █ (the highest)."""
    bars = "▁▂▃▄▅▆▇█"
    low, high = min(values), max(values)
    return "".join(bars[int((v - low) / (high - low) * (len(bars) - 1)) if high > low else 0] for v in values)


def show_reward_curve(metrics_path, png_path):
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    steps, rewards = [r["step"] for r in rows], [r["reward_mean"] for r in rows]
    print(f"\nSRL reward curve ({metrics_path}, mean rollout reward per step, format failures count -1):")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"  {sparkline(rewards)}  steps {steps[0]}..{steps[-1]}, reward {rewards[0]:.3f} -> {rewards[-1]:.3f} "
              f"(min {min(rewards):.3f}, max {max(rewards):.3f}); install matplotlib for a plot")
        return
    plt.figure(figsize=(6, 3.5))
    plt.plot(steps, rewards, marker="o")
    plt.xlabel("SRL step")
    plt.ylabel("mean rollout reward")
    plt.title("SRL reward (tiny model, built-in data)")
    plt.grid(alpha=0.3)
    plt.tight_layout()
    plt.savefig(png_path, dpi=120)
    print(f"  plot: {png_path}; reward {rewards[0]:.3f} -> {rewards[-1]:.3f} (min {min(rewards):.3f}, "
          f"max {max(rewards):.3f})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--workdir", default="runs/quickstart", help="where every output goes (emptied first)")
    parser.add_argument("--sft-steps", type=int, default=None, help="default: sft.py's tiny plan")
    parser.add_argument("--sft-check-samples", type=int, default=4, help="samples per prompt in SFT's format check")
    parser.add_argument("--srl-steps", type=int, default=20)
    parser.add_argument("--rlvr-steps", type=int, default=2)
    parser.add_argument("--rollouts", type=int, default=4, help="prompts per step and samples per prompt (G)")
    parser.add_argument("--max-new-tokens", type=int, default=160, help="for rollouts and evaluation")
    parser.add_argument("--eval-limit", type=int, default=4, help="evaluation problems")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    work = Path(args.workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data, times, started = work / "data", {}, time.time()
    device = ["--device", args.device]
    # The GRPO stages with small batches (their learning rate is srl.py's default for tiny models).
    grpo = ["--batch-prompts", args.rollouts, "--group-size", args.rollouts, "--max-new-tokens", args.max_new_tokens,
            "--max-draws", 2, "--eval-every", 0, "--val-limit", 8, *device]

    run_stage("data_prep", "data_prep.py", "--out-dir", data, times=times)
    run_stage("sft", "sft.py", "--data", data / "sft_srl_train.jsonl", "--out", work / "sft", *device,
              "--check-samples", args.sft_check_samples,
              *(["--max-steps", args.sft_steps] if args.sft_steps else []), times=times)
    run_stage("srl", "srl.py", "--model", work / "sft" / "last", "--data", data / "srl_train.jsonl",
              "--out", work / "srl", "--max-steps", args.srl_steps, *grpo, times=times)
    run_stage("rlvr", "rlvr.py", "--model", work / "srl" / "best", "--data", data / "rlvr_train.jsonl",
              "--out", work / "rlvr", "--max-steps", args.rlvr_steps, *grpo, times=times)
    run_stage("evaluate", "evaluate.py", "--model", work / "rlvr" / "best", "--benchmarks",
              data / "rlvr_val.jsonl", "--limit", args.eval_limit, "--max-new-tokens", args.max_new_tokens,
              "--out", work / "eval", *device, times=times)

    show_reward_curve(work / "srl" / "metrics.jsonl", work / "srl" / "reward_curve.png")
    summary = json.loads((work / "eval" / "summary.json").read_text().splitlines()[0])
    print(f"\nEvaluation ({work / 'eval'}; greedy accuracy in %):")
    print(summary_table("tiny: sft -> srl -> rlvr", summary["results"]))
    print("\nTime per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
          + f"; total {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
