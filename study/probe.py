"""
What a checkpoint of the quickstart study can do one step at a time, on its validation problems: in its own whole
solutions, greedy and sampled, how often a step is right and how often it makes the sloppy teacher's slip
(tasks/synthetic.py's check_steps); in SRL's format (the expert's steps so far given), how often its greedy next step
is exactly the expert's. `python quickstart.py --probe CHECKPOINT` prints it.
"""
from engine import decode_text, encode_chat, generate
from evaluate import math_messages
from machinery.files import read_jsonl
from model import load_model
from srl import srl_messages, srl_reward
from tasks.synthetic import check_steps


def step_skills(checkpoint, data):
    """One line: the step skills of `checkpoint` on the problems of data/rlvr_val.jsonl and data/srl_val.jsonl."""
    net, tokenizer = load_model(checkpoint)
    problems = read_jsonl(data / "rlvr_val.jsonl")
    prompts = [encode_chat(tokenizer, math_messages(p["problem"])) for p in problems]
    report = []
    for name, temperature, copies in (("greedy", 0.0, 1), ("sampled", 1.0, 4)):
        solutions = generate(net, prompts * copies, 150, temperature=temperature)
        counts = [check_steps(p["problem"], decode_text(tokenizer, s)) for p, s in zip(problems * copies, solutions)]
        steps, right, slipped = (sum(column) for column in zip(*counts))
        report.append(f"{name} right {right / max(steps, 1):.0%} slip {slipped / max(steps, 1):.0%}")
    examples = read_jsonl(data / "srl_val.jsonl")
    actions = generate(net, [encode_chat(tokenizer, srl_messages(e)) for e in examples], 64, temperature=0)
    exact = sum(srl_reward(decode_text(tokenizer, a), e["target_step"]) == 1.0 for a, e in zip(actions, examples))
    return (f"steps of whole solutions: {', '.join(report)}; SRL format: greedy next step exactly the expert's "
            f"{exact / max(len(examples), 1):.0%} ({len(examples)} examples)")
