"""
The run plumbing the training stages share (after nanochat's nanochat/common.py), kept out of the files that hold
the paper's ideas: the setup every stage starts with, the run folder with its checkpoints and --resume, and torchrun.

    1. The setup. prepare_run: the device, the run folder, the model's configuration and the flags its size class
       fills in, before any weight loads. load_for_training: the model, the policy that samples and the frozen
       reference, placed for the precision and for FSDP. For srl.py and rlvr.py also check_rl_arguments (flags and
       data), start_rl_run (torchrun, the seed, the memory plan), drop_long_prompts and validation_sample.
    2. The run folder, checkpoints and --resume. One rule says what --resume restores: every flag of the
       interrupted run except RUNTIME_FLAGS. check_run_folder puts back a checkpoint a stop left mid-save and reads
       the training state; save_checkpoint writes last/ or best/.
    3. Several processes (torchrun): init_distributed, gather, on_rank_zero, sum_across, sum_gradients, shard,
       copy_weights. Without torchrun's variables each is the single-process identity.

Below it: checks.py (refusing bad input), memory.py (the memory estimate and the plan), model.py, engine.py. Above
it: run.py (the logs, stopping and the GRPO loop's Run), then sft.py, grpo.py with srl.py and rlvr.py.
"""
import copy
import math
import os
import random
from pathlib import Path

import torch
import torch.distributed as dist

from checks import (check_device, check_flags, check_folder, check_report_to, first_line, print0, read_config,
                    read_jsonl, refuse)
from memory import GB, PUBLISHED_SHAPES, gpu_memory, is_small_model, parameter_count, plan_memory
from model import ALIASES, ModelConfig, encode_chat, load_adapter, load_model, recover_checkpoint, save_model

# -----------------------------------------------------------------------------------------------------------------
# 1. The setup: everything a training stage does before its first step


# LoRA's learning rate is about 10 times full fine-tuning's best, at every size ("LoRA Without Regret", Schulman et
# al., Thinking Machines Lab, 2025): a stage's default learning rate is multiplied by this under --lora-rank
LORA_LR_SCALE = 10


def prepare_run(args, state_keys, small_defaults, large_defaults):
    """The start of every training stage, before any process group forms or any weight loads: the device; --out,
    --resume and --overwrite (on --resume the checkpoint's plan replaces the flags, each change printed); the model's
    configuration, its files checked whole (under LoRA the base's: --model, on --resume too); the flags left at
    None, from the model's size class (is_small_model); the precision (bf16 on a GPU, fp32 on CPU). Returns
    (training state or None, model config). Each user error ends the program in one line (checks.refuse)."""
    check_device(args.device)
    fsdp = getattr(args, "fsdp", False)
    if fsdp and "RANK" not in os.environ:
        refuse("--fsdp shards the model over torchrun's processes: launch with torchrun --nproc_per_node N")
    state = check_run_folder(args, state_keys)
    check_report_to(args)
    lora_rank = getattr(args, "lora_rank", 0) or 0  # (on --resume, the checkpoint's)
    check_flags(args, ["lora_rank"], lambda v: v >= 0, "0 (full fine-tuning) or more")
    check_flags(args, ["lora_alpha"], lambda v: 0 < v < math.inf, "above 0")
    if lora_rank and fsdp:
        refuse("--lora-rank with --fsdp: LoRA trains on one GPU (its frozen base is not sharded); leave out --fsdp")
    if lora_rank and state:
        adapter = Path(args.out) / "last" / "adapter" / "adapter_model.safetensors"
        if not adapter.is_file():
            refuse(f"--resume: {adapter} not found: {Path(args.out) / 'last'} holds no LoRA adapters to continue")
        if not Path(str(args.model)).exists() and str(args.model) not in ALIASES and str(args.model).count("/") != 1:
            refuse(f"--resume: the base model of this LoRA run, {args.model}, is gone (its adapters in "
                   f"{adapter.parent} train on it); put it back where it was")
    check_flags(args, ["gpu_memory"], lambda v: 0 < v < math.inf, "above 0 (GB)")
    if getattr(args, "plan_only", False) and str(args.model) in PUBLISHED_SHAPES:  # a plan needs no weights, no hub
        config = ModelConfig.from_hf(PUBLISHED_SHAPES[str(args.model)])
    else:
        config = read_config(Path(args.out) / "last" if state and not lora_rank else args.model)
    defaults = small_defaults if is_small_model(config) else large_defaults
    if lora_rank:
        defaults = dict(defaults, lr=defaults["lr"] * LORA_LR_SCALE)
        args.lora_alpha = args.lora_alpha or 2.0 * lora_rank
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    on_a_card = torch.device(args.device).type == "cuda" or getattr(args, "gpu_memory", None)
    args.precision = args.precision or ("bf16" if on_a_card else "fp32")
    return state, config


def load_for_training(args, state, sampling=False, base=None):
    """(model, tokenizer, policy, reference), ready for the first step. Full fine-tuning: fp32 master weights
    (AdamW's updates of lr 5e-7 would vanish in bf16) from --model, or on --resume from <out>/last, sharded under
    --fsdp. LoRA (--lora-rank): the frozen base from --model on every start (bf16 under --precision bf16), fp32
    adapters on every block's linear layers, on --resume read from <out>/last/adapter. base: (model, tokenizer) to
    start from instead of loading --model (sft.py's fitted tiny). Activation checkpointing as planned.
    With sampling (RL), policy is what samples: the model itself in fp32 or under LoRA (the bf16 base reads the
    adapters in place), else a copy (bf16 under --precision bf16, whole under FSDP, whose trainer holds shards) that
    copy_weights refreshes after each update. With --beta > 0, reference is the frozen starting model: under LoRA the
    model itself, its adapters switched off for the KL term (model.adapters_off); else a frozen copy."""
    lora = getattr(args, "lora_rank", 0) > 0
    if lora:
        dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        model, tokenizer = base or load_model(str(args.model), device=args.device, dtype=dtype)
        model.to(device=args.device, dtype=dtype).add_lora(args.lora_rank, args.lora_alpha, base=str(args.model))
        if state:
            load_adapter(model, Path(args.out) / "last" / "adapter")
    elif base is not None and state is None:
        model, tokenizer = base
        model.to(device=args.device, dtype=torch.float32)
    else:
        source = Path(args.out) / "last" if state else args.model
        model, tokenizer = load_model(str(source), device=args.device, dtype=torch.float32)
    model.activation_checkpointing = args.activation_checkpointing
    fsdp = getattr(args, "fsdp", False)
    policy = model
    if sampling and not lora and (args.precision == "bf16" or fsdp):
        policy = copy_model(model, torch.bfloat16 if args.precision == "bf16" else torch.float32)
    reference = None
    if getattr(args, "beta", 0) > 0:
        reference = model if lora else copy_model(model, torch.float32).requires_grad_(False)
    if fsdp:
        shard(model, args.precision)
    return model, tokenizer, policy, reference


def copy_model(model, dtype):
    """A separate copy of the network in dtype (the stop tokens and the settings come along)."""
    return copy.deepcopy(model).to(dtype)


# the GRPO loop's flags that count things, and what else each must be (srl.py and rlvr.py)
RL_COUNTS = ["batch_prompts", "max_new_tokens", "max_draws", "sample_batch", "updates_per_batch", "micro_batch_tokens",
             "max_prompt_tokens", "max_steps", "val_limit", "save_every"]


def check_rl_arguments(args, fields=None):
    """The GRPO loop's flags and data, after prepare_run: every record of --data and of the validation file holding
    fields(record), when fields is given (under --plan-only a missing --data is no error: the plan does not need
    it). Returns (examples, validation examples)."""
    check_flags(args, RL_COUNTS, lambda v: v >= 1, "at least 1")
    check_flags(args, ["group_size"], lambda v: v >= 2, "at least 2 (one rollout alone has no spread: no group would "
                "ever be kept)")
    check_flags(args, ["temperature"], lambda v: 0 < v < math.inf, "above 0 (at 0 every rollout of a prompt is the "
                "same: no group would ever be kept)")
    check_flags(args, ["lr", "epochs", "grad_clip"], lambda v: 0 < v < math.inf, "above 0")
    check_flags(args, ["clip_low"], lambda v: 0 <= v < 1, "in [0, 1)")
    check_flags(args, ["clip_high", "beta", "eval_every", "log_samples"], lambda v: 0 <= v < math.inf, "0 or more")
    check_flags(args, ["tis_cap"], lambda v: v == 0 or 1 <= v < math.inf, "0 (off), or 1 or more")
    check_flags(args, ["std_threshold"], math.isfinite, "a number")
    if args.plan_only and not Path(args.data).is_file():
        return [], []
    examples = read_jsonl(args.data, fields)
    if not examples:
        refuse(f"--data {args.data}: no examples in it")
    val_path = args.val_data or str(args.data).replace("_train", "_val")
    val_examples = []
    if args.val_data or (Path(val_path).exists() and val_path != str(args.data)):
        val_examples = read_jsonl(val_path, fields, flag="--val-data")
    return examples, val_examples


def planned_steps(args, num_examples):
    """--max-steps, or else the steps that make --epochs passes over the training prompts."""
    return args.max_steps or math.ceil(args.epochs * num_examples / args.batch_prompts)


def card_memory(args):
    """The bytes of the card a run plans for: --gpu-memory GB, else the card of --device (None on CPU)."""
    return args.gpu_memory * GB if getattr(args, "gpu_memory", None) else gpu_memory(args.device)


def start_rl_run(args, cfg, num_examples):
    """What the GRPO loop does once its input is checked and before any weight loads: torchrun's process group
    (init_distributed), the seed, the run in one line, then the memory plan of a step (memory.plan_memory: the
    settings that fit the card, or the flag to change). Under --plan-only the program ends here. Returns the
    plan."""
    _, world, args.device = init_distributed(args.device)
    torch.manual_seed(args.seed)
    size = "small" if is_small_model(cfg) else "large"
    steps = planned_steps(args, num_examples) if num_examples else "(by the data's length)"
    what = f"LoRA rank {args.lora_rank} (alpha {args.lora_alpha:g})" if args.lora_rank else "full fine-tuning"
    print0(f"plan: {parameter_count(cfg) / 1e6:.1f}M parameters ({size}-model defaults), {what}, {steps} steps of "
           f"{args.batch_prompts} prompts x G {args.group_size} = {args.batch_prompts * args.group_size} completions "
           f"of at most {args.max_new_tokens} tokens, lr {args.lr:g}, {args.precision}, seed {args.seed}, {world} "
           f"process{'es' if world > 1 else ''}{' (FSDP)' if args.fsdp else ''}")
    # the sampler's cache holds prompt + completion; s1K's SRL prompts are ~550 tokens at the median, ~1k at p90
    row = 1024 + args.max_new_tokens
    plan = plan_memory(cfg, args, card_memory(args), args.group_size, math.ceil(args.batch_prompts / world), row,
                       longest_row=row, shards=world if args.fsdp else 1)
    if args.plan_only:
        end_distributed()
        raise SystemExit(0)
    return plan


def drop_long_prompts(args, tokenizer, build_prompt, examples, val_examples):
    """(examples, val_examples) without those whose prompt exceeds --max-prompt-tokens: agent steps can carry
    long issues and outputs, and such a prompt would cost memory and time (or overflow the model's context)
    without teaching more. The count is printed, never silent."""
    kept = []
    for name, source in (("training", examples), ("validation", val_examples)):
        lengths = [len(encode_chat(tokenizer, build_prompt(ex))) for ex in source]
        short = [ex for ex, n in zip(source, lengths) if n <= args.max_prompt_tokens]
        if len(short) < len(source):
            print0(f"dropped {len(source) - len(short)} of {len(source)} {name} examples whose prompt is over "
                   f"--max-prompt-tokens {args.max_prompt_tokens} (longest: {max(lengths)} tokens)")
        kept.append(short)
    if not kept[0]:
        refuse(f"every training prompt is over --max-prompt-tokens {args.max_prompt_tokens}")
    return kept[0], kept[1]


def validation_sample(examples, limit, seed):
    """The validation examples scored: a seeded sample spread over as many held-out problems as possible (one
    example of every problem, in a seeded order, before any problem gives a second). The first examples of the
    file would be consecutive steps of a few problems. It depends only on the file and the seed, so every
    evaluation of a run, resumed or not, scores the same examples."""
    rng = random.Random(seed)
    by_problem = {}
    for index, example in enumerate(examples):
        by_problem.setdefault(str(example.get("id", f"#{index}")), []).append(example)
    groups = list(by_problem.values())
    rng.shuffle(groups)
    for group in groups:
        rng.shuffle(group)
    rounds = [[group[k] for group in groups if k < len(group)] for k in range(max(map(len, groups), default=0))]
    return [example for round_ in rounds for example in round_][:limit]


# -----------------------------------------------------------------------------------------------------------------
# 2. The run folder, checkpoints and --resume. A training stage writes last/ (weights plus training_state.pt, all
# that --resume needs to continue exactly), best/ and metrics.jsonl in --out.

RUN_PIECES = ("last", "best", "metrics.jsonl", "samples.jsonl", "plan.json", "format_check.json",  # a stage's
              "tensorboard")  # files in --out
# The one rule of --resume: a checkpoint stores every resolved flag of its run, and --resume restores all of them
# but these, which say where and how the work runs, how long and how often it saves, not what it computes.
RUNTIME_FLAGS = ("resume", "overwrite", "device", "out", "max_steps", "eval_every", "save_every", "val_limit",
                 "sample_batch", "micro_batch_tokens", "activation_checkpointing", "fsdp", "gpu_memory", "plan_only",
                 "report_to", "log_samples")


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
    for name in ("last", "best"):  # a kill in the middle of a save: the newest whole checkpoint back in place
        note = recover_checkpoint(out / name) if out.is_dir() else None
        if note:
            print0(f"{out}: {note}")
    if not args.resume:
        metrics = out / "metrics.jsonl"
        held = [name for name in ("last", "best") if (out / name).exists()]
        held += ["metrics.jsonl"] if metrics.is_file() and metrics.stat().st_size else []
        if held and not args.overwrite and not getattr(args, "plan_only", False):
            refuse(f"--out {out} already holds a run ({', '.join(held)}): add --resume to continue it, or "
                   f"--overwrite to start again (deletes it)")
        return None
    file = out / "last" / "training_state.pt"
    if not file.is_file():
        if not any((out / name).exists() for name in RUN_PIECES):
            refuse(f"--resume: {file} not found: no run to continue in {out} (leave out --resume to start one)")
        if (out / "last").exists():
            refuse(f"--resume: {out / 'last'} holds no training state ({file.name}): it is not a checkpoint this "
                   "stage wrote, and nothing in it can be continued")
        # stopped before its first save of last/: nothing was kept to continue from, so the run starts again
        print0(f"--resume: {out} holds no last/ yet (the run stopped before its first save): it starts again from "
               "step 0, with the flags given")
        return None
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


def save_checkpoint(model, tokenizer, folder, optimizer=None, args=None, **progress):
    """A Hugging Face folder; with an optimizer, plus training_state.pt holding all that --resume needs to continue
    exactly: the optimizer, every RNG state, the run's plan (its resolved flags but RUNTIME_FLAGS) and the loop's
    progress (step, position, ...). Under torchrun every process calls it (FSDP gathers the shards of the weights
    and of AdamW's states, keyed by parameter name, so a run can resume on another number of processes); rank 0
    alone writes."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=whole)
    state = None
    if optimizer is not None:
        rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        plan = {name: value for name, value in vars(args).items() if name not in RUNTIME_FLAGS}
        state = dict(progress, optimizer=get_optimizer_state_dict(model, optimizer, options=whole), rng=rng, args=plan)
    if get_rank() == 0:
        try:
            save_model(model, tokenizer, folder, training_state=state, state_dict=weights)
        except OSError as e:  # a full disk, a quota: save_model left the previous checkpoint as it was
            refuse(f"could not write {folder} ({e.strerror or first_line(e)}); the previous checkpoint there is "
                   f"intact: free some space, then --resume continues from it")


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


def on_rank_zero(fn, *args):
    """fn(*args) computed by rank 0 alone (validation), its result received by every process."""
    return broadcast(fn(*args) if get_rank() == 0 else None)


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
    whole batch, so the sum is the batch's gradient. A model sharded by FSDP has averaged its gradients in backward
    (its reduce-scatter): they are multiplied by the number of processes."""
    from torch.distributed.fsdp import FSDPModule
    if not dist.is_initialized():
        return
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if isinstance(model, FSDPModule):
            if p.grad is not None:
                p.grad.mul_(get_world_size())
            continue
        if p.grad is None:  # a process with nothing to train on this step still takes part
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


def clip_gradients(model, max_norm):
    """Clip the gradients' global norm to max_norm; returns the norm before clipping, a float (under FSDP the norm
    over every process's shards)."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()


def shard(model, precision):
    """FSDP2: each process keeps 1/world of every parameter, gradient and AdamW state. Each layer is gathered whole
    for its forward and backward (in bf16 under --precision bf16) and its gradients are reduce-scattered in fp32
    (averaged: sum_gradients turns them into the sum); the embedding, final norm and output layer form the root
    unit. hidden_states is registered as a forward, so the root's
    gathering hooks run for it too. In bf16 the layers then compute on bf16 weights (a bf16 residual stream)
    rather than under autocast: close to one process's numbers, not equal; in fp32 they agree to rounding."""
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
