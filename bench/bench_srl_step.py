"""Where the time of one SRL training step goes, on SmolLM2-135M-Instruct (fp32, CPU by default).

One step does the work of srl.train for one rollout batch, with srl.py's and model.py's own functions:
  sample    model.generate: each prompt prefilled once, G completions drawn at temperature 1.0
  reward    srl.srl_reward on every decoded completion against the expert step
  forward   model.completion_logprobs (each group packed as prompt + its G completions, with entropy), then
            srl.grpo_loss
  backward  loss.backward() of each micro-batch
  optimizer clip_grad_norm_ and AdamW.step
Unlike srl.train, every group is trained on (no dynamic sampling): an untrained model's groups often score all -1
(format failures), which srl.train would skip, and the benchmark wants the same work at every step.

Prompts are s1K problems (../shared/data/trajectories/s1k_problems_solutions.json) cut into numbered steps with
data_prep.split_steps; each problem gives one SRL example (its middle step as the target) when that prompt fits in
--max-prompt-tokens, so step s uses the problems s*P .. s*P+P-1 of those.

    python bench/bench_srl_step.py --threads 1          # 4 prompts x 4 samples, 64 new tokens, 5 steps
    python bench/bench_srl_step.py --threads 1 --trl    # also TRL's GRPOTrainer on the same prompts and settings
    python bench/bench_srl_step.py --prompts 2 --group-size 8 --new-tokens 128 --steps 3

On a machine shared with other work, give torch no more threads than there are idle cores: on 2 cores with one
busy, 2 threads made every step several times slower than 1 (each parallel op waits for the preempted thread).
Memory: the update holds about 1.4 MB of activations per token (fp32). A micro-batch holds each group's prompt once
(completion_logprobs packs a group into one row), so 4 samples of a 512-token prompt are ~800 tokens, not ~2,300;
with the default prompt cap of 512 tokens the process peaked at 6.0 GiB (it was near 12 GiB without packing).

--trl needs `pip install trl` (1.16 works with transformers 5.24 and torch 2.13; it adds datasets, not torch).
TRL runs with gradient checkpointing off (its default is on; srl.py's is off), the same micro-batch of
completions, lr, clip range, grad clip and beta 0, no dataset shuffling; its generation is timed apart.
"""
import argparse
import copy
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import data_prep  # noqa: E402
import grpo  # noqa: E402
import srl  # noqa: E402
from engine import completion_logprobs, decode_text, encode_chat, generate  # noqa: E402
from machinery.checks import smollm2_folder  # noqa: E402
from machinery.distributed import copy_weights  # noqa: E402
from machinery.setup import keep_freed_memory  # noqa: E402
from model import load_model  # noqa: E402
from tasks.sources import normalize  # noqa: E402

S1K = ROOT.parent / "shared" / "data" / "trajectories" / "s1k_problems_solutions.json"
PHASES = ["sample", "reward", "forward", "backward", "optimizer"]


def load():
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def s1k_examples(count, tokenizer, max_prompt_tokens):
    """One SRL example (target: the middle step) from each of the first `count` s1K solutions with 2+ steps whose
    prompt fits in max_prompt_tokens."""
    records = json.loads(S1K.read_text())
    fields = {"question": "problem", "solution": "solution", "answer": None, "reasoning": None}
    examples = []
    for problem in normalize(records, fields):
        steps = data_prep.split_steps(problem["solution"])
        if len(steps) >= 2:
            candidates = data_prep.srl_examples(problem, steps)
            example = candidates[len(candidates) // 2]
            if len(encode_chat(tokenizer, srl.srl_messages(example))) <= max_prompt_tokens:
                examples.append(example)
        if len(examples) == count:
            return examples
    raise SystemExit(f"{S1K}: only {len(examples)} solutions with numbered steps and a short enough prompt, "
                     f"{count} needed")


def run_ours(args, folder, examples):
    """Per step: seconds of each phase, plus token counts."""
    model, tokenizer = load_model(folder, device="cpu", dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    policy = model if args.precision == "fp32" else copy.deepcopy(model).to(torch.bfloat16)  # srl.py's sampling copy
    steps = []
    for step in range(args.steps):
        batch = examples[step * args.prompts:(step + 1) * args.prompts]
        t = {phase: 0.0 for phase in PHASES}
        start = time.perf_counter()
        prompts = [encode_chat(tokenizer, srl.srl_messages(ex)) for ex in batch]
        outputs = generate(policy, prompts, args.new_tokens, temperature=1.0, num_samples=args.group_size, seed=step)
        t["sample"] = time.perf_counter() - start

        start = time.perf_counter()
        G = args.group_size
        rewards = torch.tensor([[srl.srl_reward(decode_text(tokenizer, c), ex["target_step"])
                                 for c in outputs[i * G:(i + 1) * G]] for i, ex in enumerate(batch)])
        t["reward"] = time.perf_counter() - start

        # the update, as in srl.train with one update per rollout batch (old_logp = logp detached)
        advantages = grpo.group_advantages(rewards).flatten().tolist()
        rows = [(prompts[i // G], c, a) for i, (c, a) in enumerate(zip(outputs, advantages)) if len(c) > 0]
        num_tokens = max(sum(len(c) for _, c, _ in rows), 1)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        for s in range(0, len(rows), args.micro_batch):
            chunk = rows[s:s + args.micro_batch]
            start = time.perf_counter()
            with grpo.autocast("cpu", args.precision):
                logp, mask, entropy = completion_logprobs(model, [r[0] for r in chunk], [r[1] for r in chunk], 1.0,
                                                          with_entropy=True)
            adv = torch.tensor([r[2] for r in chunk])
            loss, _ = grpo.grpo_loss(logp, logp.detach(), adv, mask, 0.2, 0.28, num_tokens=num_tokens)
            t["forward"] += time.perf_counter() - start
            start = time.perf_counter()
            loss.backward()
            loss.item(), entropy.sum().item()  # srl.train reads these for its log
            t["backward"] += time.perf_counter() - start
        start = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if policy is not model:
            copy_weights(policy, model)
        t["optimizer"] = time.perf_counter() - start
        t["total"] = sum(t[p] for p in PHASES)
        # completion_logprobs packs the rows of one prompt within a micro-batch: that prompt goes through once
        t["prompt_tokens"] = sum(len(r[0]) for i, r in enumerate(rows)
                                 if i % args.micro_batch == 0 or r[0] != rows[i - 1][0])
        t["completion_tokens"] = num_tokens
        t["format_failures"] = int((rewards == srl.FORMAT_FAILURE).sum())
        steps.append(t)
        print(f"  ours step {step + 1}: {t['total']:.1f} s ({', '.join(f'{p} {t[p]:.1f}' for p in PHASES)}), "
              f"load {load()}", flush=True)
    return steps


def run_trl(args, folder, examples):
    """Seconds per optimizer step of TRL's GRPOTrainer, and of its generation within each step."""
    try:
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as error:
        raise SystemExit(f"--trl needs TRL: pip install trl ({error})")
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    examples = examples[:args.steps * args.prompts]
    dataset = Dataset.from_list([{"prompt": srl.srl_messages(ex), "target_step": ex["target_step"]}
                                 for ex in examples])

    def reward(completions, target_step, **kwargs):
        return [srl.srl_reward(c[0]["content"], target) for c, target in zip(completions, target_step)]

    completions_per_step = args.prompts * args.group_size
    config = GRPOConfig(
        output_dir="/tmp/bench_srl_step_trl", use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, max_steps=args.steps, learning_rate=args.lr, weight_decay=0.0,
        lr_scheduler_type="constant", max_grad_norm=1.0, num_generations=args.group_size,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=completions_per_step // args.micro_batch,
        max_completion_length=args.new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=0.0, epsilon=0.2,
        epsilon_high=0.28, loss_type="dapo", gradient_checkpointing=False, shuffle_dataset=False,
        dataloader_pin_memory=False, seed=0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.last, self.times = time.perf_counter(), []

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now
            print(f"  TRL step {len(self.times)}: {self.times[-1]:.1f} s (generation {generation_times[-1]:.1f}), "
                  f"load {load()}, {torch.get_num_threads()} threads", flush=True)

    timer, generation_times = StepTimer(), []
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    generate_once = trainer._generate_single_turn

    def timed_generation(*a, **k):
        start = time.perf_counter()
        result = generate_once(*a, **k)
        generation_times.append(time.perf_counter() - start)
        return result

    trainer._generate_single_turn = timed_generation
    trainer.train()
    return timer.times, generation_times


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--group-size", type=int, default=4, help="samples per prompt, G")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported")
    p.add_argument("--micro-batch", type=int, default=8, help="completions per forward/backward (srl.py: 8)")
    p.add_argument("--max-prompt-tokens", type=int, default=512, help="skip problems with longer SRL prompts")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--trl", action="store_true", help="also time TRL's GRPOTrainer at the same settings")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: srl.py's bf16 on CPU (a bf16 "
                   "sampling copy, the update under bf16 autocast over fp32 weights)")
    args = p.parse_args()
    if (args.prompts * args.group_size) % args.micro_batch:
        raise SystemExit("--micro-batch must divide prompts * group-size (TRL accumulates whole micro-batches)")
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as every training stage does on CPU (machinery/setup.py)
    folder = smollm2_folder()
    from transformers import AutoTokenizer  # the tokenizer load_model gives, without loading the weights
    examples = s1k_examples(args.prompts * args.steps, AutoTokenizer.from_pretrained(folder), args.max_prompt_tokens)
    print(f"SmolLM2-135M-Instruct {args.precision} CPU, {args.prompts} prompts x {args.group_size} samples, "
          f"{args.new_tokens} new tokens, {args.steps} steps, {torch.get_num_threads()} threads, "
          f"load average {load()}", flush=True)

    ours = run_ours(args, folder, examples)
    median = {k: statistics.median(s[k] for s in ours) for k in ours[0]}
    print(f"\nload average after ours: {load()}, "
          f"peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")
    print(f"\nmedian per step, ours: {median['prompt_tokens']:.0f} prompt + {median['completion_tokens']:.0f} "
          f"completion tokens through the network in the update, {median['format_failures']:.0f} of "
          f"{args.prompts * args.group_size} completions break the format\n")
    print("| phase | median s | share |\n|---|---:|---:|")
    for phase in PHASES + ["total"]:  # total: the median of the step totals
        print(f"| {phase} | {median[phase]:.2f} | {100 * median[phase] / median['total']:.0f}% |")

    if args.trl:
        trl_steps, trl_generation = run_trl(args, folder, examples)
        trl_median = statistics.median(trl_steps)
        print(f"\nload average after TRL: {load()}\n")
        print("| | ours | TRL GRPOTrainer | TRL / ours |\n|---|---:|---:|---:|")
        print(f"| median step, s | {median['total']:.2f} | {trl_median:.2f} | {trl_median / median['total']:.2f}x |")
        trl_gen = statistics.median(trl_generation)
        print(f"| of which sampling, s | {median['sample']:.2f} | {trl_gen:.2f} | {trl_gen / median['sample']:.2f}x |")
        rest = statistics.median(s - g for s, g in zip(trl_steps, trl_generation))
        ours_rest = statistics.median(s["total"] - s["sample"] for s in ours)
        print(f"| the rest, s | {ours_rest:.2f} | {rest:.2f} | {rest / ours_rest:.2f}x |")


if __name__ == "__main__":
    main()
