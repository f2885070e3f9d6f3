"""
The decoder (Qwen2 and Llama families) and its loading and saving in Hugging Face format. The sampler and the
log-probabilities that training needs work on this network from engine.py (re-exported here: `from model import
generate`); the GRPO update is in grpo.py, what the training stages share (checks, checkpoints, torchrun) in
common.py. This file imports no stage.

    from model import encode_chat, generate, load_model
    model, tokenizer = load_model("tiny")                       # or "qwen-1.5b", a hub id, a checkpoint folder
    ids = encode_chat(tokenizer, [{"role": "user", "content": "What is 2+2?"}])
    [out] = generate(model, [ids], max_new_tokens=64, temperature=0)
    print(decode_text(tokenizer, out))

The network is the standard pre-norm decoder: token embedding, then per layer RMSNorm -> grouped-query attention
with rotary position embeddings -> residual, RMSNorm -> SwiGLU MLP -> residual; a final RMSNorm and the output
projection. Qwen2 is this block with a bias on the q/k/v projections. Parameter names are those of
transformers, so a Hugging Face state dict loads directly; tests check the logits against transformers.

Two forwards, kept apart on purpose (as in nanoGPT / nanochat):
  - `model(ids)`: training and scoring. Whole sequences, every row starting at position 0, causal attention.
    Rows that are right-padded need no mask: causal attention never lets a real token see the padding after it.
    (`completion_logprobs` also packs the samples of one prompt into a row, through positions and a mask.)
  - `model.decode_step(...)`: inference, one new token per row. Reads and writes a KV cache that is allocated
    once per `generate` call (prompt + new tokens), never grown by concatenation; the prompts' prefill is the
    training forward, which writes the cache as it goes. On CUDA, generate replays the step from a CUDA graph.

Sections: the configuration; the network; the chat template, loading and saving.
"""
import json
import math
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine import completion_logprobs, generate  # noqa: F401  (re-exported: `from model import generate`)

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


# The attention kernels a masked training forward may use: every one but cuDNN's. With an explicit mask, cuDNN's
# backward returns NaN gradients for q on H100/H200 when the sequence length is 64 mod 128 and a row's log-sum-exp
# is below about -88.7, which Qwen2.5's "massive activation" heads reach (pytorch/pytorch#196678, since torch 2.11);
# the packed training forward (completion_logprobs) is exactly that case. Memory-efficient attention takes the mask
# on CUDA, flash attention on CPU.
MASKED_TRAINING_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention(q, k, v, attn_mask=None, is_causal=False):
    """scaled_dot_product_attention with grouped-query attention: q has a whole multiple of k's and v's heads.
    With a mask the KV heads are repeated rather than passing enable_gqa, because CUDA's fused kernels refuse
    enable_gqa together with a mask and fall back to the math kernel, which holds every [T, T] score in fp32; and
    a masked forward that will be differentiated never runs on cuDNN (MASKED_TRAINING_KERNELS)."""
    group = q.shape[1] // k.shape[1]
    if attn_mask is not None and group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if attn_mask is not None and torch.is_grad_enabled():
        with sdpa_kernel(MASKED_TRAINING_KERNELS):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                          enable_gqa=k.shape[1] != q.shape[1])


class Linear(nn.Linear):
    """nn.Linear that can carry a LoRA adapter (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
    Models"): y = x W^T + b + (alpha / r) (x A^T) B^T, where W and b stay frozen and only A [r, in] and B [out, r]
    train. Without an adapter it is nn.Linear, and its own parameters keep their names."""
    lora_scale = 0.0  # alpha / r once an adapter is added; 0 means no adapter (or adapters_off)

    def add_lora(self, rank, alpha):
        # A as PEFT (and nn.Linear for its own weight) initialises it, B zero: the adapted layer starts as the base
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=self.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=self.weight.device))
        self.lora_scale = alpha / rank

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.lora_scale:  # the fp32 adapters are read in x's dtype (bf16 when a bf16 base samples)
            y = y + F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.lora_scale
        return y


@contextmanager
def adapters_off(model):
    """Inside, the model is its frozen base (every adapter's scale 0): with LoRA, the KL term's reference model is
    the policy itself with its adapters switched off, not a copy."""
    adapted = [m for m in model.modules() if isinstance(m, Linear) and m.lora_scale]
    scales = [m.lora_scale for m in adapted]
    for m in adapted:
        m.lora_scale = 0.0
    try:
        yield model
    finally:
        for m, scale in zip(adapted, scales):
            m.lora_scale = scale


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)

    def qkv(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(self, x, cos, sin, attn_mask=None, cache_kv=None):
        """Causal attention over the whole sequence, or the attn_mask [B, 1, T, T] given. The sampler's prefill
        passes its layer's (keys, values) cache, to have the chunk's keys and values written at columns [0, T)."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        if cache_kv is not None:
            cache_kv[0][:, :, :T], cache_kv[1][:, :, :T] = k, v
        y = attention(q, k, v, attn_mask, is_causal=attn_mask is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def decode(self, x, cos, sin, cache_k, cache_v, column, attn_mask):
        """One new token per row: write its key and value at the row's `column` ([B], or one for every row) of the
        layer's cache, then attend over the first L columns, attn_mask [B, 1, 1, L] (boolean, or added to the
        scores) hiding those a row has not written. The shapes depend on B and L alone, so that a CUDA graph can
        replay the step."""
        B, L = x.shape[0], attn_mask.shape[-1]
        q, k, v = self.qkv(x, cos, sin)
        where = column.expand(B).view(B, 1, 1, 1).expand(B, self.num_kv_heads, 1, self.head_dim)
        cache_k.scatter_(2, where, k)
        cache_v.scatter_(2, where, v)
        # fold the query heads that share a KV head into the "time" axis of the query, so that grouped-query
        # attention needs no copy of the cache: [B, kv_heads, group, head_dim]
        q = q.view(B, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)
        y = F.scaled_dot_product_attention(q, cache_k[:, :, :L], cache_v[:, :, :L], attn_mask=attn_mask)
        return self.o_proj(y.reshape(B, 1, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_mask=None, cache_kv=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache_kv)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode(self, x, cos, sin, cache_k, cache_v, column, attn_mask):
        x = x + self.self_attn.decode(self.input_layernorm(x), cos, sin, cache_k, cache_v, column, attn_mask)
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
        self.lora = None  # {"rank", "alpha", "base"} once add_lora has run

    def add_lora(self, rank, alpha, base=None):
        """LoRA on every linear layer of every block (q, k, v, o, gate, up, down: PEFT's "all-linear", the output
        layer left out), and every other parameter frozen: only the adapters train. base: where the frozen weights
        come from (an alias, hub id or folder), written into the adapter's config."""
        self.requires_grad_(False)
        for module in self.model.layers.modules():
            if isinstance(module, Linear):
                module.add_lora(rank, alpha)
        self.lora = dict(rank=rank, alpha=alpha, base=base)
        return self

    def hidden_states(self, ids, positions=None, attn_mask=None, cache=None):
        """Training forward up to the final norm: [B, T] ids -> [B, T, hidden]. By default every row is one
        sequence at positions 0..T-1 with causal attention; completion_logprobs passes its own positions [B, T]
        and an attn_mask [B, 1, T, T] (True where a query sees a key, or added to the scores) to pack sequences
        that share a prompt.
        The sampler's prefill passes its KVCache, which receives every layer's keys and values."""
        B, T = ids.shape
        if positions is None:
            positions = torch.arange(T, device=ids.device).expand(B, T)
        x = self.model.embed_tokens(ids)
        dtype = compute_dtype(x)
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta, dtype)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            # additive, made once, in the dtype attention runs in (bf16 under autocast): SDPA would otherwise convert
            # a boolean mask in every layer and keep each copy for backward
            attn_mask = torch.zeros(attn_mask.shape, dtype=dtype, device=x.device).masked_fill(~attn_mask, -torch.inf)
        for i, layer in enumerate(self.model.layers):
            cache_kv = None if cache is None else (cache.k[i], cache.v[i])
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, attn_mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn_mask, cache_kv)
        return self.model.norm(x)

    def forward(self, ids):
        return self.lm_head(self.hidden_states(ids))

    def decode_step(self, ids, positions, cache, column, attn_mask):
        """Inference, one new token per row: ids and positions [B, 1], keys and values written at each row's cache
        column, attending over the columns attn_mask covers (see Attention.decode). Returns the logits [B, vocab]."""
        x = self.model.embed_tokens(ids)
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer.decode(x, cos, sin, cache.k[i], cache.v[i], column, attn_mask)
        return self.lm_head(self.model.norm(x[:, -1]))


# -----------------------------------------------------------------------------------------------------------------
# The chat template, loading and saving (Hugging Face folders; safetensors only, never pickle, never remote code)

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


def encode_chat(tokenizer, messages):
    """Token ids of a chat (list of {"role", "content"}) through the tokenizer's chat template, ending with the
    assistant's turn opened, ready for generation."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def decode_text(tokenizer, ids):
    """The text of generated token ids, without special tokens (an end-of-turn token is not part of the text)."""
    return tokenizer.decode(ids, skip_special_tokens=True)


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
        others = [b for b in range(256) if b not in printable]
        vocab = {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}
        core = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # one token per byte
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
        expected = set(model.state_dict())
        if model.config.tie_embeddings:  # the output layer is the embedding: stored once, if at all
            state.pop("lm_head.weight", None)
            expected.remove("lm_head.weight")
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
    model's own (common.save_checkpoint passes FSDP's gathered ones). A model with LoRA adapters is written with
    them merged into its weights, so that every tool loads it as an ordinary checkpoint, and the adapters alone go
    to adapter/ beside them in PEFT's format (save_adapter)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        dtype = model.lm_head.weight.dtype
        hf_config = dict(model.config.hf, torch_dtype=str(dtype).removeprefix("torch."))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or model.state_dict()).items()}
        if model.lora:
            save_adapter(model, state, tmp / "adapter")
            state = merge_adapters(model, state)
        if model.config.tie_embeddings:
            state.pop("lm_head.weight", None)  # the same tensor as the embedding: stored once
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(str(tmp))
        if training_state is not None:
            torch.save(training_state, tmp / "training_state.pt")
        (tmp / COMPLETE).touch()  # last: every file before it is whole
    except BaseException:  # a full disk, a kill: the previous checkpoint stays as it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # A folder cannot be replaced in one step: the old one steps aside, the new one takes its name. A kill between
    # the two renames leaves both whole, and recover_checkpoint finishes the swap.
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


COMPLETE = ".complete"  # save_model writes it last into a checkpoint folder: the files before it are whole


def recover_checkpoint(path):
    """After a kill in save_model, put the newest whole checkpoint back at `path` (a folder only ever takes that
    name whole, by a rename): the new one if it was written to the end (path.tmp holds COMPLETE), else the previous
    one (path, or path.old between the renames). Removes the leftovers; returns what it did, in words, or None."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    done = None
    if (tmp / COMPLETE).is_file():
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        done = f"finished the save of {path} that a stop interrupted"
    elif not path.exists() and old.is_dir():
        os.replace(old, path)
        done = f"put back {path}, which a stop during a save had moved aside"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return done


# -----------------------------------------------------------------------------------------------------------------
# LoRA checkpoints: the adapters merged into the weights, and the adapters alone in PEFT's format

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def merge_adapters(model, state):
    """The state dict with each adapter folded into its layer's weight, W + (alpha / r) B A (computed in fp32, stored
    in W's dtype), and the adapters themselves left out: the weights of an ordinary checkpoint."""
    scale = model.lora["alpha"] / model.lora["rank"]
    merged = {name: value for name, value in state.items() if ".lora_" not in name}
    for name in state:
        if name.endswith(".lora_A"):
            layer = name.removesuffix(".lora_A")
            weight = merged[layer + ".weight"]
            delta = state[layer + ".lora_B"].float() @ state[name].float()
            merged[layer + ".weight"] = (weight.float() + scale * delta).to(weight.dtype)
    return merged


def peft_name(name):
    """PEFT's key of one of our adapters: model.layers.0.self_attn.q_proj.lora_A ->
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight."""
    return f"base_model.model.{name}.weight"


def save_adapter(model, state, folder):
    """adapter_config.json and adapter_model.safetensors, as PEFT writes them, so that
    peft.PeftModel.from_pretrained(<the base model>, folder) is the trained model."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True)
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=model.lora["rank"], lora_alpha=model.lora["alpha"],
                  target_modules=LORA_TARGETS, lora_dropout=0.0, bias="none", fan_in_fan_out=False,
                  init_lora_weights=True, use_rslora=False, use_dora=False, inference_mode=True,
                  base_model_name_or_path=ALIASES.get(model.lora["base"], model.lora["base"]))
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    adapters = {peft_name(name): value.contiguous() for name, value in state.items() if ".lora_" in name}
    save_file(adapters, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def load_adapter(model, folder):
    """Read adapter/ (save_adapter's files) into a model that has added adapters of the same rank."""
    from safetensors.torch import load_file
    stored = load_file(str(Path(folder) / "adapter_model.safetensors"))
    ours = {peft_name(name): p for name, p in model.named_parameters() if ".lora_" in name}
    if stored.keys() != ours.keys() or any(stored[k].shape != p.shape for k, p in ours.items()):
        raise ValueError(f"{folder}: the adapters do not match the model's (rank {model.lora['rank']})")
    with torch.no_grad():
        for key, p in ours.items():
            p.copy_(stored[key])

