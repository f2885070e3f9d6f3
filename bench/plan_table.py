"""
Which card runs what: the memory plan (srl.py / sft.py --plan-only) for each model and stage on cards of 8, 16, 24,
40 and 80 GB, as one markdown table. Estimates only, from memory.py, offline and on any machine:

    python bench/plan_table.py                    # the README's table
    python bench/plan_table.py --cards 12 24      # other cards

Each cell is the peak the plan estimates and what it picked to get there (sb: prompts sampled at once; mb:
micro-batch positions; ck: activation checkpointing), or "no" when even the smallest settings do not fit.
"""
import argparse
import contextlib
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sft  # noqa: E402
import srl  # noqa: E402

ROWS = [  # (label, stage, model, flags)
    ("qwen-0.5b SRL, full fine-tuning", "srl", "qwen-0.5b", []),
    ("qwen-0.5b SRL, LoRA 32", "srl", "qwen-0.5b", ["--lora-rank", "32"]),
    ("qwen-1.5b SRL, full fine-tuning", "srl", "qwen-1.5b", []),
    ("qwen-1.5b SRL, LoRA 32", "srl", "qwen-1.5b", ["--lora-rank", "32"]),
    ("qwen-1.5b SFT 4k, full fine-tuning", "sft", "qwen-1.5b", ["--max-length", "4096"]),
    ("qwen-1.5b SFT 4k, LoRA 32", "sft", "qwen-1.5b", ["--max-length", "4096", "--lora-rank", "32"]),
    ("qwen-3b SRL, full fine-tuning", "srl", "qwen-3b", []),
    ("qwen-3b SRL, LoRA 32", "srl", "qwen-3b", ["--lora-rank", "32"]),
    ("qwen-7b SRL, full fine-tuning", "srl", "qwen-7b", []),
    ("qwen-7b SRL, LoRA 32", "srl", "qwen-7b", ["--lora-rank", "32"]),
    ("qwen-7b SFT 4k, LoRA 32", "sft", "qwen-7b", ["--max-length", "4096", "--lora-rank", "32"]),
]


def plan(stage, model, card, flags):
    """The plan's last line and its picks, from the stage's own command line with --plan-only."""
    out = io.StringIO()
    argv = ["--model", model, "--gpu-memory", str(card), "--plan-only", "--device", "cpu", "--out",
            "/nonexistent/plan"] + flags
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            (sft if stage == "sft" else srl).main(argv)
        except SystemExit:
            pass
    lines = out.getvalue().strip().splitlines()
    if not lines[-1].startswith("fits:"):
        return "no"
    picked = next(line for line in lines if line.startswith("memory plan:"))
    mb = picked.split("micro-batches of ")[1].split()[0]
    ck = ", ck" if "checkpointing on" in picked else ""
    sb = f"sb {picked.split(', ')[-1].split()[0]}, " if "sampled at once" in picked else ""
    return f"{float(lines[-1].split()[2]):.1f} GB ({sb}mb {mb}{ck})"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--cards", type=float, nargs="+", default=[8, 16, 24, 40, 80], help="card sizes, GB (2^30 bytes)")
    args = p.parse_args()
    print("| model and stage | " + " | ".join(f"{c:g} GB" for c in args.cards) + " |")
    print("| --- |" + " --- |" * len(args.cards))
    for label, stage, model, flags in ROWS:
        print(f"| {label} | " + " | ".join(plan(stage, model, card, flags) for card in args.cards) + " |", flush=True)


if __name__ == "__main__":
    main()
