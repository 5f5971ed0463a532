"""The examples' autocast choice on a CPU."""

import torch

from flatquant_modifier.options import cpu_has_native_bfloat16


def bfloat16_on_native_cpus(modifier, device: str | torch.device):
    """
    Train ``modifier`` (a FlatQuantModifier left at ``autocast_dtype="auto"``) in
    bfloat16 autocast on a CPU with native bfloat16 (AVX512-BF16, AMX, Arm BF16), where
    it is faster than float32 at the same quality; elsewhere leave it as it is. The
    library's ``"auto"`` means bfloat16 on CUDA only.
    """
    if (modifier.autocast_dtype == "auto" and torch.device(device).type == "cpu"
            and cpu_has_native_bfloat16()):
        modifier.autocast_dtype = torch.bfloat16
