"""Expert trajectories -> step-wise SRL examples, plus RLVR and SFT sets (JSONL files in data/).

SRL (Deng et al. 2025, arXiv 2510.25992) learns from an expert's solution one step at a time: a solution written as
numbered steps 1..N gives the partial trajectories "problem + steps 1..k-1 -> step k" (split_steps, then
srl_examples). The whole reward signal comes from these splits, so the splitter is careful: lists nested inside a
step stay inside it, display math is never cut, text before step 1 is not a step.

    python data_prep.py                          # the built-in problems (builtin_problems.jsonl) -> data/
    python data_prep.py --input ../shared/data/benchmarks/gsm8k.jsonl --test-problems 200   # GSM8K's own format
    python data_prep.py --input s1K-1.1.parquet  # s1K-1.1 (the paper's data): question, deepseek_attempt, ...
    python data_prep.py --hf-dataset simplescaling/s1K-1.1    # online only (needs huggingface_hub)
    python data_prep.py --synthetic 200          # generated arithmetic chains (tasks/synthetic.py, for tiny models)
    python data_prep.py --input trajs/ --out-dir data/swe     # agent trajectories (tasks/trajectories.py)

Writes srl_train / srl_val (partial trajectories), sft_srl_train (the same with a "<think>...</think>" completion,
the format warm start), rlvr_train / rlvr_val (problem, answer), sft_train (problem, solution) and, with
--test-problems, test.jsonl; no training file holds a step of a held-out problem. docs/data.md gives each file's
fields and every input format.
Choices the paper does not state, and departures from it:
  - Examples use k = 2..N (the context holds at least one step); --include-first-step adds k = 1.
  - Held out for validation: min(60, max(1, 10%)) problems (the paper: 60 of 1,000), by agent instance for agents.
  - On graded data (s1K-1.1) the gold answer is the boxed answer of an attempt graded correct; every attempt is an
    expert, as in the paper (--correct-only keeps the correct ones only).
  - sft_srl_train's monologue is a template ("Steps 1-2 are done. Next: 3. <title>"), not real reasoning.
  - Agent steps: the context is the issue and the last --context-pairs (paper: 2) command/output pairs, each output
    cut to --max-observation-chars (head and tail kept); the target is the command, never the agent's thought.
"""
import argparse
import random
import re
import statistics
import time
from collections import Counter
from pathlib import Path

from machinery.files import InputError, jsonl_text, write_files
from tasks import synthetic, trajectories
from tasks.sources import (BUILTIN_FIELDS, DEFAULT_FIELDS, DataError, download_hf_dataset, gsm8k_records, is_gsm8k,
                           load_records, normalize, read_records)
from tasks.trajectories import TrajectoryError

ROOT = Path(__file__).resolve().parent
BUILTIN_PATH = ROOT / "builtin_problems.jsonl"


# ----------------------------------------------------------------------------------------------------
# Splitting a solution into its numbered steps

# A step header: "1.", "1)", "Step 1:", "**Step 1.**", "### Step 1", "1. **Title**", "**1. Title**".
STEP_HEADER = re.compile(
    r"(?P<indent>[ \t]*)(?P<hashes>#{1,6}[ \t]+)?(?P<bold>\*\*)?[ \t]*"
    r"(?:(?P<word>step)[ \t]+(?P<wnum>\d{1,3})[ \t]*(?P<wdelim>[.):-])?|(?P<num>\d{1,3})(?P<delim>[.)]))"
    r"(?P<rest>(?:\*\*)?(?:[ \t].*)?)$", re.IGNORECASE)
# A section heading that may restart the numbering: "### Part (b)", "**Part 2:**", "(b) Find ...".
SECTION_HEADING = re.compile(r"(#{1,6}[ \t]|\**[ \t]*(part|problem|question)\b|\**[ \t]*\(([a-z]|[ivx]+)\))",
                             re.IGNORECASE)
DOLLARS = re.compile(r"\$\$")
BRACKET_OPEN, BRACKET_CLOSE = re.compile(r"(?<!\\)\\\["), re.compile(r"(?<!\\)\\\]")
MATH_ENV = r"(?:equation|align|alignat|gather|multline|eqnarray|flalign|displaymath)\*?"
ENV_OPEN, ENV_CLOSE = re.compile(r"\\begin\{" + MATH_ENV + r"\}"), re.compile(r"\\end\{" + MATH_ENV + r"\}")


def _parse_header(line):
    """(number, indent, style) if the line opens a numbered item, else None."""
    m = STEP_HEADER.match(line)
    if not m:
        return None
    word, rest = m["word"], m["rest"].strip()
    if word and not (m["wdelim"] or m["hashes"] or m["bold"] or not rest or rest.startswith("**")):
        return None  # "Step 1 is easy" is a sentence, not a header
    number = int(m["wnum"] or m["num"])
    indent = len(m["indent"].expandtabs(4))
    # Top-level steps all share step 1's style; a nested list usually differs (e.g. no bold title).
    style = (bool(m["hashes"]), bool(m["bold"]), bool(word), m["delim"] or "", rest.startswith("**"))
    return number, indent, style


def _inside_math(lines):
    """For each line: does it start inside display math ($$, \\[ \\], math environments) or a code fence?"""
    inside, dollars, fence, brackets, envs = [], False, False, 0, 0
    for line in lines:
        inside.append(dollars or fence or brackets > 0 or envs > 0)
        if line.lstrip().startswith("```"):
            fence = not fence
        if fence:
            continue
        if not line.strip():  # TeX allows no blank line inside math: an unclosed block ends here
            dollars, brackets, envs = False, 0, 0
        dollars ^= len(DOLLARS.findall(line)) % 2 == 1
        brackets = max(0, brackets + len(BRACKET_OPEN.findall(line)) - len(BRACKET_CLOSE.findall(line)))
        envs = max(0, envs + len(ENV_OPEN.findall(line)) - len(ENV_CLOSE.findall(line)))
    return inside


def _step_run(headers, headings, first):
    """(start lines, marked) of the steps that follow a "1." header: 2, 3, ... of the same indentation and
    style as the first; "marked" tells whether that style is more than a bare number."""
    _, _, top_indent, style = first
    top = [h for h in headers if h[0] > first[0] and h[2] <= top_indent and h[3] == style]
    starts, expected = [first[0]], 2
    for j, (i, number, _, _) in enumerate(top):
        if number == expected:
            starts.append(i)
            expected += 1
        elif number == 1:
            # A restart counts only after a section heading ("### Part (b)") and when the old list does
            # not go on right after the new one; otherwise it is a list nested inside the current step.
            heading = next((h for h in headings if starts[-1] < h < i), None)
            rest, n = top[j + 1:], 0
            while n < len(rest) and rest[n][1] == n + 2:  # the new list's own 2, 3, ...
                n += 1
            old_list_goes_on = n < len(rest) and rest[n][1] == expected
            if heading is not None and not old_list_goes_on:
                starts.append(heading)
                expected = 2
    return starts, any(style[:3]) or style[4]


def split_steps(solution):
    """The top-level numbered steps of a solution, in order (each a verbatim slice); [] if it has none.

    Top-level steps are numbered 1, 2, 3, ... consecutively, share step 1's indentation and style, and
    never start inside display math. Text before step 1 is dropped; everything after the last header
    (the closing answer line too) belongs to the last step."""
    lines = solution.split("\n")
    headers, headings = [], []  # (line index, number, indent, style); line indices of section headings
    for i, (line, in_math) in enumerate(zip(lines, _inside_math(lines))):
        if in_math:
            continue
        header = _parse_header(line)
        if header:
            headers.append((i, *header))
        elif SECTION_HEADING.match(line) and not line[:1].isspace():
            headings.append(i)
    top_indent = min((h[2] for h in headers if h[1] == 1), default=None)
    runs = [_step_run(headers, headings, first) for first in headers if first[1] == 1 and first[2] == top_indent]
    if not runs:
        return []
    # A solution may hold several lists at the top level (e.g. the problem's conditions restated before
    # the solution): take the run with a marked style (bold title, "Step", heading) first, then the longest.
    starts = max(runs, key=lambda run: (run[1], len(run[0]), -run[0][0]))[0]
    ends = starts[1:] + [len(lines)]
    return ["\n".join(lines[s:e]).strip() for s, e in zip(starts, ends)]


def split_paragraphs(solution):
    """Fallback for free text: paragraphs separated by blank lines (display math stays whole, and a
    paragraph that is only display math joins the paragraph before it)."""
    lines = solution.split("\n") + [""]
    paragraphs, current = [], []
    for line, in_math in zip(lines, _inside_math(lines)):
        if line.strip() or in_math:
            current.append(line)
        elif current:
            text = "\n".join(current).strip()
            if text.startswith(("\\[", "$$", "\\begin")) and paragraphs:
                paragraphs[-1] += "\n\n" + text
            else:
                paragraphs.append(text)
            current = []
    return paragraphs


def step_title(step):
    """A short title for a step: its bold "**Title**", or the rest of a "Step k: Title" / heading line, or
    else its first sentence; at most 80 characters."""
    lines = step.split("\n")
    n, m = next(((n, STEP_HEADER.match(line)) for n, line in enumerate(lines) if _parse_header(line)), (0, None))
    rest, after = (m["rest"].strip(), lines[n + 1:]) if m else (step, [])
    bold = re.match(r"\*\*(.+?)\*\*", rest)
    if bold:
        title = bold[1]
    elif m and (m["word"] or m["hashes"] or m["bold"]) and rest.strip("*# "):
        title = rest
    else:  # a bare "1. text": the first sentence
        text = " ".join(" ".join([rest] + after).split())
        title = re.split(r"(?<=[.:!?])\s", text, maxsplit=1)[0]
    title = " ".join(title.replace("**", "").split()).strip("*# ").rstrip(":.").strip()
    return title if len(title) <= 80 else title[:77].rstrip() + "..."


# ----------------------------------------------------------------------------------------------------
# The project's own data: the built-in problems (the synthetic chains are synthetic.py's)

def builtin_problems():
    """The built-in sample: 49 hand-written problems (arithmetic, algebra, geometry, counting, number
    theory) with numbered "1. **Title** ..." solutions and boxed answers, in builtin_problems.jsonl."""
    return read_records(BUILTIN_PATH)


# ----------------------------------------------------------------------------------------------------
# Records -> problems -> examples

def srl_examples(problem, steps, include_first_step=False, next_step_title=False):
    """Partial trajectories of one solution: for k = 2..N (1..N with include_first_step), the context is
    the problem + steps 1..k-1 and the target is step k: the paper's "partial trajectories"."""
    examples = []
    for k in range(1 if include_first_step else 2, len(steps) + 1):
        example = {"id": problem["id"], "problem": problem["problem"], "previous_steps": steps[:k - 1],
                   "target_step": steps[k - 1], "step_index": k, "num_steps": len(steps),
                   "answer": problem["answer"]}
        if next_step_title:
            example["next_step_title"] = step_title(steps[k - 1])
        examples.append(example)
    return examples


def think_completion(example):
    """"<think>\\n" + a short templated monologue + "\\n</think>\\n" + the target step, for SFT warm-up."""
    k, target = example["step_index"], example["target_step"]
    if "issue" in example:  # an agent step: the agent's own thought when it wrote one
        thought = example["thought"] or f"Next command: number {k}."
    else:
        done = "Nothing is written yet." if k == 1 else "Step 1 is done." if k == 2 else f"Steps 1-{k - 1} are done."
        thought = f"{done} Next:\n{k}. {step_title(target)}"
    return f"<think>\n{thought}\n</think>\n{target}"


def prepare(problems, include_first_step=False, next_step_title=False, context_pairs=2, fallback=None,
            val_problems=None, seed=0, max_observation_chars=4000, test_problems=0, one_step=False, correct_only=False):
    """(outputs, stats): outputs maps each file name to its records; the split is by problem (for agent
    trajectories, by instance). problems may be agent trajectories (trajectories.py: they have "steps").
    test_problems > 0 holds out that many more problems as test.jsonl ({id, problem, answer}), in no other file.
    one_step: the whole solution is one step (the paper's one-step reward ablation: the target is the whole
    expert solution, the context the problem alone). correct_only leaves problems whose expert attempt is graded
    wrong out of SRL and SFT (RLVR keeps them)."""
    stats = {"problems": len(problems), "agentic": 0, "no_steps": 0, "one_step": 0, "no_answer": 0,
             "steps": [], "formats": Counter(), "no_action_turns": 0, "cut_observations": 0,
             "graded": sum(p.get("correct") is not None for p in problems), "experts_dropped": 0,
             "correct_only": correct_only}
    wrong_experts = {p["id"] for p in problems if correct_only and p.get("correct") is False}
    examples = {}  # problem id -> its SRL examples
    for problem in problems:
        if "steps" in problem:  # an agent trajectory: one example per action
            stats["agentic"] += 1
            stats["formats"][problem["format"]] += 1
            stats["steps"].append(len(problem["steps"]))
            stats["no_action_turns"] += problem["turns_without_action"]
            stats["cut_observations"] += sum(len(s["observation"]) > max_observation_chars for s in problem["steps"])
            examples[problem["id"]] = trajectories.agent_examples(problem, context_pairs, max_observation_chars)
            stats["no_steps"] += not examples[problem["id"]]  # a trajectory without any action
            continue
        if problem["id"] in wrong_experts:
            stats["experts_dropped"] += 1
            continue
        steps = [problem["solution"].strip()] if one_step else split_steps(problem["solution"])
        if not steps and fallback == "paragraphs":
            steps = split_paragraphs(problem["solution"])
        if not steps:
            stats["no_steps"] += 1
            continue
        stats["steps"].append(len(steps))
        examples[problem["id"]] = srl_examples(problem, steps, include_first_step or one_step, next_step_title)
        stats["one_step"] += not examples[problem["id"]]
    # Hold out problems that give SRL examples (so both validation files are populated), else any; the runs
    # of one agent instance go to the same side.
    group = {p["id"]: p.get("instance_id") or p["id"] for p in problems}
    pool = sorted({group[pid] for pid, exs in examples.items() if exs} or set(group.values()))
    if val_problems is None:
        val_problems = min(60, max(1, len(pool) // 10)) if len(pool) > 1 else 0
    if not 0 <= val_problems <= len(pool):
        raise DataError(f"--val-problems {val_problems}: must lie in 0..{len(pool)} (problems with examples)")
    if not 0 <= test_problems <= len(pool) - val_problems:
        raise DataError(f"--test-problems {test_problems}: must lie in 0..{len(pool) - val_problems} (problems "
                        "with examples, less the validation problems)")
    held_out = random.Random(seed).sample(pool, val_problems + test_problems)
    val_ids, test_ids = set(held_out[:val_problems]), set(held_out[val_problems:])
    stats["val_problems"], stats["test_problems"] = len(val_ids), len(test_ids)

    outputs = {name: [] for name in ("srl_train.jsonl", "srl_val.jsonl", "sft_srl_train.jsonl",
                                     "rlvr_train.jsonl", "rlvr_val.jsonl", "sft_train.jsonl")}
    if test_ids:
        outputs["test.jsonl"] = []
    for problem in problems:
        if group[problem["id"]] in test_ids:
            if problem.get("answer") is not None:
                outputs["test.jsonl"].append({k: problem[k] for k in ("id", "problem", "answer")})
            continue
        split = "val" if group[problem["id"]] in val_ids else "train"
        srl = examples.get(problem["id"], [])
        outputs[f"srl_{split}.jsonl"] += srl
        if "steps" in problem:
            sft = problem
        else:
            if problem["answer"] is None:
                stats["no_answer"] += 1
            else:
                outputs[f"rlvr_{split}.jsonl"].append({k: problem[k] for k in ("id", "problem", "answer")})
            sft = {k: problem[k] for k in ("id", "problem", "solution", "answer")}
            if problem["reasoning"]:
                sft["reasoning"] = problem["reasoning"]
        if split == "train" and problem["id"] not in wrong_experts:
            outputs["sft_srl_train.jsonl"] += [{**ex, "completion": think_completion(ex)} for ex in srl]
            outputs["sft_train.jsonl"].append(sft)
    return outputs, stats


# ----------------------------------------------------------------------------------------------------
# Writing

def write_outputs(out_dir, outputs):
    """Write JSONL files ({name: records}), all of them or none (machinery/files.py's write_files)."""
    write_files(out_dir, {name: jsonl_text(records) for name, records in outputs.items()})


def summary(source, problems, outputs, stats, out_dir, seconds, max_observation_chars=4000):
    steps = stats["steps"]
    spread = f"min {min(steps)} / median {statistics.median(steps):g} / max {max(steps)}" if steps else ""
    if stats["agentic"]:
        formats = ", ".join(f"{name} {n}" for name, n in sorted(stats["formats"].items()))
        lines = [f"read {stats['agentic']} agent trajectories from {source} ({formats})",
                 f"actions (one example each): {sum(steps)}" + (f"; per trajectory {spread}" if steps else ""),
                 f"not targets: {stats['no_action_turns']} assistant turns without an action; "
                 f"{stats['no_steps']} trajectories without any action",
                 f"observations cut to {max_observation_chars:,} characters (head and tail kept): "
                 f"{stats['cut_observations']} of {sum(steps)}",
                 f"instances held out for validation: {stats['val_problems']}"]
    else:
        lines = [f"read {stats['problems']} problems from {source}",
                 f"with numbered steps: {len(steps)}" + (f"; steps per solution {spread}" if steps else ""),
                 f"dropped from SRL: {stats['no_steps']} without numbered steps, {stats['one_step']} with a "
                 "single step (no example without --include-first-step)",
                 f"dropped from RLVR: {stats['no_answer']} without an answer"
                 + (" (no attempt graded correct with a \\boxed{} answer)" if stats["graded"] else "")]
        if stats["graded"]:
            wrong = sum(p.get("correct") is False for p in problems)
            lines.append(f"expert attempt graded wrong: {wrong} of {stats['graded']} graded problems; " + (
                f"{stats['experts_dropped']} left out of SRL and SFT (--correct-only)" if stats["correct_only"]
                else "kept as experts, as in the paper (--correct-only leaves them out)"))
        lines.append(f"problems held out for validation: {stats['val_problems']}"
                     + (f", for the test file: {stats['test_problems']}" if stats["test_problems"] else ""))
    lines += [f"  {Path(out_dir) / name}: {len(records)} examples" for name, records in outputs.items()]
    lines.append(f"done in {seconds:.2f} s")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--input", help="JSONL, JSON or parquet file, or a folder of agent trajectories "
                        "(default: the built-in problems)")
    source.add_argument("--hf-dataset", help="download a data file of this Hugging Face dataset (online)")
    source.add_argument("--synthetic", type=int, metavar="N", help="generate N arithmetic-chain problems")
    parser.add_argument("--hf-file", help="with --hf-dataset: which file of the dataset (default: the first)")
    parser.add_argument("--out-dir", default="data", help="output folder (default: data/)")
    parser.add_argument("--question-field", default=DEFAULT_FIELDS["question"])
    parser.add_argument("--solution-field", default=DEFAULT_FIELDS["solution"])
    parser.add_argument("--answer-field", default=None,
                        help="gold answer column (default: the boxed answer of an attempt graded correct on graded "
                             "data, else 'answer' if present, else the solution's last \\boxed{})")
    parser.add_argument("--grade-field", default=DEFAULT_FIELDS["grade"],
                        help="the grade (\"Yes\" / \"No\") of the --solution-field attempt, used when present")
    parser.add_argument("--correct-only", action="store_true",
                        help="SRL and SFT experts only from attempts graded correct (default: all, as the paper)")
    parser.add_argument("--reasoning-field", default=DEFAULT_FIELDS["reasoning"],
                        help="reasoning trace for sft_train.jsonl, used when present")
    parser.add_argument("--include-first-step", action="store_true", help="also k = 1 (empty context)")
    parser.add_argument("--next-step-title", action="store_true", help="add the target step's title")
    parser.add_argument("--format", choices=["gsm8k", *trajectories.FORMATS],
                        help="read every record in this format: gsm8k (question, answer: worked solution then "
                             "#### N), or an agent trajectory format (default: detected from the records)")
    parser.add_argument("--context-pairs", type=int, default=2,
                        help="agentic: previous action/observation pairs in the context (paper: 2)")
    parser.add_argument("--max-observation-chars", type=int, default=4000,
                        help="agentic: longer observations keep their head and tail, with a marker (>= 40)")
    parser.add_argument("--fallback", choices=["paragraphs"], help="split unnumbered solutions on blank lines")
    parser.add_argument("--val-problems", type=int, default=None, help="default: min(60, max(1, 10%% of problems))")
    parser.add_argument("--test-problems", type=int, default=0,
                        help="hold out N more problems as test.jsonl (problem, answer), for evaluate.py")
    parser.add_argument("--one-step", action="store_true",
                        help="the whole solution is one step (the paper's one-step reward ablation)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--synthetic-steps", type=synthetic.step_range, default=4,
                        help="operations per synthetic problem: N, or LOW-HIGH for a mix (default 4)")
    parser.add_argument("--synthetic-max-number", type=int, default=9, help="largest synthetic operand (default 9)")
    parser.add_argument("--synthetic-max-value", type=int, default=40,
                        help="synthetic values stay in 0..this (default 40; at least 2 x steps)")
    parser.add_argument("--synthetic-slip", type=float, default=0.0,
                        help="share of a sloppy teacher's steps that apply the operation twice (default 0)")
    args = parser.parse_args(argv)

    def refuse(message):  # a user error: one line in argparse's style, exit status 2, nothing written
        parser.exit(2, f"{parser.prog}: error: {message}\n")

    lowest = {"context_pairs": 0, "max_observation_chars": 40, "val_problems": 0, "test_problems": 0}
    for name, low in lowest.items():
        value = getattr(args, name)
        if value is not None and value < low:
            refuse(f"--{name.replace('_', '-')} {value}: must be at least {low}")
    start = time.time()
    records = None
    if args.synthetic is not None:  # the generator checks its own flags (synthetic.py)
        try:
            records = synthetic.synthetic_problems(args.synthetic, args.synthetic_steps, args.synthetic_max_number,
                                                   args.seed, args.synthetic_max_value, args.synthetic_slip)
        except ValueError as e:
            refuse(str(e))
    if args.hf_file and not args.hf_dataset:
        refuse("--hf-file names a file of --hf-dataset: give the dataset too")
    out_dir = Path(args.out_dir)
    blocking = next(folder for folder in [out_dir, *out_dir.parents] if folder.exists())
    if not blocking.is_dir():
        refuse(f"--out-dir {out_dir}: {blocking} is a file, not a folder")

    skipped = []
    try:
        if records is not None:
            source, fields, locations = f"the synthetic generator (seed {args.seed})", BUILTIN_FIELDS, None
        else:
            source = args.input or (download_hf_dataset(args.hf_dataset, args.hf_file) if args.hf_dataset
                                    else BUILTIN_PATH)
            fields = BUILTIN_FIELDS if source == BUILTIN_PATH else dict(
                question=args.question_field, solution=args.solution_field, answer=args.answer_field,
                reasoning=args.reasoning_field, grade=args.grade_field)
            records, locations, names = load_records(source)
            if args.format == "gsm8k" or (args.format is None and is_gsm8k(records[0])):
                records, fields = gsm8k_records(records, locations), BUILTIN_FIELDS
        folder = args.synthetic is None and Path(source).is_dir()
        if args.synthetic is None and args.format != "gsm8k" and (args.format or folder or
                                                                   trajectories.detect_format(records[0])):
            problems, skipped = trajectories.trajectories_of(records, locations, names, args.format, folder)
            if not problems:
                raise DataError(f"{source}: no agent trajectory among its files")
        else:
            problems = normalize(records, fields, locations, args.correct_only)
        outputs, stats = prepare(problems, args.include_first_step, args.next_step_title, args.context_pairs,
                                 args.fallback, args.val_problems, args.seed, args.max_observation_chars,
                                 args.test_problems, args.one_step, args.correct_only)
        write_outputs(args.out_dir, outputs)
    except (DataError, TrajectoryError, InputError) as e:
        refuse(str(e))
    if skipped:
        print(f"skipped {len(skipped)} files that hold no agent trajectory: {', '.join(skipped[:5])}"
              + (" ..." if len(skipped) > 5 else ""))
    print(summary(source, problems, outputs, stats, args.out_dir, time.time() - start, args.max_observation_chars))


if __name__ == "__main__":
    main()
