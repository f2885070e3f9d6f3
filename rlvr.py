"""
RLVR: reinforcement learning with a verifiable reward, the paper's baseline and its second stage after SRL.

It is srl.py's GRPO loop (imported, not copied) with two changes: the prompt is the evaluation prompt (reason step
by step, final answer in \\boxed{}), and the reward is 1.0 when the last \\boxed{} answer is equivalent to the gold
answer (evaluate.py's grader), else 0.0. Dynamic sampling with the default --std-threshold 0 is DAPO's filter:
groups whose rollouts are all right or all wrong carry no signal and are dropped.

    python data_prep.py && python rlvr.py                                   # tiny model, built-in problems
    python rlvr.py --model qwen-1.5b --data data/rlvr_train.jsonl           # RLVR from the instruct model
    python rlvr.py --model runs/srl/best --out runs/srl_rlvr                # SRL then RLVR (the paper's best)
    torchrun --nproc_per_node 8 rlvr.py --model qwen-7b --fsdp --batch-prompts 128 --sample-batch 16   # 8 GPUs

Defaults and departures from the paper:
  - Defaults by model size as in srl.py (large models: 16 prompts x G 8, lr 1e-6; paper: 128 prompts x G 8,
    lr 5e-7 for 7B), temperature 1.0, KL 0, clip 0.2 / 0.28; the rest as srl.py's docstring says.
  - Validation selects the best checkpoint by greedy accuracy on data/rlvr_val.jsonl ("val_score"); the format
    rate it logs is always 1 here, since this reward has no format failure.
  - A tiny or untrained model rarely produces a correct boxed answer: every group is then all wrong, dropped,
    and no update happens. That is the failure of RLVR the paper starts from (see kept_group_rate in
    metrics.jsonl); start from an SRL or SFT checkpoint instead.

The loop and every flag are srl.py's (train, training_arguments), the GRPO pieces grpo.py's, the grader grader.py's.
"""
from evaluate import extract_answer, is_equiv, math_messages
from srl import train, training_arguments


def math_reward(completion, gold):
    """1.0 if the completion's last \\boxed{} answer equals the gold answer mathematically, else 0.0
    (no \\boxed{} answer: 0.0)."""
    return 1.0 if is_equiv(extract_answer(completion), gold) else 0.0


def main(argv=None):
    args = training_arguments(__doc__, "data/rlvr_train.jsonl", "runs/rlvr", 0.0).parse_args(argv)
    return train(args, lambda example: math_messages(example["problem"]),
                 lambda completion, example: math_reward(completion, example["answer"]),
                 lambda example: {"problem": str, "answer": (str, int, float)})  # what the prompt and reward read


if __name__ == "__main__":
    main()
