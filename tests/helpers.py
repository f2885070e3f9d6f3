"""Shared by several tests."""
import torch

import engine as E


def supervised_warm_start(model, prompt, targets, steps, lr=1e-3):
    """A few AdamW steps of cross-entropy on `targets` (token-id lists) after one prompt: a quick way to give the
    random tiny model a known output distribution before an RL test."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        logp, mask = E.completion_logprobs(model, [prompt] * len(targets), targets)
        loss = -(logp * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model
