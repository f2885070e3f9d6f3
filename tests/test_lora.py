"""LoRA, written by hand in model.py, against its oracles: the base model at step 0, PEFT's LoRA with the same A and
B, PEFT loading our adapter/, transformers loading the merged checkpoint; gradients reach the adapters only; the
SFT, SRL and RLVR stages train with it (fp32 and bf16 autocast) and --resume continues it exactly."""
import json

import pytest
import torch
from test_model import hf_pair, random_prompts
from test_sft import MATH_RECORDS, write_jsonl
from test_srl_loop import EXAMPLE, loop_args, short_prompt

import engine as E
import grpo
import model as M
import sft
import srl
from evaluate import math_messages
from machinery import checkpoints
from rlvr import math_reward


def random_adapters(model, seed=0):
    """Non-zero A and B, so that a comparison sees the adapters (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def varied(completion, example):  # a reward that varies within every group, so that every step updates
    return (sum(map(ord, completion)) % 97) / 97


@pytest.mark.parametrize("name", ["qwen2_gqa_tied", "llama_bias_tied", "llama_gqa_untied"])
def test_step_zero_is_the_base_model_and_only_adapters_train(name):
    _, ours = hf_pair(name)
    ids = torch.randint(0, 97, (3, 15))
    with torch.no_grad():
        before = ours(ids)
    ours.add_lora(4, 8)
    with torch.no_grad():
        assert torch.equal(ours(ids), before)  # B = 0: the adapted model is the base, bit for bit
    adapters = {n for n, p in ours.named_parameters() if ".lora_" in n}
    assert len(adapters) == 2 * 7 * ours.config.num_layers  # A and B on q, k, v, o, gate, up, down of each block
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == adapters
    random_adapters(ours)
    ours(ids).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in ours.named_parameters() if n in adapters)
    assert all(p.grad is None for n, p in ours.named_parameters() if n not in adapters)
    with grpo.adapters_off(ours), torch.no_grad():
        assert torch.equal(ours(ids), before)  # the reference of the KL term: the base, adapters off
    with torch.no_grad():
        assert not torch.allclose(ours(ids), before)  # and back on after it


@pytest.mark.parametrize("name", ["qwen2_gqa_tied", "llama_bias_tied", "llama_gqa_untied"])
def test_our_lora_equals_peft_and_peft_loads_our_adapter(name, tmp_path):
    peft = pytest.importorskip("peft", reason="peft (the LoRA oracle) is not installed: pip install peft")
    hf, ours = hf_pair(name)
    tokenizer = M.build_tiny()[1]
    M.save_model(ours, tokenizer, tmp_path / "base")  # the base, as an ordinary checkpoint
    ours.add_lora(4, 6.0, base=str(tmp_path / "base"))
    random_adapters(ours)
    config = peft.LoraConfig(r=4, lora_alpha=6.0, lora_dropout=0.0, target_modules=checkpoints.LORA_TARGETS)
    theirs = peft.get_peft_model(hf, config).eval()
    with torch.no_grad():  # PEFT's LoRA with our A and B
        for key, p in theirs.named_parameters():
            if ".lora_" in key:
                ours_name = key.removeprefix("base_model.model.").replace(".default.weight", "")
                p.copy_(dict(ours.named_parameters())[ours_name])
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        logits = ours(ids)
        assert (theirs(ids).logits - logits).abs().max().item() <= 1e-5
    checkpoints.write_checkpoint(ours, tokenizer, tmp_path / "trained")  # merged weights, and adapter/ for PEFT
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "trained" / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "trained").eval()
    with torch.no_grad():
        assert (loaded(ids).logits - logits).abs().max().item() <= 1e-5
        assert (merged(ids).logits - logits).abs().max().item() <= 1e-5
    adapter_config = json.loads((tmp_path / "trained" / "adapter" / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (4, 6.0)
    assert adapter_config["base_model_name_or_path"] == str(tmp_path / "base")


def test_srl_with_lora_writes_checkpoints_every_tool_reads(tmp_path):
    """A few SRL steps with --lora-rank: the merged best/ and last/ loaded by transformers give the trained LoRA
    model's logits (fp32, <= 1e-5); adapter/ loaded into the base by PEFT gives them too; the base is untouched."""
    examples = [dict(EXAMPLE, id=f"e{i}", problem=f"Compute {i}+3+4.") for i in range(4)]
    args = loop_args(tmp_path, examples, max_steps=3, lora_rank=4, lr=1e-2)
    trained = srl.train(args, short_prompt, varied)
    assert trained.lora["rank"] == 4 and args.lora_alpha == 8.0  # alpha defaults to 2 x rank
    base, tokenizer = M.load_model("tiny")
    ids = torch.tensor([E.encode_chat(tokenizer, short_prompt(examples[0]))])
    with torch.no_grad():
        logits, base_logits = trained(ids), base(ids)
    assert not torch.allclose(logits, base_logits, atol=1e-4)  # the adapters moved
    from transformers import AutoModelForCausalLM
    for folder in ("best", "last"):
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / folder).eval()
        with torch.no_grad():
            assert (merged(ids).logits - logits).abs().max().item() <= 1e-5, folder
    peft = pytest.importorskip("peft", reason="peft (the LoRA oracle) is not installed: pip install peft")
    M.save_model(base, tokenizer, tmp_path / "tiny_base")
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "tiny_base"),
                                            str(tmp_path / "run" / "last" / "adapter")).eval()
    with torch.no_grad():
        assert (loaded(ids).logits - logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sft_srl_and_rlvr_steps_with_lora(tmp_path, precision):
    """Two steps of each stage with --lora-rank 4: only the adapters change (the optimizer holds them alone), no
    step is skipped; under bf16 the frozen base is held in bf16 and no sampling copy is made."""
    data = write_jsonl(tmp_path / "sft_train.jsonl", MATH_RECORDS)
    sft.main(["--data", str(data), "--out", str(tmp_path / "sft"), "--device", "cpu", "--batch-size", "3",
              "--max-steps", "2", "--lr", "1e-2", "--lora-rank", "4", "--precision", precision])
    log = [json.loads(line) for line in open(tmp_path / "sft" / "metrics.jsonl")]
    assert len(log) == 2 and not any(entry["skipped"] for entry in log)
    state = checkpoints.load_training_state(tmp_path / "sft" / "last")
    assert state["args"]["lora_rank"] == 4
    assert all(".lora_" in name for name in state["optimizer"]["state"])  # AdamW's states: the adapters' alone
    examples = [dict(EXAMPLE, id=f"e{i}", problem=f"Compute {i}+3+4.") for i in range(4)]
    problems = [{"id": f"p{i}", "problem": f"Compute {i}+5.", "answer": str(i + 5)} for i in range(4)]
    runs = {"srl": (examples, short_prompt, varied),
            "rlvr": (problems, lambda ex: math_messages(ex["problem"]),
                     lambda completion, ex: math_reward(completion, ex["answer"]) + varied(completion, ex))}
    for stage, (records, build_prompt, reward) in runs.items():
        args = loop_args(tmp_path / stage, records, max_steps=2, lora_rank=4, lr=1e-2, precision=precision,
                         beta=0.1)  # beta > 0: the reference is the model with its adapters off
        trained = srl.train(args, build_prompt, reward)
        log = [json.loads(line) for line in open(tmp_path / stage / "run" / "metrics.jsonl")]
        assert [entry["step"] for entry in log] == [1, 2] and all(entry["skipped_steps"] == 0 for entry in log)
        assert all(entry["kept_groups"] == 2 for entry in log), stage
        base_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        assert trained.lm_head.weight.dtype == base_dtype and trained.model.layers[0].mlp.up_proj.lora_A.dtype == \
            torch.float32
        initial, _ = M.load_model("tiny", dtype=base_dtype)
        frozen = {n: p for n, p in trained.state_dict().items() if ".lora_" not in n}
        assert all(torch.equal(p, initial.state_dict()[n]) for n, p in frozen.items())
        assert any(p.abs().sum() > 0 for n, p in trained.named_parameters() if n.endswith("lora_B"))


def test_resume_under_lora_is_bit_identical(tmp_path, capsys):
    """Interrupted in step 4 and resumed (the base from --model, the adapters and AdamW from last/), a LoRA run ends
    with exactly the adapters of an uninterrupted one; without its base model it is refused in one line."""
    examples = [dict(EXAMPLE, id=f"e{i}", problem=f"Compute {i}+3+4.") for i in range(5)]
    M.save_model(*M.load_model("tiny"), tmp_path / "base")
    flags = dict(max_steps=5, save_every=2, lora_rank=4, lr=1e-2, model=tmp_path / "base")
    straight = srl.train(loop_args(tmp_path / "a", examples, **flags), short_prompt, varied)
    calls = {"n": 0}

    def interrupted(completion, example):
        calls["n"] += 1
        if calls["n"] == 3 * 2 * 4 + 3:  # a few rollouts into step 4
            raise KeyboardInterrupt
        return varied(completion, example)

    with pytest.raises(KeyboardInterrupt):
        srl.train(loop_args(tmp_path / "b", examples, **flags), short_prompt, interrupted)
    args = loop_args(tmp_path / "b", examples, **dict(flags, lora_rank=0))  # the checkpoint's plan wins
    args.resume = True
    resumed = srl.train(args, short_prompt, varied)
    assert "--lora-rank 4 from the checkpoint (not 0)" in capsys.readouterr().out
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    import shutil
    shutil.rmtree(tmp_path / "base")
    args = loop_args(tmp_path / "b", examples, **flags)
    args.resume = True
    with pytest.raises(SystemExit):
        srl.train(args, short_prompt, varied)
    assert "base model of this LoRA run" in capsys.readouterr().err


def test_prompts_sampled_by_the_lora_policy_match_the_model():
    """Under LoRA the policy that samples is the trained model itself (no copy): generate reads the adapters."""
    model, _ = M.load_model("tiny")
    prompts = random_prompts(3, 200, lo=4, hi=9)
    before = E.generate(model, prompts, 12, temperature=0, stop_token_ids=[])
    model.add_lora(4, 8)
    assert E.generate(model, prompts, 12, temperature=0, stop_token_ids=[]) == before  # B = 0
    random_adapters(model, seed=3)
    assert E.generate(model, prompts, 12, temperature=0, stop_token_ids=[]) != before


def test_lora_under_fsdp_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")  # as under torchrun: the check comes before any process group forms
    with pytest.raises(SystemExit) as stop:
        srl.main(["--lora-rank", "8", "--fsdp", "--out", str(tmp_path / "run"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "--lora-rank with --fsdp" in err[0]
