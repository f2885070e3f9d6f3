"""
What a training run does as it goes, besides the method, for sft.py and the GRPO loop alike (Run): the step counter
and what --resume restores with it, the progress bar, metrics.jsonl and samples.jsonl (RunLog), last/ and best/, the
clock, and stopping at a safe point (Stop: SIGTERM or Ctrl-C, or a run whose updates are all skipped). Nothing here
ends the program: Run.finish returns the exit status, and the stage exits with it.
"""
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from engine import decode_text
from grpo import get_rank, get_world_size, sum_across
from machinery.checkpoints import save_checkpoint
from machinery.checks import first_line, print0
from machinery.files import jsonl_text, read_jsonl, write_files, write_json

RUN_PIECES = ("last", "best", "metrics.jsonl", "samples.jsonl", "plan.json", "format_check.json",  # a stage's
              "tensorboard")  # files in --out


@dataclass
class RunSettings:
    """What Run reads: where the run writes, how often, when it stops (machinery/setup.py's run_settings)."""
    out: str
    flags: dict  # the run's resolved flags, stored in each checkpoint for --resume
    plan: dict = None  # the memory plan, written to plan.json
    overwrite: bool = False  # the run folder's earlier run is deleted once this one has loaded
    report_to: str = "none"  # "tensorboard": the metrics and samples for TensorBoard too
    save_every: int = 10  # last/ every N steps, and at the end
    eval_every: int = 0  # validation every N steps (0: at the end only)
    log_samples: int = 0  # a training group's rollouts to samples.jsonl every N steps (0: never)
    max_skipped_steps: int = 3  # stop after this many steps in a row whose updates were all skipped (0: never)


class Run:
    """A training run's plumbing, so that a stage's loop reads as the method. Under torchrun every process holds one
    and they stay in step; rank 0 alone writes. The loop:

        for step in run.steps():
            ...                                          # the method's step
            if run.end_step(metrics, progress): break    # log, checkpoint, stop?
        status = run.finish()                            # the exit status: 0, 1, 2 or 128 + a signal

    progress: what the stage needs, besides the step, to continue exactly on --resume (stored in last/).
    validating: the stage validates, and best/ keeps the best checkpoint; else with keeps_best best/ is the last."""

    def __init__(self, settings, model, tokenizer, optimizer, state, total_steps, validating=False, keeps_best=True):
        self.settings, self.model, self.tokenizer, self.optimizer = settings, model, tokenizer, optimizer
        self.total_steps, self.validating, self.keeps_best = total_steps, validating, keeps_best
        self.out = Path(settings.out)
        self.done = state["step"] if state else 0  # optimiser steps done
        self.best = state.get("best", -float("inf")) if state else -float("inf")  # best validation score so far
        self.progress = {}  # the stage's own progress at self.done, stored with last/
        self.any_kept = state is not None or None  # GRPO: has any step kept a group? (if not, say why at the end)
        self.started_at, self.saved = self.done, self.done  # where this run began, and the step last/ holds
        self.failed = None  # why a checkpoint could not be written
        self.log = start_run(self.out, model, optimizer, state, settings.overwrite, settings.plan, settings.report_to)
        self.stop = Stop(settings.max_skipped_steps)
        self.scores = {}  # the last validation's, logged with the next step

    def steps(self):
        """The steps left, with a progress bar on rank 0; each starts the step's clock."""
        if self.done >= self.total_steps:
            print0(f"nothing left to do: {self.out} finished its {self.total_steps} steps")
        self.bar = tqdm(range(self.done, self.total_steps), initial=self.done, total=self.total_steps,
                        desc=self.out.name, disable=get_rank() != 0)
        for step in self.bar:
            self.clock, self.sampled = time.time(), None
            yield step

    def stopped_before_update(self):
        """GRPO, after the rollouts: True if a signal asks the run to stop (the step is then dropped, as if never
        begun: the caller puts the prompt stream back). Starts the update's clock."""
        self.sampled = time.time()
        return self.stop.requested()

    def validation_due(self):
        step = self.done + 1
        return self.validating and ((self.settings.eval_every and step % self.settings.eval_every == 0)
                                    or step == self.total_steps)

    def keep_if_best(self, scores, samples):
        """Log the validation scores and samples; best/ takes the model when its score is the best so far."""
        self.scores = scores
        self.log.samples(self.done + 1, samples)
        if scores["val_score"] > self.best:
            self.best = scores["val_score"]
            self.save(self.out / "best")

    def end_step(self, metrics, progress, skipped_all=False, samples=()):
        """The step's line of metrics.jsonl (with the step, its timing and the last validation's scores), its
        samples, last/ when it is due (every save_every steps, and the last step), best/ at the last step when
        nothing validates. Returns True when the run must stop: a signal, too many steps in a row whose updates
        were all skipped (skipped_all), or a checkpoint that could not be written."""
        step = self.done + 1
        metrics = dict(metrics, **self.scores, step=step, train_s=round(time.time() - (self.sampled or self.clock), 2))
        if self.sampled:  # GRPO: the rollouts' time apart, and their tokens per second
            metrics.update(sample_s=round(self.sampled - self.clock, 2),
                           tokens_per_s=round(metrics["sampled_tokens"] / max(self.sampled - self.clock, 1e-9), 1))
        self.scores = {}
        if "kept_groups" in metrics:
            self.any_kept = bool(self.any_kept or metrics["kept_groups"])
        if step == self.total_steps and self.keeps_best and not self.validating:
            self.save(self.out / "best")  # nothing to select on: the final model
        self.log.metrics(metrics)
        if self.settings.log_samples and step % self.settings.log_samples == 0 and samples:
            self.log.samples(step, samples)
        self.bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("loss", "reward_mean", "kept_group_rate", "lr")
                              if k in metrics})
        self.done, self.progress = step, dict(progress)
        stopping = self.stop.requested()
        if step % self.settings.save_every == 0 or step == self.total_steps or stopping:
            self.save_last()
        return stopping or self.stop.diverged(skipped_all, step) or self.failed is not None

    def save_last(self):
        self.save(self.out / "last", self.optimizer, step=self.done, best=self.best, **self.progress)
        self.saved = self.done

    def save(self, folder, optimizer=None, **progress):
        """A checkpoint; a full disk (or any other write error) is kept to stop the run, the previous checkpoint in
        `folder` intact."""
        if self.failed:
            return
        try:
            save_checkpoint(self.model, self.tokenizer, folder, optimizer, self.settings.flags, **progress)
        except OSError as e:
            self.failed = (f"could not write {folder} ({e.strerror or first_line(e)}); the previous checkpoint there "
                           "is intact: free some space, then --resume continues from it")

    def finish(self):
        """After the loop: the run's exit status, with a line that says how it ended. 2: a checkpoint could not be
        written; 1: too many steps skipped; 128 + N: stopped by signal N, last/ written (--resume continues)."""
        self.log.close()
        self.stop.release()
        if self.failed:
            print0(f"{Path(sys.argv[0]).name}: error: {self.failed}", file=sys.stderr, flush=True)
            return 2
        if self.stop.has_diverged:
            return 1
        if self.done < self.total_steps:
            if self.saved != self.done:
                self.save_last()
            print0(f"stopped at step {self.done}: --resume continues", flush=True)
            return 128 + (self.stop.signum or signal.SIGTERM)
        if self.any_kept is False:
            print0("no group was kept: every rollout of a prompt scored the same. Start from a model that sometimes "
                   "earns the reward (for SRL on a small model: python sft.py, then --model runs/sft), or lower "
                   "--std-threshold.")
        return 0


# -----------------------------------------------------------------------------------------------------------------
# The logs


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
    texts = {}
    for name in ("metrics.jsonl", "samples.jsonl"):
        kept, torn = [], []
        if state is not None and (out / name).exists():
            kept = read_jsonl(out / name, torn_lines=torn)  # a line cut short by a kill or a full disk is dropped
            if torn:
                print0(f"{out / name}: dropped {len(torn)} torn line{'s' if len(torn) > 1 else ''} (a write cut short)")
            kept = [record for record in kept if record.get("step", 0) <= state["step"]]
        texts[name] = jsonl_text(kept)
    write_files(out, texts)
    return RunLog(out, report_to)


class RunLog:
    """What a run writes as it goes, rank 0 alone: metrics.jsonl, a line per step with the number of processes;
    samples.jsonl, the texts a person reads (validation outputs, training rollouts with their rewards); with
    --report-to tensorboard, the same numbers and texts for TensorBoard in <out>/tensorboard. Each line is written
    whole and flushed at once; the JSONL files are the record, TensorBoard a view of them."""

    def __init__(self, out, report_to=None):
        self.files, self.board = {}, None
        if out is not None:
            self.files = {name: open(Path(out) / f"{name}.jsonl", "a", encoding="utf-8")
                          for name in ("metrics", "samples")}
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
            self.files[name].write(jsonl_text(records))
            self.files[name].flush()

    def close(self):
        for file in self.files.values():
            file.close()
        self.files = {}
        if self.board:
            self.board.close()


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


# -----------------------------------------------------------------------------------------------------------------
# Stopping at a safe point


class Stop:
    """What ends a training run before its last step, other than a kill. SIGTERM (how SLURM and Kubernetes preempt a
    job) and SIGINT (Ctrl-C) ask the run to stop at its next safe point instead of dying: the loop asks requested()
    between its phases, writes last/ and ends with 128 + the signal's number. A second signal ends the program at
    once. Under torchrun every process learns of a signal any of them received, so all stop at the same step. And
    after max_skipped updates in a row skipped for a non-finite loss or gradient, diverged() says so: the run would
    otherwise train nothing, silently, for as long as it is left running."""

    def __init__(self, max_skipped):
        self.signum, self.max_skipped, self.skipped_in_a_row, self.has_diverged = 0, max_skipped, 0, False
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

    def diverged(self, skipped, step):
        """After a step: True (and why, printed) if its updates were all skipped max_skipped times in a row."""
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        if self.max_skipped and self.skipped_in_a_row >= self.max_skipped:
            self.has_diverged = True
            print0(f"stopped at step {step}: the last {self.skipped_in_a_row} steps were all skipped for a non-finite "
                   "loss or gradient. Likely causes: a learning rate too high (--lr); the attention kernel (run "
                   "bench/gpu_check.py); bf16 overflow (try --precision fp32). --max-skipped-steps 0 never stops",
                   file=sys.stderr, flush=True)
        return self.has_diverged

    def release(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}
