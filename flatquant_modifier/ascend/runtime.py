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
    pack_int4,
    quant_matmul,
)
from flatquant_modifier.formats import INT4_PER_INT32, W4A4_FLATQUANT_DYNAMIC, W8A8_DYNAMIC
from flatquant_modifier.loading import check_safetensors_files

__all__ = [
    "QUANT_TYPE",
    "DESCRIPTION_FILE",
    "AscendW4A4FlatQuantLinear",
    "AscendW8A8DynamicLinear",
    "load_ascend_model",
]

QUANT_TYPE = W4A4_FLATQUANT_DYNAMIC
DESCRIPTION_FILE = "quant_model_description.json"
QUANTIZED_SUFFIXES = (
    "weight", "weight_scale", "weight_offset", "left_trans", "right_trans", "clip_ratio"
)


class _AscendLinear(nn.Module):
    """What vllm-ascend's int linear methods allocate alike: ``weight`` int8 [out, in],
    ``weight_scale`` and ``weight_offset`` [out, 1] in ``scale_dtype``, the bias in
    ``params_dtype``."""

    def __init__(self, in_features, out_features, bias, params_dtype, scale_dtype, use_npu):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.use_npu = use_npu
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False
        )
        self.weight_scale = nn.Parameter(
            torch.empty(out_features, 1, dtype=scale_dtype), requires_grad=False
        )
        self.weight_offset = nn.Parameter(
            torch.empty(out_features, 1, dtype=scale_dtype), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=params_dtype), requires_grad=False)
            if bias
            else None
        )


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
        self.left_trans = nn.Parameter(torch.empty(m, m, dtype=params_dtype), requires_grad=False)
        self.right_trans = nn.Parameter(torch.empty(n, n, dtype=params_dtype), requires_grad=False)
        self.clip_ratio = nn.Parameter(torch.empty(1), requires_grad=False)
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
        shape = x.shape
        x_q, pertoken = dynamic_quant(x.reshape(-1, shape[-1]), use_npu=self.use_npu)
        out = quant_matmul(
            x_q, self.weight, self.weight_scale, pertoken.reshape(-1),
            bias=self.bias, output_dtype=x.dtype, use_npu=self.use_npu,
        )
        return out.reshape(*shape[:-1], -1)


LINEAR_METHODS = {
    W4A4_FLATQUANT_DYNAMIC: AscendW4A4FlatQuantLinear,
    W8A8_DYNAMIC: AscendW8A8DynamicLinear,
}


def load_ascend_model(path: str | Path, dtype: torch.dtype | None = None, use_npu=None):
    """
    Build a transformers model from an exported Ascend checkpoint: every linear whose
    weight is ``W4A4_FLATQUANT_DYNAMIC`` (``W8A8_DYNAMIC``) in
    ``quant_model_description.json`` becomes an :class:`AscendW4A4FlatQuantLinear`
    (:class:`AscendW8A8DynamicLinear`); all tensors are loaded strictly.

    :raises ValueError: for a quant type this reference (and the export) does not know
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / DESCRIPTION_FILE).is_file():
        raise FileNotFoundError(
            f"{path}: no {DESCRIPTION_FILE}; pass a directory written by "
            "save_ascend_checkpoint / flatquant-export-ascend"
        )
    description = json.loads((path / DESCRIPTION_FILE).read_text())
    config = AutoConfig.from_pretrained(path)
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    quantized = {
        key[: -len(".weight")]: kind
        for key, kind in description.items()
        if key.endswith(".weight") and kind != "FLOAT"
    }
    for name, kind in quantized.items():
        if kind not in LINEAR_METHODS:
            raise ValueError(
                f"{path}: {name} is {kind}; this reference runs {sorted(LINEAR_METHODS)}"
            )
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        setattr(
            parent,
            child,
            LINEAR_METHODS[kind](
                linear.in_features, linear.out_features, linear.bias is not None,
                params_dtype=dtype, use_npu=use_npu,
            ),
        )
    state = {}
    for shard in check_safetensors_files(path):
        state.update(load_file(shard))
    # copy into the allocated parameters: they carry the runtime dtypes (int8 weight,
    # float32 scales and clip ratio, params_dtype for the rest)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied and not k.startswith("lm_head")]
    if missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    for name in quantized:
        model.get_submodule(name).process_weights_after_loading()
    return model.eval()
