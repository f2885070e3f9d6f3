"""
Refusing bad input: every stage checks its flags, its data files, the model and the run folder before any process
group forms or any weight loads, and a mistake ends the program at once, in one line naming the flag, the file and
line, or the folder, with nothing written (refuse). A traceback instead is a bug.

    1. refuse and print0: an error in one line, and a line said once under torchrun.
    2. check_flags, check_folder, check_device, check_fields, read_jsonl: flags, folders, devices, JSONL records.
    3. read_config: a model's configuration, from an alias, a hub id or a folder, its weights' files checked whole.

It imports model.py only (the configuration and the aliases). The run folder and --resume are checked in common.py,
whether a step fits the card in memory.py.
"""
import json
import os
import sys
from pathlib import Path

import torch

from model import ALIASES, ModelConfig, build_tiny, checkpoint_folder, weight_files

# -----------------------------------------------------------------------------------------------------------------
# 1. What a stage tells its user: an error ends the program in one line (refuse); under torchrun rank 0 alone speaks


def refuse(message):
    """End the program on a user error: one line in argparse's style (`prog: error: message`) on stderr and exit
    status 2, as argparse does for a flag it cannot parse; no traceback (a bug still shows one). Under torchrun
    every process meets the same error, and rank 0 alone prints it."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def print0(*args, **kwargs):
    """print, on rank 0 alone under torchrun (every process runs the same code and would say the same)."""
    if os.environ.get("RANK", "0") == "0":
        print(*args, **kwargs)


def first_line(error):
    """An exception's message cut to one line (some libraries write paragraphs)."""
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__


# -----------------------------------------------------------------------------------------------------------------
# 2. Flags, folders, devices and data files


def check_flags(args, names, ok, must):
    """Refuse the first of the flags `names` whose value fails ok(value): "--lr -1: must be above 0". A flag still at
    None (its default, which depends on the model, comes later) is not checked."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and not ok(value):
            refuse(f"--{name.replace('_', '-')} {value}: must be {must}")


def check_folder(path, flag="--out"):
    """Refuse a folder to write in that cannot be one: it, or the nearest of its parents that exists, is a file."""
    existing = next(folder for folder in [Path(path), *Path(path).parents] if folder.exists())
    if not existing.is_dir():
        refuse(f"{flag} {path}: {existing} is a file, not a folder")


def check_device(device):
    """Refuse a --device that this machine does not have."""
    try:
        kind = torch.device(device)
    except RuntimeError:
        refuse(f"--device {device}: not a device (cpu, cuda, cuda:N)")
    if kind.type not in ("cpu", "cuda"):
        refuse(f"--device {device}: only cpu and cuda are supported")
    if kind.type == "cuda" and not torch.cuda.is_available():
        refuse(f"--device {device}: torch finds no CUDA GPU on this machine; use --device cpu")
    if kind.type == "cuda" and (kind.index or 0) >= torch.cuda.device_count():
        refuse(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), from cuda:0")


def check_fields(record, fields, where):
    """Refuse a record (where: "file:line") that lacks one of `fields` ({name: type, or a tuple of types}), holds it
    empty or as another type. The message names the fields the record has."""
    for name, kind in fields.items():
        value = record.get(name)
        if value is None:
            refuse(f"{where}: no {name!r} field (the record has: {', '.join(record) or 'no field'})")
        if not isinstance(value, kind):
            kinds = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            refuse(f"{where}: {name!r} is a {type(value).__name__}, not a {kinds}")
        if value == "":
            refuse(f"{where}: {name!r} is empty")


def read_jsonl(path, fields=None, flag="--data"):
    """The records of a JSONL file (data_prep.py's outputs). A missing file, a line that is not a JSON object, or a
    record without what the stage reads (fields(record) -> {name: type}, see check_fields) ends the program with a
    message that names the file and the line."""
    path = Path(path)
    if not path.is_file():
        refuse(f"{flag} {path}: " + ("a folder, not a JSONL file" if path.is_dir() else
                                     f"not found; run `python data_prep.py` first (it writes data/), or pass {flag}"))
    records = []
    with open(path, encoding="utf-8") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError:
            refuse(f"{flag} {path}: not a text file (JSONL)")
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            refuse(f"{path}:{line_no}: not valid JSON ({e})")
        if not isinstance(record, dict):
            refuse(f"{path}:{line_no}: a JSON {type(record).__name__}, not an object with named fields")
        check_fields(record, fields(record) if fields else {}, f"{path}:{line_no}")
        records.append(record)
    return records


# -----------------------------------------------------------------------------------------------------------------
# 3. The model: its configuration and its files, read before any weight is


def read_config(name_or_path):
    """The ModelConfig of a model, read before any weight is, once all that load_model will need is checked:
    `tiny`; a local folder (a checkpoint, or a run folder's best/ or last/) with a supported config.json, whole
    safetensors weights and a tokenizer; an alias or hub id, whose copy in the hub cache is checked like a folder,
    or whose config.json alone is fetched. Anything else ends the program with a message naming it (refuse)."""
    name = str(name_or_path)
    if name == "tiny":
        return build_tiny()[0].config
    if os.path.exists(name):
        folder = checkpoint_folder(name) if os.path.isdir(name) else None
        if folder is None:
            refuse(f"model {name}: " + ("no config.json in it, nor in best/ or last/: not a checkpoint or run folder"
                                        if os.path.isdir(name) else "a file, not a checkpoint folder"))
        return check_checkpoint(folder)
    repo_id = ALIASES.get(name, name)
    if repo_id.count("/") != 1 or name.startswith((".", "/", "~")):
        refuse(f"model {name}: no such folder, and not a hub id (owner/name) or an alias ({', '.join(ALIASES)})")
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:  # a copy in the hub cache: checked like a local folder, without the network
        folder = Path(snapshot_download(repo_id, local_files_only=True))
        if (folder / "config.json").is_file() and all((folder / f).is_file() for f in weight_files(folder)):
            return check_checkpoint(folder)
    except LocalEntryNotFoundError:
        pass
    try:  # one request first: offline, the download itself would retry for half a minute before failing
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"))
        folder = Path(hf_hub_download(repo_id, "config.json")).parent
    except Exception as e:  # offline, no such model, a gated one: the hub client's many error types
        what = f"model {name} ({repo_id})" if repo_id != name else f"model {name}: no such folder; as a hub id,"
        refuse(f"{what} not in the hub cache ({constants.HF_HUB_CACHE}), and fetching it from the hub failed "
               f"({first_line(e)}). Offline? Download it on a machine with a network (`hf download {repo_id}`) and "
               f"copy the cache here, or pass a checkpoint folder as --model")
    return check_config(folder / "config.json")


def check_config(path):
    """The ModelConfig of a config.json; refuse one that is not JSON or not of a supported architecture."""
    try:
        hf = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        refuse(f"{path}: not valid JSON ({e})")
    if not isinstance(hf, dict):
        refuse(f"{path}: not a model configuration (a JSON object)")
    try:
        return ModelConfig.from_hf(hf, source=str(path))
    except KeyError as e:
        refuse(f"{path}: no {e} field")
    except ValueError as e:  # from_hf's own messages: an architecture or a feature it does not support
        refuse(str(e))


def check_checkpoint(folder):
    """The ModelConfig of a checkpoint folder, once load_model is sure to read it: a supported config.json, every
    safetensors file of the weights present and whole (the header is read, not the tensors), a tokenizer."""
    from safetensors import SafetensorError, safe_open
    cfg = check_config(folder / "config.json")
    try:
        files = weight_files(folder)
    except (ValueError, KeyError) as e:
        refuse(f"{folder / 'model.safetensors.index.json'}: not a weight index ({first_line(e)})")
    for file in files:
        if not (folder / file).is_file():
            refuse(f"{folder / file}: missing; the checkpoint's weights are incomplete")
        try:
            with safe_open(str(folder / file), "pt"):
                pass
        except (SafetensorError, OSError) as e:
            refuse(f"{folder / file}: cannot be read ({first_line(e)}): truncated or damaged")
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        refuse(f"{folder}: no tokenizer (tokenizer.json, tokenizer_config.json)")
    return cfg


def check_report_to(args):
    """--report-to tensorboard needs the tensorboard package: refused in one line, before anything loads, if absent."""
    if getattr(args, "report_to", None) == "tensorboard":
        try:
            import torch.utils.tensorboard  # noqa: F401  (imports the tensorboard package)
        except ImportError:
            refuse("--report-to tensorboard needs the tensorboard package: pip install tensorboard")
