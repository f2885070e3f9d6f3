"""
Several processes (torchrun), the part the algorithm does not need: joining and leaving the process group, rank 0's
result on every process, FSDP2's sharding and the sampling copy's refresh. The collectives the GRPO step itself uses
(gather, sum_across, sum_gradients) live in grpo.py. Without torchrun's variables each is the single-process
identity.
"""
import copy
import os

import torch
import torch.distributed as dist

from grpo import get_rank


def init_distributed(device):
    """Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set), join the process group (NCCL on CUDA, gloo on CPU) and
    return (rank, world size, this process's device: cuda:LOCAL_RANK); else (0, 1, device)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    if str(device).startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def end_distributed():
    """Leave the process group at the end of a run (a process that exits without it may abort in teardown)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def on_rank_zero(fn, *args):
    """fn(*args) computed by rank 0 alone (validation), its result received by every process."""
    result = fn(*args) if get_rank() == 0 else None
    if not dist.is_initialized():
        return result
    box = [result]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(model, precision):
    """FSDP2: each process keeps 1/world of every parameter, gradient and AdamW state. Each layer is gathered whole
    for its forward and backward (in bf16 under --precision bf16) and its gradients are reduce-scattered in fp32
    (averaged: grpo.sum_gradients turns them into the sum); the embedding, final norm and output layer form the root
    unit. hidden_states is registered as a forward, so the root's gathering hooks run for it too. In bf16 the layers
    then compute on bf16 weights (a bf16 residual stream) rather than under autocast: close to one process's
    numbers, not equal; in fp32 they agree to rounding."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else None,
                                 reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mixed)
    fully_shard(model, mp_policy=mixed)
    register_fsdp_forward_method(model, "hidden_states")
    return model


def copy_model(model, dtype):
    """A separate copy of the network in dtype (the stop tokens and the settings come along)."""
    return copy.deepcopy(model).to(dtype)


@torch.no_grad()
def copy_weights(target, source):
    """Copy source's parameters into target's (same architecture), casting to target's dtype: how the bf16
    sampling copy takes the fp32 trainer's weights after each update. Under FSDP every process calls it: each
    sharded parameter is gathered whole (full_tensor)."""
    for p_target, p_source in zip(target.parameters(), source.parameters()):
        p_target.copy_(p_source.full_tensor() if hasattr(p_source, "full_tensor") else p_source)
