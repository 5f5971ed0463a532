"""
References of vllm-ascend's ``W4A4_FLATQUANT_DYNAMIC`` and ``W8A8_DYNAMIC`` linear
methods as ``torch.nn.Module``, and a loader that builds a transformers model from an
exported Ascend checkpoint with these modules, so the checkpoint can be evaluated
without an NPU.

Each module allocates the same parameters from (in, out) sizes, does the same
``process_weights_after_loading`` and the same ``apply``:

* ``W4A4_FLATQUANT_DYNAMIC``: pack the int4 weight, transpose ``left_trans``,
  ``clip_ratio.item()``; ``npu_kronecker_quant`` in chunks of 8192 tokens,
  ``npu_quant_matmul`` with per-token scales, then the bias.
* ``W8A8_DYNAMIC``: transpose the int8 weight, flatten the scales;
  ``npu_dynamic_quant``, ``npu_quant_matmul`` with per-token scales and the bias.
* ``W8A8_DYNAMIC`` MoE experts: the per-expert checkpoint tensors stacked into
  ``w13_weight`` [E, 2I, H] (gate then up) and ``w2_weight`` [E, H, I] with their
  [E, ., 1] scales, as vLLM's expert loader does; per expert, ``npu_dynamic_quant``,
  the int8 matmul, SwiGLU, ``npu_dynamic_quant`` again and the second matmul.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from flatquant_modifier.ascend.ops import (
    KRONECKER_QUANT_MAX_BATCH_SIZE,
    get_decompose_dim,
    dynamic_quant,
    kronecker_quant,
    kronecker_quant_mxfp4,
    pack_int4,
    quant_matmul,
    quant_mx_matmul,
)
from flatquant_modifier.formats import (
    FLOAT,
    MX_GROUP_SIZE,
    INT4_PER_INT32,
    W4A4_FLATQUANT_DYNAMIC,
    W4A4_MXFP4_FLATQUANT,
    W8A8_DYNAMIC,
    checkpoint_name,
    expert_of,
    is_row_parallel,
)
from flatquant_modifier.kronecker import mxfp4_trans_dims
from flatquant_modifier.loading import check_safetensors_files

__all__ = [
    "DESCRIPTION_FILE",
    "AscendW4A4FlatQuantLinear",
    "AscendW8A8DynamicLinear",
    "AscendW8A8DynamicMoE",
    "AscendW4A4MXFP4FlatQuantLinear",
    "load_ascend_model",
]

DESCRIPTION_FILE = "quant_model_description.json"
QUANTIZED_SUFFIXES = (
    "weight", "weight_scale", "weight_offset", "left_trans", "right_trans", "clip_ratio"
)


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    """An uninitialised, frozen parameter, as vLLM allocates them before loading."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def _int8_matmul(x, weight, scale, bias, use_npu):
    """``npu_dynamic_quant`` of ``x`` [tokens, k] and ``npu_quant_matmul`` with the
    int8 ``weight`` [k, n], its ``scale`` [n] and the per-token scales: what
    vllm-ascend's W8A8_DYNAMIC methods compute, linear and MoE alike."""
    x_q, pertoken = dynamic_quant(x, use_npu=use_npu)
    return quant_matmul(x_q, weight, scale, pertoken.reshape(-1), bias=bias,
                        output_dtype=x.dtype, use_npu=use_npu)


class _AscendLinear(nn.Module):
    """What vllm-ascend's int linear methods allocate alike: ``weight`` int8 [out, in],
    ``weight_scale`` and ``weight_offset`` [out, 1] in ``scale_dtype``, the bias in
    ``params_dtype``."""

    def __init__(self, in_features, out_features, bias, params_dtype, scale_dtype, use_npu):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.use_npu = use_npu
        self.weight = _param(out_features, in_features, dtype=torch.int8)
        self.weight_scale = _param(out_features, 1, dtype=scale_dtype)
        self.weight_offset = _param(out_features, 1, dtype=scale_dtype)
        self.bias = _param(out_features, dtype=params_dtype) if bias else None


class AscendW4A4FlatQuantLinear(_AscendLinear):
    """
    Mirrors vllm-ascend's W4A4_FLATQUANT_DYNAMIC linear: parameters as allocated by
    ``get_weight`` / ``get_pertensor_param`` / ``get_perchannel_param``; call
    :meth:`process_weights_after_loading` after loading them.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        params_dtype: torch.dtype = torch.bfloat16,
        use_npu: bool | None = None,
    ):
        if in_features % INT4_PER_INT32 != 0:
            raise ValueError(
                f"input_size ({in_features}) must be divisible by {INT4_PER_INT32} for "
                "int4 packing"
            )
        super().__init__(in_features, out_features, bias, params_dtype, torch.float32,
                         use_npu)
        m, n = get_decompose_dim(in_features)
        self.left_trans = _param(m, m, dtype=params_dtype)
        self.right_trans = _param(n, n, dtype=params_dtype)
        self.clip_ratio = _param(1, dtype=torch.float32)
        self.aclnn_clip_ratio: float | None = None

    @torch.no_grad()
    def process_weights_after_loading(self):
        packed = pack_int4(self.weight.data.to(torch.int32))  # [out, in / 8]
        self.weight_packed = nn.Parameter(packed, requires_grad=False)
        del self.weight
        self.weight_scale.data = self.weight_scale.data.float()
        self.weight_offset.data = self.weight_offset.data.float()
        self.left_trans = nn.Parameter(self.left_trans.data.t().contiguous(), requires_grad=False)
        self.clip_ratio.data = self.clip_ratio.data.float()
        self.aclnn_clip_ratio = self.clip_ratio.item()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.aclnn_clip_ratio is None:
            raise RuntimeError("call process_weights_after_loading() first")
        dtype, shape = x.dtype, x.shape
        m, n = self.left_trans.shape[0], self.right_trans.shape[0]
        if m * n != shape[-1]:
            raise ValueError(
                f"FlatQuant transform matrices dimension mismatch: M({m}) * N({n}) != "
                f"in_features({shape[-1]})"
            )
        left, right = self.left_trans.to(dtype), self.right_trans.to(dtype)
        tokens = x.reshape(-1, m, n)
        chunks = [
            kronecker_quant(
                tokens[i : i + KRONECKER_QUANT_MAX_BATCH_SIZE], left, right,
                self.aclnn_clip_ratio, use_npu=self.use_npu,
            )
            for i in range(0, tokens.shape[0], KRONECKER_QUANT_MAX_BATCH_SIZE)
        ]
        x_q = torch.cat([c[0] for c in chunks]).reshape(-1, m * n // 8)
        pertoken = torch.cat([c[1] for c in chunks]).reshape(-1)
        out = quant_matmul(
            x_q, self.weight_packed.t(), self.weight_scale.reshape(-1).float(),
            pertoken, bias=None, output_dtype=dtype, use_npu=self.use_npu,
        )
        out = out.reshape(*shape[:-1], -1)
        if self.bias is not None:
            out = out + self.bias.to(dtype)
        return out


class AscendW8A8DynamicLinear(_AscendLinear):
    """
    Mirrors vllm-ascend's W8A8_DYNAMIC linear: ``weight`` int8 [out, in],
    ``weight_scale`` and ``weight_offset`` [out, 1] in ``params_dtype`` (the offset is
    not used: symmetric), the bias in ``params_dtype``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        params_dtype: torch.dtype = torch.bfloat16,
        use_npu: bool | None = None,
    ):
        super().__init__(in_features, out_features, bias, params_dtype, params_dtype,
                         use_npu)
        self.processed = False

    @torch.no_grad()
    def process_weights_after_loading(self):
        self.weight.data = self.weight.data.transpose(0, 1).contiguous()  # [in, out]
        self.weight_scale.data = self.weight_scale.data.flatten()
        self.weight_offset.data = self.weight_offset.data.flatten()
        self.processed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.processed:
            raise RuntimeError("call process_weights_after_loading() first")
        out = _int8_matmul(x.reshape(-1, x.shape[-1]), self.weight, self.weight_scale,
                           self.bias, self.use_npu)
        return out.reshape(*x.shape[:-1], -1)


class AscendW8A8DynamicMoE(nn.Module):
    """
    Mirrors vllm-ascend's W8A8_DYNAMIC FusedMoE method in place of a transformers
    experts module (called as ``experts(hidden_states, top_k_index, top_k_weights)``,
    routing done by the model's own router): ``w13_weight`` int8 [E, 2I, H],
    ``w2_weight`` int8 [E, H, I], ``w13_weight_scale``/``w13_weight_offset`` [E, 2I, 1]
    and ``w2_weight_scale``/``w2_weight_offset`` [E, H, 1] in ``params_dtype``;
    :meth:`load_expert` places a checkpoint tensor of one expert as vLLM's loader does.
    """

    # checkpoint projection -> (parameter prefix, which half of w13; None: all of w2)
    _SHARDS = {"gate_proj": ("w13", 0), "up_proj": ("w13", 1), "down_proj": ("w2", None)}

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 act_fn: nn.Module, params_dtype: torch.dtype = torch.bfloat16,
                 use_npu: bool | None = None):
        super().__init__()
        e, h, i = num_experts, hidden_size, intermediate_size
        self.num_experts, self.intermediate_size, self.use_npu = e, i, use_npu
        self.act_fn = act_fn
        self.w13_weight = _param(e, 2 * i, h, dtype=torch.int8)
        self.w2_weight = _param(e, h, i, dtype=torch.int8)
        self.w13_weight_scale = _param(e, 2 * i, 1, dtype=params_dtype)
        self.w13_weight_offset = _param(e, 2 * i, 1, dtype=params_dtype)
        self.w2_weight_scale = _param(e, h, 1, dtype=params_dtype)
        self.w2_weight_offset = _param(e, h, 1, dtype=params_dtype)
        self.processed = False

    @torch.no_grad()
    def load_expert(self, index: int, proj: str, suffix: str, tensor: torch.Tensor):
        """``experts.<index>.<proj>.<suffix>`` of the checkpoint (``suffix``:
        weight, weight_scale or weight_offset)."""
        if proj not in self._SHARDS:
            raise ValueError(f"unknown expert projection {proj!r}")
        prefix, half = self._SHARDS[proj]
        target = getattr(self, f"{prefix}_{suffix}")[index]
        if half is not None:
            target = target[half * self.intermediate_size:(half + 1) * self.intermediate_size]
        if target.shape != tensor.shape:
            raise ValueError(f"experts.{index}.{proj}.{suffix}: shape {tuple(tensor.shape)}, "
                             f"expected {tuple(target.shape)}")
        target.copy_(tensor)

    @torch.no_grad()
    def process_weights_after_loading(self):
        e = self.num_experts
        self.w13_weight.data = self.w13_weight.data.transpose(1, 2).contiguous()  # [E, H, 2I]
        self.w2_weight.data = self.w2_weight.data.transpose(1, 2).contiguous()  # [E, I, H]
        for name in ("w13_weight_scale", "w13_weight_offset", "w2_weight_scale",
                     "w2_weight_offset"):
            getattr(self, name).data = getattr(self, name).data.view(e, -1)
        self.w13_weight_scale_fp32 = self.w13_weight_scale.data.float()
        self.processed = True

    def forward(self, hidden_states, top_k_index, top_k_weights):
        if not self.processed:
            raise RuntimeError("call process_weights_after_loading() first")
        out = torch.zeros_like(hidden_states)
        for expert in range(self.num_experts):
            token, slot = torch.where(top_k_index == expert)
            if token.numel() == 0:
                continue
            h = _int8_matmul(hidden_states[token], self.w13_weight[expert],
                             self.w13_weight_scale_fp32[expert], None, self.use_npu)
            gate, up = h.chunk(2, dim=-1)
            y = _int8_matmul(self.act_fn(gate) * up, self.w2_weight[expert],
                             self.w2_weight_scale[expert].float(), None, self.use_npu)
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


class AscendW4A4MXFP4FlatQuantLinear(nn.Module):
    """
    Mirrors vllm-ascend's ``W4A4_MXFP4_FLATQUANT`` linear method on one tensor-parallel
    rank (Ascend 950): ``weight`` uint8 [out, in/2] (two E2M1 codes per byte),
    ``weight_scale`` uint8 [out, in/32] (E8M0 bytes), ``left_trans`` [L, L] and
    ``right_trans`` [R, R] in ``params_dtype`` with ``(L, R)`` from
    :func:`flatquant_modifier.kronecker.mxfp4_trans_dims` (a row-parallel layer's over
    its whole input, split by ``max_supported_tp``), ``clip_ratio`` float32 [1]. After
    loading, a row-parallel rank keeps its diagonal block of ``left_trans``; the forward
    is ``npu_kronecker_quant`` to MXFP4 and the MX ``npu_quant_matmul``.

    :param in_features: this rank's input size (the whole one over ``tp_size`` for a
        row-parallel layer)
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 params_dtype: torch.dtype = torch.bfloat16, row_parallel: bool = False,
                 tp_size: int = 1, tp_rank: int = 0, max_supported_tp: int = 4,
                 group_size: int = MX_GROUP_SIZE):
        super().__init__()
        if tp_size > max_supported_tp:
            raise ValueError(f"tensor parallel size {tp_size} exceeds max_supported_tp "
                             f"{max_supported_tp}")
        if in_features % (2 * group_size):
            raise ValueError(f"in_features {in_features} must be a multiple of "
                             f"{2 * group_size} (weight scales are read in pairs)")
        self.in_features, self.out_features = in_features, out_features
        self.row_parallel, self.tp_size, self.tp_rank = row_parallel, tp_size, tp_rank
        self.group_size = group_size
        whole = in_features * tp_size if row_parallel else in_features
        left, right = mxfp4_trans_dims(whole, row_parallel, max_supported_tp)
        self.weight = _param(out_features, in_features // 2, dtype=torch.uint8)
        self.weight_scale = _param(out_features, in_features // group_size, dtype=torch.uint8)
        self.left_trans = _param(left, left, dtype=params_dtype)
        self.right_trans = _param(right, right, dtype=params_dtype)
        self.clip_ratio = _param(1, dtype=torch.float32)
        self.bias = _param(out_features, dtype=params_dtype) if bias else None
        self.aclnn_clip_ratio: float | None = None

    @torch.no_grad()
    def process_weights_after_loading(self):
        left = self.left_trans.data
        if self.row_parallel:  # this rank's diagonal block
            block = left.shape[0] // self.tp_size
            rows = slice(self.tp_rank * block, (self.tp_rank + 1) * block)
            left = left[rows, rows]
        self.left_trans = nn.Parameter(left.t().contiguous(), requires_grad=False)
        scale = self.weight_scale.data.view(self.out_features, -1, 2)
        self.weight_t = self.weight.data.transpose(0, 1)  # [in/2, out]
        self.weight_scale_t = scale.transpose(0, 1)  # [in/64, out, 2]
        self.clip_ratio.data = self.clip_ratio.data.float()
        self.aclnn_clip_ratio = self.clip_ratio.item()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.aclnn_clip_ratio is None:
            raise RuntimeError("call process_weights_after_loading() first")
        m, n = self.left_trans.shape[0], self.right_trans.shape[0]
        if m * n != x.shape[-1]:
            raise ValueError(f"FlatQuant transform matrices dimension mismatch: M({m}) * "
                             f"N({n}) != in_features({x.shape[-1]})")
        # the kernels round their intermediates to bfloat16; a float32/float64
        # evaluation of the checkpoint computes them exactly
        exact = x.dtype in (torch.float32, torch.float64)
        q, scale = kronecker_quant_mxfp4(
            x.reshape(-1, m, n), self.left_trans.to(x.dtype), self.right_trans.to(x.dtype),
            self.aclnn_clip_ratio, intermediate_dtype=None if exact else torch.bfloat16,
        )
        out = quant_mx_matmul(q, self.weight_t, self.weight_scale_t, scale, bias=self.bias,
                              output_dtype=x.dtype, group_size=self.group_size)
        return out.reshape(*x.shape[:-1], -1)


LINEAR_METHODS = {
    W4A4_FLATQUANT_DYNAMIC: AscendW4A4FlatQuantLinear,
    W4A4_MXFP4_FLATQUANT: AscendW4A4MXFP4FlatQuantLinear,
    W8A8_DYNAMIC: AscendW8A8DynamicLinear,
}
MOE_METHODS = {W8A8_DYNAMIC: AscendW8A8DynamicMoE}


def load_ascend_model(path: str | Path, dtype: torch.dtype | None = None, use_npu=None):
    """
    Build a transformers model from an exported Ascend checkpoint: every linear whose
    weight is ``W4A4_FLATQUANT_DYNAMIC`` (``W4A4_MXFP4_FLATQUANT``, ``W8A8_DYNAMIC``) in
    ``quant_model_description.json`` becomes an :class:`AscendW4A4FlatQuantLinear`
    (:class:`AscendW4A4MXFP4FlatQuantLinear` of one rank,
    :class:`AscendW8A8DynamicLinear`), the routed experts of a ``W8A8_DYNAMIC`` MoE
    block one :class:`AscendW8A8DynamicMoE`; all tensors are loaded strictly.

    :raises ValueError: for a quant type this reference (and the export) does not know
    """
    from llmcompressor.modeling.moe.linearize import get_non_linearized_moes, linearize_moe
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / DESCRIPTION_FILE).is_file():
        raise FileNotFoundError(
            f"{path}: no {DESCRIPTION_FILE}; pass a directory written by "
            "save_ascend_checkpoint / flatquant-export-ascend"
        )
    config = AutoConfig.from_pretrained(path)

    def rename(key):  # vLLM's checkpoint names -> the transformers model's
        return checkpoint_name(key, config.model_type, reverse=True)

    description = {rename(k): v for k, v in
                   json.loads((path / DESCRIPTION_FILE).read_text()).items()}
    # W4A4_MXFP4_FLATQUANT's settings, with vllm-ascend's defaults
    mxfp4_settings = {"group_size": description.pop("group_size", MX_GROUP_SIZE),
                      "max_supported_tp": description.pop("max_supported_tp", 4)}
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if get_non_linearized_moes(model):
        linearize_moe(model)  # one linear per expert, as the checkpoint stores them
        model.to(dtype)
    quantized = {
        key[: -len(".weight")]: kind
        for key, kind in description.items()
        if key.endswith(".weight") and kind != FLOAT
    }
    experts = {name for name in quantized if expert_of(name)}
    blocks = {expert_of(name)[0]: quantized[name] for name in experts}
    linears = {n: k for n, k in quantized.items() if n not in experts and n not in blocks}
    for name, kind in [*linears.items(), *blocks.items()]:
        methods = LINEAR_METHODS if name in linears else MOE_METHODS
        if kind not in methods:
            raise ValueError(
                f"{path}: {name} is {kind}; this reference runs {sorted(methods)}"
            )
        module = model.get_submodule(name)
        if kind == W4A4_MXFP4_FLATQUANT:  # one rank (tensor parallel size 1)
            replacement = methods[kind](
                module.in_features, module.out_features, module.bias is not None,
                params_dtype=dtype, row_parallel=is_row_parallel(name),
                max_supported_tp=mxfp4_settings["max_supported_tp"],
                group_size=mxfp4_settings["group_size"],
            )
        elif name in linears:
            replacement = methods[kind](
                module.in_features, module.out_features, module.bias is not None,
                params_dtype=dtype, use_npu=use_npu,
            )
        else:  # llm-compressor's per-expert linears of the block
            down = module[0].down_proj
            replacement = methods[kind](module.num_experts, down.out_features,
                                        down.in_features, module.act_fn,
                                        params_dtype=dtype, use_npu=use_npu)
        model.set_submodule(name, replacement)
    state = {}
    for shard in check_safetensors_files(path):
        state.update({rename(k): v for k, v in load_file(shard).items()})
    loaded = {block: set() for block in blocks}
    for key in [k for k in state if k.rpartition(".")[0] in experts]:
        block, index, proj = expert_of(key.rpartition(".")[0])
        suffix = key.rpartition(".")[2]
        model.get_submodule(block).load_expert(index, proj, suffix, state.pop(key))
        loaded[block].add((index, proj, suffix))
    for block, keys in loaded.items():
        expected = model.get_submodule(block).num_experts * 3 * 3
        if len(keys) != expected:
            raise ValueError(f"{path}: {block} has {len(keys)} of the {expected} expert "
                             "tensors (weight, weight_scale, weight_offset per projection)")
    # copy into the allocated parameters: they carry the runtime dtypes (int8 weight,
    # float32 scales and clip ratio, params_dtype for the rest)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied and not k.startswith("lm_head")
               and k.rpartition(".")[0] not in blocks]
    if missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    for name in [*linears, *blocks]:
        model.get_submodule(name).process_weights_after_loading()
    return model.eval()
