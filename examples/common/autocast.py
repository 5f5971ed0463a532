"""The examples' precision choices on a CPU."""

import torch

from flatquant_modifier.options import cpu_has_native_bfloat16


def bfloat16_on_native_cpus(modifier, device: str | torch.device):
    """
    Train ``modifier`` (a FlatQuantModifier left at ``autocast_dtype="auto"``) in
    bfloat16 autocast on a CPU with native bfloat16 (AVX512-BF16, AMX, Arm BF16), where
    it is faster than float32 at the same quality; elsewhere leave it as it is. The
    library's ``"auto"`` means bfloat16 on CUDA only.
    """
    if modifier.autocast_dtype == "auto" and _native_bfloat16_cpu(device):
        modifier.autocast_dtype = torch.bfloat16


def model_dtype(requested: str, device: str | torch.device) -> torch.dtype:
    """
    The dtype to load the model in: ``requested`` ("float32", "bfloat16"), or for
    "auto" bfloat16 on a CPU with native bfloat16 (its matmuls about 2.8x faster than
    float32 on an AVX512-BF16 core; the pipeline's layer passes and the perplexity
    evaluations run in the model's dtype) and float32 elsewhere (an AVX2 CPU emulates
    bfloat16; on a GPU FlatQuant trains in bfloat16 autocast on float32 weights).
    """
    if requested != "auto":
        return getattr(torch, requested)
    return torch.bfloat16 if _native_bfloat16_cpu(device) else torch.float32


def _native_bfloat16_cpu(device: str | torch.device) -> bool:
    return torch.device(device).type == "cpu" and cpu_has_native_bfloat16()
