"""
GRPO as SRL trains with it, in one file that reads without SRL around it (after GRPO-Zero's grpo.py): the
group-relative advantage (Shao et al. 2024, DeepSeekMath), the clipped surrogate with DAPO's asymmetric clip and
its dynamic sampling (Yu et al. 2025), the rollouts and the update. srl.py and rlvr.py call collect_groups and
update_policy once per step, each with its own prompt and reward.

    1. group_advantages, keep_group, grpo_loss: the three formulas.
    2. Group, Rollout, PromptStream: what a step passes around.
    3. collect_groups: rollouts and rewards, with dynamic sampling; rollouts_of: their advantages.
    4. update_policy: the clipped policy-gradient step, in micro-batches that add up to the step's token mean.

Under torchrun each process samples its share of every draw of prompts and trains on its share of the kept groups;
the lines where that shows are commented "torchrun:". The sampler and the log-probs are engine.py's; the helpers
for several processes are common.py's.
"""
import math
import random
from typing import NamedTuple

import torch

from common import clip_gradients, gather, get_rank, get_world_size, sum_across, sum_gradients
from engine import completion_logprobs, mix_seed, sample_groups, token_budget_batches
from model import adapters_off, autocast, decode_text, encode_chat

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
# 2. What a step passes around


class Group(NamedTuple):
    """The G rollouts of one prompt (a kept group of dynamic sampling)."""
    prompt: list  # token ids of the chat prompt
    completions: list  # G lists of sampled token ids, the stop token kept
    rewards: torch.Tensor  # [G]
    sampler_logps: list = None  # with --tis-cap: each token's log-probability under the sampler
    example: dict = None  # the training example it came from (for samples.jsonl)


class Rollout(NamedTuple):
    """One completion as the update sees it."""
    prompt: list
    completion: list
    advantage: float  # group-relative, shared by every token of the completion
    sampler_logp: list = None  # with --tis-cap: each token's log-probability under the sampler


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


def collect_groups(args, policy, tokenizer, examples, stream, build_prompt, reward_fn):
    """Rollouts with dynamic sampling (the paper's SRL section, after DAPO): draw prompts, sample G completions
    each, score them, keep the groups whose reward std exceeds the threshold; repeat until batch_prompts groups are
    kept or max_draws rounds are spent. Returns the kept Groups and counters for the log."""
    kept_groups = []
    drawn = []  # (completions, rewards) of every group sampled in this step, kept or not: for the log
    for _ in range(args.max_draws):
        need = args.batch_prompts - len(kept_groups)
        if need <= 0:
            break
        # each prompt's rollouts draw from their own seed, (run seed, place in the prompt stream): a resumed run, or
        # another number of processes, samples the same tokens
        seeds = [mix_seed(args.seed, stream.position + i) for i in range(need)]
        batch = [examples[stream.next()] for _ in range(need)]
        prompts = [encode_chat(tokenizer, build_prompt(example)) for example in batch]
        # torchrun: this process samples and scores every world-th prompt of the draw, then every process gets
        # every group, so that each keeps what one process would
        share = list(range(get_rank(), need, get_world_size()))
        groups = sample_groups(policy, [prompts[i] for i in share], args.group_size, args.max_new_tokens,
                               args.sample_batch, [seeds[i] for i in share], temperature=args.temperature,
                               return_logprobs=bool(args.tis_cap))
        groups, logps = groups if args.tis_cap else (groups, [None] * len(share))
        scored = {i: (group, [reward_fn(decode_text(tokenizer, c), batch[i]) for c in group], logp)
                  for i, group, logp in zip(share, groups, logps)}
        scored = {i: value for part in gather(scored) for i, value in part.items()}
        for i in range(need):
            completions, rewards, logp = scored[i][0], torch.tensor(scored[i][1]), scored[i][2]
            drawn.append((completions, rewards))
            if bool(keep_group(rewards, args.std_threshold)) and len(kept_groups) < args.batch_prompts:
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


def rollouts_of(kept_groups, scale_by_std, drop_truncated=False, stop_ids=()):
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

# an empty micro-batch: a one-token row with advantage 0 (no loss, no gradient) that keeps FSDP's collectives in step
PADDING = [Rollout([0], [0], 0.0)]


def update_policy(model, optimizer, groups, args, reference=None):
    """The GRPO update on one step's rollouts: --updates-per-batch AdamW steps, each a forward and backward in
    micro-batches of at most --micro-batch-tokens positions, whose losses add up to the loss of the whole step
    (--loss-agg: by default the token mean over every completion token of the step). groups: the kept groups as
    lists of Rollouts. Returns the stats of the log; a step whose loss or gradient is not finite is skipped and
    counted.

    --tis-cap C: truncated importance sampling (TRL's vllm_importance_sampling_correction, verl's rollout_is), for
    when the policy that sampled is not exactly the one trained (the bf16 sampling copy, or bf16 kernels): each
    token's surrogate is weighted by min(pi_old / pi_sampler, C), detached, pi_old the trainer's probability of the
    token before this step's update."""
    num_tokens = max(sum(len(r.completion) for group in groups for r in group), 1)  # the loss's divisors
    num_sequences = max(sum(len(group) for group in groups), 1)
    # torchrun: this process trains on every world-th group (the gradients are summed below), in as many forward
    # passes as every other process (under FSDP each pass gathers the weights from all of them)
    rollouts = [r for group in groups[get_rank()::get_world_size()] for r in group]
    micro_batches = [rollouts[part] for part in token_budget_batches(
        [r.prompt for r in rollouts], [r.completion for r in rollouts], args.micro_batch_tokens)]
    micro_batches += [PADDING] * (max(gather(len(micro_batches))) - len(micro_batches))
    mixed = autocast(args.device, args.precision)

    def logprobs(net, batch, **kw):
        return completion_logprobs(net, [r.prompt for r in batch], [r.completion for r in batch], args.temperature,
                                   **kw)

    old_logps = None
    if args.updates_per_batch > 1:  # the rollout policy's log-probs: the ratio's denominator in later updates
        with torch.no_grad(), mixed:
            old_logps = [logprobs(model, batch)[0] for batch in micro_batches]
    stats = dict(loss=0.0, grad_norm=0.0, clip_fraction=0.0, entropy=0.0, skipped=0)
    tis = [0.0, 0.0]  # sum of the importance ratios pi_old / pi_sampler over the tokens, and the largest
    is_weights = {}  # --tis-cap: each micro-batch's, the same in every update (pi_old and pi_sampler do not change)
    for _ in range(args.updates_per_batch):
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
            if args.tis_cap and batch is not PADDING and i not in is_weights:
                sampler = torch.zeros_like(old_logp)
                for row, r in enumerate(batch):
                    sampler[row, :len(r.sampler_logp)] = torch.tensor(r.sampler_logp, device=sampler.device)
                ratio = torch.exp(old_logp - sampler) * mask
                is_weights[i] = ratio.clamp(max=args.tis_cap)
                tis = [tis[0] + ratio.sum().item(), max(tis[1], ratio.max().item())]
            loss, loss_stats = grpo_loss(logp, old_logp, advantages, mask, args.clip_low, args.clip_high, ref_logp,
                                         args.beta, num_tokens, args.loss_agg, num_sequences, args.max_new_tokens,
                                         is_weights.get(i))
            loss.backward()
            if batch is not PADDING:  # (a padding pass adds no loss, but its one token has an entropy)
                sums = [sums[0] + loss.item(), sums[1] + loss_stats["clip_fraction"] * mask.sum().item(),
                        sums[2] + entropy.sum().item()]
        # torchrun: the gradient of the whole step on every process, and the logged sums of every process
        sum_gradients(model)
        loss_sum, clipped_tokens, entropy_sum = sum_across(sums)
        grad_norm = clip_gradients(model, args.grad_clip)
        if math.isfinite(loss_sum) and math.isfinite(grad_norm):
            optimizer.step()
            stats.update(loss=loss_sum, grad_norm=grad_norm, clip_fraction=clipped_tokens / num_tokens,
                         entropy=entropy_sum / num_tokens)
        else:  # a non-finite loss would poison the weights and AdamW's moments: skip the step
            stats["skipped"] += 1
        optimizer.zero_grad(set_to_none=True)  # no gradient memory held while the next rollouts are sampled
    if args.tis_cap:
        stats.update(tis_ratio_mean=sum_across([tis[0]])[0] / num_tokens, tis_ratio_max=max(gather(tis[1])))
    return stats
