"""
Supervised Reinforcement Learning (SRL), after Deng et al. 2025, "Supervised Reinforcement Learning: From Expert
Trajectories to Step-wise Reasoning" (arXiv 2510.25992).

SRL turns each expert solution into step-wise examples: given the problem and the expert's first k-1 steps, the
policy writes a private monologue in <think> ... </think> and then one action, its guess at step k. The reward
compares only that action with the expert's step k (R = 2M/T, Ratcliff/Obershelp similarity, -1 when the output
breaks the format), and the policy is trained with GRPO plus dynamic sampling.

    python data_prep.py && python sft.py && python srl.py    # tiny model on the built-in data, a few CPU minutes
    python srl.py --model qwen-1.5b --data data/srl_train.jsonl --out runs/srl     # one 80 GB GPU
    python srl.py --resume --out runs/srl                                           # continue a stopped run
    python srl.py --overwrite --out runs/srl                                        # start it again instead
    torchrun --nproc_per_node 8 srl.py --model qwen-7b --fsdp --batch-prompts 512 --sample-batch 16   # 8 GPUs

Writes <out>/metrics.jsonl (a line per step), <out>/last/ (checkpoint + training state, for --resume) and
<out>/best/ (best on validation): Hugging Face folders that `--model` of any stage accepts. Every user error,
an --out that already holds a run included (unless --resume or --overwrite), is refused before anything loads.

Sections: 1. step_similarity, 2. srl_reward, 3. the GRPO pieces (group_advantages, keep_group, grpo_loss), 4. the
prompt, 5. the training loop (collect_groups, update_policy, train). rlvr.py imports 3 and 5.

Defaults by model size (flags override them): under 50M parameters (tiny) 4 prompts x G 8, 64 new tokens, lr 3e-5,
20 steps; larger models 16 prompts x G 8, 1024 new tokens, lr 1e-6, one epoch, which one 80 GB GPU turns around
quickly (the paper: 512 prompts x G 8, lr 5e-7, Qwen2.5-7B on several GPUs). The update runs in micro-batches of
--micro-batch-tokens positions, so memory does not depend on how long the completions happen to be. On a GPU the
run first prints common.estimate_memory's estimate (Qwen2.5-1.5B at the defaults: 61 GB of 80), and stops before
loading any weight if the step cannot fit.

Under torchrun the same flags mean the same optimisation: --batch-prompts is the global batch, each process samples
and scores its share of every draw, the groups are gathered so that dynamic sampling keeps what one process would,
and the gradients of each process's share of the kept groups are summed. A prompt's rollouts draw their randomness
from (seed, position in the prompt stream, sample), so one process and several sample the same tokens. --fsdp also
shards weights, gradients and AdamW states.

Departures from the paper and choices it leaves open:
  - The similarity is our own code, not a difflib call; the tests check it equals
    difflib.SequenceMatcher(None, a, b).ratio() bit for bit, including difflib's "autojunk" rule.
  - The paper gives -1 to outputs that break the format but does not define the format; srl_reward's docstring
    states our rule.
  - The advantage divides by the population std of the group (the paper says "group std").
  - Clip range 0.2 low / 0.28 high (DAPO's asymmetric clip); the paper does not report it.
  - The loss is a token mean over all completion tokens of the optimiser step, so micro-batches add up exactly.
  - Dynamic sampling keeps a group when its reward std exceeds --std-threshold (default 0.01; not reported in
    the paper), and gives up after --max-draws rounds, training on the groups it has (logged as kept_groups).
  - KL coefficient 0 as in the paper; the k3 estimator against a frozen reference is available with beta > 0.
  - AdamW without weight decay, constant lr, no warm-up (paper: no warm-up). --precision bf16 (the default on
    GPU): fp32 master weights, bf16 autocast, and a bf16 copy of the policy that samples, refreshed after each
    update; its token probabilities differ slightly from the trainer's, as a bf16 vLLM's do in verl.
  - Validation (the paper selects its checkpoint on it) scores the greedy action of each held-out example: mean
    similarity with format failures counted as 0 ("val_score"), and the format rate.
  - Prompts over --max-prompt-tokens (default 4096; not reported in the paper) are dropped once, when the
    training and validation examples are loaded, and the count is printed (drop_long_prompts).
  - Agent steps (data_prep.py on agent trajectories: the paper's software-engineering setting) get their own
    system prompt, asking for the next command; the target is the command, never the agent's thought.
"""
import argparse
import copy
import json
import math
import os
import random
import time
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from common import (broadcast, check_device, check_flags, check_run_folder, copy_weights, end_distributed, gather,
                    get_rank, get_world_size, gpu_memory, init_distributed, parameter_count, plan_memory, print0,
                    read_config, read_jsonl, refuse, save_checkpoint, shard, start_run, sum_across, sum_gradients)
from model import autocast, completion_logprobs, encode_chat, generate, load_model, token_budget_batches

# ----------------------------------------------------------------------------------------------------------------
# 1. Step similarity: the reward of the paper's step-wise reward section, R = 2M / T, where T = len(a) + len(b) and
# M is the number of characters in the matching blocks that Ratcliff/Obershelp matching finds: take the longest
# common block, then recurse on the pieces to its left and to its right. We reproduce difflib.SequenceMatcher
# (isjunk=None, autojunk=True) exactly, tie-breaking and "popular" characters included, since that is what the
# paper used; the reward is then identical to theirs.


def _longest_match(a, b, b2j, alo, ahi, blo, bhi):
    """Longest block a[i:i+k] == b[j:j+k] inside a[alo:ahi], b[blo:bhi], as difflib's find_longest_match.

    Among the longest blocks made of indexed (non-popular) characters it returns the one that starts earliest in a,
    then earliest in b; that block is then grown on both sides over equal characters, popular ones included.
    If nothing matches it returns (alo, blo, 0), possibly grown over popular characters.
    """
    best_i, best_j, best_size = alo, blo, 0
    # Dynamic programming over a: run_len[j] = length of the common run ending at a[i-1] and b[j].
    run_len = {}
    for i, char in enumerate(a[alo:ahi], alo):
        positions = b2j.get(char)  # None for characters absent from b or popular in b
        new_run_len = {}
        if positions is not None:
            previous = run_len.get
            for j in positions:  # ascending, so ties keep the earliest j
                if j < blo:
                    continue
                if j >= bhi:
                    break
                k = new_run_len[j] = previous(j - 1, 0) + 1
                if k > best_size:  # strictly longer only: ties keep the earliest i, then j
                    best_i, best_j, best_size = i - k + 1, j - k + 1, k
        run_len = new_run_len
    # Popular characters are missing from b2j, so grow the block over equal characters on each side.
    while best_i > alo and best_j > blo and a[best_i - 1] == b[best_j - 1]:
        best_i, best_j, best_size = best_i - 1, best_j - 1, best_size + 1
    while best_i + best_size < ahi and best_j + best_size < bhi and a[best_i + best_size] == b[best_j + best_size]:
        best_size += 1
    return best_i, best_j, best_size


def step_similarity(a: str, b: str) -> float:
    """R = 2M / T for strings a and b; equals difflib.SequenceMatcher(None, a, b).ratio(). 1.0 if both are empty."""
    if a == b:  # difflib matches every character of equal strings (also 1.0 for two empty strings)
        return 1.0
    if not a or not b:
        return 0.0
    # Index b: every character -> its positions in b, ascending.
    b2j = {}
    for j, char in enumerate(b):
        b2j.setdefault(char, []).append(j)
    # difflib's autojunk: in a b of 200+ characters, a character seen more than 1 + len(b)//100 times is "popular"
    # and leaves the index (for prose: spaces, common letters). It changes which blocks are found, hence R.
    if len(b) >= 200:
        limit = len(b) // 100 + 1
        for char in [char for char, positions in b2j.items() if len(positions) > limit]:
            del b2j[char]
    # Ratcliff/Obershelp: longest block, then the pieces left and right of it, with a stack instead of recursion.
    # The order of visits does not change the blocks found, and M only needs their total size (difflib's later
    # merging of adjacent blocks does not change it).
    matched = 0
    todo = [(0, len(a), 0, len(b))]
    while todo:
        alo, ahi, blo, bhi = todo.pop()
        i, j, k = _longest_match(a, b, b2j, alo, ahi, blo, bhi)
        if k:
            matched += k
            if alo < i and blo < j:
                todo.append((alo, i, blo, j))
            if i + k < ahi and j + k < bhi:
                todo.append((i + k, ahi, j + k, bhi))
    return 2.0 * matched / (len(a) + len(b))


# ----------------------------------------------------------------------------------------------------------------
# 2. The SRL reward: only the action after </think> is scored, never the monologue.

FORMAT_FAILURE = -1.0
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def parse_action(completion: str):
    """The action of a well-formed completion, stripped, or None if the completion breaks the format.

    Well formed: optional whitespace, then <think>, the monologue, </think>, then a non-empty action. The whole text
    holds exactly one <think> and one </think> (so the open tag comes first); any other text before <think> and an
    action of whitespace only are failures. The completion is the decoded text without special tokens (decode with
    skip_special_tokens=True), so an end-of-turn token is not part of the action.
    """
    text = completion.lstrip()
    if not text.startswith(THINK_OPEN) or text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
        return None
    action = text.split(THINK_CLOSE, 1)[1].strip()
    return action or None


def srl_reward(completion: str, expert_step: str) -> float:
    """step_similarity(action, expert step), both stripped: in [0, 1]; FORMAT_FAILURE (-1.0) on a format failure."""
    action = parse_action(completion)
    if action is None:
        return FORMAT_FAILURE
    return step_similarity(action, expert_step.strip())


# ----------------------------------------------------------------------------------------------------------------
# 3. GRPO pieces: group-relative advantages, dynamic sampling, and the clipped policy-gradient loss.


def group_advantages(rewards: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Advantages for rewards [num_groups, G] (G rollouts of one prompt per row): (r - group mean) / (group std + eps).

    The std is the population std (unbiased=False, divide by G). With scale_by_std=False: r - group mean only.
    """
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    if not scale_by_std:
        return centred
    return centred / (rewards.std(dim=-1, keepdim=True, unbiased=False) + eps)


def keep_group(rewards: torch.Tensor, std_threshold: float) -> torch.Tensor:
    """Dynamic sampling: True for the groups (rows of rewards [num_groups, G]; or one group [G]) worth training on.

    A group is kept only if the population std of its rewards is above std_threshold: when all rollouts score
    (nearly) the same, every advantage is (nearly) zero and the group gives no learning signal.
    """
    return rewards.std(dim=-1, unbiased=False) > std_threshold


def grpo_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.28, ref_logp=None, beta=0.0,
              num_tokens=None):
    """Clipped GRPO surrogate; returns (loss, stats).

    logp      [B, T] log-probs of the sampled tokens under the policy being trained (requires grad)
    old_logp  [B, T] the same under the policy that sampled them (detached)
    advantages [B]   one advantage per completion, shared by its tokens
    mask      [B, T] 1 for completion tokens (stop token included), 0 for prompt and padding
    ref_logp  [B, T] log-probs under a frozen reference model, needed only when beta > 0
    num_tokens  the divisor of the token sum; default mask.sum(), the token mean over this batch. When an optimiser
                step is split into micro-batches, pass the number of completion tokens of the whole step: the
                micro-batch losses (and gradients) then add up to the loss of the whole step.

    Per token: ratio = exp(logp - old_logp), surrogate = min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A),
    the pessimistic minimum with DAPO's asymmetric clip. With beta > 0 the k3 estimate of KL(policy || reference),
    kl = exp(ref_logp - logp) - (ref_logp - logp) - 1, is subtracted as beta * kl.
    loss = -sum over masked tokens of (surrogate - beta * kl) / num_tokens.

    With one optimiser step per rollout batch, logp equals old_logp, the ratio is 1 and the clip does nothing: the
    gradient is the plain policy gradient. The clip only acts when a rollout batch is reused for several steps.
    """
    keep = mask.bool()
    # Work on the masked tokens only (1-D tensors), in float32: padding never reaches the loss or its gradient.
    logp, old_logp = logp.float()[keep], old_logp.float()[keep]
    adv = advantages.float()[:, None].expand_as(mask)[keep]
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = torch.minimum(unclipped, clipped)
    stats = {}
    if beta > 0:
        if ref_logp is None:
            raise ValueError("grpo_loss: beta > 0 needs ref_logp")
        log_ref_ratio = ref_logp.float()[keep] - logp
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1.0
        per_token = per_token - beta * kl
        stats["kl_mean"] = kl.mean().item() if kl.numel() else 0.0
    if num_tokens is None:
        num_tokens = max(int(keep.sum()), 1)
    loss = -per_token.sum() / num_tokens
    with torch.no_grad():
        count = max(ratio.numel(), 1)
        stats["clip_fraction"] = (clipped < unclipped).sum().item() / count  # the clipped term won the minimum
        stats["ratio_mean"] = ratio.sum().item() / count
    return loss, stats


# ----------------------------------------------------------------------------------------------------------------
# 4. The prompt: the problem and the expert's steps so far; the model continues with the next step only.

SYSTEM_PROMPT = (
    "You are solving a problem one step at a time. You are given the problem and a partial solution. First think "
    "freely, for as long as you like, inside <think> ... </think>. Then, after </think>, write only the very next "
    "step of the solution, in the same style as the previous steps. Do not solve the rest of the problem.")
# Agent steps (the paper's software-engineering setting) get their own instruction; the agent framework's own
# system prompt never reaches the model (data_prep.py keeps only the issue and the last commands).
AGENT_SYSTEM_PROMPT = (
    "You are a software engineering agent resolving an issue in a code repository, one command at a time. You are "
    "given the issue and the last commands you ran, with their outputs. First think freely, for as long as you "
    "like, inside <think> ... </think>. Then, after </think>, write only the next command to run, exactly as it "
    "should be executed, and nothing else: no explanation, no output, no further commands.")


def srl_fields(example):
    """What srl_messages and the reward read from an example ({field: type}): the command lines check every record
    for them before training starts (common.check_fields)."""
    if "issue" in example:  # an agent step
        return {"issue": str, "previous_pairs": list, "step_index": int, "target_step": str}
    return {"problem": str, "previous_steps": list, "target_step": str}


def srl_messages(example):
    """Chat messages for one SRL example (data_prep.py's fields): one system prompt, one user message. An agent
    step (it has an "issue") shows the issue and its previous (command, output) pairs."""
    if "issue" in example:
        pairs = example["previous_pairs"]
        user = f"Issue:\n{example['issue']}\n\n"
        if pairs:
            earlier = example["step_index"] - 1 - len(pairs)
            user += "The last command you ran" if len(pairs) == 1 else f"The last {len(pairs)} commands you ran"
            user += f" (after {earlier} earlier)" if earlier else ""
            user += ", with its output:" if len(pairs) == 1 else ", with their outputs:"
            for pair in pairs:
                user += f"\n\nCommand:\n{pair['action']}\n\nOutput:\n{pair['observation'] or '(no output)'}"
        else:
            user += "You have not run any command yet."
        user += "\n\nWrite the next command."
        return [{"role": "system", "content": AGENT_SYSTEM_PROMPT}, {"role": "user", "content": user}]
    steps = "\n\n".join(example["previous_steps"]) or "(no steps yet)"
    user = f"Problem:\n{example['problem']}\n\nSolution so far:\n{steps}"
    if example.get("next_step_title"):
        user += f"\n\nThe next step is titled: {example['next_step_title']}"
    user += "\n\nWrite the next step."
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


# ----------------------------------------------------------------------------------------------------------------
# 5. The training loop (rollouts, rewards, dynamic sampling, updates, validation, checkpoints), shared with rlvr.py.

SMALL_MODEL_DEFAULTS = dict(batch_prompts=4, group_size=8, max_new_tokens=64, lr=3e-5, max_steps=20)
LARGE_MODEL_DEFAULTS = dict(batch_prompts=16, group_size=8, max_new_tokens=1024, lr=1e-6, max_steps=None)
# flags that --resume takes from the command line (where and how the work runs, how long, how often to save);
# every other one comes from the checkpoint's plan
RUNTIME_FLAGS = ("resume", "overwrite", "device", "out", "max_steps", "eval_every", "save_every", "val_limit",
                 "sample_batch", "micro_batch_tokens", "activation_checkpointing", "fsdp")
STATE_KEYS = ("args", "optimizer", "rng", "step", "position", "best", "skipped")  # what --resume reads


def training_arguments(description, data_default, out_default, std_threshold_default):
    """The command line of the GRPO loop; rlvr.py builds its own from the same function. Flags left at None take
    the defaults of the model's size class (SMALL_MODEL_DEFAULTS / LARGE_MODEL_DEFAULTS)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    arg = p.add_argument
    # Data and run folder
    arg("--model", default="runs/sft" if Path("runs/sft").is_dir() else "tiny",
        help="alias, hub id, checkpoint or run folder (default: runs/sft from sft.py, else tiny)")
    arg("--data", default=data_default, help="training JSONL from data_prep.py")
    arg("--val-data", default=None, help="validation JSONL (default: the _val file beside --data)")
    arg("--out", default=out_default, help="run folder: best/, last/, metrics.jsonl")
    arg("--max-prompt-tokens", type=int, default=4096,
        help="examples whose prompt is longer are dropped before training (counted and printed)")
    # Rollouts
    arg("--batch-prompts", type=int, default=None, help="kept groups per step (paper: 512 SRL, 128 RLVR)")
    arg("--group-size", type=int, default=None, help="rollouts per prompt, G (paper: 8)")
    arg("--max-new-tokens", type=int, default=None, help="longest completion; longer ones are cut (truncated)")
    arg("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts (paper: 1.0)")
    arg("--std-threshold", type=float, default=std_threshold_default,
        help="dynamic sampling: keep a group only if the std of its rewards is above this")
    arg("--max-draws", type=int, default=4, help="sampling rounds per step before training on fewer groups")
    arg("--sample-batch", type=int, default=None,
        help="prompts each process samples at once, G completions each (default: its whole share of a draw)")
    # GRPO loss
    arg("--no-std-scale", action="store_true", help="advantage r - mean, without dividing by the group's std")
    arg("--clip-low", type=float, default=0.2, help="ratio clipped below at 1 - clip-low (not in the paper; DAPO)")
    arg("--clip-high", type=float, default=0.28, help="ratio clipped above at 1 + clip-high (DAPO's 0.28)")
    arg("--beta", type=float, default=0.0, help="k3 KL coefficient to the initial model (paper: 0)")
    # Optimisation
    arg("--lr", type=float, default=None, help="AdamW learning rate, constant (paper: 5e-7)")
    arg("--max-steps", type=int, default=None, help="optimiser steps (default for large models: --epochs)")
    arg("--epochs", type=float, default=1.0, help="passes over the training prompts when --max-steps is not set")
    arg("--updates-per-batch", type=int, default=1, help="optimiser steps on each rollout batch (paper: 1)")
    arg("--grad-clip", type=float, default=1.0, help="gradient norm clip (paper: 1.0)")
    arg("--micro-batch-tokens", type=int, default=8192,
        help="positions per forward/backward pass; a group's prompt counts once (its completions share it)")
    arg("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
        help="recompute layers in backward: less memory, ~30%% more time (default: on a GPU, when needed)")
    # Validation and checkpoints
    arg("--eval-every", type=int, default=10, help="validate every N steps (0: only at the end)")
    arg("--val-limit", type=int, default=64, help="validation examples used")
    arg("--save-every", type=int, default=10, help="write <out>/last every N steps and at the end")
    arg("--resume", action="store_true", help="continue from <out>/last, with the plan stored there")
    arg("--overwrite", action="store_true", help="start again in an --out that holds a run, deleting it")
    # Runtime
    arg("--seed", type=int, default=0, help="seeds the data order and every rollout")
    arg("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    arg("--fsdp", action="store_true", help="under torchrun: shard weights, gradients and AdamW states (FSDP2)")
    arg("--precision", choices=["bf16", "fp32"], default=None,
        help="bf16: fp32 master weights, bf16 autocast and a bf16 sampling copy (default on cuda); fp32 (on cpu)")
    return p


def drop_long_prompts(args, tokenizer, make_prompt, examples, val_examples):
    """(examples, val_examples) without those whose prompt exceeds --max-prompt-tokens: agent steps can carry
    long issues and outputs, and such a prompt would cost memory and time (or overflow the model's context)
    without teaching more. The count is printed, never silent."""
    kept = []
    for name, source in (("training", examples), ("validation", val_examples)):
        lengths = [len(encode_chat(tokenizer, make_prompt(ex))) for ex in source]
        short = [ex for ex, n in zip(source, lengths) if n <= args.max_prompt_tokens]
        if len(short) < len(source):
            print0(f"dropped {len(source) - len(short)} of {len(source)} {name} examples whose prompt is over "
                   f"--max-prompt-tokens {args.max_prompt_tokens} (longest: {max(lengths)} tokens)")
        kept.append(short)
    if not kept[0]:
        refuse(f"every training prompt is over --max-prompt-tokens {args.max_prompt_tokens}")
    return kept[0], kept[1]


class PromptStream:
    """Training examples in a seeded random order, epoch after epoch; its position is part of the checkpoint."""

    def __init__(self, n, seed, position=0):
        self.n, self.seed, self.position = n, seed, position

    def next(self):
        epoch, i = divmod(self.position, self.n)
        order = random.Random(self.seed * 100003 + epoch).sample(range(self.n), self.n)
        self.position += 1
        return order[i]


class Group(NamedTuple):
    """The G rollouts of one prompt (a kept group of dynamic sampling)."""
    prompt: list  # token ids of the chat prompt
    completions: list  # G lists of sampled token ids, the stop token kept
    rewards: torch.Tensor  # [G]


class Rollout(NamedTuple):
    """One completion as the update sees it."""
    prompt: list
    completion: list
    advantage: float  # group-relative, shared by every token of the completion


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True)


def collect_groups(args, policy, tokenizer, examples, stream, make_prompt, reward_fn, stop_ids):
    """Rollouts with dynamic sampling (paper, SRL section): draw prompts, sample G completions each, score them,
    keep the groups whose reward std exceeds the threshold; repeat until batch_prompts groups are kept or
    max_draws rounds are spent. Returns the kept Groups and counters for the log. Under torchrun each process
    samples and scores every world-th prompt of a draw, then all groups are gathered: every process keeps the
    groups that one process would."""
    kept = []
    drawn = []  # (completions, rewards) of every group sampled in this step, kept or not: for the log
    for _ in range(args.max_draws):
        need = args.batch_prompts - len(kept)
        if need <= 0:
            break
        # each prompt's rollouts draw from its own seed, (run seed, position in the prompt stream): a resumed run,
        # or another number of processes, samples the same tokens
        seeds = [args.seed * 1_000_003 + stream.position + i for i in range(need)]
        batch = [examples[stream.next()] for _ in range(need)]
        prompts = [encode_chat(tokenizer, make_prompt(ex)) for ex in batch]
        mine = list(range(get_rank(), need, get_world_size()))  # this process's share of the draw
        scored = {}  # prompt index in the draw -> (completions, rewards)
        at_once = args.sample_batch or max(len(mine), 1)
        for s in range(0, len(mine), at_once):
            part = mine[s:s + at_once]
            outputs = generate(policy, [prompts[i] for i in part], args.max_new_tokens, temperature=args.temperature,
                               num_samples=args.group_size, seed=[seeds[i] for i in part])
            for k, i in enumerate(part):
                group = outputs[k * args.group_size:(k + 1) * args.group_size]
                scored[i] = (group, [reward_fn(decode(tokenizer, c), batch[i]) for c in group])
        scored = {i: v for share in gather(scored) for i, v in share.items()}  # every process's groups
        for i in range(need):
            group, rewards = scored[i][0], torch.tensor(scored[i][1])
            drawn.append((group, rewards))
            if bool(keep_group(rewards, args.std_threshold)) and len(kept) < args.batch_prompts:
                kept.append(Group(prompts[i], group, rewards))
    rewards = torch.cat([r for _, r in drawn])
    completions = [c for group, _ in drawn for c in group]
    tokens = sum(map(len, completions))
    finished = sum(len(c) > 0 and c[-1] in stop_ids for c in completions)  # ended with a stop token
    return kept, dict(reward_mean=rewards.mean().item(), reward_std=rewards.std(unbiased=False).item(),
                      format_failure_rate=int((rewards == FORMAT_FAILURE).sum()) / len(rewards),
                      kept_group_rate=len(kept) / len(drawn), groups_drawn=len(drawn),
                      response_length=tokens / len(rewards), truncation_rate=1 - finished / len(rewards),
                      sampled_tokens=tokens)


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


def validate(args, policy, tokenizer, examples, make_prompt, reward_fn):
    """Greedy action of each validation example: mean reward (format failures count 0) and format rate."""
    examples = validation_sample(examples, args.val_limit, args.seed)
    prompts = [encode_chat(tokenizer, make_prompt(ex)) for ex in examples]
    outputs = generate(policy, prompts, args.max_new_tokens, temperature=0, progress=True)
    rewards = [reward_fn(decode(tokenizer, c), ex) for c, ex in zip(outputs, examples)]
    return dict(val_score=sum(max(r, 0.0) for r in rewards) / max(len(rewards), 1),
                val_format_rate=sum(r != FORMAT_FAILURE for r in rewards) / max(len(rewards), 1))


# an empty micro-batch: a one-token row with advantage 0 (no loss, no gradient) that keeps FSDP's collectives in step
PADDING = [Rollout([0], [0], 0.0)]


def update_policy(model, optimizer, rows, num_tokens, args, reference=None):
    """The GRPO update on one rollout batch: --updates-per-batch AdamW steps, each a forward and backward over
    every Rollout in micro-batches whose losses add up to the token mean over the num_tokens completion tokens of
    the batch. Returns the stats of the log; a step whose loss or gradient is not finite is skipped and counted.
    Under torchrun, `rows` are this process's share and num_tokens counts the whole batch."""
    mixed = autocast(args.device, args.precision)
    chunks = [rows[s] for s in token_budget_batches([r.prompt for r in rows], [r.completion for r in rows],
                                                    args.micro_batch_tokens)]
    if args.fsdp:  # each FSDP forward gathers every layer: all processes must run as many micro-batches
        chunks += [PADDING] * (max(gather(len(chunks))) - len(chunks))

    def logprobs(net, chunk, **kw):
        return completion_logprobs(net, [r.prompt for r in chunk], [r.completion for r in chunk],
                                   args.temperature, **kw)

    old_logps = None
    if args.updates_per_batch > 1:  # the rollout policy's log-probs: the ratio's denominator in later updates
        with torch.no_grad(), mixed:
            old_logps = [logprobs(model, chunk)[0] for chunk in chunks]
    stats = dict(loss=0.0, grad_norm=0.0, clip_fraction=0.0, entropy=0.0, skipped=0)
    for _ in range(args.updates_per_batch):
        sums = [0.0, 0.0, 0.0]  # loss, clipped tokens, entropy: summed over micro-batches (and processes)
        for i, chunk in enumerate(chunks):
            with mixed:
                logp, mask, entropy = logprobs(model, chunk, with_entropy=True)
                ref_logp = None
                if reference is not None:
                    with torch.no_grad():
                        ref_logp = logprobs(reference, chunk)[0]
            # with one update per batch old_logp is logp itself, detached: the ratio is 1, the clip inactive
            old_logp = old_logps[i] if old_logps else logp.detach()
            advantages = torch.tensor([r.advantage for r in chunk], device=logp.device)
            loss, loss_stats = grpo_loss(logp, old_logp, advantages, mask, args.clip_low, args.clip_high,
                                         ref_logp, args.beta, num_tokens=num_tokens)
            # FSDP averages the processes' gradients; the sum is wanted, each loss being a share of the mean
            (loss * get_world_size() if args.fsdp else loss).backward()
            if chunk is not PADDING:
                sums = [sums[0] + loss.item(), sums[1] + loss_stats["clip_fraction"] * mask.sum().item(),
                        sums[2] + entropy.sum().item()]
        if not args.fsdp:
            sum_gradients(model)  # under torchrun: the gradient of the whole batch on every process
        loss_sum, clipped_tokens, entropy_sum = sum_across(sums)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
        if math.isfinite(loss_sum) and torch.isfinite(grad_norm):
            optimizer.step()
            stats.update(loss=loss_sum, grad_norm=grad_norm.item(), clip_fraction=clipped_tokens / num_tokens,
                         entropy=entropy_sum / num_tokens)
        else:  # a non-finite loss would poison the weights and AdamW's moments: skip the step
            stats["skipped"] += 1
        optimizer.zero_grad(set_to_none=True)  # no gradient memory held while the next rollouts are sampled
    return stats


def planned_steps(args, num_examples):
    """--max-steps, or else the steps that make --epochs passes over the training prompts."""
    return args.max_steps or math.ceil(args.epochs * num_examples / args.batch_prompts)


def check_arguments(args, fields=None):
    """Every user error, before any process group forms or any weight loads (each ends the program in one line:
    common.refuse): the device, the run folder, the flags (on --resume after the checkpoint's plan has replaced all
    but RUNTIME_FLAGS), the data (every record holding fields(record), when given) and the model. Returns
    (training state or None, examples, validation examples, model config)."""
    check_device(args.device)
    if args.fsdp and "RANK" not in os.environ:
        refuse("--fsdp shards the model over torchrun's processes: launch with torchrun --nproc_per_node N")
    state = check_run_folder(args, STATE_KEYS)  # on --resume the checkpoint's plan replaces the flags
    check_flags(args, ["batch_prompts", "max_new_tokens", "max_draws", "sample_batch", "updates_per_batch",
                       "micro_batch_tokens", "max_prompt_tokens", "max_steps", "val_limit", "save_every"],
                lambda v: v >= 1, "at least 1")
    check_flags(args, ["group_size"], lambda v: v >= 2, "at least 2 (one rollout alone has no spread: no group would "
                "ever be kept)")
    check_flags(args, ["temperature"], lambda v: 0 < v < math.inf, "above 0 (at 0 every rollout of a prompt is the "
                "same: no group would ever be kept)")
    check_flags(args, ["lr", "epochs", "grad_clip"], lambda v: 0 < v < math.inf, "above 0")
    check_flags(args, ["clip_low"], lambda v: 0 <= v < 1, "in [0, 1)")
    check_flags(args, ["clip_high", "beta", "eval_every"], lambda v: 0 <= v < math.inf, "0 or more")
    check_flags(args, ["std_threshold"], math.isfinite, "a number")
    examples = read_jsonl(args.data, fields)
    if not examples:
        refuse(f"--data {args.data}: no examples in it")
    val_path = args.val_data or str(args.data).replace("_train", "_val")
    val_examples = []
    if args.val_data or (Path(val_path).exists() and val_path != str(args.data)):
        val_examples = read_jsonl(val_path, fields, flag="--val-data")
    config = read_config(Path(args.out) / "last" if state else args.model)
    return state, examples, val_examples, config


def resolve_plan(args, cfg, num_examples):
    """Fill the flags left at None from the model's size class, check the GPU memory the plan needs, print the
    plan."""
    parameters = parameter_count(cfg)
    small = parameters < 50e6
    for name, value in (SMALL_MODEL_DEFAULTS if small else LARGE_MODEL_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    world = get_world_size()
    prompts_at_once = min(args.sample_batch or args.batch_prompts, math.ceil(args.batch_prompts / world))
    # the sampler's cache holds prompt + completion; s1K's SRL prompts are ~550 tokens at the median, ~1k at p90
    plan_memory(cfg, args, gpu_memory(args.device), prompts_at_once * args.group_size, 1024 + args.max_new_tokens,
                shards=world if args.fsdp else 1)
    print0(f"plan: {parameters / 1e6:.1f}M parameters ({'small' if small else 'large'}-model defaults), "
           f"{planned_steps(args, num_examples)} steps of {args.batch_prompts} prompts x G {args.group_size} = "
           f"{args.batch_prompts * args.group_size} completions of at most {args.max_new_tokens} tokens, "
           f"micro-batches of {args.micro_batch_tokens} positions, lr {args.lr:g}, {args.precision}, seed "
           f"{args.seed}, {world} process{'es' if world > 1 else ''}{' (FSDP)' if args.fsdp else ''}")


def train(args, make_prompt, reward_fn, fields=None):
    """The GRPO loop shared by SRL (reward: step similarity) and RLVR (reward: final-answer correctness). fields:
    what make_prompt and reward_fn read from an example, checked in every record first (see check_arguments)."""
    state, examples, val_examples, config = check_arguments(args, fields)  # before any process group or weight
    rank, world, args.device = init_distributed(args.device)  # (0, 1, device) without torchrun
    torch.manual_seed(args.seed)
    out = Path(args.out)
    source = str(out / "last" if state else args.model)
    resolve_plan(args, config, len(examples))
    model, tokenizer = load_model(source, device=args.device, dtype=torch.float32)
    examples, val_examples = drop_long_prompts(args, tokenizer, make_prompt, examples, val_examples)
    total_steps = planned_steps(args, len(examples))  # fewer when prompts were dropped and --epochs sets the length
    model.activation_checkpointing = args.activation_checkpointing
    # fp32 master weights (lr 5e-7 updates vanish in bf16); in bf16 a bf16 copy of them does the sampling, and
    # under FSDP a whole copy (the trainer's weights are sharded)
    policy = model
    if args.precision == "bf16" or args.fsdp:
        policy = copy.deepcopy(model).to(torch.bfloat16 if args.precision == "bf16" else torch.float32)
    reference = copy.deepcopy(model).requires_grad_(False) if args.beta > 0 else None
    if args.fsdp:
        shard(model, args.precision)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    stream = PromptStream(len(examples), args.seed)  # the order of the training prompts, epoch after epoch
    step = 0  # optimiser steps done
    best = -float("inf")  # best validation score so far
    skipped = 0  # updates skipped for a non-finite loss or gradient
    any_kept = False  # has any step kept a group? (if not, say why at the end)
    if state is not None:
        stream.position, step, best, skipped = state["position"], state["step"], state["best"], state["skipped"]
        any_kept = True
    metrics = start_run(out, model, optimizer, state, args.overwrite)
    stop_ids = set(policy.stop_token_ids)
    bar = tqdm(range(step, total_steps), initial=step, total=total_steps, desc=out.name, disable=rank != 0)
    for step in bar:
        # 1. rollouts and rewards, with dynamic sampling
        t0 = time.time()
        kept, log = collect_groups(args, policy, tokenizer, examples, stream, make_prompt, reward_fn, stop_ids)
        any_kept = any_kept or bool(kept)
        t_sample = time.time() - t0
        # 2. advantages within each group; every completion becomes one Rollout of the update
        groups = [[Rollout(g.prompt, c, a) for c, a in zip(g.completions, group_advantages(
            g.rewards, not args.no_std_scale).tolist()) if c] for g in kept]
        num_tokens = max(sum(len(r.completion) for rows in groups for r in rows), 1)  # the loss: a mean over them
        mine = [r for rows in groups[rank::world] for r in rows]  # under torchrun: every world-th group
        stats = update_policy(model, optimizer, mine, num_tokens, args, reference) if kept else {}
        skipped += stats.pop("skipped", 0)
        if policy is not model and kept:  # the bf16 sampler takes the new fp32 weights
            copy_weights(policy, model)
        t_train = time.time() - t0 - t_sample
        log.update(stats, step=step + 1, kept_groups=len(kept), skipped_steps=skipped, sample_s=round(t_sample, 2),
                   train_s=round(t_train, 2), tokens_per_s=round(log["sampled_tokens"] / max(t_sample, 1e-9), 1),
                   world_size=world)
        # 3. validation (the paper keeps the best checkpoint on validation) and checkpoints; rank 0 validates
        # and every process learns its result, since saving gathers FSDP's shards from all of them
        last_step = step + 1 == total_steps
        if val_examples and ((args.eval_every and (step + 1) % args.eval_every == 0) or last_step):
            log.update(broadcast(validate(args, policy, tokenizer, val_examples, make_prompt, reward_fn)
                                 if rank == 0 else None))
            if log["val_score"] > best:
                best = log["val_score"]
                save_checkpoint(model, tokenizer, out / "best")
        elif last_step and not val_examples:
            save_checkpoint(model, tokenizer, out / "best")  # nothing to select on: the final model is the best
        metrics.write(json.dumps(log) + "\n")
        metrics.flush()
        bar.set_postfix(reward=f"{log['reward_mean']:.3f}", kept=f"{log['kept_group_rate']:.2f}")
        if (step + 1) % args.save_every == 0 or last_step:
            plan = {k: v for k, v in vars(args).items() if k not in RUNTIME_FLAGS}
            save_checkpoint(model, tokenizer, out / "last", optimizer, plan, step=step + 1, position=stream.position,
                            best=best, skipped=skipped)
    metrics.close()
    if not any_kept:
        print0(f"no group was kept: every rollout of a prompt scored the same (last mean reward "
               f"{log['reward_mean']:.2f}, format failure rate {log['format_failure_rate']:.0%}). Start from a "
               f"model that sometimes earns the reward (for SRL on a small model: python sft.py, then --model "
               f"runs/sft), or lower --std-threshold.")
    end_distributed()
    return model


def main(argv=None):
    args = training_arguments(__doc__, "data/srl_train.jsonl", "runs/srl", 0.01).parse_args(argv)
    return train(args, srl_messages, lambda completion, example: srl_reward(completion, example["target_step"]),
                 srl_fields)


if __name__ == "__main__":
    main()
