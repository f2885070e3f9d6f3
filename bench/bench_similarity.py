"""
Benchmark: srl.step_similarity against difflib.SequenceMatcher(None, a, b).ratio() on real solution steps.

Pairs come from the public data beside the checkout (../shared/data): neighbouring sentences or lines of the
benchmark solutions (MATH-500, AIME24, GSM8K) and neighbouring numbered steps of the s1K solutions, plus as many
random pairs across all pieces. Every pair must give the identical float; then each function is timed over all
pairs, several rounds interleaved, and the best round is kept (the machine may be shared).

    python bench/bench_similarity.py [--data ../shared/data] [--rounds 5] [--seed 0]
"""
import argparse
import difflib
import json
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import srl  # noqa: E402


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def solution_pieces(data):
    """One list of pieces (sentences, lines or numbered steps) per solution, in order."""
    sentences = re.compile(r"(?<=[.!?])\s+|\n+")
    texts = [r["solution"] for name in ("math500", "aime24") for r in read_jsonl(data / "benchmarks" / f"{name}.jsonl")]
    texts += [r["answer"] for r in read_jsonl(data / "benchmarks" / "gsm8k.jsonl")]
    groups = [[s.strip() for s in sentences.split(t) if s.strip()] for t in texts]
    with open(data / "trajectories" / "s1k_problems_solutions.json") as f:
        for record in json.load(f):
            groups.append([s.strip() for s in re.split(r"\n(?=\d+\.\s)", record["solution"]) if s.strip()])
    return groups


def time_all(function, pairs):
    start = time.perf_counter()
    for a, b in pairs:
        function(a, b)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    groups = solution_pieces(args.data)
    pieces = [p for group in groups for p in group]
    pairs = [(x, y) for group in groups for x, y in zip(group, group[1:])]
    pairs += [(rng.choice(pieces), rng.choice(pieces)) for _ in range(len(pairs))]

    def ours(a, b):
        return srl.step_similarity(a, b)

    def reference(a, b):
        return difflib.SequenceMatcher(None, a, b).ratio()

    for a, b in pairs:
        assert ours(a, b) == reference(a, b), (a, b)

    long_pairs = sum(len(b) >= 200 for _, b in pairs)
    mean_chars = sum(len(a) + len(b) for a, b in pairs) / len(pairs)
    print(f"{len(pairs)} pairs ({long_pairs} with len(b) >= 200), {mean_chars:.0f} characters per pair on average;"
          f" all values identical to difflib")
    best = {"step_similarity": float("inf"), "difflib": float("inf")}
    for _ in range(args.rounds):
        best["step_similarity"] = min(best["step_similarity"], time_all(ours, pairs))
        best["difflib"] = min(best["difflib"], time_all(reference, pairs))
    for name, seconds in best.items():
        print(f"{name:16s} {seconds:7.3f} s   {seconds / len(pairs) * 1e6:7.1f} us/pair")
    print(f"speed-up (difflib time / ours): {best['difflib'] / best['step_similarity']:.2f}x")


if __name__ == "__main__":
    main()
