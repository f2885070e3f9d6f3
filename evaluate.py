"""
Evaluation on math benchmarks: the paper's prompt, answer extraction, an equivalence grader, greedy accuracy,
avg@k and pass@k, per-problem result files and a summary table shaped like the paper's Table 1.

    python evaluate.py                                    # the tiny model on a few built-in problems (~1 min CPU)
    python evaluate.py --model qwen-1.5b --benchmarks amc23,aime24,aime25 --samples 32 --max-new-tokens 4096
    python evaluate.py --model runs/srl --benchmarks minerva,math500 --out runs/eval_srl
    python evaluate.py --benchmarks my_problems.jsonl     # any JSONL with problem/question and answer fields
    torchrun --nproc_per_node 8 evaluate.py --model runs/srl --benchmarks amc23 --samples 32   # problems shared out

Benchmarks are JSONL files in --data-dir (default ../shared/data/benchmarks beside the checkout if present, else
data/benchmarks). Nothing is downloaded: get each file from its public repository and save it as NAME.jsonl
  amc23, aime24, gsm8k  github.com/QwenLM/Qwen2.5-Math        evaluation/data/{amc23,aime24,gsm8k}/test.jsonl
  aime25                github.com/Gen-Verse/ReasonFlux       ReasonFlux_v2/eval/dataset/AIME25/aime25_nofigures.jsonl
  minerva               github.com/GAIR-NLP/LIMO              eval/data/minerva/test.jsonl
  math500               github.com/hkust-nlp/simpleRL-reason  examples/simplelr_math_eval/data/math500/test.jsonl
A record needs `problem` or `question`, and `answer` (string, integer or float; 27.0 reads as "27"; GSM8K's
full solution is cut at "#### N") or else a `solution` holding a \\boxed{} answer.

Prompt: the chain-of-thought system message (MATH_INSTRUCTION) of Qwen2.5-Math's evaluation package, which the
paper grades with, then the problem as the user message, through the model's chat template. Metrics, as in the
paper: greedy accuracy; with --samples k also avg@k (mean accuracy of k samples at temperature 1.0; the paper uses
k = 32 on AMC23/AIME) and pass@k. The table's mean column averages every number in the row, as Table 1 does.

The grader (extract_answer, is_equiv) is also the RLVR reward, so it is built never to call two different
answers equal; where it must choose, it chooses a false "wrong" over a false "right". Departures from the
Qwen2.5-Math grader the paper used, all on the strict side:
  - Only a \\boxed{...} / \\boxed N / \\fbox{...} answer counts; no "the answer is" or last-number fallback.
  - Numbers must be equal exactly (decimals read as exact fractions: 0.5 == 1/2); a decimal against an
    irrational (3.14159265359 vs \\pi) is accepted within a relative 1e-9, never a looser "close enough". So
    Minerva answers rounded differently from the reference count as wrong (Qwen's grader allows 1e-4).
  - A percent sign is dropped, not rescaled: 10% == 10, but 10% != 0.1.
  - Units, degrees, dollar signs, \\text{ unit} and "x =" (when the right side holds no variable) are dropped.
  - (1,2) and [1,2] differ (open vs closed); {1,2} == {2,1}; a bare list "1, 2" is read as unordered.
  - LaTeX is turned into sympy by a small converter (no antlr); what it cannot read is compared as text.
  - Each comparison is bounded in size (exponents up to 1000, 100-digit numbers) and, in the main thread on
    Unix, in time (signal.alarm); a comparison that runs out of time counts as not equal.
"""
import argparse
import json
import math
import re
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import sympy
from sympy.parsing.sympy_parser import parse_expr, standard_transformations
from tqdm import tqdm

from data_prep import last_boxed, write_jsonl

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


def answer_to_str(answer):
    """Gold answers come as strings, integers or floats; 27.0 becomes "27"."""
    return str(int(answer)) if isinstance(answer, float) and answer.is_integer() else str(answer).strip()


def load_benchmark(name_or_path, data_dir=DEFAULT_DATA_DIR, limit=None):
    """[{"id", "problem", "answer"}] from a benchmark name (a file NAME.jsonl in data_dir) or a JSONL path."""
    if name_or_path == "builtin":
        return [dict(p) for p in BUILTIN_PROBLEMS[:limit]]
    path = Path(data_dir) / f"{name_or_path}.jsonl" if name_or_path in BENCHMARKS else Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file {path} not found; names: builtin, {', '.join(BENCHMARKS)} "
                                f"(download sources are listed at the top of evaluate.py) or a JSONL path")
    problems = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from None
            problem = record.get("problem") or record.get("question")
            if not problem:
                raise ValueError(f"{path}:{line_no}: no 'problem' or 'question' field")
            answer = record.get("answer")
            if isinstance(answer, str) and "####" in answer:  # GSM8K: a worked solution ending in "#### N"
                answer = answer.rsplit("####", 1)[1]
            if answer is None and record.get("solution"):
                answer = extract_answer(record["solution"])
            answer = "" if answer is None else answer_to_str(answer)
            if not answer:
                raise ValueError(f"{path}:{line_no}: no 'answer' field (nor a \\boxed{{}} answer in 'solution')")
            problem_id = next((record[k] for k in ("id", "idx", "unique_id") if k in record), line_no - 1)
            problems.append({"id": problem_id, "problem": problem, "answer": answer})
            if limit is not None and len(problems) >= limit:
                break
    return problems


MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def math_messages(problem):
    """The evaluation prompt as chat messages (also the RLVR and SFT prompt)."""
    return [{"role": "system", "content": MATH_INSTRUCTION}, {"role": "user", "content": problem}]


def extract_answer(text):
    """The final answer of a completion: the content of its last \\boxed{...} (nested braces), \\boxed N or
    \\fbox{...} (data_prep.last_boxed), else None.
    Deliberately no fallback ("the answer is ...", last number): a fallback that guesses turns format failures
    into lucky rewards during RL."""
    return last_boxed(text)


# -----------------------------------------------------------------------------------------------------------------
# Normalisation: strip what never changes the value (spacing, units, $, %, degrees, thousands separators)

UNIT_WORDS = ("cm|mm|km|meters?|metres?|inch(?:es)?|feet|foot|ft|miles?|yards?|(?:square |sq )?units?|degrees?|"
              "cents?|dollars?|seconds?|minutes?|hours?|days?|weeks?|months?|years?|grams?|kg|pounds?|lbs?|mph")


def normalize_answer(answer):
    """A canonical string for an answer; equal strings mean equal answers (see the module docstring)."""
    s = answer_to_str(answer).replace("\n", " ").replace("\\!", "").replace("\\displaystyle", "")
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])|(?<!\\)\\[,;: ]|\\q?quad(?![a-zA-Z])", " ", s)
    s = re.sub(r"\\[dtc]frac", r"\\frac", s)
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°", "", s)  # degrees
    s = re.sub(r"\\?[$%]", "", s)  # dollars and percent signs (10% == 10; see the docstring)
    # "\text{ cm}^2", "\mbox{ square units}" at the end: a unit (one word, so "\text{ or six}" is kept)
    s = re.sub(r"\\(?:text|mbox)\{\s+(?:square |sq |cubic )?[A-Za-z/]+\s*\}(?:\^\{?\d\}?)?\s*$", "", s)
    unwrapped = 1
    while unwrapped:  # \text{...}, \mathbf{...}: keep the content, innermost first
        s, unwrapped = re.subn(r"\\(?:text|textbf|textit|mbox|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(rf"(?<=[\d}}\s])\s*(?:{UNIT_WORDS})(?:\^\{{?[23]\}}?)?\s*$", "", s)  # "5 cm", "864 inches^2"
    s = re.sub(r"^[a-zA-Z]\s*\\in(?![a-zA-Z])", "", s.strip().rstrip(".").strip()).strip()  # "x \in [-2, 7]"
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s.replace(" ", "")):  # 1,000 (not the list 1,2)
        s = s.replace(" ", "").replace(",", "")
    mixed = re.fullmatch(r"(-?)(\d+)\s*\\frac\{(\d+)\}\{(\d+)\}", s)  # 1\frac{4}{5} is one and four fifths
    if mixed:
        s = "%s(%s+\\frac{%s}{%s})" % mixed.groups()
    return s


# -----------------------------------------------------------------------------------------------------------------
# Structure: tuples and intervals (ordered, brackets matter), sets and unions (order-free), matrices, scalars


def split_top_level(s, sep):
    """Split s on sep where it is outside every bracket ( [ {."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        if s[i] in "([{":
            depth += 1
        elif s[i] in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i].strip())
            start = i = i + len(sep)
            continue
        i += 1
    return parts + [s[start:].strip()]


def matching_bracket(s, i):
    """Index of the bracket that closes the one at s[i] (any kind, so that intervals like (3,4] close)."""
    depth = 0
    for j in range(i, len(s)):
        depth += (s[j] in "([{") - (s[j] in ")]}")
        if depth == 0:
            return j
    raise ValueError(f"unbalanced brackets in {s!r}")


def answer_structure(s):
    """(kind, content): ("scalar", str), ("ordered()" / "ordered[]" / "ordered(]" / ..., [items]),
    ("unordered", [items]) for sets, unions and bare lists, ("matrix", [("row", [items])])."""
    s = s.strip()
    matrix = re.fullmatch(r"\\begin\{[pbv]?matrix\}(.*)\\end\{[pbv]?matrix\}", s, re.S)
    if matrix:
        rows = [row for row in matrix.group(1).split("\\\\") if row.strip()]
        return "matrix", [("row", [answer_structure(x) for x in split_top_level(row, "&")]) for row in rows]
    union = split_top_level(s, "\\cup")
    if len(union) > 1:
        return "unordered", [answer_structure(part) for part in union]
    if s.startswith("\\{") and s.endswith("\\}") and matching_bracket(s, 1) == len(s) - 1:
        return "unordered", expand_plus_minus(split_top_level(s[2:-2], ","))
    if len(s) > 1 and s[0] in "([" and s[-1] in ")]" and matching_bracket(s, 0) == len(s) - 1:
        items = split_top_level(s[1:-1], ",")
        if len(items) > 1:
            return "ordered" + s[0] + s[-1], [answer_structure(x) for x in items]
        if s[0] + s[-1] == "()":
            return answer_structure(s[1:-1])  # (B) or (x+1): plain grouping
    items = split_top_level(s, ",")
    if len(items) > 1 or re.search(r"\\(pm|mp)(?![a-zA-Z])", s):
        return "unordered", expand_plus_minus(items)
    return "scalar", s


def expand_plus_minus(items):
    """'1 \\pm \\sqrt{5}' stands for two answers: 1 + \\sqrt{5} and 1 - \\sqrt{5}."""
    out = []
    for item in items:
        pieces = re.split(r"\\(?:pm|mp)(?![a-zA-Z])", item)
        out += [item] if len(pieces) != 2 else [pieces[0] + "+" + pieces[1], pieces[0] + "-" + pieces[1]]
    return [answer_structure(x) for x in out]


def structures_equal(a, b):
    (kind, items_a), (kind_b, items_b) = a, b
    if kind != kind_b:
        return False
    if kind == "scalar":
        return scalars_equal(items_a, items_b)
    if len(items_a) != len(items_b):
        return False
    if kind == "unordered":  # multiset match: each item of a pairs with a different item of b
        unused = list(items_b)
        for x in items_a:
            j = next((j for j, y in enumerate(unused) if structures_equal(x, y)), None)
            if j is None:
                return False
            unused.pop(j)
        return True
    return all(map(structures_equal, items_a, items_b))  # tuples, intervals, a matrix's rows, a row's entries


# -----------------------------------------------------------------------------------------------------------------
# Scalars: a small LaTeX -> sympy converter, then exact / symbolic comparison under size and time limits

FUNCTIONS = {**{name: name for name in "sin cos tan cot sec csc sinh cosh tanh log exp".split()},
             "arcsin": "asin", "arccos": "acos", "arctan": "atan", "ln": "log"}  # LaTeX name: sympy name
GREEK = set("alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi rho sigma "
            "tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Pi Sigma Upsilon Phi Psi Omega hbar "
            "ell".split())
WRAPPERS = {"text", "textbf", "textit", "mathrm", "mathbf", "mathit", "mbox", "operatorname"}
SYMPY_NAMES = {"__builtins__": {}, **{name: getattr(sympy, name) for name in  # all that the generated code may use
               ["Rational", "Symbol", "Function", "Integer", "Add", "Mul", "Pow", "sqrt", "root", "pi", "E", "I", "oo",
                *FUNCTIONS.values()]}}
NUMBER = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
MAX_EXPONENT, MAX_DIGITS, MAX_LENGTH = 1000, 100, 300


def latex_to_sympy_code(s):
    """Python code that builds s with sympy: numbers as exact Rational('...'), letters as Symbol('...'), e and i
    as the constants, \\frac, \\sqrt, ^, \\cdot, \\times, functions, implicit multiplication (2\\sqrt{3}, 3x).
    Every multi-letter word is one symbol (never split into a product); a name directly followed by "(" is a
    function applied to its arguments (x(x+1) is not read as a product). Raises ValueError on what it cannot
    read, and on what reads two ways (2^10, \\sqrt25)."""
    out, i, operand_before = [], 0, False

    def operand(code):  # an operand right after another one multiplies it
        nonlocal operand_before
        out.append(("*" if operand_before else "") + code)
        operand_before = True

    while i < len(s):
        c = s[i]
        if c.isspace():
            i += 1
        elif c.isdigit() or (c == "." and s[i + 1:i + 2].isdigit()):
            m = NUMBER.match(s, i)
            mantissa, _, exponent = m.group().lower().partition("e")
            if len(re.sub(r"\D", "", mantissa)) > MAX_DIGITS or abs(int(exponent or 0)) > MAX_EXPONENT:
                raise ValueError("number too large")
            operand(f"Rational('{m.group()}')")
            i = m.end()
            if s[i:i + 1] == "_":
                raise ValueError("base-n numeral")
        elif c.isalpha() or c == "\\":
            m = re.compile(r"[a-zA-Z]+|\\([a-zA-Z]+|.)").match(s, i)
            word, i = (m.group(1) or m.group()), m.end()
            if word in FUNCTIONS:  # \sin x, and sin x too
                code, i = function_code(s, i, word)
                operand(code)
            elif c != "\\" or word in GREEK:  # a name
                if s[i:i + 1] == "_":  # subscripted name: x_1, C_{2}, \theta_w
                    sub, i = argument_text(s, i + 1)
                    word += "_" + re.sub(r"[^A-Za-z0-9]", "", sub)
                if word in ("e", "i"):
                    operand({"e": "E", "i": "I"}[word])
                elif s[i:i + 1] == "(":  # f(x), I(0), u(t): a function applied, never a product with 0
                    end = matching_bracket(s, i)
                    arguments = ",".join(map(latex_to_sympy_code, split_top_level(s[i + 1:end], ",")))
                    operand(f"Function('{word}')({arguments})")
                    i = end + 1
                else:
                    operand(f"Symbol('{word}')")
            elif word in ("cdot", "times", "div"):  # from here on, a LaTeX command
                out.append("/" if word == "div" else "*")
                operand_before = False
            elif word == "frac":
                numerator, i = argument_code(s, i, last=False)
                denominator, i = argument_code(s, i)
                operand(f"(({numerator})/({denominator}))")
            elif word == "sqrt":
                index = None
                if s[i:].lstrip().startswith("["):
                    start = s.index("[", i)
                    end = matching_bracket(s, start)
                    index, i = latex_to_sympy_code(s[start + 1:end]), end + 1
                radicand, i = argument_code(s, i)
                operand(f"sqrt({radicand})" if index is None else f"root({radicand},{index})")
            elif word in ("pi", "infty"):
                operand("pi" if word == "pi" else "oo")
            elif word in WRAPPERS:
                inner, i = argument_code(s, i)
                operand(f"({inner})")
            else:
                raise ValueError(f"unsupported command \\{word}")
        elif c in "([{":
            end = matching_bracket(s, i)
            operand(f"({latex_to_sympy_code(s[i + 1:end])})")
            i = end + 1
        elif c == "^" and operand_before:
            sign = "-" if s[i + 1:].lstrip().startswith("-") else ""
            exponent, i = argument_code(s, s.index("-", i) + 1 if sign else i + 1)
            out.append(f"**({sign}{exponent})")
        elif c in "+-*/":
            out.append(c)
            operand_before = False
            i += 1
        else:
            raise ValueError(f"unsupported character {c!r}")
    if not out:
        raise ValueError("empty expression")
    return "".join(out)


def argument_text(s, i, last=True):
    """The raw text of a macro argument at s[i]: a braced group or a single character / command."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        raise ValueError("missing argument")
    if s[i] == "{":
        end = matching_bracket(s, i)
        return s[i + 1:end], end + 1
    if s[i] == "\\":
        m = re.compile(r"\\([a-zA-Z]+|.)").match(s, i)
        return m.group(), m.end()
    if last and s[i].isdigit() and s[i + 1:i + 2].isdigit():
        raise ValueError("ambiguous unbraced argument")  # x^10 is x^1 0 in LaTeX, 1024 in intent
    return s[i], i + 1


def argument_code(s, i, last=True):
    text, i = argument_text(s, i, last)
    return latex_to_sympy_code(text), i


def function_code(s, i, name):
    """\\sin x, \\sin(2t), \\sin^2 \\theta, \\log_2 8: an unbracketed argument runs to the next operator or
    function."""
    power = base = None
    while s[i:i + 1] in ("^", "_", " "):
        if s[i] == " ":
            i += 1
        elif s[i] == "^":
            power, i = argument_code(s, i + 1)
            if power.startswith("-"):
                raise ValueError("ambiguous power")  # \sin^{-1} x: arcsin or 1/sin?
        else:
            base, i = argument_code(s, i + 1)
    if s[i:i + 1] in ("(", "{"):
        end = matching_bracket(s, i)
        argument, i = latex_to_sympy_code(s[i + 1:end]), end + 1
    else:
        j, depth = i, 0
        while j < len(s):
            depth += (s[j] in "([{") - (s[j] in ")]}")
            command = re.compile(r"\\([a-zA-Z]+)").match(s, j)
            if depth < 0 or depth == 0 and (s[j] in "+-*/=," or command and (
                    command.group(1) in FUNCTIONS or command.group(1) in ("cdot", "times", "div"))):
                break
            j += 1
        argument, i = latex_to_sympy_code(s[i:j]), j
    code = f"{FUNCTIONS[name]}({argument}" + (f",{base})" if base else ")")
    return (f"{code}**({power})" if power else code), i


class GraderTimeout(BaseException):
    """A comparison ran past its time limit (a BaseException, so that sympy's own `except Exception` blocks
    cannot swallow it)."""


@contextmanager
def time_limit(seconds):
    """Raise GraderTimeout after `seconds`, via SIGALRM: only possible in the main thread on Unix; elsewhere the
    size limits (MAX_EXPONENT, MAX_DIGITS, MAX_LENGTH) are the only guard."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise GraderTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def to_sympy(latex):
    """A sympy expression for a LaTeX scalar, or None when it cannot be read or is too large to compare."""
    if len(latex) > MAX_LENGTH:
        return None
    try:
        code = latex_to_sympy_code(latex)
        kwargs = dict(local_dict={}, global_dict=SYMPY_NAMES, transformations=standard_transformations)
        for node in sympy.postorder_traversal(parse_expr(code, evaluate=False, **kwargs)):
            if isinstance(node, sympy.Pow) and not node.exp.free_symbols:  # bound powers before evaluating
                limit = MAX_EXPONENT if not node.base.free_symbols else MAX_EXPONENT // 10
                if not abs(complex(node.exp.evalf(15))) <= limit:
                    return None
        return parse_expr(code, **kwargs)
    except Exception:  # SyntaxError, ValueError, TypeError, ZeroDivisionError, RecursionError, ...
        return None


def sympy_equal(x, y, approximate):
    """Exact equality; a number with a decimal point against an irrational may differ by a relative 1e-9."""
    if x == y:
        return True
    if any(e.has(sympy.oo, -sympy.oo, sympy.zoo, sympy.nan) for e in (x, y)):
        return False
    if not x.free_symbols and not y.free_symbols:
        if x.is_Rational and y.is_Rational:
            return False  # exact, and x != y
        vx, vy = sympy.N(x, 50), sympy.N(y, 50)
        tolerance = 1e-9 if approximate else 1e-30
        return bool(abs(vx - vy) <= tolerance * max(abs(vx), abs(vy)))
    # Expressions: a quick numeric refutation at a few points, then a symbolic proof that x - y is 0
    difference = x - y
    for k in range(3):
        variables = sorted(difference.free_symbols, key=str)
        point = {v: sympy.Rational(3 + 2 * k + n, 7 + k) for n, v in enumerate(variables)}
        value = sympy.N(difference.subs(point), 30)
        if value.is_finite and abs(value) > 1e-12 * (1 + abs(sympy.N(x.subs(point), 30))):
            return False
    return sympy.expand(difference) == 0 or sympy.simplify(difference) == 0


def strip_assignment(s):
    """"x = 5" -> "5" when the left side is a single name and the right side holds no variable."""
    sides = split_top_level(s, "=")
    if len(sides) == 2 and re.fullmatch(r"[a-zA-Z](_\{?\w+\}?)?|\\[a-zA-Z]+", sides[0]):
        value = to_sympy(sides[1])
        if value is not None and not value.free_symbols:
            return sides[1]
    return s


def scalars_equal(a, b):
    a, b = strip_assignment(a), strip_assignment(b)
    if a.replace(" ", "") == b.replace(" ", ""):
        return True
    words = r"(?=.*[a-z])[A-Za-z ]{3,}"  # "Evelyn", "east" (not "ABC" against "abc")
    if re.fullmatch(words, a) and re.fullmatch(words, b):
        return a.lower().split() == b.lower().split()
    sides_a, sides_b = split_top_level(a, "="), split_top_level(b, "=")
    if len(sides_a) != len(sides_b) or len(sides_a) > 2:
        return False
    exprs = [to_sympy(x) for x in sides_a + sides_b]
    if any(e is None for e in exprs):
        return False
    approximate = bool(re.search(r"\.\d|\d[eE][-+]?\d", a + " " + b))
    try:
        if len(sides_a) == 1:
            return sympy_equal(exprs[0], exprs[1], approximate)
        lhs_minus_rhs_a, lhs_minus_rhs_b = exprs[0] - exprs[1], exprs[2] - exprs[3]  # an equation, either way round
        return sympy_equal(lhs_minus_rhs_a, lhs_minus_rhs_b, approximate) or \
            sympy_equal(lhs_minus_rhs_a, -lhs_minus_rhs_b, approximate)
    except (TypeError, ValueError, ArithmeticError, AttributeError):
        return False


def is_equiv(pred, gold, timeout_s=5.0):
    """Whether two answers (strings, or numbers for gold) are mathematically equal. None or empty is never
    equal to anything. Built to return False whenever it cannot be sure (see the module docstring)."""
    if pred is None or gold is None:
        return False
    a, b = normalize_answer(pred), normalize_answer(gold)
    if not a or not b:
        return False
    if a == b:
        return True
    try:
        with time_limit(timeout_s):
            return structures_equal(answer_structure(a), answer_structure(b))
    except (GraderTimeout, RecursionError, ValueError):
        return False


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
                       seed=0, desc="evaluate", progress=True):
    """Generate for every problem (one greedy completion, then `samples` at temperature 1.0) and grade them.
    Returns (records, metrics): one record per problem, in the order given; metrics as fractions in [0, 1]."""
    from model import encode_chat, gather, generate, get_rank, get_world_size  # here: the grader needs no torch

    runs = ([(0.0, 1)] if greedy else []) + ([(1.0, samples)] if samples > 0 else [])  # (temperature, count)
    if not problems or not runs:
        raise ValueError("nothing to evaluate: no problems, or neither greedy nor samples")
    prompts = [encode_chat(tokenizer, math_messages(p["problem"])) for p in problems]
    outputs = [[] for _ in problems]
    # Longest prompts first, in batches of similar length: little padding, and an out-of-memory shows at once.
    # Under torchrun each process takes every world-th problem of that order; the records are gathered at the end.
    order = sorted(range(len(prompts)), key=lambda j: -len(prompts[j]))[get_rank()::get_world_size()]
    bar = tqdm(total=len(order) * sum(n for _, n in runs), desc=desc, unit="completion",
               disable=not progress or get_rank() != 0)
    for temperature, n in runs:
        per_batch = max(1, batch_size // n)
        for start in range(0, len(order), per_batch):
            batch = order[start:start + per_batch]
            # a seed per problem: its samples do not depend on the batch it is in, or on the process
            completions = generate(model, [prompts[j] for j in batch], max_new_tokens, temperature=temperature,
                                   num_samples=n, seed=None if seed is None else [seed * 1_000_003 + j for j in batch])
            for m, j in enumerate(batch):  # back to the problem's own place (completions are prompt-major)
                outputs[j] += completions[m * n:(m + 1) * n]
            bar.update(len(completions))
    bar.close()

    stop_ids = set(model.stop_token_ids)
    temperatures = [t for t, n in runs for _ in range(n)]
    graded = {}  # this process's problems, graded here
    for j in order:
        problem, outs = problems[j], outputs[j]
        texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
        extracted = [extract_answer(t) for t in texts]
        graded[j] = {
            "id": problem["id"], "problem": problem["problem"], "answer": problem["answer"],
            "prompt": tokenizer.decode(prompts[j]), "temperatures": temperatures, "completions": texts,
            "extracted": extracted, "correct": [is_equiv(e, problem["answer"]) for e in extracted],
            "num_tokens": [len(o) for o in outs], "truncated": [not (o and o[-1] in stop_ids) for o in outs]}
    graded = {j: record for share in gather(graded) for j, record in share.items()}  # every process's
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


def main():
    import torch
    from model import end_distributed, init_distributed, load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="alias (tiny, qwen-1.5b, ...), hub id or checkpoint folder")
    parser.add_argument("--benchmarks", nargs="+", default=["builtin"],
                        help=f"names ({', '.join(['builtin'] + BENCHMARKS)}) or JSONL paths, comma or space separated")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="folder holding NAME.jsonl files")
    parser.add_argument("--out", default="runs/eval", help="folder for NAME.jsonl results and summary.json")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=0,
                        help="k for avg@k and pass@k at temperature 1.0 (0: greedy only)")
    parser.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences generated together")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    _, rank, _, args.device = init_distributed(args.device)  # under torchrun: the problems are shared out
    torch.manual_seed(args.seed)
    names = [b for b in re.split(r"[,\s]+", " ".join(args.benchmarks)) if b]
    benchmarks = {Path(b).stem if b.endswith(".jsonl") else b: load_benchmark(b, args.data_dir, args.limit)
                  for b in names}  # all read (and checked) before the model loads
    model, tokenizer = load_model(args.model, device=args.device)
    results, started = {}, time.time()
    for name, problems in benchmarks.items():
        records, metrics = evaluate_benchmark(model, tokenizer, problems, args.samples, args.max_new_tokens,
                                              args.batch_size, seed=args.seed, desc=name)
        results[name] = metrics
        if rank == 0:  # every process holds every record; one writes
            write_jsonl(Path(args.out) / f"{name}.jsonl", records)
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
