"""
The quickstart study's task: arithmetic chains, one operation repeated ("Start with 17. Add 3, 6 times. What number
do you end with?"), solved one application per step ("2. Add 3: 20 + 3 = 23."), and the checker that reads a
solution's steps back. A step needs only the number above it, so it is within reach of a tiny model; a long chain
is not, since every step must be right: the paper's regime, built on purpose (quickstart.py's docstring says how).

    synthetic_problems   the generator, with a sloppy teacher's slips (--synthetic-slip)
    check_steps          right and slipped steps of a written solution; every_step_right

`python data_prep.py --synthetic N` writes these problems as any other data (its --synthetic-* flags are this
file's arguments); quickstart.py runs the study on them. This file imports nothing of the project.
"""
import argparse
import random
import re

SYNTHETIC_OPS = {"add": ("Add", "+"), "sub": ("Subtract", "-")}  # operation -> (its word, its symbol)


def synthetic_problems(count, steps=4, max_number=9, seed=0, max_value=40, slip=0.0):
    """count arithmetic chains, one operation repeated ("Start with 17. Add 2, 6 times. What number do you end
    with?"), solved one application per step ("3. Add 2: 21 + 2 = 23."), the last step boxing the final number.
    A step needs only the number above it and the problem's operation, so it is within reach of a small model; a
    long chain is not, since every step must be right. Difficulty: steps (an int, or (low, high) for a mix of
    lengths), max_number (the largest operand) and max_value (every number stays in 0..max_value, slips included).

    slip > 0 writes a sloppy teacher's solutions instead: each step, with probability slip, applies the operation
    twice ("21 + 2 = 25.") and the chain goes on from there, to the answer it reaches. A model trained on them
    learns one consistent bad habit, which the correct solutions can then train away (quickstart.py). A slipped
    chain of full length never ends on the right answer (one that stops early can: three slipped steps are six
    operations). The problems do not depend on slip: the same seed gives the same problems, with or without it."""
    low, high = steps if isinstance(steps, tuple) else (steps, steps)
    if count < 1:
        raise ValueError(f"--synthetic {count}: must be at least 1")
    if not 1 <= low <= high:
        raise ValueError(f"--synthetic-steps {'-'.join(map(str, steps)) if isinstance(steps, tuple) else steps}: "
                         "must be N >= 1, or LOW-HIGH with 1 <= LOW <= HIGH")
    if max_number < 1:
        raise ValueError(f"--synthetic-max-number {max_number}: must be at least 1")
    if max_value <= max_number:
        raise ValueError(f"--synthetic-max-value {max_value}: must be above --synthetic-max-number ({max_number})")
    if max_value < 2 * high:
        raise ValueError(f"--synthetic-max-value {max_value}: must be at least 2 x the steps ({2 * high}), so that "
                         "every step can apply its operation twice")
    if not 0 <= slip <= 1:
        raise ValueError(f"--synthetic-slip {slip}: must be a share in 0..1")
    rng = random.Random(seed)
    problems = []
    for index in range(count):
        num_steps = rng.randint(low, high)
        n = rng.randint(1, min(max_number, max_value // (2 * num_steps)))  # a slip on every step still fits
        op = rng.choice(["add", "sub"])
        word, symbol = SYNTHETIC_OPS[op]
        sign, span = (1 if op == "add" else -1), num_steps * 2 * n
        value = start = rng.randint(0, max_value - span) if op == "add" else rng.randint(span, max_value)
        lines = []
        for k in range(1, num_steps + 1):
            result = value + sign * n * (1 + (rng.random() < slip))  # a draw per step, slip or not: same problems
            lines.append(f"{k}. {word} {n}: {value} {symbol} {n} = {result}.")
            value = result
        lines[-1] += f" The answer is \\boxed{{{value}}}."
        times = {1: "once", 2: "twice"}.get(num_steps, f"{num_steps} times")
        problem = f"Start with {start}. {word} {n}, {times}. What number do you end with?"
        problems.append({"id": f"synthetic-{seed}-{index + 1:05d}", "problem": problem,
                         "solution": "\n".join(lines), "answer": str(value)})
    return problems


def step_range(text):
    """--synthetic-steps: "8" -> 8, "1-8" -> (1, 8)."""
    low, _, high = text.partition("-")
    try:
        return (int(low), int(high)) if high else int(low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LOW-HIGH, got {text!r}") from None


def check_steps(problem, solution):
    """(steps, right steps, slipped steps) of a solution: a step is right when it applies the problem's operation once
    to the number it starts from (whatever came before), slipped when it applies it twice (the sloppy teacher's
    habit, synthetic_problems)."""
    word, n = re.search(r"(Add|Subtract) (\d+)", problem).groups()
    step = int(n) if word == "Add" else -int(n)
    slip = 2 * step
    steps = right = slipped = 0
    for k, a, c in re.findall(rf"(\d+)\. {word} {n}: (\d+) [-+] {n} = (-?\d+)", solution):
        if int(k) != steps + 1:
            break
        steps += 1
        right += int(c) == int(a) + step
        slipped += int(c) == int(a) + slip
    return steps, right, slipped


def every_step_right(problem, solution):
    """True when a solution has steps and each applies the problem's operation once (check_steps)."""
    steps, right, _ = check_steps(problem, solution)
    return 0 < steps == right
