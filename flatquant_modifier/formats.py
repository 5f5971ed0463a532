"""
Facts of the target formats, in one place: integer ranges and packing, NVFP4's
constants, the limits of vllm-ascend's ``npu_kronecker_quant``, and which linears
vLLM and vllm-ascend fuse into one (siblings that share one transform, one quant
type and, under tensor-group schemes, one global scale).
"""

import re

import torch
from torch.nn import Linear, Module

from flatquant_modifier.kronecker import MX_MAX_FACTOR, get_decompose_dim, mxfp4_trans_dims

__all__ = [
    "int_range",
    "INT4_MIN",
    "INT4_MAX",
    "INT8_MIN",
    "INT8_MAX",
    "W4A4_FLATQUANT_DYNAMIC",
    "W8A8_DYNAMIC",
    "FLOAT",
    "INT4_PER_INT32",
    "FP4_MAX",
    "FP4_E2M1_VALUES",
    "MX_GROUP_SIZE",
    "E8M0_BIAS",
    "W4A4_MXFP4_FLATQUANT",
    "FP8_E4M3_MAX",
    "NVFP4_GROUP_SIZE",
    "NPU_MAX_FACTOR",
    "FUSED_SIBLINGS",
    "MOE_METHODS",
    "ASCEND_FLOAT_ONLY",
    "expert_of",
    "SHARED_EXPERTS",
    "shared_experts_problem",
    "CHECKPOINT_NAMES",
    "checkpoint_name",
    "npu_kronecker_problem",
    "ROW_PARALLEL",
    "is_row_parallel",
    "mxfp4_problem",
    "is_mxfp4_weights",
    "is_int_channel_symmetric",
]


def int_range(num_bits: int) -> tuple[int, int]:
    """Signed integer range ``(qmin, qmax)``, e.g. ``(-8, 7)`` for 4 bits."""
    return -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1


INT4_MIN, INT4_MAX = int_range(4)
INT8_MIN, INT8_MAX = int_range(8)
# the NPU packs int4 activations and weights 8 per int32 along the input dimension
INT4_PER_INT32 = 8

# NVFP4 (compressed-tensors' TENSOR_GROUP FP4): E2M1 values, E4M3 group scales
FP4_MAX, FP8_E4M3_MAX, NVFP4_GROUP_SIZE = 6.0, 448.0, 16
# FP4 E2M1 magnitudes by code 0..7 (code 8 + i: the negative of value i)
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# MXFP4 (OCP MX): E2M1 values in groups of 32 sharing an E8M0 power-of-two scale,
# stored as its biased exponent (value 2 ** (byte - 127))
MX_GROUP_SIZE, E8M0_BIAS = 32, 127

# npu_kronecker_quant (aclnnFlatQuant, CANN 8.5): Kronecker factors M, N at most 256,
# N a multiple of 8 (int4 output packed into int32)
NPU_MAX_FACTOR = 256

# vllm-ascend's quant types (quant_model_description.json), per linear:
# npu_kronecker_quant (learned Kronecker transform, int4 per token) + int4 weights
W4A4_FLATQUANT_DYNAMIC = "W4A4_FLATQUANT_DYNAMIC"
# npu_dynamic_quant (int8 per token, scale max|x| / 127) + int8 per-channel weights
W8A8_DYNAMIC = "W8A8_DYNAMIC"
# npu_kronecker_quant to MXFP4 (e8m0 scales per 32 values) + MXFP4 weights (Ascend 950)
W4A4_MXFP4_FLATQUANT = "W4A4_MXFP4_FLATQUANT"
FLOAT = "FLOAT"  # unquantized

# fused layer -> the linears vLLM / vllm-ascend load into it (same parent module)
FUSED_SIBLINGS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "w13": ("w1", "w3"),  # Mixtral-style experts
    "fused_qkv_a_proj": ("q_a_proj", "kv_a_proj_with_mqa"),  # DeepSeek MLA
}


# vllm-ascend runs the routed experts of one MoE block as one FusedMoE layer of one
# quant type, looked up on expert 0; its MoE methods have no FlatQuant transform. The
# ones this package writes:
MOE_METHODS = (W8A8_DYNAMIC,)
_EXPERT = re.compile(r"^(?P<block>.*\.experts)\.(?P<index>\d+)\.(?P<proj>[^.]+)$")

# linears vllm-ascend runs unquantized only, and why
ASCEND_FLOAT_ONLY = {
    "kv_b_proj": "vllm-ascend's MLA attention splits its weight unquantized (W_UK, W_UV)",
    "shared_expert_gate": "vLLM builds Qwen2-MoE's shared-expert gate without quantization",
}

# the shared experts of an MoE block (Qwen2-MoE, DeepSeek), beside its routed `experts`
SHARED_EXPERTS = ("shared_expert", "shared_experts")


def shared_experts_problem(block: Module, name: str, types: dict[str, str],
                           routed: str) -> str | None:
    """
    Why vllm-ascend cannot serve the shared experts of the MoE block ``block`` (named
    ``name``; ``types``: the quant type of its linears by full name, FLOAT if absent)
    beside routed experts of type ``routed``, or None. With int8 routed experts
    vllm-ascend runs quantized shared experts through its own int8 path
    (``AscendSharedExperts``): int8 weights only, and without the sigmoid gate of
    Qwen2-MoE's ``shared_expert_gate``.
    """
    gated = hasattr(block, "shared_expert_gate")
    for child in SHARED_EXPERTS:
        if not hasattr(block, child):
            continue
        kinds = {types.get(n, FLOAT) for n, m in getattr(block, child).named_modules(
            prefix=f"{name}.{child}") if isinstance(m, Linear)}
        for kind in sorted(kinds):
            if problem := _shared_expert_problem(kind, routed, gated):
                return f"{name}.{child} is {kind} and {problem}"
    return None


def _shared_expert_problem(shared: str, routed: str, gated: bool) -> str | None:
    if routed != W8A8_DYNAMIC or shared == FLOAT:
        return None
    if shared != W8A8_DYNAMIC:
        return (
            f"beside {routed} routed experts vllm-ascend runs quantized shared experts "
            f"through its int8 shared-expert path, which cannot run {shared}"
        )
    if gated:
        return (
            "vllm-ascend's int8 shared-expert path (used beside W8A8_DYNAMIC routed "
            "experts) does not apply the shared expert's sigmoid gate"
        )
    return None


def expert_of(name: str) -> tuple[str, int, str] | None:
    """``(experts module, expert index, projection)`` of a routed expert's linear
    (``model.layers.3.mlp.experts.7.gate_proj`` -> ``("model.layers.3.mlp.experts", 7,
    "gate_proj")``), or None for any other module."""
    match = _EXPERT.match(name)
    return (match["block"], int(match["index"]), match["proj"]) if match else None


# vLLM loads some architectures by their original checkpoint names, which transformers
# 5 renames at load (Mixtral: block_sparse_moe -> mlp, experts' w1/w3/w2 -> gate/up/
# down_proj): model_type -> {transformers name component: checkpoint name component}
CHECKPOINT_NAMES = {
    "mixtral": {"mlp": "block_sparse_moe", "gate_proj": "w1", "up_proj": "w3",
                "down_proj": "w2"},
}


def checkpoint_name(key: str, model_type: str | None, reverse: bool = False) -> str:
    """``key`` (a module or tensor name of the transformers model) as vLLM's loader of
    ``model_type`` names it; ``reverse`` maps a checkpoint name back."""
    names = CHECKPOINT_NAMES.get(model_type or "", {})
    if reverse:
        names = {v: k for k, v in names.items()}
    return ".".join(names.get(part, part) for part in key.split("."))


def npu_kronecker_problem(in_features: int) -> str | None:
    """Why vllm-ascend's ``W4A4_FLATQUANT_DYNAMIC`` cannot run a linear with
    ``in_features`` inputs (its transform factors come from ``get_decompose_dim``),
    or None when it can."""
    if in_features % INT4_PER_INT32 != 0:
        return (
            f"in_features={in_features} is not divisible by {INT4_PER_INT32} "
            "(int4 activations are packed 8 per int32)"
        )
    m, n = get_decompose_dim(in_features)
    if n % INT4_PER_INT32 != 0 or max(m, n) > NPU_MAX_FACTOR:
        return (
            f"in_features={in_features} decomposes as {m} x {n}; npu_kronecker_quant "
            f"needs N % {INT4_PER_INT32} == 0 and M, N <= {NPU_MAX_FACTOR}"
        )
    return None


# linears vLLM builds as RowParallelLinear in the supported architectures (input split
# across tensor-parallel ranks): W4A4_MXFP4_FLATQUANT sizes their transforms by rank
ROW_PARALLEL = ("o_proj", "down_proj")


def is_row_parallel(name: str) -> bool:
    """Whether vLLM splits the input of the linear ``name`` across ranks."""
    return name.rpartition(".")[2] in ROW_PARALLEL


def mxfp4_problem(in_features: int, row_parallel: bool, max_supported_tp: int) -> str | None:
    """Why vllm-ascend's ``W4A4_MXFP4_FLATQUANT`` cannot run a linear with
    ``in_features`` inputs (its transform sizes come from its ``get_decompose_dim``,
    :func:`~flatquant_modifier.kronecker.mxfp4_trans_dims`), or None when it can."""
    pair = 2 * MX_GROUP_SIZE
    if in_features % pair:
        return (f"in_features={in_features} is not a multiple of {pair} (MXFP4 weight "
                f"scales per {MX_GROUP_SIZE} values are read in pairs)")
    if row_parallel and in_features % (max_supported_tp * pair):
        return (f"in_features={in_features} does not split into max_supported_tp="
                f"{max_supported_tp} rank shares that are multiples of {pair}")
    try:
        left, right = mxfp4_trans_dims(in_features, row_parallel, max_supported_tp)
    except ValueError as error:
        return str(error)
    if left * right != in_features or max(left, right) > MX_MAX_FACTOR:
        return (f"vllm-ascend sizes its transform {left} x {right} for in_features="
                f"{in_features}; npu_kronecker_quant needs the product to be the input "
                f"size and both factors at most {MX_MAX_FACTOR}")
    if row_parallel and left % max_supported_tp:
        return (f"left_trans of size {left} does not split into max_supported_tp="
                f"{max_supported_tp} diagonal blocks")
    return None


def is_mxfp4_weights(weights) -> bool:
    """Whether compressed-tensors weight args are its MXFP4 scheme (FP4 E2M1, groups of
    32, E8M0 ``uint8`` scales, symmetric): what W4A4_MXFP4_FLATQUANT stores."""
    return (
        weights is not None
        and weights.num_bits == 4
        and weights.type == "float"
        and weights.strategy == "group"
        and weights.group_size == MX_GROUP_SIZE
        and weights.symmetric
        and weights.scale_dtype == torch.uint8
    )


def is_int_channel_symmetric(weights, num_bits: int) -> bool:
    """Whether compressed-tensors weight args (``scheme.weights``) are the integer,
    per-output-channel, symmetric quantization vllm-ascend's int methods store."""
    return (
        weights is not None
        and weights.num_bits == num_bits
        and weights.type == "int"
        and weights.symmetric
        and weights.strategy == "channel"
    )
