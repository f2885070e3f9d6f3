"""
GRPO as SRL trains with it, in one file that reads (and copies) without the rest of the project, after GRPO-Zero's
grpo.py: the group-relative advantage (Shao et al. 2024, DeepSeekMath), the clipped surrogate with DAPO's asymmetric
clip and its dynamic sampling (Yu et al. 2025), the rollouts and the update. srl.py and rlvr.py call collect_groups
and update_policy once per step, each with its own prompt and reward.

    1. group_advantages, keep_group, grpo_loss: the three formulas.
    2. GRPOConfig, Group, Rollout, PromptStream: the settings, and what a step passes around.
    3. collect_groups: rollouts and rewards, with dynamic sampling; rollouts_of: their advantages.
    4. update_policy: the clipped policy-gradient step, in micro-batches that add up to the step's token mean.
    5. Several processes (torchrun): the few collectives the two steps use; without torchrun each is the identity.

It imports engine.py (the sampler, the log-probs) and model.py (the decoder), nothing else: the three files copy
out together. Under torchrun each process samples its share of every draw of prompts and trains on its share of the
kept groups; the lines where that shows are commented "torchrun:".
"""
import math
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from engine import completion_logprobs, decode_text, encode_chat, mix_seed, sample_groups, token_budget_batches
from model import Linear

FORMAT_FAILURE = -1.0  # the reward of a completion that breaks the output format (the paper's SRL reward: -1)

# ----------------------------------------------------------------------------------------------------------------
# 1. The formulas


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


LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")  # verl's names


def grpo_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.28, ref_logp=None, beta=0.0,
              num_tokens=None, loss_agg="token-mean", num_sequences=None, max_length=None, is_weight=None):
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

    Two other aggregations, verl's loss_agg_mode (TRL's loss_type), each over the num_sequences completions of the
    step (default: this batch's), so that micro-batches still add up: "seq-mean-token-mean", the mean over
    completions of each completion's token mean (GRPO as DeepSeekMath wrote it), and "seq-mean-token-sum-norm"
    (Dr. GRPO), each completion's token sum divided by the constant max_length, then the mean over completions.
    is_weight [B, T] (detached; None: 1) multiplies each token's surrogate: truncated importance sampling, when
    the policy that sampled is not exactly the one trained (update_policy).

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
    if is_weight is not None:
        per_token = per_token * is_weight.float()[keep]
    stats = {}
    if beta > 0:
        if ref_logp is None:
            raise ValueError("grpo_loss: beta > 0 needs ref_logp")
        log_ref_ratio = ref_logp.float()[keep] - logp
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1.0
        per_token = per_token - beta * kl
        stats["kl_mean"] = kl.mean().item() if kl.numel() else 0.0
    if loss_agg == "token-mean":
        loss = -per_token.sum() / (num_tokens or max(int(keep.sum()), 1))
    else:  # first each completion's sum, then the mean over completions
        row = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[keep]
        per_row = torch.zeros(mask.shape[0], device=mask.device).index_add(0, row, per_token)
        if loss_agg == "seq-mean-token-mean":
            per_row = per_row / mask.sum(-1).clamp(min=1)
        elif loss_agg == "seq-mean-token-sum-norm":
            per_row = per_row / max_length
        else:
            raise ValueError(f"grpo_loss: loss_agg {loss_agg!r} is none of {', '.join(LOSS_AGGREGATIONS)}")
        loss = -per_row.sum() / (num_sequences or mask.shape[0])
    with torch.no_grad():
        count = max(ratio.numel(), 1)
        stats["clip_fraction"] = (clipped < unclipped).sum().item() / count  # the clipped term won the minimum
        stats["ratio_mean"] = ratio.sum().item() / count
    return loss, stats


# ----------------------------------------------------------------------------------------------------------------
# 2. The settings, and what a step passes around


@dataclass
class GRPOConfig:
    """Every setting collect_groups, rollouts_of and update_policy read (srl.py's flags of the same names)."""
    batch_prompts: int = 16  # kept groups per step (paper: 512 SRL, 128 RLVR)
    group_size: int = 8  # rollouts per prompt, G
    max_new_tokens: int = 1024  # longest completion; longer ones are cut (truncated)
    temperature: float = 1.0  # of the rollouts, and of the log-probs that train on them
    std_threshold: float = 0.01  # dynamic sampling keeps a group whose reward std is above this
    max_draws: int = 4  # sampling rounds per step before training on fewer groups
    sample_batch: int | None = None  # prompts sampled at once (None: the whole draw)
    seed: int = 0  # with a prompt's place in the stream, seeds its rollouts
    scale_by_std: bool = True  # advantage (r - mean) / std, else r - mean
    mask_truncated: bool = False  # completions cut at max_new_tokens get no loss (DAPO's overlong filtering)
    tis_cap: float = 0.0  # truncated importance sampling against the sampler's log-probs (0: off)
    clip_low: float = 0.2
    clip_high: float = 0.28
    beta: float = 0.0  # k3 KL coefficient to the reference (paper: 0)
    loss_agg: str = "token-mean"  # LOSS_AGGREGATIONS
    updates_per_batch: int = 1  # optimiser steps on each rollout batch (paper: 1)
    grad_clip: float = 1.0
    micro_batch_tokens: int = 8192  # positions per forward/backward pass
    device: str = "cpu"
    precision: str = "fp32"  # "bf16": bf16 autocast over fp32 weights


class Group(NamedTuple):
    """The G rollouts of one prompt (a kept group of dynamic sampling)."""
    prompt: list  # token ids of the chat prompt
    completions: list  # G lists of sampled token ids, the stop token kept
    rewards: torch.Tensor  # [G]
    sampler_logps: list = None  # with tis_cap: each token's log-probability under the sampler
    example: dict = None  # the training example it came from (for samples.jsonl)


class Rollout(NamedTuple):
    """One completion as the update sees it."""
    prompt: list
    completion: list
    advantage: float  # group-relative, shared by every token of the completion
    sampler_logp: list = None  # with tis_cap: each token's log-probability under the sampler


class PromptStream:
    """Training examples in a seeded random order, epoch after epoch; its position is part of the checkpoint."""

    def __init__(self, n, seed, position=0):
        self.n, self.seed, self.position = n, seed, position

    def next(self):
        epoch, i = divmod(self.position, self.n)
        order = random.Random(mix_seed(self.seed, epoch)).sample(range(self.n), self.n)
        self.position += 1
        return order[i]


# ----------------------------------------------------------------------------------------------------------------
# 3. Rollouts with dynamic sampling


def collect_groups(cfg: GRPOConfig, policy, tokenizer, examples, stream, build_prompt, reward_fn):
    """Rollouts with dynamic sampling (the paper's SRL section, after DAPO): draw prompts, sample G completions
    each, score them, keep the groups whose reward std exceeds the threshold; repeat until batch_prompts groups are
    kept or max_draws rounds are spent. build_prompt(example) -> chat messages; reward_fn(completion text, example)
    -> float. Returns the kept Groups and counters for the log."""
    kept_groups = []
    drawn = []  # (completions, rewards) of every group sampled in this step, kept or not: for the log
    for _ in range(cfg.max_draws):
        need = cfg.batch_prompts - len(kept_groups)
        if need <= 0:
            break
        # each prompt's rollouts draw from their own seed, (run seed, place in the prompt stream): a resumed run, or
        # another number of processes, samples the same tokens
        seeds = [mix_seed(cfg.seed, stream.position + i) for i in range(need)]
        batch = [examples[stream.next()] for _ in range(need)]
        prompts = [encode_chat(tokenizer, build_prompt(example)) for example in batch]
        # torchrun: this process samples and scores every world-th prompt of the draw, then every process gets
        # every group, so that each keeps what one process would
        share = list(range(get_rank(), need, get_world_size()))
        groups = sample_groups(policy, [prompts[i] for i in share], cfg.group_size, cfg.max_new_tokens,
                               cfg.sample_batch, [seeds[i] for i in share], temperature=cfg.temperature,
                               return_logprobs=bool(cfg.tis_cap))
        groups, logps = groups if cfg.tis_cap else (groups, [None] * len(share))
        scored = {i: (group, [reward_fn(decode_text(tokenizer, c), batch[i]) for c in group], logp)
                  for i, group, logp in zip(share, groups, logps)}
        scored = {i: value for part in gather(scored) for i, value in part.items()}
        for i in range(need):
            completions, rewards, logp = scored[i][0], torch.tensor(scored[i][1]), scored[i][2]
            drawn.append((completions, rewards))
            if bool(keep_group(rewards, cfg.std_threshold)) and len(kept_groups) < cfg.batch_prompts:
                kept_groups.append(Group(prompts[i], completions, rewards, logp, batch[i]))
    rewards = torch.cat([r for _, r in drawn])
    completions = [c for group, _ in drawn for c in group]
    tokens = sum(map(len, completions))
    stop_ids = set(policy.stop_token_ids)
    finished = sum(len(c) > 0 and c[-1] in stop_ids for c in completions)  # ended with a stop token
    return kept_groups, dict(reward_mean=rewards.mean().item(), reward_std=rewards.std(unbiased=False).item(),
                             format_failure_rate=int((rewards == FORMAT_FAILURE).sum()) / len(rewards),
                             kept_group_rate=len(kept_groups) / len(drawn), groups_drawn=len(drawn),
                             response_length=tokens / len(rewards), truncation_rate=1 - finished / len(rewards),
                             sampled_tokens=tokens)


def rollouts_of(kept_groups, scale_by_std=True, drop_truncated=False, stop_ids=()):
    """Every completion of the kept groups as a Rollout, its advantage taken within its group, grouped as the groups
    are; with drop_truncated, not those cut at the length limit (no stop token at the end): DAPO's overlong
    filtering, which leaves their rewards in their group's advantages but gives them no loss. Returns (rollouts,
    the number dropped)."""
    rollouts, dropped = [], 0
    for g in kept_groups:
        logps = g.sampler_logps or [None] * len(g.completions)
        kept = [Rollout(g.prompt, c, a, logp) for c, a, logp in
                zip(g.completions, group_advantages(g.rewards, scale_by_std).tolist(), logps)
                if c and not (drop_truncated and c[-1] not in stop_ids)]
        dropped += len(g.completions) - len(kept)
        rollouts.append(kept)
    return rollouts, dropped


# ----------------------------------------------------------------------------------------------------------------
# 4. The update

def autocast(device, precision):
    """The context of a training forward. "bf16": bf16 matmuls over fp32 master weights (autocast), on CUDA and on
    CPU alike, so that CPU tests run the code a GPU runs; "fp32": nothing changes."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


@contextmanager
def adapters_off(model):
    """Inside, the model is its frozen base (every LoRA adapter's scale 0): under LoRA the KL term's reference model
    is the policy itself with its adapters switched off, not a copy."""
    adapted = [m for m in model.modules() if isinstance(m, Linear) and m.lora_scale]
    scales = [m.lora_scale for m in adapted]
    for m in adapted:
        m.lora_scale = 0.0
    try:
        yield model
    finally:
        for m, scale in zip(adapted, scales):
            m.lora_scale = scale


# an empty micro-batch: a one-token row with advantage 0 (no loss, no gradient) that keeps FSDP's collectives in step
PADDING = [Rollout([0], [0], 0.0)]


def update_policy(model, optimizer, groups, cfg: GRPOConfig, reference=None):
    """The GRPO update on one step's rollouts: cfg.updates_per_batch AdamW steps, each a forward and backward in
    micro-batches of at most cfg.micro_batch_tokens positions, whose losses add up to the loss of the whole step
    (cfg.loss_agg: by default the token mean over every completion token of the step). groups: the kept groups as
    lists of Rollouts. reference: the frozen model of the KL term (beta > 0). Returns the stats of the log; a step
    whose loss or gradient is not finite is skipped and counted.

    tis_cap C: truncated importance sampling (TRL's vllm_importance_sampling_correction, verl's rollout_is), for
    when the policy that sampled is not exactly the one trained (the bf16 sampling copy, or bf16 kernels): each
    token's surrogate is weighted by min(pi_old / pi_sampler, C), detached, pi_old the trainer's probability of the
    token before this step's update."""
    num_tokens = max(sum(len(r.completion) for group in groups for r in group), 1)  # the loss's divisors
    num_sequences = max(sum(len(group) for group in groups), 1)
    # torchrun: this process trains on every world-th group (the gradients are summed below), in as many forward
    # passes as every other process (under FSDP each pass gathers the weights from all of them)
    rollouts = [r for group in groups[get_rank()::get_world_size()] for r in group]
    micro_batches = [rollouts[part] for part in token_budget_batches(
        [r.prompt for r in rollouts], [r.completion for r in rollouts], cfg.micro_batch_tokens)]
    micro_batches += [PADDING] * (max(gather(len(micro_batches))) - len(micro_batches))
    mixed = autocast(cfg.device, cfg.precision)

    def logprobs(net, batch, **kw):
        return completion_logprobs(net, [r.prompt for r in batch], [r.completion for r in batch], cfg.temperature,
                                   **kw)

    old_logps = None
    if cfg.updates_per_batch > 1:  # the rollout policy's log-probs: the ratio's denominator in later updates
        with torch.no_grad(), mixed:
            old_logps = [logprobs(model, batch)[0] for batch in micro_batches]
    stats = dict(loss=0.0, grad_norm=0.0, clip_fraction=0.0, entropy=0.0, skipped=0)
    tis = [0.0, 0.0]  # sum of the importance ratios pi_old / pi_sampler over the tokens, and the largest
    is_weights = {}  # tis_cap: each micro-batch's, the same in every update (pi_old and pi_sampler do not change)
    for _ in range(cfg.updates_per_batch):
        sums = [0.0, 0.0, 0.0]  # loss, clipped tokens, entropy: summed over micro-batches (and processes)
        for i, batch in enumerate(micro_batches):
            with mixed:
                logp, mask, entropy = logprobs(model, batch, with_entropy=True)
                ref_logp = None
                if reference is not None:  # under LoRA the reference is the model itself, its adapters off
                    with torch.no_grad(), adapters_off(reference):
                        ref_logp = logprobs(reference, batch)[0]
            # with one update per batch old_logp is logp itself, detached: the ratio is 1, the clip inactive
            old_logp = old_logps[i] if old_logps else logp.detach()
            advantages = torch.tensor([r.advantage for r in batch], device=logp.device)
            if cfg.tis_cap and batch is not PADDING and i not in is_weights:
                sampler = torch.zeros_like(old_logp)
                for row, r in enumerate(batch):
                    sampler[row, :len(r.sampler_logp)] = torch.tensor(r.sampler_logp, device=sampler.device)
                ratio = torch.exp(old_logp - sampler) * mask
                is_weights[i] = ratio.clamp(max=cfg.tis_cap)
                tis = [tis[0] + ratio.sum().item(), max(tis[1], ratio.max().item())]
            loss, loss_stats = grpo_loss(logp, old_logp, advantages, mask, cfg.clip_low, cfg.clip_high, ref_logp,
                                         cfg.beta, num_tokens, cfg.loss_agg, num_sequences, cfg.max_new_tokens,
                                         is_weights.get(i))
            loss.backward()
            if batch is not PADDING:  # (a padding pass adds no loss, but its one token has an entropy)
                sums = [sums[0] + loss.item(), sums[1] + loss_stats["clip_fraction"] * mask.sum().item(),
                        sums[2] + entropy.sum().item()]
        # torchrun: the gradient of the whole step on every process, and the logged sums of every process
        sum_gradients(model)
        loss_sum, clipped_tokens, entropy_sum = sum_across(sums)
        grad_norm = clip_gradients(model, cfg.grad_clip)
        if math.isfinite(loss_sum) and math.isfinite(grad_norm):
            optimizer.step()
            stats.update(loss=loss_sum, grad_norm=grad_norm, clip_fraction=clipped_tokens / num_tokens,
                         entropy=entropy_sum / num_tokens)
        else:  # a non-finite loss would poison the weights and AdamW's moments: skip the step
            stats["skipped"] += 1
        optimizer.zero_grad(set_to_none=True)  # no gradient memory held while the next rollouts are sampled
    if cfg.tis_cap:
        stats.update(tis_ratio_mean=sum_across([tis[0]])[0] / num_tokens, tis_ratio_max=max(gather(tis[1])))
    return stats


# ----------------------------------------------------------------------------------------------------------------
# 5. Several processes (torchrun): each rank takes every world-th piece of the work, the gradients are summed.
# Without torchrun's process group every helper is the single-process identity.


def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def gather(value):
    """Every process's `value` (any picklable value), in rank order, on every process."""
    if not dist.is_initialized():
        return [value]
    values = [None] * get_world_size()
    dist.all_gather_object(values, value)
    return values


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
