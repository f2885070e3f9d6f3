"""The GPU memory estimate of memory.py: its activation part against what autograd really keeps (saved-tensor
hooks, on CPU), and the defaults of srl.py, rlvr.py and sft.py for Qwen2.5-1.5B against one 80 GB card."""
import re
import sys
from pathlib import Path

import pytest
import torch

import common
import memory
import model as M

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from gpu_check import QWEN_1_5B, QWEN_7B  # noqa: E402  (the published shapes)

SMALL = M.ModelConfig.from_hf(dict(  # Qwen2.5's proportions (intermediate ~5.8 x hidden, 3 query heads per KV head)
    model_type="qwen2", vocab_size=300, hidden_size=192, num_hidden_layers=3, num_attention_heads=6,
    num_key_value_heads=2, intermediate_size=1120, tie_word_embeddings=True))


def saved_bytes(model, tokens, precision, masked, checkpointing):
    """Bytes of the distinct storages autograd keeps for a training forward of `tokens` positions (one row),
    leaving out the packing mask, which the estimate counts apart."""
    storages = {}

    def keep(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 300, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    model.activation_checkpointing = checkpointing
    with M.autocast("cpu", precision):
        mask = None
        if masked:  # any additive mask (here causal) makes attention repeat the KV heads, as for packed groups
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
def test_activation_estimate_matches_what_autograd_saves(precision, masked, checkpointing):
    """Per token: the difference between two lengths, so that the weights (and autocast's bf16 copies of them),
    which do not grow with the tokens, drop out. With checkpointing only the layers' inputs stay through the
    forward; the estimate adds one rebuilt layer, which the hooks see in backward, not here."""
    torch.manual_seed(0)
    model = M.Decoder(SMALL).train()
    per_token = (saved_bytes(model, 96, precision, masked, checkpointing)
                 - saved_bytes(model, 32, precision, masked, checkpointing)) / 64
    estimate = memory.activation_bytes_per_token(SMALL, precision, masked, checkpointing)
    if checkpointing:  # less the layer rebuilt in backward: (all layers - the final norm's 8h) / layers
        estimate -= (memory.activation_bytes_per_token(SMALL, precision, masked) - 8 * SMALL.hidden_size) / 3
    print(f"{precision} masked={masked} checkpointing={checkpointing}: {per_token:.0f} B/token saved, "
          f"estimate {estimate:.0f}")
    assert abs(estimate - per_token) <= 0.25 * per_token


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
    setup lives in common.py; a stage may call these itself.)"""
    def load_model(*args, **kwargs):
        raise LoadedWeights

    for place in (common, module):
        for name, value in (("gpu_memory", lambda device: CARD), ("load_model", load_model),
                            ("read_config", lambda source: M.ModelConfig.from_hf(config))):
            if hasattr(place, name):
                monkeypatch.setattr(place, name, value)


def estimate_printed(out):
    line = next(line for line in out.splitlines() if line.startswith("GPU memory estimate:"))
    return float(line.split()[3]) * memory.GiB


@pytest.mark.parametrize("stage", ["srl", "rlvr", "sft"])
def test_qwen_1_5b_defaults_fit_an_80gb_card_with_15_percent_to_spare(stage, tmp_path, monkeypatch, capsys):
    """srl.py and rlvr.py at their large-model defaults (16 prompts x G 8, 1,024 new tokens), sft.py with
    --target reasoning --max-length 4096: the printed estimate is at most 85% of 80 GB, with activation
    checkpointing left off."""
    import sft
    import srl
    from test_srl_loop import EXAMPLE, loop_args
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
    import srl
    from test_srl_loop import EXAMPLE, loop_args
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
        with M.autocast("cpu", "bf16"), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            model.hidden_states(ids, attn_mask=mask)
        copies[dtype] = len(squares)
    assert copies == {torch.bfloat16: 1, torch.float32: SMALL.num_layers, torch.bool: 1}, copies
