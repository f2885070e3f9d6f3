"""--precision bf16 on CPU: the mixed-precision code a GPU runs (fp32 master weights, bf16 autocast, a bf16
sampling copy refreshed after each update), taken by SRL, RLVR and SFT steps here."""
import json

import pytest
import torch
from test_model import hf_pair, random_prompts
from test_sft import MATH_RECORDS, write_jsonl
from test_srl_loop import EXAMPLE, loop_args, short_prompt

import engine
import engine as E
import grpo
import model as M
import sft
import srl
from evaluate import math_messages
from machinery import checkpoints
from rlvr import math_reward


@pytest.mark.parametrize("name", ["qwen2_gqa_tied", "llama_gqa_untied"])
def test_packed_logprobs_under_autocast(name, monkeypatch):
    """Under bf16 autocast the packed log-probs stay within 2e-3 of the unpacked reference (bf16 keeps 8
    significant bits; measured 2e-4 to 4e-4 here) and within 1e-2 of fp32; attention sees q, k, v and the
    packing mask in bf16: no fp32 promotion by the rotary tables, no mask converted in every layer."""
    _, ours = hf_pair(name)
    p1, p2 = random_prompts(2, 97, lo=5, hi=30, seed=9)
    completions = random_prompts(6, 97, lo=1, hi=20, seed=10)
    prompts = [p1, p1, p1, p2, p2, p1]
    dtypes = set()
    attention = M.attention

    def spy(q, k, v, attn_mask=None, is_causal=False):
        dtypes.update({q.dtype, k.dtype, v.dtype} | ({attn_mask.dtype} if attn_mask is not None else set()))
        return attention(q, k, v, attn_mask, is_causal)

    monkeypatch.setattr(M, "attention", spy)
    with grpo.autocast("cpu", "bf16"):
        packed, mask = E.completion_logprobs(ours, prompts, completions, 0.9)
        reference, _ = engine.completion_logprobs_reference(ours, prompts, completions, 0.9)
    assert dtypes == {torch.bfloat16}
    full, _ = E.completion_logprobs(ours, prompts, completions, 0.9)
    assert packed.dtype == torch.float32 and mask.sum().item() == sum(map(len, completions))
    torch.testing.assert_close(packed, reference, atol=2e-3, rtol=0)
    torch.testing.assert_close(packed, full, atol=1e-2, rtol=0)
    assert not torch.equal(packed, full)  # autocast was on


def spy_on_sampling(monkeypatch):
    """Record the dtype and the weights of every model that srl.py samples from."""
    calls = []
    generate = engine.generate

    def spy(policy, *args, **kwargs):
        calls.append({k: v.detach().clone() for k, v in policy.state_dict().items()})
        return generate(policy, *args, **kwargs)

    monkeypatch.setattr(engine, "generate", spy)
    return calls


def test_srl_and_rlvr_steps_under_bf16(tmp_path, monkeypatch):
    """Two SRL steps and two RLVR steps with --precision bf16: the update runs under autocast on fp32 master
    weights, the rollouts and validation come from a bf16 copy, and after the last update that copy equals the
    trained fp32 weights rounded to bf16."""
    calls = spy_on_sampling(monkeypatch)
    autocast_seen = []
    logprobs = grpo.completion_logprobs

    def logprobs_spy(model, *args, **kwargs):
        autocast_seen.append((torch.is_autocast_enabled("cpu"), model.lm_head.weight.dtype))
        return logprobs(model, *args, **kwargs)

    monkeypatch.setattr(grpo, "completion_logprobs", logprobs_spy)

    def varied(completion, example):  # rewards that vary within every group, so each step updates
        return (sum(map(ord, completion)) % 97) / 97

    examples = [dict(EXAMPLE, id=f"e{i}", problem=f"Compute {i}+3+4.") for i in range(4)]
    args = loop_args(tmp_path / "srl", examples, max_steps=2, precision="bf16")
    (tmp_path / "srl" / "srl_val.jsonl").write_text(json.dumps(EXAMPLE) + "\n")
    initial, _ = M.load_model("tiny")
    trained = srl.train(args, short_prompt, varied)
    assert trained.lm_head.weight.dtype == torch.float32
    assert set(autocast_seen) == {(True, torch.float32)}
    assert all(v.dtype == torch.bfloat16 for v in calls[-1].values() if v.is_floating_point())
    for name, value in trained.state_dict().items():
        assert torch.equal(calls[-1][name], value.to(torch.bfloat16)), name  # the copy took the last update
    assert not torch.equal(trained.lm_head.weight, initial.lm_head.weight)
    log = [json.loads(line) for line in open(tmp_path / "srl" / "run" / "metrics.jsonl")]
    assert [entry["step"] for entry in log] == [1, 2] and "val_score" in log[-1]
    assert all(entry["kept_groups"] == 2 and entry["skipped_steps"] == 0 for entry in log)

    # RLVR: the same loop with the math prompt and the final-answer reward. A random tiny model never boxes a right
    # answer, so math_reward alone would drop every group; `varied` is added to keep them.
    problems = [{"id": f"p{i}", "problem": f"Compute {i}+5.", "answer": str(i + 5)} for i in range(4)]
    calls.clear()
    args = loop_args(tmp_path / "rlvr", problems, max_steps=2, precision="bf16", std_threshold=0.0)
    srl.train(args, lambda ex: math_messages(ex["problem"]),
              lambda completion, ex: math_reward(completion, ex["answer"]) + varied(completion, ex))
    log = [json.loads(line) for line in open(tmp_path / "rlvr" / "run" / "metrics.jsonl")]
    assert len(log) == 2 and all(entry["kept_groups"] == 2 for entry in log)
    assert all(v.dtype == torch.bfloat16 for v in calls[0].values() if v.is_floating_point())


def test_sft_step_under_bf16(tmp_path):
    """SFT with --precision bf16: the first loss (before any update) equals the fp32 one to bf16's precision, and
    the checkpoint keeps fp32 weights."""
    data = write_jsonl(tmp_path / "sft_train.jsonl", MATH_RECORDS)
    losses = {}
    for precision in ("fp32", "bf16"):
        sft.main(["--data", str(data), "--out", str(tmp_path / precision), "--device", "cpu", "--batch-size", "3",
                  "--max-steps", "2", "--lr", "1e-3", "--precision", precision])
        losses[precision] = [json.loads(line)["loss"] for line in open(tmp_path / precision / "metrics.jsonl")]
    assert losses["bf16"][0] == pytest.approx(losses["fp32"][0], rel=1e-2) and losses["bf16"] != losses["fp32"]
    state = checkpoints.load_training_state(tmp_path / "bf16" / "last")
    assert state["args"]["precision"] == "bf16"
    model, _ = M.load_model(tmp_path / "bf16" / "last")
    assert model.lm_head.weight.dtype == torch.float32


def test_the_masked_training_forward_never_asks_for_cudnn_attention(monkeypatch):
    """The packed training forward (a mask, gradients on) restricts scaled_dot_product_attention to every kernel but
    cuDNN's, whose masked backward returns NaN on H100/H200 (pytorch/pytorch#196678); what it asks for is the same
    on CUDA as here. Sampling (no gradient) and unmasked forwards leave the choice to torch."""
    asked = []
    real = M.sdpa_kernel

    def recording(backends, *args, **kwargs):
        asked.append(list(backends))
        return real(backends, *args, **kwargs)

    monkeypatch.setattr(M, "sdpa_kernel", recording)
    model, _ = M.load_model("tiny")
    prompts, completions = [[1, 2, 3]] * 2, [[4, 5], [6]]  # one group: packed, under a mask
    logp, _ = E.completion_logprobs(model, prompts, completions)
    logp.sum().backward()
    assert asked and all(torch.nn.attention.SDPBackend.CUDNN_ATTENTION not in kernels for kernels in asked)
    assert all(torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION in kernels for kernels in asked)  # CUDA's choice
    assert len(asked) == model.config.num_layers
    asked.clear()
    with torch.no_grad():
        E.completion_logprobs(model, prompts, completions)
    E.generate(model, prompts, 4, temperature=0)
    model(torch.tensor([[1, 2, 3]])).sum().backward()  # unmasked (causal) training forward
    assert asked == []
