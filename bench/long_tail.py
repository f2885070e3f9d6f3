"""
The long-tailed workload of RL rollouts and avg@k evaluations, for bench/bench_generate.py and bench/gpu_check.py:
rows whose lengths are geometric (each step a row stops with probability p, its stop token's probability set to
exactly p whatever the weights), sampled three ways at the same slot count, timed in one run: static batching as the
sampler did before continuous batching (a batch of as many rows as slots, every slot computed until its longest row
stops, attending over every cache column), static with the columns cut to those written, and continuous batching.
"""
import time

import torch

import engine


class StopHazard(torch.nn.Module):
    """The output layer with the stop token's probability set to exactly p at every position: rows then stop after
    geometric numbers of tokens, whatever the weights (random ones included)."""

    def __init__(self, head, stop_id, p):
        super().__init__()
        self.head, self.weight, self.stop_id = head, head.weight, stop_id
        self.log_odds = torch.log(torch.tensor(p / (1 - p)))

    def forward(self, x):
        logits = self.head(x)
        others = torch.cat([logits[..., :self.stop_id], logits[..., self.stop_id + 1:]], dim=-1)
        stop = (others.float().logsumexp(-1) + self.log_odds).to(logits.dtype)
        return torch.cat([logits[..., :self.stop_id], stop[..., None], logits[..., self.stop_id + 1:]], dim=-1)


def long_tail_runs(model, prompts, slots, new_tokens, stop_half=0.25, repeats=1, sync=lambda: None, middle=True):
    """{way: (seconds, outputs, rows computed)} for the three ways (without middle: not the second), the best of
    `repeats` interleaved runs; p is set so that half the rows stop within stop_half of new_tokens. The model's
    output layer is wrapped for the run."""
    p = 1 - 0.5 ** (1 / (stop_half * new_tokens))
    stop_id, head = model.config.vocab_size - 1, model.lm_head
    model.lm_head = StopHazard(head, stop_id, p)
    seeds, sample = list(range(len(prompts))), dict(temperature=1.0, stop_token_ids=[stop_id])

    def static(every_column):
        # before: a batch ran every slot until its longest row stopped, and attended over every column
        bucket, outputs, work = engine.COLUMN_BUCKET, [], 0
        engine.COLUMN_BUCKET, engine.COMPACT_TAIL = (10 ** 9 if every_column else bucket), False
        try:
            for start in range(0, len(prompts), slots):
                stats = {}
                outputs += engine.generate(model, prompts[start:start + slots], new_tokens,
                                           seed=seeds[start:start + slots], max_rows=slots, stats=stats, **sample)
                work += stats["row_steps"]
        finally:
            engine.COLUMN_BUCKET, engine.COMPACT_TAIL = bucket, True
        return outputs, work

    def continuous():
        stats = {}
        return engine.generate(model, prompts, new_tokens, seed=seeds, max_rows=slots, stats=stats, **sample), \
            stats["row_steps"]

    ways = {"static, every column (the sampler before)": lambda: static(True),
            "static, written columns only": lambda: static(False), "continuous batching": continuous}
    if not middle:
        del ways["static, written columns only"]
    try:
        engine.generate(model, prompts[:2], 8, seed=0, **sample)  # warm-up
        results = {}
        for _ in range(repeats):
            for name, fn in ways.items():
                sync()
                started = time.perf_counter()
                outputs, work = fn()
                sync()
                seconds = time.perf_counter() - started
                if name not in results or seconds < results[name][0]:
                    results[name] = (seconds, outputs, work)
    finally:
        model.lm_head = head
    return results, p


def long_tail_table(model, prompts, slots, new_tokens, stop_half=0.25, repeats=1, sync=lambda: None):
    """The three ways as a markdown table, after a line on the lengths drawn and on the rows whose tokens are the
    same every way (all of them in exact arithmetic; in floating point, another batch around a row can move its
    logits in the last bits, and a token drawn at a near tie then differs)."""
    results, p = long_tail_runs(model, prompts, slots, new_tokens, stop_half, repeats, sync)
    outputs = results["continuous batching"][1]
    same = sum(all(result[1][i] == row for result in results.values()) for i, row in enumerate(outputs))
    lengths, rows = [len(o) for o in outputs], len(prompts)
    tokens = sum(lengths)
    base = tokens / next(iter(results.values()))[0]
    lines = [f"{rows} rows through {slots} slots, at most {new_tokens} new tokens, p = {p:.4f} a step: lengths mean "
             f"{tokens / rows:.0f}, {sum(n <= stop_half * new_tokens for n in lengths) / rows:.0%} within "
             f"{stop_half:.0%} of the limit, {sum(n == new_tokens for n in lengths) / rows:.0%} at it; {same} of "
             f"{rows} rows the same tokens every way", "",
             "| way | useful tok/s | rows computed per useful token | ratio to the sampler before |",
             "| --- | --- | --- | --- |"]
    for name, (seconds, _, work) in results.items():
        lines.append(f"| {name} | {tokens / seconds:.0f} | {work / tokens:.2f} | {tokens / seconds / base:.2f}x |")
    return "\n".join(lines)
