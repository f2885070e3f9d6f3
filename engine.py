"""
The engine: from a chat to token ids and back, the inference forward through a KV cache, the sampler, and the
per-token log-probabilities that training needs (after nanochat's engine.py and nano-vllm). It imports model.py.

    1. Text in and out: encode_chat (the chat template), decode_text.
    2. The inference forward: decode_step, one new token per row, reading and writing a KVCache allocated once.
    3. Sampling. `generate_static` is the plain sampler, every row in one batch until the last one stops: read it
       first. `generate` gives the same tokens with continuous batching: at most max_rows rows in slots of the
       cache; each distinct prompt is prefilled once and copied into the slots of its samples; a decode step
       attends only over the columns the live rows have written (on CUDA replayed from a graph); a row that stops
       frees its slot for the next waiting one, and once none wait the live rows move to the first slots, so no
       step is spent on rows that are done. Every row draws its random numbers from its own generator, seeded by
       (its prompt's seed, its sample index): its tokens depend on its prompt and seed, not on the rows around it
       or the process that samples it (in exact arithmetic; in floating point another batch can move a logit in
       its last bits, which changes a token drawn at a near tie, rarely).
    4. Log-probabilities for training: `completion_logprobs_reference`, one row per sample (read it first), and
       `completion_logprobs`, the same numbers with a group's samples packed after one copy of their prompt;
       `token_budget_batches` cuts a batch into micro-batches of N positions.
"""
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import rotary_cos_sin


def mix_seed(seed, index):
    """A seed from a run's seed and an index (an epoch, a prompt's place in the stream, a sample): the project's one
    rule for deriving seeds, so that each random stream can be rebuilt on its own, on resume or on another process."""
    return (seed * 1_000_003 + index) % 2 ** 63


# -----------------------------------------------------------------------------------------------------------------
# 1. Text in and out


def encode_chat(tokenizer, messages):
    """Token ids of a chat (list of {"role", "content"}) through the tokenizer's chat template, ending with the
    assistant's turn opened, ready for generation."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def decode_text(tokenizer, ids):
    """The text of generated token ids, without special tokens (an end-of-turn token is not part of the text)."""
    return tokenizer.decode(ids, skip_special_tokens=True)


# -----------------------------------------------------------------------------------------------------------------
# 2. The inference forward: one new token per row, through a KV cache


class KVCache:
    """Keys and values of every layer, [layers, B, kv_heads, capacity, head_dim], allocated once."""

    def __init__(self, cfg, batch, capacity, device, dtype):
        if cfg is None:  # (a view, see view())
            return
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim)
        # zeros, not empty: a decode step attends over unwritten columns too, masked, and a weight of 0 times a
        # NaN left in memory would still be NaN
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def view(self, batch):
        """The first `batch` rows of the cache, sharing its memory."""
        rows = KVCache(None, 0, 0, None, None)
        rows.k, rows.v = self.k[:, :batch], self.v[:, :batch]
        return rows


def decode_step(model, ids, positions, cache, column, attn_mask):
    """model.py's decoder, one new token per row: ids and positions [B, 1]; each layer writes the token's key and
    value at the row's `column` ([B], or one for every row) of its cache, then attends over the first L columns,
    attn_mask [B, 1, 1, L] (boolean, or added to the scores) hiding those the row has not written. The shapes depend
    on B and L alone, so that a CUDA graph can replay the step. Returns the logits [B, vocab]."""
    cfg = model.config
    B, L = ids.shape[0], attn_mask.shape[-1]
    x = model.model.embed_tokens(ids)
    cos, sin = rotary_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
    where = column.expand(B).view(B, 1, 1, 1).expand(B, cfg.num_kv_heads, 1, cfg.head_dim)
    for layer, cache_k, cache_v in zip(model.model.layers, cache.k, cache.v):
        q, k, v = layer.self_attn.qkv(layer.input_layernorm(x), cos, sin)
        cache_k.scatter_(2, where, k)
        cache_v.scatter_(2, where, v)
        # fold the query heads that share a KV head into the "time" axis of the query, so that grouped-query
        # attention needs no copy of the cache: [B, kv_heads, group, head_dim]
        q = q.view(B, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim)
        y = F.scaled_dot_product_attention(q, cache_k[:, :, :L], cache_v[:, :, :L], attn_mask=attn_mask)
        x = x + layer.self_attn.o_proj(y.reshape(B, 1, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(model.model.norm(x[:, -1]))


# -----------------------------------------------------------------------------------------------------------------
# 3. Sampling: the next token, one seeded random stream per row, the static sampler, continuous batching


def sample_next_token(logits, temperature, top_k, top_p, uniform, with_logprob=False):
    """logits [B, vocab] -> token ids [B]. Temperature 0 is greedy; otherwise uniform [B, 1] (float64, in [0, 1),
    one number per row) picks each row's token by inverse CDF. with_logprob: (tokens, their log-probabilities
    under the distribution sampled)."""
    if temperature == 0:
        token = logits.argmax(dim=-1)
        return (token, torch.zeros(token.shape, device=token.device)) if with_logprob else token
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
    token = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).squeeze(-1)
    if with_logprob:
        return token, logits.log_softmax(dim=-1).gather(-1, token[:, None]).squeeze(-1)
    return token


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


@torch.no_grad()
def generate_static(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, num_samples=1,
                    stop_token_ids=None, seed=None):
    """The plain sampler (read it first; generate below gives the same tokens, faster): every row, a prompt's
    num_samples rows one after another, in one batch from the first token to the last. Returns one list of new
    token ids per row, each cut after its first stop token (kept). Arguments as generate's."""
    rows = [list(p) for p in prompts for _ in range(num_samples)]
    if not rows:
        return []
    cfg, device, dtype = model.config, model.lm_head.weight.device, model.lm_head.weight.dtype
    lengths = torch.tensor([len(p) for p in rows], device=device)
    capacity = int(lengths.max()) + max_new_tokens
    stop = torch.tensor(model.stop_token_ids if stop_token_ids is None else list(stop_token_ids), device=device)
    uniforms = sampling_uniforms(len(prompts), num_samples, max_new_tokens, seed).to(device) if temperature else None
    was_training = model.training
    model.eval()
    # 1) prefill: the prompts right-padded, through the training forward, which writes the cache; causal attention
    # keeps a row's padding out of the view of its real tokens, and the decode steps overwrite it
    ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long, device=device)
    for i, prompt in enumerate(rows):
        ids[i, :len(prompt)] = torch.tensor(prompt, device=device)
    cache = KVCache(cfg, len(rows), capacity, device, dtype)
    hidden = model.hidden_states(ids, cache=cache)
    logits = model.lm_head(hidden[torch.arange(len(rows), device=device), lengths - 1])
    # 2) one token for every row per step, until every row has stopped
    tokens, done, position = [], torch.zeros(len(rows), dtype=torch.bool, device=device), lengths.clone()
    for step in range(max_new_tokens):
        token = sample_next_token(logits, temperature, top_k, top_p, uniforms[:, step:step + 1] if temperature
                                  else None)
        tokens.append(token)
        done |= torch.isin(token, stop)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        visible = torch.arange(capacity, device=device) <= position[:, None]  # the prompt and what it wrote
        mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
        logits = decode_step(model, token[:, None], position[:, None], cache, position, mask[:, None, None])
        position += 1
    model.train(was_training)
    out = torch.stack(tokens, 1).tolist() if tokens else [[] for _ in rows]
    stops = set(stop.tolist())
    return [row[:next((j + 1 for j, t in enumerate(row) if t in stops), len(row))] for row in out]


def captured_in_cuda_graph(fn, pool=None):
    """fn(), captured once in a CUDA graph: each call of the returned function replays its kernels on whatever the
    tensors fn reads hold now, and returns fn's output tensor, overwritten by the next call. Graphs that never run
    at the same time may share one memory pool."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # a warm-up outside the graph: the libraries choose their kernels and workspaces
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = fn()

    def replay():
        graph.replay()
        return output
    return replay


COLUMN_BUCKET = 256  # a decode step attends over the cache's first L columns, L a multiple of this
COMPACT_TAIL = True  # once no row waits, the live rows move to the first slots; False (benchmarks): static batching


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, num_samples=1,
             stop_token_ids=None, seed=None, progress=False, cuda_graph=None, max_rows=None, stats=None,
             return_logprobs=False):
    """Sample continuations of token-id prompts. Returns len(prompts) * num_samples lists of new token ids,
    prompt-major (prompt 0's samples first). A row stops after its first stop token, which is kept.
    stop_token_ids=None uses the model's end-of-turn / EOS ids; [] never stops. seed: an int, one int per prompt,
    or None; see sampling_uniforms.

    Continuous batching: at most max_rows rows (default: all of them) are sampled at once, each in a slot of the KV
    cache; whenever a row stops, the next waiting row takes its slot, so no step is spent on rows that are done.
    A row draws from its own random numbers, so its tokens do not depend on max_rows (but for floating-point near
    ties; see the docstring above), which sets only the memory (max_rows x (longest prompt + max_new_tokens) cache
    positions) and the speed. cuda_graph (default: on CUDA)
    replays each decode step from a CUDA graph, one for each width of the columns attended over: the same kernels
    on the same inputs, so the same tokens, in one launch instead of one per kernel (a 1.5B model's step is ~1,100
    kernels, too short each for the CPU to launch them as fast as the GPU runs them). stats: a dict that receives
    the work done, "decode_steps" and "row_steps" (rows computed: one per prefilled row, one per slot per step).
    return_logprobs: also return each token's log-probability under the distribution it was drawn from (logits /
    temperature, after top-k and top-p): (token lists, log-probability lists)."""
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
    rows = len(prompts) * num_samples  # row r is sample r % num_samples of prompt r // num_samples
    slots = min(max_rows or rows, rows)
    stop = torch.tensor(model.stop_token_ids if stop_token_ids is None else list(stop_token_ids), dtype=torch.long,
                        device=device)
    uniforms = sampling_uniforms(len(prompts), num_samples, max_new_tokens, seed).to(device) if temperature else None
    was_training = model.training
    model.eval()

    capacity = -(-(longest + max_new_tokens) // 16) * 16  # cache columns (CUDA's attention wants widths of 16)
    cache = KVCache(cfg, slots, capacity, device, dtype)
    out = torch.zeros(rows, max_new_tokens, dtype=torch.long, device=device)  # each row's tokens
    out_logp = torch.zeros(rows, max_new_tokens, device=device) if return_logprobs else None
    count = torch.zeros(rows, dtype=torch.long, device=device)  # how many each row has
    row_of = torch.full((slots,), -1, dtype=torch.long, device=device)  # the row in each slot; -1: none
    token_in = torch.zeros(slots, 1, dtype=torch.long, device=device)  # what the decode step reads, in place:
    position_in = torch.zeros(slots, 1, dtype=torch.long, device=device)  # its token, and its position = column
    waiting = list(range(rows))[::-1]  # popped from the end: rows in order
    prefilled = {}  # prompt -> (keys, values, last logits), shared by its rows until the last one starts
    bar = tqdm(total=rows, desc=progress if isinstance(progress, str) else "generate", unit="completion",
               leave=False, disable=not progress)

    def sample(logits, rows_now):
        """The next token of each row of rows_now [n], from its logits [n, vocab] and its own random number; True
        where the row is done (its stop token, or max_new_tokens)."""
        step = count[rows_now]
        token = sample_next_token(logits, temperature, top_k, top_p,
                                  uniforms[rows_now, step][:, None] if temperature else None, return_logprobs)
        if return_logprobs:
            token, out_logp[rows_now, step] = token
        out[rows_now, step] = token
        count[rows_now] += 1
        return token, torch.isin(token, stop) | (count[rows_now] == max_new_tokens)

    def start(new_rows, new_slots):
        """1) Prefill each distinct prompt of rows about to start, once (right-padded and causal: a real token never
        sees the padding after it); 2) copy a prompt's keys and values into the slot of each of its rows, whose first
        token comes from the prefill's last logits. Returns the slots whose row stopped at once."""
        todo = sorted({r // num_samples for r in new_rows} - prefilled.keys())
        if todo:  # and the prompts of the next waiting rows (a quarter of the slots): fewer, larger prefills
            todo = sorted(set(todo) | {r // num_samples for r in waiting[-(slots // 4):]} - prefilled.keys())
            ids = torch.zeros(len(todo), max(len(prompts[p]) for p in todo), dtype=torch.long, device=device)
            for i, p in enumerate(todo):
                ids[i, :len(prompts[p])] = torch.tensor(prompts[p], device=device)
            fresh = KVCache(cfg, len(todo), ids.shape[1], device, dtype)
            last = torch.tensor([len(prompts[p]) - 1 for p in todo], device=device)
            logits = model.lm_head(model.hidden_states(ids, cache=fresh)[torch.arange(len(todo)), last])
            for i, p in enumerate(todo):
                prefilled[p] = (fresh.k[:, i, :, :len(prompts[p])], fresh.v[:, i, :, :len(prompts[p])], logits[i])
        for r, s in zip(new_rows, new_slots):
            keys, values, _ = prefilled[r // num_samples]
            cache.k[:, s, :, :keys.shape[2]], cache.v[:, s, :, :keys.shape[2]] = keys, values
        first_logits = torch.stack([prefilled[r // num_samples][2] for r in new_rows])
        for r in new_rows:
            if r % num_samples == num_samples - 1:  # a prompt's last row has started: its prefill is done with
                del prefilled[r // num_samples]
        rows_now, slots_now = torch.tensor(new_rows, device=device), torch.tensor(new_slots, device=device)
        row_of[slots_now] = rows_now
        position_in[slots_now, 0] = torch.tensor([len(prompts[r // num_samples]) for r in new_rows], device=device)
        token, done = sample(first_logits, rows_now)
        token_in[slots_now, 0] = token
        return slots_now[done].tolist()

    def refill(holes, live):
        """4) The slots of rows that stopped (holes, among the first `live`) take waiting rows; once none wait, the
        last live rows move into them, so that the live rows always fill slots 0 .. live-1 and a step computes no
        slot beyond them. Returns the new number of live slots."""
        while holes or (waiting and live < slots):
            if not waiting and not COMPACT_TAIL:  # (as a static batch: the stopped rows' slots stay in the step)
                row_of[torch.tensor(holes, device=device)] = -1
                return live if bool((row_of[:live] >= 0).any()) else 0
            if not waiting:  # compact: the last live row moves into the first hole
                holes.sort()
                if holes[-1] == live - 1:
                    row_of[holes.pop()] = -1
                else:
                    hole = holes.pop(0)
                    cache.k[:, hole], cache.v[:, hole] = cache.k[:, live - 1], cache.v[:, live - 1]
                    for state in (token_in, position_in, row_of):
                        state[hole] = state[live - 1]
                    row_of[live - 1] = -1
                live -= 1
                continue
            targets = (sorted(holes) + list(range(live, slots)))[:len(waiting)]
            holes = sorted(set(holes) - set(targets))
            live = max(live, max(targets) + 1)
            stopped = start([waiting.pop() for _ in targets], targets)  # a row that stops at once: a hole again
            bar.update(len(stopped))
            holes += stopped
        return live

    def decode_live_rows(width, batch):
        # an additive mask in the model's dtype, made once per step: SDPA would convert a boolean one in every layer
        visible = torch.arange(width, device=device) <= position_in[:batch]
        mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
        rows_cache = cache.view(batch)
        return decode_step(model, token_in[:batch], position_in[:batch], rows_cache, position_in[:batch].view(-1),
                           mask[:, None, None, :])

    use_graph = device.type == "cuda" if cuda_graph is None else cuda_graph  # on CUDA unless told otherwise
    graphs, pool = {}, torch.cuda.graph_pool_handle() if use_graph else None
    steps = computed = 0  # decode steps, and the rows they computed
    live = refill([], 0)
    while live:
        # 3) a decode step of the live slots (on CUDA, rounded up to a power of 2: one graph per size), attending
        # over the columns they have written (rounded up to a multiple of COLUMN_BUCKET), not the whole cache
        batch = min(slots, 1 << (live - 1).bit_length()) if use_graph else live
        width = min(capacity, -(-(int(position_in[:live].max()) + 1) // COLUMN_BUCKET) * COLUMN_BUCKET)
        if use_graph and (width, batch) not in graphs:
            graphs[width, batch] = captured_in_cuda_graph(lambda w=width, b=batch: decode_live_rows(w, b), pool)
        logits = graphs[width, batch]() if use_graph else decode_live_rows(width, batch)
        alive = (row_of[:live] >= 0).nonzero().view(-1)  # (all of them, but without COMPACT_TAIL)
        token, done = sample(logits[alive], row_of[alive])
        token_in[alive, 0] = token
        position_in[alive] += 1
        steps, computed = steps + 1, computed + batch
        stopped = alive[done].tolist()
        bar.update(len(stopped))
        live = refill(stopped, live)
    bar.close()
    if stats is not None:
        stats.update(decode_steps=steps, row_steps=rows + computed)
    model.train(was_training)
    lengths = count.tolist()
    tokens = [row[:n] for row, n in zip(out.tolist(), lengths)]
    return (tokens, [row[:n] for row, n in zip(out_logp.tolist(), lengths)]) if return_logprobs else tokens


def sample_groups(model, prompts, num_samples, max_new_tokens, prompts_at_once=None, seeds=None, desc=None,
                  return_logprobs=False, **sampling):
    """num_samples completions of every prompt, one list per prompt (a GRPO group, or a problem's avg@k samples), in
    one generate call whose slots hold prompts_at_once prompts' rows (default: all); prompt i draws from seeds[i]
    (None: the global generator). desc: a progress bar over the completions, under that name. return_logprobs:
    (groups, the sampled tokens' log-probabilities grouped alike)."""
    slots = (prompts_at_once or len(prompts)) * num_samples
    outputs = generate(model, prompts, max_new_tokens, num_samples=num_samples, max_rows=slots,
                       seed=None if seeds is None else list(seeds), progress=desc or False,
                       return_logprobs=return_logprobs, **sampling)
    grouped = lambda rows: [rows[k:k + num_samples] for k in range(0, len(rows), num_samples)]  # prompt-major
    return (grouped(outputs[0]), grouped(outputs[1])) if return_logprobs else grouped(outputs)


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
        logits = model.lm_head(h).float()
        logp_all = (logits if temperature == 1 else logits / temperature).log_softmax(-1)
        token_logp = logp_all.gather(-1, y[:, None]).squeeze(-1)
        # the entropy after the gather: the checkpoint's recomputation in backward stops once it has remade what
        # backward needs, so the entropy is computed once, not twice
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
        return token_logp, entropy

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
