"""
Supervised Reinforcement Learning (SRL), after Deng et al. 2025, "Supervised Reinforcement Learning: From Expert
Trajectories to Step-wise Reasoning" (arXiv 2510.25992). Given a problem and the expert's first k-1 steps, the policy
writes a monologue in <think> ... </think> and then one action, its guess at step k; the reward compares only the
action with the expert's step k (R = 2M/T, Ratcliff/Obershelp; -1 when the output breaks the format), and GRPO with
dynamic sampling (grpo.py) trains on it. Sections: 1. step_similarity, 2. srl_reward, 3. the prompt, 4. the run.

    python data_prep.py && python sft.py && python srl.py    # tiny model on the built-in data, a few CPU minutes
    python srl.py --model qwen-1.5b --data data/srl_train.jsonl --out runs/srl     # one 80 GB GPU
    python srl.py --model qwen-1.5b --lora-rank 32 --out runs/srl_lora            # LoRA: one 8-24 GB GPU
    python srl.py --model qwen-7b --lora-rank 32 --gpu-memory 24 --plan-only      # will it fit? (any machine)
    python srl.py --resume --out runs/srl                                           # continue a stopped run
    torchrun --nproc_per_node 8 srl.py --model qwen-7b --fsdp --batch-prompts 512 --sample-batch 16   # 8 GPUs

Writes to --out: last/ (for --resume) and best/ (best on validation), Hugging Face folders; metrics.jsonl,
samples.jsonl and plan.json. Defaults by model size: under 50M parameters 4 prompts x G 8, 64 new tokens, lr 3e-5,
20 steps; larger 16 x 8, 1024 tokens, lr 1e-6, one epoch (paper: 512 x 8, lr 5e-7).
Departures from the paper and choices it leaves open:
  - The similarity is our own code, equal to difflib.SequenceMatcher(None, a, b).ratio() (tests check it).
  - The format the -1 punishes is not defined in the paper; parse_action's docstring states ours.
  - Advantages divide by the population std; clip 0.2 / 0.28 (DAPO's); KL coefficient 0, as the paper.
  - The loss is a token mean over the optimiser step (--loss-agg: verl's others); std threshold 0.01; at most
    --max-draws rounds of dynamic sampling a step, then the step trains on the groups it has.
  - AdamW, no weight decay, constant lr, no warm-up; bf16 on GPU samples from a bf16 copy of the fp32 policy.
  - Validation scores each held-out example's greedy action (format failures count 0) and keeps the best.
  - Prompts over --max-prompt-tokens are dropped (counted); agent steps get their own system prompt.
  - --lora-rank R trains LoRA adapters instead of every weight (default lr 10x, the base is the KL reference).
"""
import argparse
import random
from pathlib import Path

import torch

from engine import decode_text, encode_chat, sample_groups
from grpo import FORMAT_FAILURE, LOSS_AGGREGATIONS, PromptStream, collect_groups, rollouts_of, update_policy
from machinery.checks import print0
from machinery.distributed import copy_weights, end_distributed, on_rank_zero
from machinery.run import Run, expected, rollout_samples
from machinery.setup import (add_training_flags, drop_long_prompts, grpo_config, load_for_training, planned_steps,
                             resolve_training, run_settings, start_rl_run)

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
    matched = sum(k for _, _, k in matching_blocks(a, b))  # M
    return 2.0 * matched / (len(a) + len(b))


def matching_blocks(a: str, b: str) -> list:
    """The blocks (i, j, k) with a[i:i+k] == b[j:j+k] that Ratcliff/Obershelp matching finds, as difflib does: the
    longest common block, then the same on the pieces to its left and to its right. M is the sum of their k."""
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
    blocks = []
    todo = [(0, len(a), 0, len(b))]
    while todo:
        alo, ahi, blo, bhi = todo.pop()
        i, j, k = _longest_match(a, b, b2j, alo, ahi, blo, bhi)
        if k:
            blocks.append((i, j, k))
            if alo < i and blo < j:
                todo.append((alo, i, blo, j))
            if i + k < ahi and j + k < bhi:
                todo.append((i + k, ahi, j + k, bhi))
    return sorted(blocks)


# ----------------------------------------------------------------------------------------------------------------
# 2. The SRL reward: only the action after </think> is scored, never the monologue.

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
# 3. The prompt: the problem and the expert's steps so far; the model continues with the next step only.

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
    for them before training starts (machinery/files.py's check_fields)."""
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
# 4. The run: the command line, validation, then the loop (rollouts, advantages, update, validation, checkpoints),
# shared with rlvr.py

SMALL_MODEL_DEFAULTS = dict(batch_prompts=4, group_size=8, max_new_tokens=64, lr=3e-5, max_steps=20)
LARGE_MODEL_DEFAULTS = dict(batch_prompts=16, group_size=8, max_new_tokens=1024, lr=1e-6, max_steps=None)
STATE_KEYS = ("args", "optimizer", "rng", "step", "position", "best", "skipped")  # what --resume reads


def training_arguments(description, data_default, out_default, std_threshold_default):
    """The command line of the GRPO loop (rlvr.py builds its own with this function): the flags every training
    stage shares (machinery/setup.py), then GRPO's. Flags left at None take the model's size class's defaults
    (SMALL_MODEL_DEFAULTS / LARGE_MODEL_DEFAULTS)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_flags(p, "runs/sft" if Path("runs/sft").is_dir() else "tiny", data_default, out_default,
                       save_every=10)
    arg = p.add_argument
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
    arg("--sample-batch", type=int, default=None, help="prompts each process samples at once, G completions each "
        "(default: the memory plan's; its whole share of a draw when that fits)")
    # GRPO loss
    arg("--no-std-scale", action="store_true", help="advantage r - mean, without dividing by the group's std")
    arg("--clip-low", type=float, default=0.2, help="ratio clipped below at 1 - clip-low (not in the paper; DAPO)")
    arg("--clip-high", type=float, default=0.28, help="ratio clipped above at 1 + clip-high (DAPO's 0.28)")
    arg("--beta", type=float, default=0.0, help="k3 KL coefficient to the initial model (paper: 0)")
    arg("--loss-agg", choices=LOSS_AGGREGATIONS, default="token-mean", help="how token losses add up (verl's "
        "loss_agg_mode): over every token of the step; each completion's mean, then their mean (GRPO as first "
        "written); each completion's sum over --max-new-tokens, then their mean (Dr. GRPO)")
    arg("--tis-cap", type=float, default=0.0, help="truncated importance sampling: weight each token by min(pi_old / "
        "pi_sampler, cap), for a sampler that is not exactly the trainer, the bf16 copy (0: off)")
    arg("--mask-truncated", action="store_true", help="completions cut at --max-new-tokens get no loss (DAPO's "
        "overlong filtering; their rewards still count in their group)")
    # Optimisation and validation
    arg("--epochs", type=float, default=1.0, help="passes over the training prompts when --max-steps is not set")
    arg("--updates-per-batch", type=int, default=1, help="optimiser steps on each rollout batch (paper: 1; with 1 "
        "the importance ratio is 1 and the clip never acts)")
    arg("--grad-clip", type=float, default=1.0, help="gradient norm clip (paper: 1.0)")
    arg("--eval-every", type=int, default=10, help="validate every N steps (0: only at the end)")
    arg("--val-limit", type=int, default=64, help="validation examples used")
    arg("--log-samples", type=int, default=10, help="every N steps, a training group's best and worst rollouts go "
        "to <out>/samples.jsonl, as the first validation outputs do at each validation (0: none)")
    arg("--fsdp", action="store_true", help="under torchrun: shard weights, gradients and AdamW states (FSDP2)")
    return p


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


def validate(policy, tokenizer, examples, build_prompt, reward_fn, max_new_tokens, limit=64, seed=0, shown=3):
    """The greedy action of each validation example (validation_sample): the mean reward, format failures counted as
    0, and the format rate; and the first `shown` outputs, for samples.jsonl."""
    examples = validation_sample(examples, limit, seed)
    prompts = [encode_chat(tokenizer, build_prompt(example)) for example in examples]
    groups = sample_groups(policy, prompts, 1, max_new_tokens, temperature=0, desc="validate")
    texts = [decode_text(tokenizer, c) for [c] in groups]
    rewards = [reward_fn(text, example) for text, example in zip(texts, examples)]
    samples = [dict(kind="validation", id=example.get("id"), completion=text, expected=expected(example),
                    reward=reward) for example, text, reward in list(zip(examples, texts, rewards))[:shown]]
    return dict(val_score=sum(max(r, 0.0) for r in rewards) / max(len(rewards), 1),
                val_format_rate=sum(r != FORMAT_FAILURE for r in rewards) / max(len(rewards), 1)), samples


def train(args, build_prompt, reward_fn, fields=None):
    """The GRPO loop shared by SRL (reward: step similarity) and RLVR (reward: final-answer correctness).
    build_prompt(example) -> chat messages; reward_fn(completion text, example) -> float; fields(example): what the
    two read from an example, checked in every record before anything loads. Returns the trained model."""
    # The setup (machinery/setup.py): every flag, file and folder checked, --resume's flags and the size class's
    # defaults filled in, torchrun and the memory plan, each decision printed, before any weight loads
    state, config = resolve_training(args, STATE_KEYS, SMALL_MODEL_DEFAULTS, LARGE_MODEL_DEFAULTS)
    examples, val_examples, plan = start_rl_run(args, config, fields)
    model, tokenizer, policy, reference = load_for_training(args, state, sampling=True)
    examples, val_examples = drop_long_prompts(args, tokenizer, build_prompt, examples, val_examples)
    cfg = grpo_config(args)  # from here on the loop reads plain values
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    stream = PromptStream(len(examples), args.seed, state["position"] if state else 0)  # the prompts' order
    skipped = state["skipped"] if state else 0  # updates skipped for a non-finite loss or gradient, in all
    run = Run(run_settings(args, plan), model, tokenizer, optimizer, state, planned_steps(args, len(examples)),
              validating=bool(val_examples))  # logs, checkpoints, the clock, stopping (machinery/run.py)
    stop_ids = set(policy.stop_token_ids)
    for _ in run.steps():
        position = stream.position
        # 1. rollouts and rewards, with dynamic sampling: groups whose rewards do not vary are dropped
        kept_groups, log = collect_groups(cfg, policy, tokenizer, examples, stream, build_prompt, reward_fn)
        if run.stopped_before_update():  # a signal (SIGTERM, Ctrl-C): the step is dropped, the run stops
            stream.position = position
            break
        # 2. advantages within each group; every completion becomes one Rollout of the update
        rollouts, truncated = rollouts_of(kept_groups, cfg.scale_by_std, cfg.mask_truncated, stop_ids)
        # 3. the clipped GRPO update; then the sampling copy, if there is one, takes the new weights
        stats = update_policy(model, optimizer, rollouts, cfg, reference) if kept_groups else {}
        if policy is not model and kept_groups:
            copy_weights(policy, model)
        # 4. validation: the paper keeps the checkpoint that scores best on held-out steps. Under torchrun rank 0
        # validates and every process learns the result, since saving gathers FSDP's shards from all of them
        if run.validation_due():
            run.keep_if_best(*on_rank_zero(validate, policy, tokenizer, val_examples, build_prompt, reward_fn,
                                           cfg.max_new_tokens, args.val_limit, args.seed))
        # 5. the log line, the samples to read, and the checkpoint that --resume continues from
        skipped_now = stats.pop("skipped", 0)
        skipped += skipped_now
        log.update(stats, kept_groups=len(kept_groups), skipped_steps=skipped,
                   **({"masked_truncated": truncated} if cfg.mask_truncated else {}))
        samples = rollout_samples(tokenizer, kept_groups[0], rollouts[0]) if kept_groups else ()
        if run.end_step(log, dict(position=stream.position, skipped=skipped), skipped_now == cfg.updates_per_batch,
                        samples):
            break
    status = run.finish()
    end_distributed()
    if status:
        raise SystemExit(status)
    if run.done > run.started_at:
        score = f", best validation score {run.best:.3f}" if run.validating else ""
        print0(f"done: {run.total_steps} steps{score}; the model: {Path(args.out) / 'best'} (last step: "
               f"{Path(args.out) / 'last'}); next: python evaluate.py --model {Path(args.out) / 'best'}")
    return model


def main(argv=None):
    args = training_arguments(__doc__, "data/srl_train.jsonl", "runs/srl", 0.01).parse_args(argv)
    return train(args, srl_messages, lambda completion, example: srl_reward(completion, example["target_step"]),
                 srl_fields)


if __name__ == "__main__":
    main()
