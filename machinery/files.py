"""
Reading and writing the project's files: one JSONL reader and one atomic writer for every stage. A bad line is an
InputError naming the file and the line; a write is all or nothing, so a kill or a full disk never leaves a file
half-written.
"""
import json
import os
import tempfile
from pathlib import Path


class InputError(ValueError):
    """Bad input from the user: the message is one line naming the flag, the file and line, or the field."""


def read_jsonl(path, fields=None, flag=None, torn_lines=None, with_lines=False):
    """The records (JSON objects) of a JSONL file, one per non-blank line. Raises InputError, naming the file and
    the line, for a missing or binary file, a line that is not JSON or not an object, or a record without what
    fields(record) asks ({name: type}, see check_fields). flag: the command-line flag that named the file, for the
    messages. torn_lines: a list that receives the numbers of lines that are not JSON (a write cut short by a kill)
    instead of raising. with_lines: (line number, record) pairs instead of records."""
    path = Path(path)
    named = f"{flag} {path}" if flag else str(path)
    if not path.is_file():
        hint = f"; run `python data_prep.py` first (it writes data/), or pass {flag}" if flag == "--data" else ""
        raise InputError(f"{named}: " + ("a folder, not a JSONL file" if path.is_dir() else f"not found{hint}"))
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"{named}: not a text file (JSONL)") from None
    records = []
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if torn_lines is not None:
                torn_lines.append(line_no)
                continue
            raise InputError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}:{line_no}: a JSON {type(record).__name__}, not an object with named fields")
        if fields:
            check_fields(record, fields(record), f"{path}:{line_no}")
        records.append((line_no, record) if with_lines else record)
    return records


def check_fields(record, fields, where):
    """Raise InputError if a record (where: "file:line") lacks one of `fields` ({name: type, or a tuple of types}),
    holds it empty or as another type. The message names the fields the record has."""
    for name, kind in fields.items():
        value = record.get(name)
        if value is None:
            raise InputError(f"{where}: no {name!r} field (the record has: {', '.join(record) or 'no field'})")
        if not isinstance(value, kind):
            kinds = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise InputError(f"{where}: {name!r} is a {type(value).__name__}, not a {kinds}")
        if value == "":
            raise InputError(f"{where}: {name!r} is empty")


def write_files(out_dir, texts):
    """Write text files ({name: text}) so that either all of them change or none does: each goes to a temporary
    file beside it first, and they are renamed into place only when all of them are written."""
    out_dir, temps = Path(out_dir), {}
    try:
        for name, text in texts.items():
            out_dir.mkdir(parents=True, exist_ok=True)
            fd, temps[name] = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(temps[name], 0o644)
    except BaseException:
        for tmp in temps.values():
            os.unlink(tmp)
        raise
    for name, tmp in temps.items():
        os.replace(tmp, out_dir / name)


def jsonl_text(records):
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def write_jsonl(path, records):
    """Write records as a JSONL file, atomically."""
    write_files(Path(path).parent, {Path(path).name: jsonl_text(records)})


def write_json(path, value):
    """Write one JSON value, indented, atomically."""
    write_files(Path(path).parent, {Path(path).name: json.dumps(value, indent=1, ensure_ascii=False) + "\n"})
