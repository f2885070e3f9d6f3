"""The GPU path in one run: correctness, kernels, speed and memory of the project on one CUDA card, as one table.

    python bench/gpu_check.py            # one H100 (or any 80 GB card): under 8 minutes, no network
    python bench/gpu_check.py --smoke    # the same code on CPU with a tiny shape, in seconds (the tests run it)

No weights are downloaded: every model is randomly initialised at Qwen2.5-1.5B-Instruct's or Qwen2.5-7B-Instruct's
published shape (written below), which costs the same time and memory as the trained weights. Checks, in order:
  1. logits against transformers' Qwen2ForCausalLM holding the same weights: fp32 with TF32 off (max |diff| <=
     1e-4), and bf16, where our error against the fp32 logits must stay within twice transformers' own bf16 error;
  2. the scaled_dot_product_attention kernel that runs in the prefill (left-padded prompts), in a decode step and
     in the packed training forward (none should fall back to the math kernel, which holds every score);
  3. model.generate against transformers' generate, bf16, batch 64, 512 new tokens at temperature 1: tokens/s,
     the ratio, and the share of the weight-read roofline (batch x bandwidth / weight bytes: each decode step
     reads every weight once) with the bandwidth measured here, in the same run; with the decode step replayed
     from a CUDA graph (the default) and without, and whether the two give the same tokens; then continuous
     batching against static batching on a long-tailed workload (512 rows through 64 slots, 1,024 new tokens);
  4. one SRL step at qwen-1.5b's defaults (16 prompts x G 8, 1,024 new tokens, 512-token prompts, every group kept,
     every completion full length: the worst case): time of sampling, update and sampler refresh, and the peak
     memory of each phase against memory.estimate_memory;
  5. one SFT step at the README's SFT settings (16 examples of 4,096 tokens, --target reasoning): peak memory
     against the estimate;
  6. Qwen2.5-7B: the estimate's verdict for one card, and per GPU with torchrun on 8 GPUs and --fsdp;
  7. srl.py's own command line on the card for 2 steps, then --resume for a third (Qwen2.5-0.5B's shape);
  8. LoRA: one SRL step of the qwen-1.5b shape with --lora-rank 32 at the settings the memory plan picks for a 24 GB
     card, the process capped at 24 GB (torch.cuda.set_per_process_memory_fraction): time, and each phase's peak
     against the estimate; then Qwen2.5-7B with LoRA on the whole card, one step;
  9. the masked training backward under pytorch/pytorch#196678's conditions: finite, and equal to the math kernel's.
A check that fails prints its error in the table and the others still run. The last line is the total time.
GB here is 2^30 bytes, as memory.py counts.
"""
import argparse
import copy
import gc
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import transformers
from torch.nn.attention import SDPBackend

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import engine  # noqa: E402
import grpo  # noqa: E402
import model as M  # noqa: E402
import sft  # noqa: E402
import srl  # noqa: E402
from machinery import checkpoints, distributed, memory  # noqa: E402

QWEN_1_5B = memory.PUBLISHED_SHAPES["qwen-1.5b"]  # the published config.json shapes (memory.py)
QWEN_7B = memory.PUBLISHED_SHAPES["qwen-7b"]
QWEN_0_5B = memory.PUBLISHED_SHAPES["qwen-0.5b"]
SMOKE_SHAPE = dict(QWEN_1_5B, vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)

# sizes of each check: the real ones, and --smoke's
FULL = dict(shape=QWEN_1_5B, logits_tokens=256, sampler_batch=64, sampler_new=512, sampler_prompt=128,
            srl_prompts=16, srl_group=8, srl_new=1024, srl_prompt=512, sft_examples=16, sft_length=4096,
            tail_rows=512, tail_slots=64, tail_new=1024,
            cli_shape=QWEN_0_5B, cli=["--batch-prompts", "4", "--group-size", "4", "--max-new-tokens", "64",
                                      "--val-limit", "4"], lora7b_shape=QWEN_7B)
SMOKE = dict(shape=SMOKE_SHAPE, logits_tokens=16, sampler_batch=4, sampler_new=8, sampler_prompt=8,
             srl_prompts=2, srl_group=2, srl_new=8, srl_prompt=16, sft_examples=2, sft_length=64,
             tail_rows=8, tail_slots=2, tail_new=16,
             cli_shape=SMOKE_SHAPE, cli=["--batch-prompts", "2", "--group-size", "2", "--max-new-tokens", "8",
                                         "--val-limit", "2"], lora7b_shape=SMOKE_SHAPE)
ROWS = []  # (check, result, target, verdict)


def report(check, result, target="", ok=None):
    verdict = "" if ok is None else ("ok" if ok else "FAIL")
    ROWS.append((check, result, target, verdict))
    print(f"{check}: {result} {'(' + target + ')' if target else ''} {verdict}", flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device, fn):
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device):
    """Peak memory allocated by torch since reset_peak, GB (0 off CUDA: the smoke run measures nothing)."""
    return torch.cuda.max_memory_allocated(device) / memory.GB if device.type == "cuda" else 0.0


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def random_decoder(shape, device):
    """Our decoder at `shape` with random weights (normal, std 0.02, as build_tiny), fp32, on the device."""
    with torch.device(device):
        model = M.Decoder(M.ModelConfig.from_hf(shape))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
            elif name.endswith("bias"):
                p.zero_()
    return model


def transformers_pair(shape, device):
    """transformers' Qwen2ForCausalLM at `shape`, random weights, fp32, and our decoder holding the same ones."""
    config = transformers.Qwen2Config(**{k: v for k, v in shape.items() if k not in ("architectures", "model_type")},
                                      attn_implementation="sdpa")
    with torch.device(device):
        hf = transformers.Qwen2ForCausalLM(config).float().eval()
        ours = M.Decoder(M.ModelConfig.from_hf(shape)).eval()
    ours.load_state_dict(hf.state_dict(), strict=False)  # tied: lm_head.weight is the embedding
    ours.stop_token_ids = []
    return hf, ours


def random_prompts(n, length, vocab, seed=0, ragged=False):
    g = torch.Generator().manual_seed(seed)
    lengths = [length - (i * length // (2 * n) if ragged else 0) for i in range(n)]
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lengths]


# ----------------------------------------------------------------------------------------------------------------

def check_logits(size, device):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 matmuls in fp32
    torch.set_float32_matmul_precision("highest")
    hf, ours = transformers_pair(size["shape"], device)
    ids = torch.randint(0, size["shape"]["vocab_size"], (2, size["logits_tokens"]), device=device)
    with torch.no_grad():
        reference = hf(ids).logits.float()
        fp32_diff = (ours(ids) - reference).abs().max().item()
        report("logits fp32 vs transformers (TF32 off)", f"max abs diff {fp32_diff:.1e}", "<= 1e-4", fp32_diff <= 1e-4)
        hf, ours = hf.to(torch.bfloat16), ours.to(torch.bfloat16)
        ours_error = (ours(ids).float() - reference).abs().max().item()
        hf_error = (hf(ids).logits.float() - reference).abs().max().item()
    report("logits bf16 vs fp32", f"ours {ours_error:.2e}, transformers {hf_error:.2e}",
           "ours <= 2x transformers' own bf16 error", ours_error <= 2 * hf_error + 1e-6)
    return ours  # bf16, reused by the kernel check


def sdpa_kernels(fn):
    """How many times fn() runs each scaled_dot_product_attention implementation, by aten op name."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key.removeprefix("aten::_scaled_dot_product_"): e.count for e in prof.key_averages()
            if e.key.startswith("aten::_scaled_dot_product_")}


def check_kernels(ours, size, device):
    vocab = size["shape"]["vocab_size"]
    prompts = random_prompts(8, 64, vocab, ragged=True)  # mixed lengths: the prefill needs its padding mask
    # eager decoding: a CUDA graph replays the same kernels, but the profiler sees no call inside a replay
    prefill = sdpa_kernels(lambda: engine.generate(ours, prompts, 1, temperature=0, cuda_graph=False))
    with_decode = sdpa_kernels(lambda: engine.generate(ours, prompts, 3, temperature=0, cuda_graph=False))
    decode = {k for k, n in with_decode.items() if n > prefill.get(k, 0)}  # what the two decode steps added
    model = random_decoder(size["shape"], device).train()
    group = random_prompts(1, 64, vocab)[0]
    with grpo.autocast(device, "bf16"):
        train = sdpa_kernels(lambda: engine.completion_logprobs(model, [group] * 4, random_prompts(4, 32, vocab, 1))[0]
                             .sum().backward())
    for phase, kernels in (("prefill", prefill), ("decode step", decode), ("packed training forward", train)):
        report(f"SDPA kernel, {phase}", ", ".join(sorted(kernels)), "not the math kernel",
               None if device.type != "cuda" else bool(kernels) and not any("math" in k for k in kernels))


def measure_bandwidth(device):
    """Bytes per second of a copy (read + write) of 1 GiB on the device, best of 5."""
    x = torch.empty(2 ** 28, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    best = min(timed(device, lambda: y.copy_(x))[1] for _ in range(5))
    return 2 * x.numel() * 4 / best


def check_sampler(size, device):
    hf, ours = transformers_pair(size["shape"], device)
    hf, ours = hf.to(torch.bfloat16), ours.to(torch.bfloat16)
    batch, new = size["sampler_batch"], size["sampler_new"]
    prompts = random_prompts(batch, size["sampler_prompt"], size["shape"]["vocab_size"])
    ids = torch.tensor(prompts, device=device)

    def run_ours(tokens, graph, temperature=1.0):
        return engine.generate(ours, prompts, tokens, temperature=temperature, stop_token_ids=[], seed=0,
                          cuda_graph=graph and device.type == "cuda")

    def run_hf(tokens):
        with torch.no_grad():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                               do_sample=True, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0)

    run_ours(4, True), run_ours(4, False), run_hf(4)  # warm-up: kernels chosen, memory pools filled
    sampled_graph, t_graph = timed(device, lambda: run_ours(new, True))
    sampled_eager, t_eager = timed(device, lambda: run_ours(new, False))
    _, t_hf = timed(device, lambda: run_hf(new))
    bandwidth = measure_bandwidth(device)
    weight_bytes = 2 * memory.parameter_count(ours.config)
    roofline = batch * bandwidth / weight_bytes  # tokens/s if each decode step only read the weights once
    graph_rate, eager_rate, hf_rate = (batch * new / t for t in (t_graph, t_eager, t_hf))
    report(f"sampler bf16, batch {batch}, {new} new tokens, CUDA graph",
           f"ours {graph_rate:.0f} tok/s, transformers {hf_rate:.0f} tok/s, {t_hf / t_graph:.2f}x; "
           f"{graph_rate / roofline:.0%} of the weight-read roofline ({roofline:.0f} tok/s at "
           f"{bandwidth / 1e9:.0f} GB/s measured)", ">= 4x transformers, >= 40% of the roofline",
           None if device.type != "cuda" else t_hf / t_graph >= 4 and graph_rate >= 0.4 * roofline)
    report(f"sampler bf16, batch {batch}, {new} new tokens, eager",
           f"ours {eager_rate:.0f} tok/s, {t_hf / t_eager:.2f}x transformers; the graph is {t_eager / t_graph:.2f}x")
    greedy_graph, greedy_eager = run_ours(new, True, 0.0), run_ours(new, False, 0.0)
    differ = sum(a != b for a, b in zip(greedy_graph, greedy_eager))
    differ_sampled = sum(a != b for a, b in zip(sampled_graph, sampled_eager))
    report("sampler, CUDA graph against eager", f"{differ} of {batch} greedy rows and {differ_sampled} of {batch} "
           f"sampled rows differ", "token-identical",
           None if device.type != "cuda" else differ == differ_sampled == 0)  # off CUDA both are the eager path


def srl_settings(device, **settings):
    """srl.py's large-model defaults as the GRPO step reads them (grpo.GRPOConfig): bf16, micro-batches of 8192."""
    defaults = {k: v for k, v in srl.LARGE_MODEL_DEFAULTS.items() if k in grpo.GRPOConfig.__dataclass_fields__}
    return grpo.GRPOConfig(**{**defaults, "precision": "bf16", "micro_batch_tokens": 8192, "device": str(device),
                              **settings})


def bf16_peak(device):
    """The card's dense bf16 matmul peak, flop/s: the datasheet's for the H100 and H200 (989 TFLOP/s), else the best
    of a few 8192 x 8192 products measured here (on CPU: fp32, the smoke run)."""
    if device.type == "cuda" and any(name in torch.cuda.get_device_name(device) for name in ("H100", "H200")):
        return 989e12
    n = 8192 if device.type == "cuda" else 512
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = min(timed(device, lambda: a @ b)[1] for _ in range(3))
    return 2 * n ** 3 / best


def check_srl_step(size, device):
    shape, prompts_n, group = size["shape"], size["srl_prompts"], size["srl_group"]
    args = srl_settings(device, batch_prompts=prompts_n, group_size=group, max_new_tokens=size["srl_new"])
    model = random_decoder(shape, device).train()
    policy = copy.deepcopy(model).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=srl.LARGE_MODEL_DEFAULTS["lr"], weight_decay=0.0)
    prompts = random_prompts(prompts_n, size["srl_prompt"], shape["vocab_size"])
    # a first small update creates AdamW's states, as every later step finds them
    grpo.update_policy(model, optimizer, [[grpo.Rollout(prompts[0], [1, 2, 3], 1.0)]], args)
    reset_peak(device)
    outputs, t_sample = timed(device, lambda: engine.generate(policy, prompts, args.max_new_tokens, num_samples=group,
                                                         stop_token_ids=[], seed=0))
    peak_sample = peak_gb(device)
    advantages = torch.randn(prompts_n * group, generator=torch.Generator().manual_seed(0)).tolist()  # all kept
    rows = [grpo.Rollout(prompts[i // group], c, a) for i, (c, a) in enumerate(zip(outputs, advantages))]
    groups = [rows[i:i + group] for i in range(0, len(rows), group)]
    num_tokens = sum(len(r.completion) for r in rows)
    reset_peak(device)
    stats, t_update = timed(device, lambda: grpo.update_policy(model, optimizer, groups, args))
    peak_update = peak_gb(device)
    _, t_refresh = timed(device, lambda: distributed.copy_weights(policy, model))
    estimate = memory.estimate_memory(model.config, "bf16", args.micro_batch_tokens, False, prompts_n * group,
                                      size["srl_prompt"] + args.max_new_tokens)
    expected_update = memory.held_plus(estimate, "update") / memory.GB
    expected_sample = memory.held_plus(estimate, "sampling") / memory.GB
    step = t_sample + t_update + t_refresh
    # the update's share of the card's bf16 peak: 6 flops a parameter a packed position (a group's prompt once)
    positions = sum(len(g[0].prompt) + sum(len(r.completion) for r in g) for g in groups)
    mfu = 6 * memory.parameter_count(model.config) * positions / t_update / bf16_peak(device)
    report(f"SRL step, {prompts_n} prompts x G {group}, {args.max_new_tokens} new tokens",
           f"{step:.1f} s (docs/benchmarks.md has the earlier runs): sampling {t_sample:.1f}, update "
           f"{t_update:.1f} ({positions} packed positions: {mfu:.0%} of the bf16 peak; "
           f"{num_tokens} completion tokens, loss {stats['loss']:.3g}), refresh {t_refresh:.2f}",
           "step <= 9 s, update >= 30% of the peak", None if device.type != "cuda" else step <= 9 and mfu >= 0.3)
    ok = None if device.type != "cuda" else max(peak_sample, peak_update) <= 1.1 * estimate["peak"] / memory.GB
    report("SRL step peak memory" + (" (not measured off CUDA)" if device.type != "cuda" else ""),
           f"sampling {peak_sample:.1f} GB (estimate {expected_sample:.1f}), update "
           f"{peak_update:.1f} GB (estimate {expected_update:.1f})", "measured <= 1.1 x estimate", ok)


def check_sft_step(size, device):
    shape, n, length = size["shape"], size["sft_examples"], size["sft_length"]
    model = random_decoder(shape, device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-6, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    batch = [(torch.randint(0, shape["vocab_size"], (length // 16,), generator=g).tolist(),
              torch.randint(0, shape["vocab_size"], (length - length // 16,), generator=g).tolist()) for _ in range(n)]
    budget = 8192
    sft.train_step(model, optimizer, batch[:1], budget, 5e-6, device, precision="bf16")  # AdamW's states
    reset_peak(device)
    (loss, _, skipped), seconds = timed(device, lambda: sft.train_step(model, optimizer, batch, budget, 5e-6, device,
                                                                       precision="bf16"))
    estimate = memory.estimate_memory(model.config, "bf16", budget, masked=False)["peak"] / memory.GB
    peak = peak_gb(device)
    report(f"SFT step, {n} examples x {length} tokens, micro-batches of {budget}",
           f"{seconds:.1f} s, loss {loss:.3g}, peak {peak:.1f} GB (estimate {estimate:.1f})",
           "measured <= 1.1 x estimate", None if device.type != "cuda" else peak <= 1.1 * estimate and not skipped)


def check_7b():
    cfg = M.ModelConfig.from_hf(QWEN_7B)
    one = memory.estimate_memory(cfg, "bf16", 8192, True, 16 * 8, 2048)["peak"] / memory.GB
    # the README's command: torchrun --nproc_per_node 8 srl.py --model qwen-7b --fsdp --batch-prompts 512
    # --sample-batch 16: each GPU samples 16 prompts x G 8 at a time
    eight = memory.estimate_memory(cfg, "bf16", 8192, True, 16 * 8, 2048, shards=8)["peak"] / memory.GB
    report("Qwen2.5-7B SRL memory (estimate)", f"one card {one:.0f} GB: needs several GPUs; with --fsdp on 8: "
           f"{eight:.0f} GB per GPU", "per GPU <= 68 GB (85% of 80)", eight <= 68)


def check_continuous(size, device):
    """Continuous batching on the long-tailed workload (bench/long_tail.py): 512 rows of 128-token prompts through
    64 slots, up to 1,024 new tokens, half the rows stopping within a quarter of that; static batching as the
    sampler did before, then continuous batching, the same tokens."""
    from long_tail import long_tail_runs
    model = random_decoder(size["shape"], device).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    rows, slots, new = size["tail_rows"], size["tail_slots"], size["tail_new"]
    prompts = random_prompts(rows, size["sampler_prompt"], size["shape"]["vocab_size"])
    results, _ = long_tail_runs(model, prompts, slots, new, sync=lambda: sync(device), middle=False)
    (before, outputs, work_before), (after, continuous, work_after) = (results[k] for k in (
        "static, every column (the sampler before)", "continuous batching"))
    tokens = sum(map(len, outputs))
    same = sum(a == b for a, b in zip(outputs, continuous))
    report(f"sampler, long-tailed: {rows} rows through {slots} slots, up to {new} new tokens",
           f"continuous {tokens / after:.0f} tok/s, static (the sampler before) {tokens / before:.0f}: "
           f"{before / after:.2f}x; rows computed per useful token {work_after / tokens:.2f} against "
           f"{work_before / tokens:.2f}; {same} of {rows} rows the same tokens (bf16: another batch around a row "
           "can flip a near tie)", ">= 2x the static sampler", None if device.type != "cuda" else before / after >= 2)


def check_masked_backward(size, device):
    """pytorch/pytorch#196678's conditions through our own completion_logprobs backward, bf16 autocast: a planted
    head whose every score is about -100 (q and k constant, along the rotary pair that barely turns), so that each
    row's log-sum-exp is below -90, and packed lengths of 704 and 832 (64 mod 128). The gradients with the kernels
    the training forward uses (model.MASKED_TRAINING_KERNELS) must be finite and equal the math kernel's within bf16
    tolerance; cuDNN's own are counted, to show whether the bug is there on this card."""
    shape = dict(size["shape"], num_hidden_layers=2)
    model = random_decoder(shape, device).train()
    attn, head_dim = model.model.layers[0].self_attn, model.config.head_dim
    with torch.no_grad():  # query head 0 and its KV head: constant q = -a e, k = a e, e on the slowest rotary pair
        e = torch.zeros(head_dim, device=device)
        e[head_dim // 2 - 1] = e[head_dim - 1] = 0.5 ** 0.5
        a = (100 * head_dim ** 0.5) ** 0.5
        attn.q_proj.weight[:head_dim] = 0
        attn.q_proj.bias[:head_dim] = -a * e
        attn.k_proj.weight[:head_dim] = 0
        attn.k_proj.bias[:head_dim] = a * e
    g = torch.Generator().manual_seed(0)
    vocab, results = shape["vocab_size"], []
    for prompt_len in (192, 320):  # + 4 completions of 128: packed rows of 704 and 832 positions
        prompts = [torch.randint(0, vocab, (prompt_len,), generator=g).tolist()] * 4
        completions = [torch.randint(0, vocab, (128,), generator=g).tolist() for _ in range(4)]
        grads = {}
        for name, kernels in (("fp32", [SDPBackend.MATH]), ("ours", M.MASKED_TRAINING_KERNELS),
                              ("math", [SDPBackend.MATH]), ("cudnn", [SDPBackend.CUDNN_ATTENTION])):
            if name == "cudnn" and device.type != "cuda":
                continue
            saved, M.MASKED_TRAINING_KERNELS = M.MASKED_TRAINING_KERNELS, kernels
            try:
                model.zero_grad(set_to_none=True)
                with grpo.autocast(device, "fp32" if name == "fp32" else "bf16"):
                    logp, mask = engine.completion_logprobs(model, prompts, completions)
                (logp * mask).sum().backward()
                grads[name] = attn.q_proj.weight.grad.float().clone()
            except RuntimeError as e:  # cuDNN may refuse the shape: then it cannot be the cause
                grads[name] = str(e).splitlines()[0][:80]
            finally:
                M.MASKED_TRAINING_KERNELS = saved
        reference = grads["fp32"]
        error = lambda grad: (grad - reference).abs().max().item() / max(reference.abs().max().item(), 1e-30)
        cudnn = grads.get("cudnn")
        cudnn = ("not on this device" if cudnn is None else cudnn if isinstance(cudnn, str) else
                 f"{int((~torch.isfinite(cudnn)).sum())} non-finite")
        results.append((prompt_len + 4 * 128, bool(torch.isfinite(grads["ours"]).all()), error(grads["ours"]),
                        error(grads["math"]), cudnn))
    report("masked training backward, pytorch#196678's conditions (log-sum-exp < -90, lengths 64 mod 128)",
           "; ".join(f"length {n}: ours finite {finite}, error {ours:.1e} (bf16 math kernel {math_:.1e}), cuDNN "
                     f"{cudnn}" for n, finite, ours, math_, cudnn in results),
           "finite; error against fp32 <= 2x the bf16 math kernel's",
           None if device.type != "cuda" else all(finite and ours <= 2 * math_ + 1e-3 for _, finite, ours, math_, _
                                                  in results))  # on CPU: informational (CPU flash is not CUDA's)


def check_lora_step(size, device, shape, card_gb):
    """One SRL step with LoRA rank 32, at the settings memory.plan_memory picks for a card of card_gb GB (None: the
    card present), with the process capped at that size: the time, and each phase's measured peak against the
    estimate for the prompts used here."""
    prompts_n, group, new = size["srl_prompts"], size["srl_group"], size["srl_new"]
    cfg = M.ModelConfig.from_hf(shape)
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    card = card_gb * memory.GB if card_gb else total
    plan, _ = memory.plan_memory(cfg, card, "bf16", lora_rank=32, group_size=group, prompts=prompts_n,
                                 sample_length=1024 + new, longest_row=1024 + new)  # the picks, as srl.py's setup
    args = srl_settings(device, batch_prompts=prompts_n, group_size=group, max_new_tokens=new,
                        micro_batch_tokens=plan["micro_batch_tokens"], sample_batch=plan["sample_batch"])
    checkpointing = plan["activation_checkpointing"]
    if card_gb and device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(min(1.0, card / total), device)
    try:
        model = random_decoder(shape, device).to(torch.bfloat16).add_lora(32, 64.0).train()
        model.activation_checkpointing = checkpointing
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
        prompts = random_prompts(prompts_n, size["srl_prompt"], shape["vocab_size"])
        grpo.update_policy(model, optimizer, [[grpo.Rollout(prompts[0], [1, 2, 3], 1.0)]], args)  # AdamW's states
        reset_peak(device)
        groups, t_sample = timed(device, lambda: engine.sample_groups(
            model, prompts, group, new, args.sample_batch, list(range(prompts_n)), stop_token_ids=[]))
        peak_sample = peak_gb(device)
        g = torch.Generator().manual_seed(0)
        rollouts = [[grpo.Rollout(p, c, a) for c, a in zip(completions, torch.randn(group, generator=g).tolist())]
                    for p, completions in zip(prompts, groups)]
        reset_peak(device)
        _, t_update = timed(device, lambda: grpo.update_policy(model, optimizer, rollouts, args))
        peak_update = peak_gb(device)
    finally:
        if card_gb and device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    estimate = memory.estimate_memory(cfg, "bf16", args.micro_batch_tokens, checkpointing,
                                      args.sample_batch * group, size["srl_prompt"] + new, lora_rank=32)
    where = f"capped at {card_gb:g} GB" if card_gb else "the whole card"
    picks = (f"{args.sample_batch} prompts at once, micro-batches of {args.micro_batch_tokens}, checkpointing "
             f"{'on' if checkpointing else 'off'}")
    report(f"SRL step, LoRA 32, {memory.parameter_count(cfg) / 1e9:.1f}B shape, {where}",
           f"{t_sample + t_update:.1f} s: sampling {t_sample:.1f}, update {t_update:.1f} ({picks})")
    ok = None if device.type != "cuda" else max(peak_sample, peak_update) <= 1.1 * estimate["peak"] / memory.GB
    report("  its peak memory" + (" (not measured off CUDA)" if device.type != "cuda" else ""),
           f"sampling {peak_sample:.1f} GB (estimate {memory.held_plus(estimate, 'sampling') / memory.GB:.1f}), "
           f"update {peak_update:.1f} GB (estimate {memory.held_plus(estimate, 'update') / memory.GB:.1f})",
           "measured <= 1.1 x estimate", ok)


def check_command_line(size, device, tmp):
    # Qwen2.5-0.5B's shape: its checkpoints (2 GB of weights, 6 GB with AdamW's states) keep the disk and the time
    # small; the 1.5B step itself is check 4
    model = random_decoder(size["cli_shape"], "cpu")
    _, tokenizer = M.build_tiny()  # a byte-level tokenizer: ids past its vocabulary decode to nothing
    M.save_model(model, tokenizer, tmp / "model")
    del model
    run = dict(check=True, cwd=tmp, capture_output=True, text=True)
    subprocess.run([sys.executable, str(ROOT / "data_prep.py"), "--out-dir", str(tmp / "data")], **run)
    command = [sys.executable, str(ROOT / "srl.py"), "--model", str(tmp / "model"), "--data",
               str(tmp / "data" / "srl_train.jsonl"), "--out", str(tmp / "run"), "--device", str(device),
               "--std-threshold", "-1", "--save-every", "2", "--eval-every", "0", *size["cli"]]  # every group kept
    started = time.perf_counter()
    first = subprocess.run(command + ["--max-steps", "2"], **run)
    subprocess.run(command + ["--max-steps", "3", "--resume"], **run)
    steps = [json.loads(line)["step"] for line in open(tmp / "run" / "metrics.jsonl")]
    state = checkpoints.load_training_state(tmp / "run" / "last")
    estimate = [line for line in first.stdout.splitlines() if line.startswith("fits: peak")]
    report("srl.py command line: 2 steps, then --resume", f"steps logged {steps}, checkpoint at step "
           f"{state['step']}, {time.perf_counter() - started:.0f} s" + (f"; {estimate[0]}" if estimate else ""),
           "steps [1, 2, 3]", steps == [1, 2, 3] and state["step"] == 3)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, a tiny shape, seconds: checks that the script runs")
    parser.add_argument("--budget-s", type=float, default=450, help="skip the checks still to come after this time")
    parser.add_argument("--only", nargs="+", metavar="CHECK", help="run only these checks (a rerun of those that "
                        "failed): logits sampler continuous srl sft 7b cli masked lora lora7b")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA device; --smoke runs it on CPU with a tiny shape")
    device = torch.device("cpu" if args.smoke else "cuda")
    size = SMOKE if args.smoke else FULL
    started = time.perf_counter()
    name = "CPU (smoke)" if args.smoke else torch.cuda.get_device_name(device)
    print(f"{name}, torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        checks = [("logits", lambda: check_kernels(check_logits(size, device), size, device)),
                  ("sampler", lambda: check_sampler(size, device)),
                  ("continuous", lambda: check_continuous(size, device)),
                  ("srl", lambda: check_srl_step(size, device)),
                  ("sft", lambda: check_sft_step(size, device)),
                  ("7b", check_7b),
                  ("cli", lambda: check_command_line(size, device, Path(tmp))),
                  ("masked", lambda: check_masked_backward(size, device)),
                  ("lora", lambda: check_lora_step(size, device, size["shape"], None if args.smoke else 24)),
                  ("lora7b", lambda: check_lora_step(size, device, size["lora7b_shape"], None))]
        unknown = set(args.only or []) - {name for name, _ in checks}
        if unknown:
            parser.error(f"--only: no check named {', '.join(sorted(unknown))}")
        for check, fn in checks:
            if args.only and check not in args.only:
                continue
            if time.perf_counter() - started > args.budget_s:
                report(check, f"skipped: past the {args.budget_s:.0f} s budget", ok=False)
                continue
            try:
                fn()
            except Exception as e:  # the table shows it; the other checks still run
                detail = e.stderr[-500:] if isinstance(e, subprocess.CalledProcessError) else traceback.format_exc()
                print(detail, file=sys.stderr)
                report(check, f"error: {type(e).__name__}: {str(e)[:200]}", ok=False)
            free(device)
    print(f"\n{name}, {time.strftime('%Y-%m-%d')}, total {time.perf_counter() - started:.0f} s\n")
    print("| check | result | target | verdict |\n| --- | --- | --- | --- |")
    for row in ROWS:
        print("| " + " | ".join(row) + " |")
    return 1 if any(row[3] == "FAIL" for row in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
