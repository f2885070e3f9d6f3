"""
The decoder (Qwen2 and Llama families) with LoRA, loaded from and saved to Hugging Face folders: the network the
project trains. It imports no file of the project; engine.py samples from it, grpo.py trains it.

    from model import decode_text, encode_chat, load_model
    from engine import generate
    model, tokenizer = load_model("tiny")                       # or "qwen-1.5b", a hub id, a checkpoint folder
    ids = encode_chat(tokenizer, [{"role": "user", "content": "What is 2+2?"}])
    [out] = generate(model, [ids], max_new_tokens=64, temperature=0)
    print(decode_text(tokenizer, out))

The standard pre-norm decoder: per layer RMSNorm -> grouped-query attention with rotary embeddings -> residual,
RMSNorm -> SwiGLU MLP -> residual. Qwen2 adds a bias to q/k/v. Parameter names are transformers', so its state dicts
load directly (tests check the logits against transformers). Two forwards, kept apart (as nanoGPT and nanochat do):
`model(ids)` / `hidden_states` for training, whole sequences (or a group packed after its prompt), and
`decode_step` for sampling, one token per row through a KV cache.
"""
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


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


# Every attention kernel but cuDNN's, whose masked backward gives NaN gradients on H100/H200 at lengths 64 mod 128
# when a row's log-sum-exp is below about -88.7, as Qwen2.5's "massive activation" heads reach (pytorch#196678).
MASKED_TRAINING_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention(q, k, v, attn_mask=None, is_causal=False):
    """scaled_dot_product_attention with grouped-query attention. With a mask on CUDA the KV heads are repeated
    instead of enable_gqa, which CUDA's fused kernels refuse with a mask (the math kernel would hold [T, T] fp32
    scores); CPU's flash kernel takes both, and repeated heads would be copies kept for backward."""
    group = q.shape[1] // k.shape[1]
    if attn_mask is not None and group > 1 and q.device.type == "cuda":
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if attn_mask is not None and torch.is_grad_enabled():
        with sdpa_kernel(MASKED_TRAINING_KERNELS):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=k.shape[1] != q.shape[1])
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
        """Causal attention, or the attn_mask [B, 1, T, T] given; cache_kv receives the keys and values (prefill)."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        if cache_kv is not None:
            cache_kv[0][:, :, :T], cache_kv[1][:, :, :T] = k, v
        y = attention(q, k, v, attn_mask, is_causal=attn_mask is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


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
        """Training forward up to the final norm: [B, T] ids -> [B, T, hidden], every row at positions 0..T-1 with
        causal attention, or the positions [B, T] and attn_mask [B, 1, T, T] (True where a query sees a key) given,
        to pack sequences that share a prompt. The sampler's prefill passes a KVCache, which receives every layer's
        keys and values."""
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


def default_stop_token_ids(tokenizer):
    """The tokenizer's EOS and end-of-turn tokens: generation stops at whichever comes first."""
    vocab = tokenizer.get_vocab()
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    ids |= {vocab[token] for token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>") if token in vocab}
    return sorted(ids)


def chatml_tokenizer(core):
    """A byte-level `tokenizers` Tokenizer as a transformers tokenizer, with ChatML's special tokens and template."""
    from tokenizers import decoders
    from transformers import PreTrainedTokenizerFast
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>"], chat_template=CHATML_TEMPLATE)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    return tokenizer


def build_tiny(seed=0, tokenizer=None):
    """The embedded default: a random Llama-style decoder (1.0M parameters, N(0, 0.02)) sized to `tokenizer`, by
    default one token per byte (GPT-2's byte-level scheme, id = byte) with ChatML; sft.py fits a BPE one to its data.
    (Llama, not Qwen2: transformers gives a Qwen2 checkpoint Qwen's own pre-tokenizer.)"""
    if tokenizer is None:
        from tokenizers import Tokenizer, models, pre_tokenizers
        printable = [*range(33, 127), *range(161, 173), *range(174, 256)]  # bytes that stand for themselves
        others = [b for b in range(256) if b not in printable]
        vocab = {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}
        core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tokenizer = chatml_tokenizer(core)
    model = Decoder(ModelConfig.from_hf(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=len(tokenizer), hidden_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=4096,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # the matrices; the norms' weights stay ones (no biases in this shape)
            if p.dim() == 2:
                p.normal_(0.0, 0.02, generator=generator)
    model.stop_token_ids = default_stop_token_ids(tokenizer)
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


def save_model(model, tokenizer, path, state_dict=None):
    """Write a folder that transformers' AutoModelForCausalLM / AutoTokenizer load: config.json, model.safetensors
    and the tokenizer files with the chat template. state_dict: the weights to write, if not the model's own (FSDP's
    gathered ones). A model with LoRA adapters is written with them merged into its weights, so that every tool
    loads it as an ordinary checkpoint. (machinery/checkpoints.py writes a run's checkpoints through it, whole or
    not at all, with the training state and the adapters alone in PEFT's format.)"""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_config = dict(model.config.hf, torch_dtype=str(model.lm_head.weight.dtype).removeprefix("torch."))
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or model.state_dict()).items()}
    if model.lora:
        state = merge_adapters(model, state)
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as the embedding: stored once
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(path))


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
