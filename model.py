"""
The decoder (Qwen2 and Llama families), loading and saving in Hugging Face format, a batched KV-cache sampler,
and per-token log-probabilities for training. Every other stage builds on this file; it imports none of them. It
also holds what the training stages share: checkpoints and --resume, the helpers of a torchrun run (a few lines
each), and the estimate of a training step's GPU memory.

    from model import load_model, generate
    model, tokenizer = load_model("tiny")                       # or "qwen-1.5b", a hub id, a checkpoint folder
    ids = encode_chat(tokenizer, [{"role": "user", "content": "What is 2+2?"}])
    [out] = generate(model, [ids], max_new_tokens=64, temperature=0)
    print(tokenizer.decode(out, skip_special_tokens=True))

The network is the standard pre-norm decoder: token embedding, then per layer RMSNorm -> grouped-query attention
with rotary position embeddings -> residual, RMSNorm -> SwiGLU MLP -> residual; a final RMSNorm and the output
projection. Qwen2 is this block with a bias on the q/k/v projections. Parameter names are those of
transformers, so a Hugging Face state dict loads directly; tests check the logits against transformers.

Two forwards, kept apart on purpose (as in nanoGPT / nanochat):
  - `model(ids)`: training and scoring. Whole sequences, every row starting at position 0, causal attention.
    Rows that are right-padded need no mask: causal attention never lets a real token see the padding after it.
    (`completion_logprobs` also packs the samples of one prompt into a row, through positions and a mask.)
  - `model.forward_cached(...)`: inference. Reads and writes a KV cache that is allocated once per `generate`
    call (prompt + new tokens) and written with slice assignment, never grown by concatenation.

`generate` left-pads prompts of different lengths, gives every row its own positions (cumsum(mask) - 1) and a key
mask, runs the prompts once, then copies each prompt's cache to its `num_samples` rows, so the samples share
the prefill but draw their first token independently.
"""
import json
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# -----------------------------------------------------------------------------------------------------------------
# Configuration, read from (and written back to) a Hugging Face config.json


@dataclass
class ModelConfig:
    architecture: str  # "qwen2" or "llama"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float
    rms_norm_eps: float
    qkv_bias: bool  # Qwen2: bias on q, k, v; Llama: `attention_bias` puts one on q, k, v and o
    o_bias: bool
    tie_embeddings: bool
    max_position_embeddings: int
    eos_token_id: int | list | None
    hf: dict  # the config.json it came from, written back unchanged by save_model

    @classmethod
    def from_hf(cls, hf: dict, source="config.json"):
        arch = hf.get("model_type")
        if arch not in ("qwen2", "llama"):
            raise ValueError(f"{source}: unsupported architecture {arch!r}; supported: qwen2, llama")
        rope = hf.get("rope_parameters") or {}  # transformers >= 5 nests rope settings here
        scaling = hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        if rope_type != "default":
            raise ValueError(f"{source}: rope scaling {rope_type!r} is not supported (only plain rotary embeddings)")
        if hf.get("use_sliding_window"):
            raise ValueError(f"{source}: sliding-window attention is not supported")
        if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias"):
            raise ValueError(f"{source}: only the SwiGLU MLP without bias (hidden_act 'silu') is supported")
        heads = hf["num_attention_heads"]
        bias = arch == "qwen2" or bool(hf.get("attention_bias"))
        return cls(
            architecture=arch, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, intermediate_size=hf["intermediate_size"],
            rope_theta=float(rope.get("rope_theta") or hf.get("rope_theta") or 10000.0),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), qkv_bias=bias, o_bias=arch == "llama" and bias,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 4096), eos_token_id=hf.get("eos_token_id"),
            hf=dict(hf))


# -----------------------------------------------------------------------------------------------------------------
# The network


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # normalise in fp32 and cast back before the weight, exactly as transformers does (matters in bf16)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def compute_dtype(x):
    """The dtype the matmuls run in: autocast's when autocast is on for x's device, else x's own."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def autocast(device, precision):
    """The context of a training forward. "bf16": bf16 matmuls over fp32 master weights (autocast), on CUDA and on
    CPU alike, so that CPU tests run the code a GPU runs; "fp32": nothing changes."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


def rotary_cos_sin(positions, head_dim, theta, dtype):
    """cos and sin tables [B, T, head_dim] for integer positions [B, T] (RoFormer's rotary embedding). dtype is the
    compute dtype (compute_dtype): under autocast, fp32 tables would promote q and k to fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float()[..., None] * inv_freq  # computed in fp32 whatever the model's dtype
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x, cos, sin):  # x: [B, heads, T, head_dim]; cos, sin: [B, T, head_dim]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def attention(q, k, v, attn_mask=None, is_causal=False):
    """scaled_dot_product_attention with grouped-query attention: q has a whole multiple of k's and v's heads.
    With a mask the KV heads are repeated rather than passing enable_gqa, because CUDA's fused kernels refuse
    enable_gqa together with a mask and fall back to the math kernel, which holds every [T, T] score in fp32."""
    group = q.shape[1] // k.shape[1]
    if attn_mask is not None and group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                          enable_gqa=k.shape[1] != q.shape[1])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)

    def qkv(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(self, x, cos, sin, attn_mask=None):
        """Training: causal attention over the whole sequence, or the attn_mask [B, 1, T, T] given."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        y = attention(q, k, v, attn_mask, is_causal=attn_mask is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def forward_cached(self, x, cos, sin, cache_k, cache_v, start, attn_mask):
        """Inference: write this chunk's keys and values at columns [start, start+T) of the layer's cache, then
        attend over columns [0, start+T). attn_mask is a boolean [B, 1, T, start+T] (True = may attend), or None
        for plain causal attention over rows without padding."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        cache_k[:, :, start:start + T] = k
        cache_v[:, :, start:start + T] = v
        keys, values = cache_k[:, :, :start + T], cache_v[:, :, :start + T]
        group = self.num_heads // self.num_kv_heads
        if T == 1:
            # One new token: fold the query heads that share a KV head into the "time" axis of the query, so
            # grouped-query attention needs no copy of the cache: [B, kv_heads, group, head_dim].
            q = q.view(B, self.num_kv_heads, group, self.head_dim)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask)
            y = y.reshape(B, 1, -1)
        else:
            if attn_mask is None:  # causal, shifted by the columns already in the cache
                attn_mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = attention(q, keys, values, attn_mask).transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_cached(self, x, cos, sin, cache_k, cache_v, start, attn_mask):
        x = x + self.self_attn.forward_cached(self.input_layernorm(x), cos, sin, cache_k, cache_v, start, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # nested under `model.` so that parameter names equal those of transformers' *ForCausalLM
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        eos = cfg.eos_token_id
        self.stop_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.activation_checkpointing = False  # recompute each layer in backward: less memory, ~30% more time

    def hidden_states(self, ids, positions=None, attn_mask=None):
        """Training forward up to the final norm: [B, T] ids -> [B, T, hidden]. By default every row is one
        sequence at positions 0..T-1 with causal attention; completion_logprobs passes its own positions [B, T]
        and an attn_mask [B, 1, T, T] (boolean, or added to the scores) to pack sequences that share a prompt."""
        B, T = ids.shape
        if positions is None:
            positions = torch.arange(T, device=ids.device).expand(B, T)
        x = self.model.embed_tokens(ids)
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta, compute_dtype(x))
        for layer in self.model.layers:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, attn_mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn_mask)
        return self.model.norm(x)

    def forward(self, ids):
        return self.lm_head(self.hidden_states(ids))

    def forward_cached(self, ids, positions, cache, attn_mask):
        """Inference forward: ids [B, T] at per-row positions [B, T], written into `cache` after its current
        length. Returns the logits of the last position only, [B, vocab]."""
        x = self.model.embed_tokens(ids)
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer.forward_cached(x, cos, sin, cache.k[i], cache.v[i], cache.length, attn_mask)
        cache.length += ids.shape[1]
        return self.lm_head(self.model.norm(x[:, -1]))


class KVCache:
    """Keys and values of every layer, [layers, B, kv_heads, capacity, head_dim], allocated once."""

    def __init__(self, cfg: ModelConfig, batch, capacity, device, dtype):
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0  # columns written so far

    def repeat_rows(self, times, capacity):
        """A cache with every row repeated `times` times (prompt-major) and room for `capacity` columns."""
        L, B, H, _, D = self.k.shape
        new = KVCache.__new__(KVCache)
        new.k = self.k.new_empty(L, B * times, H, capacity, D)
        new.v = self.v.new_empty(L, B * times, H, capacity, D)
        new.k[:, :, :, :self.length] = self.k[:, :, :, :self.length].repeat_interleave(times, dim=1)
        new.v[:, :, :, :self.length] = self.v[:, :, :, :self.length].repeat_interleave(times, dim=1)
        new.length = self.length
        return new


# -----------------------------------------------------------------------------------------------------------------
# Sampling


def sample_next_token(logits, temperature, top_k, top_p, uniform):
    """logits [B, vocab] -> token ids [B]. Temperature 0 is greedy; otherwise uniform [B, 1] (float64, in [0, 1),
    one number per row) picks each row's token by inverse CDF."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth_best = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p < 1.0:
        # nucleus: keep the smallest set of most likely tokens whose probability reaches top_p
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))  # the top token always stays
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    # inverse-CDF sampling, one uniform number per row: several times faster than torch.multinomial over a
    # large vocabulary on CPU. In float64 so that u * total stays below total and a zero-probability token
    # (a plateau of the CDF) is never the first entry above it.
    cdf = logits.softmax(dim=-1).double().cumsum(dim=-1)
    return torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).squeeze(-1)


def sampling_uniforms(num_prompts, num_samples, steps, seed):
    """The random numbers of one generate call, [rows, steps] float64, prompt-major rows. Row (i, j), prompt i's
    sample j, draws from its own generator seeded by (seed of prompt i, j): `seed` is one int per prompt, or an int
    (prompt i's seed is then seed * 1_000_003 + i), or None (the global generator draws them all). A row's tokens
    then depend on its prompt and its seed alone, not on which other prompts share the batch, or which process of
    several samples it."""
    if seed is None:
        return torch.rand(num_prompts * num_samples, steps, dtype=torch.float64)
    seeds = [seed * 1_000_003 + i for i in range(num_prompts)] if isinstance(seed, int) else list(seed)
    return torch.stack([torch.rand(steps, dtype=torch.float64,
                                   generator=torch.Generator().manual_seed((s * 1_000_003 + j) % 2 ** 63))
                        for s in seeds for j in range(num_samples)])


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, num_samples=1,
             stop_token_ids=None, seed=None, progress=False):
    """Sample continuations of token-id prompts. Returns len(prompts) * num_samples lists of new token ids,
    prompt-major (prompt 0's samples first). A row stops after its first stop token, which is kept.
    stop_token_ids=None uses the model's end-of-turn / EOS ids; [] never stops. seed: an int, one int per prompt,
    or None; see sampling_uniforms."""
    if not prompts or num_samples < 1:
        return []
    if max_new_tokens <= 0:
        return [[] for _ in range(len(prompts) * num_samples)]
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: a prompt needs at least one token")
    cfg, device = model.config, model.lm_head.weight.device
    dtype = model.lm_head.weight.dtype
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the "
                         f"model's context of {cfg.max_position_embeddings} tokens")
    stop_ids = model.stop_token_ids if stop_token_ids is None else list(stop_token_ids)
    uniforms = sampling_uniforms(len(prompts), num_samples, max_new_tokens, seed).to(device) if temperature else None
    was_training = model.training
    model.eval()

    # 1. Prefill: each distinct prompt once, left-padded; every row gets its own positions and a key mask.
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p, device=device)
    key_is_real = torch.arange(longest, device=device) >= (longest - lengths)[:, None]  # [n, longest]
    positions = (key_is_real.long().cumsum(-1) - 1).clamp(min=0)
    padded = not bool(key_is_real.all())
    mask = None
    if padded:  # causal AND key is real; a padding query may see itself, so no softmax row is empty
        causal = torch.ones(longest, longest, dtype=torch.bool, device=device).tril()
        mask = (causal & key_is_real[:, None, :]) | torch.eye(longest, dtype=torch.bool, device=device)
        mask = mask[:, None]
    cache = KVCache(cfg, len(prompts), longest, device, dtype)
    logits = model.forward_cached(ids, positions, cache, mask)

    # 2. Copy each prompt's cache to its samples; from here every row is sampled independently.
    cache = cache.repeat_rows(num_samples, longest + max_new_tokens)
    logits = logits.repeat_interleave(num_samples, dim=0)
    key_is_real = torch.cat([key_is_real.repeat_interleave(num_samples, dim=0),
                             torch.ones(len(logits), max_new_tokens, dtype=torch.bool, device=device)], dim=1)
    next_position = lengths.repeat_interleave(num_samples)[:, None]
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
    finished = torch.zeros(len(logits), dtype=torch.bool, device=device)
    out = torch.zeros(len(logits), max_new_tokens, dtype=torch.long, device=device)
    steps = range(max_new_tokens)
    for t in tqdm(steps, desc="generate", leave=False) if progress else steps:
        token = sample_next_token(logits, temperature, top_k, top_p, uniforms[:, t:t + 1] if temperature else None)
        out[:, t] = token
        finished |= torch.isin(token, stop)
        if t == max_new_tokens - 1 or bool(finished.all()):
            break
        mask = key_is_real[:, None, None, :cache.length + 1] if padded else None
        logits = model.forward_cached(token[:, None], next_position + t, cache, mask)

    # 3. Cut each row after its first stop token (a finished row's later tokens are never returned).
    is_stop = torch.isin(out[:, :t + 1], stop)
    first_stop = torch.where(is_stop.any(1), is_stop.float().argmax(1) + 1, t + 1).tolist()
    model.train(was_training)
    return [row[:n] for row, n in zip(out.tolist(), first_stop)]


# -----------------------------------------------------------------------------------------------------------------
# Log-probabilities for training


def completion_logprobs_reference(model, prompts, completions, temperature=1.0):
    """What completion_logprobs computes, written the simple way: one row per prompt + completion, right-padded,
    a full forward, then the log-probability of each completion token at the position before it. Returns logp
    [B, Tc] and mask [B, Tc]. It holds [B, T, vocab] logits and runs a shared prompt once per row: read it first,
    and use it to check the packed version (the tests do)."""
    device = model.lm_head.weight.device
    rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
    ids = ids.to(device)
    logp_all = (model(ids).float() / temperature).log_softmax(-1)  # [B, T, vocab]
    token_logp = logp_all[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, T-1]: of token t+1 at position t
    # completion token j of row b sits at len(prompt_b) + j; the position before it predicts it
    predictor = torch.tensor([len(p) - 1 for p in prompts])[:, None] + torch.arange(max(map(len, completions)))
    mask = (torch.arange(predictor.shape[1]) < torch.tensor([len(c) for c in completions])[:, None]).float()
    logp = token_logp.gather(1, predictor.clamp(max=ids.shape[1] - 2).to(device))
    return logp * mask.to(device), mask.to(device)


def pack_rows(prompts, completions):
    """The packing of completion_logprobs: runs of consecutive rows that share a prompt become one sequence.
    Returns [prompt, row indices, length of the sequence (the prompt once plus every completion)] per sequence."""
    packs = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if packs and packs[-1][0] == p:
            packs[-1][1].append(i)
            packs[-1][2] += len(c)
        else:
            packs.append([p, [i], len(p) + len(c)])
    return packs


def token_budget_batches(prompts, completions, max_tokens):
    """Consecutive micro-batches (slices of the rows) whose packed forward in completion_logprobs holds at most
    max_tokens positions: number of sequences x the longest, a group's prompt counted once. A micro-batch grows
    row by row, so a group too large for the budget is split; a single row longer than the budget is a
    micro-batch of its own. Memory then depends on the budget, not on how long the rows happen to be."""
    batches, start = [], 0
    lengths = []  # of the packed sequences of the micro-batch being filled
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if i > start and p == prompts[i - 1]:  # the same group: its sequence grows by the completion
            grown = lengths[:-1] + [lengths[-1] + len(c)]
        else:
            grown = lengths + [len(p) + len(c)]
        if i > start and len(grown) * max(grown) > max_tokens:
            batches.append(slice(start, i))
            start, grown = i, [len(p) + len(c)]
        lengths = grown
    return batches + [slice(start, len(prompts))] if prompts else []


def completion_logprobs(model, prompts, completions, temperature=1.0, with_entropy=False, chunk_size=512):
    """Per-token log-probabilities of `completions` (lists of token ids) after `prompts`, at the sampling
    temperature (logits / temperature, so they match what the sampler drew from).

    Returns logp [B, Tc] and mask [B, Tc] (1.0 where row b has a completion token, built from lengths, never
    from a pad id), plus the per-token entropy [B, Tc] (no grad) when with_entropy.

    Consecutive rows with the same prompt (the samples of one GRPO group) are packed into one sequence: the prompt
    once, then each completion at the positions right after the prompt, seeing only the prompt and its own earlier
    tokens. That is the same function as one row per sample (completion_logprobs_reference), but the prompt,
    usually most of the tokens, goes through the network once per group instead of once per sample. The output
    layer runs on the completion tokens only, chunk_size tokens at a time with recomputation in backward, so the
    logits of the whole batch are never held at once."""
    device = model.lm_head.weight.device
    prompts, completions = [list(p) for p in prompts], [list(c) for c in completions]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    packs = pack_rows(prompts, completions)
    shared = any(len(rows) > 1 for _, rows, _ in packs)  # else plain causal attention, no mask
    width = max(n for _, _, n in packs)
    if shared:  # CUDA's memory-efficient attention would copy a mask whose width is not a multiple of 16
        width = -(-width // 16) * 16
    tc = max(len(c) for c in completions)
    ids = torch.zeros(len(packs), width, dtype=torch.long)
    positions = torch.zeros(len(packs), width, dtype=torch.long)
    owner = torch.full((len(packs), width), -2)  # -1: the prompt, i: row i's completion, -2: padding
    targets = torch.zeros(len(prompts), tc, dtype=torch.long)
    source = torch.zeros(len(prompts), tc, dtype=torch.long)  # of each target: its predictor's flat index in packs
    for k, (prompt, rows, _) in enumerate(packs):
        n = len(prompt)
        ids[k, :n], positions[k, :n], owner[k, :n] = torch.tensor(prompt), torch.arange(n), -1
        start = n
        for i in rows:
            end = start + len(completions[i])
            ids[k, start:end] = targets[i, :end - start] = torch.tensor(completions[i], dtype=torch.long)
            positions[k, start:end], owner[k, start:end] = torch.arange(n, n + end - start), i
            predictor = torch.arange(start - 1, end - 1)  # the token before; the prompt's last for the first one
            predictor[:1] = n - 1
            source[i, :end - start] = k * width + predictor
            start = end
    mask = torch.arange(tc) < torch.tensor([len(c) for c in completions])[:, None]  # [B, Tc], from lengths
    attn_mask = None
    if shared:
        owner = owner.to(device)
        sees = (owner[:, :, None] == owner[:, None, :]) | (owner[:, None, :] == -1)
        sees &= torch.ones(width, width, dtype=torch.bool, device=device).tril()
        # additive, made once, in the dtype attention runs in (bf16 under autocast): SDPA would otherwise convert
        # the mask in every layer and keep each copy for backward
        attn_mask = torch.zeros(sees.shape, dtype=compute_dtype(model.lm_head.weight), device=device)
        attn_mask = attn_mask.masked_fill(~sees, float("-inf"))[:, None]
    hidden = model.hidden_states(ids.to(device), positions.to(device), attn_mask)
    # the hidden state before each real completion token, flattened: [N, hidden] with N = mask.sum()
    hidden, targets = hidden.flatten(0, 1)[source[mask].to(device)], targets[mask].to(device)

    def chunk_logprobs(h, y):
        logp_all = (model.lm_head(h).float() / temperature).log_softmax(-1)
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logp_all.gather(-1, y[:, None]).squeeze(-1), entropy

    logps, entropies = [], []
    for s in range(0, len(targets), chunk_size):
        h, y = hidden[s:s + chunk_size], targets[s:s + chunk_size]
        if torch.is_grad_enabled():
            lp, ent = torch.utils.checkpoint.checkpoint(chunk_logprobs, h, y, use_reentrant=False)
        else:
            lp, ent = chunk_logprobs(h, y)
        logps.append(lp)
        entropies.append(ent)
    mask = mask.to(device)
    # back to [B, Tc], zeros where a row has no token
    logp = torch.zeros(mask.shape, device=device).masked_scatter(mask, torch.cat(logps))
    if with_entropy:
        entropy = torch.zeros(mask.shape, device=device).masked_scatter(mask, torch.cat(entropies))
        return logp, mask.float(), entropy
    return logp, mask.float()


# -----------------------------------------------------------------------------------------------------------------
# Tokenizer helper


def encode_chat(tokenizer, messages):
    """Token ids of a chat (list of {"role", "content"}) through the tokenizer's chat template, ending with the
    assistant's turn opened, ready for generation."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


# -----------------------------------------------------------------------------------------------------------------
# Loading and saving (Hugging Face folders; safetensors only, never pickle, never remote code)

ALIASES = {
    "qwen-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen-3b": "Qwen/Qwen2.5-3B-Instruct",
    "qwen-7b": "Qwen/Qwen2.5-7B-Instruct",
    "qwen-coder-7b": "Qwen/Qwen2.5-Coder-7B-Instruct",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "tiny": None,  # built here: see build_tiny
}

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def default_stop_token_ids(tokenizer):
    """The tokenizer's EOS and end-of-turn tokens: generation stops at whichever comes first."""
    vocab = tokenizer.get_vocab()
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    ids |= {vocab[token] for token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>") if token in vocab}
    return sorted(ids)


def build_tiny(seed=0, texts=None):
    """The embedded default: a small random Llama-style decoder (1.0M parameters) and a byte-level tokenizer with
    ChatML special tokens, made on the spot with no file or network. After save_model it is a normal checkpoint.

    texts=None gives one token per byte (256 tokens). With texts (e.g. the warm start's training data, rendered
    through the chat template), byte-level BPE merges are learned from them, as a real model's tokenizer is
    learned from its corpus: frequent words and whole numbers become single tokens, so sequences are about 3x
    shorter and a number is one token, which a model this small learns to add far sooner than digit by digit.
    The merges are deterministic for the same texts. (Llama rather than Qwen2, because transformers replaces a
    Qwen2 checkpoint's pre-tokenizer with Qwen's, which splits numbers into digits; for "llama" it keeps ours.)"""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|im_end|>", "<|endoftext|>", "<|im_start|>"]
    if texts is None:
        # GPT-2's byte-level scheme: every byte value b gets a printable stand-in character; token id = b
        printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
        stand_in, extra = {}, 0
        for b in range(256):
            stand_in[b] = chr(b) if b in printable else chr(256 + extra)
            extra += b not in printable
        core = Tokenizer(models.BPE(vocab={ch: b for b, ch in stand_in.items()}, merges=[]))  # one token per byte
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    else:
        core = Tokenizer(models.BPE())
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's word split
        trainer = trainers.BpeTrainer(vocab_size=1024, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=specials, show_progress=False)
        core.train_from_iterator(texts, trainer)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=specials[0], pad_token=specials[1], additional_special_tokens=specials[2:],
        chat_template=CHATML_TEMPLATE)
    tokenizer.add_special_tokens({"additional_special_tokens": specials[2:]})
    model = Decoder(ModelConfig.from_hf(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=len(tokenizer), hidden_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=4096,
        eos_token_id=tokenizer.convert_tokens_to_ids(specials[0]))))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02, generator=generator)
            elif name.endswith("bias"):
                p.zero_()
    return model, tokenizer


def checkpoint_folder(path):
    """The checkpoint of a local folder: the folder itself when it holds config.json, else a run folder's best/,
    else its last/ (what sft.py, srl.py and rlvr.py write); None when none of them does."""
    for sub in ("", "best", "last"):
        if (Path(path) / sub / "config.json").is_file():
            return Path(path, sub)
    return None


def resolve_folder(name_or_path):
    """A local checkpoint folder (or a run folder: its best/, else last/); an alias or hub id is downloaded
    (config, weights, tokenizer) to the hub cache."""
    if os.path.isdir(name_or_path):
        folder = checkpoint_folder(name_or_path)
        if folder is None:
            raise FileNotFoundError(f"{name_or_path}: no config.json in it, nor in best/ or last/")
        return folder
    repo_id = ALIASES.get(name_or_path, name_or_path)
    if "/" not in repo_id:
        raise ValueError(f"unknown model {name_or_path!r}: not a folder, a hub id (owner/name) or an alias; "
                         f"aliases: {', '.join(ALIASES)}")
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"]))


def weight_files(folder):
    """The safetensors files of a checkpoint: those its index names when the weights are sharded."""
    index = Path(folder) / "model.safetensors.index.json"
    if not index.exists():
        return ["model.safetensors"]
    return sorted(set(json.loads(index.read_text())["weight_map"].values()))


def read_config(name_or_path):
    """The ModelConfig of a model, read before any weight is, once all that load_model will need is checked:
    `tiny`; a local folder (a checkpoint, or a run folder's best/ or last/) with a supported config.json, whole
    safetensors weights and a tokenizer; an alias or hub id, whose copy in the hub cache is checked like a folder,
    or whose config.json alone is fetched. Anything else ends the program with a message naming it (refuse)."""
    name = str(name_or_path)
    if name == "tiny":
        return build_tiny()[0].config
    if os.path.exists(name):
        folder = checkpoint_folder(name) if os.path.isdir(name) else None
        if folder is None:
            refuse(f"model {name}: " + ("no config.json in it, nor in best/ or last/: not a checkpoint or run folder"
                                        if os.path.isdir(name) else "a file, not a checkpoint folder"))
        return check_checkpoint(folder)
    repo_id = ALIASES.get(name, name)
    if repo_id.count("/") != 1 or name.startswith((".", "/", "~")):
        refuse(f"model {name}: no such folder, and not a hub id (owner/name) or an alias ({', '.join(ALIASES)})")
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:  # a copy in the hub cache: checked like a local folder, without the network
        folder = Path(snapshot_download(repo_id, local_files_only=True))
        if (folder / "config.json").is_file() and all((folder / f).is_file() for f in weight_files(folder)):
            return check_checkpoint(folder)
    except LocalEntryNotFoundError:
        pass
    try:  # one request first: offline, the download itself would retry for half a minute before failing
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"))
        folder = Path(hf_hub_download(repo_id, "config.json")).parent
    except Exception as e:  # offline, no such model, a gated one: the hub client's many error types
        what = f"model {name} ({repo_id})" if repo_id != name else f"model {name}: no such folder; as a hub id,"
        refuse(f"{what} not in the hub cache ({constants.HF_HUB_CACHE}), and fetching it from the hub failed "
               f"({first_line(e)}). Offline? Download it on a machine with a network (`hf download {repo_id}`) and "
               f"copy the cache here, or pass a checkpoint folder as --model")
    return check_config(folder / "config.json")


def check_config(path):
    """The ModelConfig of a config.json; refuse one that is not JSON or not of a supported architecture."""
    try:
        hf = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        refuse(f"{path}: not valid JSON ({e})")
    if not isinstance(hf, dict):
        refuse(f"{path}: not a model configuration (a JSON object)")
    try:
        return ModelConfig.from_hf(hf, source=str(path))
    except KeyError as e:
        refuse(f"{path}: no {e} field")
    except ValueError as e:  # from_hf's own messages: an architecture or a feature it does not support
        refuse(str(e))


def check_checkpoint(folder):
    """The ModelConfig of a checkpoint folder, once load_model is sure to read it: a supported config.json, every
    safetensors file of the weights present and whole (the header is read, not the tensors), a tokenizer."""
    from safetensors import SafetensorError, safe_open
    cfg = check_config(folder / "config.json")
    try:
        files = weight_files(folder)
    except (ValueError, KeyError) as e:
        refuse(f"{folder / 'model.safetensors.index.json'}: not a weight index ({first_line(e)})")
    for file in files:
        if not (folder / file).is_file():
            refuse(f"{folder / file}: missing; the checkpoint's weights are incomplete")
        try:
            with safe_open(str(folder / file), "pt"):
                pass
        except (SafetensorError, OSError) as e:
            refuse(f"{folder / file}: cannot be read ({first_line(e)}): truncated or damaged")
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        refuse(f"{folder}: no tokenizer (tokenizer.json, tokenizer_config.json)")
    return cfg


def load_model(name_or_path, device="cpu", dtype=None):
    """(model, tokenizer) for an alias ("tiny", "qwen-1.5b", ...), a hub id or a local Hugging Face folder.
    dtype defaults to bfloat16 on CUDA and float32 elsewhere."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    if name_or_path == "tiny":
        model, tokenizer = build_tiny()
    else:
        folder = resolve_folder(str(name_or_path))
        config_path = folder / "config.json"
        model = Decoder(ModelConfig.from_hf(json.loads(config_path.read_text()), source=str(config_path)))
        state = {}
        for f in weight_files(folder):
            state.update(load_file(str(folder / f)))
        if model.config.tie_embeddings:
            state.pop("lm_head.weight", None)
        expected = set(model.state_dict()) - ({"lm_head.weight"} if model.config.tie_embeddings else set())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(f"{folder}: weights do not match the config: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        model.load_state_dict(state, strict=False)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model.stop_token_ids = default_stop_token_ids(tokenizer)
    return model.to(device=device, dtype=dtype), tokenizer


def save_model(model, tokenizer, path, training_state=None, state_dict=None):
    """Write a folder that transformers' AutoModelForCausalLM / AutoTokenizer load: config.json,
    model.safetensors and the tokenizer files with the chat template; plus training_state.pt when given (optimizer,
    RNG states, step, data position: what --resume needs). Written beside and renamed into place, so an
    interrupted save never leaves a half-written checkpoint. state_dict: the weights to write, if not the
    model's own (save_checkpoint passes FSDP's gathered ones)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = model.lm_head.weight.dtype
    hf_config = dict(model.config.hf, torch_dtype=str(dtype).removeprefix("torch."))
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or model.state_dict()).items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as the embedding: stored once
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(tmp))
    if training_state is not None:
        torch.save(training_state, tmp / "training_state.pt")
    if path.exists():
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


@torch.no_grad()
def copy_weights(target, source):
    """Copy source's parameters into target's (same architecture), casting to target's dtype: how the bf16
    sampling copy takes the fp32 trainer's weights after each update. Under FSDP every process calls it: each
    sharded parameter is gathered whole (full_tensor)."""
    for p_target, p_source in zip(target.parameters(), source.parameters()):
        p_target.copy_(p_source.full_tensor() if hasattr(p_source, "full_tensor") else p_source)


def save_checkpoint(model, tokenizer, folder, optimizer=None, plan=None, **progress):
    """A Hugging Face folder; with an optimizer, plus training_state.pt holding all that --resume needs to continue
    exactly: the optimizer, every RNG state, the run's plan (the resolved flags) and the loop's progress (step,
    position, ...). Under torchrun every process calls it (FSDP gathers the shards of the weights and of AdamW's
    states, keyed by parameter name, so a run can resume on another number of processes); rank 0 alone writes."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=whole)
    state = None
    if optimizer is not None:
        state = dict(progress, optimizer=get_optimizer_state_dict(model, optimizer, options=whole),
                     rng=rng_states(), args=plan)
    if get_rank() == 0:
        save_model(model, tokenizer, folder, training_state=state, state_dict=weights)


def load_optimizer_state(model, optimizer, state):
    """The optimizer's part of training_state.pt back into `optimizer` (sharded again under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def restore_plan(args, plan):
    """--resume: the checkpoint's plan replaces the command line's flags; each flag it overrides is printed."""
    for name, value in plan.items():
        if getattr(args, name, None) not in (None, value):
            print0(f"--resume: --{name.replace('_', '-')} {value} from the checkpoint (not {getattr(args, name)})")
        setattr(args, name, value)


def open_metrics(path, resume_step):
    """metrics.jsonl for appending: emptied on a fresh run; on resume, lines after the checkpoint's step dropped
    (the resumed run redoes those steps)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if resume_step is not None and path.exists():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
    return open(path, "a", encoding="utf-8")


def load_training_state(path):
    """The training_state.pt of a checkpoint folder, or None. Read with weights_only=True: tensors, numbers,
    strings and containers only, never arbitrary pickled objects."""
    file = Path(path) / "training_state.pt"
    return torch.load(file, weights_only=True) if file.exists() else None


def rng_states():
    """Every random number generator a training run draws from, for exact resume."""
    states = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# -----------------------------------------------------------------------------------------------------------------
# User errors: each stage checks its flags, data, model and run folder before any process group forms or any weight
# loads, and a mistake ends the program at once, in one line, with nothing written.


def refuse(message):
    """End the program on a user error: one line in argparse's style (`prog: error: message`) on stderr and exit
    status 2, as argparse does for a flag it cannot parse; no traceback (a bug still shows one). Under torchrun
    every process meets the same error, and rank 0 alone prints it."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def first_line(error):
    """An exception's message cut to one line (some libraries write paragraphs)."""
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__


def check_flags(args, names, ok, must):
    """Refuse the first of the flags `names` whose value fails ok(value): "--lr -1: must be above 0". A flag still at
    None (its default, which depends on the model, comes later) is not checked."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and not ok(value):
            refuse(f"--{name.replace('_', '-')} {value}: must be {must}")


def check_folder(path, flag="--out"):
    """Refuse a folder to write in that cannot be one: it, or the nearest of its parents that exists, is a file."""
    existing = next(folder for folder in [Path(path), *Path(path).parents] if folder.exists())
    if not existing.is_dir():
        refuse(f"{flag} {path}: {existing} is a file, not a folder")


def check_device(device):
    """Refuse a --device that this machine does not have."""
    try:
        kind = torch.device(device)
    except RuntimeError:
        refuse(f"--device {device}: not a device (cpu, cuda, cuda:N)")
    if kind.type not in ("cpu", "cuda"):
        refuse(f"--device {device}: only cpu and cuda are supported")
    if kind.type == "cuda" and not torch.cuda.is_available():
        refuse(f"--device {device}: torch finds no CUDA GPU on this machine; use --device cpu")
    if kind.type == "cuda" and (kind.index or 0) >= torch.cuda.device_count():
        refuse(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), from cuda:0")


def check_fields(record, fields, where):
    """Refuse a record (where: "file:line") that lacks one of `fields` ({name: type, or a tuple of types}), holds it
    empty or as another type. The message names the fields the record has."""
    for name, kind in fields.items():
        value = record.get(name)
        if value is None:
            refuse(f"{where}: no {name!r} field (the record has: {', '.join(record) or 'no field'})")
        if not isinstance(value, kind):
            kinds = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            refuse(f"{where}: {name!r} is a {type(value).__name__}, not a {kinds}")
        if value == "":
            refuse(f"{where}: {name!r} is empty")


def read_jsonl(path, fields=None, flag="--data"):
    """The records of a JSONL file (data_prep.py's outputs). A missing file, a line that is not a JSON object, or a
    record without what the stage reads (fields(record) -> {name: type}, see check_fields) ends the program with a
    message that names the file and the line."""
    path = Path(path)
    if not path.is_file():
        refuse(f"{flag} {path}: " + ("a folder, not a JSONL file" if path.is_dir() else
                                     f"not found; run `python data_prep.py` first (it writes data/), or pass {flag}"))
    records = []
    with open(path, encoding="utf-8") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError:
            refuse(f"{flag} {path}: not a text file (JSONL)")
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            refuse(f"{path}:{line_no}: not valid JSON ({e})")
        if not isinstance(record, dict):
            refuse(f"{path}:{line_no}: a JSON {type(record).__name__}, not an object with named fields")
        check_fields(record, fields(record) if fields else {}, f"{path}:{line_no}")
        records.append(record)
    return records


RUN_PIECES = ("last", "best", "metrics.jsonl", "format_check.json")  # what a training stage writes in --out


def check_run_folder(out, resume, overwrite, state_keys=()):
    """The run folder, checked before anything is written in it; returns --resume's training state (None for a new
    run). Refused: --out naming a file; a folder that already holds a run (last/, best/ or a non-empty
    metrics.jsonl) unless --resume continues it or --overwrite starts again (remove_run deletes the old one, once
    the new run has loaded); --resume without a readable training state holding state_keys. The checkpoint's other
    files are checked by read_config."""
    out = Path(out)
    if resume and overwrite:
        refuse("--resume continues the run in --out and --overwrite starts it again: give one of them")
    check_folder(out)
    if not resume:
        metrics = out / "metrics.jsonl"
        held = [name for name in ("last", "best") if (out / name).exists()]
        held += ["metrics.jsonl"] if metrics.is_file() and metrics.stat().st_size else []
        if held and not overwrite:
            refuse(f"--out {out} already holds a run ({', '.join(held)}): add --resume to continue it, or "
                   f"--overwrite to start again (deletes it)")
        return None
    file = out / "last" / "training_state.pt"
    if not file.is_file():
        refuse(f"--resume: {file} not found: no run to continue in {out} ("
               + ("--overwrite starts again)" if any((out / name).exists() for name in RUN_PIECES) else
                  "leave out --resume to start one)"))
    try:
        state = load_training_state(out / "last")
    except Exception as e:  # truncated or damaged: torch raises RuntimeError, EOFError, pickle's errors, ...
        refuse(f"--resume: {file} cannot be read ({first_line(e)}); nothing in {out} was changed")
    missing = [key for key in state_keys if key not in state] if isinstance(state, dict) else list(state_keys)
    if missing:
        refuse(f"--resume: {file} is not a training state of this stage (it lacks {', '.join(missing)})")
    return state


def remove_run(out):
    """--overwrite: delete the earlier run in --out (RUN_PIECES; nothing else in the folder), once the new run has
    loaded its model and is about to write its own."""
    for name in RUN_PIECES:
        path = Path(out) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


# -----------------------------------------------------------------------------------------------------------------
# Several processes (torchrun): each rank takes every world-th piece of the work, gradients are summed, rank 0
# writes. Without torchrun's variables every helper is the single-process identity.


def init_distributed(device):
    """Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set), join the process group (NCCL on CUDA, gloo on CPU) and
    return (True, rank, world size, this process's device: cuda:LOCAL_RANK); else (False, 0, 1, device)."""
    if "RANK" not in os.environ:
        return False, 0, 1, device
    if str(device).startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")
    return True, dist.get_rank(), dist.get_world_size(), device


def end_distributed():
    """Leave the process group at the end of a run (a process that exits without it may abort in teardown)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs)


def gather(obj):
    """Every process's `obj` (any picklable value), in rank order, on every process."""
    if not dist.is_initialized():
        return [obj]
    objects = [None] * get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


def broadcast(obj):
    """Rank 0's `obj` on every process."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_across(values):
    """Element-wise sums over the processes of a list of numbers (logged statistics)."""
    if not dist.is_initialized():
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(total)
    return total.tolist()


def sum_gradients(model):
    """Sum every gradient over the processes: the all-reduce that DistributedDataParallel does, written out
    because the losses call hidden_states, not forward. Each process's loss is its share of a mean over the
    whole batch, so the sum is the batch's gradient."""
    if dist.is_initialized():
        for p in model.parameters():
            if p.grad is None:  # a process with nothing to train on this step still takes part
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)


def shard(model, precision):
    """FSDP2: each process keeps 1/world of every parameter, gradient and AdamW state. Each layer is gathered whole
    for its forward and backward (in bf16 under --precision bf16) and its gradients are reduce-scattered in fp32;
    the embedding, final norm and output layer form the root unit. hidden_states is registered as a forward, so
    the root's gathering hooks run for it too. FSDP averages the gradients of the processes. In bf16 the layers
    then compute on bf16 weights (a bf16 residual stream) rather than under autocast: close to one process's
    numbers, not equal; in fp32 they agree to rounding."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else None,
                                 reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mixed)
    fully_shard(model, mp_policy=mixed)
    register_fsdp_forward_method(model, "hidden_states")
    return model


# -----------------------------------------------------------------------------------------------------------------
# GPU memory of a training step, estimated from the configuration and the settings (before any weight is loaded)

GiB = 2 ** 30


def layer_parameters(cfg: ModelConfig):
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    weights = h * q + 2 * h * kv + q * h + 3 * h * cfg.intermediate_size + 2 * h
    return weights + (q + 2 * kv) * cfg.qkv_bias + h * cfg.o_bias


def parameter_count(cfg: ModelConfig):
    return cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_embeddings else 2) + cfg.num_layers * \
        layer_parameters(cfg) + cfg.hidden_size


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
    bf16 autocast's copy of the weights, and for RL (sample_rows > 0) the bf16 sampling copy. Then the larger of the two phases, which never overlap: sampling
    (a KV cache of sample_rows x sample_length positions, and the last position's logits) and the update (the
    activations of a micro-batch of micro_batch_tokens positions, its packing mask, the output layer's chunk of
    logits_chunk tokens). reference: a frozen fp32 copy for the KL term (--beta > 0)."""
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
