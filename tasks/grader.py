r"""
A grader for math answers: the final answer of a completion (its last \boxed{}), and whether two answers are
mathematically equal. It is both the RLVR reward and every benchmark score, so it is built never to call two
different answers equal: where it would have to guess, it says "wrong". It needs only sympy; copy it on its own.

    from tasks.grader import extract_answer, is_equiv
    is_equiv(extract_answer("... so the answer is $\boxed{\dfrac{1}{2}}$."), "0.5")      # True

What counts as equal, in short (docs/grader.md lists every rule; the departures from the Qwen2.5-Math grader the
paper used are all on the strict side):
  - Only a \boxed{...} / \boxed N / \fbox{...} answer counts; no "the answer is" or last-number fallback.
  - Numbers are equal exactly (0.5 == 1/2); a decimal against an irrational within a relative 1e-9 only.
  - Thousands separators are read (1,000, 14{,}916, 10\,000); "2, 500" is a list, never 2500.
  - Percent signs, units, degree and dollar signs are dropped (both answers' must agree when both carry one).
  - Labels are dropped (x = 5 == 5); lists compare unordered, intervals and tuples by their brackets.
  - Equations are equal up to a non-zero constant factor, inequalities up to a positive one.
  - LaTeX is turned into sympy by a small converter (no antlr); what it cannot read is compared as text.
  - Each comparison is bounded in size and, in the main thread on Unix, in time; running out counts as not equal.
"""
import itertools
import re
import signal
import threading
from contextlib import contextmanager

import sympy
from sympy.parsing.sympy_parser import parse_expr, standard_transformations

# -----------------------------------------------------------------------------------------------------------------
# The final answer of a completion


def last_boxed(text):
    """Content of the last \\boxed{...} or \\fbox{...} in text (nested braces; escaped \\{ \\} skipped), or the
    token after "\\boxed " ("\\boxed 5"); None when there is none, it is empty, or it is left unclosed."""
    heads = list(re.finditer(r"\\(?:boxed|fbox)(?![a-zA-Z])", text or ""))
    if not heads:
        return None
    rest = text[heads[-1].end():]
    body = rest.lstrip(" ")
    if not body.startswith("{"):
        token = re.match(r" +([^\s$]+)", rest)
        return token[1] if token else None
    depth = 0
    for brace in re.finditer(r"\\.|[{}]", body, re.DOTALL):  # an escaped character (e.g. \{ in a set) is skipped
        depth += {"{": 1, "}": -1}.get(brace[0], 0)
        if depth == 0:
            return body[1:brace.start()].strip() or None
    return None  # unclosed braces


def extract_answer(text):
    """The final answer of a completion: the content of its last \\boxed{...} (nested braces), \\boxed N or
    \\fbox{...}, else None. Deliberately no fallback ("the answer is ...", last number): a fallback that guesses
    turns format failures into lucky rewards during RL."""
    return last_boxed(text)


def answer_to_str(answer):
    """Gold answers come as strings, integers or floats; 27.0 becomes "27"."""
    return str(int(answer)) if isinstance(answer, float) and answer.is_integer() else str(answer).strip()


# -----------------------------------------------------------------------------------------------------------------
# Normalisation: strip what never changes the value (spacing, separators, units, $, %, degrees), join word lists

UNIT = (r"(?:(?:square|sq\.?|cubic) )?(?:cm|mm|km|meters?|metres?|kilometers?|centimeters?|millimeters?|inch(?:es)?|"
        r"feet|foot|ft|miles?|yards?|units?|degrees?|radians?|cents?|dollars?|seconds?|minutes?|hours?|days?|"
        r"weeks?|months?|years?|grams?|kilograms?|kg|pounds?|lbs?|ounces?|liters?|litres?|gallons?|mph|km/h|m/s)")
TEXT_MACRO = r"\\(?:text|textnormal|textrm|textbf|textit|mbox|mathrm|mathbf|mathit|operatorname)"
THOUSANDS = re.compile(r"(?<![\d.])[1-9]\d{0,2}(?:(?:,\\!\s*|\\[,;: ]|~| )\d{3})+(?:\.\d+)?(?![\d.])")  # 10\,000


def braced_comma_number(m):
    """A number written with {,}: groups of three are thousands (14{,}916); one {,} before any other number of
    digits is a decimal comma (3{,}14); anything else is left unreadable."""
    groups = m.group().split("{,}")
    if re.fullmatch(r"[1-9]\d{0,2}", groups[0]) and all(len(g) == 3 for g in groups[1:]):
        return "".join(groups)
    return ".".join(groups) if len(groups) == 2 else m.group()


def unit_name(unit):
    """A unit in one spelling: "Miles" -> "mile", "inches^2" -> "inch^2", "sq ft" -> "squareft"."""
    unit = re.sub(r"\^\{?(\d)\}?", r"^\1", unit.lower()).replace("sq.", "square").replace("sq ", "square ")
    unit = {"feet": "foot", "metres": "meter", "metre": "meter", "inches": "inch"}.get(unit, unit)
    return re.sub(r"(?<=[a-z])s(?=\^|$)", "", unit.replace(" ", ""))


def join_word_lists(s):
    """"2 and 3", "x = 2 or x = 3", "1; 2": a list joined by words or semicolons (outside brackets) -> "2, 3"."""
    depth = [0, *itertools.accumulate((c in "([{") - (c in ")]}") for c in s)]  # depth[i]: brackets open before i
    pieces, last = [], 0
    for m in re.finditer(r"\s*,?\s*\b(?:and|or)\b\s*|\s*;\s*", s):
        if depth[m.start()] == 0:
            pieces.append(s[last:m.start()])
            last = m.end()
    return ", ".join(pieces + [s[last:]]) if pieces else s


def normalize_answer(answer):
    """(text, unit): a canonical string for an answer, and its unit (None without one). Equal strings mean equal
    answers; everything removed here never changes the value (see the module docstring)."""
    s = answer_to_str(answer).replace("\n", " ")
    s = re.sub(r"\d+(?:\{,\}\d+)+", braced_comma_number, s)
    s = THOUSANDS.sub(lambda m: re.sub(r",\\!\s*|\\[,;: ]|~| ", "", m.group()), s)
    s = re.sub(r"\\(?:!|displaystyle|textstyle)|\\(?:left|right|[bB]igg?[lr]?)(?![a-zA-Z])", "", s)
    s = re.sub(r"(?<!\\)\\[,;: ]|\\q?quad(?![a-zA-Z])|~", " ", s)
    s = re.sub(r"\\[dtc]frac", r"\\frac", s).replace("\\lbrace", "\\{").replace("\\rbrace", "\\}")
    for macro, op in (("geq?", ">="), ("leq?", "<="), ("neq?", "!="), ("gt", ">"), ("lt", "<")):
        s = re.sub(rf"\\{macro}(?![a-zA-Z])", op, s)
    s = re.sub(r"\\approx(?![a-zA-Z])", "≈", s).replace("≥", ">=").replace("≤", "<=").replace("≠", "!=")
    sign_unit = "degree" if re.search(r"\\circ|°", s) else "dollar" if "\\$" in s else None  # 36° is not $36
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°", "", s)  # degrees
    s = re.sub(r"\\?[$%]", "", s)  # dollars and percent signs (10% == 10; see the docstring)
    # "\text{ cm}^2", "\textnormal{ miles}" at the end: a unit (one word, so that "\text{ or six}" stays)
    unit = None
    m = re.search(TEXT_MACRO + r"\{\s+((?:(?:square|sq|cubic) )?[A-Za-z/]+)\s*\}(\^\{?\d\}?)?\s*$", s)
    if m:
        s, unit = s[:m.start()], m.group(1) + (m.group(2) or "")
    unwrapped = 1
    while unwrapped:  # \text{...}, \mathbf{...}: keep the content, innermost first
        s, unwrapped = re.subn(TEXT_MACRO + r"\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"(?<=[\d}\s])\s*(?:percent(?:age)?|pct)\s*$", "", s)  # "28 percent" is 28%
    m = re.search(rf"(?<=[\d}}\s])\s*({UNIT}(?:\^\{{?[23]\}}?)?)\s*$", s)  # "5 cm", "864 inches^2"
    if m:
        s, unit = s[:m.start()], unit or m.group(1)
    unit = unit or sign_unit
    s = re.sub(r"^[a-zA-Z]\s*\\in(?![a-zA-Z])", "", s.strip().rstrip(".").strip()).strip()  # "x \in [-2, 7]"
    s = join_word_lists(s)
    s = re.sub(r"^(-?\d+) (\d+)/(\d+)$", r"\1\\frac{\2}{\3}", s)  # 1 1/2, the plain-text mixed number
    number = re.fullmatch(rf"((?:{NAME})\s*=\s*)?([-+]?[1-9]\d{{0,2}}(?:,\d{{3}})+(?:\.\d+)?)", s)
    if number:  # 1,000 and x = 1,000, the whole answer (not the list 1,2, nor "2, 500")
        s = (number[1] or "") + number[2].replace(",", "")
    return s, (unit_name(unit) if unit else None)


# -----------------------------------------------------------------------------------------------------------------
# Structure: tuples and intervals (ordered, brackets matter), sets and unions (order-free), matrices, scalars


def split_top_level(s, sep):
    """re.split(sep, s), but only where s is outside every bracket ( [ { (a group in sep keeps the separators)."""
    pattern, parts, depth, start, i = re.compile(sep), [], 0, 0, 0
    while i < len(s):
        m = pattern.match(s, i) if depth == 0 else None
        if m and m.end() > i:
            parts += [s[start:i].strip(), *m.groups()]
            start = i = m.end()
            continue
        depth += (s[i] in "([{") - (s[i] in ")]}")
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
    union = split_top_level(s, r"\\cup(?![a-zA-Z])")
    if len(union) > 1:
        return "unordered", [answer_structure(part) for part in union]
    if s.startswith("\\{") and s.endswith("\\}") and matching_bracket(s, 1) == len(s) - 1:
        return "unordered", expand_plus_minus(split_top_level(s[2:-2], ","))
    if s.startswith("{") and matching_bracket(s, 0) == len(s) - 1:
        return answer_structure(s[1:-1])  # {-1, 1}: TeX braces only group (a set is \{-1, 1\})
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
MIXED_NUMBER = re.compile(r"\s*\\frac\s*(?:\{\s*(\d+)\s*\}|(\d))\s*(?:\{\s*(\d+)\s*\}|(\d))")
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
            if out and re.fullmatch(r"\*?Rational\('[^']*'\)", out[-1]):
                raise ValueError("two numbers side by side")  # "1 2": neither 12 nor 1 * 2 for sure
            mixed = MIXED_NUMBER.match(s, m.end())
            if mixed and m.group().isdigit():  # 1\frac12 is one and a half
                numerator, denominator = int(mixed[1] or mixed[2]), int(mixed[3] or mixed[4])
                if not 0 < numerator < denominator:
                    raise ValueError("ambiguous mixed number")  # 2\frac{3}{2}: 2 + 3/2 or 2 * 3/2?
                operand(f"(Rational('{m.group()}')+Rational({numerator},{denominator}))")
                i = mixed.end()
                continue
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


def sample_points(expressions):
    """Three rational points (one value per free symbol of the expressions) to evaluate them at."""
    variables = sorted(set().union(*(e.free_symbols for e in expressions)), key=str)
    return [{v: sympy.Rational(3 + 2 * k + n, 7 + k) for n, v in enumerate(variables)} for k in range(3)]


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
    for point in sample_points([difference]):
        value = sympy.N(difference.subs(point), 30)
        if value.is_finite and abs(value) > 1e-12 * (1 + abs(sympy.N(x.subs(point), 30))):
            return False
    return sympy.expand(difference) == 0 or sympy.simplify(difference) == 0


def constant_ratio(x, y):
    """The constant c with x = c * y (y not identically 0), or None when there is none."""
    for point in sample_points([x, y]):
        value = sympy.N(y.subs(point), 30)
        if value.is_finite and abs(value) > 1e-12:
            c = sympy.simplify(x.subs(point) / y.subs(point))
            ok = not c.free_symbols and c.is_finite and c != 0 and sympy_equal(x, c * y, approximate=False)
            return c if ok else None
    return None


# -----------------------------------------------------------------------------------------------------------------
# Relations and labels, then the whole comparison

RELATIONS = r"(<=|>=|!=|=|<|>|≈)"
FLIPPED = {">=": "<=", ">": "<"}  # a >= b is b <= a
# A label names a value and holds no operator: x, x_1, f(x), P(A), \theta, AB, \angle ABC, \overline{AB}, |AB|, area;
# never a function such as \sin x (\sin x = a says something else than \cos x = a)
NAME = (rf"(?:m?\\angle\s*)?(?:(?!(?:{'|'.join(FUNCTIONS)})\b)[A-Za-z]+|\\(?:{'|'.join(GREEK)}))(?![a-zA-Z])"
        r"(?:_\{?\w+\}?)?'*(?:\([^()=<>]*\))?|\\overline\{[A-Za-z]+\}|\|[A-Za-z]+\|")
SIMPLE_NAME = r"(?:[A-Za-z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?"  # x, x_1, \theta: a constant's name may differ


def relation(s):
    """(sides, relations) at the top level: "x = 5 + 1 = 6" -> (["x", "5 + 1", "6"], ["=", "="])."""
    parts = split_top_level(s, RELATIONS)
    return parts[::2], parts[1::2]


def letters(text):
    """The variable letters of a LaTeX text (commands such as \\frac or \\pi, and the constants e and i, left out)."""
    return set(re.findall(r"[a-zA-Z]", re.sub(r"\\[a-zA-Z]+", " ", text))) - {"e", "i"}


def labelled(s):
    """([(label, value)], the values without labels) when s is labelled: "x = 5", "AB = 4, CD = 5", "x = 2, 3" (one
    label for the list), "(p,q) = (3,2)", "(x,y) = (5,8), (8,5)", a chain "x = 5 + 1 = 6" (its value is its last
    side, or the last before an \\approx: x = 1/3 \\approx 0.33 is 1/3); else None."""
    sides, ops = relation(s)
    if ops == ["="] and re.fullmatch(rf"\((?:\s*(?:{NAME})\s*,)+\s*(?:{NAME})\s*\)", sides[0]):  # (p, q) = ...
        names, (kind, items) = split_top_level(sides[0][1:-1], ","), answer_structure(sides[1])
        if kind.startswith("ordered") and len(items) == len(names):
            return list(zip(names, split_top_level(sides[1][1:-1], ","))), sides[1]
        if kind == "unordered" and all(k.startswith("ordered") and len(t) == len(names) for k, t in items):
            return [(sides[0].replace(" ", ""), t) for t in split_top_level(sides[1], ",")], sides[1]
        return None
    pairs = []
    for item in split_top_level(s, ","):
        sides, ops = relation(item)
        if not ops and pairs:  # "x = 2, 3": the list's label
            pairs.append((pairs[-1][0], item))
        elif ops and set(ops) <= {"=", "≈"} and re.fullmatch(NAME, sides[0]) and all(sides):
            exact = ops.index("≈") if "≈" in ops else len(ops)  # x = 1/3 ≈ 0.33 stands for 1/3
            pairs.append((sides[0].replace(" ", ""), sides[max(exact, 1)]))
        else:
            return None
    return pairs, ", ".join(value for _, value in pairs)


def label_removable(label, value):
    """Whether "label = value" says no more than value: a constant, a function of the label's own arguments
    (f(x) = 2x + 1), or free of the label's letters (y = 2x + 3; not x = 2x + 3)."""
    arguments = re.search(r"\((.*)\)$", label)
    if arguments:
        return letters(value) <= letters(arguments[1])
    return not letters(value) & letters(label)


def labels_equal(pairs_a, pairs_b):
    """Labelled answers: the same labels with equal values; x = 5 and y = 5 count as one constant."""
    if len(pairs_a) == len(pairs_b) == 1 and not letters(pairs_a[0][1] + pairs_b[0][1]) and \
            all(re.fullmatch(SIMPLE_NAME, pairs[0][0]) for pairs in (pairs_a, pairs_b)):
        return structures_equal(answer_structure(pairs_a[0][1]), answer_structure(pairs_b[0][1]))
    if sorted(label for label, _ in pairs_a) != sorted(label for label, _ in pairs_b):
        return False
    values = lambda pairs, label: answer_structure(", ".join(v for name, v in pairs if name == label))  # noqa: E731
    return all(structures_equal(values(pairs_a, label), values(pairs_b, label)) for label, _ in pairs_a)


def relations_equal(op_a, a, op_b, b):
    """Whether "a op_a 0" and "b op_b 0" (a, b: left side minus right side) say the same: b is a non-zero constant
    times a (a positive one for an inequality)."""
    op_a, a = (FLIPPED[op_a], -a) if op_a in FLIPPED else (op_a, a)
    op_b, b = (FLIPPED[op_b], -b) if op_b in FLIPPED else (op_b, b)
    c = constant_ratio(a, b) if op_a == op_b else None
    return c is not None and (bool(c > 0) if op_a in ("<", "<=") else True)


def squash(s):
    """s without the spaces and braces that mean nothing: "x + 1" -> "x+1", "4210_{7}" -> "4210_7", but "1 2" (two
    numbers) keeps its space."""
    return re.sub(r"([_^])\{(\w)\}", r"\1\2", re.sub(r"(?<=\W) | (?=\W)", "", " ".join(s.split())))


def scalars_equal(a, b):
    if squash(a) == squash(b):
        return True
    words = r"(?=.*[a-z])[A-Za-z ]{3,}"  # "Evelyn", "east" (not "ABC" against "abc")
    if re.fullmatch(words, a) and re.fullmatch(words, b):
        return a.lower().split() == b.lower().split()
    (sides_a, ops_a), (sides_b, ops_b) = relation(a), relation(b)
    if len(ops_a) != len(ops_b) or len(ops_a) > 1:
        return False
    exprs = [to_sympy(x) for x in sides_a + sides_b]
    if any(e is None for e in exprs):
        return False
    approximate = bool(re.search(r"\.\d|\d[eE][-+]?\d", a + " " + b))
    try:
        if not ops_a:
            return sympy_equal(exprs[0], exprs[1], approximate)
        return relations_equal(ops_a[0], exprs[0] - exprs[1], ops_b[0], exprs[2] - exprs[3])
    except (TypeError, ValueError, ArithmeticError, AttributeError):
        return False


BOUNDS = {"<": ("(", ")"), "<=": ("[", "]")}


def as_interval(s):
    """An inequality on one name as the interval it describes: "-2 <= x < 7" -> "[-2, 7)", "x > 5" -> "(5, \\infty)";
    anything else unchanged."""
    sides, ops = relation(s)
    if ops and set(ops) <= set(FLIPPED):  # 7 >= x >= -2 is -2 <= x <= 7
        sides, ops = sides[::-1], [FLIPPED[op] for op in reversed(ops)]
    if not ops or not set(ops) <= set(BOUNDS):
        return s
    if len(ops) == 2 and re.fullmatch(NAME, sides[1]) and not letters(sides[0] + sides[2]) & letters(sides[1]):
        return f"{BOUNDS[ops[0]][0]}{sides[0]}, {sides[2]}{BOUNDS[ops[1]][1]}"
    if len(ops) == 1 and re.fullmatch(NAME, sides[0]) and not letters(sides[1]):
        return f"(-\\infty, {sides[1]}{BOUNDS[ops[0]][1]}"
    if len(ops) == 1 and re.fullmatch(NAME, sides[1]) and not letters(sides[0]):
        return f"{BOUNDS[ops[0]][0]}{sides[0]}, \\infty)"
    return s


def answers_equal(a, b):
    """Two normalised answers: an inequality against an interval, labels (dropped against a bare value), then the
    structure, then the scalars."""
    relation_a, relation_b = relation(a)[1], relation(b)[1]
    a, b = (as_interval(a) if relation_a and not relation_b else a), (as_interval(b) if relation_b and not relation_a
                                                                      else b)
    label_a, label_b = labelled(a), labelled(b)
    if label_a and label_b and labels_equal(label_a[0], label_b[0]):
        return True
    if label_a and label_b:  # else they may still be one equation written two ways: a = b and b = a
        return len(label_a[0]) == len(label_b[0]) == 1 and scalars_equal(a, b)
    if label_a and not relation(b)[1] and all(label_removable(*pair) for pair in label_a[0]):
        a = label_a[1]
    if label_b and not relation(a)[1] and all(label_removable(*pair) for pair in label_b[0]):
        b = label_b[1]
    return structures_equal(answer_structure(a), answer_structure(b))


def is_equiv(pred, gold, timeout_s=5.0):
    """Whether two answers (strings, or numbers for gold) are mathematically equal. None or empty is never
    equal to anything. Built to return False whenever it cannot be sure (see the module docstring)."""
    if pred is None or gold is None:
        return False
    (a, unit_a), (b, unit_b) = normalize_answer(pred), normalize_answer(gold)
    if not a or not b or (unit_a and unit_b and unit_a != unit_b):
        return False
    if a == b:
        return True
    try:
        with time_limit(timeout_s):
            return bool(answers_equal(a, b))
    except (GraderTimeout, RecursionError, ValueError):
        return False
