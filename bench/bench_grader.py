"""
Benchmark: our grader (tasks/grader.py's is_equiv) against math-verify, the grader TRL and open-r1 use, on
labelled pairs.

    pip install math-verify          # optional: without it the bench says so and reports ours alone
    python bench/bench_grader.py [--data-dir ../shared/data/benchmarks] [--limit N] [--all-pairs]

Two sets of labelled (prediction, gold) pairs:
  1. the truth table of tests/test_evaluate.py (EQUAL and NOT_EQUAL), both directions;
  2. variants of every distinct reference answer of the benchmark files: the same value rewritten (\\dfrac,
     spacing, \\left( \\right), a unit, a label, a chain, thousands separators, a mixed number, a list joined by
     "and" or reordered), labelled equal; and wrong values near it (a number one higher, the sign flipped, a tuple
     reversed, an interval's bracket changed, "2, 500" for 2500, an item dropped, a fraction inverted, a decimal
     nudged, another unit), labelled different. Pairs whose label depends on the question are labelled "unclear":
     a percent sign added (28% is 28 only when a percentage is asked for), and a number changed inside an exponent
     (the value may stay the same: 1^2 and 1^3).
Each grader is scored against the labels (false positives: different answers called equal), and every pair on
which the two graders disagree is printed, sorted into "ours right", "theirs right" and "unclear". math-verify
is called as open-r1 calls it: verify(parse(gold), parse(prediction)), each wrapped in \\boxed{}. With --all-pairs,
every pair of distinct reference answers that our grader calls equal is printed (each should be one value written
two ways).
"""
import argparse
import itertools
import logging
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from evaluate import BENCHMARKS, DEFAULT_DATA_DIR, load_benchmark  # noqa: E402
from tasks.grader import answer_structure, is_equiv, letters, matching_bracket, split_top_level  # noqa: E402


def truth_table_pairs():
    """(pred, gold, label, kind) from the tests' truth table, both directions."""
    from test_evaluate import EQUAL, NOT_EQUAL
    pairs = []
    for rows, label in ((EQUAL, True), (NOT_EQUAL, False)):
        for pred, gold in rows:
            if pred in (None, "") or gold in (None, ""):
                continue
            pairs += [(str(pred), str(gold), label, "truth table"), (str(gold), str(pred), label, "truth table")]
    return pairs


def bracketed(gold):
    """(open, items, close) when the gold answer is one bracketed tuple, interval or set, else None."""
    for open_, close in (("\\{", "\\}"), ("(", ")"), ("[", "]"), ("(", "]"), ("[", ")")):
        if gold.startswith(open_) and gold.endswith(close) and \
                matching_bracket(gold, len(open_) - 1) == len(gold) - 1:
            items = split_top_level(gold[len(open_):-len(close)], ",")
            return (open_, items, close) if len(items) > 1 else None
    return None


def variants(gold):
    """(pred, gold, label, kind): the gold answer rewritten (label True), and wrong values near it (False, or
    None where the change may leave the value as it is)."""
    out = []
    number = re.fullmatch(r"-?\d+(\.\d+)?", gold)
    integer = int(gold) if re.fullmatch(r"-?\d+", gold) else None
    shape = bracketed(gold)
    separators = re.search(r"\d,(\\!\s*)?\d{3}", gold) is not None  # 1,000 or 10,\!080: a number, not a list
    try:
        bare_list = answer_structure(gold)[0] == "unordered" and not (separators or "\\cup" in gold or
                                                                     gold.startswith("\\{") or "\\pm" in gold)
    except ValueError:
        bare_list = False
    same = lambda kind, text: text != gold and out.append((text, gold, True, kind))  # noqa: E731
    wrong = lambda kind, text, label=False: text != gold and out.append((text, gold, label, kind))  # noqa: E731

    # the same value, written differently
    if "\\frac" in gold:
        same("\\dfrac", gold.replace("\\frac", "\\dfrac"))
        same("\\tfrac", gold.replace("\\frac", "\\tfrac"))
    spaced = r"\s*([+=])\s*" if separators else r"\s*([+=,])\s*"
    same("spacing", re.sub(spaced, r" \1 ", gold).strip())
    same("spacing", re.sub(spaced, r"\1", gold))
    if shape:
        open_, items, close = shape
        same("\\left \\right", f"\\left{open_} {', '.join(items)} \\right{close}")
    if number:
        same("unit", gold + "\\text{ cm}")
        same("unit", gold + "\\textnormal{ miles}")
        same("unit", gold + "\\mbox{ square units}")
        # 28% against 28 is equal only when the question asks for a percentage: unclear
        wrong("percent", gold + "\\%", None)
        wrong("percent", gold + " \\text{ percent}", None)
    if not letters(gold) and "=" not in gold and not bare_list:
        same("label", "x = " + gold)
        if shape and shape[0] == "(" and shape[2] == ")":
            same("label", f"({', '.join('pqrstuvw'[:len(shape[1])])}) = {gold}")
    elif letters(gold) == {"x"} and "=" not in gold and "\\in" not in gold:
        same("label", "f(x) = " + gold)
    if integer is not None and abs(integer) <= 10 ** 9:
        same("chain", f"x = {integer - 1} + 1 = {integer}")
        same("decimal", f"{integer}.0")
        if abs(integer) >= 1000:
            same("separator ,", f"{integer:,}")
            same("separator {,}", f"{integer:,}".replace(",", "{,}"))
            same("separator \\,", f"{integer:,}".replace(",", "\\,"))
            wrong("list, not a number", f"{integer:,}".replace(",", ", "))
        wrong("label", f"x = {integer + 1}")
    fraction = re.fullmatch(r"\\frac\{(\d+)\}\{(\d+)\}", gold)
    if fraction and int(fraction[1]) > int(fraction[2]) > 1 and int(fraction[1]) % int(fraction[2]):
        p, q = int(fraction[1]), int(fraction[2])
        same("mixed number", f"{p // q}\\frac{{{p % q}}}{{{q}}}")
    if bare_list:
        items = split_top_level(gold, ",")
        same("list with and", " \\text{ and } ".join(items))
        same("list reordered", ", ".join(reversed(items)))

    # wrong values near it
    numbers = list(re.finditer(r"\d+", gold))
    if numbers:
        last = numbers[-1]
        in_exponent = re.search(r"\^\{?[^{}]*$", gold[:last.start()]) is not None  # 1^2 is 1^3
        wrong("number + 1", gold[:last.start()] + str(int(last[0]) + 1) + gold[last.end():],
              None if in_exponent else False)
    if not letters(gold) and "," not in gold and "=" not in gold and "\\pm" not in gold and not re.fullmatch(
            r"[-+]?[0.]+", gold) and not gold.startswith("-"):
        wrong("sign", "-" + gold if number else f"-({gold})")
    if shape and len(set(shape[1])) > 1 and shape[0] != "\\{":
        wrong("tuple reversed", shape[0] + ", ".join(reversed(shape[1])) + shape[2])
    if shape and shape[0] in "([" and len(shape[1]) == 2:
        wrong("bracket changed", {"(": "[", "[": "("}[shape[0]] + ", ".join(shape[1]) + shape[2])
    if (shape or bare_list) and len(set(split_top_level(gold, ",") if bare_list else shape[1])) > 1:
        items = split_top_level(gold, ",") if bare_list else shape[1]
        wrong("item dropped", ", ".join(items[:-1]) if bare_list else shape[0] + ", ".join(items[:-1]) + shape[2])
    if fraction and fraction[1] != fraction[2]:
        wrong("fraction inverted", f"\\frac{{{fraction[2]}}}{{{fraction[1]}}}")
    if number and number[1]:
        wrong("decimal nudged", gold[:-1] + str((int(gold[-1]) + 1) % 10))
    if number:
        out.append((gold + "\\text{ minutes}", gold + "\\text{ seconds}", False, "unit changed"))
    return out


def benchmark_pairs(data_dir, limit):
    golds = []
    for name in BENCHMARKS:
        try:
            golds += [p["answer"] for p in load_benchmark(name, data_dir, limit)]
        except FileNotFoundError as e:
            print(f"skipped: {e}")
    distinct = list(dict.fromkeys(golds))
    return [pair for gold in distinct for pair in variants(gold)], len(distinct)


def all_pairs(data_dir):
    """Every pair of distinct reference answers of MATH500, Minerva, AMC23, AIME24 and AIME25 that our grader calls
    equal: each should be one value written two ways."""
    golds = list(dict.fromkeys(p["answer"] for name in ("math500", "minerva", "amc23", "aime24", "aime25")
                               for p in load_benchmark(name, data_dir)))
    start = time.perf_counter()
    equal = [(a, b) for a, b in itertools.combinations(golds, 2) if is_equiv(a, b)]
    pairs = len(golds) * (len(golds) - 1) // 2
    print(f"\n== all {pairs} pairs of the {len(golds)} distinct reference answers of MATH500, Minerva, AMC23, AIME24 "
          f"and AIME25: {len(equal)} called equal ({time.perf_counter() - start:.0f} s)")
    for a, b in equal:
        print(f"    {a!r:30s} {b!r}")


def math_verify_grader():
    """math-verify's comparison, as open-r1's accuracy reward makes it, or None when it is not installed."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # it logs every parse it cannot finish

    def theirs(pred, gold):
        try:
            return bool(verify(parse("\\boxed{" + gold + "}"), parse("\\boxed{" + pred + "}")))
        except Exception:  # a crash inside math-verify counts as "not equal", as our grader's own errors do
            return False
    return theirs


def score(name, verdicts, pairs):
    labelled = [(v, p[2]) for v, p in zip(verdicts, pairs) if p[2] is not None]
    right = sum(v == label for v, label in labelled)
    false_pos = sum(v and not label for v, label in labelled)
    false_neg = sum(label and not v for v, label in labelled)
    return (f"  {name:12s} right on {right}/{len(labelled)} labelled pairs ({right / max(1, len(labelled)):.1%}); "
            f"false positives {false_pos}, false negatives {false_neg}")


def report(title, pairs, theirs):
    print(f"\n== {title}: {len(pairs)} pairs ({sum(p[2] is None for p in pairs)} unclear by construction)")
    start = time.perf_counter()
    ours = [is_equiv(pred, gold) for pred, gold, _, _ in pairs]
    print(score("ours", ours, pairs) + f"; {(time.perf_counter() - start) / len(pairs) * 1e3:.1f} ms/pair")
    if theirs is None:
        return 0, 0
    start = time.perf_counter()
    other = [theirs(pred, gold) for pred, gold, _, _ in pairs]
    print(score("math-verify", other, pairs) + f"; {(time.perf_counter() - start) / len(pairs) * 1e3:.1f} ms/pair")
    disagreements = [(p, o, t) for p, o, t in zip(pairs, ours, other) if o != t]
    print(f"  agreement {1 - len(disagreements) / len(pairs):.1%} ({len(disagreements)} disagreements)")
    groups = {"ours right": [], "theirs right": [], "unclear": []}
    for (pred, gold, label, kind), o, t in disagreements:
        group = "unclear" if label is None else "ours right" if o == label else "theirs right"
        groups[group].append(f"    {kind:20s} pred {pred!r:40s} gold {gold!r:30s} label {label}, ours {o}, "
                             f"math-verify {t}")
    for group, lines in groups.items():
        print(f"  {group}: {len(lines)}")
        print("\n".join(lines)) if lines else None
    return len(groups["theirs right"]), sum(o and p[2] is False for p, o in zip(pairs, ours))


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="benchmark JSONL files")
    parser.add_argument("--limit", type=int, default=None, help="first N reference answers of each benchmark")
    parser.add_argument("--all-pairs", action="store_true",
                        help="also grade every pair of distinct reference answers with ours (minutes)")
    args = parser.parse_args()

    theirs = math_verify_grader()
    if theirs is None:
        print("math-verify is not installed (pip install math-verify): reporting our grader alone")
    variant_pairs, golds = benchmark_pairs(args.data_dir, args.limit)
    results = [report("truth table (tests/test_evaluate.py)", truth_table_pairs(), theirs),
               report(f"variants of {golds} distinct reference answers of {args.data_dir}", variant_pairs, theirs)]
    theirs_right, false_positives = map(sum, zip(*results))
    print(f"\nour false positives: {false_positives}; disagreements where math-verify is right: "
          + (str(theirs_right) if theirs else "(not measured)"))
    if args.all_pairs:
        all_pairs(args.data_dir)


if __name__ == "__main__":
    main()
