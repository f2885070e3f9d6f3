"""Tests for data_prep.py: step splitting, examples, splits, built-in and synthetic data, bad input."""
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
import types
from fractions import Fraction
from pathlib import Path

import pytest
import sympy

import data_prep
from data_prep import split_paragraphs, split_steps, step_title
from machinery.files import write_jsonl
from tasks import synthetic
from tasks.grader import last_boxed
from tasks.sources import DataError, read_records

ROOT = Path(__file__).resolve().parents[1]
OUTPUT_FILES = ["srl_train.jsonl", "srl_val.jsonl", "sft_srl_train.jsonl", "rlvr_train.jsonl",
                "rlvr_val.jsonl", "sft_train.jsonl"]
S1K_FLAGS = ["--question-field", "problem", "--solution-field", "solution"]


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "data_prep.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def snapshot(folder):
    """Every file's bytes and modification time: to show that a failed run changed nothing."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in Path(folder).iterdir()}


# ----------------------------------------------------------------------------------------------------
# split_steps on hand-written solutions

STEP_BODIES = ["Add the two numbers: \\(2 + 3 = 5\\).", "Multiply by four: \\(5 \\cdot 4 = 20\\).",
               "Subtract one: \\(20 - 1 = 19\\)."]
STYLES = {  # header of step k in each numbering style
    "dot": lambda k: f"{k}.",
    "paren": lambda k: f"{k})",
    "step colon": lambda k: f"Step {k}:",
    "bold step": lambda k: f"**Step {k}.**",
    "heading step": lambda k: f"### Step {k}",
    "bold title": lambda k: f"{k}. **Part {'ABC'[k - 1]}.**",
    "bold number": lambda k: f"**{k}.**",
}


@pytest.mark.parametrize("style", STYLES)
def test_every_numbering_style(style):
    header = STYLES[style]
    sep = "\n" if style == "heading step" else " "
    expected = [f"{header(k)}{sep}{body}" for k, body in enumerate(STEP_BODIES, 1)]
    solution = "We compute step by step.\n\n" + "\n\n".join(expected)
    assert split_steps(solution) == expected


def test_text_before_step_one_is_not_a_step_and_answer_line_stays_with_last_step():
    steps = ["1. **Setup.** Let \\(x = 3\\).", "2. **Square.** \\(x^2 = 9\\).",
             "3. **Add.** \\(9 + 1 = 10\\).\n\nThe final answer is \\boxed{10}"]
    solution = "Intro paragraph: we solve it.\nSecond preamble line.\n\n" + "\n\n".join(steps)
    assert split_steps(solution) == steps


def test_indented_nested_list_stays_inside_its_step():
    step1 = "1. **Cases.** We consider:\n   1. \\(x > 0\\): fine.\n   2. \\(x < 0\\): also fine.\n   3. zero."
    step2 = "2. **Conclude.** All cases work."
    assert split_steps(step1 + "\n" + step2) == [step1, step2]


def test_list_restarting_at_one_inside_step_three_stays_nested():
    steps = ["1. First step.", "2. Second step.",
             "3. Third step, by cases:\n1. the even case;\n2. the odd case.\nBoth cases agree.",
             "4. Fourth step.\nThe answer is \\boxed{4}."]
    assert split_steps("\n".join(steps)) == steps


def test_plain_nested_list_inside_bold_title_steps():
    # "2." of the nested list comes where top-level step 2 is expected, but its style differs.
    steps = ["1. **Facts.** We know:\n1. a is even,\n2. b is odd.", "2. **Combine.** So a + b is odd."]
    assert split_steps("\n".join(steps)) == steps


def test_numbers_must_be_consecutive():
    solution = "1. First.\n3. This is not step 2.\n2. Second."
    assert split_steps(solution) == ["1. First.\n3. This is not step 2.", "2. Second."]


@pytest.mark.parametrize("open_, close", [("$$", "$$"), ("\\[", "\\]"), ("\\begin{align}", "\\end{align}"),
                                          ("\\begin{equation*}", "\\end{equation*}")])
def test_display_math_stays_whole(open_, close):
    step1 = f"1. **Expand.** We get\n{open_}\n2. x + 3 \\\\\n3. y\n{close}\nand go on."
    step2 = "2. **Finish.** Done: \\boxed{5}."
    assert split_steps(step1 + "\n" + step2) == [step1, step2]


def test_multi_part_solution_continues_after_a_part_heading():
    part_a = ["1. **Set up.** a", "2. **Solve.** b"]
    part_b = ["### Part (b)\n\nNow the second part.\n\n1. **Set up again.** c", "2. **Solve again.** d"]
    solution = "### Part (a)\n\n" + "\n\n".join(part_a + part_b)
    assert split_steps(solution) == part_a + part_b


def test_a_sentence_starting_with_step_is_not_a_header():
    assert split_steps("Step 1 is to note that x is even.\nStep 2 is trivial.") == []


def test_no_numbered_steps_gives_empty_list():
    assert split_steps("We note that 1.5 is half of 3, so the answer is \\boxed{1.5}.") == []
    assert split_steps("") == []


def test_restated_conditions_list_before_the_bold_steps_is_preamble():
    solution = ("Given:\n1. x is odd.\n2. y is even.\n\n### Solution\n\n1. **Parity.** x + y is odd."
                "\n2. **Answer.** \\boxed{1}")
    assert split_steps(solution) == ["1. **Parity.** x + y is odd.", "2. **Answer.** \\boxed{1}"]


def test_step_title():
    assert step_title("3. **Compute the sum:** we add") == "Compute the sum"
    assert step_title("Step 2: Use the given conditions\nWe know...") == "Use the given conditions"
    assert step_title("### Step 4\nFactor the quadratic. Then more.") == "Factor the quadratic"
    assert step_title("2. Simplify the series. It telescopes.") == "Simplify the series"
    assert len(step_title("1. " + "word " * 40)) <= 80


def test_paragraph_fallback_keeps_display_math_with_its_paragraph():
    assert split_paragraphs("A.\n\nB, since\n\n\\[\nx = 1\n\\]\n\nC.") == ["A.", "B, since\n\n\\[\nx = 1\n\\]", "C."]


def test_last_boxed():
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("so \\fbox{ x^{2} }.") == "x^{2}"
    assert last_boxed("no answer") is None
    assert last_boxed("\\boxed{\\left\\{1, 2\\right\\}}") == "\\left\\{1, 2\\right\\}"
    assert last_boxed("\\boxed{unbalanced") is None
    assert last_boxed("\\boxed{x \\in \\{1, 2}") == "x \\in \\{1, 2"  # escaped braces do not count
    assert last_boxed("so \\boxed 5.") == "5." and last_boxed("$\\boxed 7$") == "7"
    assert last_boxed("\\boxed{}") is None and last_boxed("\\boxedx{3}") is None
    assert last_boxed("\\boxed{1} and \\boxed {2}") == "2"


# ----------------------------------------------------------------------------------------------------
# The real s1K file (checked by eye, then frozen here)

# id -> (number of steps, start of each listed step, end of the last step)
S1K_CHECKED = {
    0: (5, {1: "1. **Rewrite the function using trigonometric", 5: "5. **Conclusion:**"},
        "The final answer is \\( \\boxed{ a^2 + b^2 \\leq 2 } \\) and \\( A^2 + B^2 \\leq 1 \\)"),
    8: (3, {1: "1. **Defining the Sparse Set", 3: "3. **Existence of Sparse Set"}, "\\(\\blacksquare\\)"),
    24: (10, {5: "5. **Conclusion**:", 6: "### Part (b)\n\n1. **Define the Set", 7: "2. **Construct a Functional"},
         "The final answer is \\( \\boxed{ f(x) = \\lfloor x \\rfloor } \\)"),
    128: (8, {3: "### Part (b)\n\nFor any integer", 8: "6. **ODE Form**"},
          "The final answer is \\( \\boxed{ (c_1, c_2) = (-2k, -4\\pi^2) } \\)"),
    206: (7, {1: "1. **Identify the problem**", 7: "7. **Conclusion**"}, "\\boxed{ (6, 12) } \\)."),
    341: (7, {1: "1. Convert \\( 313 \\) to binary:", 4: "### Part (ii)", 7: "4. If the binary"},
          "\\(\\blacksquare\\)"),
    481: (4, {1: "1. **Determine the number of tagged fish", 4: "4. **Calculate the total number"},
          "The final answer is \\(\\boxed{630}\\)."),
    591: (5, {1: "1. **Euler's Formula**", 5: "5. **Verification**"}, "utilizing graph coloring properties "
          "to achieve required monochromatic connectivity."),
    627: (5, {1: "Step 1: Express \\(M\\) in terms of \\(N\\)", 5: "Step 5: Check possible values"},
          "\\[ \\boxed{5499} \\]"),
    844: (4, {2: "2. **Operations to Compute Powers", 4: "4. **Total Operations**"},
          "The final answer is \\( \\boxed{ 17 } \\)."),
    899: (10, {6: "6. **Evaluate each sum:**", 10: "10. **Rational number:**"},
          "The final answer is \\( \\boxed{ \\frac{(n-1)(5n-1)}{6n} } \\)"),
}


@pytest.fixture
def s1k(shared_data):
    path = shared_data / "trajectories" / "s1k_problems_solutions.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


def test_s1k_checked_records(s1k):
    records = {r["id"]: r for r in read_records(s1k)}
    for rid, (count, starts, last_end) in S1K_CHECKED.items():
        steps = split_steps(records[rid]["solution"])
        assert len(steps) == count, rid
        for k, start in starts.items():
            assert steps[k - 1].startswith(start), (rid, k)
        assert steps[-1].endswith(last_end), rid
    # lists kept inside a step: id 8 step 1 (indented); id 844 step 4, two plain lists (1.-10., then
    # 1.-7.) at column 0 after the bold steps, where "4. Compute" must not pass for step 4
    assert "     1. Construct the string" in split_steps(records[8]["solution"])[0]
    assert "10. Compute \\( x^{1024} \\)" in split_steps(records[844]["solution"])[3]
    assert "7. Compute \\( x^{2004} \\cdot x^2" in split_steps(records[844]["solution"])[3]


def test_s1k_counts_and_invariants(s1k):
    records = read_records(s1k)
    assert len(records) == 1000
    numbered = 0
    for record in records:
        solution = record["solution"]
        steps = split_steps(solution)
        numbered += bool(steps)
        # nothing is lost or reordered: the steps, joined, are the solution from step 1 on
        squash = lambda s: re.sub(r"\s+", "", s)  # noqa: E731
        assert squash(solution).endswith(squash("".join(steps)))
        # display math is never torn (where the source itself is balanced)
        if solution.count("\\[") == solution.count("\\]") and solution.count("$$") % 2 == 0:
            for step in steps:
                assert step.count("\\[") == step.count("\\]") and step.count("$$") % 2 == 0, record["id"]
    assert 260 <= numbered <= 290  # 275 when these tests were written


def test_s1k_cli_end_to_end_and_timing(s1k, tmp_path):
    start = time.time()
    result = run_cli("--input", s1k, "--out-dir", tmp_path, *S1K_FLAGS)
    elapsed = time.time() - start
    assert result.returncode == 0, result.stderr
    assert elapsed < 10, elapsed  # about half a second on a laptop
    assert "with numbered steps: 275" in result.stdout
    train, val = read_jsonl(tmp_path / "srl_train.jsonl"), read_jsonl(tmp_path / "srl_val.jsonl")
    assert {e["id"] for e in train}.isdisjoint({e["id"] for e in val})
    assert len({e["id"] for e in val}) == 27  # 10% of the 275 problems with steps
    per_problem = {}
    for e in train + val:
        per_problem[e["id"]] = e["num_steps"]
    assert len(train) + len(val) == sum(n - 1 for n in per_problem.values())


# ----------------------------------------------------------------------------------------------------
# Examples, files and the validation split

def make_problem(pid, n_steps, answer="7"):
    steps = [f"{k}. **Title {k}.** Body of step {k}." for k in range(1, n_steps + 1)]
    return {"id": pid, "problem": f"Problem {pid}?", "solution": "Preamble.\n\n" + "\n\n".join(steps),
            "answer": answer}


def test_srl_examples_contexts_and_targets(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(make_problem(f"p{i}", n)) + "\n" for i, n in enumerate([4, 2, 1, 3])))
    assert run_cli("--input", path, "--out-dir", tmp_path / "out", *S1K_FLAGS, "--val-problems", "0",
                   "--next-step-title").returncode == 0
    examples = read_jsonl(tmp_path / "out" / "srl_train.jsonl")
    assert len(examples) == 3 + 1 + 0 + 2  # N - 1 per solution, none for a single step
    for e in examples:
        k, n = e["step_index"], e["num_steps"]
        assert 2 <= k <= n and len(e["previous_steps"]) == k - 1
        assert e["previous_steps"] == [f"{j}. **Title {j}.** Body of step {j}." for j in range(1, k)]
        assert e["target_step"] == f"{k}. **Title {k}.** Body of step {k}."
        assert e["next_step_title"] == f"Title {k}"
        assert e["problem"] == f"Problem {e['id']}?" and e["answer"] == "7"
    with_first = run_cli("--input", path, "--out-dir", tmp_path / "o2", *S1K_FLAGS, "--val-problems", "0",
                         "--include-first-step")
    assert with_first.returncode == 0
    examples = read_jsonl(tmp_path / "o2" / "srl_train.jsonl")
    assert len(examples) == 4 + 2 + 1 + 3
    assert [e["previous_steps"] for e in examples if e["step_index"] == 1] == [[]] * 4
    assert "1 with a single step" in run_cli("--input", path, "--out-dir", tmp_path / "o3", *S1K_FLAGS).stdout


def test_sft_srl_completion_format(tmp_path):
    assert run_cli("--out-dir", tmp_path).returncode == 0
    train = read_jsonl(tmp_path / "srl_train.jsonl")
    sft = read_jsonl(tmp_path / "sft_srl_train.jsonl")
    assert len(sft) == len(train)
    for e, s in zip(train, sft):
        assert {k: v for k, v in s.items() if k != "completion"} == e
        think, sep, action = s["completion"].partition("\n</think>\n")
        assert think.startswith("<think>\n") and sep and action == e["target_step"]
        assert step_title(e["target_step"]) in think


def test_rlvr_and_sft_sets(tmp_path):
    records = [make_problem("a", 3, answer="5"), {**make_problem("b", 2), "answer": 12.0},
               {"id": "c", "problem": "Free text?", "solution": "So it is \\boxed{\\frac{1}{2}}.",
                "answer": None, "reasoning": "Hmm, let me think."}]
    path = tmp_path / "in.json"
    path.write_text(json.dumps(records))
    result = run_cli("--input", path, "--out-dir", tmp_path, *S1K_FLAGS, "--reasoning-field", "reasoning",
                     "--val-problems", "0")
    assert result.returncode == 0, result.stderr
    rlvr = read_jsonl(tmp_path / "rlvr_train.jsonl")
    assert rlvr == [{"id": "a", "problem": "Problem a?", "answer": "5"},
                    {"id": "b", "problem": "Problem b?", "answer": "12"},
                    {"id": "c", "problem": "Free text?", "answer": "\\frac{1}{2}"}]
    sft = read_jsonl(tmp_path / "sft_train.jsonl")
    assert [r["id"] for r in sft] == ["a", "b", "c"]  # unnumbered solutions still serve SFT
    assert sft[2]["solution"] == records[2]["solution"] and sft[2]["reasoning"] == "Hmm, let me think."
    assert "reasoning" not in sft[0]
    assert "dropped from SRL: 1 without numbered steps" in result.stdout


def test_validation_split_is_disjoint_and_deterministic(tmp_path):
    runs = {}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        result = run_cli("--input", ROOT / "builtin_problems.jsonl", "--out-dir", tmp_path / name,
                         *S1K_FLAGS, "--seed", seed)
        assert result.returncode == 0, result.stderr
        runs[name] = {f: (tmp_path / name / f).read_bytes() for f in OUTPUT_FILES}
        out = tmp_path / name
        val_ids = {e["id"] for e in read_jsonl(out / "srl_val.jsonl")}
        assert val_ids == {e["id"] for e in read_jsonl(out / "rlvr_val.jsonl")}
        assert len(val_ids) == 4  # min(60, max(1, 10% of 49))
        for train_file in ["srl_train.jsonl", "sft_srl_train.jsonl", "rlvr_train.jsonl", "sft_train.jsonl"]:
            assert val_ids.isdisjoint(e["id"] for e in read_jsonl(out / train_file))
        all_ids = {e["id"] for e in read_jsonl(out / "rlvr_train.jsonl")} | val_ids
        assert len(all_ids) == 49
    assert runs["a"] == runs["b"]
    assert runs["a"]["srl_val.jsonl"] != runs["c"]["srl_val.jsonl"]


def test_val_problems_flag_and_split_does_not_depend_on_input_order(tmp_path):
    records = [make_problem(f"p{i:02d}", 3) for i in range(30)]
    for name, recs in [("fwd", records), ("rev", records[::-1])]:
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
        assert run_cli("--input", path, "--out-dir", tmp_path / name, *S1K_FLAGS,
                       "--val-problems", 10).returncode == 0
    val = [{e["id"] for e in read_jsonl(tmp_path / n / "rlvr_val.jsonl")} for n in ("fwd", "rev")]
    assert len(val[0]) == 10 and val[0] == val[1]
    bad = run_cli("--input", tmp_path / "fwd.jsonl", "--out-dir", tmp_path / "x", *S1K_FLAGS, "--val-problems", 31)
    assert bad.returncode != 0 and "--val-problems" in bad.stderr


# ----------------------------------------------------------------------------------------------------
# Built-in problems: every answer recomputed in Python

def answer_value(latex):
    """A LaTeX answer (integers, \\frac, \\sqrt, \\pi) as a sympy expression."""
    text = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", latex)
    text = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", text).replace("\\pi", "pi")
    text = re.sub(r"(\d)\s*(sqrt|pi)", r"\1*\2", text)
    return sympy.sympify(text)


def _lattice_paths_through(point, end):
    count = 0
    for ups in itertools.combinations(range(sum(end)), end[1]):
        x = y = 0
        visited = {(0, 0)}
        for i in range(sum(end)):
            x, y = (x, y + 1) if i in ups else (x + 1, y)
            visited.add((x, y))
        count += point in visited
    return count


x = sympy.Symbol("x")
BUILTIN_ORACLES = {
    "builtin-01": lambda: 50 - (4 * 3 + 7 * 2),
    "builtin-02": lambda: Fraction(150 + 90) / (Fraction(5, 2) + Fraction(3, 2)),
    "builtin-03": lambda: 80 * Fraction(3, 4) * Fraction(11, 10),
    "builtin-04": lambda: Fraction(2, 3) + Fraction(3, 4) - Fraction(5, 6),
    "builtin-05": lambda: Fraction(3 ** 4 - 2 ** 5, 7) + 6 * 5,
    "builtin-06": lambda: next(k for k in range(100) if 64 * 3 // 8 + k == 64 * 5 // 8),
    "builtin-07": lambda: 1 / (Fraction(1, 6) + Fraction(1, 3)),
    "builtin-08": lambda: 6 * 15 - 5 * 14,
    "builtin-09": lambda: 240 * Fraction(135, 100) - 24 - 240,
    "builtin-10": lambda: sympy.solve(5 * x - 7 - (3 * x + 9))[0],
    "builtin-11": lambda: next(a * b for a in range(30) for b in range(30) if a + b == 17 and a - b == 5),
    "builtin-12": lambda: sum(r ** 2 for r in sympy.solve(x ** 2 - 7 * x + 10)),
    "builtin-13": lambda: max(sympy.solve(x ** 2 + 4 * x - 45)),
    "builtin-14": lambda: (lambda f, g: f(g(3)) - g(f(1)))(lambda t: 2 * t + 3, lambda t: t * t - 1),
    "builtin-15": lambda: next(a + 19 * d for a in range(-50, 50) for d in range(-20, 20)
                               if a + 2 * d == 11 and a + 7 * d == 31),
    "builtin-16": lambda: sum(3 * 2 ** i for i in range(6)),
    "builtin-17": lambda: next(t for t in range(-50, 50) if t >= 1 and 2 ** (t + 3) == 4 ** (t - 1)),
    "builtin-18": lambda: sum(1 for t in range(-100, 100) if abs(2 * t - 5) < 9),
    "builtin-19": lambda: next(2 * s for s in range(11, 100) if 2 * s - 10 == 3 * (s - 10)),
    "builtin-20": lambda: sympy.log(32, 2) + sympy.log(81, 3) - sympy.log(125, 5),
    "builtin-21": lambda: sympy.nsimplify(sympy.simplify(
        [r ** 3 + 1 / r ** 3 for r in sympy.solve(x + 1 / x - 5)][0])),
    "builtin-22": lambda: sum(n for n in range(1, 101) if n % 3 == 0 or n % 5 == 0),
    "builtin-23": lambda: next(a * b for a in range(1, 23) for b in range(1, 23)
                               if 2 * (a + b) == 46 and a * a + b * b == 17 ** 2),
    "builtin-24": lambda: Fraction(9 * 12, math.isqrt(9 ** 2 + 12 ** 2)),
    "builtin-25": lambda: 10 ** 2 - sympy.pi * (sympy.Integer(10) / 2) ** 2,
    "builtin-26": lambda: next(2 * b for b in range(1, 180) if 2 * b + b + (b + 20) == 180),
    "builtin-27": lambda: next(n * (n - 3) // 2 for n in range(3, 100) if (n - 2) * 180 == 156 * n),
    "builtin-28": lambda: Fraction(abs((7 - 1) * (11 - 2) - (4 - 1) * (5 - 2)), 2),
    "builtin-29": lambda: sympy.sqrt(sympy.Rational(2 + 8, 2) ** 2 + sympy.Rational(-1 + 7, 2) ** 2),
    "builtin-30": lambda: (6 ** 3 // 2 ** 3) * 6 * 2 ** 2,
    "builtin-31": lambda: math.isqrt(15 ** 2 - 9 ** 2) - math.isqrt(15 ** 2 - 12 ** 2),
    "builtin-32": lambda: sympy.sqrt(3) / 4 * 6 ** 2,
    "builtin-33": lambda: sum(1 for n in range(1000, 10000) if len(set(str(n))) == 4),
    "builtin-34": lambda: sum(1 for c in itertools.combinations(range(11), 4)  # people 6..10 are women
                              if sum(i >= 6 for i in c) >= 2),
    "builtin-35": lambda: len(set(itertools.permutations("BANANA"))),
    "builtin-36": lambda: Fraction(sum(1 for a in range(1, 7) for b in range(1, 7) if a + b == 8 or a == b), 36),
    "builtin-37": lambda: sum(1 for n in range(1, 1001) if n % 6 and n % 10),
    "builtin-38": lambda: _lattice_paths_through((2, 1), (5, 3)),
    "builtin-39": lambda: sum(1 for p in itertools.permutations("ABCDE") if abs(p.index("A") - p.index("B")) == 1),
    "builtin-40": lambda: Fraction(sum(1 for s in itertools.product([0, 1], repeat=6) if sum(s) == 4), 2 ** 6),
    "builtin-41": lambda: math.gcd(1071, 462),
    "builtin-42": lambda: 3 ** 100 % 7,
    "builtin-43": lambda: sum(1 for d in range(1, 721) if 720 % d == 0),
    "builtin-44": lambda: next(n for n in range(1, 200) if n % 3 == 2 and n % 5 == 3 and n % 7 == 2),
    "builtin-45": lambda: sum(map(int, str(2 ** 20))),
    "builtin-46": lambda: 7 ** 2024 % 100,
    "builtin-47": lambda: sum(math.factorial(n) for n in range(1, 51)) % 10,
    "builtin-48": lambda: len(str(math.factorial(125))) - len(str(math.factorial(125)).rstrip("0")),
    "builtin-49": lambda: math.lcm(12, 18, 30),
}


def test_builtin_problems_are_correct_and_well_formed():
    problems = data_prep.builtin_problems()
    assert len(problems) >= 40
    assert {p["id"] for p in problems} == set(BUILTIN_ORACLES)
    assert {p["topic"] for p in problems} == {"arithmetic", "algebra", "geometry", "counting", "number theory"}
    for p in problems:
        steps = split_steps(p["solution"])
        assert len(steps) >= 2, p["id"]
        assert all(re.match(rf"{k}\. \*\*[^*]+\*\*\s", s) for k, s in enumerate(steps, 1)), p["id"]
        assert last_boxed(steps[-1]) == p["answer"], p["id"]
        expected = BUILTIN_ORACLES[p["id"]]()
        assert sympy.simplify(answer_value(p["answer"]) - sympy.nsimplify(expected)) == 0, p["id"]


# ----------------------------------------------------------------------------------------------------
# Synthetic problems: answers recomputed from the problem text

def solve_synthetic(problem):
    """The numbers after each step of a synthetic chain, read from the problem text alone."""
    start, word, n, times = re.fullmatch(r"Start with (\d+)\. (Add|Subtract) (\d+), (once|twice|\d+ times)\. "
                                         r"What number do you end with\?", problem).groups()
    count = {"once": 1, "twice": 2}.get(times) or int(times.split()[0])
    assert count > 2 or times in ("once", "twice")
    step = int(n) if word == "Add" else -int(n)
    return [int(start) + step * k for k in range(1, count + 1)]


@pytest.mark.parametrize("steps,max_number,max_value", [(1, 5, 30), (3, 9, 30), ((2, 6), 9, 99), (10, 50, 1000)])
def test_synthetic_problems_are_exact(steps, max_number, max_value):
    problems = synthetic.synthetic_problems(60, steps, max_number, seed=3, max_value=max_value)
    assert len({p["problem"] for p in problems}) > 30
    low, high = steps if isinstance(steps, tuple) else (steps, steps)
    for p in problems:
        values = solve_synthetic(p["problem"])
        assert low <= len(values) <= high and p["answer"] == str(values[-1])
        solution_steps = split_steps(p["solution"])
        assert len(solution_steps) == len(values)
        value = int(re.match(r"Start with (\d+)", p["problem"]).group(1))
        operation = re.search(r"(Add|Subtract) \d+", p["problem"]).group(0)
        for k, (step, expected) in enumerate(zip(solution_steps, values), 1):
            # step k: its number, the problem's operation, the number above it, one addition or subtraction
            assert step.startswith(f"{k}. {operation}: ")
            a, op, b, c = re.search(r": (\d+) ([-+]) (\d+) = (\d+)\.", step).groups()
            assert int(a) == value and 1 <= int(b) <= max_number
            assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b)) == expected
            assert 0 <= int(c) <= max_value
            value = int(c)
        assert last_boxed(solution_steps[-1]) == p["answer"]
    if low < high:  # a mix of lengths covers the range
        assert {len(solve_synthetic(p["problem"])) for p in problems} == set(range(low, high + 1))
    assert synthetic.synthetic_problems(5, seed=1) == synthetic.synthetic_problems(5, seed=1)
    assert synthetic.synthetic_problems(5, seed=1) != synthetic.synthetic_problems(5, seed=2)


@pytest.mark.parametrize("slip", [0.0, 0.5, 1.0])
def test_synthetic_slip_applies_the_operation_twice(slip):
    """A sloppy teacher's step applies the operation twice with probability slip; the chain goes on from there."""
    problems = synthetic.synthetic_problems(300, (1, 6), seed=4, max_value=40, slip=slip)
    assert [p["problem"] for p in problems] == [p["problem"] for p in synthetic.synthetic_problems(300, (1, 6), seed=4)]
    steps = slips = 0
    for p in problems:
        word, n = re.search(r"(Add|Subtract) (\d+)", p["problem"]).groups()
        step = int(n) if word == "Add" else -int(n)
        value = int(re.match(r"Start with (\d+)", p["problem"]).group(1))
        for line in split_steps(p["solution"]):
            a, c = map(int, re.search(r": (\d+) [-+] \d+ = (\d+)\.", line).groups())
            assert a == value and c in (a + step, a + 2 * step) and 0 <= c <= 40
            steps, slips, value = steps + 1, slips + (c != a + step), c
        assert p["answer"] == str(value) == last_boxed(p["solution"])
    assert abs(slips / steps - slip) < 0.05, (slips, steps)


def test_synthetic_cli(tmp_path):
    result = run_cli("--synthetic", 200, "--out-dir", tmp_path, "--synthetic-steps", 5)
    assert result.returncode == 0, result.stderr
    assert len(read_jsonl(tmp_path / "rlvr_train.jsonl")) + len(read_jsonl(tmp_path / "rlvr_val.jsonl")) == 200
    assert len(read_jsonl(tmp_path / "srl_train.jsonl")) == 180 * 4
    assert run_cli("--synthetic", 0, "--out-dir", tmp_path / "x").returncode != 0
    assert run_cli("--synthetic", 5, "--synthetic-steps", "3-2", "--out-dir", tmp_path / "x").returncode != 0
    assert run_cli("--synthetic", 5, "--synthetic-steps", "2-x", "--out-dir", tmp_path / "x").returncode != 0
    assert run_cli("--synthetic", 5, "--synthetic-slip", "1.5", "--out-dir", tmp_path / "x").returncode != 0
    assert run_cli("--synthetic", 5, "--synthetic-steps", 30, "--out-dir", tmp_path / "x").returncode != 0  # > 40 / 2
    result = run_cli("--synthetic", 50, "--synthetic-steps", "1-3", "--out-dir", tmp_path / "mix")
    assert result.returncode == 0, result.stderr
    assert {r["num_steps"] for r in read_jsonl(tmp_path / "mix" / "srl_train.jsonl")} == {2, 3}


# ----------------------------------------------------------------------------------------------------
# The command line, reading, writing and bad input

def test_default_cli_writes_builtin_set_quickly(tmp_path):
    start = time.time()
    result = run_cli(cwd=tmp_path)  # no arguments: built-in problems into ./data
    elapsed = time.time() - start
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(OUTPUT_FILES)
    assert not list((tmp_path / "data").glob(".*"))  # no temporary file left behind
    for line in ["read 49 problems", "steps per solution min 2 / median 3 / max 5", "srl_train.jsonl: "]:
        assert line in result.stdout
    assert elapsed < 5, elapsed  # well under a second on an idle machine


def test_read_json_jsonl_and_blank_lines(tmp_path):
    records = [{"id": 1, "a": "x"}, {"id": 2, "a": "y"}]
    (tmp_path / "r.json").write_text(json.dumps(records, indent=2))
    (tmp_path / "r.jsonl").write_text("\n" + json.dumps(records[0]) + "\n\n" + json.dumps(records[1]) + "\n")
    assert read_records(tmp_path / "r.json") == records == read_records(tmp_path / "r.jsonl")


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes "import pyarrow" fail
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="pip install pyarrow"):
        read_records(tmp_path / "x.parquet")


def test_parquet_with_pyarrow(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    rows = [{"question": "q1", "deepseek_attempt": "1. a\n2. b \\boxed{3}"},
            {"question": "q2", "deepseek_attempt": "x"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "s.parquet")
    assert read_records(tmp_path / "s.parquet") == rows


def s1k_11_row(question, deepseek_attempt, deepseek_grade, gemini_attempt, gemini_grade, solution="See source."):
    """One record with every column of s1K-1.1 (the names of its dataset card), in the card's order."""
    return {"solution": solution, "question": question, "cot_type": "math", "source_type": "test/source",
            "metadata": "{}", "gemini_thinking_trajectory": "Gemini thinks.", "gemini_attempt": gemini_attempt,
            "deepseek_thinking_trajectory": f"R1 thinks about {question}", "deepseek_attempt": deepseek_attempt,
            "gemini_grade": gemini_grade, "gemini_grade_reason": "reason", "deepseek_grade": deepseek_grade,
            "deepseek_grade_reason": "reason"}


def steps_with_answer(answer):
    return f"1. **Set up.** Write it down.\n2. **Compute.** It gives {answer}.\n3. **Answer.** \\boxed{{{answer}}}"


S1K_11_ROWS = [
    # both attempts right: R1's boxed answer is the gold answer
    s1k_11_row("Q0?", steps_with_answer(5), "Yes", "So \\boxed{5}.", "Yes", solution="The answer is 5."),
    # R1 wrong, Gemini right: Gemini's answer, never R1's
    s1k_11_row("Q1?", steps_with_answer(7), "No", "So \\boxed{6}.", "Yes", solution="Hence \\boxed{6}."),
    # both wrong: no RLVR record, even though the reference solution holds a boxed answer
    s1k_11_row("Q2?", steps_with_answer(9), "No", "So \\boxed{10}.", "No", solution="Hence \\boxed{8}."),
    # R1 graded right but boxes nothing (a proof): the next attempt graded right gives the answer
    s1k_11_row("Q3?", "1. **Idea.** A.\n2. **Proof.** B. QED", "Yes", "Thus \\boxed{n^2}.", "Yes"),
]


def test_s1k_11_parquet_gold_answers_from_graded_attempts(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is needed to write and read parquet files")
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(S1K_11_ROWS), tmp_path / "s1K-1.1.parquet")
    result = run_cli("--input", tmp_path / "s1K-1.1.parquet", "--out-dir", tmp_path / "all", "--val-problems", 0)
    assert result.returncode == 0, result.stderr
    assert read_jsonl(tmp_path / "all" / "rlvr_train.jsonl") == [
        {"id": "0", "problem": "Q0?", "answer": "5"}, {"id": "1", "problem": "Q1?", "answer": "6"},
        {"id": "3", "problem": "Q3?", "answer": "n^2"}]
    assert "dropped from RLVR: 1 without an answer" in result.stdout
    assert "expert attempt graded wrong: 2 of 4 graded problems; kept as experts" in result.stdout
    # by default (as the paper) every R1 attempt is an expert, right or wrong
    srl = read_jsonl(tmp_path / "all" / "srl_train.jsonl")
    assert [(e["id"], e["step_index"]) for e in srl] == [("0", 2), ("0", 3), ("1", 2), ("1", 3), ("2", 2),
                                                         ("2", 3), ("3", 2)]
    assert srl[2]["target_step"] == "2. **Compute.** It gives 7."  # the wrong attempt's own step
    sft = read_jsonl(tmp_path / "all" / "sft_train.jsonl")
    assert [r["id"] for r in sft] == ["0", "1", "2", "3"]
    assert sft[1]["solution"] == S1K_11_ROWS[1]["deepseek_attempt"] and sft[1]["reasoning"] == "R1 thinks about Q1?"
    assert sft[2]["answer"] is None

    result = run_cli("--input", tmp_path / "s1K-1.1.parquet", "--out-dir", tmp_path / "ok", "--val-problems", 0,
                     "--correct-only")
    assert result.returncode == 0, result.stderr
    assert "2 left out of SRL and SFT (--correct-only)" in result.stdout
    assert {e["id"] for e in read_jsonl(tmp_path / "ok" / "srl_train.jsonl")} == {"0", "3"}
    assert {e["id"] for e in read_jsonl(tmp_path / "ok" / "sft_srl_train.jsonl")} == {"0", "3"}
    assert [r["id"] for r in read_jsonl(tmp_path / "ok" / "sft_train.jsonl")] == ["0", "3"]
    assert read_jsonl(tmp_path / "ok" / "rlvr_train.jsonl") == read_jsonl(tmp_path / "all" / "rlvr_train.jsonl")


def test_s1k_11_validation_problems_and_grade_spellings(tmp_path):
    rows = [s1k_11_row(f"Q{i}?", steps_with_answer(i), grade, "", None) for i, grade in
            enumerate(["Yes", "yes ", "No", "", None, "Yes"] * 3)]
    path = tmp_path / "s.json"
    path.write_text(json.dumps(rows))
    assert run_cli("--input", path, "--out-dir", tmp_path, "--val-problems", 3).returncode == 0
    rlvr = read_jsonl(tmp_path / "rlvr_train.jsonl") + read_jsonl(tmp_path / "rlvr_val.jsonl")
    assert sorted(int(r["id"]) for r in rlvr) == [i for i in range(18) if i % 6 in (0, 1, 5)]
    assert all(r["answer"] == r["id"] for r in rlvr)
    assert len({e["id"] for e in read_jsonl(tmp_path / "srl_val.jsonl")}) == 3


def test_correct_only_on_ungraded_data_names_the_record_and_column(tmp_path):
    result = write_then_fail(tmp_path, json.dumps(make_problem("a", 3)) + "\n", *S1K_FLAGS, "--correct-only")
    assert "in.jsonl:1: --correct-only needs graded attempts" in result.stderr
    assert "'deepseek_grade'" in result.stderr and "--grade-field" in result.stderr


def test_hf_dataset_download_uses_huggingface_hub(tmp_path, monkeypatch):
    local = tmp_path / "train.jsonl"
    local.write_text(json.dumps({"question": "Q?", "deepseek_attempt": "1. a\n2. b"}) + "\n")
    calls = []
    fake = types.ModuleType("huggingface_hub")
    fake.HfApi = lambda: types.SimpleNamespace(list_repo_files=lambda name, repo_type: [
        "README.md", "data/test-0.parquet", "data/train-0.parquet", "data/train-0.json"])
    fake.hf_hub_download = lambda repo_id, filename, repo_type: (
        calls.append((repo_id, filename, repo_type)) or str(local))
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    data_prep.main(["--hf-dataset", "someone/set", "--out-dir", str(tmp_path / "out"), "--val-problems", "0"])
    assert calls == [("someone/set", "data/train-0.parquet", "dataset")]
    assert read_jsonl(tmp_path / "out" / "srl_train.jsonl")[0]["target_step"] == "2. b"


def write_then_fail(tmp_path, content, *flags, name="in.jsonl"):
    """Run the CLI on bad input over an output folder that already holds files; return the result."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "srl_train.jsonl").write_text('{"old": true}\n')
    before = snapshot(out)
    (tmp_path / name).write_text(content)
    result = run_cli("--input", tmp_path / name, "--out-dir", out, *flags)
    assert result.returncode != 0
    assert snapshot(out) == before  # nothing created or changed
    fresh = run_cli("--input", tmp_path / name, "--out-dir", tmp_path / "fresh", *flags)
    assert fresh.returncode != 0 and not (tmp_path / "fresh").exists()
    return result


def test_malformed_json_line_names_file_and_line(tmp_path):
    good = json.dumps(make_problem("a", 3))
    result = write_then_fail(tmp_path, f"{good}\n\n{{\"id\": \"b\", oops}}\n{good}\n", *S1K_FLAGS)
    assert "in.jsonl:3: not valid JSON" in result.stderr
    result = write_then_fail(tmp_path, '[\n{"id": 1},\n{"id": 2,,}\n]', *S1K_FLAGS, name="in.json")
    assert "in.json:3: not valid JSON" in result.stderr


def test_missing_field_lists_the_fields_the_record_has(tmp_path):
    content = json.dumps(make_problem("a", 3)) + "\n" + json.dumps({"id": "b", "question": "q", "text": "t"}) + "\n"
    result = write_then_fail(tmp_path, content, *S1K_FLAGS)
    assert ":2: no field 'problem', 'solution'; the record has: id, question, text" in result.stderr
    result = write_then_fail(tmp_path, json.dumps(make_problem("a", 3)) + "\n")  # s1K-1.1 defaults
    assert "no field 'question', 'deepseek_attempt'" in result.stderr and "--question-field" in result.stderr


def test_other_bad_inputs(tmp_path):
    assert "empty input" in write_then_fail(tmp_path, "\n  \n", *S1K_FLAGS).stderr
    assert "empty input" in write_then_fail(tmp_path, "[]", *S1K_FLAGS, name="e.json").stderr
    assert "expected a JSON object" in write_then_fail(tmp_path, "[1, 2]", *S1K_FLAGS, name="n.json").stderr
    dup = json.dumps(make_problem("a", 3)) + "\n"
    assert ":2: duplicate id 'a'" in write_then_fail(tmp_path, dup * 2, *S1K_FLAGS).stderr
    missing = run_cli("--input", tmp_path / "nope.jsonl", "--out-dir", tmp_path / "o")
    assert missing.returncode != 0 and "no such file" in missing.stderr and not (tmp_path / "o").exists()


def test_write_outputs_is_all_or_nothing(tmp_path):
    data_prep.write_outputs(tmp_path, {"a.jsonl": [{"x": 1}], "b.jsonl": [{"y": 2}]})
    before = snapshot(tmp_path)
    with pytest.raises(TypeError):  # the second file cannot be serialised
        data_prep.write_outputs(tmp_path, {"a.jsonl": [{"x": 3}], "b.jsonl": [{"y": object()}]})
    assert snapshot(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["a.jsonl", "b.jsonl"]
    write_jsonl(tmp_path / "c.jsonl", [{"z": "é"}])
    assert read_records(tmp_path / "c.jsonl") == [{"z": "é"}]


def test_paragraph_fallback_cli(tmp_path):
    records = [{"id": "free", "problem": "P?", "solution": "First idea.\n\nSecond idea.\n\nSo \\boxed{2}."},
               make_problem("numbered", 2)]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    plain = run_cli("--input", path, "--out-dir", tmp_path / "a", *S1K_FLAGS, "--val-problems", 0)
    assert "1 without numbered steps" in plain.stdout
    assert run_cli("--input", path, "--out-dir", tmp_path / "b", *S1K_FLAGS, "--val-problems", 0,
                   "--fallback", "paragraphs").returncode == 0
    free = [e for e in read_jsonl(tmp_path / "b" / "srl_train.jsonl") if e["id"] == "free"]
    assert [(e["previous_steps"], e["target_step"]) for e in free] == [
        (["First idea."], "Second idea."), (["First idea.", "Second idea."], "So \\boxed{2}.")]


# GSM8K's own format: {"question", "answer": "worked solution, a line a step\n#### N"}

GSM8K = [
    {"question": "Ann has 3 boxes of 1,200 pins. She uses 400. How many are left?", "idx": 7,
     "answer": "She has 3 * 1,200 = <<3*1200=3600>>3,600 pins.\n\nShe has 3,600 - 400 = <<3600-400=3200>>3200 left.\n"
               "#### 3,200"},
    {"question": "What is 2 + 2?", "idx": 8, "answer": "2 + 2 = <<2+2=4>>4\n#### 4"},
    {"question": "Bo buys 2 pens at $3 each and 1 book at $5. What does he pay?", "idx": 9,
     "answer": "The pens cost 2 * 3 = $<<2*3=6>>6.\nIn all 6 + 5 = $<<6+5=11>>11.\n#### 11"},
]


def test_gsm8k_records_become_numbered_steps_with_a_boxed_last_line(tmp_path):
    """Each line of the worked solution is a step, the calculator annotations go, blank lines are no steps, the gold
    answer is the #### value (its thousands comma dropped, as GSM8K's evaluation does), and the last step ends with
    the boxed answer the grader reads."""
    from tasks.grader import extract_answer, is_equiv
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GSM8K))
    result = run_cli("--input", path, "--out-dir", tmp_path / "data", "--val-problems", 0)
    assert result.returncode == 0, result.stderr
    srl = [json.loads(line) for line in (tmp_path / "data" / "srl_train.jsonl").read_text().splitlines()]
    first = [e for e in srl if e["id"] == "7"]
    assert first[0]["previous_steps"] == ["1. She has 3 * 1,200 = 3,600 pins."]
    assert first[0]["target_step"] == "2. She has 3,600 - 400 = 3200 left.\nThe answer is \\boxed{3200}."
    assert not any("<<" in e["target_step"] or any("<<" in s for s in e["previous_steps"]) for e in srl)
    rlvr = {r["id"]: r["answer"] for r in map(json.loads, (tmp_path / "data" / "rlvr_train.jsonl").open())}
    assert rlvr == {"7": "3200", "8": "4", "9": "11"}
    assert is_equiv(extract_answer(first[-1]["target_step"]), GSM8K[0]["answer"].split("####")[1])
    # "2 + 2 = 4" is one step: no SRL example without --include-first-step, but a whole solution for SFT
    sft = {r["id"]: r["solution"] for r in map(json.loads, (tmp_path / "data" / "sft_train.jsonl").open())}
    assert sft["8"] == "1. 2 + 2 = 4\nThe answer is \\boxed{4}." and "8" not in {e["id"] for e in srl}
    assert data_prep.split_steps(sft["9"]) == ["1. The pens cost 2 * 3 = $6.",
                                               "2. In all 6 + 5 = $11.\nThe answer is \\boxed{11}."]


def test_a_gsm8k_record_without_its_answer_line_is_refused(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text(json.dumps(GSM8K[0]) + "\n" + json.dumps({"question": "1 + 1?", "answer": "It is 2."}) + "\n")
    result = run_cli("--input", path, "--out-dir", tmp_path / "data", "--format", "gsm8k")
    assert result.returncode == 2 and not (tmp_path / "data").exists()
    [line] = result.stderr.strip().splitlines()
    assert f"{path}:2: no '####' line" in line
