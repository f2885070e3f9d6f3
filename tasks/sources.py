"""
Where data_prep.py's records come from, and how they become problems: JSONL, JSON and parquet files, a Hugging
Face dataset's file, GSM8K's own format (the worked solution, then "#### N"), and s1K-1.1's graded attempts (the
paper's data). Each record becomes {"id", "problem", "solution", "answer", "reasoning", "correct"}; data_prep.py
splits the solutions into steps. Bad input raises DataError naming the file, the line or record, and the field.

    read_records, load_records   a file's records (and where each one is, for error messages)
    download_hf_dataset          one data file of a Hugging Face dataset (online)
    is_gsm8k, gsm8k_records      GSM8K's format, its solution a line a step, its answer after ####
    normalize                    records -> problems, with the --*-field mapping and s1K-1.1's grades
"""
import re
from pathlib import Path

from tasks import trajectories
from tasks.grader import last_boxed  # the gold answer of a solution: its last \boxed{}
from tasks.trajectories import text_of

# s1K-1.1's columns (the paper's data), as its dataset card lists them (huggingface.co/datasets/simplescaling/
# s1K-1.1, README, dataset_info features): question, solution (the source's reference solution), cot_type,
# source_type, metadata, gemini_thinking_trajectory, gemini_attempt, deepseek_thinking_trajectory,
# deepseek_attempt, gemini_grade, gemini_grade_reason, deepseek_grade, deepseek_grade_reason. A grade is the
# string "Yes" (the attempt's answer agrees with the reference solution) or "No". Other data sets map their
# columns with the --*-field flags.
DEFAULT_FIELDS = dict(question="question", solution="deepseek_attempt", answer=None,
                      reasoning="deepseek_thinking_trajectory", grade="deepseek_grade")
BUILTIN_FIELDS = dict(question="problem", solution="solution", answer="answer", reasoning=None, grade=None)
# The graded attempts of an s1K-1.1 problem, (attempt column, grade column), tried in this order for the gold
# answer after the expert's own attempt.
GRADED_ATTEMPTS = [("deepseek_attempt", "deepseek_grade"), ("gemini_attempt", "gemini_grade")]


class DataError(ValueError):
    """Bad input; the message names the file, the line or record, and the field."""


# ----------------------------------------------------------------------------------------------------
# Reading

def load_records(path):
    """(records, locations, names): locations[i] says where record i is, for error messages; names[i] is the
    id of a record that has none (its file's name). A folder is read file by file (trajectories.py)."""
    path = Path(path)
    if path.suffix == ".parquet" and path.is_file():
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), "
                            "or convert the file to JSONL") from None
        try:
            records = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises its own error types
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
        locations = [f"{path}, row {i + 1}" for i in range(len(records))]
        names = [f"{path.stem}-{i + 1}" for i in range(len(records))]
    else:  # JSON (one object, or a list), JSONL, or a folder of them
        records, locations, names = trajectories.read_json_records(path)
    if not records:
        raise DataError(f"{path}: empty input (no records)")
    for record, where in zip(records, locations):
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return records, locations, names


def read_records(path):
    """Records (dicts) of a JSONL, JSON (an object, or a list) or parquet file; the error names the file and
    line."""
    return load_records(path)[0]


def download_hf_dataset(name, filename=None):
    """Local path of one data file of a Hugging Face dataset (downloads it; needs network)."""
    try:
        from huggingface_hub import HfApi, hf_hub_download
    except ImportError:
        raise DataError("--hf-dataset needs huggingface_hub: pip install huggingface_hub") from None
    if filename is None:
        files = [f for f in HfApi().list_repo_files(name, repo_type="dataset")
                 if f.endswith((".parquet", ".jsonl", ".json"))]
        if not files:
            raise DataError(f"{name}: the dataset has no parquet, JSONL or JSON file")
        # prefer the training split, then parquet (the hub's own format)
        filename = min(files, key=lambda f: ("train" not in f, not f.endswith(".parquet"), f))
    return hf_hub_download(repo_id=name, filename=filename, repo_type="dataset")


# ----------------------------------------------------------------------------------------------------
# GSM8K's own format: {"question", "answer": "the worked solution, a line a step\n#### 18"}

CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations: "16 - 3 = <<16-3=13>>13"


def is_gsm8k(record):
    """A GSM8K record: a question and an answer whose worked solution ends with a "#### N" line."""
    answer = record.get("answer")
    return "question" in record and isinstance(answer, str) and re.search(r"(^|\n)#### ", answer) is not None


def gsm8k_records(records, locations):
    """GSM8K's records as problems with numbered solutions: each line of the worked solution is one step ("1. ...",
    its calculator annotations removed), the gold answer is what follows "####" (thousands commas dropped, as
    GSM8K's own evaluation does), and the last step ends with "The answer is \\boxed{N}.", so that a model trained
    on the steps writes an answer the grader reads (on a line of its own)."""
    converted = []
    for index, (record, where) in enumerate(zip(records, locations)):
        worked = record.get("answer")
        if not isinstance(worked, str) or "####" not in worked:
            raise DataError(f"{where}: no '####' line in 'answer' (GSM8K's format: the worked solution, then "
                            "#### and the final answer)")
        body, _, final = worked.rpartition("####")
        answer = final.strip().replace(",", "")
        lines = [CALCULATOR.sub("", line).strip() for line in body.splitlines()]
        steps = [f"{k}. {line}" for k, line in enumerate((line for line in lines if line), 1)]
        if not steps or not answer:
            raise DataError(f"{where}: an empty worked solution or final answer in 'answer'")
        steps[-1] += f"\nThe answer is \\boxed{{{answer}}}."  # the expert's own line left as it was
        converted.append({"id": str(record.get("id", record.get("idx", index))), "problem": record["question"],
                          "solution": "\n".join(steps), "answer": answer})
    return converted


# ----------------------------------------------------------------------------------------------------
# Records -> problems

def _answer_text(value):
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 27.0 -> "27"
    return None if value is None else str(value).strip() or None


def graded_correct(grade):
    """An s1K-1.1 grade: "Yes" means the attempt is right; "No", empty or missing means it is not."""
    return isinstance(grade, str) and grade.strip().lower() == "yes"


def graded_answer(record, fields):
    """The last \\boxed{} answer of the first attempt graded correct (the expert's own attempt first, then the
    others of GRADED_ATTEMPTS), or None when no attempt graded correct has one."""
    attempts = [(fields["solution"], fields["grade"])] + [a for a in GRADED_ATTEMPTS if a[0] != fields["solution"]]
    for attempt, grade in attempts:
        if graded_correct(record.get(grade)):
            answer = last_boxed(text_of(record.get(attempt)))
            if answer:
                return answer
    return None


def normalize(records, fields, locations=None, correct_only=False):
    """Map raw records to {"id", "problem", "solution", "answer", "reasoning", "correct"}. fields: question,
    solution, answer (None: the boxed answer of an attempt graded correct on graded data, else
    'answer', else the solution's last \\boxed{}), reasoning and grade (optional). "correct" is the expert
    attempt's grade (True / False), None on ungraded data; correct_only makes a record without the grade column an
    error."""
    locations = locations or [f"record {i + 1}" for i in range(len(records))]
    problems, seen = [], set()
    for index, (record, where) in enumerate(zip(records, locations)):
        pid = str(record.get("id", index))
        if pid in seen:
            raise DataError(f"{where}: duplicate id {pid!r}")
        seen.add(pid)
        needed = [fields["question"], fields["solution"]] + ([fields["answer"]] if fields["answer"] else [])
        missing = [f for f in needed if f not in record]
        if missing:
            raise DataError(f"{where}: no field {', '.join(map(repr, missing))}; the record has: "
                            f"{', '.join(sorted(record)) or 'no fields'} "
                            "(map them with --question-field / --solution-field / --answer-field)")
        question, solution = text_of(record[fields["question"]]), text_of(record[fields["solution"]])
        if not question.strip():
            raise DataError(f"{where}: the field {fields['question']!r} is empty")
        graded = bool(fields.get("grade")) and fields["grade"] in record
        if correct_only and not graded:
            raise DataError(f"{where}: --correct-only needs graded attempts, and the record has no grade column "
                            f"{fields.get('grade')!r}; it has: {', '.join(sorted(record))} (map it with --grade-field)")
        if fields["answer"]:
            answer = _answer_text(record[fields["answer"]])
        elif graded:
            answer = graded_answer(record, fields)
        else:
            answer = _answer_text(record.get("answer")) or last_boxed(solution)
        reasoning = text_of(record.get(fields["reasoning"])) if fields["reasoning"] else None
        problems.append({"id": pid, "problem": question, "solution": solution, "answer": answer,
                         "reasoning": reasoning or None,
                         "correct": graded_correct(record[fields["grade"]]) if graded else None})
    return problems
