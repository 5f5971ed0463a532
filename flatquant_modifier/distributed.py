"""
Data-parallel FlatQuant calibration under ``torchrun``, on llm-compressor's own
distributed engine: its sampler gives every rank a contiguous shard of the
calibration samples, and each rank runs the sequential pipeline on its shard. Here:
the collectives FlatQuant adds (statistics, gradients, losses) and the weight
quantization parameters that llm-compressor leaves unsynchronised on CPU.

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
from loguru import logger
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
    "shard_dataset",
    "write_parameters",
    "mark_weight_qparams_unset",
    "sync_weight_qparams",
]

# weight quantization parameters llm-compressor's modifiers compute on one rank
WEIGHT_QPARAMS = ("weight", "weight_scale", "weight_zero_point", "weight_global_scale",
                  "weight_g_idx")


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


def shard_dataset(dataset):
    """
    This rank's contiguous shard of a ``datasets.Dataset`` (the whole dataset when not
    distributed), split as llm-compressor's ``get_rank_partition`` splits a dataset
    split. Pass it to ``oneshot(dataset=..., num_calibration_samples=len(shard))`` on
    every rank: llm-compressor 0.14's sampler selects a rank's partition but its
    dataloader then indexes the whole dataset, so without sharding every rank
    calibrates on the same first ``1/world_size`` of the samples.
    """
    if not is_distributed():
        return dataset
    rank, world = dist.get_rank(), dist.get_world_size()
    start = len(dataset) * rank // world
    end = len(dataset) * (rank + 1) // world
    return dataset.select(range(start, end))


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


def _weight_quantized(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, module)
        for name, module in model.named_modules()
        if getattr(getattr(module, "quantization_scheme", None), "weights", None) is not None
        and isinstance(getattr(module, "weight_scale", None), torch.Tensor)
    ]


@torch.no_grad()
def mark_weight_qparams_unset(model: nn.Module):
    """
    Fill every ``weight_scale`` with NaN before any modifier computes it, so that
    :func:`sync_weight_qparams` can tell which rank computed which module.
    """
    if not is_distributed():
        return
    for _, module in _weight_quantized(model):
        update_offload_parameter(
            module, "weight_scale", torch.full_like(module.weight_scale, float("nan"))
        )


@torch.no_grad()
def sync_weight_qparams(model: nn.Module):
    """
    Give every rank the weight quantization parameters (and the weight, which GPTQ
    changes) of the rank that computed them.

    llm-compressor's modifiers split the weight quantization of a layer across ranks
    and broadcast the results, but skip modules that execute on the CPU
    (``broadcast_qparams_and_cleanup(skip_cpu=True)``): on a CPU-only run the other
    ranks keep uninitialised scales, and rank 0 would save garbage. A module's owner is
    the lowest rank whose ``weight_scale`` is no longer the NaN of
    :func:`mark_weight_qparams_unset`; modules every rank already holds are skipped.

    :raises RuntimeError: naming the module if no rank computed its scale
    """
    if not is_distributed():
        return
    modules = _weight_quantized(model)
    if not modules:
        return
    world = dist.get_world_size()
    rank = dist.get_rank()
    computed = torch.tensor(
        [bool(module.weight_scale.float().isfinite().all()) for _, module in modules],
        dtype=torch.int64,
    )
    flags = torch.zeros(world, len(modules), dtype=torch.int64)
    flags[rank] = computed
    all_reduce_(flags)
    synced = 0
    for index, (name, module) in enumerate(modules):
        column = flags[:, index]
        if bool(column.all()):
            continue
        if not bool(column.any()):
            raise RuntimeError(
                f"no rank computed the weight quantization parameters of {name}; "
                "its weight quantizer did not run on it (check the recipe's targets)"
            )
        owner = int(column.nonzero()[0])
        for key in WEIGHT_QPARAMS:
            value = getattr(module, key, None)
            if not isinstance(value, torch.Tensor):
                continue
            received = broadcast_(value.detach().clone(), src=owner)
            if rank != owner:
                update_offload_parameter(module, key, received)
        synced += 1
    if synced:
        logger.info(f"FlatQuant: synchronised the weight qparams of {synced} modules "
                    "across ranks")
