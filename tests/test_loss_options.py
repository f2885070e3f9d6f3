"""The loss options of TRL's and verl's users against formulas written here on their own: verl's three loss
aggregations, truncated importance sampling, DAPO's overlong filtering; micro-batches (and, in test_distributed,
processes) still add up to the whole step's loss; and what a run writes for a person to read: samples.jsonl,
TensorBoard's files."""
import json
import math

import pytest
import torch
from test_srl_loop import EXAMPLE, loop_args, short_prompt

import engine as E
import grpo
import srl


def batch(seed=0, B=5, T=7):
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 3, 5, 1, 6][:B]
    mask = (torch.arange(T) < torch.tensor(lengths)[:, None]).float()
    logp = (-torch.rand(B, T, generator=g) * 3).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    weight = torch.rand(B, T, generator=g) * 2
    return logp, old, adv, mask, weight, lengths


def surrogate(lp, old, a, eps_low=0.2, eps_high=0.28):
    ratio = math.exp(lp - old)
    return min(ratio * a, min(max(ratio, 1 - eps_low), 1 + eps_high) * a)


def by_hand(logp, old, adv, mask, lengths, agg, weight=None, max_length=None):
    """Each mode written out as verl's agg_loss defines it, over Python floats."""
    token = [[-surrogate(logp[b, t].item(), old[b, t].item(), adv[b].item()) *
              (1.0 if weight is None else weight[b, t].item()) for t in range(lengths[b])] for b in range(len(lengths))]
    if agg == "token-mean":
        return sum(map(sum, token)) / sum(lengths)
    if agg == "seq-mean-token-mean":
        return sum(sum(row) / len(row) for row in token) / len(token)
    return sum(sum(row) / max_length for row in token) / len(token)  # seq-mean-token-sum-norm (Dr. GRPO)


@pytest.mark.parametrize("agg", grpo.LOSS_AGGREGATIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_each_aggregation_equals_its_formula_and_micro_batches_add_up(agg, weighted):
    logp, old, adv, mask, weight, lengths = batch()
    w = weight if weighted else None
    loss, _ = grpo.grpo_loss(logp, old, adv, mask, loss_agg=agg, max_length=7, is_weight=w)
    assert loss.item() == pytest.approx(by_hand(logp, old, adv, mask, lengths, agg, w, 7), rel=1e-5)
    loss.backward()
    whole = logp.grad.clone()
    logp.grad = None
    parts = 0.0
    for rows in (slice(0, 2), slice(2, 5)):  # two micro-batches, divided by the whole step's counts
        part, _ = grpo.grpo_loss(logp[rows], old[rows], adv[rows], mask[rows], num_tokens=sum(lengths), loss_agg=agg,
                                 num_sequences=5, max_length=7, is_weight=None if w is None else w[rows])
        part.backward()
        parts += part.item()
    assert parts == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(logp.grad, whole, rtol=1e-5, atol=1e-7)


def test_a_weight_of_one_is_the_documented_loss():
    logp, old, adv, mask, weight, lengths = batch(seed=3)
    plain, _ = grpo.grpo_loss(logp, old, adv, mask)
    ones, _ = grpo.grpo_loss(logp, old, adv, mask, is_weight=torch.ones_like(weight))
    assert plain.item() == ones.item()


def varied(completion, example):
    return (sum(map(ord, completion)) % 97) / 97


def test_truncated_importance_sampling_weights_tokens_by_the_capped_ratio(tmp_path, monkeypatch):
    """--tis-cap C: each token's surrogate gets min(pi_old / pi_sampler, C), with pi_sampler the probability the
    sampler drew it with (generate's return_logprobs): here the sampler's are planted, and the weights checked."""
    seen = []
    loss = grpo.grpo_loss

    def recording(logp, old_logp, advantages, mask, *args):
        seen.append((old_logp.detach().clone(), mask.clone(), args[-1]))
        return loss(logp, old_logp, advantages, mask, *args)

    monkeypatch.setattr(grpo, "grpo_loss", recording)
    examples = [dict(EXAMPLE, id=f"e{i}", problem=f"Compute {i}+3+4.") for i in range(3)]
    args = loop_args(tmp_path, examples, max_steps=1, tis_cap=1.5, batch_prompts=2)
    srl.train(args, short_prompt, varied)
    old_logp, mask, weight = seen[0]
    assert weight is not None and float(weight.max()) <= 1.5 + 1e-6 and bool((weight[mask == 0] == 0).all())
    # in fp32 on one device the sampler is the trainer: the ratio is 1 wherever it is not capped
    torch.testing.assert_close(weight[mask.bool()], torch.ones(int(mask.sum())), atol=1e-4, rtol=0)
    log = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    assert log["tis_ratio_mean"] == pytest.approx(1.0, abs=1e-4) and log["tis_ratio_max"] >= 1.0 - 1e-4


@pytest.mark.parametrize("updates", [1, 2])
def test_the_importance_weight_is_capped(monkeypatch, updates):
    """Sampler log-probs planted 3x less likely than the trainer's (ratio 3) or 2x more (0.5): capped at 1.5, the
    weights are 1.5 and 0.5 in every update (pi_old is the policy before the step), and the log says so."""
    import types

    import model as M
    seen = []
    loss = grpo.grpo_loss
    monkeypatch.setattr(grpo, "grpo_loss", lambda *a: seen.append(a[-1]) or loss(*a))
    net, _ = M.load_model("tiny")
    prompt, completions = [1, 2, 3], [[4, 5, 6], [7, 8]]
    with torch.no_grad():
        trainer, _ = E.completion_logprobs(net, [prompt] * 2, completions)
    planted = [(trainer[0, :3] - math.log(3)).tolist(), (trainer[1, :2] + math.log(2)).tolist()]
    groups = [[grpo.Rollout(prompt, c, a, s) for c, a, s in zip(completions, (1.0, -1.0), planted)]]
    args = types.SimpleNamespace(micro_batch_tokens=8192, device="cpu", precision="fp32", temperature=1.0,
                                 updates_per_batch=updates, tis_cap=1.5, clip_low=0.2, clip_high=0.28, beta=0.0,
                                 loss_agg="token-mean", max_new_tokens=8, grad_clip=1.0)
    stats = grpo.update_policy(net, torch.optim.AdamW(net.parameters(), lr=1e-3), groups, args)
    assert len(seen) == updates
    for weight in seen:
        torch.testing.assert_close(weight[0, :3], torch.full((3,), 1.5), rtol=0, atol=1e-5)
        torch.testing.assert_close(weight[1, :2], torch.full((2,), 0.5), rtol=0, atol=1e-5)
    assert stats["tis_ratio_max"] == pytest.approx(3.0, rel=1e-4)
    assert stats["tis_ratio_mean"] == pytest.approx((3 * 3 + 2 * 0.5) / 5, rel=1e-4)


def test_mask_truncated_gives_cut_completions_no_loss(tmp_path, monkeypatch):
    rows = []
    update = grpo.update_policy

    def recording(model, optimizer, groups, args, reference=None):
        rows.append(groups)
        return update(model, optimizer, groups, args, reference)

    monkeypatch.setattr(srl, "update_policy", recording)
    examples = [dict(EXAMPLE, id=f"e{i}", problem=f"Compute {i}+3+4.") for i in range(3)]
    args = loop_args(tmp_path, examples, max_steps=2, max_new_tokens=4)
    args.mask_truncated = True
    srl.train(args, short_prompt, varied)  # a random tiny model rarely stops within 4 tokens: most are cut
    log = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    import model as M
    stop_ids = set(M.load_model("tiny")[0].stop_token_ids)
    for groups, entry in zip(rows, log):
        assert all(r.completion[-1] in stop_ids for group in groups for r in group)  # only finished ones
        assert entry["masked_truncated"] == 8 - sum(map(len, groups))
    assert any(entry["masked_truncated"] > 0 for entry in log)  # (some were cut: the check above is not empty)


def test_samples_a_person_reads(tmp_path):
    """Each validation writes its first outputs, and every --log-samples steps a group's best and worst rollouts,
    with what they are scored against, their reward and advantage."""
    examples = [dict(EXAMPLE, id=f"e{i}", problem=f"Compute {i}+3+4.") for i in range(3)]
    (tmp_path / "srl_val.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    args = loop_args(tmp_path, examples, max_steps=4, eval_every=2, log_samples=2)
    srl.train(args, short_prompt, varied)
    samples = [json.loads(line) for line in open(tmp_path / "run" / "samples.jsonl")]
    assert [s["step"] for s in samples if s["kind"] == "validation"] == [2] * 3 + [4] * 3
    rollouts = [s for s in samples if s["kind"] == "rollout"]
    assert [s["step"] for s in rollouts] == [2, 2, 4, 4]
    for s in samples:
        assert s["id"].startswith("e") and s["expected"] == EXAMPLE["target_step"] and isinstance(s["completion"], str)
    for best, worst in zip(rollouts[::2], rollouts[1::2]):
        assert best["reward"] >= worst["reward"] and best["advantage"] >= worst["advantage"]
        assert best["prompt"].endswith("assistant\n")


def test_tensorboard_gets_the_metrics_and_the_samples(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed: pip install tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    examples = [dict(EXAMPLE, id=f"e{i}", problem=f"Compute {i}+3+4.") for i in range(3)]
    args = loop_args(tmp_path, examples, max_steps=2, log_samples=1, report_to="tensorboard")
    srl.train(args, short_prompt, varied)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("reward_mean")] == [1, 2]
    assert "samples" in "".join(events.Tags()["tensors"])
