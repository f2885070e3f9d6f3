"""Sampler throughput: model.generate against transformers' generate, same model, prompts and settings, one run.

    python bench/bench_generate.py                    # SmolLM2-135M-Instruct, fp32, CPU, batch 8 and 64
    python bench/bench_generate.py --batches 8 --new-tokens 64
    python bench/bench_generate.py --qwen-shape --device cuda --batches 64 --new-tokens 512   # random weights
    python bench/bench_generate.py --long-tail 64 16 --new-tokens 256   # continuous batching against static

--long-tail ROWS SLOTS: a long-tailed workload, as RL rollouts and avg@k evaluations are, in place of the table
above: each step a row stops with probability p (its stop token's probability set to exactly p, whatever the
weights), so that the lengths are geometric: half the rows stop within --stop-half (default a quarter) of the limit,
and (1 - p)^limit of them, about a sixteenth, run to it. ROWS rows go through SLOTS slots three ways, timed in one
run: static batching as the sampler did before continuous batching (SLOTS rows at a time, each batch running until
its longest row stops, attending over every cache column), static with the columns attended over cut to those
written, and continuous batching (one call, a stopped row's slot taken by the next). It prints useful tokens/s,
rows computed per useful token (1.0 would waste nothing) and the ratio to the first.

Also measures the two ceilings on this machine: memory bandwidth (a decode step at small batch reads every weight
once) and matmul throughput (the prompts' forward, and decode steps at large batch, are compute), and prints our
tokens/s against the roofline: the time of the prompts' forward at full matmul speed plus, per decode step, the
longer of (weight bytes / bandwidth) and (2 flops per parameter per row / matmul speed).

Those two ceilings are the hardware's; torch's own matmul kernels may not reach them at small batch. So it also
times the model's linear layers alone, called once over the prompt tokens and once per decode step at the batch
size, with nothing else: the "matmul floor", the time no sampler built on these kernels can beat.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import engine  # noqa: E402
import model as M  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--batches", type=int, nargs="+", default=[8, 64])
parser.add_argument("--new-tokens", type=int, default=128)
parser.add_argument("--device", default="cpu")
parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: float32 on CPU, bf16 on CUDA)")
parser.add_argument("--qwen-shape", action="store_true", help="Qwen2.5-1.5B's shape with random weights")
parser.add_argument("--repeats", type=int, default=2, help="timed runs of each; the best is reported")
parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
parser.add_argument("--long-tail", type=int, nargs=2, metavar=("ROWS", "SLOTS"),
                    help="the long-tailed workload: ROWS rows through SLOTS slots, static against continuous")
parser.add_argument("--stop-half", type=float, default=0.25, help="--long-tail: half the rows stop within this "
                    "share of --new-tokens")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)
device = torch.device(args.device)
dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_bandwidth_gbs():
    x = torch.empty(256 * 2**20, dtype=torch.float32, device=device).fill_(1.0)  # 1 GiB, read by a reduction
    best = float("inf")
    for _ in range(5):
        sync(); t = time.perf_counter(); x.sum(); sync(); best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def measure_matmul_gflops():
    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(3):
        sync(); t = time.perf_counter(); a @ b; sync(); best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


if args.qwen_shape:
    hf_config = transformers.Qwen2Config(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(hf_config).to(device=device, dtype=dtype).eval()
    ours = M.Decoder(M.ModelConfig.from_hf(hf_config.to_dict())).to(device=device, dtype=dtype).eval()
    ours.load_state_dict(hf.state_dict(), strict=False)
    vocab = hf_config.vocab_size
    prompt_ids = [torch.randint(0, vocab, (n,)).tolist() for n in (120, 96, 150, 80, 133, 101, 90, 144)]
    name = "Qwen2.5-1.5B shape, random weights"
else:
    from machinery.checks import smollm2_folder
    folder = smollm2_folder()
    ours, tokenizer = M.load_model(folder, device=str(device), dtype=dtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    questions = ["What is 17 * 23?", "Explain why the sum of two odd numbers is even.",
                 "Find all real x with x^2 - 5x + 6 = 0.", "How many primes are below 30?",
                 "A train travels 120 km in 1.5 hours. What is its average speed?",
                 "Simplify (3x + 2) - (x - 4).", "What is the area of a circle of radius 3?",
                 "Write 0.375 as a fraction in lowest terms."]
    prompt_ids = [engine.encode_chat(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    name = "SmolLM2-135M-Instruct"

weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())  # tied weights counted once
params = sum(p.numel() for p in ours.parameters())
bandwidth, gflops = measure_bandwidth_gbs(), measure_matmul_gflops()
print(f"{name}, {str(dtype).removeprefix('torch.')}, {device}, {torch.get_num_threads()} threads, "
      f"{args.new_tokens} new tokens, temperature 1.0")
print(f"weights {weight_bytes / 1e6:.0f} MB; measured bandwidth {bandwidth:.1f} GB/s, matmul {gflops:.0f} GFLOP/s")


def run_ours(prompts):
    return engine.generate(ours, prompts, args.new_tokens, temperature=1.0, stop_token_ids=[], seed=0)


def run_hf(prompts):
    width = max(map(len, prompts))  # left padding with an attention mask, as transformers expects
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                           eos_token_id=None, pad_token_id=0)


linears = [m for m in ours.modules() if isinstance(m, torch.nn.Linear)]


@torch.no_grad()
def linears_time(layers, rows):
    """Best-of-3 time of the given linear layers, each applied once to `rows` random input rows."""
    inputs = {n: torch.randn(rows, n, device=device, dtype=dtype) for n in {lin.in_features for lin in layers}}
    best = float("inf")
    for _ in range(3):
        sync(); t = time.perf_counter()
        for lin in layers:
            lin(inputs[lin.in_features])
        sync(); best = min(best, time.perf_counter() - t)
    return best


def matmul_floor(prompts):
    """The linear layers of generate's work alone: every prompt token through the blocks and each prompt's last
    token through the head, then new_tokens - 1 decode steps of one token per row."""
    blocks = [lin for lin in linears if lin is not ours.lm_head]
    prefill = linears_time(blocks, sum(map(len, prompts))) + linears_time([ours.lm_head], len(prompts))
    return prefill + (args.new_tokens - 1) * linears_time(linears, len(prompts))


def best_times(fns, prompts):
    """Best-of-repeats time of each function, the runs interleaved so that a change of load hits all alike."""
    for fn in fns:
        fn(prompts[:2])  # warm-up
    best = [float("inf")] * len(fns)
    for _ in range(args.repeats):
        for i, fn in enumerate(fns):
            sync(); t = time.perf_counter(); fn(prompts); sync(); best[i] = min(best[i], time.perf_counter() - t)
    return best


def long_tail(rows, slots):
    from long_tail import long_tail_table
    prompts = [prompt_ids[i % len(prompt_ids)] for i in range(rows)]
    print(long_tail_table(ours, prompts, slots, args.new_tokens, args.stop_half, args.repeats, sync))


if args.long_tail:
    long_tail(*args.long_tail)
    sys.exit(0)
print("| batch | ours tok/s | transformers tok/s | ratio | roofline tok/s | ours / roofline | matmul floor tok/s "
      "| ours / floor |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for batch in args.batches:
    prompts = [prompt_ids[i % len(prompt_ids)] for i in range(batch)]
    t_ours, t_hf = best_times([run_ours, run_hf], prompts)
    tokens = batch * args.new_tokens
    # the floor: the prompts' forward at full matmul speed, then each decode step reads every weight once or
    # does 2 flops per parameter per row, whichever takes longer
    prefill_floor = 2 * params * sum(map(len, prompts)) / (gflops * 1e9)
    step_floor = max(weight_bytes / (bandwidth * 1e9), 2 * params * batch / (gflops * 1e9))
    roofline = tokens / (prefill_floor + args.new_tokens * step_floor)
    floor = tokens / matmul_floor(prompts)
    print(f"| {batch} | {tokens / t_ours:.0f} | {tokens / t_hf:.0f} | {t_hf / t_ours:.2f}x | {roofline:.0f} | "
          f"{tokens / t_ours / roofline:.0%} | {floor:.0f} | {tokens / t_ours / floor:.0%} |", flush=True)
