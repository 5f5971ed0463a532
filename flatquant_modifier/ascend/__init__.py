"""Ascend NPU deployment: a faithful reference of the NPU ops, the export for
vllm-ascend (W4A4_FLATQUANT_DYNAMIC or W4A4_MXFP4_FLATQUANT, W8A8_DYNAMIC, FLOAT per
tensor), and a reference
loader to evaluate it without an NPU."""

from flatquant_modifier.ascend.export import (
    AscendExportError,
    save_ascend_checkpoint,
)
from flatquant_modifier.ascend.ops import (
    dynamic_quant,
    kronecker_quant,
    npu_available,
    pack_int4,
    pack_int4_offset_binary,
    quant_matmul,
    unpack_int4,
    unpack_int4_offset_binary,
)
from flatquant_modifier.ascend.runtime import (
    AscendW4A4FlatQuantLinear,
    AscendW8A8DynamicLinear,
    load_ascend_model,
)

__all__ = [
    "AscendExportError",
    "AscendW4A4FlatQuantLinear",
    "AscendW8A8DynamicLinear",
    "dynamic_quant",
    "kronecker_quant",
    "load_ascend_model",
    "npu_available",
    "pack_int4",
    "pack_int4_offset_binary",
    "quant_matmul",
    "save_ascend_checkpoint",
    "unpack_int4",
    "unpack_int4_offset_binary",
]
