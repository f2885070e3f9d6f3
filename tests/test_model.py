"""model.py and engine.py against transformers (the oracle): logits, cached decoding, generation, save/load."""
import sys
from pathlib import Path

import pytest
import torch
import transformers

import engine
import model as M

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import engine as E
from machinery.checks import smollm2_folder, smollm2_missing_reason  # noqa: E402

CONFIGS = {  # small random configurations covering GQA, tied/untied embeddings, bias on/off, both families
    "qwen2_gqa_tied": ("qwen2", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                     tie_word_embeddings=True)),
    "qwen2_mha_untied": ("qwen2", dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=3,
                                       tie_word_embeddings=False, rope_theta=1e6)),
    "llama_gqa_untied": ("llama", dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                                       tie_word_embeddings=False)),
    "llama_bias_tied": ("llama", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=1,
                                      attention_bias=True, tie_word_embeddings=True, head_dim=16)),
}


def hf_pair(name, vocab=97, layers=2, seed=0):
    """A random transformers model and our Decoder holding the same weights."""
    family, extra = CONFIGS[name]
    cls_config = transformers.Qwen2Config if family == "qwen2" else transformers.LlamaConfig
    cls_model = transformers.Qwen2ForCausalLM if family == "qwen2" else transformers.LlamaForCausalLM
    hf_config = cls_config(vocab_size=vocab, num_hidden_layers=layers, intermediate_size=80,
                           max_position_embeddings=256, **extra)
    torch.manual_seed(seed)
    hf = cls_model(hf_config).eval()
    with torch.no_grad():  # random biases too, so that a bias dropped by mistake shows up
        for n, p in hf.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    ours = M.Decoder(M.ModelConfig.from_hf(hf_config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=not hf_config.tie_word_embeddings)
    ours.stop_token_ids = []
    return hf, ours


def random_prompts(n, vocab, lo=1, hi=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_equal_transformers(name):
    hf, ours = hf_pair(name)
    ids = torch.randint(0, 97, (3, 17))
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("name", ["qwen2_gqa_tied", "llama_gqa_untied"])
def test_cached_decoding_equals_full_forward(name):
    _, ours = hf_pair(name)
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = ours(ids)
        cache = engine.KVCache(ours.config, 2, 20, "cpu", torch.float32)
        cache.k.fill_(7.0), cache.v.fill_(7.0)  # unwritten columns: the decode mask must hide them
        positions = torch.arange(20).expand(2, 20)
        step_logits = [ours.lm_head(ours.hidden_states(ids[:, :8], positions[:, :8], None, cache)[:, -1])]
        for t in range(8, 19):
            mask = (torch.arange(20) <= t).expand(2, 1, 1, 20)
            step_logits.append(engine.decode_step(ours, ids[:, t:t + 1], positions[:, t:t + 1], cache,
                                                  torch.tensor([t]), mask))
    assert torch.allclose(torch.stack(step_logits, 1), full[:, 7:19], atol=1e-4)


@pytest.mark.parametrize("name", CONFIGS)
def test_batched_greedy_equals_one_by_one_and_transformers(name):
    hf, ours = hf_pair(name)
    prompts = random_prompts(5, 97, seed=1)
    batched = E.generate(ours, prompts, max_new_tokens=12, temperature=0, stop_token_ids=[])
    for prompt, out in zip(prompts, batched):
        assert out == E.generate(ours, [prompt], max_new_tokens=12, temperature=0, stop_token_ids=[])[0]
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
        assert out == ref[0, len(prompt):].tolist()


def test_stop_token_is_kept_and_rows_stay_finished():
    _, ours = hf_pair("qwen2_gqa_tied")
    prompts = random_prompts(4, 97, seed=2)
    free = E.generate(ours, prompts, max_new_tokens=15, temperature=0, stop_token_ids=[])
    stop = free[0][4]  # a token greedy decoding of prompt 0 emits at step 5: make it a stop token
    stopped = E.generate(ours, prompts, max_new_tokens=15, temperature=0, stop_token_ids=[stop])
    for f, s in zip(free, stopped):
        cut = f.index(stop) + 1 if stop in f else len(f)
        assert s == f[:cut]
    assert stopped[0][-1] == stop and len(stopped[0]) <= 5


def test_num_samples_are_prompt_major_and_seeded():
    _, ours = hf_pair("llama_gqa_untied")
    prompts = random_prompts(3, 97, seed=3)
    a = E.generate(ours, prompts, 10, temperature=1.0, num_samples=4, seed=7)
    b = E.generate(ours, prompts, 10, temperature=1.0, num_samples=4, seed=7)
    c = E.generate(ours, prompts, 10, temperature=1.0, num_samples=4, seed=8)
    assert a == b and a != c and len(a) == 12
    # prompt-major: rows 0..3 continue prompt 0. Greedy samples of one prompt are identical, and equal its
    # greedy continuation alone.
    greedy = E.generate(ours, prompts, 6, temperature=0, num_samples=2)
    for i, p in enumerate(prompts):
        alone = E.generate(ours, [p], 6, temperature=0)[0]
        assert greedy[2 * i] == greedy[2 * i + 1] == alone


def test_a_prompts_samples_do_not_depend_on_the_rest_of_the_batch():
    """Each row draws from its own generator, seeded by (its prompt's seed, its sample index): a prompt sampled
    alone, or in another batch with other prompts around it (other padding), gives the same tokens. This is what
    lets several processes share the prompts of one batch and sample what one process would."""
    _, ours = hf_pair("qwen2_gqa_tied")
    prompts = random_prompts(4, 97, lo=2, hi=14, seed=13)
    seeds = [101, 202, 303, 404]
    together = E.generate(ours, prompts, 10, temperature=1.0, num_samples=3, seed=seeds)
    for i in range(4):
        alone = E.generate(ours, [prompts[i]], 10, temperature=1.0, num_samples=3, seed=[seeds[i]])
        assert alone == together[3 * i:3 * i + 3]
    halves = E.generate(ours, prompts[1::2], 10, temperature=1.0, num_samples=3, seed=seeds[1::2])
    assert halves == together[3:6] + together[9:12]
    assert together[0] != together[1]  # the samples of one prompt differ
    assert E.generate(ours, prompts, 10, num_samples=3, seed=[1, 2, 3, 4]) != together


def test_first_token_frequencies_match_softmax():
    """Chi-square test of many independent first tokens (one prompt, many samples) against the model's softmax."""
    hf, ours = hf_pair("qwen2_gqa_tied", vocab=12)
    prompt = [3, 1, 4, 1, 5]
    temperature, n = 1.7, 30000
    with torch.no_grad():
        probs = torch.softmax(ours(torch.tensor([prompt]))[0, -1] / temperature, -1).double()
    draws = E.generate(ours, [prompt], 1, temperature=temperature, num_samples=n, seed=0)
    counts = torch.bincount(torch.tensor([d[0] for d in draws]), minlength=12).double()
    chi2 = (((counts - n * probs) ** 2) / (n * probs)).sum().item()
    assert chi2 < 31.26, chi2  # the 0.999 quantile of chi-square with 11 degrees of freedom


def test_top_k_and_top_p_stay_in_the_allowed_set():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    for _ in range(200):
        tokens = engine.sample_next_token(logits, 1.0, 5, 1.0, torch.rand(4, 1, generator=g, dtype=torch.float64))
        allowed = torch.topk(logits, 5, -1).indices
        assert all(t in allowed[i] for i, t in enumerate(tokens.tolist()))
    sampled_several = False
    for top_p in (0.3, 0.8, 0.95):
        nucleus = []  # brute force: most likely tokens in order until their mass reaches top_p
        for row in torch.softmax(logits, -1):
            order, mass, keep = row.argsort(descending=True).tolist(), 0.0, set()
            for t in order:
                keep.add(t)
                mass += row[t].item()
                if mass >= top_p:
                    break
            nucleus.append(keep)
        seen = [set() for _ in range(4)]
        for _ in range(300):
            uniform = torch.rand(4, 1, generator=g, dtype=torch.float64)
            for i, t in enumerate(engine.sample_next_token(logits, 1.0, 0, top_p, uniform).tolist()):
                assert t in nucleus[i]
                seen[i].add(t)
        sampled_several |= any(len(s) > 1 for s in seen)
    assert sampled_several  # sampling, not greedy


def test_completion_logprobs_match_full_forward():
    _, ours = hf_pair("llama_gqa_untied")
    prompts, completions = random_prompts(3, 97, seed=4), random_prompts(3, 97, lo=1, hi=9, seed=5)
    temperature = 0.7
    logp, mask, entropy = E.completion_logprobs(ours, prompts, completions, temperature, with_entropy=True,
                                                chunk_size=3)
    assert mask.sum(1).tolist() == [len(c) for c in completions]
    for b, (p, c) in enumerate(zip(prompts, completions)):
        with torch.no_grad():
            full = torch.log_softmax(ours(torch.tensor([p + c]))[0] / temperature, -1)
        for j, token in enumerate(c):
            assert abs(logp[b, j].item() - full[len(p) + j - 1, token].item()) < 1e-5
            ent = -(full[len(p) + j - 1].exp() * full[len(p) + j - 1]).sum().item()
            assert abs(entropy[b, j].item() - ent) < 1e-4
        assert (logp[b, len(c):] == 0).all()
    logp.sum().backward()  # gradients flow through the chunked, recomputed output layer
    assert ours.lm_head.weight.grad is not None and ours.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["qwen2_gqa_tied", "llama_bias_tied"])
def test_completion_logprobs_of_shared_prompts_match_transformers_and_unshared_gradients(name):
    """Rows that share a prompt are packed into one sequence; their log-probs must be transformers' for each row
    on its own, and the gradient that of one row at a time."""
    hf, ours = hf_pair(name)
    p1, p2, p3 = random_prompts(3, 97, lo=5, hi=12, seed=6)
    samples = random_prompts(8, 97, lo=1, hi=10, seed=7)
    prompts = [p1, p1, p1, p2, p3, p3, p3, p1]  # groups of 3, 1 and 3, then p1 again (not next to its group)
    completions = samples[:5] + [[]] + samples[5:7]  # an empty completion inside a group
    weights = torch.randn(len(prompts), 10, generator=torch.Generator().manual_seed(8))
    logp, mask = E.completion_logprobs(ours, prompts, completions, temperature=0.8, chunk_size=4)
    assert mask.sum(1).tolist() == [len(c) for c in completions]
    for b, (p, c) in enumerate(zip(prompts, completions)):
        with torch.no_grad():
            full = torch.log_softmax(hf(torch.tensor([p + c])).logits[0] / 0.8, -1)
        for j, token in enumerate(c):
            assert abs(logp[b, j].item() - full[len(p) + j - 1, token].item()) < 1e-5
        assert (logp[b, len(c):] == 0).all()
    (logp * weights[:, :logp.shape[1]]).sum().backward()
    packed = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    for b in range(len(prompts)):
        if completions[b]:
            one, _ = E.completion_logprobs(ours, [prompts[b]], [completions[b]], temperature=0.8)
            (one * weights[b:b + 1, :one.shape[1]]).sum().backward()
    for n, p in ours.named_parameters():
        assert torch.allclose(packed[n], p.grad, atol=1e-5, rtol=1e-4), n


def test_packed_logprobs_equal_the_unpacked_reference_with_gradients():
    """completion_logprobs (groups packed, output layer chunked) against completion_logprobs_reference (one row
    per sample, a plain full forward): the same log-probs, mask and parameter gradients."""
    _, ours = hf_pair("llama_gqa_untied")
    p1, p2 = random_prompts(2, 97, lo=3, hi=10, seed=9)
    completions = random_prompts(6, 97, lo=1, hi=8, seed=10)
    prompts = [p1, p1, p1, p2, p2, p1]
    completions[4] = []
    weights = torch.randn(6, 8, generator=torch.Generator().manual_seed(11))
    grads = []
    for fn in (E.completion_logprobs, engine.completion_logprobs_reference):
        ours.zero_grad()
        logp, mask = fn(ours, prompts, completions, 0.9)
        (logp * weights[:, :logp.shape[1]]).sum().backward()
        grads.append((logp.detach(), mask, [p.grad.clone() for p in ours.parameters()]))
    (packed, packed_mask, packed_grads), (ref, ref_mask, ref_grads) = grads
    assert torch.equal(packed_mask, ref_mask) and ref_mask.sum(1).tolist() == [len(c) for c in completions]
    torch.testing.assert_close(packed, ref, atol=1e-5, rtol=0)
    for a, b in zip(packed_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_tiny_save_then_transformers_loads_same_logits(tmp_path):
    ours, tokenizer = M.load_model("tiny")
    M.save_model(ours, tokenizer, tmp_path / "ckpt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    messages = [{"role": "user", "content": "Solve 2 + 3 * 4 step by step."}]
    ids = E.encode_chat(tokenizer, messages)
    assert ids == E.encode_chat(hf_tok, messages)
    assert tokenizer.decode(ids) == hf_tok.decode(ids)
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-4
    reloaded, tok2 = M.load_model(tmp_path / "ckpt")
    assert reloaded.stop_token_ids == ours.stop_token_ids
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), reloaded.state_dict().values()))
    M.save_model(reloaded, tok2, tmp_path / "ckpt")  # overwriting an existing checkpoint works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_tiny_tokenizer_round_trips_bytes():
    _, tokenizer = M.load_model("tiny")
    text = "Étape 3: x² = 9 → x = ±3 \n\t<think>ok</think>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert len(E.encode_chat(tokenizer, [{"role": "user", "content": "hi"}])) > 2


def test_bad_input():
    ours, _ = M.load_model("tiny")
    with pytest.raises(ValueError, match="aliases: .*qwen-1.5b"):
        M.load_model("qwen-15b")
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        M.ModelConfig.from_hf({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="rope scaling 'llama3'"):
        M.ModelConfig.from_hf(dict(model_type="llama", vocab_size=10, hidden_size=8, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=8,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0}))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        E.generate(ours, [[1] * 4000], max_new_tokens=200)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        E.generate(ours, [[1, 2], []], max_new_tokens=2)
    assert E.generate(ours, [], max_new_tokens=5) == []
    assert E.generate(ours, [[1, 2], [3]], max_new_tokens=0, num_samples=2) == [[], [], [], []]


@pytest.fixture(scope="module")
def smollm2():
    reason = smollm2_missing_reason()
    if reason:
        pytest.skip(f"real-weights test skipped: {reason}")
    folder = smollm2_folder()
    ours, tokenizer = M.load_model(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return ours, hf, tokenizer


def test_smollm2_real_weights_logits_and_greedy_text(smollm2):
    ours, hf, tokenizer = smollm2
    questions = ["What is the capital of France?", "Compute 12 * 7 and explain briefly."]
    prompts = [E.encode_chat(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    with torch.no_grad():
        for p in prompts:
            x = torch.tensor([p])
            assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-4
    outs = E.generate(ours, prompts, max_new_tokens=24, temperature=0)
    for p, out in zip(prompts, outs):
        ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          max_new_tokens=24, do_sample=False, eos_token_id=ours.stop_token_ids,
                          pad_token_id=tokenizer.pad_token_id)[0, len(p):].tolist()
        assert tokenizer.decode(out) == tokenizer.decode(ref)
        assert len(tokenizer.decode(out, skip_special_tokens=True).strip()) > 0


def test_token_budget_batches_bound_the_packed_positions():
    """Every micro-batch holds at most the budget of packed positions (sequences x the longest, as
    completion_logprobs builds them), unless a single row exceeds it; the slices cover the rows in order, and
    each is as long as the budget allows (brute force: one more row would exceed it)."""
    g = torch.Generator().manual_seed(12)
    prompts, completions = [], []
    for group in range(12):
        prompt = list(range(int(torch.randint(1, 40, (1,), generator=g))))
        for _ in range(int(torch.randint(1, 6, (1,), generator=g))):
            prompts.append(prompt)
            completions.append([1] * int(torch.randint(0, 30, (1,), generator=g)))

    def positions(rows):
        packs = engine.pack_rows([prompts[i] for i in rows], [completions[i] for i in rows])
        return len(packs) * max(n for _, _, n in packs)

    for budget in (20, 64, 150, 10_000):
        batches = engine.token_budget_batches(prompts, completions, budget)
        assert [i for b in batches for i in range(len(prompts))[b]] == list(range(len(prompts)))
        for b in batches:
            rows = range(len(prompts))[b]
            assert positions(rows) <= budget or len(rows) == 1
            if b.stop < len(prompts):
                assert positions(range(b.start, b.stop + 1)) > budget
    assert len(engine.token_budget_batches(prompts, completions, 10_000)) == 1
    assert engine.token_budget_batches([], [], 100) == []


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_continuous_batching_gives_every_row_the_tokens_it_gets_alone(temperature, monkeypatch):
    """Prompts of mixed lengths, 3 samples each, stop tokens that end rows at different steps: with 1, 2 or 5
    slots (rows waiting for a free one), attending over a few columns or all of them, every row gets the tokens it
    gets with every row at once and when its prompt is sampled alone; and fewer rows are computed than in static
    batches of as many rows as slots."""
    _, ours = hf_pair("qwen2_gqa_tied")
    with torch.no_grad():  # sharper logits than a fresh model's: greedy rows that do not repeat one token
        for p in ours.parameters():
            if p.dim() == 2:
                p.mul_(6)
    prompts = random_prompts(7, 97, lo=1, hi=30, seed=4)
    seeds = [3 * i + 1 for i in range(7)]
    free_running = E.generate(ours, prompts, 40, temperature=temperature, num_samples=3, seed=seeds,
                              stop_token_ids=[])
    first = {}  # token -> the step where it first appears, in each row that writes it
    for row in free_running:
        for step, token in enumerate(row):
            first.setdefault(token, {}).setdefault(id(row), step)
    # stop tokens the rows do write, but never at their first steps: they end rows at different steps
    stops = sorted((t for t, steps in first.items() if min(steps.values()) >= 3), key=lambda t: -len(first[t]))[:3]
    kw = dict(temperature=temperature, num_samples=3, stop_token_ids=stops)
    at_once = E.generate(ours, prompts, 40, seed=seeds, **kw)
    lengths = [len(row) for row in at_once]
    assert min(lengths) < 20 and len(set(lengths)) > 3, lengths  # rows stop at different steps
    alone = [row for prompt, seed in zip(prompts, seeds) for row in E.generate(ours, [prompt], 40, seed=[seed], **kw)]
    assert alone == at_once
    assert E.generate_static(ours, prompts, 40, seed=seeds, **kw) == at_once  # the plain sampler a student reads
    for bucket, compact in ((16, True), (10 ** 6, True), (16, False)):  # widths of 16 columns, or the whole cache;
        monkeypatch.setattr(engine, "COLUMN_BUCKET", bucket)  # live rows moved to the front once none wait, or not
        monkeypatch.setattr(engine, "COMPACT_TAIL", compact)
        for slots in (1, 2, 5):
            stats = {}
            assert E.generate(ours, prompts, 40, seed=seeds, max_rows=slots, stats=stats, **kw) == at_once
            static = sum(slots * max(lengths[r:r + slots]) for r in range(0, len(lengths), slots))
            assert stats["row_steps"] < static or slots == 1, (slots, stats, static)


def test_the_static_sampler_gives_generates_tokens_and_transformers_greedy():
    """engine.generate_static, the sampler a student reads first, against generate (continuous batching, a few
    slots) on mixed prompt lengths, greedy and sampled, with and without stop tokens; and greedy against
    transformers' generate."""
    hf, ours = hf_pair("llama_gqa_untied")
    prompts = random_prompts(6, 97, lo=1, hi=25, seed=9)
    for temperature, stops in ((0.0, []), (1.0, []), (1.0, [5, 17, 40]), (0.7, [3])):
        kw = dict(temperature=temperature, num_samples=2, stop_token_ids=stops, seed=11)
        assert E.generate_static(ours, prompts, 24, **kw) == E.generate(ours, prompts, 24, max_rows=3, **kw)
    for prompt, out in zip(prompts, E.generate_static(ours, prompts, 10, temperature=0, stop_token_ids=[])):
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=10, min_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out == ref[0, len(prompt):].tolist()
