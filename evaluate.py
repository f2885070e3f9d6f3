"""
Evaluation on math benchmarks, as the paper's: the prompt, greedy accuracy, avg@k and pass@k, per-problem result
files and a summary table shaped like its Table 1. The final answer and the equivalence of two answers are
tasks/grader.py's (a grader that never calls two different answers equal: it is also the RLVR reward).

    python evaluate.py                                    # the tiny model on a few built-in problems (~1 min CPU)
    python evaluate.py --model qwen-1.5b --benchmarks amc23,aime24,aime25 --samples 32 --max-new-tokens 4096
    python evaluate.py --model runs/srl --benchmarks minerva,math500 --out runs/eval_srl
    python evaluate.py --benchmarks my_problems.jsonl     # any JSONL with problem/question and answer fields
    torchrun --nproc_per_node 8 evaluate.py --model runs/srl --benchmarks amc23 --samples 32   # problems shared out

Benchmarks are JSONL files in --data-dir (default ../shared/data/benchmarks beside the checkout if present, else
data/benchmarks); nothing is downloaded (docs/grader.md lists where each file comes from). A record needs `problem`
or `question`, and `answer` (GSM8K's worked solution is cut at "#### N") or a `solution` with a \\boxed{} answer.
Results already in --out are never replaced without --overwrite, and each chunk of graded problems is kept in
<out>/<name>.partial.jsonl as it finishes: the same command after a stop continues from there.
Departures from the paper: the grader is stricter than Qwen2.5-Math's (tasks/grader.py says where); the prompt is
its chain-of-thought system message (MATH_INSTRUCTION); the table's mean averages every number in the row.
"""
import argparse
import json
import math
import re
import time
from pathlib import Path

import torch
from tqdm import tqdm

from engine import decode_text, encode_chat, mix_seed, sample_groups
from grpo import gather, get_rank, get_world_size
from machinery.checks import check_device, check_folder, local_model, read_config
from machinery.distributed import end_distributed, init_distributed
from machinery.files import InputError, jsonl_text, read_jsonl, write_jsonl
from machinery.setup import check_flags, refuse, refusing
from model import load_model
from tasks.grader import answer_to_str, extract_answer, is_equiv

# -----------------------------------------------------------------------------------------------------------------
# Benchmarks, prompt, answer extraction

BENCHMARKS = ["amc23", "aime24", "aime25", "minerva", "math500", "gsm8k"]
ROOT = Path(__file__).resolve().parent
SHARED_BENCHMARKS = ROOT.parent / "shared" / "data" / "benchmarks"
DEFAULT_DATA_DIR = SHARED_BENCHMARKS if SHARED_BENCHMARKS.is_dir() else ROOT / "data" / "benchmarks"

# The embedded default (`python evaluate.py` with no arguments): short problems with unambiguous answers.
BUILTIN_PROBLEMS = [
    {"id": "b0", "problem": "What is $7 \\times 8$?", "answer": "56"},
    {"id": "b1", "problem": "Simplify $\\frac{6}{8}$.", "answer": "\\frac{3}{4}"},
    {"id": "b2", "problem": "Solve $2x + 3 = 11$ for $x$.", "answer": "4"},
    {"id": "b3", "problem": "What is $\\sqrt{50}$ in simplest radical form?", "answer": "5\\sqrt{2}"},
    {"id": "b4", "problem": "A book costs $12$ dollars. How much do 5 books cost, in dollars?", "answer": "60"},
    {"id": "b5", "problem": "Find all real $x$ with $x^2 = 9$.", "answer": "3, -3"},
]


def load_benchmark(name_or_path, data_dir=DEFAULT_DATA_DIR, limit=None):
    """[{"id", "problem", "answer"}] from a benchmark name (a file NAME.jsonl in data_dir) or a JSONL path."""
    if name_or_path == "builtin":
        return [dict(p) for p in BUILTIN_PROBLEMS[:limit]]
    path = Path(data_dir) / f"{name_or_path}.jsonl" if name_or_path in BENCHMARKS else Path(name_or_path)
    if not path.is_file():
        raise InputError(f"benchmark file {path} not found; names: builtin, {', '.join(BENCHMARKS)} (where to get "
                         "each: docs/grader.md) or a JSONL path")
    problems = []
    for line_no, record in read_jsonl(path, with_lines=True):
        problem = record.get("problem") or record.get("question")
        if not problem:
            raise InputError(f"{path}:{line_no}: no 'problem' or 'question' field")
        answer = record.get("answer")
        if isinstance(answer, str) and "####" in answer:  # GSM8K: a worked solution ending in "#### N"
            answer = answer.rsplit("####", 1)[1]
        if answer is None and record.get("solution"):
            answer = extract_answer(record["solution"])
        answer = "" if answer is None else answer_to_str(answer)
        if not answer:
            raise InputError(f"{path}:{line_no}: no 'answer' field (nor a \\boxed{{}} answer in 'solution')")
        problem_id = next((record[k] for k in ("id", "idx", "unique_id") if k in record), line_no - 1)
        problems.append({"id": problem_id, "problem": problem, "answer": answer})
        if limit is not None and len(problems) >= limit:
            break
    return problems


MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def math_messages(problem):
    """The evaluation prompt as chat messages (also the RLVR and SFT prompt)."""
    return [{"role": "system", "content": MATH_INSTRUCTION}, {"role": "user", "content": problem}]


# -----------------------------------------------------------------------------------------------------------------
# Metrics, generation and grading


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021): 1 - C(n-c, k) / C(n, k),
    computed as a product of ratios so that large n never overflows."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every subset of k samples holds a correct one
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean(values):
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def evaluate_benchmark(model, tokenizer, problems, samples=0, max_new_tokens=1024, batch_size=16, greedy=True,
                       seed=0, desc="evaluate", progress=True, done=None, on_graded=None):
    """Generate for every problem (one greedy completion, then `samples` at temperature 1.0) and grade them.
    Returns (records, metrics): one record per problem, in the order given; metrics as fractions in [0, 1].
    The problems go through the sampler a chunk at a time (a few times --batch-size rows, in its continuous batch of
    batch_size slots), and each chunk's graded records reach on_graded({index: record}) as it finishes, so that a
    stopped evaluation keeps them; done ({index: record}) holds those graded before, which are not done again."""
    runs = ([(0.0, 1)] if greedy else []) + ([(1.0, samples)] if samples > 0 else [])  # (temperature, count)
    if not problems or not runs:
        raise ValueError("nothing to evaluate: no problems, or neither greedy nor samples")
    prompts = [encode_chat(tokenizer, math_messages(p["problem"])) for p in problems]
    stop_ids = set(model.stop_token_ids)
    temperatures = [t for t, n in runs for _ in range(n)]
    graded = dict(done or {})
    # Longest prompts first: an out-of-memory shows at once. Under torchrun each process takes every world-th
    # problem of each chunk; the chunk's records are gathered before the next one starts.
    order = sorted((j for j in range(len(prompts)) if j not in graded), key=lambda j: -len(prompts[j]))
    chunk = max(1, 4 * batch_size // max(n for _, n in runs)) * get_world_size()
    bar = tqdm(total=len(problems), initial=len(graded), desc=desc, unit="problem",
               disable=not progress or get_rank() != 0)
    for start in range(0, len(order), chunk):
        mine = order[start:start + chunk][get_rank()::get_world_size()]
        outputs = {j: [] for j in mine}
        for temperature, n in runs:
            # a seed per problem: its samples do not depend on the rows around it, or on the process
            groups = sample_groups(model, [prompts[j] for j in mine], n, max_new_tokens, max(1, batch_size // n),
                                   None if seed is None else [mix_seed(seed, j) for j in mine],
                                   temperature=temperature)
            for j, group in zip(mine, groups):
                outputs[j] += group
        records = {}
        for j, outs in outputs.items():
            problem = problems[j]
            texts = [decode_text(tokenizer, o) for o in outs]
            extracted = [extract_answer(t) for t in texts]
            records[j] = {
                "id": problem["id"], "problem": problem["problem"], "answer": problem["answer"],
                "prompt": tokenizer.decode(prompts[j]), "temperatures": temperatures, "completions": texts,
                "extracted": extracted, "correct": [is_equiv(e, problem["answer"]) for e in extracted],
                "num_tokens": [len(o) for o in outs], "truncated": [not (o and o[-1] in stop_ids) for o in outs]}
        records = {j: record for share in gather(records) for j, record in share.items()}  # every process's
        graded.update(records)
        if on_graded:
            on_graded(records)
        bar.update(len(records))
    bar.close()
    records = [graded[j] for j in range(len(problems))]

    metrics = {"problems": len(records), "samples": samples, "max_new_tokens": max_new_tokens}
    if greedy:
        metrics["greedy"] = mean(r["correct"][0] for r in records)
    if samples > 0:
        sampled = [r["correct"][1:] if greedy else r["correct"] for r in records]  # the temperature-1.0 ones
        metrics[f"avg@{samples}"] = mean(mean(correct) for correct in sampled)
        for k in sorted({2 ** i for i in range(samples.bit_length())} | {samples}):  # 1, 2, 4, ..., samples
            metrics[f"pass@{k}"] = mean(pass_at_k(samples, sum(correct), k) for correct in sampled)
    metrics["boxed_rate"] = mean(x is not None for r in records for x in r["extracted"])
    metrics["truncated_rate"] = mean(t for r in records for t in r["truncated"])
    metrics["mean_completion_tokens"] = mean(n for r in records for n in r["num_tokens"])
    return records, metrics


def summary_table(model_name, results):
    """A markdown row per model like the paper's Table 1: "avg@k / greedy" (or greedy alone) in percent per
    benchmark, and the mean of every number in the row."""
    cells, numbers = [], []
    for metrics in results.values():
        values = [metrics[k] * 100 for k in metrics if k.startswith("avg@")] + \
            ([metrics["greedy"] * 100] if "greedy" in metrics else [])
        cells.append(" / ".join(f"{v:.1f}" for v in values))
        numbers += values
    header = "| model | " + " | ".join(results) + " | mean |"
    rule = "|" + " --- |" * (len(results) + 2)
    row = f"| {model_name} | " + " | ".join(cells) + f" | {mean(numbers):.1f} |"
    return "\n".join([header, rule, row])


# -----------------------------------------------------------------------------------------------------------------
# Command line


# What a partial evaluation must share with the run that continues it
PARTIAL_SETTINGS = ("model", "samples", "max_new_tokens", "seed", "limit")


def graded_before(path, settings, num_problems):
    """{index: record} of a partial evaluation in path made with the same settings ({} if none, or if its settings
    differ: it is then started again); a line cut short by a stop is dropped."""
    if not path.is_file():
        return {}
    records = read_jsonl(path, torn_lines=[])  # the last line of a stopped run may be cut short
    if not records or records[0] != {"settings": settings}:
        return {}
    return {record.pop("index"): record for record in records[1:] if 0 <= record.get("index", -1) < num_problems}


class PartialRecords:
    """<name>.partial.jsonl: the settings, then one line per graded problem, each flushed as its chunk finishes."""

    def __init__(self, path, settings):
        done = graded_before(path, settings, float("inf"))
        write_jsonl(path, [{"settings": settings}] + [dict(record, index=j) for j, record in done.items()])
        self.file = open(path, "a", encoding="utf-8")

    def write(self, records):
        self.file.write(jsonl_text(dict(record, index=j) for j, record in records.items()))
        self.file.flush()

    def close(self):
        self.file.close()


def check_arguments(args):
    """Every user error, before any process group forms or any weight loads, each refused in one line: the flags,
    the device, every benchmark file, --out (results already there are kept unless --overwrite) and the model.
    Returns ({name: problems}, the result files --overwrite replaces)."""
    check_flags(args, ["max_new_tokens", "limit", "batch_size"], lambda v: v >= 1, "at least 1")
    check_flags(args, ["samples"], lambda v: v >= 0, "0 or more")
    benchmarks = {}
    with refusing():  # the checks' messages name the flag, the file and the line
        check_device(args.device)
        for name in [b for b in re.split(r"[,\s]+", " ".join(args.benchmarks)) if b]:
            key = Path(name).stem if name.endswith(".jsonl") else name
            if key in benchmarks:
                refuse(f"--benchmarks: two benchmarks named {key!r} would write the same {key}.jsonl")
            benchmarks[key] = load_benchmark(name, args.data_dir, args.limit)
            if not benchmarks[key]:
                refuse(f"--benchmarks {name}: no problems in it")
        if not benchmarks:
            refuse("--benchmarks: no benchmark given")
        out = Path(args.out)
        check_folder(out)
        args.model = local_model(args.model)  # smollm2-135m offline: the wheel's model
        read_config(args.model)
    held = [path for path in [out / "summary.json", *(out / f"{key}.jsonl" for key in benchmarks)] if path.exists()]
    if held and not args.overwrite:
        refuse(f"--out {out} already holds results ({', '.join(path.name for path in held)}): add --overwrite to "
               f"replace them, or choose another --out")
    if args.overwrite:  # a stopped evaluation's graded records go too: it starts again
        held += [path for path in (out / f"{key}.partial.jsonl" for key in benchmarks) if path.exists()]
    return benchmarks, held


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="alias (tiny, qwen-1.5b, smollm2-135m, ...), hub id or "
                        "checkpoint folder")
    parser.add_argument("--benchmarks", nargs="+", default=["builtin"],
                        help=f"names ({', '.join(['builtin'] + BENCHMARKS)}) or JSONL paths, comma or space separated")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="folder holding NAME.jsonl files")
    parser.add_argument("--out", default="runs/eval", help="folder for NAME.jsonl results and summary.json")
    parser.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=0,
                        help="k for avg@k and pass@k at temperature 1.0 (0: greedy only)")
    parser.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences generated together")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    benchmarks, held = check_arguments(args)  # every benchmark read and checked before the model loads
    rank, _, args.device = init_distributed(args.device)  # under torchrun: the problems are shared out
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, device=args.device)
    for path in held if rank == 0 else []:  # --overwrite: the old results go only now, when the model has loaded
        path.unlink()
    results, started = {}, time.time()
    settings = {name: getattr(args, name) for name in PARTIAL_SETTINGS}
    for name, problems in benchmarks.items():
        # records are kept as their chunk is graded, in <name>.partial.jsonl: a rerun after a stop continues there
        partial = Path(args.out) / f"{name}.partial.jsonl"
        done = graded_before(partial, settings, len(problems))
        if done and rank == 0:
            print(f"{name}: {len(done)} of {len(problems)} problems graded before, in {partial}: continuing")
        keep = PartialRecords(partial, settings) if rank == 0 else None  # every process holds every record
        try:
            records, metrics = evaluate_benchmark(model, tokenizer, problems, args.samples, args.max_new_tokens,
                                                  args.batch_size, seed=args.seed, desc=name, done=done,
                                                  on_graded=keep.write if keep else None)
        except KeyboardInterrupt:  # Ctrl-C: the graded chunks are kept, and the same command continues
            print(f"\nstopped: the problems graded so far are kept in {partial}; the same command continues")
            raise SystemExit(130)
        results[name] = metrics
        if rank == 0:
            write_jsonl(Path(args.out) / f"{name}.jsonl", records)
            keep.close()
            partial.unlink()
            print(name, json.dumps(metrics))
    end_distributed()
    if rank != 0:
        return
    summary = {"model": args.model, "seconds": round(time.time() - started, 1), "args": vars(args),
               "results": results}
    write_jsonl(Path(args.out) / "summary.json", [summary])
    cells = f"avg@{args.samples} / greedy accuracy" if args.samples else "greedy accuracy"
    print(f"\nresults in {args.out}/; cells: {cells} (%)")
    print(summary_table(args.model, results))


if __name__ == "__main__":
    main()
