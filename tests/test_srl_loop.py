"""The GRPO training loop of srl.py on the tiny model: dynamic sampling, learning, exact resume."""
import json

import pytest
import torch
from helpers import supervised_warm_start

import engine as E
import grpo
import model as M
import srl
from machinery import checkpoints

EXAMPLE = {"id": "add", "problem": "Compute 2+3+4.", "previous_steps": ["1. 2+3=5"],
           "target_step": "2. 5+4=9", "step_index": 2, "num_steps": 2, "answer": "9"}


def short_prompt(example):
    """A short prompt keeps these CPU tests fast; srl_messages itself is tested on its own."""
    return [{"role": "user", "content": example["problem"] + "\n" + "\n".join(example["previous_steps"])}]


def srl_step_reward(completion, example):
    return srl.srl_reward(completion, example["target_step"])


def loop_args(tmp_path, examples, **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "srl_train.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in examples))
    argv = ["--data", str(data), "--out", str(tmp_path / "run"), "--batch-prompts", "2", "--group-size", "4",
            "--max-new-tokens", "12", "--max-steps", "3", "--eval-every", "0", "--save-every", "1",
            "--lr", "1e-3", "--std-threshold", "0.01", "--device", "cpu"]
    for key, value in overrides.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return srl.training_arguments("test", "", "", 0.01).parse_args(argv)


def test_srl_messages_hold_the_problem_the_steps_and_the_title():
    messages = srl.srl_messages(dict(EXAMPLE, next_step_title="Add the last number"))
    assert messages[0]["role"] == "system" and "next step" in messages[0]["content"]
    user = messages[1]["content"]
    assert "Compute 2+3+4." in user and "1. 2+3=5" in user and "Add the last number" in user
    assert EXAMPLE["target_step"] not in user


def test_dynamic_sampling_keeps_only_groups_whose_rewards_vary(tmp_path):
    model, tokenizer = M.load_model("tiny")
    examples = [dict(EXAMPLE, id=f"flat{i}") for i in range(4)] + [dict(EXAMPLE, id="varied")]

    def reward(completion, example):  # flat examples: every rollout scores the same; "varied": they differ
        return 0.5 if example["id"].startswith("flat") else (sum(map(ord, completion)) % 97) / 97

    cfg = grpo.GRPOConfig(batch_prompts=3, group_size=4, max_new_tokens=12, std_threshold=0.01, max_draws=2)
    stream = grpo.PromptStream(len(examples), seed=0)
    kept, log = grpo.collect_groups(cfg, model, tokenizer, examples, stream, short_prompt, reward)
    assert 1 <= len(kept) <= 2  # "varied" is drawn once or twice in two rounds
    for prompt, group, rewards in ((g.prompt, g.completions, g.rewards) for g in kept):
        assert rewards.std(unbiased=False) > 0.01 and len(group) == 4
        assert prompt == E.encode_chat(tokenizer, short_prompt(examples[-1]))
    assert log["groups_drawn"] == 3 + (3 - len(kept) if len(kept) < 3 else 0) or log["groups_drawn"] <= 6
    assert stream.position == log["groups_drawn"] and log["kept_group_rate"] == len(kept) / log["groups_drawn"]


def mean_reward(model, tokenizer, example, samples=256):
    prompt = E.encode_chat(tokenizer, short_prompt(example))
    outputs = E.generate(model, [prompt], 28, num_samples=samples, seed=123)
    return sum(srl_step_reward(tokenizer.decode(o, skip_special_tokens=True), example) for o in outputs) / samples


def test_srl_steps_raise_the_reward_on_a_fixed_example(tmp_path):
    """A short supervised warm start teaches the format and two candidate next steps, the expert's and a wrong
    one, in equal measure; SRL steps then move probability towards the expert's step, and the mean reward
    (format failures included) of 256 fresh samples rises clearly. 64 rollouts a step, not 32: with 32 the
    gradient is noisy enough that on some seeds (or after a change in rounding) 20 steps barely move the reward."""
    torch.manual_seed(0)
    model, tokenizer = M.load_model("tiny")
    prompt = E.encode_chat(tokenizer, short_prompt(EXAMPLE))
    targets = [tokenizer.encode(t, add_special_tokens=False) + model.stop_token_ids[:1]
               for t in ("<think>+</think>2. 5+4=9", "<think>+</think>2. 1-1=0")]
    supervised_warm_start(model, prompt, targets, steps=50, lr=3e-3)
    M.save_model(model, tokenizer, tmp_path / "warm")
    before = mean_reward(model, tokenizer, EXAMPLE)
    args = loop_args(tmp_path, [EXAMPLE], model=tmp_path / "warm", batch_prompts=1, group_size=64,
                     max_new_tokens=28, max_steps=20, lr=3e-4, save_every=20)
    trained = srl.train(args, short_prompt, srl_step_reward)
    after = mean_reward(trained, tokenizer, EXAMPLE)
    log = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(log) == 20 and all(entry["kept_groups"] == 1 for entry in log)
    print(f"mean reward of 256 samples: {before:.3f} before, {after:.3f} after")
    assert after > before + 0.05, (before, after)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_after_an_interruption_is_bit_identical(tmp_path, capsys, precision):
    """Stopped in the middle of step 4 (checkpoints every 2 steps) and resumed, a run ends with exactly the
    parameters of an uninterrupted one, and its log holds each step once. The resumed run follows the plan stored
    in the checkpoint, not different flags on its command line, and says so."""
    def reward(completion, example):  # varies within every group, so every step updates the model
        return (sum(map(ord, completion)) % 97) / 97

    examples = [dict(EXAMPLE, id=f"e{i}", problem=f"Compute {i}+3+4.") for i in range(5)]
    straight = srl.train(loop_args(tmp_path / "a", examples, max_steps=5, save_every=2, precision=precision),
                         short_prompt, reward)

    calls = {"n": 0}

    def interrupted_reward(completion, example):
        calls["n"] += 1
        if calls["n"] == 3 * 2 * 4 + 3:  # a few rollouts into step 4 (each step scores 2 groups of 4)
            raise KeyboardInterrupt
        return reward(completion, example)

    args = loop_args(tmp_path / "b", examples, max_steps=5, save_every=2, precision=precision)
    with pytest.raises(KeyboardInterrupt):
        srl.train(args, short_prompt, interrupted_reward)
    assert checkpoints.load_training_state(tmp_path / "b" / "run" / "last")["step"] == 2
    args = loop_args(tmp_path / "b", examples, max_steps=5, save_every=2, lr=0.5, group_size=3)  # fp32 by default
    args.resume = True
    resumed = srl.train(args, short_prompt, reward)
    printed = capsys.readouterr().out
    assert "--lr 0.001 from the checkpoint (not 0.5)" in printed and "--group-size 4 from the checkpoint" in printed
    initial, _ = M.load_model("tiny")
    for (name, a), b, c in zip(straight.state_dict().items(), resumed.state_dict().values(),
                               initial.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in zip(straight.state_dict().values(), initial.state_dict().values()))
    steps = [json.loads(line)["step"] for line in open(tmp_path / "b" / "run" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5]
