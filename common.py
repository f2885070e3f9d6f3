"""
What the training stages share: refusing bad input, checkpoints and --resume, torchrun, the GPU memory estimate
(after nanochat's nanochat/common.py). model.py holds the network, the sampler, the log-probs and the loading and
saving of a Hugging Face folder; this file builds on it, and model.py never imports it.

    1. Refusing bad input: every stage checks its flags, data, model and run folder before any process group forms
       or any weight loads; a mistake ends the program at once, in one line, with nothing written (refuse).
    2. The run folder, checkpoints and --resume: check_run_folder, start_run, save_checkpoint.
    3. Several processes (torchrun): init_distributed, gather, sum_gradients, shard, print0, ...; without torchrun's
       variables each is the single-process identity.
    4. The GPU memory of a training step, estimated before any weight loads (estimate_memory, plan_memory).
"""
import json
import os
import random
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from model import ALIASES, ModelConfig, build_tiny, checkpoint_folder, save_model, weight_files

# -----------------------------------------------------------------------------------------------------------------
# 1. Refusing bad input


def refuse(message):
    """End the program on a user error: one line in argparse's style (`prog: error: message`) on stderr and exit
    status 2, as argparse does for a flag it cannot parse; no traceback (a bug still shows one). Under torchrun
    every process meets the same error, and rank 0 alone prints it."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def first_line(error):
    """An exception's message cut to one line (some libraries write paragraphs)."""
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__


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


# -----------------------------------------------------------------------------------------------------------------
# 2. The run folder, checkpoints and --resume. A training stage writes last/ (weights plus training_state.pt, all
# that --resume needs to continue exactly), best/ and metrics.jsonl in --out.

RUN_PIECES = ("last", "best", "metrics.jsonl", "format_check.json")  # what a training stage writes in --out


def check_run_folder(args, state_keys):
    """--out, --resume and --overwrite, checked before anything is written; returns --resume's training state (None
    for a new run), whose plan (the interrupted run's resolved flags) has then replaced the command line's, each
    flag it overrides printed. Refused: --out naming a file; a folder that already holds a run (last/, best/ or a
    non-empty metrics.jsonl) unless --resume continues it or --overwrite starts again (start_run deletes the old one,
    once the new run has loaded); --resume without a readable training state holding state_keys. The checkpoint's
    other files are checked by read_config."""
    out = Path(args.out)
    if args.resume and args.overwrite:
        refuse("--resume continues the run in --out and --overwrite starts it again: give one of them")
    check_folder(out)
    if not args.resume:
        metrics = out / "metrics.jsonl"
        held = [name for name in ("last", "best") if (out / name).exists()]
        held += ["metrics.jsonl"] if metrics.is_file() and metrics.stat().st_size else []
        if held and not args.overwrite:
            refuse(f"--out {out} already holds a run ({', '.join(held)}): add --resume to continue it, or "
                   f"--overwrite to start again (deletes it)")
        return None
    file = out / "last" / "training_state.pt"
    if not file.is_file():
        refuse(f"--resume: {file} not found: no run to continue in {out} ("
               + ("--overwrite starts again)" if any((out / name).exists() for name in RUN_PIECES) else
                  "leave out --resume to start one)"))
    try:
        state = load_training_state(out / "last")
    except Exception as e:  # truncated or damaged: torch raises RuntimeError, EOFError, pickle's errors, ...
        refuse(f"--resume: {file} cannot be read ({first_line(e)}); nothing in {out} was changed")
    missing = [key for key in state_keys if key not in state] if isinstance(state, dict) else list(state_keys)
    if missing:
        refuse(f"--resume: {file} is not a training state of this stage (it lacks {', '.join(missing)})")
    for name, value in state["args"].items():  # the same plan as the interrupted run, whatever the flags say
        if getattr(args, name, None) not in (None, value):
            print0(f"--resume: --{name.replace('_', '-')} {value} from the checkpoint (not {getattr(args, name)})")
        setattr(args, name, value)
    return state


def load_training_state(path):
    """The training_state.pt of a checkpoint folder, or None. Read with weights_only=True: tensors, numbers,
    strings and containers only, never arbitrary pickled objects."""
    file = Path(path) / "training_state.pt"
    return torch.load(file, weights_only=True) if file.exists() else None


def start_run(out, model, optimizer, state, overwrite):
    """The moment a run starts to write, once its model has loaded. On --resume the optimizer (sharded again under
    FSDP) and every random generator continue from the training state; under --overwrite the earlier run goes
    (RUN_PIECES, nothing else in the folder). Returns metrics.jsonl open for appending, emptied for a new run and on
    --resume cut back to the checkpoint's step (the steps after it are redone); on ranks other than 0, os.devnull,
    so that every process may write its line and rank 0's alone is kept."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    if state is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        random.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    if get_rank() != 0:
        return open(os.devnull, "w")
    out = Path(out)
    if overwrite:  # the earlier run goes only now, when the new one has loaded and is about to write
        for path in [out / name for name in RUN_PIECES]:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    metrics, tmp = out / "metrics.jsonl", out / "metrics.jsonl.tmp"
    kept = []
    if state is not None and metrics.exists():
        kept = [line for line in metrics.read_text().splitlines() if line and json.loads(line)["step"] <= state["step"]]
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(metrics)
    return open(metrics, "a", encoding="utf-8")


def save_checkpoint(model, tokenizer, folder, optimizer=None, plan=None, **progress):
    """A Hugging Face folder; with an optimizer, plus training_state.pt holding all that --resume needs to continue
    exactly: the optimizer, every RNG state, the run's plan (the resolved flags) and the loop's progress (step,
    position, ...). Under torchrun every process calls it (FSDP gathers the shards of the weights and of AdamW's
    states, keyed by parameter name, so a run can resume on another number of processes); rank 0 alone writes."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=whole)
    state = None
    if optimizer is not None:
        rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = dict(progress, optimizer=get_optimizer_state_dict(model, optimizer, options=whole), rng=rng, args=plan)
    if get_rank() == 0:
        save_model(model, tokenizer, folder, training_state=state, state_dict=weights)


# -----------------------------------------------------------------------------------------------------------------
# 3. Several processes (torchrun): each rank takes every world-th piece of the work, gradients are summed, rank 0
# writes. Without torchrun's variables every helper is the single-process identity.


def init_distributed(device):
    """Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set), join the process group (NCCL on CUDA, gloo on CPU) and
    return (rank, world size, this process's device: cuda:LOCAL_RANK); else (0, 1, device)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    if str(device).startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def end_distributed():
    """Leave the process group at the end of a run (a process that exits without it may abort in teardown)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs)


def gather(obj):
    """Every process's `obj` (any picklable value), in rank order, on every process."""
    if not dist.is_initialized():
        return [obj]
    objects = [None] * get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


def broadcast(obj):
    """Rank 0's `obj` on every process."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_across(values):
    """Element-wise sums over the processes of a list of numbers (logged statistics)."""
    if not dist.is_initialized():
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(total)
    return total.tolist()


def sum_gradients(model):
    """Sum every gradient over the processes: the all-reduce that DistributedDataParallel does, written out
    because the losses call hidden_states, not forward. Each process's loss is its share of a mean over the
    whole batch, so the sum is the batch's gradient."""
    if dist.is_initialized():
        for p in model.parameters():
            if p.grad is None:  # a process with nothing to train on this step still takes part
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)


def shard(model, precision):
    """FSDP2: each process keeps 1/world of every parameter, gradient and AdamW state. Each layer is gathered whole
    for its forward and backward (in bf16 under --precision bf16) and its gradients are reduce-scattered in fp32;
    the embedding, final norm and output layer form the root unit. hidden_states is registered as a forward, so
    the root's gathering hooks run for it too. FSDP averages the gradients of the processes. In bf16 the layers
    then compute on bf16 weights (a bf16 residual stream) rather than under autocast: close to one process's
    numbers, not equal; in fp32 they agree to rounding."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else None,
                                 reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mixed)
    fully_shard(model, mp_policy=mixed)
    register_fsdp_forward_method(model, "hidden_states")
    return model


@torch.no_grad()
def copy_weights(target, source):
    """Copy source's parameters into target's (same architecture), casting to target's dtype: how the bf16
    sampling copy takes the fp32 trainer's weights after each update. Under FSDP every process calls it: each
    sharded parameter is gathered whole (full_tensor)."""
    for p_target, p_source in zip(target.parameters(), source.parameters()):
        p_target.copy_(p_source.full_tensor() if hasattr(p_source, "full_tensor") else p_source)


# -----------------------------------------------------------------------------------------------------------------
# 4. GPU memory of a training step, estimated from the configuration and the settings (before any weight is loaded)

GiB = 2 ** 30


def layer_parameters(cfg: ModelConfig):
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    weights = h * q + 2 * h * kv + q * h + 3 * h * cfg.intermediate_size + 2 * h
    return weights + (q + 2 * kv) * cfg.qkv_bias + h * cfg.o_bias


def parameter_count(cfg: ModelConfig):
    embeddings = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_embeddings else 2)
    return embeddings + cfg.num_layers * layer_parameters(cfg) + cfg.hidden_size  # + the final norm


def activation_bytes_per_token(cfg: ModelConfig, precision="bf16", masked=True, checkpointing=False):
    """Bytes that autograd keeps per token of a training forward (hidden_states), as the tests measure with
    saved-tensor hooks. masked: packed groups, where attention repeats the KV heads."""
    h, i, q = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim
    kv = q if masked else cfg.num_kv_heads * cfg.head_dim
    if precision == "bf16":
        # per layer: two RMSNorms keep their fp32 input and output; autocast keeps its own bf16 copy of the input
        # of each of the q, k, v, gate and up projections; attention keeps q, k, v and its output (o_proj's input);
        # the MLP keeps gate, up, silu(gate) and their product
        layer = 2 * 2 * 4 * h + 5 * 2 * h + 2 * (2 * q + 2 * kv) + 4 * 2 * i
    else:  # the same in fp32, where q/k/v and gate/up share one input and o_proj's input is a copy
        layer = 2 * 2 * 4 * h + 3 * 4 * h + 4 * (2 * q + 2 * kv) + 4 * 4 * i
    final_norm = 2 * 4 * h
    if checkpointing:  # each layer keeps its input; backward rebuilds one layer at a time
        return cfg.num_layers * 4 * h + final_norm + layer
    return cfg.num_layers * layer + final_norm


def estimate_memory(cfg: ModelConfig, precision="bf16", micro_batch_tokens=8192, checkpointing=False,
                    sample_rows=0, sample_length=0, logits_chunk=512, reference=False, shards=1):
    """Peak GPU memory of one training step in bytes, by part. Always held: fp32 master weights, their gradients
    and AdamW's two moments (each divided by `shards` under FSDP, which also holds the units it has gathered), in
    bf16 autocast's copy of the weights, and for RL (sample_rows > 0) the bf16 sampling copy. Then the larger of
    the two phases, which never overlap: sampling (a KV cache of sample_rows x sample_length positions, and the
    last position's logits) and the update (the activations of a micro-batch of micro_batch_tokens positions, its
    packing mask, the output layer's chunk of logits_chunk tokens). reference: a frozen fp32 copy for the KL term
    (--beta > 0)."""
    n = parameter_count(cfg)
    bf16 = precision == "bf16"
    kv_bytes = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * (2 if bf16 else 4)  # per position
    parts = {
        "weights": 4 * n / shards, "gradients": 4 * n / shards, "adamw": 8 * n / shards,
        "autocast_copy": 2 * n if bf16 and shards == 1 else 0,
        # FSDP instead gathers whole weights a unit at a time: the root (embedding, output layer) and two layers
        "fsdp_gathered": (2 if bf16 else 4) * (n - cfg.num_layers * layer_parameters(cfg) + 2 * layer_parameters(cfg))
        if shards > 1 else 0,
        "sampling_copy": (2 if bf16 else 4) * n if sample_rows and (bf16 or shards > 1) else 0,
        "reference": 4 * n if reference else 0,
        # sampling: the cache, and per row the fp32 logits, their softmax and the float64 CDF of the next token
        "kv_cache": sample_rows * (sample_length * kv_bytes + 16 * cfg.vocab_size),
        "activations": micro_batch_tokens * activation_bytes_per_token(cfg, precision, True, checkpointing)
        + 2 * micro_batch_tokens ** 2,  # + the bf16 packing mask, one [T, T] for the whole micro-batch
        # logits (bf16 and fp32), divided by the temperature, log-softmax, and in backward their gradients
        "logits": logits_chunk * cfg.vocab_size * 24,
    }
    fixed = sum(v for k, v in parts.items() if k not in ("kv_cache", "activations", "logits"))
    parts["peak"] = fixed + max(parts["kv_cache"], parts["activations"] + parts["logits"])
    return parts


def gpu_memory(device):
    """Total memory of a CUDA device in bytes; None for any other device."""
    device = torch.device(device)
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def plan_memory(cfg, args, capacity, sample_rows=0, sample_length=0, shards=1):
    """Before any weight loads: estimate the step's peak memory. With --activation-checkpointing left unset it is
    switched on only when the step needs it (above 85% of the card). Prints the estimate; a step that cannot fit
    (above 90%) stops the run with the flags to change. capacity: the card's bytes, None on CPU (nothing done)."""
    if capacity is None:
        args.activation_checkpointing = bool(args.activation_checkpointing)
        return None

    def estimate(checkpointing):
        return estimate_memory(cfg, args.precision, args.micro_batch_tokens, checkpointing, sample_rows,
                               sample_length, reference=getattr(args, "beta", 0) > 0, shards=shards)

    parts = estimate(bool(args.activation_checkpointing))
    if args.activation_checkpointing is None:
        args.activation_checkpointing = parts["peak"] > 0.85 * capacity
        if args.activation_checkpointing:
            print0(f"activation checkpointing on: without it the step needs {parts['peak'] / GiB:.1f} GiB")
            parts = estimate(True)
    print0(f"GPU memory estimate: {parts['peak'] / GiB:.1f} of {capacity / GiB:.1f} GiB ("
          + ", ".join(f"{k} {v / GiB:.1f}" for k, v in parts.items() if v and k != "peak") + ")")
    if parts["peak"] > 0.9 * capacity:
        fixed = parts["peak"] - max(parts["kv_cache"], parts["activations"] + parts["logits"])
        if fixed > 0.75 * capacity:
            change = f"the weights, gradients and AdamW states alone take {fixed / GiB:.1f} GiB"
        elif parts["kv_cache"] > parts["activations"] + parts["logits"]:
            change = "fewer rollouts sampled at once (--batch-prompts, --group-size, --max-new-tokens)"
        else:
            change = "a smaller --micro-batch-tokens, or --activation-checkpointing"
        refuse(f"this step needs about {parts['peak'] / GiB:.1f} GiB, more than 90% of the {capacity / GiB:.1f} "
               f"GiB card: {change}; or shard the model over several GPUs with torchrun and --fsdp")
    return parts
