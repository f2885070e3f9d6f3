"""sft.py: the loss mask (against an independent cross-entropy), micro-batch normalisation, batching, the schedule,
overfitting a few examples, reloading the checkpoint in transformers, and exact resume."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import sft
from engine import encode_chat, token_budget_batches
from evaluate import math_messages
from machinery.files import InputError
from model import load_model
from srl import srl_messages

SRL_RECORD = {"id": "p1", "problem": "Ana has 3 apples and buys 4 more. How many?", "previous_steps": [
    "1. **Start.** Ana has 3 apples."], "target_step": "2. **Add.** 3 + 4 = 7.", "step_index": 2, "num_steps": 2,
    "answer": "7", "completion": "<think>\nStep 1 is done. Next, step 2: Add.\n</think>\n2. **Add.** 3 + 4 = 7."}
# short math records (short prompts keep the tiny model's steps fast)
MATH_RECORDS = [{"id": f"m{i}", "problem": f"{i}+{i}?", "solution": f"1. **Add.** {i}+{i}={2 * i}. \\boxed{{{2 * i}}}",
                 "answer": str(2 * i)} for i in range(1, 7)]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_prompt_and_target_through_the_chat_template(tiny, capsys):
    _, tokenizer = tiny
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    [(prompt, target)], _, _ = sft.tokenize([SRL_RECORD], tokenizer)
    assert prompt == encode_chat(tokenizer, srl_messages(SRL_RECORD))
    assert target == tokenizer.encode(SRL_RECORD["completion"], add_special_tokens=False) + [stop]
    [(prompt, target)], _, _ = sft.tokenize(MATH_RECORDS[:1], tokenizer)
    assert prompt == encode_chat(tokenizer, math_messages(MATH_RECORDS[0]["problem"]))
    assert tokenizer.decode(target) == MATH_RECORDS[0]["solution"] + "<|im_end|>"
    # --target reasoning wraps the trace in the think tags; a record without one is an error naming its line
    record = {**MATH_RECORDS[0], "reasoning": "Two of them."}
    assert sft.messages_and_target(record, "reasoning")[1] == "<think>\nTwo of them.\n</think>\n" + record["solution"]
    with pytest.raises(InputError, match="x.jsonl:2: no 'reasoning'"):
        sft.tokenize([record, MATH_RECORDS[1]], tokenizer, target="reasoning", where="x.jsonl")


def test_loss_counts_exactly_the_target_and_stop_tokens(tiny):
    """Oracle: cross-entropy over the full logits with every prompt and padding label set to ignore."""
    model, tokenizer = tiny
    examples, _, _ = sft.tokenize([SRL_RECORD] + MATH_RECORDS[:2], tokenizer)
    rows = [p + t for p, t in examples]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, (p, t) in enumerate(examples):
        ids[i, :len(p) + len(t)] = torch.tensor(p + t)
        labels[i, len(p):len(p) + len(t)] = torch.tensor(t)  # the completion and its stop token, nothing else
    with torch.no_grad():
        logits = model(ids)
        expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100, reduction="sum")
        num_tokens = sum(len(t) for _, t in examples)
        assert int((labels != -100).sum()) == num_tokens
        got = sft.sft_loss(model, examples, num_tokens)
    assert torch.allclose(got, expected / num_tokens, atol=1e-5), (got, expected / num_tokens)


def test_micro_batches_add_up_to_the_whole_batch(tiny):
    """Gradient accumulation divides by the tokens of the whole step: the batch of 3 in one pass (a large token
    budget) == one example per micro-batch (a budget of one token)."""
    _, tokenizer = tiny
    examples, _, _ = sft.tokenize([SRL_RECORD] + MATH_RECORDS[:2], tokenizer)
    grads = []
    for budget in (10 ** 6, 1):
        model, _ = load_model("tiny")
        loss = 0.0
        step_tokens = sum(len(t) for _, t in examples)
        parts = token_budget_batches(*zip(*examples), budget)
        assert len(parts) == (1 if budget > 1 else 3)
        for part in parts:
            part_loss = sft.sft_loss(model, examples[part], step_tokens)
            part_loss.backward()
            loss += part_loss.item()
        grads.append((loss, torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert math.isclose(grads[0][0], grads[1][0], rel_tol=1e-5)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


def test_non_finite_loss_skips_the_step(tiny):
    _, tokenizer = tiny
    model, _ = load_model("tiny")
    examples, _, _ = sft.tokenize(MATH_RECORDS[:2], tokenizer)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss, grad_norm, skipped = sft.train_step(model, optimizer, examples, 8192, 1e-3, torch.device("cpu"))
    assert skipped and not math.isfinite(loss)
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a.nan_to_num(), b.detach().nan_to_num())
    assert not optimizer.state  # AdamW's moments untouched


def test_max_length_truncates_the_target_and_drops_long_prompts(tiny):
    _, tokenizer = tiny
    full, _, _ = sft.tokenize(MATH_RECORDS[:1], tokenizer)
    prompt_len, target_len = len(full[0][0]), len(full[0][1])
    examples, lost, dropped = sft.tokenize(MATH_RECORDS[:1], tokenizer, max_length=prompt_len + 5)
    assert (lost, dropped) == ([target_len - 5], 0) and examples[0][1] == full[0][1][:5] and target_len > 5
    assert sft.tokenize(MATH_RECORDS[:1], tokenizer, max_length=prompt_len)[1:] == ([], 1)


def test_truncation_report_counts_cut_targets_and_tokens_lost(tiny):
    _, tokenizer = tiny
    records = [{"problem": "p", "solution": "s" * n} for n in range(10, 210, 10)]  # 20 targets, 10 bytes apart
    full, lost, _ = sft.tokenize(records, tokenizer, max_length=10_000)
    assert lost == [0] * 20
    whole = [len(p) + len(t) for p, t in full]
    assert whole == sorted(whole) and len(set(whole)) == 20
    examples, lost, dropped = sft.tokenize(records, tokenizer, max_length=whole[14])  # the 15 shortest fit
    assert lost == [0] * 15 + [whole[i] - whole[14] for i in range(15, 20)] and dropped == 0
    report = sft.truncation_report(examples, lost, dropped, whole[14])
    assert "5 of 20 targets cut (25.0%)" in report
    assert f"tokens lost: mean {sum(lost) / 5:.0f}, max {whole[19] - whole[14]})" in report
    assert f"need up to {whole[19]} tokens; 95% fit in {whole[18]}." in report
    assert "0 of 20 targets cut (0.0%); 0 dropped" in sft.truncation_report(full, [0] * 20, 0, 10_000)


def test_length_grouped_batches():
    lengths = [(i * 37) % 101 for i in range(100)]
    batches = sft.length_grouped_batches(lengths, 8, seed=3, epoch=1, chunk_batches=4)
    assert sorted(i for b in batches for i in b) == list(range(100))  # every example once per epoch
    assert sorted(map(len, batches)) == [4] + [8] * 12  # chunks of 32, 32, 32 and 4 examples
    for b in batches:  # sorted within each batch (longest first), since batches are cut from sorted chunks
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    assert batches == sft.length_grouped_batches(lengths, 8, seed=3, epoch=1, chunk_batches=4)
    assert batches != sft.length_grouped_batches(lengths, 8, seed=3, epoch=2, chunk_batches=4)


def test_learning_rate_schedule():
    total, peak, ratio = 20, 1.0, 0.3
    lrs = [sft.learning_rate(s, total, peak, ratio) for s in range(total)]
    assert lrs[:6] == pytest.approx([(s + 1) / 6 for s in range(6)])  # linear warm-up over ceil(0.3 * 20) steps
    assert lrs[6] == pytest.approx(peak)
    assert all(a >= b for a, b in zip(lrs[6:], lrs[7:]))  # then non-increasing
    assert lrs[13] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 14)))  # cosine, half way = peak / 2
    assert sft.learning_rate(total, total, peak, ratio) == pytest.approx(0.0)


def run_sft(tmp_path, out, *flags):
    data = write_jsonl(tmp_path / "sft_train.jsonl", MATH_RECORDS)
    sft.main(["--data", str(data), "--out", str(tmp_path / out), "--device", "cpu", *flags])
    lines = (tmp_path / out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_loss_falls_on_a_small_set(tmp_path):
    metrics = run_sft(tmp_path, "run", "--batch-size", "3", "--epochs", "15", "--lr", "3e-3", "--warmup-ratio", "0.1")
    losses = [m["loss"] for m in metrics]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    first, last = losses[0], sum(losses[-4:]) / 4
    assert last < 0.3 * first, losses  # from ln(vocab) ~ 5.6 to well below the unigram entropy (~3.3)


def test_checkpoint_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    run_sft(tmp_path, "run", "--batch-size", "2", "--max-steps", "2", "--lr", "1e-3")
    folder = tmp_path / "run" / "last"
    ours, tokenizer = load_model(str(folder))
    theirs = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ids = torch.tensor([encode_chat(tokenizer, math_messages("1+1?"))])
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() < 1e-4
    # the weights moved away from the random initialisation, and the tokenizer carries the chat template
    fresh, _ = load_model("tiny")
    assert not torch.equal(fresh.lm_head.weight, ours.lm_head.weight)
    assert AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(
        math_messages("1+1?"), add_generation_prompt=True, tokenize=False).endswith("<|im_start|>assistant\n")


def test_resume_continues_exactly(tmp_path):
    from safetensors.torch import load_file
    flags = ["--batch-size", "2", "--epochs", "2", "--lr", "1e-3", "--save-every", "1"]  # 3 batches per epoch
    straight = run_sft(tmp_path, "straight", *flags, "--max-steps", "4")
    run_sft(tmp_path, "parts", *flags, "--max-steps", "2")
    parts = run_sft(tmp_path, "parts", *flags, "--max-steps", "4", "--resume")
    a = load_file(str(tmp_path / "straight" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "parts" / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["step"] for m in parts] == [1, 2, 3, 4]
    assert [m["loss"] for m in parts] == [m["loss"] for m in straight]
    state = torch.load(tmp_path / "parts" / "last" / "training_state.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (4, 1, 1)


def test_missing_data_tells_to_run_data_prep(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sft.main(["--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "run")])
    assert "python data_prep.py" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sft.main(["--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "run"), "--resume"])
    assert "--resume" in capsys.readouterr().err


def test_fitted_tiny_tokenizer_survives_save_and_load(tmp_path):
    """The warm start's tokenizer is fitted to its data (numbers become single tokens); a checkpoint must give the
    same ids after save_model, through load_model and through transformers' AutoTokenizer."""
    from transformers import AutoTokenizer

    import data_prep
    from engine import encode_chat
    from model import load_model, save_model
    from tasks import synthetic
    from tasks.sources import BUILTIN_FIELDS, normalize
    problems = normalize(synthetic.synthetic_problems(30, 3, seed=1), BUILTIN_FIELDS)
    records = data_prep.prepare(problems, val_problems=0)[0]["sft_srl_train.jsonl"]
    model, tokenizer = sft.fitted_tiny(records)
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode(" 23", add_special_tokens=False)) == ["Ġ23"]
    save_model(model, tokenizer, tmp_path / "ckpt")
    loaded, hf = load_model(tmp_path / "ckpt")[1], AutoTokenizer.from_pretrained(str(tmp_path / "ckpt"))
    for record in records:
        messages, target = sft.messages_and_target(record)
        ids = encode_chat(tokenizer, messages) + tokenizer.encode(target, add_special_tokens=False)
        assert encode_chat(loaded, messages) + loaded.encode(target, add_special_tokens=False) == ids
        assert encode_chat(hf, messages) + hf.encode(target, add_special_tokens=False) == ids
