"""
The paper's claim in miniature, on a CPU (Deng et al. 2025, Table 1): on problems a model almost never solves, RLVR
gets little learning signal (most groups of rollouts are all wrong and dynamic sampling drops them), while SRL's
step-wise reward still tells better rollouts from worse ones, so SRL learns, and SRL then RLVR ends best. This script
puts that claim to the test on the tiny model; docs/study.md gives what came out and how the study is built.

    python quickstart.py                       # one seed on 2 CPU cores (docs/study.md says how long)
    python quickstart.py --seeds 1 2 3         # the whole study once per seed; mean and std per arm
    python quickstart.py --ablations           # also SRL without dynamic sampling and SRL with a one-step reward
    python quickstart.py --tune                # the learning-rate search on validation problems, every arm
    python quickstart.py --probe CHECKPOINT    # per-step skills of a checkpoint on the validation problems
    python quickstart.py --arms srl --lora-rank 8 --srl-lr 3e-3   # the SRL arm alone, with LoRA adapters

The task is tasks/synthetic.py's chains ("Start with 17. Add 3, 6 times. What number do you end with?"), solved one
application per step ("2. Add 3: 20 + 3 = 23."). The warm start learns from a sloppy teacher whose steps apply the
operation twice 60% of the time (--warm-slip): the base writes well-formed steps but slips at most of them, and a
six-step chain comes out right almost never, while the arms' expert solutions are correct. Per seed:
  1. data_prep.py: warm-start problems (1 to 6 operations) and hard problems (6), split into training, validation
     (for --tune only) and held-out test problems.
  2. sft.py --model tiny: the warm start, the base every arm starts from (both formats: whole solutions, SRL steps).
  3. The arms, on the same hard training problems: sft (sft.py on the expert solutions), rlvr, sft_rlvr (RLVR from
     sft), srl, srl_rlvr (RLVR from srl, the paper's best); with --ablations srl_no_ds and srl_one_step. Every RL
     stage samples --rl-steps x --prompts x --group-size rollouts (--max-draws 1: no arm samples more).
  4. evaluate.py on the held-out test problems: greedy accuracy and avg@k; and the greedy answers that are right
     with every step right.
Every stage is its ordinary command line (study/stages.py), printed as it starts, its output in
<out>/seed<N>/<name>.log. At the end: the table, <out>/summary.json and <out>/study.png.
"""
import argparse
import os
import random
import shutil
import statistics
import time
from pathlib import Path

from machinery.files import read_jsonl, write_json, write_jsonl
from study.report import draw, rl_curves, table
from study.stages import logged, python, resumable, run_stages
from study.tuning import search_learning_rate
from tasks.synthetic import every_step_right

ARMS = ["sft", "rlvr", "sft_rlvr", "srl", "srl_rlvr", "srl_no_ds", "srl_one_step"]
PREPARED_BY = ["hard_steps", "max_value", "warm_problems", "train_problems", "val_problems", "test_problems",
               "warm_epochs", "warm_lr", "warm_slip", "warm_srl_share", "device"]  # what a seed's warm start depends on
RL_ARMS = ARMS[1:]
CHAINED = ["sft_rlvr", "srl_rlvr"]  # RLVR started from another arm's checkpoint


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/quickstart", help="study folder (a seed's folder is made again, unless "
                   "its warm start was made with the same settings)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one whole study per seed")
    p.add_argument("--ablations", action="store_true", help="add srl_no_ds and srl_one_step")
    p.add_argument("--arms", nargs="+", choices=ARMS, help="train and evaluate only these arms (a chained arm needs "
                   "its first stage); with --tune: tune only these methods")
    p.add_argument("--lora-rank", type=int, default=0, help="every arm trains LoRA adapters of this rank instead of "
                   "every weight (the warm start stays full fine-tuning)")
    p.add_argument("--tune", action="store_true", help="learning-rate search on the validation problems instead")
    p.add_argument("--probe", nargs="+", metavar="CHECKPOINT", help="print the per-step skills of these checkpoints "
                   "on the first seed's validation problems (<out>/seed<N>/data) instead of running the study")
    p.add_argument("--jobs", type=int, default=2, help="stages run at once (each gets cores / jobs threads)")
    # the task
    p.add_argument("--hard-steps", type=int, default=6, help="operations per hard problem (the difficulty knob)")
    p.add_argument("--max-value", type=int, default=60, help="values stay in 0..max-value")
    p.add_argument("--warm-problems", type=int, default=2000, help="warm-start problems (1..hard-steps operations)")
    p.add_argument("--train-problems", type=int, default=350, help="hard problems the arms train on")
    p.add_argument("--val-problems", type=int, default=50, help="hard problems for --tune")
    p.add_argument("--test-problems", type=int, default=200, help="held-out hard problems for the table")
    # the warm start
    p.add_argument("--warm-epochs", type=int, default=10)
    p.add_argument("--warm-lr", type=float, default=4e-3)
    p.add_argument("--warm-slip", type=float, default=0.6,
                   help="share of the warm start's steps that apply the operation twice (its planted bad habit)")
    p.add_argument("--warm-srl-share", type=float, default=0.5,
                   help="SRL-format examples per whole-solution example in the warm start")
    # the arms
    p.add_argument("--sft-epochs", type=int, default=2)
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--rl-steps", type=int, default=60, help="optimiser steps of every RL stage")
    p.add_argument("--prompts", type=int, default=8, help="prompts per RL step")
    p.add_argument("--group-size", type=int, default=8, help="rollouts per prompt (G)")
    p.add_argument("--srl-lr", type=float, default=3e-4)
    p.add_argument("--rlvr-lr", type=float, default=9e-4)
    p.add_argument("--sft-rlvr-lr", type=float, default=1e-4, help="RLVR's after SFT (tuned from SFT's checkpoint)")
    p.add_argument("--srl-rlvr-lr", type=float, default=3e-4, help="RLVR's after SRL (tuned from SRL's checkpoint)")
    p.add_argument("--srl-new-tokens", type=int, default=64, help="an SRL rollout: monologue and one step")
    p.add_argument("--solution-tokens", type=int, default=150, help="a whole solution: RLVR and evaluation")
    p.add_argument("--samples", type=int, default=4, help="k of avg@k in the evaluation")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU cores to use")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# One seed: data and warm start, the arms, their evaluation


def warm_start_file(data, out_path, srl_share, seed):
    """The warm start's data: every whole solution, plus SRL-format examples (srl_share per solution, drawn at
    random), in one file sft.py reads (it tells the two kinds apart per record)."""
    solutions, srl_format = read_jsonl(data / "sft_train.jsonl"), read_jsonl(data / "sft_srl_train.jsonl")
    random.Random(seed).shuffle(srl_format)
    records = solutions + srl_format[:int(srl_share * len(solutions))]
    write_jsonl(out_path, records)


def prepare_seed(args, seed):
    """Data and warm start for one seed: <out>/seed<N>/ with data/ (hard problems), base/ (the warm start). Made
    again from an empty folder, unless the folder holds a finished warm start made with the same settings
    (prepared.json): then it is kept, and the arms start from it."""
    work = Path(args.out).resolve() / f"seed{seed}"
    made_with = {name: getattr(args, name) for name in PREPARED_BY} | {"seed": seed, "ablations": args.ablations}
    stamp = work / "prepared.json"
    if stamp.is_file() and read_jsonl(stamp) == [made_with] and (work / "base" / "last").is_dir():
        print(f"=== seed {seed}: the data and warm start in {work} were made with these settings: kept", flush=True)
        return work, {}
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    hard = ["--synthetic", args.train_problems + args.val_problems + args.test_problems, "--synthetic-steps",
            args.hard_steps, "--synthetic-max-value", args.max_value, "--val-problems", args.val_problems,
            "--test-problems", args.test_problems, "--seed", 1000 + seed]
    stages = {"data_warm": python("data_prep.py", "--synthetic", args.warm_problems, "--synthetic-steps",
                                  f"1-{args.hard_steps}", "--synthetic-max-value", args.max_value,
                                  "--synthetic-slip", args.warm_slip, "--include-first-step", "--val-problems", 0,
                                  "--seed", seed, "--out-dir", work / "data_warm"),
              "data": python("data_prep.py", *hard, "--out-dir", work / "data")}
    if args.ablations:  # the same problems and split (same seed), each whole solution one step
        stages["data_one_step"] = python("data_prep.py", *hard, "--one-step", "--out-dir", work / "data_one_step")
    seconds = run_stages(logged(work, stages), args.jobs, args.threads)
    warm_start_file(work / "data_warm", work / "warm_start.jsonl", args.warm_srl_share, seed)
    seconds.update(run_stages(logged(work, {"base": python(
        "sft.py", "--model", "tiny", "--data", work / "warm_start.jsonl", "--out", work / "base", "--epochs",
        args.warm_epochs, "--lr", args.warm_lr, "--batch-size", 8, "--warmup-ratio", 0.05, "--check-samples", 0,
        "--save-every", 10_000, "--seed", seed, "--device", args.device)}), 1, args.threads))
    write_jsonl(stamp, [made_with])
    return work, seconds


def run_arms(args, seed, work, arms_dir, lrs, arms, problems_file):
    """Train the arms from work/base into arms_dir and evaluate them (and the base) on problems_file;
    returns ({arm: results}, {stage: seconds})."""
    data, base = work / "data", work / "base" / "last"
    lora = ["--lora-rank", args.lora_rank] if args.lora_rank else []
    rl = [*lora, "--max-steps", args.rl_steps, "--batch-prompts", args.prompts, "--group-size", args.group_size,
          "--max-draws", 1, "--eval-every", 0, "--val-limit", 16, "--seed", seed, "--device", args.device]
    rlvr = lambda start, out, lr: python("rlvr.py", "--model", start, "--data", data / "rlvr_train.jsonl", "--out",
                                         out, "--lr", lr, "--max-new-tokens", args.solution_tokens, *rl)
    srl = lambda out, data_dir, *extra: python("srl.py", "--model", base, "--data", data_dir / "srl_train.jsonl",
                                               "--out", out, "--lr", lrs["srl"], *extra, *rl)
    first = {
        "sft": python("sft.py", *lora, "--model", base, "--data", data / "sft_train.jsonl", "--out", arms_dir / "sft",
                      "--lr", lrs["sft"], "--epochs", args.sft_epochs, "--batch-size", 8, "--warmup-ratio", 0.1,
                      "--check-samples", 0, "--seed", seed, "--device", args.device),
        "rlvr": rlvr(base, arms_dir / "rlvr", lrs["rlvr"]),
        "srl": srl(arms_dir / "srl", data, "--max-new-tokens", args.srl_new_tokens),
        "srl_no_ds": srl(arms_dir / "srl_no_ds", data, "--max-new-tokens", args.srl_new_tokens, "--std-threshold", -1),
        "srl_one_step": srl(arms_dir / "srl_one_step", work / "data_one_step", "--max-new-tokens",
                            args.solution_tokens)}
    then = {"sft_rlvr": rlvr(arms_dir / "sft" / "last", arms_dir / "sft_rlvr", lrs["sft_rlvr"]),
            "srl_rlvr": rlvr(arms_dir / "srl" / "last", arms_dir / "srl_rlvr", lrs["srl_rlvr"])}
    first = {k: v for k, v in first.items() if k in arms}
    then = {k: v for k, v in then.items() if k in arms}
    evaluate = lambda arm: python(
        "evaluate.py", "--model", base if arm == "base" else arms_dir / arm / "last", "--benchmarks",
        data / problems_file, "--samples", args.samples, "--max-new-tokens", args.solution_tokens, "--batch-size", 64,
        "--seed", seed, "--out", arms_dir / "eval" / arm, "--device", args.device)
    arms_dir.mkdir(parents=True, exist_ok=True)

    # a stopped study goes on where it stopped (study/stages.py's resumable); an evaluation waits only for its own
    # arm: the first wave's run beside the second wave's training
    seconds = run_stages(resumable(arms_dir, first), args.jobs, args.threads)
    second = {**then, **{f"eval_{arm}": evaluate(arm) for arm in ["base", *first]}}
    seconds.update(run_stages(resumable(arms_dir, second), args.jobs, args.threads))
    last = {f"eval_{arm}": evaluate(arm) for arm in then}
    seconds.update(run_stages(resumable(arms_dir, last), args.jobs, args.threads))
    return read_results(arms_dir, ["base"] + arms, problems_file, args.samples), seconds


def read_results(arms_dir, arms, problems_file, samples):
    """{arm: results} from the files the arms and their evaluations wrote under arms_dir."""
    results = {}
    for arm in arms:
        [summary] = read_jsonl(arms_dir / "eval" / arm / "summary.json")
        metrics = next(iter(summary["results"].values()))
        results[arm] = {"accuracy": metrics["greedy"], f"avg@{samples}": metrics[f"avg@{samples}"]}
        # the greedy answers that are right with every step right: a right number reached by wrong steps is not
        clean = []
        for record in read_jsonl(arms_dir / "eval" / arm / problems_file):
            greedy = record["temperatures"].index(0.0)
            clean.append(record["correct"][greedy]
                         and every_step_right(record["problem"], record["completions"][greedy]))
        results[arm]["every_step_right"] = statistics.mean(clean)
        if arm in RL_ARMS:
            results[arm].update(rl_curves(arms_dir / arm / "metrics.jsonl"))
    return results


# ----------------------------------------------------------------------------------------------------------------
# The study, the table and the picture


def columns(samples):
    """The table's columns (study/report.py's table): held-out greedy accuracy and avg@k, the greedy answers right
    with every step right, and each RL arm's kept-group rate (the share of drawn groups whose rewards differed)."""
    return [("held-out greedy (%)", "accuracy", "percent"), (f"avg@{samples} (%)", f"avg@{samples}", "percent"),
            ("greedy, every step right (%)", "every_step_right", "percent"),
            ("kept-group rate", "kept_group_rate", "rate")]


def report(arms_results, samples, png, title):
    """The table and the picture: the SRL arms' and the RLVR arms' mean rewards and every RL arm's kept-group rate,
    step by step; the held-out greedy accuracy and every-step-right rate."""
    print(table(arms_results, columns(samples)))
    rl = [arm for arm, r in arms_results.items() if "reward_curve" in r]
    drawn = draw(arms_results, png, title, curves=[
        ("SRL: mean step-similarity reward (-1 = bad format)", (-1.05, 1.05), "reward_curve",
         [a for a in rl if a.startswith("srl") and not a.endswith("rlvr")]),
        ("RLVR: mean final-answer reward", (-0.03, 1.03), "reward_curve", [a for a in rl if a.endswith("rlvr")]),
        ("kept-group rate (dynamic sampling)", (-0.03, 1.03), "kept_group_curve", rl)],
        bars=[("held-out greedy accuracy (%)", (0, 100), "accuracy"),
              ("greedy, every step right (%)", (0, 100), "every_step_right")])
    if drawn:
        print(f"picture: {drawn}")


def main(argv=None):
    args = parse_args(argv)
    arms = args.arms or ["sft", "rlvr", "sft_rlvr", "srl", "srl_rlvr"] + (["srl_no_ds", "srl_one_step"]
                                                                          if args.ablations else [])
    for arm, first in (("sft_rlvr", "sft"), ("srl_rlvr", "srl")):
        if arm in arms and first not in arms and not args.tune:  # (--tune trains a chained arm's first stage)
            raise SystemExit(f"quickstart.py: error: --arms {arm} starts from {first}: add {first}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    default_lrs = {"sft": args.sft_lr, "rlvr": args.rlvr_lr, "srl": args.srl_lr,
                   "sft_rlvr": args.sft_rlvr_lr, "srl_rlvr": args.srl_rlvr_lr}
    try:
        if args.tune:
            return tune(args, default_lrs, [m for m in default_lrs if not args.arms or m in args.arms])
        if args.probe:
            from study.probe import step_skills
            for checkpoint in args.probe:
                print(checkpoint + ": " + step_skills(checkpoint, out / f"seed{args.seeds[0]}" / "data"), flush=True)
            return
        arms_results, times = {}, {}
        for seed in args.seeds:
            work, seconds = prepare_seed(args, seed)
            results, more_seconds = run_arms(args, seed, work, work, default_lrs, arms, "test.jsonl")
            times[seed] = {name: round(t) for name, t in {**seconds, **more_seconds}.items()}
            print(f"seed {seed}: stage times " + ", ".join(f"{k} {v} s" for k, v in times[seed].items()))
            for arm, r in results.items():
                for key, value in r.items():
                    arms_results.setdefault(arm, {}).setdefault(key, []).append(value)
    except RuntimeError as e:  # a stage failed: its log's tail says why
        raise SystemExit(f"quickstart.py: {e}")
    except KeyboardInterrupt:
        raise SystemExit("\nquickstart.py: stopped; the same command goes on where it stopped")
    rollouts = args.rl_steps * args.prompts * args.group_size
    settings = {**vars(args), "rollouts_per_rl_stage": rollouts, "seconds": round(time.time() - started)}
    write_json(out / "summary.json", {"settings": settings, "arms": arms_results, "stage_seconds": times})
    print(f"\nHeld-out test: {args.test_problems} problems of {args.hard_steps} operations, {len(args.seeds)} seed(s) "
          f"{args.seeds}; every RL stage sampled {rollouts} rollouts (summary: {out / 'summary.json'})")
    report(arms_results, args.samples, out / "study.png",
           f"SRL vs RLVR in miniature: tiny model, {args.hard_steps}-step arithmetic chains, seeds {args.seeds}")
    print(f"total {time.time() - started:.0f} s")


# ----------------------------------------------------------------------------------------------------------------
# Tuning: the same learning-rate search for every method (study/tuning.py), judged on the validation problems only


def tune(args, default_lrs, methods):
    """Each method's learning rate by the rule every method gets (study/tuning.py's search_learning_rate, the others
    at their defaults), scored on the validation problems: avg@k first, greedy accuracy second. A chained method's
    RLVR starts from its own first stage (trained at its default rate) on the same seed."""
    out, rows, k = Path(args.out), [], f"avg@{args.samples}"
    for seed in args.seeds:
        work, _ = prepare_seed(args, seed)
        for method in methods:
            def score(lr):
                lrs = dict(default_lrs, **{method: lr})
                arms = [method.split("_")[0], method] if method in CHAINED else [method]
                results, _ = run_arms(args, seed, work, work / f"tune_{method}_{lr:.2g}", lrs, arms, "rlvr_val.jsonl")
                rows.append({"method": method, "lr": lr, "seed": seed, "base": results["base"],
                             k: results[method][k], "accuracy": results[method]["accuracy"]})
                print(rows[-1], flush=True)
                return results[method][k], results[method]["accuracy"]
            search_learning_rate(default_lrs[method], score)
    write_json(out / "tune.json", rows)
    print(f"| method | lr | validation {k} (%) | validation greedy (%) |\n| --- | --- | --- | --- |")
    for method in methods:
        for lr in sorted({r["lr"] for r in rows if r["method"] == method}):
            picked = [r for r in rows if r["method"] == method and r["lr"] == lr]
            print(f"| {method} | {lr:.2g} | " + ", ".join(f"{100 * r[k]:.1f}" for r in picked) + " | "
                  + ", ".join(f"{100 * r['accuracy']:.1f}" for r in picked) + " |")


if __name__ == "__main__":
    main()
