"""
What a training run does as it goes, besides the method: metrics.jsonl and samples.jsonl (RunLog, opened by
start_run, which also restores --resume's optimizer and random generators), stopping at a safe point on SIGTERM or
Ctrl-C and after too many skipped steps (Stop), and for the GRPO loop all of that with its checkpoints and clock in
one object (Run), so that srl.train reads as the method. Built on common.py (checkpoints, torchrun).
"""
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from checks import print0
from common import RUN_PIECES, get_rank, get_world_size, save_checkpoint, sum_across
from data_prep import write_json, write_jsonl
from model import decode_text

# -----------------------------------------------------------------------------------------------------------------
# 1. Opening the run's logs (and, on --resume, restoring its optimizer and random generators)


def start_run(out, model, optimizer, state, overwrite, plan=None, report_to=None):
    """The moment a run starts to write, once its model has loaded. On --resume the optimizer (sharded again under
    FSDP) and every random generator continue from the training state; under --overwrite the earlier run goes
    (RUN_PIECES, nothing else in the folder). The memory plan goes to plan.json. Returns the run's RunLog, its
    metrics.jsonl and samples.jsonl emptied for a new run and on --resume cut back to the checkpoint's step (the
    steps after it are redone)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    if state is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        random.setstate(state["rng"]["python"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    out = Path(out)
    if get_rank() != 0:  # every process logs what rank 0 logs, and rank 0's alone is kept
        return RunLog(None)
    if overwrite:  # the earlier run goes only now, when the new one has loaded and is about to write
        for path in [out / name for name in RUN_PIECES]:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    if plan is not None:
        write_json(out / "plan.json", plan)
    for name in ("metrics.jsonl", "samples.jsonl"):
        kept, torn = [], 0
        if state is not None and (out / name).exists():
            for line in (out / name).read_text(errors="replace").splitlines():
                try:
                    kept.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a kill or a full disk
                    torn += bool(line.strip())
            if torn:
                print0(f"{out / name}: dropped {torn} torn line{'s' if torn > 1 else ''} (a write cut short)")
            kept = [record for record in kept if isinstance(record, dict) and record.get("step", 0) <= state["step"]]
        write_jsonl(out / name, kept)
    return RunLog(out, report_to)


class RunLog:
    """What a run writes as it goes, rank 0 alone: metrics.jsonl, a line per step with the number of processes;
    samples.jsonl, the texts a person reads (validation outputs, training rollouts with their rewards); with
    --report-to tensorboard, the same numbers and texts for TensorBoard in <out>/tensorboard. Each line is written
    whole and flushed at once; the JSONL files are the record, TensorBoard a view of them."""

    def __init__(self, out, report_to=None):
        self.files, self.board = {}, None
        if out is not None:
            self.files = {name: open(Path(out) / f"{name}.jsonl", "a", encoding="utf-8") for name in ("metrics",
                                                                                                      "samples")}
            if report_to == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter
                self.board = SummaryWriter(str(Path(out) / "tensorboard"))

    def metrics(self, record):
        self.write("metrics", [dict(record, world_size=get_world_size())])
        if self.board:
            for name, value in record.items():
                if isinstance(value, (int, float)) and name != "step":
                    self.board.add_scalar(name, value, record["step"])

    def samples(self, step, records):
        self.write("samples", [dict(record, step=step) for record in records])
        if self.board:
            text = "\n\n".join(f"**{r['kind']}** {r.get('id', '')} reward {r.get('reward', '')}: "
                                 f"{r['completion'][:2000]}" for r in records)
            self.board.add_text("samples", text, step)

    def write(self, name, records):
        if name in self.files:
            self.files[name].writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
            self.files[name].flush()

    def close(self):
        for file in self.files.values():
            file.close()
        if self.board:
            self.board.close()


# -----------------------------------------------------------------------------------------------------------------
# 2. Stopping at a safe point


class Stop:
    """What ends a training run before its last step, other than a kill. SIGTERM (how SLURM and Kubernetes preempt a
    job) and SIGINT (Ctrl-C) ask the run to stop at its next safe point instead of dying: the loop asks requested()
    between its phases, writes last/ and calls preempted(), which exits with 128 + the signal's number. A second
    signal ends the program at once. Under torchrun every process learns of a signal any of them received, so all
    stop at the same step. And after max_skipped updates in a row skipped for a non-finite loss or gradient,
    diverged() stops the run: it would otherwise train nothing, silently, for as long as it is left running."""

    def __init__(self, max_skipped):
        self.signum, self.max_skipped, self.skipped_in_a_row = 0, max_skipped, 0
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # (signals reach the main thread only)
            self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        if self.signum:  # the second signal: at once, as without this handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signum = signum
        print0(f"\n{signal.Signals(signum).name}: stopping after the step in progress (a second one stops at once)",
               flush=True)

    def requested(self):
        return sum_across([float(self.signum)])[0] > 0

    def preempted(self, step):
        self.release()
        print0(f"stopped at step {step}: --resume continues", flush=True)
        raise SystemExit(128 + (self.signum or signal.SIGTERM))

    def count(self, skipped, step):
        """After a step: stop the run if its updates were skipped max_skipped times in a row."""
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        if self.max_skipped and self.skipped_in_a_row >= self.max_skipped:
            self.release()
            print0(f"stopped at step {step}: the last {self.skipped_in_a_row} steps were all skipped for a non-finite "
                   "loss or gradient. Likely causes: a learning rate too high (--lr); the attention kernel (run "
                   "bench/gpu_check.py); bf16 overflow (try --precision fp32). --max-skipped-steps 0 never stops",
                   file=sys.stderr, flush=True)
            raise SystemExit(1)

    def release(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}


class Run:
    """The plumbing of the GRPO loop, in one place, so that srl.train reads as the method: the step counter and what
    --resume restores with it (the best validation score, the skipped updates, the prompt stream's position), the
    progress bar, metrics.jsonl and samples.jsonl (RunLog), the checkpoints last/ and best/, the time of each phase,
    and stopping (Stop: a signal, or a run that trains nothing). Under torchrun every process holds one, and they
    stay in step; rank 0 alone writes."""

    def __init__(self, args, model, tokenizer, optimizer, state, plan, stream, total_steps, validating):
        self.args, self.model, self.tokenizer, self.optimizer = args, model, tokenizer, optimizer
        self.stream, self.total_steps, self.validating = stream, total_steps, validating
        self.out = Path(args.out)
        self.done = 0  # optimiser steps done
        self.best = -float("inf")  # best validation score so far
        self.skipped = 0  # updates skipped for a non-finite loss or gradient, in all
        self.any_kept = state is not None  # has any step kept a group? (if not, say why at the end)
        if state is not None:
            stream.position, self.done, self.best, self.skipped = (state["position"], state["step"], state["best"],
                                                                   state["skipped"])
        self.started_at, self.saved = self.done, self.done  # where this run began, and the step last/ holds
        self.log = start_run(self.out, model, optimizer, state, args.overwrite, plan, args.report_to)
        self.stop = Stop(args.max_skipped_steps)
        self.last_log = {}

    def steps(self):
        """The steps left, with a progress bar on rank 0; each begins the clock of its phases."""
        if self.done >= self.total_steps:
            print0(f"nothing left to do: {self.out} finished its {self.total_steps} steps (its model: "
                   f"{self.out / 'best'})")
        self.bar = tqdm(range(self.done, self.total_steps), initial=self.done, total=self.total_steps,
                        desc=self.out.name, disable=get_rank() != 0)
        for step in self.bar:
            self.clock, self.position = time.time(), self.stream.position
            yield step

    def stopped_before_update(self):
        """After the rollouts: True if a signal asks the run to stop, the step then dropped as if never begun."""
        self.sampled = time.time() - self.clock
        if self.stop.requested():
            self.stream.position = self.position
            return True
        return False

    def validation_due(self):
        step = self.done + 1
        return self.validating and ((self.args.eval_every and step % self.args.eval_every == 0)
                                    or step == self.total_steps)

    def keep_if_best(self, scores, samples):
        """Log the validation scores and samples; best/ takes the model when its score is the best so far."""
        self.last_log.update(scores)
        self.log.samples(self.done + 1, samples)
        if scores["val_score"] > self.best:
            self.best = scores["val_score"]
            save_checkpoint(self.model, self.tokenizer, self.out / "best")

    def end_step(self, log, stats, kept_groups, rollouts, truncated):
        """The step's log line and samples, last/ when it is due (--save-every, the last step), best/ at the last
        step when nothing validates. Returns True when the run must stop (a signal, or too many skipped steps)."""
        args, step = self.args, self.done + 1
        skipped = stats.pop("skipped", 0)
        self.skipped += skipped
        self.any_kept = self.any_kept or bool(kept_groups)
        log.update(self.last_log, **stats, step=step, kept_groups=len(kept_groups), skipped_steps=self.skipped,
                   sample_s=round(self.sampled, 2), train_s=round(time.time() - self.clock - self.sampled, 2),
                   tokens_per_s=round(log["sampled_tokens"] / max(self.sampled, 1e-9), 1),
                   **({"masked_truncated": truncated} if args.mask_truncated else {}))
        self.last_log = {}
        if step == self.total_steps and not self.validating:
            save_checkpoint(self.model, self.tokenizer, self.out / "best")  # nothing to select on: the final model
        self.log.metrics(log)
        if args.log_samples and step % args.log_samples == 0 and kept_groups:
            self.log.samples(step, rollout_samples(self.tokenizer, kept_groups[0], rollouts[0]))
        self.bar.set_postfix(reward=f"{log['reward_mean']:.3f}", kept=f"{log['kept_group_rate']:.2f}")
        self.done, self.final_log = step, log
        if step % args.save_every == 0 or step == self.total_steps:
            self.save_last()
        self.stop.count(skipped == args.updates_per_batch, step)
        return self.stop.requested()

    def save_last(self):
        save_checkpoint(self.model, self.tokenizer, self.out / "last", self.optimizer, self.args, step=self.done,
                        position=self.stream.position, best=self.best, skipped=self.skipped)
        self.saved = self.done

    def finish(self):
        """After the loop: a run stopped by a signal writes last/ and exits (--resume continues it); else a line
        says how it ended."""
        self.log.close()
        if self.done < self.total_steps:
            if self.saved != self.done:
                self.save_last()
            self.stop.preempted(self.done)
        self.stop.release()
        if not self.any_kept:
            log = getattr(self, "final_log", {})
            print0(f"no group was kept: every rollout of a prompt scored the same (last mean reward "
                   f"{log.get('reward_mean', float('nan')):.2f}, format failure rate "
                   f"{log.get('format_failure_rate', float('nan')):.0%}). Start from a model that sometimes earns "
                   f"the reward (for SRL on a small model: python sft.py, then --model runs/sft), or lower "
                   f"--std-threshold.")
        elif self.done > self.started_at:
            score = f", best validation score {self.best:.3f}" if self.validating else ""
            print0(f"done: {self.total_steps} steps{score}; the model: {self.out / 'best'} (last step: "
                   f"{self.out / 'last'}); next: python evaluate.py --model {self.out / 'best'}")


# -----------------------------------------------------------------------------------------------------------------
# 3. What samples.jsonl shows


def expected(example):
    """What a completion is scored against: the expert step (SRL), else the gold answer (RLVR)."""
    return example.get("target_step", example.get("answer"))


def rollout_samples(tokenizer, group, rollouts):
    """A training group's best and worst rollouts, as samples.jsonl shows them."""
    by_reward = sorted(zip(group.rewards.tolist(), group.completions), key=lambda pair: pair[0])
    advantage = {tuple(r.completion): r.advantage for r in rollouts}
    example = group.example or {}
    return [dict(kind="rollout", id=example.get("id"), prompt=decode_text(tokenizer, group.prompt),
                 completion=decode_text(tokenizer, completion), expected=expected(example), reward=reward,
                 advantage=advantage.get(tuple(completion))) for reward, completion in (by_reward[-1], by_reward[0])]
