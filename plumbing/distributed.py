"""Several training processes under torchrun (PROTOCOL section 5).

`torchrun --nproc_per_node N <script> ...` starts N copies of a script with WORLD_SIZE, RANK
and LOCAL_RANK set. Each process takes batch_size / N samples of every batch (the union of
the processes' shares is the single-process batch) and DistributedDataParallel averages the
gradients; rank 0 alone writes files. Outside torchrun (or with N = 1) these helpers are the
identity and nothing else changes.
"""
from __future__ import annotations

import io
import os
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def choose_device(name: str) -> torch.device:
    """The device a --device value names (auto: CUDA when available, else the CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def in_process_group() -> bool:
    """True once this process has joined a process group."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """The number of training processes: the process group's size, else torchrun's WORLD_SIZE."""
    if in_process_group():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (0 outside torchrun)."""
    if in_process_group():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True for the process that writes files and prints (rank 0)."""
    return rank() == 0


def distributed() -> bool:
    """True in one of several processes that have joined the process group."""
    return in_process_group() and dist.get_world_size() > 1


def process_device(name: str) -> torch.device:
    """This process's device: ``choose_device(name)``, except that under torchrun a CUDA device
    is the process's own GPU, cuda:LOCAL_RANK (config.check_device refuses cuda:N there)."""
    device = choose_device(name)
    if world_size() > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init_distributed(device_name: str) -> torch.device:
    """This process's device; under torchrun with several processes, also join the process
    group once (NCCL on GPUs, gloo on the CPU)."""
    device = process_device(device_name)
    if world_size() > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return device


def shutdown_distributed() -> None:
    """Leave the process group (no-op outside torchrun)."""
    if in_process_group():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op outside torchrun)."""
    if distributed():
        dist.barrier()


_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """The sum (``op`` "sum") or the maximum ("max") of ``tensor`` over the processes, detached
    (``tensor`` itself outside torchrun)."""
    if not distributed():
        return tensor
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    total = tensor.detach().to(on, copy=True)
    dist.all_reduce(total, _REDUCE_OPS[op])
    return total.to(tensor.device)


def union_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over the processes, differentiable so that DistributedDataParallel
    averages the gradient of the whole (union) batch's loss.

    Its value is the sum S over ranks, the same on every rank; its gradient on a rank is
    world_size times that of the rank's own ``tensor``. DDP divides the sum of the ranks'
    gradients by world_size, so a loss f(union_sum(t)) gets f'(S) * sum_r dt_r/dw, the
    gradient of f on the union batch: use it for normalizers and for non-additive terms
    (a mean over a data-dependent count, a square root of a sum). Terms that are means over
    the local batch need nothing (equal shares: DDP's average is the union mean).
    Outside torchrun: ``tensor`` itself.
    """
    if not distributed():
        return tensor
    total = all_reduce(tensor)
    if not tensor.requires_grad:
        return total
    return total + world_size() * (tensor - tensor.detach())


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (the model itself otherwise).

    Loss functions run their extra passes (attacks, input gradients with create_graph) on it:
    only the main forward pass goes through the wrapper, and the single backward at the end
    still reaches every parameter once, so DDP all-reduces the whole gradient.
    """
    return model.module if isinstance(model, DistributedDataParallel) else model


def distributed_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in a DistributedDataParallel wrapper under torchrun, else ``model`` itself."""
    if not distributed():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def on_main_process(function: Callable[[], object]):
    """Run ``function`` on rank 0 only; every rank returns its result or raises its error."""
    if not distributed():
        return function()
    outcome: list = [None]
    if is_main_process():
        try:
            outcome = [(True, function())]
        except Exception as error:  # raised again on every rank below
            outcome = [(False, error)]
    dist.broadcast_object_list(outcome, src=0)
    succeeded, value = outcome[0]
    if not succeeded:
        raise value
    return value


def gather_to_main(state: dict) -> list[dict] | None:
    """Every process's ``state`` (tensors, numbers, containers) in rank order on rank 0, None
    on the others ([state] outside torchrun). Sent as torch.save bytes, read back with
    weights_only=True."""
    if not distributed():
        return [state]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    gathered = [None] * world_size() if is_main_process() else None
    dist.gather_object(buffer.getvalue(), gathered, dst=0)
    if gathered is None:
        return None
    return [torch.load(io.BytesIO(data), weights_only=True) for data in gathered]


def average_logged(values: dict, flag: bool) -> tuple[dict[str, float], bool]:
    """The mean over the processes of each logged scalar and whether any process raised
    ``flag``, in one all_reduce (outside torchrun: the values as floats and ``flag``).

    Every process must pass the same keys in the same order.
    """
    if not distributed():
        return {key: float(value) for key, value in values.items()}, flag
    packed = all_reduce(torch.tensor([*map(float, values.values()), float(flag)], dtype=torch.float64))
    means = (packed[:-1] / world_size()).tolist()
    return dict(zip(values, means)), bool(packed[-1] > 0)

