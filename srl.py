"""
Supervised Reinforcement Learning (SRL), after Deng et al. 2025, "Supervised Reinforcement Learning: From Expert
Trajectories to Step-wise Reasoning" (arXiv 2510.25992).

SRL turns each expert solution into step-wise examples: given the problem and the expert's first k-1 steps, the
policy writes a private monologue in <think> ... </think> and then one action, its guess at step k. The reward
compares only that action with the expert's step k (R = 2M/T, Ratcliff/Obershelp similarity, -1 when the output
breaks the format), and the policy is trained with GRPO plus dynamic sampling.

In reading order: 1. step_similarity (R = 2M/T by hand, equal to difflib's ratio), 2. srl_reward (format check
and reward), 3. group_advantages, keep_group, grpo_loss (the GRPO pieces, also used by rlvr.py), 4. the training
loop (usage: python srl.py --model tiny; the flags are in its argparse block).

Departures from the paper and choices it leaves open (known so far):
  - The similarity is our own code, not a difflib call; the tests check it equals
    difflib.SequenceMatcher(None, a, b).ratio() bit for bit, including difflib's "autojunk" rule.
  - The paper gives -1 to outputs that break the format but does not define the format; srl_reward's docstring
    states our rule.
  - The advantage divides by the population std of the group (the paper says "group std").
  - Clip range 0.2 low / 0.28 high (DAPO's asymmetric clip); the paper does not report it.
  - The loss is a token mean over all completion tokens of the optimiser step, so micro-batches add up exactly.
  - The dynamic-sampling std threshold is not reported in the paper; it is a flag of the loop.
  - KL coefficient 0 as in the paper; the k3 estimator against a frozen reference is available with beta > 0.
"""
import torch

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


def srl_messages(example):
    """Chat messages for one SRL example (data_prep.py's fields). An agentic example carries its context as
    messages already (the issue and the last action/observation pairs); the system prompt is put in front."""
    if "messages" in example:
        return [{"role": "system", "content": SYSTEM_PROMPT}] + example["messages"]
    steps = "\n\n".join(example["previous_steps"]) or "(no steps yet)"
    user = f"Problem:\n{example['problem']}\n\nSolution so far:\n{steps}"
    if example.get("next_step_title"):
        user += f"\n\nThe next step is titled: {example['next_step_title']}"
    user += "\n\nWrite the next step."
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


# ----------------------------------------------------------------------------------------------------------------
# 5. The training loop (rollouts, rewards, dynamic sampling, updates, validation, checkpoints), shared with rlvr.py.
