"""
Data-parallel FlatQuant calibration under ``torchrun``, on llm-compressor's own
distributed engine: each rank runs the sequential pipeline on its shard of the
calibration samples. Here: the collectives FlatQuant adds (statistics, gradients,
losses) and parameter writes every rank agrees on. What works around llm-compressor
0.14 (dataset sharding, weight-qparam sync) is in :mod:`flatquant_modifier.compat`.

Every helper is a no-op without an initialised process group.
"""

import os

import torch
import torch.distributed as dist
from compressed_tensors.distributed import (
    as_broadcastable,
    init_dist,
    is_distributed,
    is_source_process,
)
from compressed_tensors.utils import update_offload_parameter
from torch import nn

__all__ = [
    "init_distributed",
    "is_distributed",
    "is_source_process",
    "get_rank",
    "barrier",
    "all_gather_varlen",
    "all_reduce_",
    "broadcast_",
    "write_parameters",
]

def init_distributed() -> bool:
    """
    Join the process group ``torchrun`` describes in the environment:
    compressed-tensors' ``init_dist`` on an accelerator (NCCL on CUDA), gloo on a
    CPU-only host (``init_dist`` needs an accelerator). Returns whether the run is
    distributed; without ``torchrun`` nothing happens.
    """
    if is_distributed():
        return True
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    if torch.accelerator.is_available():
        init_dist()
    else:
        dist.init_process_group(backend="gloo", init_method="env://")
    return True


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_gather_varlen(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's 1-D ``tensor`` (lengths may differ), in rank order, on the CPU."""
    if not is_distributed():
        return [tensor.cpu()]
    device = _comm_device(tensor)
    length = torch.tensor([tensor.numel()], device=device)
    lengths = [torch.zeros_like(length) for _ in range(dist.get_world_size())]
    dist.all_gather(lengths, length)
    size = int(max(lengths))
    padded = torch.zeros(size, dtype=tensor.dtype, device=device)
    padded[: tensor.numel()] = tensor.to(device)
    gathered = [torch.zeros_like(padded) for _ in lengths]
    dist.all_gather(gathered, padded)
    return [g[: int(n)].cpu() for g, n in zip(gathered, lengths)]


def barrier():
    if is_distributed():
        dist.barrier()


def _comm_device(tensor: torch.Tensor) -> torch.device:
    """NCCL reduces accelerator tensors only; gloo takes CPU tensors."""
    if dist.get_backend() == "gloo":
        return torch.device("cpu")
    if tensor.device.type != "cpu":
        return tensor.device
    return torch.device(torch.accelerator.current_accelerator().type,
                        torch.accelerator.current_device_index())


def _comm_buffer(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself if a collective can take it, else a contiguous copy on the
    backend's device (collectives refuse non-contiguous tensors, e.g. transposed)."""
    device = _comm_device(tensor)
    if tensor.device == device and tensor.is_contiguous():
        return tensor
    return tensor.to(device, memory_format=torch.contiguous_format)


def all_reduce_(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of ``tensor`` (moved to the backend's device and back)."""
    if not is_distributed():
        return tensor
    buffer = _comm_buffer(tensor)
    dist.all_reduce(buffer, op=op)
    if buffer is not tensor:
        tensor.copy_(buffer)
    return tensor


@torch.no_grad()
def write_parameters(updates: list[tuple[nn.Module, str, torch.Tensor]]):
    """
    Write new values of existing parameters on every rank:
    ``update_offload_parameter(module, name, value)`` for each update.

    Under ``torch.distributed`` the sequential pipeline keeps the model in CPU memory
    shared by all ranks (compressed-tensors' ``DistributedCPUCache``), while each rank
    may hold its own onloaded copy. So every rank computes the values before anyone
    writes (a value rewritten by another rank must not be read and transformed a second
    time), takes rank 0's values (bit-identical writes to the shared copy), writes its
    own copies, and waits until all ranks have written.
    """
    if not is_distributed():
        for module, name, value in updates:
            update_offload_parameter(module, name, value)
        return
    dist.barrier()
    for module, name, value in updates:
        update_offload_parameter(module, name, broadcast_(value.detach().clone()))
    dist.barrier()


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s ``tensor`` on every rank (in place)."""
    if not is_distributed():
        return tensor
    buffer = _comm_buffer(tensor)
    dist.broadcast(as_broadcastable(buffer), src=src)
    if buffer is not tensor:
        tensor.copy_(buffer)
    return tensor
