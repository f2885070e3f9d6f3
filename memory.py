"""
The GPU memory of a training step, estimated from the model's configuration and the settings before any weight
loads, and the plan that makes a step fit the card (after the accounting of "ZeRO", Rajbhandari et al. 2020: 16
bytes a parameter for fp32 weights, gradients and AdamW's two moments). tests/test_memory.py holds the activation
formula to what autograd really keeps; bench/gpu_check.py measures the peaks on a card.

    1. parameter_count, is_small_model
    2. activation_bytes_per_token, estimate_memory: the bytes of each part of a step
    3. gpu_memory, plan_memory: the card's size, and what fits in it (or the flag to change)

It imports model.py (the configuration) and checks.py (refuse, print0); the stages call plan_memory through
common.py.
"""
import torch

from checks import print0, refuse
from model import ModelConfig

GiB = 2 ** 30
SMALL_MODEL_PARAMETERS = 50e6  # below this a model takes the small-model defaults of a stage (tiny: 1.0M)

# -----------------------------------------------------------------------------------------------------------------
# 1. Counting parameters


def layer_parameters(cfg: ModelConfig):
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    weights = h * q + 2 * h * kv + q * h + 3 * h * cfg.intermediate_size + 2 * h
    return weights + (q + 2 * kv) * cfg.qkv_bias + h * cfg.o_bias


def parameter_count(cfg: ModelConfig):
    embeddings = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_embeddings else 2)
    return embeddings + cfg.num_layers * layer_parameters(cfg) + cfg.hidden_size  # + the final norm


def is_small_model(cfg: ModelConfig):
    """The one rule for "a small model" (tiny, or a test's): every stage's defaults depend on it."""
    return parameter_count(cfg) < SMALL_MODEL_PARAMETERS


# -----------------------------------------------------------------------------------------------------------------
# 2. The estimate: bytes of each part of a training step


def activation_bytes_per_token(cfg: ModelConfig, precision="bf16", masked=True, checkpointing=False):
    """Bytes that autograd keeps per token of a training forward (hidden_states), as the tests measure with
    saved-tensor hooks. masked: packed groups, where attention repeats the KV heads."""
    h, i, q = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim
    kv = q if masked else cfg.num_kv_heads * cfg.head_dim
    if precision == "bf16":
        # per layer: two RMSNorms keep their fp32 input and output; autocast keeps its own bf16 copy of the input
        # of each of the q, k, v, gate and up projections; attention keeps q, k, v and its output (o_proj's input);
        # the MLP keeps gate, up, silu(gate) and their product
        layer = 2 * 2 * 4 * h + 5 * 2 * h + 2 * (2 * q + 2 * kv) + 4 * 2 * i
    else:  # the same in fp32, where q/k/v and gate/up share one input and o_proj's input is a copy
        layer = 2 * 2 * 4 * h + 3 * 4 * h + 4 * (2 * q + 2 * kv) + 4 * 4 * i
    final_norm = 2 * 4 * h
    if checkpointing:  # each layer keeps its input; backward rebuilds one layer at a time
        return cfg.num_layers * 4 * h + final_norm + layer
    return cfg.num_layers * layer + final_norm


def estimate_memory(cfg: ModelConfig, precision="bf16", micro_batch_tokens=8192, checkpointing=False,
                    sample_rows=0, sample_length=0, logits_chunk=512, reference=False, shards=1):
    """Peak GPU memory of one training step in bytes, by part. Always held: fp32 master weights, their gradients
    and AdamW's two moments (each divided by `shards` under FSDP, which also holds the units it has gathered), in
    bf16 autocast's copy of the weights, and for RL (sample_rows > 0) the bf16 sampling copy. Then the larger of
    the two phases, which never overlap: sampling (a KV cache of sample_rows x sample_length positions, and the
    last position's logits) and the update (the activations of a micro-batch of micro_batch_tokens positions, its
    packing mask, the output layer's chunk of logits_chunk tokens). reference: a frozen fp32 copy for the KL term
    (--beta > 0)."""
    n = parameter_count(cfg)
    bf16 = precision == "bf16"
    kv_bytes = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * (2 if bf16 else 4)  # per position
    parts = {
        "weights": 4 * n / shards, "gradients": 4 * n / shards, "adamw": 8 * n / shards,
        "autocast_copy": 2 * n if bf16 and shards == 1 else 0,
        # FSDP instead gathers whole weights a unit at a time: the root (embedding, output layer) and two layers
        "fsdp_gathered": (2 if bf16 else 4) * (n - cfg.num_layers * layer_parameters(cfg) + 2 * layer_parameters(cfg))
        if shards > 1 else 0,
        "sampling_copy": (2 if bf16 else 4) * n if sample_rows and (bf16 or shards > 1) else 0,
        "reference": 4 * n if reference else 0,
        # sampling: the cache, and per row the fp32 logits, their softmax and the float64 CDF of the next token
        "kv_cache": sample_rows * (sample_length * kv_bytes + 16 * cfg.vocab_size),
        "activations": micro_batch_tokens * activation_bytes_per_token(cfg, precision, True, checkpointing)
        + 2 * micro_batch_tokens ** 2,  # + the bf16 packing mask, one [T, T] for the whole micro-batch
        # logits (bf16 and fp32), divided by the temperature, log-softmax, and in backward their gradients
        "logits": logits_chunk * cfg.vocab_size * 24,
    }
    fixed = sum(v for k, v in parts.items() if k not in ("kv_cache", "activations", "logits"))
    parts["peak"] = fixed + max(parts["kv_cache"], parts["activations"] + parts["logits"])
    return parts


# -----------------------------------------------------------------------------------------------------------------
# 3. The plan: what fits the card, decided before any weight loads


def gpu_memory(device):
    """Total memory of a CUDA device in bytes; None for any other device."""
    device = torch.device(device)
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def plan_memory(cfg, args, capacity, sample_rows=0, sample_length=0, shards=1):
    """Before any weight loads: estimate the step's peak memory. With --activation-checkpointing left unset it is
    switched on only when the step needs it (above 85% of the card). Prints the estimate; a step that cannot fit
    (above 90%) stops the run with the flags to change. capacity: the card's bytes, None on CPU (nothing done)."""
    if capacity is None:
        args.activation_checkpointing = bool(args.activation_checkpointing)
        return None

    def estimate(checkpointing):
        return estimate_memory(cfg, args.precision, args.micro_batch_tokens, checkpointing, sample_rows,
                               sample_length, reference=getattr(args, "beta", 0) > 0, shards=shards)

    parts = estimate(bool(args.activation_checkpointing))
    if args.activation_checkpointing is None:
        args.activation_checkpointing = parts["peak"] > 0.85 * capacity
        if args.activation_checkpointing:
            print0(f"activation checkpointing on: without it the step needs {parts['peak'] / GiB:.1f} GiB")
            parts = estimate(True)
    print0(f"GPU memory estimate: {parts['peak'] / GiB:.1f} of {capacity / GiB:.1f} GiB ("
          + ", ".join(f"{k} {v / GiB:.1f}" for k, v in parts.items() if v and k != "peak") + ")")
    if parts["peak"] > 0.9 * capacity:
        fixed = parts["peak"] - max(parts["kv_cache"], parts["activations"] + parts["logits"])
        if fixed > 0.75 * capacity:
            change = f"the weights, gradients and AdamW states alone take {fixed / GiB:.1f} GiB"
        elif parts["kv_cache"] > parts["activations"] + parts["logits"]:
            change = "fewer rollouts sampled at once (--batch-prompts, --group-size, --max-new-tokens)"
        else:
            change = "a smaller --micro-batch-tokens, or --activation-checkpointing"
        refuse(f"this step needs about {parts['peak'] / GiB:.1f} GiB, more than 90% of the {capacity / GiB:.1f} "
               f"GiB card: {change}; or shard the model over several GPUs with torchrun and --fsdp")
    return parts
