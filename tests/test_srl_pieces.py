"""Tests of srl.py's reward and GRPO pieces against independent oracles: difflib for the similarity, plain Python
formulas (math, statistics) for advantages and loss values, torch.autograd of a differently written formula for
the gradients."""
import collections
import difflib
import json
import math
import random
import re
import statistics

import pytest
import torch

import grpo
import srl


def difflib_ratio(a, b):
    return difflib.SequenceMatcher(None, a, b).ratio()


# ---------------------------------------------------------------------------------------------------------------
# step_similarity == difflib's ratio, bit for bit

def random_text(rng, length, alphabet, weights=None):
    return "".join(rng.choices(alphabet, weights=weights, k=length))


def random_pairs(seed, count):
    """Pairs from small, skewed and unicode alphabets, lengths 0..400 (difflib's autojunk starts at len(b) = 200)."""
    rng = random.Random(seed)
    alphabets = [
        ("ab", None),                                    # tiny alphabet: many equal-length ties
        ("abcd", None),
        ("ab" + "cdefghijklmnopqrstuvwxyz", [30, 30] + [1] * 24),  # two popular letters, many rare ones
        ("xy é∑😀\u0301", None),                           # unicode, including a combining accent
        ("0123456789 +-=()xn", None),
    ]
    pairs = []
    for _ in range(count):
        alphabet, weights = rng.choice(alphabets)
        a = random_text(rng, rng.choice([0, 1, 2, rng.randint(0, 60), rng.randint(150, 400)]), alphabet, weights)
        shape = rng.random()
        if shape < 0.3:  # an edited copy of a: long shared blocks
            b = list(a)
            for _ in range(rng.randint(0, 10)):
                if b and rng.random() < 0.5:
                    del b[rng.randrange(len(b))]
                else:
                    b.insert(rng.randint(0, len(b)), rng.choice(alphabet))
            b = "".join(b)
        elif shape < 0.4:  # lengths straddling the autojunk boundary exactly
            b = random_text(rng, rng.choice([199, 200, 201]), alphabet, weights)
        else:
            b = random_text(rng, rng.randint(0, 400), alphabet, weights)
        pairs.append((a, b))
    return pairs


def test_step_similarity_equals_difflib_on_random_pairs():
    pairs = random_pairs(seed=0, count=3000)
    assert sum(len(b) >= 200 for _, b in pairs) > 500 and sum(len(b) < 200 for _, b in pairs) > 500
    for a, b in pairs:
        assert srl.step_similarity(a, b) == difflib_ratio(a, b), (a, b)


def test_step_similarity_edge_cases():
    cases = [("", ""), ("", "a"), ("a", ""), ("a", "a"), ("a", "b"), ("ab", "ba"), ("abcd", " abcd abcd"),
             ("ab", "acab"), ("x" * 300, "x" * 300), ("x" * 300, "x" * 299), ("xy" * 150, "yx" * 150)]
    for a, b in cases:
        assert srl.step_similarity(a, b) == difflib_ratio(a, b), (a, b)
    assert srl.step_similarity("", "") == 1.0


def test_longest_match_equals_difflib_on_random_windows():
    rng = random.Random(1)
    for a, b in random_pairs(seed=2, count=300):
        matcher = difflib.SequenceMatcher(None, a, b)
        for _ in range(5):
            alo = rng.randint(0, len(a)); ahi = rng.randint(alo, len(a))
            blo = rng.randint(0, len(b)); bhi = rng.randint(blo, len(b))
            expected = tuple(matcher.find_longest_match(alo, ahi, blo, bhi))
            assert srl._longest_match(a, b, matcher.b2j, alo, ahi, blo, bhi) == expected


def solution_pieces(shared_data):
    """Sentences and lines of MATH-500 solutions, numbered steps of s1K solutions: one list per solution."""
    groups = []
    with open(shared_data / "benchmarks" / "math500.jsonl") as f:
        for line in f:
            solution = json.loads(line)["solution"]
            groups.append([s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", solution) if s.strip()])
    with open(shared_data / "trajectories" / "s1k_problems_solutions.json") as f:
        for record in json.load(f)[:300]:
            groups.append([s.strip() for s in re.split(r"\n(?=\d+\.\s)", record["solution"]) if s.strip()])
    return groups


def test_step_similarity_equals_difflib_on_real_steps(shared_data):
    rng = random.Random(3)
    groups = solution_pieces(shared_data)
    pieces = [p for g in groups for p in g]
    long_pieces = [p for p in pieces if len(p) > 200]
    pairs = [(x, y) for g in groups[:400] for x, y in zip(g, g[1:])]  # neighbouring steps of one solution
    pairs += [(rng.choice(pieces), rng.choice(pieces)) for _ in range(800)]
    pairs += [(rng.choice(long_pieces), rng.choice(long_pieces)) for _ in range(300)]
    pairs += [(p, p[: len(p) // 2] + p[len(p) // 2 + 5:]) for p in long_pieces[:100]]  # near copies
    assert len(pairs) > 2000 and len(long_pieces) > 100
    for a, b in pairs:
        assert srl.step_similarity(a, b) == difflib_ratio(a, b)


# ---------------------------------------------------------------------------------------------------------------
# srl_reward

EXPERT = "2. **Substitute:** Put $x = 3$ into $f(x) = x^2 + 1$, so $f(3) = 10$."


@pytest.mark.parametrize("completion", [
    "",
    "The next step is x = 3.",                                # no monologue at all
    "</think> x = 3",                                         # close without open
    "<think> I think x = 3",                                  # never closed
    "<think> a </think> <think> b </think> x = 3",            # two monologues
    "<think> a </think> x = 3 </think>",                      # two closes
    "</think> a <think> x = 3",                               # in the wrong order
    "<think> a </think>",                                     # empty action
    "<think> a </think>   \n\t ",                             # whitespace-only action
    "Sure! <think> a </think> x = 3",                         # text before <think>
])
def test_srl_reward_format_failures(completion):
    assert srl.srl_reward(completion, EXPERT) == grpo.FORMAT_FAILURE == -1.0
    assert srl.parse_action(completion) is None


def test_srl_reward_scores_only_the_action():
    action = "2. **Substitute:** Put $x = 3$, giving $f(3) = 9 + 1 = 10$."
    for completion in [f"<think>\nLet me substitute.\n</think>\n{action}",
                       f"  \n<think>{EXPERT}</think>{action}\n",  # the monologue may copy the expert: not scored
                       f"<think></think> {action}"]:
        reward = srl.srl_reward(completion, "\n " + EXPERT + "\n")
        assert reward == difflib_ratio(action, EXPERT)
        assert 0.0 < reward < 1.0
    assert srl.srl_reward(f"<think>ok</think>\n{EXPERT}\n", EXPERT) == 1.0
    assert srl.srl_reward("<think>ok</think>zzzz", "qqqq") == 0.0


# ---------------------------------------------------------------------------------------------------------------
# Advantages and dynamic sampling

def test_group_advantages_matches_hand_formula():
    rng = random.Random(4)
    rows = [[rng.choice([-1.0, 0.0, rng.random()]) for _ in range(8)] for _ in range(6)] + [[0.5] * 8]
    rewards = torch.tensor(rows, dtype=torch.float64)
    scaled = grpo.group_advantages(rewards)
    centred = grpo.group_advantages(rewards, scale_by_std=False)
    for g, row in enumerate(rows):
        mean, std = statistics.mean(row), statistics.pstdev(row)
        for i, r in enumerate(row):
            assert scaled[g, i].item() == pytest.approx((r - mean) / (std + 1e-6), rel=1e-9, abs=1e-12)
            assert centred[g, i].item() == pytest.approx(r - mean, rel=1e-9, abs=1e-12)
    assert torch.all(scaled[-1] == 0)  # a group of equal rewards has no advantage


def test_keep_group():
    rewards = torch.tensor([[0.3] * 8, [0.3] * 7 + [0.31], [-1.0] * 4 + [1.0] * 4, [0.2, 0.2, 0.2, 0.2001] + [0.2] * 4])
    threshold = 0.001
    expected = [statistics.pstdev(row) > threshold for row in rewards.tolist()]
    assert expected == [False, True, True, False]
    assert grpo.keep_group(rewards, threshold).tolist() == expected
    assert bool(grpo.keep_group(rewards[2], threshold)) and not bool(grpo.keep_group(rewards[0], threshold))


# ---------------------------------------------------------------------------------------------------------------
# grpo_loss against a per-token Python loop (values) and autograd of a differently written formula (gradients)

CLIP_LOW, CLIP_HIGH = 0.2, 0.28


def python_loss(logp, old_logp, adv, mask, ref_logp=None, beta=0.0, num_tokens=None):
    """Per-token loop with math.exp: loss value, clip fraction, mean ratio, mean kl."""
    total, count, clipped, ratios, kls = 0.0, 0, 0, 0.0, 0.0
    for b in range(len(logp)):
        for t in range(len(logp[b])):
            if not mask[b][t]:
                continue
            r = math.exp(logp[b][t] - old_logp[b][t])
            a = adv[b]
            unclipped, clipped_term = r * a, min(max(r, 1 - CLIP_LOW), 1 + CLIP_HIGH) * a
            term = min(unclipped, clipped_term)
            clipped += clipped_term < unclipped
            if beta > 0:
                d = ref_logp[b][t] - logp[b][t]
                kl = math.exp(d) - d - 1
                term -= beta * kl
                kls += kl
            total += term
            count += 1
            ratios += r
    return -total / (num_tokens or count), clipped / count, ratios / count, kls / count


def autograd_loss(logp, old_logp, adv, mask, ref_logp=None, beta=0.0):
    """The same objective written by cases: A >= 0 caps the ratio at 1 + clip_high, A < 0 floors it at 1 - clip_low."""
    ratio = (logp - old_logp).exp()
    a = adv[:, None]
    objective = torch.where(a >= 0, a * torch.clamp(ratio, max=1 + CLIP_HIGH), a * torch.clamp(ratio, min=1 - CLIP_LOW))
    if beta > 0:
        objective = objective - beta * ((ref_logp - logp).exp() - (ref_logp - logp) - 1)
    return -(objective * mask).sum() / mask.sum()


def make_batch(seed, ratios=None):
    """logp [4, 6] with rollout log-probs set so that exp(logp - old_logp) takes the given ratios."""
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(4, 6, generator=gen, dtype=torch.float64) * 3
    if ratios is None:
        ratios = torch.exp(torch.randn(4, 6, generator=gen, dtype=torch.float64) * 0.3)
    old_logp = logp - torch.log(ratios)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]],
                        dtype=torch.float64)
    ref_logp = logp + torch.randn(4, 6, generator=gen, dtype=torch.float64) * 0.2
    return logp.requires_grad_(), old_logp, mask, ref_logp


def check_against_oracles(logp, old_logp, adv, mask, ref_logp=None, beta=0.0):
    loss, stats = grpo.grpo_loss(logp, old_logp, adv, mask, CLIP_LOW, CLIP_HIGH, ref_logp=ref_logp, beta=beta)
    value, clip_fraction, ratio_mean, kl_mean = python_loss(
        logp.tolist(), old_logp.tolist(), adv.tolist(), mask.tolist(),
        ref_logp.tolist() if ref_logp is not None else None, beta)
    assert loss.item() == pytest.approx(value, rel=1e-5, abs=1e-6)
    assert stats["clip_fraction"] == pytest.approx(clip_fraction)
    assert stats["ratio_mean"] == pytest.approx(ratio_mean, rel=1e-5)
    if beta > 0:
        assert stats["kl_mean"] == pytest.approx(kl_mean, rel=1e-4, abs=1e-7)
    grad, = torch.autograd.grad(loss, logp)
    expected_grad, = torch.autograd.grad(autograd_loss(logp, old_logp, adv, mask, ref_logp, beta), logp)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
    return grad, stats


def test_grpo_loss_clip_edges():
    # Every row has a ratio below 1 - clip_low, inside, and above 1 + clip_high; rows have A > 0 or A < 0.
    row = [0.5, 0.79, 0.95, 1.05, 1.27, 1.6]
    ratios = torch.tensor([row, row, row[::-1], row[::-1]], dtype=torch.float64)
    mask = torch.ones(4, 6, dtype=torch.float64)
    logp, old_logp, _, _ = make_batch(5, ratios)
    adv = torch.tensor([1.5, -0.7, -2.0, 0.4], dtype=torch.float64)
    grad, stats = check_against_oracles(logp, old_logp, adv, mask)
    active = ((adv[:, None] > 0) & (ratios > 1 + CLIP_HIGH)) | ((adv[:, None] < 0) & (ratios < 1 - CLIP_LOW))
    assert active.sum() == 6 and stats["clip_fraction"] == pytest.approx(6 / 24)
    assert torch.all(grad[active] == 0)  # the clip stops the gradient where it binds ...
    expected = -adv[:, None] * ratios / 24  # ... and elsewhere d(-r A / N)/d logp = -r A / N
    torch.testing.assert_close(grad[~active], expected[~active], rtol=1e-5, atol=1e-7)


def test_grpo_loss_random_batches_and_kl():
    for seed in range(5):
        logp, old_logp, mask, ref_logp = make_batch(seed)
        adv = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + seed))
        check_against_oracles(logp, old_logp, adv, mask)
        check_against_oracles(logp, old_logp, adv, mask, ref_logp=ref_logp, beta=0.05)


def test_grpo_loss_ratio_one_is_plain_policy_gradient():
    logp, _, mask, _ = make_batch(6)
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    loss, stats = grpo.grpo_loss(logp, logp.detach(), adv, mask)
    n = mask.sum()
    assert loss.item() == pytest.approx(-(adv[:, None] * mask).sum().item() / n.item())
    assert stats["clip_fraction"] == 0 and stats["ratio_mean"] == 1.0 and "kl_mean" not in stats
    grad, = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, -adv[:, None].expand_as(mask) * mask / n)


def test_grpo_loss_ignores_masked_tokens():
    logp, old_logp, mask, ref_logp = make_batch(7)
    adv = torch.tensor([0.3, -1.2, 0.9, -0.1], dtype=torch.float64)
    loss, _ = grpo.grpo_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, beta=0.1)
    grad, = torch.autograd.grad(loss, logp)
    changed = (logp.detach() + (1 - mask) * 5.0).requires_grad_()  # move only the masked-out positions
    loss2, _ = grpo.grpo_loss(changed, old_logp + (1 - mask) * 2.0, adv, mask, ref_logp=ref_logp, beta=0.1)
    grad2, = torch.autograd.grad(loss2, changed)
    assert loss2.item() == loss.item()
    assert torch.equal(grad, grad2) and torch.all(grad[mask == 0] == 0)


def test_grpo_loss_micro_batches_add_up():
    logp, old_logp, mask, ref_logp = make_batch(8)
    adv = torch.tensor([0.3, -1.2, 0.9, -0.1], dtype=torch.float64)
    full, _ = grpo.grpo_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, beta=0.02)
    full_grad, = torch.autograd.grad(full, logp)
    total_tokens = int(mask.sum())
    halves = [grpo.grpo_loss(logp[s], old_logp[s], adv[s], mask[s], ref_logp=ref_logp[s], beta=0.02,
                            num_tokens=total_tokens)[0] for s in (slice(0, 2), slice(2, 4))]
    assert (halves[0] + halves[1]).item() == pytest.approx(full.item(), rel=1e-6)
    half_grad, = torch.autograd.grad(halves[0] + halves[1], logp)
    torch.testing.assert_close(half_grad, full_grad)
    # Without the global count each half would be its own token mean, and they would not add up.
    own = [grpo.grpo_loss(logp[s], old_logp[s], adv[s], mask[s])[0].item() for s in (slice(0, 2), slice(2, 4))]
    nokl, _ = grpo.grpo_loss(logp, old_logp, adv, mask)
    assert sum(own) != pytest.approx(nokl.item(), rel=1e-3)


# -----------------------------------------------------------------------------------------------------------------
# The validation sample: spread over problems


def check_spread(picked, examples):
    """Every problem gives one example before any gives a second: two problems' counts differ by at most one,
    unless the smaller one has no example left."""
    total = collections.Counter(e["id"] for e in examples)
    count = collections.Counter(e["id"] for e in picked)
    for a in total:
        for b in total:
            assert count[a] - count[b] <= 1 or count[b] == total[b], (a, b, count[a], count[b])


def test_validation_sample_rounds_robin_over_problems():
    sizes = {"a": 5, "b": 1, "c": 3, "d": 2, "e": 4}
    examples = [{"id": pid, "step_index": k} for pid, n in sizes.items() for k in range(2, n + 2)]
    for limit in range(1, 17):
        picked = srl.validation_sample(examples, limit, seed=3)
        assert len(picked) == min(limit, 15)
        assert len({(e["id"], e["step_index"]) for e in picked}) == len(picked)  # no example twice
        assert len({e["id"] for e in picked}) == min(limit, 5)
        check_spread(picked, examples)
    assert srl.validation_sample(examples, 4, seed=3) == srl.validation_sample(examples, 4, seed=3)
    assert srl.validation_sample(examples, None, seed=0) != examples  # the whole set, in a seeded order
    assert sorted(map(str, srl.validation_sample(examples, None, seed=0))) == sorted(map(str, examples))
    assert len({str(srl.validation_sample(examples, 4, seed=s)) for s in range(6)}) > 1


def test_validation_sample_covers_the_held_out_s1k_problems(shared_data):
    import data_prep
    from tasks.sources import normalize, read_records
    path = shared_data / "trajectories" / "s1k_problems_solutions.json"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    fields = dict(question="problem", solution="solution", answer=None, reasoning=None, grade=None)
    outputs, stats = data_prep.prepare(normalize(read_records(path), fields))
    val = outputs["srl_val.jsonl"]
    problems = {e["id"] for e in val}
    assert stats["val_problems"] == len(problems) == 27
    picked = srl.validation_sample(val, 64, seed=0)
    assert len(picked) == 64 and {e["id"] for e in picked} == problems  # all 27 (the file's first 64: fewer)
    assert len({e["id"] for e in val[:64]}) < len(problems)
    check_spread(picked, val)
    assert picked == srl.validation_sample(val, 64, seed=0)  # the same at every evaluation and on resume


def test_validate_scores_the_validation_sample(monkeypatch):
    examples = [{"id": pid, "target_step": f"{pid}{k}"} for pid in "abcdef" for k in range(3)]
    monkeypatch.setattr(srl, "encode_chat", lambda tokenizer, messages: [1])
    monkeypatch.setattr(srl, "sample_groups", lambda policy, prompts, n, *a, **kw: [[[]] for _ in prompts])
    monkeypatch.setattr(srl, "decode_text", lambda tokenizer, ids: "")
    scored = []
    srl.validate(None, None, examples, lambda ex: [], lambda text, ex: scored.append(ex) or 0.5, max_new_tokens=4,
                 limit=8, seed=5)
    assert scored == srl.validation_sample(examples, 8, seed=5) and len({e["id"] for e in scored}) == 6
