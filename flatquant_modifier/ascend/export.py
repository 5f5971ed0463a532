"""
Write a FlatQuant model as the checkpoint vllm-ascend's ``W4A4_FLATQUANT_DYNAMIC``
method loads: safetensors shards + ``quant_model_description.json`` + ``config.json``
(with ``"quantize": "w4a4_flatquant_dynamic"``) + tokenizer and generation config.

Per FlatQuant linear: ``weight`` int8 [out, in] holding int4 values, ``weight_scale`` and
``weight_offset`` float32 [out, 1], ``left_trans`` [M, M] = P1 and ``right_trans``
[N, N] = P2 in the model dtype (vllm-ascend transposes ``left_trans`` at load and
computes ``left_trans.T @ X @ right_trans`` = ``P1^T X P2``, our ``x @ kron(P1, P2)``),
``clip_ratio`` float32 [1]. Per linear with an int8 input quantizer (``w8a8_dynamic``,
or a size ``npu_kronecker_quant`` cannot take): vllm-ascend's ``W8A8_DYNAMIC``,
``weight`` int8 [out, in], ``weight_scale`` and ``weight_offset`` [out, 1] in the model
dtype. Every other tensor is ``FLOAT``. With MXFP4 transforms (``quant_format="mxfp4"``)
the FlatQuant linears are ``W4A4_MXFP4_FLATQUANT`` (Ascend 950): ``weight`` uint8
[out, in/2] of E2M1 codes (even element in the low nibble), ``weight_scale`` uint8
[out, in/32] of E8M0 bytes, transforms sized as that method allocates them (row-parallel
linears by ``max_supported_tp``, their ``left_trans`` block diagonal), ``clip_ratio`` 1,
and the description's ``group_size`` and ``max_supported_tp``. The weight integers and scales are those of
the compressed-tensors quantization the model was evaluated with, so ``weight *
weight_scale`` is exactly the fake-quantized weight.

MoE: the routed experts of a block are one vllm-ascend FusedMoE layer of one quant type
(``W8A8_DYNAMIC``), written one linear per expert as vLLM loads them
(``experts.E.gate_proj.weight`` -> ``w13_weight[E]``...), with a description entry
``<block>.experts.weight`` beside the per-expert ones: vllm-ascend looks experts up on
``experts.0.*`` where it has a packed-module mapping for the model type (Qwen3-MoE,
DeepSeek) and on ``<prefix>.weight`` otherwise (Qwen2-MoE, Mixtral). Tensor names are
vLLM's checkpoint names (:data:`flatquant_modifier.formats.CHECKPOINT_NAMES`).
"""

import json
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.quantization.lifecycle.forward import quantize
from compressed_tensors.utils import align_module_device
from huggingface_hub import save_torch_state_dict
from loguru import logger
from torch.nn import Module

from flatquant_modifier.ascend.ops import pack_fp4
from flatquant_modifier.ascend.runtime import DESCRIPTION_FILE
from flatquant_modifier.distributed import barrier, is_source_process
from flatquant_modifier.formats import (
    ASCEND_FLOAT_ONLY,
    FLOAT,
    FUSED_SIBLINGS,
    MOE_METHODS,
    MX_GROUP_SIZE,
    W4A4_FLATQUANT_DYNAMIC,
    W4A4_MXFP4_FLATQUANT,
    W8A8_DYNAMIC,
    checkpoint_name,
    expert_of,
    is_int_channel_symmetric,
    is_mxfp4_weights,
    is_row_parallel,
    mxfp4_problem,
    npu_kronecker_problem,
    shared_experts_problem,
)
from flatquant_modifier.kronecker import get_decompose_dim, mxfp4_trans_dims
from flatquant_modifier.transform import (
    DynamicInt8Quant,
    KroneckerQuantTransform,
    get_dynamic_int8_quant,
    get_flatquant_transform,
)
from flatquant_modifier.verify import verify_model

__all__ = [
    "AscendExportError",
    "check_destination",
    "linear_quant_type",
    "save_ascend_checkpoint",
]

DESCRIPTION_VERSION = "1.0.0"
FLATQUANT_TYPES = (W4A4_FLATQUANT_DYNAMIC, W4A4_MXFP4_FLATQUANT)


class AscendExportError(ValueError):
    """The model cannot be written as a valid vllm-ascend FlatQuant checkpoint."""


def save_ascend_checkpoint(
    model: Module,
    save_dir: str | Path,
    tokenizer=None,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
) -> Path:
    """
    Export ``model`` (after ``FlatQuantModifier`` + a W4 per-channel symmetric
    QuantizationModifier/GPTQModifier) for vllm-ascend. Atomic: everything is written
    to a temporary directory beside ``save_dir`` and renamed at the end, so an error
    leaves no partial checkpoint. Under ``torch.distributed`` every rank validates the
    model (so a bad model fails on all ranks alike) and only rank 0 writes; the others
    wait until the directory is complete.

    :raises AscendExportError: on anything vllm-ascend would load wrongly (unsupported
        scheme, in_features % 8, fused siblings with different transforms, clip ratio
        outside (0, 1], NaN/Inf)
    :raises AscendExportError: also if ``save_dir`` is, contains or lies inside the
        directory the model was loaded from (``model.name_or_path``)
    :raises FileExistsError: if ``save_dir`` exists and ``overwrite`` is False
    :raises flatquant_modifier.verify.FlatQuantStateError: if the model in memory does
        not compute the function of its tensors (a transform or quantizer inactive)
    """
    save_dir = Path(save_dir)
    check_destination(save_dir, getattr(model, "name_or_path", None))
    if save_dir.exists() and not overwrite:
        raise FileExistsError(f"{save_dir} exists; pass overwrite=True to replace it")
    verify_model(model, where="before the Ascend export")
    tensors, description, header = _collect_tensors(model)
    flatquant_type = next(kind for kind in FLATQUANT_TYPES if kind in description.values())
    barrier()  # every rank has checked save_dir before rank 0 creates it
    if not is_source_process():
        barrier()
        return save_dir
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(save_dir)
    staging = Path(tempfile.mkdtemp(
        dir=save_dir.parent, prefix=f".{save_dir.name}.tmp-{os.getpid()}-"
    ))
    try:
        save_torch_state_dict(tensors, staging, max_shard_size=max_shard_size)
        description = {
            "model_quant_type": flatquant_type,
            "version": DESCRIPTION_VERSION,
            **header,
            **dict(sorted(description.items())),
        }
        (staging / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2))
        _write_config(model, staging, flatquant_type)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        # mkdtemp made it private (0700); the checkpoint gets the usual mode (umask)
        staging.chmod(0o777 & ~_umask())
        _replace(staging, save_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info(f"Saved the Ascend checkpoint ({_type_counts(description)}) to {save_dir}")
    barrier()
    return save_dir


def _collect_tensors(model: Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from llmcompressor.modeling.moe.linearize import get_non_linearized_moes

    if fused := get_non_linearized_moes(model):
        raise AscendExportError(
            f"{fused[0][0]} holds fused MoE experts (3D tensors), which vLLM does not "
            "load; export the model oneshot returned (its experts are one linear per "
            "expert), or load the checkpoint with load_flatquant_model"
        )
    types = {
        name: quant_type
        for name, module in model.named_modules()
        if (quant_type := linear_quant_type(name, module)) != FLOAT
    }
    flatquant = {kind for kind in types.values() if kind in FLATQUANT_TYPES}
    if not flatquant:
        raise AscendExportError(
            "no FlatQuant transforms found: run FlatQuantModifier (a_bits=4) and a W4 "
            "weight quantizer through oneshot before exporting"
        )
    if len(flatquant) > 1:
        raise AscendExportError(
            f"the model has transforms of both {sorted(flatquant)}; calibrate it with one "
            "quant_format"
        )
    _check_fused_siblings(model, types)
    moe_types = _moe_block_types(model, types)
    params_dtype = _params_dtype(model)
    header = _mxfp4_header(model, types) if W4A4_MXFP4_FLATQUANT in flatquant else {}
    collectors = {W4A4_FLATQUANT_DYNAMIC: _quantized_linear_tensors,
                  W4A4_MXFP4_FLATQUANT: _mxfp4_linear_tensors,
                  W8A8_DYNAMIC: _w8a8_dynamic_tensors}
    tensors: dict[str, torch.Tensor] = {}
    description: dict[str, str] = {}
    for name, quant_type in types.items():
        module = model.get_submodule(name)
        for suffix, tensor in collectors[quant_type](name, module, params_dtype).items():
            tensors[f"{name}.{suffix}"] = tensor
            description[f"{name}.{suffix}"] = quant_type
        if getattr(module, "bias", None) is not None:
            with align_module_device(module):
                tensors[f"{name}.bias"] = module.bias.detach().cpu().clone()
            description[f"{name}.bias"] = FLOAT
    skip_prefixes = tuple(f"{name}." for name in types)
    for key, tensor in _plain_state_dict(model).items():
        if key.startswith(skip_prefixes):
            continue
        _check_finite(key, tensor)
        tensors[key] = tensor
        description[key] = FLOAT
    for block, quant_type in moe_types.items():
        description[f"{block}.weight"] = quant_type
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    tensors = {checkpoint_name(k, model_type): v for k, v in tensors.items()}
    description = {checkpoint_name(k, model_type): v for k, v in description.items()}
    return tensors, description, header


def _mxfp4_header(model: Module, types: dict[str, str]) -> dict:
    """The description keys vllm-ascend's W4A4_MXFP4_FLATQUANT reads: ``group_size``,
    and ``max_supported_tp``, the diagonal blocks of the row-parallel linears'
    ``left_trans`` (all alike; without row-parallel MXFP4 linears vllm-ascend's
    default, 4, is left)."""
    blocks = {
        name: get_flatquant_transform(model.get_submodule(name)).left_blocks
        for name, kind in types.items()
        if kind == W4A4_MXFP4_FLATQUANT and is_row_parallel(name)
    }
    header = {"group_size": MX_GROUP_SIZE}
    if not blocks:
        return header
    if len(set(blocks.values())) > 1:
        example = {count: name for name, count in blocks.items()}
        raise AscendExportError(
            "vllm-ascend reads one max_supported_tp for the model, but the row-parallel "
            f"transforms have {sorted(example)} diagonal blocks (e.g. {example}); "
            "calibrate with one max_supported_tp"
        )
    header["max_supported_tp"] = next(iter(blocks.values()))
    return header


def _moe_block_types(model: Module, types: dict[str, str]) -> dict[str, str]:
    """The quant type of each MoE block's routed experts (all alike, one vllm-ascend
    serves), for the blocks that are quantized.

    :raises AscendExportError: for experts of one block with different types, or a
        type vllm-ascend has no MoE method for
    """
    blocks: dict[str, dict[str, str]] = defaultdict(dict)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (expert := expert_of(name)):
            blocks[expert[0]][name] = types.get(name, FLOAT)
    quantized = {}
    for block, kinds in blocks.items():
        found = set(kinds.values())
        if len(found) > 1:
            example = {kind: name for name, kind in kinds.items()}
            raise AscendExportError(
                f"{block}: vllm-ascend runs a block's routed experts as one FusedMoE "
                f"layer of one quant type, but they are {sorted(found)} (e.g. {example}); "
                "give all of them the same treatment (`w8a8_dynamic` and int8 weights)"
            )
        kind = found.pop()
        if kind == FLOAT:
            continue
        if kind not in MOE_METHODS:
            raise AscendExportError(
                f"{block}: routed experts exported as {kind}, which vllm-ascend has no "
                f"MoE method for (this export writes {list(MOE_METHODS)}); list them in "
                "FlatQuantModifier's `w8a8_dynamic` with int8 per-channel weights"
            )
        quantized[block] = kind
        parent = block.rpartition(".")[0]
        if problem := shared_experts_problem(model.get_submodule(parent), parent, types, kind):
            raise AscendExportError(
                f"{problem}; make it W8A8_DYNAMIC (`w8a8_dynamic`, int8 weights) or keep "
                "it in full precision"
            )
    return quantized


def _type_counts(description: dict[str, str]) -> str:
    counts = defaultdict(int)
    for key, kind in description.items():
        if key.endswith(".weight") and kind != FLOAT:
            counts[kind] += 1
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))


def linear_quant_type(name: str, module: Module) -> str:
    """
    The vllm-ascend quant type a module is exported as: ``W4A4_FLATQUANT_DYNAMIC`` or
    ``W4A4_MXFP4_FLATQUANT`` (FlatQuant transform), ``W8A8_DYNAMIC`` (int8 input quantizer), ``FLOAT``
    (neither, unquantized).

    :raises AscendExportError: for a module with quantized weights but neither, which
        vllm-ascend would run at another precision than the model in memory
    """
    quant_type = FLOAT
    if (transform := get_flatquant_transform(module)) is not None:
        quant_type = (W4A4_MXFP4_FLATQUANT if transform.activations == "mxfp4"
                      else W4A4_FLATQUANT_DYNAMIC)
    elif get_dynamic_int8_quant(module) is not None:
        quant_type = W8A8_DYNAMIC
    reason = ASCEND_FLOAT_ONLY.get(name.rpartition(".")[2])
    if reason and quant_type != FLOAT:
        raise AscendExportError(
            f"{name} must stay in full precision ({reason}), but it has a "
            f"{quant_type} quantizer; leave it out of FlatQuantModifier's mappings "
            "and w8a8_dynamic"
        )
    if quant_type != FLOAT:
        return quant_type
    scheme = getattr(module, "quantization_scheme", None)
    if scheme is not None and (scheme.weights is not None
                               or scheme.input_activations is not None):
        raise AscendExportError(
            f"{name} is quantized ({scheme.weights}) but has neither a FlatQuant "
            "transform nor an int8 input quantizer, so no vllm-ascend method computes "
            "what it computes. Give it FlatQuant (not in FlatQuantModifier's `ignore`), "
            "or list it in `w8a8_dynamic` with int8 per-channel weights, or leave it "
            "unquantized (add it to the weight quantizer's `ignore`)."
        )
    return FLOAT


def _quantized_linear_tensors(name: str, module: Module, params_dtype) -> dict:
    transform: KroneckerQuantTransform = get_flatquant_transform(module)
    if not transform.quantize:
        raise AscendExportError(
            f"{name}: its FlatQuant transform does not quantize activations "
            "(FlatQuantModifier(a_bits=None)); W4A4_FLATQUANT_DYNAMIC needs a_bits=4"
        )
    in_features = module.in_features
    problem = npu_kronecker_problem(in_features)
    if problem is not None:
        raise AscendExportError(f"{name}: {problem}")
    _check_weight_scheme(name, module, 4, W4A4_FLATQUANT_DYNAMIC)
    with align_module_device(module), align_module_device(transform):
        scale = module.weight_scale.detach().float().reshape(-1, 1)
        q = _weight_integers(name, module, 4)
        zero_point = getattr(module, "weight_zero_point", None)
        if zero_point is not None and torch.any(zero_point != 0):
            raise AscendExportError(f"{name}: weight zero points must be 0 (symmetric)")
        left = transform.left_trans.detach().clone()
        right = transform.right_trans.detach().clone()
        clip = transform.clip_ratio.detach().float().reshape(1).clone()
    m, n = get_decompose_dim(in_features)
    if left.shape != (m, m) or right.shape != (n, n):
        raise AscendExportError(
            f"{name}: transforms {tuple(left.shape)}/{tuple(right.shape)} do not match "
            f"get_decompose_dim({in_features}) = ({m}, {n})"
        )
    if not 0.0 < clip.item() <= 1.0:
        raise AscendExportError(f"{name}: clip_ratio {clip.item()} is outside (0, 1]")
    tensors = {
        "weight": q.cpu(),
        "weight_scale": scale.cpu().clone(),
        "weight_offset": torch.zeros_like(scale).cpu(),
        "left_trans": left.to(params_dtype).cpu(),
        "right_trans": right.to(params_dtype).cpu(),
        "clip_ratio": clip.cpu(),
    }
    for key, tensor in tensors.items():
        _check_finite(f"{name}.{key}", tensor)
    return tensors


def _w8a8_dynamic_tensors(name: str, module: Module, params_dtype) -> dict:
    """``weight`` int8 [out, in], ``weight_scale`` and ``weight_offset`` [out, 1] in
    the model dtype, as vllm-ascend's W8A8_DYNAMIC linear allocates them."""
    _check_weight_scheme(name, module, 8, W8A8_DYNAMIC)
    with align_module_device(module):
        scale = module.weight_scale.detach().reshape(-1, 1)
        q = _weight_integers(name, module, 8)
        zero_point = getattr(module, "weight_zero_point", None)
        if zero_point is not None and torch.any(zero_point != 0):
            raise AscendExportError(f"{name}: weight zero points must be 0 (symmetric)")
    stored = scale.to(params_dtype)
    if not torch.equal(stored.double(), scale.double()):
        raise AscendExportError(
            f"{name}: W8A8_DYNAMIC keeps weight_scale in the model dtype "
            f"({params_dtype}), which does not hold this linear's {scale.dtype} scales "
            "exactly; quantize the model in its own dtype"
        )
    tensors = {
        "weight": q.cpu(),
        "weight_scale": stored.cpu().clone(),
        "weight_offset": torch.zeros_like(stored).cpu(),
    }
    for key, tensor in tensors.items():
        _check_finite(f"{name}.{key}", tensor)
    return tensors


def _mxfp4_linear_tensors(name: str, module: Module, params_dtype) -> dict:
    """vllm-ascend's W4A4_MXFP4_FLATQUANT: ``weight`` uint8 [out, in/2] (E2M1 codes,
    even element in the low nibble), ``weight_scale`` uint8 [out, in/32] (E8M0),
    ``left_trans``/``right_trans`` sized as its ``get_decompose_dim`` (row-parallel:
    block diagonal in ``max_supported_tp`` blocks), ``clip_ratio`` float32 [1]."""
    transform: KroneckerQuantTransform = get_flatquant_transform(module)
    scheme = getattr(module, "quantization_scheme", None)
    if not is_mxfp4_weights(getattr(scheme, "weights", None)):
        raise AscendExportError(
            f"{name}: W4A4_MXFP4_FLATQUANT stores MXFP4 weights; this linear's weight "
            f"scheme is {getattr(scheme, 'weights', None)}. Quantize its weights after "
            "FlatQuantModifier with QuantizationModifier(scheme='MXFP4A16')."
        )
    _check_no_activation_schemes(name, scheme)
    row, blocks = is_row_parallel(name), transform.left_blocks
    if not row and blocks > 1:
        raise AscendExportError(f"{name}: vLLM does not split its input across ranks, "
                                "but its transform is block diagonal")
    in_features = module.in_features
    if problem := mxfp4_problem(in_features, row, blocks):
        raise AscendExportError(f"{name}: {problem}")
    with align_module_device(module), align_module_device(transform):
        values, scale_byte = _mxfp4_weight(name, module)
        left = transform.left_trans.detach().to(params_dtype).cpu()
        right = transform.right_trans.detach().to(params_dtype).cpu()
        clip = transform.clip_ratio.detach().float().reshape(1).cpu().clone()
    m, n = mxfp4_trans_dims(in_features, row, blocks)
    if left.shape != (m, m) or right.shape != (n, n):
        raise AscendExportError(
            f"{name}: transforms {tuple(left.shape)}/{tuple(right.shape)}, but "
            f"vllm-ascend allocates {m} x {m} and {n} x {n}"
        )
    size = m // blocks
    mask = torch.block_diag(*[torch.ones(size, size, dtype=torch.bool)] * blocks)
    if torch.any(left[~mask] != 0):
        raise AscendExportError(
            f"{name}: left_trans is not block diagonal in {blocks} blocks, so ranks "
            "that keep only their diagonal block would serve another transform"
        )
    if not 0.0 < clip.item() <= 1.0:
        raise AscendExportError(f"{name}: clip_ratio {clip.item()} is outside (0, 1]")
    tensors = {
        "weight": pack_fp4(values.cpu()),
        "weight_scale": scale_byte.cpu(),
        "left_trans": left,
        "right_trans": right,
        "clip_ratio": clip,
    }
    for key, tensor in tensors.items():
        _check_finite(f"{name}.{key}", tensor)
    return tensors


def _mxfp4_weight(name: str, module: Module) -> tuple[torch.Tensor, torch.Tensor]:
    """E2M1 values [out, in] and E8M0 scale bytes (uint8 [out, in/32]) of an MXFP4
    weight, from the weight compressed-tensors fake-quantizes or, after
    ``save_pretrained(save_compressed=True)`` packed the model in place, from its packed
    weight and byte scales."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    weights = module.quantization_scheme.weights
    scale = module.weight_scale.detach()
    if hasattr(module, "weight_packed"):
        packed = module.weight_packed.detach()
        values = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2,
                                       dtype=torch.float32)
        if scale.dtype != torch.uint8:
            raise AscendExportError(f"{name}: packed MXFP4 weight with {scale.dtype} scales")
        return values, scale.clone()
    if getattr(module, "weight", None) is None:
        raise AscendExportError(f"{name} has neither a weight nor a packed weight")
    # compressed-tensors' own quantize: the values of its fake quantization
    values = quantize(module.weight.detach(), scale, getattr(module, "weight_zero_point", None),
                      weights, dtype=torch.float32)
    mantissa, exponent = torch.frexp(scale.double())
    byte = exponent - 1 + 127
    if torch.any((mantissa != 0.5) | (byte < 0) | (byte > 254)):
        raise AscendExportError(f"{name}: weight scales are not powers of two in E8M0's "
                                "range; quantize with compressed-tensors' MXFP4 scheme")
    return values, byte.to(torch.uint8)


def _weight_integers(name: str, module: Module, num_bits: int) -> torch.Tensor:
    """The weight's integer values (int8 storage), from the fake-quantized weight or,
    after ``save_pretrained(save_compressed=True)`` packed the model in place, from
    the compressed-tensors packed weight."""
    weight = getattr(module, "weight", None)
    if weight is not None and not weight.is_floating_point():
        # compressed in place with an unpacked integer format (int-quantized,
        # naive-quantized): the integers themselves
        return weight.detach().to(torch.int8)
    if weight is not None:
        # compressed-tensors' own quantize: the same integers as its fake quantization
        # and its packed format, ties at -7.5 included
        return quantize(
            module.weight.detach(), module.weight_scale.detach(),
            getattr(module, "weight_zero_point", None), module.quantization_scheme.weights,
            dtype=torch.int8,
        ).reshape(module.weight.shape)
    if hasattr(module, "weight_packed"):
        shape = torch.Size(module.weight_shape.tolist())
        return unpack_from_int32(module.weight_packed.detach(), num_bits, shape).to(torch.int8)
    raise AscendExportError(f"{name} has neither a weight nor a packed weight")


def _check_weight_scheme(name: str, module: Module, num_bits: int, quant_type: str):
    scheme = getattr(module, "quantization_scheme", None)
    weights = getattr(scheme, "weights", None)
    if not (is_int_channel_symmetric(weights, num_bits) and hasattr(module, "weight_scale")):
        raise AscendExportError(
            f"{name}: {quant_type} stores int{num_bits} per-channel symmetric weights; "
            f"this linear's weight scheme is {weights}. Quantize its weights after "
            "FlatQuantModifier with a QuantizationModifier/GPTQModifier config group "
            f"{{num_bits: {num_bits}, type: int, symmetric: true, strategy: channel}}."
        )
    _check_no_activation_schemes(name, scheme)


def _check_no_activation_schemes(name: str, scheme):
    if getattr(scheme, "input_activations", None) is not None:
        raise AscendExportError(
            f"{name}: its scheme quantizes input activations itself; on Ascend the "
            "FlatQuant transform or the int8 input quantizer does (leave "
            "input_activations unset)"
        )
    if getattr(scheme, "output_activations", None) is not None:
        raise AscendExportError(
            f"{name}: its scheme quantizes output activations, which no vllm-ascend "
            "linear method does (leave output_activations unset)"
        )


def _check_fused_siblings(model: Module, types: dict[str, str]):
    """Linears vllm-ascend fuses (q/k/v, gate/up, ...) share one quant type, and under
    W4A4_FLATQUANT_DYNAMIC one transform and clip ratio."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name, module in model.named_modules():
        parent, _, child = name.rpartition(".")
        for fused, siblings in FUSED_SIBLINGS.items():
            if child in siblings:
                groups[(parent, fused)].append(name)
    for (parent, fused), names in groups.items():
        kinds = {name: types.get(name, FLOAT) for name in names}
        if len(set(kinds.values())) > 1:
            raise AscendExportError(
                f"{parent}.{fused}: vllm-ascend fuses {names} into one linear of one "
                f"quant type, but they are {kinds}; give them the same treatment "
                "(FlatQuant mappings, w8a8_dynamic, ignore)"
            )
        if kinds[names[0]] not in FLATQUANT_TYPES:
            continue
        first = get_flatquant_transform(model.get_submodule(names[0]))
        for other_name in names[1:]:
            other = get_flatquant_transform(model.get_submodule(other_name))
            for attr in ("left_trans", "right_trans", "clip_ratio"):
                if not torch.equal(getattr(first, attr).cpu(), getattr(other, attr).cpu()):
                    raise AscendExportError(
                        f"{names[0]} and {other_name} are fused into {parent}.{fused} by "
                        f"vllm-ascend, which loads one {attr} for both, but theirs "
                        "differ. FlatQuantModifier gives siblings one shared transform; "
                        "check the mappings."
                    )


def _plain_state_dict(model: Module) -> dict[str, torch.Tensor]:
    """
    Full-precision tensors: the state dict without transforms and qparams. A tied
    ``lm_head.weight`` stays (as its own copy): vllm-ascend looks every linear and
    embedding, the tied lm_head included, up in the description, and vLLM skips the
    tensor itself when the embeddings are tied.
    """
    skip_modules = {
        name for name, module in model.named_modules()
        if isinstance(module, (KroneckerQuantTransform, DynamicInt8Quant))
    }
    qparam_suffixes = (
        "weight_scale", "weight_zero_point", "weight_global_scale", "input_scale",
        "input_zero_point", "input_global_scale", "output_scale", "output_zero_point",
        "weight_g_idx",
    )
    state = {}
    for key, tensor in model.state_dict().items():
        module_name = key.rpartition(".")[0]
        if any(module_name == s or module_name.startswith(s + ".") for s in skip_modules):
            continue
        if key.rpartition(".")[2] in qparam_suffixes:
            continue
        state[key] = tensor.detach().cpu().clone()
    return state


def _params_dtype(model: Module) -> torch.dtype:
    config = getattr(model, "config", None)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype or next(model.parameters()).dtype


def _check_finite(name: str, tensor: torch.Tensor):
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise AscendExportError(f"{name} contains NaN or Inf; refusing to export")


def _write_config(model: Module, directory: Path, quant_type: str):
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["quantize"] = quant_type.lower()
    (directory / "config.json").write_text(json.dumps(config, indent=2, default=str))
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(directory)


def _replace(staging: Path, target: Path):
    """Move ``staging`` to ``target``; an existing ``target`` is removed only after."""
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    staging.rename(target)
    if old is not None:
        _remove(old)


def _remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def check_destination(save_dir: Path, source: str | None):
    """Refuse to write into, over or around the checkpoint the model was loaded from
    (with ``overwrite=True`` the export would replace it)."""
    if not source or not Path(source).is_dir():
        return
    target, origin = save_dir.resolve(), Path(source).resolve()
    if target == origin or origin in target.parents or target in origin.parents:
        raise AscendExportError(
            f"{save_dir} is, contains or lies inside {source}, the checkpoint the model "
            "was loaded from; write the Ascend checkpoint to a directory of its own"
        )


def _remove_stale_staging(save_dir: Path):
    """Staging (``.NAME.tmp-PID-*``) and replaced (``.NAME.old-PID``) directories that
    earlier exports to ``save_dir`` left when they were killed: removed when their
    process is gone, reported when their owner is unknown."""
    for path in sorted(save_dir.parent.glob(f".{save_dir.name}.*-*")):
        kind, _, rest = path.name[len(save_dir.name) + 2:].partition("-")
        if kind not in ("tmp", "old"):
            continue
        pid = rest.partition("-")[0]
        if not pid.isdigit():
            logger.warning(f"{path}: left by an interrupted export (owner unknown); "
                           "remove it if no export is running")
        elif not _process_alive(int(pid)):
            _remove(path)
            logger.info(f"Removed {path}, left by an interrupted export")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
