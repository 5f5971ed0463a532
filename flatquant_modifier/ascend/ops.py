"""
Pure-PyTorch reference of the Ascend NPU ops that vllm-ascend's
``W4A4_FLATQUANT_DYNAMIC`` and ``W8A8_DYNAMIC`` linear methods call, for CPU and CUDA; with ``torch_npu``
importable and an NPU present (or ``use_npu=True``), the real ops are called instead.

Documented semantics (CANN ``aclnnFlatQuant`` / ``torch_npu.npu_kronecker_quant`` and
``npu_quant_matmul``):

* ``kronecker_quant(x [K, M, N], P1 [M, M], P2 [N, N], clip_ratio)``: per token
  ``y = P1 @ (x @ P2)``; ``scale = max|y| * clip_ratio / 7``; int4 values
  ``round(y / scale)`` saturated to [-8, 7]; returned packed 8 per int32 (two's
  complement nibbles, low nibble first) with the float32 per-token scales ``[K]``.
* ``dynamic_quant(x [..., k])``: per token ``scale = max|x| / 127``, int8 values
  ``round(x / scale)`` (``npu_dynamic_quant``), with the per-token scales.
* ``quant_matmul(x1 [m, k/8] int32, x2 [k/8, n] int32 (a transposed view of the packed
  [n, k/8] weight), scale [n], pertoken_scale [m])``: ``(x1 @ x2) * scale *
  pertoken_scale`` in float32, cast to ``output_dtype``; the same for int8 operands
  ``x1 [m, k]`` and ``x2 [k, n]``.

Rounding is half to even (``torch.round``), the same as the quantizer we train with.
"""

import importlib.util

import torch

from flatquant_modifier.formats import (
    E8M0_BIAS,
    FP4_E2M1_VALUES,
    INT4_MAX,
    INT4_MIN,
    INT8_MAX,
    INT8_MIN,
    MX_GROUP_SIZE,
)
from flatquant_modifier.quantize import quantize_mxfp4
from flatquant_modifier.kronecker import get_decompose_dim

__all__ = [
    "KRONECKER_QUANT_MAX_BATCH_SIZE",
    "get_decompose_dim",
    "npu_available",
    "pack_int4",
    "unpack_int4",
    "pack_int4_offset_binary",
    "unpack_int4_offset_binary",
    "kronecker_quant",
    "dynamic_quant",
    "quant_matmul",
    "e2m1_codes",
    "pack_fp4",
    "unpack_fp4",
    "kronecker_quant_mxfp4",
    "quant_mx_matmul",
]

# vllm-ascend chunks npu_kronecker_quant calls to at most this many tokens
KRONECKER_QUANT_MAX_BATCH_SIZE = 8192


def npu_available() -> bool:
    """``torch_npu`` importable and an NPU device present."""
    if importlib.util.find_spec("torch_npu") is None:
        return False
    import torch_npu  # noqa: F401

    return hasattr(torch, "npu") and torch.npu.is_available()


def _require_npu():
    if importlib.util.find_spec("torch_npu") is None:
        raise RuntimeError(
            "use_npu=True needs torch_npu (pip install flatquant-modifier[npu]) and an "
            "Ascend NPU; use_npu=None picks the PyTorch reference when they are missing"
        )
    import torch_npu

    return torch_npu


def _check_int4(values: torch.Tensor):
    if values.shape[-1] % 8 != 0:
        raise ValueError(
            f"int4 packing needs the last dimension divisible by 8, got {values.shape[-1]}"
        )
    if values.numel() and (values.min() < INT4_MIN or values.max() > INT4_MAX):
        raise ValueError("int4 values must lie in [-8, 7]")


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """
    NPU layout: 8 int4 per int32 along the last dimension, two's complement nibbles,
    element ``i`` in bits ``4i..4i+3`` (low nibble first); ``[..., k] -> [..., k/8]``.
    """
    _check_int4(values)
    nibbles = (values.to(torch.int64) & 0xF).reshape(*values.shape[:-1], -1, 8)
    shifts = torch.arange(0, 32, 4, device=values.device, dtype=torch.int64)
    packed = (nibbles << shifts).sum(dim=-1)
    return _to_int32(packed)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``[..., k/8] int32 -> [..., k] int8``."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int64)
    nibbles = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF
    values = torch.where(nibbles >= 8, nibbles - 16, nibbles)
    return values.reshape(*packed.shape[:-1], -1).to(torch.int8)


def pack_int4_offset_binary(values: torch.Tensor) -> torch.Tensor:
    """
    vllm-ascend's CPU fallback ``pack_int4_to_int32`` (its W4A4 FlatQuant linear method): nibble ``v + 8``
    (offset binary), low nibble first. A different bit pattern from :func:`pack_int4`;
    vllm-ascend only uses it when ``npu_convert_weight_to_int4pack`` is unavailable.
    """
    _check_int4(values)
    nibbles = (values.to(torch.int64) + 8).reshape(*values.shape[:-1], -1, 8)
    shifts = torch.arange(0, 32, 4, device=values.device, dtype=torch.int64)
    return _to_int32((nibbles << shifts).sum(dim=-1))


def unpack_int4_offset_binary(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4_offset_binary`."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int64)
    nibbles = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF
    return (nibbles - 8).reshape(*packed.shape[:-1], -1).to(torch.int8)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 bit patterns held in int64 -> the same bits as int32."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def kronecker_quant(
    x: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    clip_ratio: float = 1.0,
    use_npu: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    ``npu_kronecker_quant(x, left, right, clip_ratio=..., dst_dtype=torch.int32)``.

    :param x: ``[K, M, N]`` activations (one ``M x N`` matrix per token)
    :param left: ``[M, M]``, multiplied from the left (vllm-ascend passes the stored
        ``left_trans`` transposed)
    :param right: ``[N, N]``, multiplied from the right
    :return: ``(packed int32 [K, M, N/8], scale float32 [K])``
    """
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
    if use_npu or (use_npu is None and x.device.type == "npu"):
        return _require_npu().npu_kronecker_quant(
            x, left, right, clip_ratio=clip_ratio, dst_dtype=torch.int32
        )
    if x.ndim != 3 or left.shape != (x.shape[1],) * 2 or right.shape != (x.shape[2],) * 2:
        raise ValueError(
            f"kronecker_quant: x {tuple(x.shape)} needs left [M, M] and right [N, N], "
            f"got {tuple(left.shape)} and {tuple(right.shape)}"
        )
    if x.shape[2] % 8 != 0:
        raise ValueError(
            f"npu_kronecker_quant packs int4 along N and needs N % 8 == 0, got N={x.shape[2]}"
        )
    dtype = torch.promote_types(x.dtype, torch.float32)  # at least float32
    y = torch.matmul(left.to(dtype), torch.matmul(x.to(dtype), right.to(dtype)))
    amax = y.abs().amax(dim=(1, 2))
    scale = amax * clip_ratio / INT4_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(y / safe[:, None, None]), INT4_MIN, INT4_MAX)
    return pack_int4(q.to(torch.int8)), scale


def dynamic_quant(x: torch.Tensor, use_npu: bool | None = None):
    """
    ``npu_dynamic_quant(x, dst_type=torch.int8)``: symmetric per-token int8.

    :return: ``(int8 values like x, scale [x.shape[:-1]])``, the scale float32 (at
        least: float64 for a float64 ``x``)
    """
    if use_npu or (use_npu is None and x.device.type == "npu"):
        return _require_npu().npu_dynamic_quant(x, dst_type=torch.int8)
    y = x.to(torch.promote_types(x.dtype, torch.float32))
    scale = y.abs().amax(dim=-1) / INT8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(y / safe.unsqueeze(-1)), INT8_MIN, INT8_MAX)
    return q.to(torch.int8), scale


def quant_matmul(
    x1: torch.Tensor,
    x2: torch.Tensor,
    scale: torch.Tensor,
    pertoken_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    output_dtype: torch.dtype = torch.bfloat16,
    use_npu: bool | None = None,
) -> torch.Tensor:
    """
    ``npu_quant_matmul(x1, x2, scale, pertoken_scale=..., bias=..., output_dtype=...)``
    for packed int4 or for int8 operands.

    :param x1: ``[m, k/8]`` int32 (packed activations) or ``[m, k]`` int8
    :param x2: ``[k/8, n]`` int32: the transpose of the packed ``[n, k/8]`` weight, or
        ``[k, n]`` int8
    :param scale: ``[n]`` float32 weight scales
    :param pertoken_scale: ``[m]`` float32 activation scales
    """
    if use_npu or (use_npu is None and x1.device.type == "npu"):
        return _require_npu().npu_quant_matmul(
            x1, x2, scale, pertoken_scale=pertoken_scale, bias=bias,
            output_dtype=output_dtype,
        )
    dtype = torch.promote_types(pertoken_scale.dtype, torch.float32)  # at least float32
    if x1.dtype == torch.int8:
        # int8 sums exceed float32's integers: accumulate exactly in float64
        acc = (x1.double() @ x2.double()).to(dtype)
    else:
        a = unpack_int4(x1).to(dtype)  # [m, k]; integer products are exact in float32
        w = unpack_int4(x2.transpose(0, 1)).to(dtype)  # [n, k]
        acc = a @ w.T
    out = acc * scale.to(dtype)[None, :] * pertoken_scale.to(dtype)[:, None]
    if bias is not None:
        out = out + bias.to(dtype)
    return out.to(output_dtype)


# --------------------------------------------------------------- MXFP4 (Ascend 950)


def e2m1_codes(values: torch.Tensor) -> torch.Tensor:
    """4-bit E2M1 codes of values on the E2M1 grid: bit 3 the sign, bits 0-2 the index
    of the magnitude in ``0, 0.5, 1, 1.5, 2, 3, 4, 6``; -0 is 0."""
    grid = torch.tensor(FP4_E2M1_VALUES, device=values.device, dtype=torch.float64)
    magnitude = values.abs().double()
    index = torch.searchsorted(grid, magnitude)
    if not torch.equal(grid[index.clamp(max=len(grid) - 1)], magnitude):
        raise ValueError("e2m1_codes: values must lie on the E2M1 grid")
    return torch.where(values < 0, index + 8, index).to(torch.uint8)


def pack_fp4(values: torch.Tensor) -> torch.Tensor:
    """E2M1 values ``[..., k]`` -> uint8 ``[..., k/2]``, element ``2i`` in the low nibble
    (msModelSlim's packing, and what vllm-ascend's MXFP4 unpacking reads)."""
    if values.shape[-1] % 2:
        raise ValueError(f"FP4 packing needs an even last dimension, got {values.shape[-1]}")
    codes = e2m1_codes(values).reshape(*values.shape[:-1], -1, 2)
    return (codes[..., 0] | (codes[..., 1] << 4)).to(torch.uint8)


def unpack_fp4(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`pack_fp4`: uint8 ``[..., k/2]`` -> E2M1 values ``[..., k]``."""
    grid = torch.tensor(FP4_E2M1_VALUES, device=packed.device, dtype=dtype)
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)
    magnitude = grid[(codes & 0x7).long()]
    return torch.where(codes >= 8, -magnitude, magnitude)


def kronecker_quant_mxfp4(
    x: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    clip_ratio: float = 1.0,
    intermediate_dtype: torch.dtype | None = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    ``npu_kronecker_quant(x, left, right, clip_ratio, dst_dtype=float4_e2m1fn_x2)`` as
    the open-source Ascend 950 kernels compute it: ``T1 = x @ right`` rounded to
    ``x``'s dtype, ``T2 = left @ T1`` rounded to bfloat16 (``intermediate_dtype``; None
    keeps full precision, for exact comparisons), then MXFP4 per 32 consecutive values
    of each token (:func:`flatquant_modifier.quantize.quantize_mxfp4`). ``clip_ratio``
    must lie in (0, 1] but is not applied.

    :param x: ``[K, L, R]``; ``left`` ``[L, L]`` (vllm-ascend passes the stored
        ``left_trans`` transposed), ``right`` ``[R, R]``
    :return: ``(packed uint8 [K, L*R/2], scale uint8 [K, ceil(L*R/64), 2])``, the scale
        bytes of groups ``2j`` and ``2j + 1`` at ``[:, j, 0]`` and ``[:, j, 1]`` (0 past
        the last group)
    """
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
    tokens, m, n = x.shape
    if (m * n) % MX_GROUP_SIZE:
        raise ValueError(f"L * R = {m * n} is not a multiple of {MX_GROUP_SIZE}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    t1 = torch.matmul(x.to(dtype), right.to(dtype)).to(x.dtype).to(dtype)
    t2 = torch.matmul(left.to(dtype), t1)
    if intermediate_dtype is not None:
        t2 = t2.to(intermediate_dtype).to(dtype)
    values, scale_byte = quantize_mxfp4(t2.reshape(tokens, m * n))
    groups = scale_byte.shape[-1]
    scale = torch.zeros(tokens, 2 * ((groups + 1) // 2), dtype=torch.uint8, device=x.device)
    scale[:, :groups] = scale_byte.to(torch.uint8)
    return pack_fp4(values), scale.reshape(tokens, -1, 2)


def quant_mx_matmul(
    x1: torch.Tensor,
    x2: torch.Tensor,
    x2_scale: torch.Tensor,
    x1_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    output_dtype: torch.dtype = torch.bfloat16,
    group_size: int = MX_GROUP_SIZE,
) -> torch.Tensor:
    """
    ``npu_quant_matmul`` on MXFP4 operands with ``group_sizes=[1, 1, group_size]``:
    ``out[m, n] = sum_k x1[m, k] * 2^(s1[m, k/32] - 127) * x2[k, n] * 2^(s2[k/32, n] - 127)``
    (+ bias), accumulated in float32 (float64 for float64 output).

    :param x1: uint8 ``[m, k/2]`` packed activations, ``x1_scale`` uint8 ``[m, k/64, 2]``
    :param x2: uint8 ``[k/2, n]``: the transpose of the packed ``[n, k/2]`` weight;
        ``x2_scale`` uint8 ``[k/64, n, 2]``: the transpose of the ``[n, k/64, 2]`` view
        of the stored ``[n, k/32]`` weight scale
    """
    dtype = torch.float64 if output_dtype == torch.float64 else torch.float32
    a = unpack_fp4(x1, dtype)  # [m, k]
    w = unpack_fp4(x2.transpose(0, 1), dtype)  # [n, k]
    k = a.shape[-1]
    a_scale = torch.exp2(x1_scale.reshape(x1.shape[0], -1)[:, : k // group_size].to(dtype)
                         - E8M0_BIAS)
    w_scale = torch.exp2(x2_scale.transpose(0, 1).reshape(w.shape[0], -1)[:, : k // group_size]
                         .to(dtype) - E8M0_BIAS)
    a = a * a_scale.repeat_interleave(group_size, dim=-1)
    w = w * w_scale.repeat_interleave(group_size, dim=-1)
    out = a @ w.T
    if bias is not None:
        out = out + bias.to(dtype)
    return out.to(output_dtype)
