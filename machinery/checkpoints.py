"""
A run's checkpoints: Hugging Face folders (model.save_model's) that are written whole or not at all, with what
--resume needs beside them (training_state.pt) and, under LoRA, the adapters alone in PEFT's format (adapter/).

    save_checkpoint      last/ or best/ of a run: under torchrun every process calls it, rank 0 writes
    write_checkpoint     a folder written beside its place and renamed into it; recover_checkpoint finishes the
                         swap that a kill interrupted
    save_adapter, load_adapter, load_training_state
"""
import json
import os
import random
import shutil
from pathlib import Path

import torch

from grpo import get_rank
from model import ALIASES, save_model

COMPLETE = ".complete"  # written last into a checkpoint folder: the files before it are whole
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # PEFT's names


def save_checkpoint(model, tokenizer, folder, optimizer=None, flags=None, **progress):
    """A Hugging Face folder; with an optimizer, plus training_state.pt holding all that --resume needs to continue
    exactly: the optimizer, every RNG state, the run's flags (`flags`, a dict) and the loop's progress (step,
    position, ...). Under torchrun every process calls it (FSDP gathers the shards of the weights and of AdamW's
    states, keyed by parameter name, so a run can resume on another number of processes); rank 0 alone writes. A
    full disk raises OSError, the previous checkpoint intact."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=whole)
    state = None
    if optimizer is not None:
        rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = dict(progress, optimizer=get_optimizer_state_dict(model, optimizer, options=whole), rng=rng,
                     args=dict(flags or {}))
    if get_rank() == 0:
        write_checkpoint(model, tokenizer, folder, state, weights)


def write_checkpoint(model, tokenizer, path, training_state=None, state_dict=None):
    """save_model's folder, plus training_state.pt when given, and a LoRA model's adapters in adapter/ beside its
    merged weights; written beside `path` and renamed into place, so that a kill or a full disk never leaves a
    half-written checkpoint (recover_checkpoint finishes a swap that a kill interrupted)."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_model(model, tokenizer, tmp, state_dict=state_dict)
        if model.lora:
            save_adapter(model, state_dict or model.state_dict(), tmp / "adapter")
        if training_state is not None:
            torch.save(training_state, tmp / "training_state.pt")
        (tmp / COMPLETE).touch()  # last: every file before it is whole
    except BaseException:  # a full disk, a kill: the previous checkpoint stays as it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # A folder cannot be replaced in one step: the old one steps aside, the new one takes its name. A kill between
    # the two renames leaves both whole, and recover_checkpoint finishes the swap.
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoint(path):
    """After a kill in write_checkpoint, put the newest whole checkpoint back at `path` (a folder only ever takes
    that name whole, by a rename): the new one if it was written to the end (path.tmp holds COMPLETE), else the
    previous one (path, or path.old between the renames). Removes the leftovers; returns what it did, in words, or
    None."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    done = None
    if (tmp / COMPLETE).is_file():
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        done = f"finished the save of {path} that a stop interrupted"
    elif not path.exists() and old.is_dir():
        os.replace(old, path)
        done = f"put back {path}, which a stop during a save had moved aside"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return done


def load_training_state(path):
    """The training_state.pt of a checkpoint folder, or None. Read with weights_only=True: tensors, numbers,
    strings and containers only, never arbitrary pickled objects."""
    file = Path(path) / "training_state.pt"
    return torch.load(file, weights_only=True) if file.exists() else None


def peft_name(name):
    """PEFT's key of one of our adapters: model.layers.0.self_attn.q_proj.lora_A ->
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight."""
    return f"base_model.model.{name}.weight"


def save_adapter(model, state, folder):
    """adapter_config.json and adapter_model.safetensors, as PEFT writes them, so that
    peft.PeftModel.from_pretrained(<the base model>, folder) is the trained model."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True)
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=model.lora["rank"], lora_alpha=model.lora["alpha"],
                  target_modules=LORA_TARGETS, lora_dropout=0.0, bias="none", fan_in_fan_out=False,
                  init_lora_weights=True, use_rslora=False, use_dora=False, inference_mode=True,
                  base_model_name_or_path=ALIASES.get(model.lora["base"], model.lora["base"]))
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    adapters = {peft_name(name): value.detach().contiguous().cpu() for name, value in state.items()
                if ".lora_" in name}
    save_file(adapters, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def load_adapter(model, folder):
    """Read adapter/ (save_adapter's files) into a model that has added adapters of the same rank."""
    from safetensors.torch import load_file
    stored = load_file(str(Path(folder) / "adapter_model.safetensors"))
    ours = {peft_name(name): p for name, p in model.named_parameters() if ".lora_" in name}
    if stored.keys() != ours.keys() or any(stored[k].shape != p.shape for k, p in ours.items()):
        raise ValueError(f"{folder}: the adapters do not match the model's (rank {model.lora['rank']})")
    with torch.no_grad():
        for key, p in ours.items():
            p.copy_(stored[key])
