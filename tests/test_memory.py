"""The GPU memory estimate of memory.py: its activation part against what autograd really keeps (saved-tensor
hooks, on CPU), and the defaults of srl.py, rlvr.py and sft.py for Qwen2.5-1.5B against one 80 GB card."""
import re
import sys
from pathlib import Path

import pytest
import torch

import model as M
from machinery import memory, setup

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from gpu_check import QWEN_1_5B, QWEN_7B  # noqa: E402  (the published shapes)

import grpo

SMALL = M.ModelConfig.from_hf(dict(  # Qwen2.5's proportions (intermediate ~5.8 x hidden, 3 query heads per KV head)
    model_type="qwen2", vocab_size=300, hidden_size=192, num_hidden_layers=3, num_attention_heads=6,
    num_key_value_heads=2, intermediate_size=1120, tie_word_embeddings=True))


def attention_as_on_cuda(q, k, v, attn_mask=None, is_causal=False, attention=M.attention):
    """model.attention as it runs on CUDA, where a mask makes it repeat the KV heads (CPU's kernel takes them as
    they are), which the estimate counts."""
    if attn_mask is not None:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return attention(q, k, v, attn_mask, is_causal)


def saved_bytes(model, tokens, precision, masked, checkpointing, monkeypatch):
    """Bytes of the distinct storages autograd keeps for a training forward of `tokens` positions (one row),
    leaving out the packing mask, which the estimate counts apart. Attention as on CUDA."""
    monkeypatch.setattr(M, "attention", attention_as_on_cuda)
    storages = {}

    def keep(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 300, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    model.activation_checkpointing = checkpointing
    with grpo.autocast("cpu", precision):
        mask = None
        if masked:  # any additive mask (here causal) makes attention repeat the KV heads on CUDA, as for packed groups
            dtype = M.compute_dtype(model.lm_head.weight)
            mask = torch.full((tokens, tokens), float("-inf"), dtype=dtype).triu(1)[None, None]
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            model.hidden_states(ids, attn_mask=mask)
    if mask is not None:
        storages.pop(mask.untyped_storage().data_ptr(), None)
    return sum(storages.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_matches_what_autograd_saves(precision, masked, checkpointing, monkeypatch):
    """Per token: the difference between two lengths, so that the weights (and autocast's bf16 copies of them),
    which do not grow with the tokens, drop out. With checkpointing only the layers' inputs stay through the
    forward; the estimate adds one rebuilt layer, which the hooks see in backward, not here."""
    torch.manual_seed(0)
    model = M.Decoder(SMALL).train()
    per_token = (saved_bytes(model, 96, precision, masked, checkpointing, monkeypatch)
                 - saved_bytes(model, 32, precision, masked, checkpointing, monkeypatch)) / 64
    estimate = memory.activation_bytes_per_token(SMALL, precision, masked, checkpointing)
    if checkpointing:  # less the layer rebuilt in backward: (all layers - the final norm's 8h) / layers
        estimate -= (memory.activation_bytes_per_token(SMALL, precision, masked) - 8 * SMALL.hidden_size) / 3
    print(f"{precision} masked={masked} checkpointing={checkpointing}: {per_token:.0f} B/token saved, "
          f"estimate {estimate:.0f}")
    assert abs(estimate - per_token) <= 0.25 * per_token


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_activation_estimate_matches_what_autograd_saves(precision, masked, checkpointing, monkeypatch):
    """The same measure under LoRA (rank 8): the base frozen in the run's dtype, so that its layers keep no input
    for their own weights' gradients; the adapters keep theirs."""
    torch.manual_seed(0)
    model = M.Decoder(SMALL).to(torch.bfloat16 if precision == "bf16" else torch.float32).add_lora(8, 16).train()
    per_token = (saved_bytes(model, 96, precision, masked, checkpointing, monkeypatch)
                 - saved_bytes(model, 32, precision, masked, checkpointing, monkeypatch)) / 64
    estimate = memory.activation_bytes_per_token(SMALL, precision, masked, checkpointing, lora_rank=8)
    if checkpointing:
        full = memory.activation_bytes_per_token(SMALL, precision, masked, lora_rank=8)
        final_norm = 4 * SMALL.hidden_size + 4 + 2 * (2 if precision == "bf16" else 4) * SMALL.head_dim
        estimate -= (full - final_norm) / 3  # less the layer rebuilt in backward
    print(f"LoRA {precision} masked={masked} checkpointing={checkpointing}: {per_token:.0f} B/token saved, "
          f"estimate {estimate:.0f}")
    assert abs(estimate - per_token) <= 0.05 * per_token


def test_lora_parameter_count():
    model = M.Decoder(SMALL).add_lora(8, 16)
    assert memory.lora_parameter_count(SMALL, 8) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_parameter_count():
    llama = M.ModelConfig.from_hf(dict(model_type="llama", vocab_size=97, hidden_size=64, num_hidden_layers=2,
                                       num_attention_heads=8, num_key_value_heads=2, intermediate_size=80,
                                       attention_bias=True, tie_word_embeddings=False))
    for cfg in (SMALL, llama):
        assert memory.parameter_count(cfg) == sum(p.numel() for p in M.Decoder(cfg).parameters())
    assert round(memory.parameter_count(M.ModelConfig.from_hf(QWEN_1_5B)) / 1e6) == 1544  # Qwen2.5-1.5B: 1.54B
    assert round(memory.parameter_count(M.ModelConfig.from_hf(QWEN_7B)) / 1e6) == 7616  # Qwen2.5-7B: 7.62B


CARD = 80e9  # an 80 GB card


class LoadedWeights(Exception):
    pass


def start_on_a_gpu(monkeypatch, module, config):
    """Run a stage up to its memory plan as if on an 80 GB GPU with `config`'s shape: loading weights raises. (The
    setup lives in machinery/setup.py; a stage may call these itself.)"""
    def load_model(*args, **kwargs):
        raise LoadedWeights

    for place in (setup, module):
        for name, value in (("gpu_memory", lambda device: CARD), ("load_model", load_model),
                            ("read_config", lambda source: M.ModelConfig.from_hf(config))):
            if hasattr(place, name):
                monkeypatch.setattr(place, name, value)


def estimate_printed(out):
    """The peak of the plan's last line, "fits: peak N.N GB of M.M GB", in bytes."""
    line = next(line for line in out.splitlines() if line.startswith("fits: peak"))
    return float(line.split()[2]) * memory.GB


@pytest.mark.parametrize("stage", ["srl", "rlvr", "sft"])
def test_qwen_1_5b_defaults_fit_an_80gb_card_with_15_percent_to_spare(stage, tmp_path, monkeypatch, capsys):
    """srl.py and rlvr.py at their large-model defaults (16 prompts x G 8, 1,024 new tokens), sft.py with
    --target reasoning --max-length 4096: the printed estimate is at most 85% of 80 GB, with activation
    checkpointing left off."""
    from test_srl_loop import EXAMPLE, loop_args

    import sft
    import srl
    module = sft if stage == "sft" else srl
    start_on_a_gpu(monkeypatch, module, QWEN_1_5B)
    with pytest.raises(LoadedWeights):
        if stage == "sft":
            data = tmp_path / "sft_train.jsonl"
            data.write_text('{"problem": "1+1?", "solution": "2", "reasoning": "one and one"}\n')
            sft.main(["--data", str(data), "--model", "qwen-1.5b", "--target", "reasoning", "--max-length", "4096",
                      "--precision", "bf16", "--out", str(tmp_path / "run")])
        else:  # loop_args sets tiny-test values: back to the defaults for every flag that has one by size
            args = loop_args(tmp_path, [EXAMPLE], precision="bf16", std_threshold=0.0 if stage == "rlvr" else 0.01)
            for name in srl.LARGE_MODEL_DEFAULTS:
                setattr(args, name, None)
            args.micro_batch_tokens = srl.training_arguments("", "", "", 0).get_default("micro_batch_tokens")
            srl.train(args, None, None)
            assert (args.batch_prompts, args.group_size, args.max_new_tokens) == (16, 8, 1024)
    peak = estimate_printed(capsys.readouterr().out)
    print(f"{stage}: {peak / 1e9:.1f} GB, {peak / CARD:.0%} of 80 GB")
    assert peak <= 0.85 * CARD
    assert memory.estimate_memory(M.ModelConfig.from_hf(QWEN_1_5B))["activations"] > 0.25 * CARD  # not a trivial fit


def test_a_run_that_cannot_fit_stops_before_loading_weights(tmp_path, monkeypatch, capsys):
    """Qwen2.5-7B on one 80 GB card: fp32 weights, gradients and AdamW alone are 122 GB. The run stops before any
    weight loads and names the way out; a shape that needs activation checkpointing gets it switched on."""
    from test_srl_loop import EXAMPLE, loop_args

    import srl
    start_on_a_gpu(monkeypatch, srl, QWEN_7B)
    with pytest.raises(SystemExit):
        srl.train(loop_args(tmp_path, [EXAMPLE], precision="bf16"), None, None)
    assert re.search("alone take 1.*--fsdp", capsys.readouterr().err)
    # Qwen2.5-1.5B with micro-batches of 16k positions: 90 GB estimated without checkpointing, 39 GB with it
    args = loop_args(tmp_path, [EXAMPLE], precision="bf16", micro_batch_tokens=16384, batch_prompts=16,
                     group_size=8, max_new_tokens=1024)
    start_on_a_gpu(monkeypatch, srl, QWEN_1_5B)
    with pytest.raises(LoadedWeights):
        srl.train(args, None, None)
    assert args.activation_checkpointing is True
    args = loop_args(tmp_path, [EXAMPLE], precision="bf16", micro_batch_tokens=16384)
    args.activation_checkpointing = False  # --no-activation-checkpointing: not overridden, so it cannot fit
    with pytest.raises(SystemExit):
        srl.train(args, None, None)
    assert "--micro-batch-tokens" in capsys.readouterr().err


def test_the_packing_mask_is_kept_once_not_once_per_layer():
    """Under bf16 autocast, a mask in the autocast dtype, or a boolean one (which hidden_states turns into that once,
    as completion_logprobs passes it), is saved for backward once for all layers; an fp32 mask would be cast to
    bf16 in every layer and each copy kept."""
    model = M.Decoder(SMALL).train()
    ids = torch.randint(0, 300, (1, 40))
    copies = {}
    for dtype in (torch.bfloat16, torch.float32, torch.bool):
        squares = set()

        def keep(t):
            if t.dim() == 4 and t.shape[-2:] == (40, 40):
                squares.add(t.untyped_storage().data_ptr())
            return t

        mask = torch.full((40, 40), float("-inf")).triu(1)[None, None]
        mask = mask == 0 if dtype == torch.bool else mask.to(dtype)
        with grpo.autocast("cpu", "bf16"), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            model.hidden_states(ids, attn_mask=mask)
        copies[dtype] = len(squares)
    assert copies == {torch.bfloat16: 1, torch.float32: SMALL.num_layers, torch.bool: 1}, copies


# -----------------------------------------------------------------------------------------------------------------
# The plan: --gpu-memory and --plan-only, before any weight loads, offline, without a GPU


def plan_lines(stage, argv, capsys, tmp_path, monkeypatch):
    """Run a stage's command line with --plan-only in an empty folder (no data, no hub, no GPU); its output lines
    and exit status."""
    from huggingface_hub import constants

    import sft
    import srl
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    status = 0
    try:
        (sft if stage == "sft" else srl).main(argv + ["--plan-only", "--device", "cpu"])
    except SystemExit as e:
        status = e.code
    captured = capsys.readouterr()
    return (captured.out + captured.err).strip().splitlines(), status


@pytest.mark.parametrize("alias", list(memory.PUBLISHED_SHAPES))
def test_plan_only_works_offline_for_every_alias(alias, tmp_path, monkeypatch, capsys):
    lines, status = plan_lines("srl", ["--model", alias, "--lora-rank", "32", "--gpu-memory", "24"], capsys,
                               tmp_path, monkeypatch)
    assert lines[-1].startswith("fits: peak") and status == 0, lines
    assert any(line.startswith("memory plan:") for line in lines) and not (tmp_path / "runs").exists()
    lines, status = plan_lines("sft", ["--model", alias, "--gpu-memory", "80"], capsys, tmp_path, monkeypatch)
    assert (lines[-1].startswith("fits: peak") and status == 0) or ("error: does not fit:" in lines[-1] and status == 2)


# the targets of the plan (the README's table "which card runs what"): the estimate must fit them within 85%
FITS = [("srl", "qwen-1.5b", 8, ["--lora-rank", "32"]), ("srl", "qwen-1.5b", 16, ["--lora-rank", "32"]),
        ("srl", "qwen-3b", 16, ["--lora-rank", "32"]), ("srl", "qwen-7b", 24, ["--lora-rank", "32"]),
        ("srl", "qwen-0.5b", 24, []), ("sft", "qwen-1.5b", 16, ["--lora-rank", "32", "--max-length", "4096"])]


@pytest.mark.parametrize("stage, alias, card, flags", FITS)
def test_the_plan_fits_the_cards_people_have(stage, alias, card, flags, tmp_path, monkeypatch, capsys):
    lines, status = plan_lines(stage, ["--model", alias, "--gpu-memory", str(card)] + flags, capsys, tmp_path,
                               monkeypatch)
    assert status == 0 and lines[-1].startswith("fits: peak"), lines
    peak, of = float(lines[-1].split()[2]), float(lines[-1].split()[5])
    assert of == card and peak <= 0.85 * card


def test_a_plan_that_cannot_fit_names_the_flag(tmp_path, monkeypatch, capsys):
    """Full fine-tuning of Qwen2.5-7B on 24 GB: the weights alone do not fit, and the plan names --lora-rank; with
    LoRA on 8 GB even the frozen base does not, and it names a smaller model. Settings given on the command line are
    kept, not re-picked: --micro-batch-tokens 16384 without checkpointing does not fit 16 GB."""
    lines, status = plan_lines("srl", ["--model", "qwen-7b", "--gpu-memory", "24"], capsys, tmp_path, monkeypatch)
    assert status == 2 and "error: does not fit:" in lines[-1] and "--lora-rank" in lines[-1]  # an error: exit 2
    lines, status = plan_lines("srl", ["--model", "qwen-7b", "--lora-rank", "16", "--gpu-memory", "8"], capsys,
                               tmp_path, monkeypatch)
    assert status == 2 and "smaller model" in lines[-1]
    lines, status = plan_lines("srl", ["--model", "qwen-1.5b", "--lora-rank", "32", "--gpu-memory", "16",
                                       "--micro-batch-tokens", "16384", "--no-activation-checkpointing"], capsys,
                               tmp_path, monkeypatch)
    assert status == 2 and "--micro-batch-tokens" in lines[-1]
    lines, status = plan_lines("srl", ["--model", "qwen-1.5b", "--lora-rank", "32", "--gpu-memory", "16"], capsys,
                               tmp_path, monkeypatch)
    assert status == 0 and "activation checkpointing" in lines[-5]


def test_the_plan_is_stored_with_the_run(tmp_path):
    """A run writes what its plan picked, with the estimate by part, to plan.json."""
    import json

    from test_srl_loop import EXAMPLE, loop_args

    import srl
    args = loop_args(tmp_path, [EXAMPLE], max_steps=1, gpu_memory=8, precision="fp32")
    srl.train(args, lambda ex: [{"role": "user", "content": ex["problem"]}], lambda text, ex: len(text) % 3 / 2)
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["card_gb"] == 8 and plan["micro_batch_tokens"] == 8192 and plan["activation_checkpointing"] is False
    assert plan["sample_batch"] == 2 and plan["parts_gb"]["weights"] > 0 and plan["peak_gb"] < 8
