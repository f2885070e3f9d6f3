"""
One SRL step in slow motion, for a class or a first reading: every piece of the method on a real example, printing
the real values, each cell calling the project's own functions. Cells are marked `# %%`: VS Code, PyCharm and Jupyter
(with jupytext) open the file as a notebook; `python walkthrough.py` runs it top to bottom on a CPU in about a minute,
offline, on the built-in problems and the tiny model after a short warm start.

    python walkthrough.py
"""
# %% [markdown]
# ## 1. An expert solution, split into steps
# SRL (Deng et al. 2025, section 3) learns from an expert's solution one step at a time. data_prep.py splits a
# solution written as numbered steps (split_steps), then makes the partial trajectories: the problem and steps
# 1..k-1 as the context, step k as the target (srl_examples).

# %%
import random

import torch

import data_prep
import sft
from engine import decode_text, encode_chat, sample_groups
from grpo import (GRPOConfig, Group, PromptStream, collect_groups, group_advantages, grpo_loss, keep_group,
                  rollouts_of, update_policy)
from srl import matching_blocks, parse_action, srl_messages, srl_reward, step_similarity
from tasks.sources import BUILTIN_FIELDS, normalize

torch.manual_seed(0)
torch.set_num_threads(1)  # the model is tiny: a second thread mostly waits
problems = normalize(data_prep.builtin_problems(), BUILTIN_FIELDS)
problem = next(p for p in problems if len(data_prep.split_steps(p["solution"])) == 3)
steps = data_prep.split_steps(problem["solution"])
print("PROBLEM:", problem["problem"], "\n")
for step in steps:
    print("STEP:", step.replace("\n", " "))

# %% [markdown]
# ## 2. One partial trajectory, and the prompt the model sees
# Given steps 1..k-1, the policy writes a monologue inside <think> ... </think>, then its guess at step k: the
# action (section 3.2). The prompt asks for the next step only; the chat template wraps it as the model expects.

# %%
examples = data_prep.srl_examples(problem, steps)
example = examples[0]
print("CONTEXT: the problem and", len(example["previous_steps"]), "step(s); TARGET:", example["target_step"], "\n")
outputs, stats = data_prep.prepare(problems, val_problems=0)
model, tokenizer = sft.fitted_tiny(outputs["sft_srl_train.jsonl"])  # the tiny model, its tokenizer fitted to the data
prompt = encode_chat(tokenizer, srl_messages(example))
print(decode_text(tokenizer, prompt).replace(tokenizer.eos_token, ""), f"\n({len(prompt)} tokens)")

# %% [markdown]
# ## 3. A short warm start
# A random model never writes the format, so every reward would be -1 and no group would carry a signal. sft.py
# teaches it the format first, on SRL-format examples whose monologue is a template (the warm start of small models,
# a departure the quickstart also makes). 400 small steps, most of this file's minute.

# %%
pairs, _, _ = sft.tokenize(outputs["sft_srl_train.jsonl"], tokenizer)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
order = random.Random(0)
for step in range(400):
    batch = order.sample(pairs, 4)
    loss, _, _ = sft.train_step(model, optimizer, batch, 8192, sft.learning_rate(step, 400, 3e-3, 0.05), "cpu")
    if step % 100 == 99:
        print(f"warm start step {step + 1}: loss {loss:.3f}")

# %% [markdown]
# ## 4. G rollouts: monologues and actions
# For each prompt GRPO samples G completions at temperature 1.0 (the paper: G = 8). The reward will look only at the
# action after </think> (parse_action); the monologue is free.

# %%
G = 8
[completions] = sample_groups(model, [prompt], G, 64, seeds=[7], temperature=1.0)
texts = [decode_text(tokenizer, c) for c in completions]
for i, text in enumerate(texts):
    action = parse_action(text)
    monologue = text.split("</think>")[0].replace("<think>", "").strip() if action else text
    print(f"rollout {i}: monologue {monologue[:60]!r}\n           action   {action!r}")

# %% [markdown]
# ## 5. The step reward: R = 2M / T
# Section 3.2: R is the Ratcliff/Obershelp similarity of the action and the expert's step. T is their total length;
# M the characters in the matching blocks: the longest common block, then the same on each side of it. It equals
# difflib.SequenceMatcher.ratio (the tests check), written out in srl.py.

# %%
expert = example["target_step"]
for i, text in enumerate(texts[:3]):
    action = parse_action(text)
    if action is None:
        continue
    blocks = matching_blocks(action, expert)
    matched = sum(k for _, _, k in blocks)
    print(f"rollout {i}: blocks {[action[a:a + k] for a, _, k in blocks]}")
    total = len(action) + len(expert)
    print(f"  M = {matched}, T = {len(action)} + {len(expert)}, R = 2M/T = {2 * matched / total:.3f}"
          f" = step_similarity {step_similarity(action, expert):.3f}")

# %% [markdown]
# ## 6. A format failure costs -1
# An output that breaks the format (no </think>, a second <think>, an empty action) gets -1, below any similarity.

# %%
for broken in ["<think> I know: 10 + 5 = 15", "The next step is 2. Add 5.", "<think>ok</think>   "]:
    print(f"{broken!r}: parse_action {parse_action(broken)!r}, srl_reward {srl_reward(broken, expert)}")
rewards = torch.tensor([srl_reward(text, expert) for text in texts])
print("\nthe group's rewards:", [round(r, 3) for r in rewards.tolist()])

# %% [markdown]
# ## 7. Group advantages
# GRPO compares each rollout with its own group: A = (r - mean) / std over the G rollouts of one prompt (population
# std). Rollouts better than their siblings are pushed up, worse ones down; no value model is needed.

# %%
advantages = group_advantages(rewards)
print("mean", round(rewards.mean().item(), 3), "std", round(rewards.std(unbiased=False).item(), 3))
print("advantages:", [round(a, 2) for a in advantages.tolist()])

# %% [markdown]
# ## 8. Dynamic sampling
# A group whose rewards are all equal has all-zero advantages: no signal. SRL keeps a group only if its reward std
# is above a threshold and samples more prompts until the batch is full (section 3.2, after DAPO).

# %%
flat = torch.full((G,), -1.0)  # every rollout broke the format
print("this group:", bool(keep_group(rewards, 0.01)), "  a group of equal rewards:", bool(keep_group(flat, 0.01)))

# %% [markdown]
# ## 9. The clipped loss, and one update
# The surrogate min(ratio * A, clip(ratio, 1 - 0.2, 1 + 0.28) * A), averaged over the tokens of the step. With one
# optimiser step per batch (the paper's setting) the ratio is exactly 1 and the clip never acts: the gradient is the
# plain policy gradient. It acts when a batch is reused for further updates (--updates-per-batch): after the first
# update the ratio moves away from 1, and the clip bounds it.

# %%
from engine import completion_logprobs  # noqa: E402

group = Group(prompt, completions, rewards)
rollouts, _ = rollouts_of([group])
batch = rollouts[0]
logp, mask = completion_logprobs(model, [r.prompt for r in batch], [r.completion for r in batch])
loss, loss_stats = grpo_loss(logp, logp.detach(), torch.tensor([r.advantage for r in batch]), mask)
print(f"loss {loss.item():.4f}, ratio mean {loss_stats['ratio_mean']:.3f}, "
      f"clipped tokens {loss_stats['clip_fraction']:.0%}")
old_logp = logp.detach()
cfg = GRPOConfig(batch_prompts=1, group_size=G, max_new_tokens=64, micro_batch_tokens=8192)
srl_optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
update = update_policy(model, srl_optimizer, rollouts, cfg)
print("one update:", {k: round(v, 4) for k, v in update.items()})
with torch.no_grad():
    new_logp, _ = completion_logprobs(model, [r.prompt for r in batch], [r.completion for r in batch])
    _, again = grpo_loss(new_logp, old_logp, torch.tensor([r.advantage for r in batch]), mask)
print(f"the same batch again: ratio mean {again['ratio_mean']:.3f}, clipped tokens {again['clip_fraction']:.1%}")

# %% [markdown]
# ## 10. More SRL steps, then the same prompt again
# The loop of srl.py in a few lines: draw prompts, sample and score groups with dynamic sampling (collect_groups),
# advantages within each group (rollouts_of), one clipped update (update_policy); here on this one partial trajectory,
# 30 steps of 16 rollouts. Its mean reward over 64 fresh samples, before and after (format failures count -1).

# %%
def mean_reward(samples=64):
    [group] = sample_groups(model, [prompt], samples, 64, seeds=[123], temperature=1.0)
    rewards = [srl_reward(decode_text(tokenizer, c), expert) for c in group]
    return sum(rewards) / samples, sum(r >= 0 for r in rewards) / samples


before = mean_reward()
cfg = GRPOConfig(batch_prompts=1, group_size=16, max_new_tokens=64, max_draws=1, micro_batch_tokens=8192)
stream = PromptStream(1, seed=0)
reward_fn = lambda text, ex: srl_reward(text, ex["target_step"])  # noqa: E731
for step in range(30):
    kept, log = collect_groups(cfg, model, tokenizer, [example], stream, srl_messages, reward_fn)
    rollouts, _ = rollouts_of(kept)
    if kept:
        update_policy(model, srl_optimizer, rollouts, cfg)
    if step % 5 == 4:
        print(f"SRL step {step + 1}: the group's mean reward {log['reward_mean']:.3f}, kept {len(kept)} of 1")
after = mean_reward()
print(f"\nmean reward of 64 samples: {before[0]:.3f} before, {after[0]:.3f} after "
      f"(well formed: {before[1]:.0%} before, {after[1]:.0%} after)")
