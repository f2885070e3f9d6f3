"""
RLVR: reinforcement learning with a verifiable reward, the paper's baseline and its second stage after SRL. It is
srl.py's GRPO loop (imported, not copied) with two changes: the prompt is the evaluation prompt (reason step by step,
final answer in \\boxed{}), and the reward is 1.0 when the last \\boxed{} answer is equivalent to the gold answer
(tasks/grader.py), else 0.0. Dynamic sampling with the default --std-threshold 0 is DAPO's filter: groups whose
rollouts are all right or all wrong carry no signal and are dropped.

    python data_prep.py && python rlvr.py                                   # tiny model, built-in problems
    python rlvr.py --model qwen-1.5b --data data/rlvr_train.jsonl           # RLVR from the instruct model
    python rlvr.py --model runs/srl/best --out runs/srl_rlvr                # SRL then RLVR (the paper's best)
    torchrun --nproc_per_node 8 rlvr.py --model qwen-7b --fsdp --batch-prompts 128 --sample-batch 16   # 8 GPUs

Departures from the paper, besides srl.py's:
  - Defaults by model size as srl.py's (large models: 16 prompts x G 8, lr 1e-6; paper: 128 x 8, lr 5e-7).
  - Validation selects the best checkpoint by greedy accuracy on data/rlvr_val.jsonl ("val_score").
  - A model that never writes a right boxed answer gets all-wrong groups, all dropped: no update happens. That is
    the failure of RLVR the paper starts from (kept_group_rate in metrics.jsonl); start from SRL or SFT instead.
"""
from evaluate import math_messages
from srl import train, training_arguments
from tasks.grader import extract_answer, is_equiv


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
