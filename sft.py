"""
Supervised fine-tuning (SFT): the paper's SFT baseline, and the warm start that teaches a model SRL's output format
before SRL. Two kinds of records, told apart by a "completion" field:
  - data/sft_srl_train.jsonl (the default): SRL examples, "completion" = "<think>...</think>" + the next step, after
    srl.srl_messages' prompt: the warm start. A random tiny model, or a real one that never closes </think>, learns to
    write a monologue in the tags and then one step, so that SRL's rewards vary instead of being -1 for every rollout.
  - data/sft_train.jsonl: problem -> the expert's solution (or, with --target reasoning, "<think>" + the reasoning
    trace + "</think>" + the solution) after evaluate.math_messages' prompt: the paper's SFT baselines.

    python data_prep.py && python sft.py                     # tiny warm start on the built-in data (CPU, ~30 s)
    python sft.py --model qwen-1.5b --data data/sft_train.jsonl --target reasoning --out runs/sft_r1
    python sft.py --model qwen-1.5b --data data/sft_train.jsonl --lora-rank 32 --out runs/sft_lora   # a 16 GB GPU
    python sft.py --resume                                   # continue runs/sft/last exactly where it stopped
    torchrun --nproc_per_node 8 sft.py --model qwen-1.5b --data data/sft_train.jsonl --target reasoning   # DDP

The loss is the mean negative log-likelihood of the target tokens and the end-of-turn token after them (the prompt
masked). Writes <out>/last (and metrics.jsonl); for SRL-format data, a format check on held-out SRL prompts at the end
(format_check.json). Defaults: a model under 50M parameters (tiny) lr 3e-3, 12 epochs, batch 4, warm-up 0.05; any
other the paper's lr 5e-6, 3 epochs, warm-up 0.3 then cosine decay, batch 16.
Departures from the paper and choices it leaves open:
  - Not reported in the paper: the batch size (16), AdamW betas (0.9, 0.95), weight decay 0, gradient clip 1.0.
  - The schedule spans --epochs; --max-steps ends the run early without changing it (so a run cut in parts with
    --resume equals the run in one piece).
  - Batches group examples of similar length (sorted within shuffled chunks, then shuffled): less padding.
  - bf16 on GPU keeps fp32 master weights under bf16 autocast; --lora-rank R trains LoRA adapters (lr 10x).
"""
import argparse
import math
import random
import time
from pathlib import Path

import torch

from engine import completion_logprobs, decode_text, encode_chat, mix_seed, sample_groups, token_budget_batches
from evaluate import math_messages
from grpo import autocast, clip_gradients, get_rank, get_world_size, sum_across, sum_gradients
from machinery.checks import print0
from machinery.distributed import end_distributed, init_distributed
from machinery.files import InputError, check_fields, read_jsonl, write_json
from machinery.run import Run, RunLog
from machinery.setup import (add_training_flags, apply_plan, check_flags, load_for_training, refuse, refusing,
                             resolve_training, run_settings)
from model import build_tiny, chatml_tokenizer
from srl import parse_action, srl_fields, srl_messages, srl_reward, validation_sample

SMALL_MODEL_DEFAULTS = dict(lr=3e-3, epochs=12, batch_size=4, warmup_ratio=0.05)  # tiny (memory.is_small_model)
PAPER_DEFAULTS = dict(lr=5e-6, epochs=3, batch_size=16, warmup_ratio=0.3)
STATE_KEYS = ("args", "optimizer", "rng", "step", "epoch", "batch_in_epoch", "skipped_steps")  # what --resume reads

# ----------------------------------------------------------------------------------------------------------------
# 1. Data: JSONL records -> (prompt ids, target ids)


def end_of_turn_id(tokenizer):
    """The token that closes an assistant turn: ChatML's <|im_end|> when the vocabulary has it, else EOS."""
    if "<|im_end|>" in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids("<|im_end|>")
    return tokenizer.eos_token_id


def messages_and_target(record, target="solution", where="data"):
    """(chat messages, target text) of one record: SRL format if it has "completion", else problem -> solution. A
    record without the fields it needs raises InputError naming `where` ("file:line")."""
    if "completion" in record:
        check_fields(record, dict(srl_fields(record), completion=str), where)
        return srl_messages(record), record["completion"]
    if "steps" in record:
        raise InputError(f"{where}: an agent trajectory; train on sft_srl_train.jsonl (one action each)")
    if target == "reasoning" and not record.get("reasoning"):
        raise InputError(f"{where}: no 'reasoning' field (--target reasoning needs data_prep's --reasoning-field data)")
    check_fields(record, {"problem": str, "solution": str}, where)
    text = record["solution"]
    if target == "reasoning":
        text = f"<think>\n{record['reasoning']}\n</think>\n{text}"
    return math_messages(record["problem"]), text


def fitted_tiny(records, target="solution"):
    """A fresh tiny model (model.build_tiny) whose tokenizer is fitted to these records: byte-level BPE merges (1,024
    tokens) learned from each record rendered as the chat it is trained on, as a real model's tokenizer is learned
    from its corpus. The prompts' wording and the data's words and numbers become single tokens: sequences are
    about 3x shorter, and a number is one token, which a model this small learns to add far sooner than digit by
    digit. The merges are deterministic for the same records."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    chat = build_tiny()[1]  # one token per byte: used here only to render the chat template
    texts = [chat.apply_chat_template(messages + [{"role": "assistant", "content": text}], tokenize=False)
             for messages, text in (messages_and_target(record, target) for record in records)]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's word split
    core.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1024, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        special_tokens=["<|im_end|>", "<|endoftext|>", "<|im_start|>"]))
    return build_tiny(tokenizer=chatml_tokenizer(core))


def tokenize(records, tokenizer, target="solution", max_length=4096, where="data"):
    """(examples, lost, dropped): examples are [(prompt ids, target ids)], target ids ending with the end-of-turn
    token. An example longer than max_length loses the end of its target (and its stop token): lost[i] is the
    number of target tokens example i lost (0 when whole). dropped counts the records whose prompt alone fills
    max_length."""
    stop_id = end_of_turn_id(tokenizer)
    examples, lost, dropped = [], [], 0
    for line_no, record in enumerate(records, 1):
        messages, text = messages_and_target(record, target, f"{where}:{line_no}")
        prompt = encode_chat(tokenizer, messages)
        completion = tokenizer.encode(text, add_special_tokens=False) + [stop_id]
        room = max_length - len(prompt)
        if room < 1:
            dropped += 1
            continue
        examples.append((prompt, completion[:room]))
        lost.append(max(0, len(completion) - room))
    return examples, lost, dropped


def truncation_report(examples, lost, dropped, max_length):
    """What --max-length costs, in words: targets cut and the tokens they lose, and the length that would keep
    95% (and all) of the examples whole."""
    cut = [n for n in lost if n > 0]
    whole = sorted(len(p) + len(t) + n for (p, t), n in zip(examples, lost))
    p95 = whole[math.ceil(0.95 * len(whole)) - 1]
    return (f"--max-length {max_length}: {len(cut)} of {len(examples)} targets cut ({len(cut) / len(examples):.1%})"
            + (f", each losing its end and its stop token (tokens lost: mean {sum(cut) / len(cut):.0f}, max "
               f"{max(cut)})" if cut else "")
            + f"; {dropped} dropped (the prompt alone fills it). Whole examples need up to {whole[-1]} tokens; "
            f"95% fit in {p95}.")


def length_grouped_batches(lengths, batch_size, seed, epoch, chunk_batches=32):
    """One epoch's batches (lists of example indices): shuffle, sort by length within chunks of chunk_batches
    batches (little padding), then shuffle the batches. The order depends only on (seed, epoch), so --resume
    finds its place again from the epoch and the batch index alone."""
    rng = random.Random(mix_seed(seed, epoch))
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * chunk_batches
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: -lengths[i])
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


# ----------------------------------------------------------------------------------------------------------------
# 2. Learning rate: linear warm-up over the first warmup_ratio of the plan, then cosine decay to zero


def learning_rate(step, total_steps, peak_lr, warmup_ratio):
    """The learning rate of optimiser step `step` (0-based) of a plan of total_steps steps."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


# ----------------------------------------------------------------------------------------------------------------
# 3. One optimiser step: micro-batches whose losses add up to the token mean over the whole step


def sft_loss(model, batch, num_tokens):
    """Negative log-likelihood of the targets (stop token included; prompt and padding masked out), summed over
    the batch's target tokens and divided by num_tokens: the target tokens of the whole optimiser step."""
    prompts, targets = zip(*batch)
    logp, mask = completion_logprobs(model, list(prompts), list(targets))
    return -(logp * mask).sum() / num_tokens


def train_step(model, optimizer, batch, micro_batch_tokens, lr, device, clip=1.0, precision="fp32",
               step_tokens=None):
    """Forward and backward over `batch` (a list of (prompt, target) pairs) in micro-batches of at most
    micro_batch_tokens padded positions, then one AdamW step. Each micro-batch's token sum is divided by the target
    tokens of the whole batch, so the gradients add up to those of the token mean over the batch however it is
    split. Under torchrun `batch` is this process's share and step_tokens counts the whole batch's targets.
    Returns (loss, grad norm, skipped)."""
    step_tokens = step_tokens or sum(len(target) for _, target in batch)
    total = 0.0
    prompts, targets = zip(*batch) if batch else ((), ())
    for part in token_budget_batches(prompts, targets, micro_batch_tokens):
        with autocast(device, precision):
            loss = sft_loss(model, batch[part], step_tokens)
        loss.backward()
        total += loss.item()
    sum_gradients(model)  # under torchrun: the whole batch's gradient on every process
    total = sum_across([total])[0]
    grad_norm = clip_gradients(model, clip)
    skipped = not (math.isfinite(total) and math.isfinite(grad_norm))
    if not skipped:  # a non-finite loss or gradient would poison the weights and AdamW's moments: skip the step
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, grad_norm, skipped


# ----------------------------------------------------------------------------------------------------------------
# 4. Format check: does the model write "<think> ... </think>" + one step on held-out SRL prompts?


def format_check(model, tokenizer, examples, samples_per_prompt=4, max_new_tokens=256, seed=0, batch_prompts=8):
    """Sample at temperature 1.0 (as SRL's rollouts do) and score with srl.py, with a progress bar. Returns a dict
    with format_rate (fraction that srl.parse_action accepts), reward_mean (srl_reward, -1 for format failures) and
    a sample."""
    prompts = [encode_chat(tokenizer, srl_messages(example)) for example in examples]
    groups = sample_groups(model, prompts, samples_per_prompt, max_new_tokens, batch_prompts,
                           [mix_seed(seed, i) for i in range(len(prompts))], temperature=1.0, desc="format check")
    texts = [decode_text(tokenizer, c) for group in groups for c in group]
    experts = [example["target_step"] for example in examples for _ in range(samples_per_prompt)]
    rewards = [srl_reward(t, e) for t, e in zip(texts, experts)]
    well_formed = sum(parse_action(t) is not None for t in texts)
    shown = [(example, texts[i * samples_per_prompt], rewards[i * samples_per_prompt])
             for i, example in enumerate(examples[:3])]  # the first sample of the first prompts
    return {"samples": len(texts), "format_rate": well_formed / len(texts), "reward_mean": sum(rewards) / len(texts),
            "reward_mean_well_formed": sum(r for r in rewards if r >= 0) / max(1, well_formed),
            "example": {"completion": texts[0], "expert_step": experts[0]}, "shown": shown}


# ----------------------------------------------------------------------------------------------------------------
# 5. The run: the command line, the checks, the loop


def check_arguments(args):
    """Every user error, before any process group forms or any weight loads, each refused in one line: the device,
    the run folder and the model (machinery/setup.py's resolve_training, which also fills the flags left at None:
    tiny's defaults for a small model, else the paper's), the flags, every record of the data and of the format
    check's prompts. Returns (training state or None, records, format-check examples, model config)."""
    state, config = resolve_training(args, STATE_KEYS, SMALL_MODEL_DEFAULTS, PAPER_DEFAULTS)
    check_flags(args, ["epochs", "max_steps", "batch_size", "micro_batch_tokens", "max_length", "save_every",
                       "check_prompts"], lambda v: v >= 1, "at least 1")
    check_flags(args, ["check_samples"], lambda v: v >= 0, "0 or more")
    check_flags(args, ["lr"], lambda v: 0 < v < math.inf, "above 0")
    check_flags(args, ["warmup_ratio"], lambda v: 0 <= v <= 1, "in [0, 1]")
    if args.plan_only and not Path(args.data).is_file():
        return state, [], [], config  # the memory plan does not need the data
    with refusing():
        records = read_jsonl(args.data, flag="--data", with_lines=True)
        for line_no, record in records:
            messages_and_target(record, args.target, f"{args.data}:{line_no}")
    records = [record for _, record in records]
    if not records:
        refuse(f"--data {args.data}: no records in it")
    # the format check at the end samples SRL prompts: read them now, not after training
    val_path = Path(args.val_data or Path(args.data).with_name("srl_val.jsonl"))
    val_examples = []
    if args.check_samples > 0 and "completion" in records[0] and (args.val_data or val_path.is_file()):
        args.val_data = str(val_path)
        with refusing():
            val_examples = read_jsonl(val_path, srl_fields, flag="--val-data")
    return state, records, val_examples, config


def load_model_and_data(args, state, records):
    """The model (a fresh tiny one gets a tokenizer fitted to this data) and the examples as token ids, whose
    lengths and what --max-length cuts from them are printed."""
    fitted = fitted_tiny(records, args.target) if args.model == "tiny" and (state is None or args.lora_rank) else None
    model, tokenizer, _, _ = load_for_training(args, state, base=fitted)
    examples, lost, dropped = tokenize(records, tokenizer, args.target, args.max_length, where=args.data)
    if not examples:
        refuse(f"every example of {args.data} is longer than --max-length {args.max_length}")
    lengths = [len(p) + len(t) for p, t in examples]
    print0(f"{len(examples)} examples from {args.data}; tokens per example as trained: mean "
           f"{sum(lengths) / len(lengths):.0f}, max {max(lengths)}")
    print0(truncation_report(examples, lost, dropped, args.max_length))
    return model, tokenizer, examples


def train(args, model, tokenizer, examples, state, plan=None):
    """The loop: batches of similar length, the learning-rate schedule of the whole plan, a line of metrics.jsonl per
    optimiser step and <out>/last every --save-every steps (machinery/run.py's Run). Returns (steps done, steps
    skipped, the exit status)."""
    rank, world = get_rank(), get_world_size()
    lengths = [len(p) + len(t) for p, t in examples]  # prompt + target tokens of each example
    batches_per_epoch = math.ceil(len(examples) / args.batch_size)
    total_steps = args.epochs * batches_per_epoch  # the plan: the schedule runs over these steps
    end_step = min(total_steps, args.max_steps) if args.max_steps else total_steps
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=0.0)
    skipped = state["skipped_steps"] if state else 0  # steps skipped for a non-finite loss or gradient
    if state is not None:
        print0(f"resuming {Path(args.out) / 'last'} at step {state['step']} (epoch {state['epoch']}, batch "
               f"{state['batch_in_epoch']})")
    run = Run(run_settings(args, plan), model, tokenizer, optimizer, state, end_step, keeps_best=False)
    model.train()
    batches, batches_epoch = None, None  # the batches of one epoch, and which epoch they are
    for step in run.steps():
        epoch, index = divmod(step, batches_per_epoch)  # the data position follows from the step alone
        if batches_epoch != epoch:
            batches, batches_epoch = length_grouped_batches(lengths, args.batch_size, args.seed, epoch), epoch
        batch = [examples[i] for i in batches[index]]
        lr = learning_rate(step, total_steps, args.lr, args.warmup_ratio)
        started = time.time()
        # under torchrun each process trains on every world-th example; the loss divides by the whole batch's tokens
        step_tokens = sum(len(t) for _, t in batch)
        loss, grad_norm, was_skipped = train_step(model, optimizer, batch[rank::world], args.micro_batch_tokens, lr,
                                                  args.device, precision=args.precision, step_tokens=step_tokens)
        skipped += was_skipped
        metrics = {"epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                   "tokens": step_tokens,  # trained (target) tokens of this step
                   "tokens_per_s": sum(lengths[i] for i in batches[index]) / (time.time() - started),  # prompt + target
                   "skipped": was_skipped, "skipped_total": skipped}
        progress = dict(epoch=(step + 1) // batches_per_epoch, batch_in_epoch=(step + 1) % batches_per_epoch,
                        skipped_steps=skipped)
        if run.end_step(metrics, progress, was_skipped):
            break
    return run.done, skipped, run.finish()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_flags(parser, "tiny", "data/sft_srl_train.jsonl", "runs/sft", save_every=100)
    arg = parser.add_argument
    arg("--target", choices=["solution", "reasoning"], default="solution",
        help="sft_train.jsonl records: train on the solution, or on <think>reasoning</think>solution")
    arg("--epochs", type=int, help="length of the plan (tiny: 12, otherwise the paper's 3)")
    arg("--warmup-ratio", type=float, help="warm-up fraction of the plan (tiny: 0.05, otherwise 0.3)")
    arg("--batch-size", type=int, help="examples per optimiser step (tiny: 4, otherwise 16)")
    arg("--max-length", type=int, default=4096, help="longer examples lose the end of their target")
    arg("--check-samples", type=int, default=4, help="format check at the end (SRL-format data): samples per prompt "
        "(0: no check)")
    arg("--check-prompts", type=int, default=32, help="format check: held-out SRL prompts sampled (a seeded choice "
        "spread over problems)")
    args = parser.parse_args(argv)

    state, records, val_examples, config = check_arguments(args)  # before any process group or weight
    rank, _, args.device = init_distributed(args.device)  # (0, 1, device) without torchrun
    # the memory plan (machinery/memory.py): the micro-batch and activation checkpointing that fit the card
    plan = apply_plan(args, config, longest_row=args.max_length)
    if args.plan_only:
        end_distributed()
        return
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model, tokenizer, examples = load_model_and_data(args, state, records)
    step, skipped, status = train(args, model, tokenizer, examples, state, plan)
    end_distributed()  # what follows (the format check) is rank 0's alone
    if status:
        raise SystemExit(status)
    if rank != 0:
        return
    out = Path(args.out)
    following = "srl.py" if any("completion" in r for r in records) else "evaluate.py"  # SRL's format learnt: SRL
    print(f"{step} steps ({skipped} skipped for a non-finite loss or gradient); the model: {out / 'last'}; next: "
          f"python {following} --model {out / 'last'}")

    # The warm start's purpose: a format SRL can reward. Check it on held-out prompts (read by check_arguments).
    if val_examples:
        model.eval()
        chosen = validation_sample(val_examples, args.check_prompts, args.seed)
        longest_target = max(len(t) for _, t in examples)
        print(f"format check: {len(chosen)} held-out SRL prompts x {args.check_samples} samples, up to "
              f"{min(1024, longest_target + 32)} new tokens each (Ctrl-C skips it; --check-samples 0 leaves it out)")
        try:
            check = format_check(model, tokenizer, chosen, args.check_samples,
                                 max_new_tokens=min(1024, longest_target + 32), seed=args.seed)
        except KeyboardInterrupt:
            print(f"\nformat check stopped; the model is whole in {out / 'last'}")
            raise SystemExit(130)
        shown = check.pop("shown")
        write_json(out / "format_check.json", check)
        samples = RunLog(out, args.report_to)  # the format check's samples, to read beside the rate
        samples.samples(step, [dict(kind="format_check", id=example.get("id"), completion=text,
                                    expected=example["target_step"], reward=reward)
                               for example, text, reward in shown])
        samples.close()
        print(f"format check on {args.val_data} ({check['samples']} samples at temperature 1.0): format rate "
              f"{check['format_rate']:.0%}, mean SRL reward {check['reward_mean']:.3f} (format failures count -1; "
              f"{check['reward_mean_well_formed']:.3f} over well-formed samples)")
        print("a sample:\n" + check["example"]["completion"])


if __name__ == "__main__":
    main()
