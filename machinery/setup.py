"""
The setup of a training stage, in one place: the command line is checked, completed and fixed here before any
process group forms or any weight loads, and what it decides is printed. This module and the stage scripts are
the only code that reads the command line (`args`) or ends the program; below them every function takes plain
values (grpo.GRPOConfig, machinery.run.RunSettings) and raises instead of exiting.

    1. refuse, refusing: a user error ends the program in one line (exit status 2), no traceback.
    2. add_training_flags: the flags sft.py, srl.py and rlvr.py share. RUNTIME_FLAGS: the one rule of --resume.
    3. resolve_training: the device, the run folder and --resume (the stored flags replace the command line's),
       the model's configuration, the flags its size class fills in, LoRA's alpha, the precision.
    4. The GRPO loop (srl.py, rlvr.py): start_rl_run (its flags and data, torchrun, the seed, the memory plan),
       grpo_config and run_settings (the values the loop reads), drop_long_prompts.
    5. load_for_training: the model, the policy that samples and the frozen reference.
"""
import argparse
import math
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from grpo import GRPOConfig
from machinery.checkpoints import load_adapter, load_training_state, recover_checkpoint
from machinery.checks import check_device, check_folder, first_line, local_model, print0, read_config
from machinery.distributed import copy_model, end_distributed, init_distributed, shard
from machinery.files import InputError, read_jsonl
from machinery.memory import GB, PUBLISHED_SHAPES, gpu_memory, is_small_model, parameter_count, plan_memory
from machinery.run import RUN_PIECES, RunSettings
from model import ALIASES, ModelConfig, load_model

# -----------------------------------------------------------------------------------------------------------------
# 1. Refusing


def refuse(message):
    """End the program on a user error: one line in argparse's style (`prog: error: message`) on stderr and exit
    status 2, as argparse does for a flag it cannot parse; no traceback (a bug still shows one). Under torchrun
    every process meets the same error, and rank 0 alone prints it."""
    print0(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


@contextmanager
def refusing():
    """Inside, the checks' InputError (a bad flag, file, line or folder) ends the program as refuse does."""
    try:
        yield
    except InputError as e:
        refuse(str(e))


def check_flags(args, names, ok, must):
    """Refuse the first of the flags `names` whose value fails ok(value): "--lr -1: must be above 0". A flag still at
    None (its default, which depends on the model, comes later) is not checked."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and not ok(value):
            refuse(f"--{name.replace('_', '-')} {value}: must be {must}")


# -----------------------------------------------------------------------------------------------------------------
# 2. The flags every training stage shares, and the one rule of --resume


def add_training_flags(parser, model_default, data_default, out_default, save_every):
    """The flags of sft.py, srl.py and rlvr.py alike. Those left at None are filled in by resolve_training, from
    the model's size class; a stage adds its own."""
    arg = parser.add_argument
    arg("--model", default=model_default, help="alias (tiny, qwen-1.5b, smollm2-135m, ...), hub id, checkpoint or "
        f"run folder (default: {model_default})")
    arg("--data", default=data_default, help="training JSONL from data_prep.py")
    arg("--val-data", default=None, help="validation JSONL (default: the _val file beside --data)")
    arg("--out", default=out_default, help="run folder: last/ (for --resume), metrics.jsonl, ...")
    arg("--lr", type=float, default=None, help="peak AdamW learning rate (default: by the model's size)")
    arg("--max-steps", type=int, default=None, help="optimiser steps (default: the stage's epochs)")
    arg("--micro-batch-tokens", type=int, default=None, help="positions per forward/backward pass (default: the "
        "memory plan's; 8192 on CPU)")
    arg("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
        help="recompute layers in backward: less memory, ~30%% more time (default: the memory plan's)")
    arg("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank on every linear layer of every "
        "block, the base frozen (0: full fine-tuning, as the paper)")
    arg("--lora-alpha", type=float, default=None, help="LoRA's scale is alpha / rank (default alpha: 2 x rank)")
    arg("--save-every", type=int, default=save_every, help="write <out>/last every N steps and at the end")
    arg("--max-skipped-steps", type=int, default=3, help="stop the run after this many steps in a row whose "
        "updates were all skipped for a non-finite loss or gradient (0: never)")
    arg("--report-to", choices=["none", "tensorboard"], default="none", help="also write the metrics and samples "
        "for TensorBoard, in <out>/tensorboard (needs pip install tensorboard)")
    arg("--resume", action="store_true", help="continue from <out>/last, with the flags stored there")
    arg("--overwrite", action="store_true", help="start again in an --out that holds a run, deleting it")
    arg("--gpu-memory", type=float, default=None, help="plan for a card of this many GB (2^30 bytes; default: the "
        "card present)")
    arg("--plan-only", action="store_true", help="print the memory plan and its estimate by part, and stop before "
        "any weight loads (works offline, without a GPU, for the aliases)")
    arg("--seed", type=int, default=0, help="seeds the data order and every sample")
    arg("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    arg("--precision", choices=["bf16", "fp32"], default=None, help="bf16: fp32 master weights, bf16 autocast (and "
        "for RL a bf16 sampling copy); the default on cuda. fp32: the default on cpu")
    return parser


# The one rule of --resume: a checkpoint stores every resolved flag of its run, and --resume restores all of them
# but these, which say where and how the work runs, how long and how often it saves, not what it computes.
RUNTIME_FLAGS = ("resume", "overwrite", "device", "out", "max_steps", "eval_every", "save_every", "val_limit",
                 "sample_batch", "micro_batch_tokens", "activation_checkpointing", "fsdp", "gpu_memory", "plan_only",
                 "report_to", "log_samples", "check_samples", "check_prompts")


def stored_flags(args):
    """The flags a checkpoint stores for --resume: every resolved one but RUNTIME_FLAGS."""
    return {name: value for name, value in vars(args).items() if name not in RUNTIME_FLAGS}


# -----------------------------------------------------------------------------------------------------------------
# 3. Resolving a training stage's command line

# LoRA's learning rate is about 10 times full fine-tuning's best, at every size ("LoRA Without Regret", Schulman et
# al., Thinking Machines Lab, 2025): a stage's default learning rate is multiplied by this under --lora-rank
LORA_LR_SCALE = 10


def resolve_training(args, state_keys, small_defaults, large_defaults):
    """The start of every training stage, before any process group forms or any weight loads: the device; --out,
    --resume and --overwrite (on --resume the checkpoint's flags replace the command line's, each change printed);
    the model's configuration, its files checked whole (under LoRA the base's: --model, on --resume too); the flags
    left at None, from the model's size class (is_small_model); the precision (bf16 on a GPU, fp32 on CPU). Returns
    (training state or None, model config); args then holds every decided value. Each user error ends the program
    in one line."""
    with refusing():
        check_device(args.device)
    if torch.device(args.device).type == "cpu":
        keep_freed_memory()
    fsdp = getattr(args, "fsdp", False)
    if fsdp and "RANK" not in os.environ:
        refuse("--fsdp shards the model over torchrun's processes: launch with torchrun --nproc_per_node N")
    state = check_run_folder(args, state_keys)
    if args.report_to == "tensorboard":
        try:
            from torch.utils import tensorboard  # noqa: F401  (imports the tensorboard package)
        except ImportError:
            refuse("--report-to tensorboard needs the tensorboard package: pip install tensorboard")
    lora_rank = args.lora_rank or 0  # (on --resume, the checkpoint's)
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
    with refusing():
        if not args.plan_only:  # smollm2-135m offline: the wheel's model (machinery/checks.py's local_model)
            args.model = local_model(args.model)
        if args.plan_only and str(args.model) in PUBLISHED_SHAPES:  # a plan needs no weights, no hub
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
    on_a_card = torch.device(args.device).type == "cuda" or args.gpu_memory
    args.precision = args.precision or ("bf16" if on_a_card else "fp32")
    return state, config


def keep_freed_memory():
    """Have glibc's malloc keep the memory the process frees for its next allocations, instead of handing it back
    to the kernel (Linux with glibc; elsewhere nothing). A training step on CPU allocates and frees gigabytes of
    activations; by default every block over 32 MB is mmap'ed and unmapped again, and the kernel zero-fills each page
    anew at its next first touch (docs/benchmarks.md measures what that cost). The process keeps its peak memory,
    which it reaches again every step."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # malloc.h
    libc.mallopt(M_MMAP_MAX, 0)  # every block from the heap, none mmap'ed alone
    libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)  # keep up to 2 GB free at the heap's top


def check_run_folder(args, state_keys):
    """--out, --resume and --overwrite, checked before anything is written; returns --resume's training state (None
    for a new run), whose flags (the interrupted run's resolved flags) have then replaced the command line's, each
    flag it overrides printed. Refused: --out naming a file; a folder that already holds a run (last/, best/ or a
    non-empty metrics.jsonl) unless --resume continues it or --overwrite starts again (the Run deletes the old one,
    once the new run has loaded); --resume without a readable training state holding state_keys. The checkpoint's
    other files are checked by read_config."""
    out = Path(args.out)
    if args.resume and args.overwrite:
        refuse("--resume continues the run in --out and --overwrite starts it again: give one of them")
    with refusing():
        check_folder(out)
    for name in ("last", "best"):  # a kill in the middle of a save: the newest whole checkpoint back in place
        if os.environ.get("RANK", "0") != "0":  # under torchrun rank 0 repairs it; the others wait, then read it
            wait_for_recovery(out / name)
            continue
        note = recover_checkpoint(out / name) if out.is_dir() else None
        if note:
            print0(f"{out}: {note}")
    if not args.resume:
        metrics = out / "metrics.jsonl"
        held = [name for name in ("last", "best") if (out / name).exists()]
        held += ["metrics.jsonl"] if metrics.is_file() and metrics.stat().st_size else []
        if held and not args.overwrite and not args.plan_only:
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
    for name, value in state["args"].items():  # the same flags as the interrupted run, whatever the command says
        if getattr(args, name, None) not in (None, value):
            print0(f"--resume: --{name.replace('_', '-')} {value} from the checkpoint (not {getattr(args, name)})")
        setattr(args, name, value)
    return state


def wait_for_recovery(path, seconds=300):
    """Under torchrun, a process other than rank 0 waits (no process group exists yet) until rank 0 has put the
    checkpoint `path` back whole (recover_checkpoint), so that no process reads a folder another is moving."""
    deadline = time.time() + seconds
    while time.time() < deadline and any(path.with_name(path.name + end).exists() for end in (".tmp", ".old")):
        time.sleep(0.1)


def card_memory(args):
    """The bytes of the card a run plans for: --gpu-memory GB, else the card of --device (None on CPU)."""
    return args.gpu_memory * GB if args.gpu_memory else gpu_memory(args.device)


def apply_plan(args, config, **shape):
    """The memory plan (machinery/memory.py) of a step of this shape: its settings written into the flags left at
    None (prompts sampled at once, micro-batch positions, activation checkpointing), its lines printed when there
    is a card to plan for (or --plan-only); a step that cannot fit refused, naming the flag to change. Returns the
    plan, which the run stores in plan.json."""
    plan, lines = plan_memory(config, card_memory(args), args.precision, args.lora_rank, getattr(args, "beta", 0.0),
                              args.micro_batch_tokens, args.activation_checkpointing,
                              getattr(args, "sample_batch", None), **shape)
    args.micro_batch_tokens = plan["micro_batch_tokens"]
    args.activation_checkpointing = plan["activation_checkpointing"]
    if shape.get("group_size"):
        args.sample_batch = plan["sample_batch"]
    if card_memory(args) or args.plan_only:
        for line in lines:
            print0(line)
    if "does_not_fit" in plan:
        refuse(plan["does_not_fit"])
    return plan


# -----------------------------------------------------------------------------------------------------------------
# 4. The GRPO loop's setup (srl.py, rlvr.py)

# the GRPO loop's flags that count things, and what else each must be
RL_COUNTS = ["batch_prompts", "max_new_tokens", "max_draws", "sample_batch", "updates_per_batch", "micro_batch_tokens",
             "max_prompt_tokens", "max_steps", "val_limit", "save_every"]


def start_rl_run(args, config, fields=None):
    """What the GRPO loop does once resolve_training has run and before any weight loads: its flags checked; every
    record of --data and of the validation file holding fields(record), when fields is given (under --plan-only a
    missing --data is no error); torchrun's process group; the seed; the run in one line; the memory plan of a step.
    Under --plan-only the program ends here. Returns (examples, validation examples, plan)."""
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
    examples, val_examples = [], []
    if not (args.plan_only and not Path(args.data).is_file()):
        with refusing():
            examples = read_jsonl(args.data, fields, flag="--data")
            val_path = args.val_data or str(args.data).replace("_train", "_val")
            if args.val_data or (Path(val_path).exists() and val_path != str(args.data)):
                val_examples = read_jsonl(val_path, fields, flag="--val-data")
        if not examples:
            refuse(f"--data {args.data}: no examples in it")
    _, world, args.device = init_distributed(args.device)
    torch.manual_seed(args.seed)
    size = "small" if is_small_model(config) else "large"
    steps = planned_steps(args, len(examples)) if examples else "(by the data's length)"
    what = f"LoRA rank {args.lora_rank} (alpha {args.lora_alpha:g})" if args.lora_rank else "full fine-tuning"
    print0(f"plan: {parameter_count(config) / 1e6:.1f}M parameters ({size}-model defaults), {what}, {steps} steps of "
           f"{args.batch_prompts} prompts x G {args.group_size} = {args.batch_prompts * args.group_size} completions "
           f"of at most {args.max_new_tokens} tokens, lr {args.lr:g}, {args.precision}, seed {args.seed}, {world} "
           f"process{'es' if world > 1 else ''}{' (FSDP)' if args.fsdp else ''}")
    # the sampler's cache holds prompt + completion; s1K's SRL prompts are ~550 tokens at the median, ~1k at p90
    row = 1024 + args.max_new_tokens
    plan = apply_plan(args, config, group_size=args.group_size, prompts=math.ceil(args.batch_prompts / world),
                      sample_length=row, longest_row=row, shards=world if args.fsdp else 1)
    if args.plan_only:
        end_distributed()
        raise SystemExit(0)
    return examples, val_examples, plan


def planned_steps(args, num_examples):
    """--max-steps, or else the steps that make --epochs passes over the training prompts."""
    return args.max_steps or math.ceil(args.epochs * num_examples / args.batch_prompts)


def grpo_config(args):
    """The GRPO loop's settings (grpo.GRPOConfig), from the resolved flags of the same names."""
    return GRPOConfig(
        batch_prompts=args.batch_prompts, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, std_threshold=args.std_threshold, max_draws=args.max_draws,
        sample_batch=args.sample_batch, seed=args.seed, scale_by_std=not args.no_std_scale,
        mask_truncated=args.mask_truncated, tis_cap=args.tis_cap, clip_low=args.clip_low, clip_high=args.clip_high,
        beta=args.beta, loss_agg=args.loss_agg, updates_per_batch=args.updates_per_batch, grad_clip=args.grad_clip,
        micro_batch_tokens=args.micro_batch_tokens, device=args.device, precision=args.precision)


def run_settings(args, plan=None):
    """What a run's plumbing (machinery/run.py) reads: where it writes, how often, when it stops."""
    return RunSettings(out=args.out, flags=stored_flags(args), plan=plan, overwrite=args.overwrite,
                       report_to=args.report_to, save_every=args.save_every,
                       eval_every=getattr(args, "eval_every", 0), log_samples=getattr(args, "log_samples", 0),
                       max_skipped_steps=args.max_skipped_steps)


def drop_long_prompts(args, tokenizer, build_prompt, examples, val_examples):
    """(examples, val_examples) without those whose prompt exceeds --max-prompt-tokens: agent steps can carry
    long issues and outputs, and such a prompt would cost memory and time (or overflow the model's context)
    without teaching more. The count is printed, never silent."""
    from engine import encode_chat
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


# -----------------------------------------------------------------------------------------------------------------
# 5. The model, ready for the first step


def load_for_training(args, state, sampling=False, base=None):
    """(model, tokenizer, policy, reference), ready for the first step. Full fine-tuning: fp32 master weights
    (AdamW's updates of lr 5e-7 would vanish in bf16) from --model, or on --resume from <out>/last, sharded under
    --fsdp. LoRA (--lora-rank): the frozen base from --model on every start (bf16 under --precision bf16), fp32
    adapters on every block's linear layers, on --resume read from <out>/last/adapter. base: (model, tokenizer) to
    start from instead of loading --model (sft.py's fitted tiny). Activation checkpointing as planned.
    With sampling (RL), policy is what samples: the model itself in fp32 or under LoRA (the bf16 base reads the
    adapters in place), else a copy (bf16 under --precision bf16, whole under FSDP, whose trainer holds shards) that
    copy_weights refreshes after each update. With --beta > 0, reference is the frozen starting model: under LoRA the
    model itself, its adapters switched off for the KL term (grpo.adapters_off); else a frozen copy."""
    lora = args.lora_rank > 0
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
