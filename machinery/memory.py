"""
The GPU memory of a training step, estimated from the model's configuration and the settings before any weight
loads, and the plan that makes a step fit the card. Full fine-tuning holds 16 bytes a parameter before a single
activation (fp32 weights, their gradients, AdamW's two moments: ZeRO's accounting, Rajbhandari et al. 2020); LoRA
holds the frozen base in bf16 (2 bytes a parameter) and those 16 bytes only for its adapters. tests/test_memory.py
holds the activation formulas to what autograd keeps; bench/gpu_check.py measures the peaks on a card.

    1. parameter_count, lora_parameter_count, is_small_model, and PUBLISHED_SHAPES: the aliases' config.json
       shapes, written here so that a plan needs neither the hub nor the weights
    2. activation_bytes_per_token, estimate_memory: the bytes of each part of a step
    3. plan_memory: the settings that do not change the optimisation (prompts sampled at once, micro-batch
       positions, activation checkpointing) picked to stay within 85% of the card, or the flag to change.

1 GB here is 2^30 bytes, as a card's label and nvidia-smi count it.
"""
import torch

from model import ModelConfig

GB = 2 ** 30
SMALL_MODEL_PARAMETERS = 50e6  # below this a model takes the small-model defaults of a stage (tiny: 1.0M)
TARGET = 0.85  # the share of the card a plan may use: the rest is the CUDA context, the allocator's slack, fragments

# -----------------------------------------------------------------------------------------------------------------
# 1. Counting parameters

_QWEN = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936, max_position_embeddings=32768,
             rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_id=151645)
_SMOLLM2 = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, max_position_embeddings=8192,
                rms_norm_eps=1e-5, tie_word_embeddings=True, eos_token_id=2)
# the fields the decoder reads of each alias's published config.json (huggingface.co/<hub id>/blob/main/config.json)
PUBLISHED_SHAPES = {
    "qwen-0.5b": dict(_QWEN, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                      num_key_value_heads=2),
    "qwen-1.5b": dict(_QWEN, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                      num_key_value_heads=2),
    "qwen-3b": dict(_QWEN, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                    num_key_value_heads=2),
    "qwen-7b": dict(_QWEN, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    "qwen-coder-7b": dict(_QWEN, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                          num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    "smollm2-135m": dict(_SMOLLM2, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0),
    "smollm2-360m": dict(_SMOLLM2, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5, rope_theta=100000.0),
    "smollm2-1.7b": dict(_SMOLLM2, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         num_attention_heads=32, num_key_value_heads=32, rope_theta=130000.0),
}


def widths(cfg: ModelConfig):
    """(hidden, query, key/value, intermediate) widths of a layer."""
    return cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size


def layer_parameters(cfg: ModelConfig):
    h, q, kv, i = widths(cfg)
    weights = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    return weights + (q + 2 * kv) * cfg.qkv_bias + h * cfg.o_bias


def parameter_count(cfg: ModelConfig):
    embeddings = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_embeddings else 2)
    return embeddings + cfg.num_layers * layer_parameters(cfg) + cfg.hidden_size  # + the final norm


def lora_parameter_count(cfg: ModelConfig, rank):
    """Parameters of rank-r adapters on q, k, v, o, gate, up and down: r x (inputs + outputs) each."""
    h, q, kv, i = widths(cfg)
    return cfg.num_layers * rank * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h))


def is_small_model(cfg: ModelConfig):
    """The one rule for "a small model" (tiny, or a test's): every stage's defaults depend on it."""
    return parameter_count(cfg) < SMALL_MODEL_PARAMETERS


# -----------------------------------------------------------------------------------------------------------------
# 2. The estimate: bytes of each part of a training step


def activation_bytes_per_token(cfg: ModelConfig, precision="bf16", masked=True, checkpointing=False, lora_rank=0):
    """Bytes that autograd keeps per token of a training forward (hidden_states), as the tests measure with
    saved-tensor hooks. masked: packed groups, where attention repeats the KV heads. lora_rank > 0: a frozen base
    (bf16 under precision "bf16"), whose layers keep no input for their own weights' gradients."""
    h, q, kv, i = widths(cfg)
    kv = q if masked else kv
    if lora_rank:
        b = 2 if precision == "bf16" else 4  # the residual stream's bytes: the base's dtype
        # per layer: two RMSNorms keep their fp32 input and 1/rms; the normalised inputs of the q/k/v and of the
        # gate/up adapters; attention keeps q, k, v, its output and log-sum-exp; the MLP keeps gate, up,
        # silu(gate) and their product (down's input); each of the 7 adapters keeps x A^T
        layer = 2 * (4 * h + 4) + 2 * b * h + b * (2 * q + 2 * kv) + 4 * cfg.num_heads + 4 * b * i + 7 * b * lora_rank
        final_norm, layer_input = 4 * h + 4 + 2 * b * cfg.head_dim, b * h  # (+ the rotary tables all layers share)
    elif precision == "bf16":
        # per layer: two RMSNorms keep their fp32 input and output; autocast keeps its own bf16 copy of the input
        # of each of the q, k, v, gate and up projections; attention keeps q, k, v and its output (o_proj's input);
        # the MLP keeps gate, up, silu(gate) and their product
        layer = 2 * 2 * 4 * h + 5 * 2 * h + 2 * (2 * q + 2 * kv) + 4 * 2 * i
        final_norm, layer_input = 2 * 4 * h, 4 * h
    else:  # the same in fp32, where q/k/v and gate/up share one input and o_proj's input is a copy
        layer = 2 * 2 * 4 * h + 3 * 4 * h + 4 * (2 * q + 2 * kv) + 4 * 4 * i
        final_norm, layer_input = 2 * 4 * h, 4 * h
    if checkpointing:  # each layer keeps its input; backward rebuilds one layer at a time
        return cfg.num_layers * layer_input + final_norm + layer
    return cfg.num_layers * layer + final_norm


def estimate_memory(cfg: ModelConfig, precision="bf16", micro_batch_tokens=8192, checkpointing=False,
                    sample_rows=0, sample_length=0, logits_chunk=512, reference=False, shards=1, lora_rank=0,
                    masked=True):
    """Peak GPU memory of one training step in bytes, by part. Always held, full fine-tuning: fp32 master weights,
    their gradients and AdamW's two moments (each divided by `shards` under FSDP, which also holds the units it has
    gathered), in bf16 autocast's copy of the weights, and for RL (sample_rows > 0) the bf16 sampling copy. LoRA
    (lora_rank > 0): the frozen base (bf16 under "bf16"), the adapters with their gradients and AdamW's moments,
    no sampling copy (the policy samples itself) and no reference copy (the base with its adapters off). Then the
    larger of the two phases, which never overlap: sampling (a KV cache of sample_rows x sample_length positions,
    and the last position's logits) and the update (the activations of a micro-batch of micro_batch_tokens
    positions, with masked its packing mask, the output layer's chunk of logits_chunk tokens). reference: full
    fine-tuning's frozen fp32 copy for the KL term (--beta > 0)."""
    n = parameter_count(cfg)
    bf16 = precision == "bf16"
    kv_bytes = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * (2 if bf16 else 4)  # per position
    if lora_rank:
        adapters = lora_parameter_count(cfg, lora_rank)
        parts = {"weights": (2 if bf16 else 4) * n, "adapters": 4 * adapters, "gradients": 4 * adapters,
                 "adamw": 8 * adapters, "autocast_copy": 2 * adapters if bf16 else 0}
    else:
        parts = {
            "weights": 4 * n / shards, "gradients": 4 * n / shards, "adamw": 8 * n / shards,
            "autocast_copy": 2 * n if bf16 and shards == 1 else 0,
            # FSDP instead gathers whole weights a unit at a time: the root (embedding, output layer) and two layers
            "fsdp_gathered": (2 if bf16 else 4) * (n - cfg.num_layers * layer_parameters(cfg)
                                                   + 2 * layer_parameters(cfg)) if shards > 1 else 0,
            "sampling_copy": (2 if bf16 else 4) * n if sample_rows and (bf16 or shards > 1) else 0,
            "reference": 4 * n if reference else 0}
    parts.update(
        # sampling: the cache, and per row the fp32 logits, their softmax and the float64 CDF of the next token
        kv_cache=sample_rows * (sample_length * kv_bytes + 16 * cfg.vocab_size),
        activations=micro_batch_tokens * activation_bytes_per_token(cfg, precision, masked, checkpointing, lora_rank)
        + (2 * micro_batch_tokens ** 2 if masked else 0),  # + the bf16 packing mask, one [T, T] per micro-batch
        # logits (bf16 and fp32), divided by the temperature, log-softmax, and in backward their gradients
        logits=logits_chunk * cfg.vocab_size * 24)
    parts["held"] = sum(v for k, v in parts.items() if k not in ("kv_cache", "activations", "logits"))
    parts["peak"] = parts["held"] + max(parts["kv_cache"], parts["activations"] + parts["logits"])
    return parts


# -----------------------------------------------------------------------------------------------------------------
# 3. The plan: what fits the card, decided before any weight loads


def gpu_memory(device):
    """Total memory of a CUDA device in bytes; None for any other device."""
    device = torch.device(device)
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def plan_memory(cfg, capacity, precision, lora_rank=0, beta=0.0, micro_batch_tokens=None,
                activation_checkpointing=None, sample_batch=None, group_size=0, prompts=0, sample_length=0,
                longest_row=0, shards=1):
    """Before any weight loads: the settings of a step that fit `capacity` bytes (None: no card, on CPU) within
    TARGET, and its estimate by part. For each of sample_batch (prompts sampled at once, of this process's
    `prompts`, group_size rollouts each, sample_length positions a row), micro_batch_tokens and
    activation_checkpointing left at None it picks the fastest that fits: all prompts at once, then halves; 8192,
    4096, 2048 positions (never fewer than longest_row, a row the update cannot split), without checkpointing and
    then with it. Returns the plan: those settings, the estimate by part, and `report`, its lines to print. A step
    that cannot fit raises InputError naming the flag to change."""
    sampling = group_size > 0

    def estimate(at_once, tokens, checkpointing):
        return estimate_memory(cfg, precision, max(tokens, longest_row), checkpointing, at_once * group_size,
                               sample_length, reference=beta > 0, shards=shards, lora_rank=lora_rank,
                               masked=sampling)

    tokens_tried = [micro_batch_tokens] if micro_batch_tokens else [8192, 4096, 2048]
    tokens_tried = [t for t in tokens_tried if t >= longest_row] or [max(tokens_tried)]
    update_tried = [(c, t) for c in ([activation_checkpointing] if activation_checkpointing is not None
                                     else [False, True]) for t in tokens_tried]
    at_once_tried = [sample_batch or prompts] if sampling else [0]
    while not sample_batch and at_once_tried[-1] > 1:
        at_once_tried.append(at_once_tried[-1] // 2)
    limit = TARGET * capacity if capacity else float("inf")
    checkpointing, tokens = next(((c, t) for c, t in update_tried if held_plus(estimate(1, t, c), "update") <= limit),
                                 update_tried[-1])
    at_once = next((a for a in at_once_tried if held_plus(estimate(a, 0, False), "sampling") <= limit),
                   at_once_tried[-1])
    parts = estimate(at_once, tokens, checkpointing)
    plan = dict(card_gb=capacity / GB if capacity else None, peak_gb=parts["peak"] / GB, lora_rank=lora_rank,
                micro_batch_tokens=tokens, activation_checkpointing=checkpointing,
                sample_batch=(sample_batch or min(at_once, prompts)) if sampling else None,
                parts_gb={k: round(v / GB, 3) for k, v in parts.items() if v})
    lines = report(cfg, plan, parts, precision, at_once * group_size, sample_length, sampling)
    if not capacity:
        lines.append(f"no card: peak {parts['peak'] / GB:.1f} GB at these settings; --gpu-memory GB plans for a card")
    elif parts["peak"] <= limit:
        lines.append(f"fits: peak {parts['peak'] / GB:.1f} GB of {capacity / GB:.1f} GB")
    else:
        plan["does_not_fit"] = does_not_fit(parts, capacity, lora_rank, sampling)
    return plan, lines


def held_plus(parts, phase):
    """The peak of one phase of a step: what is always held, plus the sampling cache or the update's activations."""
    return parts["held"] + (parts["kv_cache"] if phase == "sampling" else parts["activations"] + parts["logits"])


def report(cfg, plan, parts, precision, rows, sample_length, sampling):
    """The plan in a few lines: the settings, what is held, each phase's peak."""
    gb = lambda *names: " + ".join(f"{name} {parts[name] / GB:.2f}" for name in names if parts.get(name))
    what = (f"LoRA rank {plan['lora_rank']} on a frozen {'bf16' if precision == 'bf16' else 'fp32'} base"
            if plan["lora_rank"] else f"full fine-tuning, {precision}")
    checkpointing = "on" if plan["activation_checkpointing"] else "off"
    n = parameter_count(cfg)
    lines = [f"memory plan: {f'{n / 1e9:.2f}B' if n >= 1e8 else f'{n / 1e6:.1f}M'} parameters, {what}; micro-batches "
             f"of {plan['micro_batch_tokens']} positions, activation checkpointing {checkpointing}"
             + (f", {plan['sample_batch']} prompts sampled at once" if sampling else "")]
    held = gb("weights", "adapters", "gradients", "adamw", "autocast_copy", "fsdp_gathered", "sampling_copy",
              "reference")
    lines.append(f"  held: {held} GB")
    if sampling:
        lines.append(f"  sampling: KV cache of {rows} rows x {sample_length} positions {parts['kv_cache'] / GB:.2f} "
                     f"GB, peak {held_plus(parts, 'sampling') / GB:.2f} GB")
    lines.append(f"  update: {gb('activations', 'logits')} GB, peak {held_plus(parts, 'update') / GB:.2f} GB")
    return lines


def does_not_fit(parts, capacity, lora_rank, sampling):
    """The line that ends a plan that cannot fit, naming the flag to change."""
    limit = TARGET * capacity
    if parts["held"] > 0.75 * limit:
        change = ("a smaller model (the frozen base alone is too large)" if lora_rank else
                  "--lora-rank 32 (LoRA: a frozen bf16 base and small adapters), a smaller model, or --fsdp over "
                  "several GPUs")
        what = f"the weights{' and adapters' if lora_rank else ', gradients and AdamW states'} alone take"
        return f"does not fit: {what} {parts['held'] / GB:.1f} GB of the {limit / GB:.1f} GB a plan may use; {change}"
    if sampling and held_plus(parts, "sampling") > limit:
        change = "--max-new-tokens or --group-size (even one prompt at a time does not fit)"
    else:
        change = "--micro-batch-tokens (smaller), --activation-checkpointing, or --max-new-tokens"
    return (f"does not fit: peak {parts['peak'] / GB:.1f} GB, over {TARGET:.0%} of the {capacity / GB:.1f} GB card; "
            f"change {change}")
