"""
The engine: the batched KV-cache sampler and the per-token log-probabilities that training needs (after nanochat's
engine.py and nano-vllm's engine/). It works on any decoder with model.py's interface (hidden_states, decode_step,
lm_head, config, stop_token_ids) and imports no file of this project; model.py re-exports generate and
completion_logprobs, so `from model import generate` works.

    1. Sampling. `generate(model, prompts, max_new_tokens, ...)` runs in four phases:
         1) prefill: each distinct prompt once, left-padded, every row with its own positions and a key mask; the
            training forward writes the KV cache as it goes;
         2) the prompt's cache is copied to each of its samples; from here every row is sampled on its own;
         3) decode: one token per row per step, the step's shapes fixed (it attends over every cache column, the
            unwritten ones masked), so that on CUDA a graph captured once replays it;
         4) each row is cut after its first stop token.
       Every row draws its random numbers from its own generator, seeded by (its prompt's seed, its sample index):
       a row's tokens depend on its prompt and seed alone, not on the batch around it or the process that samples it.
    2. Log-probabilities for training. `completion_logprobs_reference` is the plain version (one row per sample):
       read it first. `completion_logprobs` computes the same numbers with the samples of one prompt packed into one
       sequence (the prompt once), and `token_budget_batches` cuts a batch into micro-batches of N positions.

The model (the network, loading, saving) is in model.py; the GRPO update that calls these is in grpo.py.
"""
import torch
from tqdm import tqdm


def mix_seed(seed, index):
    """A seed from a run's seed and an index (an epoch, a prompt's place in the stream, a sample): the project's one
    rule for deriving seeds, so that each random stream can be rebuilt on its own, on resume or on another process."""
    return (seed * 1_000_003 + index) % 2 ** 63


# -----------------------------------------------------------------------------------------------------------------
# 1. Sampling: the cache, the next token, one seeded random stream per row, generate


class KVCache:
    """Keys and values of every layer, [layers, B, kv_heads, capacity, head_dim], allocated once."""

    def __init__(self, cfg, batch, capacity, device, dtype):
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim)
        # zeros, not empty: a decode step attends over unwritten columns too, masked, and a weight of 0 times a
        # NaN left in memory would still be NaN
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)


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
    (prompt i's seed is then mix_seed(seed, i)), or None (the global generator draws them all). A row's tokens
    then depend on its prompt and its seed alone, not on which other prompts share the batch, or which process of
    several samples it."""
    if seed is None:
        return torch.rand(num_prompts * num_samples, steps, dtype=torch.float64)
    seeds = [mix_seed(seed, i) for i in range(num_prompts)] if isinstance(seed, int) else list(seed)
    return torch.stack([torch.rand(steps, dtype=torch.float64,
                                   generator=torch.Generator().manual_seed(mix_seed(s, j)))
                        for s in seeds for j in range(num_samples)])


def captured_in_cuda_graph(fn):
    """fn(), captured once in a CUDA graph: each call of the returned function replays its kernels on whatever the
    tensors fn reads hold now, and returns fn's output tensor, overwritten by the next call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # a warm-up outside the graph: the libraries choose their kernels and workspaces
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn()

    def replay():
        graph.replay()
        return output
    return replay


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, num_samples=1,
             stop_token_ids=None, seed=None, progress=False, cuda_graph=None):
    """Sample continuations of token-id prompts. Returns len(prompts) * num_samples lists of new token ids,
    prompt-major (prompt 0's samples first). A row stops after its first stop token, which is kept.
    stop_token_ids=None uses the model's end-of-turn / EOS ids; [] never stops. seed: an int, one int per prompt,
    or None; see sampling_uniforms. cuda_graph (default: on CUDA) replays each decode step from a CUDA graph:
    the same kernels on the same inputs as without it, so the same tokens, in one launch instead of one per kernel
    (a 1.5B model's step is ~1,100 kernels, too short each for the CPU to launch them as fast as the GPU runs them)."""
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
    logits = model.lm_head(model.hidden_states(ids, positions, mask, cache)[:, -1])

    # 2. Copy each prompt's cache to its samples; from here every row is sampled independently.
    prefill, cache = cache, KVCache(cfg, len(prompts) * num_samples, longest + max_new_tokens, device, dtype)
    cache.k[:, :, :, :longest] = prefill.k.repeat_interleave(num_samples, dim=1)  # rows stay prompt-major
    cache.v[:, :, :, :longest] = prefill.v.repeat_interleave(num_samples, dim=1)
    del prefill  # its memory is free before the first new token
    logits = logits.repeat_interleave(num_samples, dim=0)
    key_is_real = torch.cat([key_is_real.repeat_interleave(num_samples, dim=0),
                             torch.ones(len(logits), max_new_tokens, dtype=torch.bool, device=device)], dim=1)
    next_position = lengths.repeat_interleave(num_samples)[:, None]
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
    finished = torch.zeros(len(logits), dtype=torch.bool, device=device)
    out = torch.zeros(len(logits), max_new_tokens, dtype=torch.long, device=device)

    # 3. Decode. The step reads its inputs from tensors updated in place, and its shapes never change (it attends
    # over every column of the cache, the unwritten ones masked), so that a CUDA graph can replay it.
    token_in, position_in = torch.zeros_like(next_position), torch.zeros_like(next_position)
    column = torch.tensor([longest], device=device)  # the cache column of the new token's key and value
    all_columns = torch.arange(longest + max_new_tokens, device=device)

    def decode_step():
        # an additive mask in the model's dtype, made once per step: SDPA would convert a boolean one in every layer
        visible = key_is_real & (all_columns <= column)
        mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
        return model.decode_step(token_in, position_in, cache, column, mask[:, None, None, :])

    if device.type == "cuda" if cuda_graph is None else cuda_graph:  # on CUDA unless told otherwise
        decode_step = captured_in_cuda_graph(decode_step)
    steps = range(max_new_tokens)
    for t in tqdm(steps, desc="generate", leave=False) if progress else steps:
        token = sample_next_token(logits, temperature, top_k, top_p, uniforms[:, t:t + 1] if temperature else None)
        out[:, t] = token
        finished |= torch.isin(token, stop)
        if t == max_new_tokens - 1 or bool(finished.all()):
            break
        token_in.copy_(token[:, None])
        position_in.copy_(next_position + t)
        column.fill_(longest + t)
        logits = decode_step()

    # 4. Cut each row after its first stop token (a finished row's later tokens are never returned).
    is_stop = torch.isin(out[:, :t + 1], stop)
    first_stop = torch.where(is_stop.any(1), is_stop.float().argmax(1) + 1, t + 1).tolist()
    model.train(was_training)
    return [row[:n] for row, n in zip(out.tolist(), first_stop)]


def sample_groups(model, prompts, num_samples, max_new_tokens, prompts_at_once=None, seeds=None, desc=None,
                  **sampling):
    """num_samples completions of every prompt, one list per prompt (a GRPO group, or a problem's avg@k samples):
    generate over prompts_at_once prompts at a time (default: all at once), prompt i drawing from seeds[i] (None: the
    global generator). desc: a progress bar over the completions, under that name."""
    at_once = prompts_at_once or max(len(prompts), 1)
    bar = tqdm(total=len(prompts) * num_samples, desc=desc, unit="completion", leave=False, disable=desc is None)
    groups = []
    for start in range(0, len(prompts), at_once):
        part = slice(start, start + at_once)
        outputs = generate(model, prompts[part], max_new_tokens, num_samples=num_samples,
                           seed=None if seeds is None else list(seeds[part]), **sampling)
        groups += [outputs[k:k + num_samples] for k in range(0, len(outputs), num_samples)]  # prompt-major
        bar.update(len(outputs))
    bar.close()
    return groups


# -----------------------------------------------------------------------------------------------------------------
# 2. Log-probabilities for training: the plain reference, the packing, the micro-batch planner, the packed version


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
        attn_mask = sees[:, None]  # the model makes it additive once, in the dtype attention runs in
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
