"""
Which linears of a decoder layer share one learned Kronecker transform, and where
the optional smoothing vector is folded, per architecture.

A mapping lists regexes (compressed-tensors ``re:`` syntax, matched against module
names relative to the decoder layer). All ``targets`` of one mapping read the same
input activation, so they get one transform (vllm-ascend fuses q/k/v and gate/up and
needs identical ``left_trans``/``right_trans``/``clip_ratio`` on the siblings).
"""

from dataclasses import dataclass

import torch
from compressed_tensors.utils import is_match, match_named_modules
from loguru import logger
from pydantic import BaseModel, ConfigDict, Field
from torch.nn import Module

from flatquant_modifier.formats import (
    INT4_PER_INT32,
    is_row_parallel,
    mxfp4_problem,
    npu_kronecker_problem,
)
from flatquant_modifier.kronecker import get_decompose_dim, mxfp4_trans_dims

__all__ = [
    "FlatQuantMapping",
    "ResolvedGroup",
    "resolve_layer",
    "LLAMA_MAPPINGS",
    "GEMMA_MAPPINGS",
    "QWEN_MOE_MAPPINGS",
    "QWEN2_MOE_MAPPINGS",
    "DEEPSEEK_V3_MAPPINGS",
    "FLATQUANT_MAPPING_REGISTRY",
    "infer_mappings_from_model",
    "relative_name",
]


class FlatQuantMapping(BaseModel):
    """
    :param name: short name of the transformed input, e.g. ``"qkv"``; used in logs
    :param targets: linears that read this input (regexes or names, relative to the
        decoder layer); each must match at least one module in every decoder layer,
        unless the mapping is ``optional``
    :param smooth_layer: module whose output is this input, into which the smoothing
        vector is folded: a norm (its ``weight`` is divided) or a linear (its output
        rows are divided). ``None`` (or a shape that cannot be folded) disables
        smoothing for this input.
    :param optional: layers without these modules skip the mapping (the dense layers
        of an MoE model have no shared experts; its MoE layers no dense MLP)
    """

    name: str
    targets: list[str] = Field(min_length=1)
    smooth_layer: str | None = None
    optional: bool = False

    model_config = ConfigDict(extra="forbid")


LLAMA_MAPPINGS = [
    FlatQuantMapping(
        name="qkv",
        targets=["re:.*self_attn\\.q_proj$", "re:.*self_attn\\.k_proj$", "re:.*self_attn\\.v_proj$"],
        smooth_layer="re:.*input_layernorm$",
    ),
    FlatQuantMapping(
        name="o",
        targets=["re:.*self_attn\\.o_proj$"],
        smooth_layer="re:.*self_attn\\.v_proj$",
    ),
    FlatQuantMapping(
        name="gate_up",
        targets=["re:.*mlp\\.gate_proj$", "re:.*mlp\\.up_proj$"],
        smooth_layer="re:.*post_attention_layernorm$",
    ),
    FlatQuantMapping(
        name="down",
        targets=["re:.*mlp\\.down_proj$"],
        smooth_layer="re:.*mlp\\.up_proj$",
    ),
]

# Gemma 2/3 normalise the attention output before the residual add
# (post_attention_layernorm); the MLP reads pre_feedforward_layernorm's output
GEMMA_MAPPINGS = [
    *LLAMA_MAPPINGS[:2],
    FlatQuantMapping(
        name="gate_up",
        targets=["re:.*mlp\\.gate_proj$", "re:.*mlp\\.up_proj$"],
        smooth_layer="re:.*pre_feedforward_layernorm$",
    ),
    LLAMA_MAPPINGS[3],
]

# MoE models: vllm-ascend has no FlatQuant method for routed experts (its MoE methods
# are W8A8_DYNAMIC, W4A8_DYNAMIC, ...), so they are not mapped: list them in
# `w8a8_dynamic` (recipes/flatquant_w4a4_moe.yaml). Routers stay in full precision.
# Dense MLPs (Qwen MoE `mlp_only_layers`, DeepSeek's first layers) and shared experts
# are mapped where a layer has them.
_DENSE_MLP = [m.model_copy(update={"optional": True}) for m in LLAMA_MAPPINGS[2:]]

# Qwen3-MoE, Mixtral (transformers 5 names its MoE block `mlp`)
QWEN_MOE_MAPPINGS = [*LLAMA_MAPPINGS[:2], *_DENSE_MLP]



def _shared_experts(module: str) -> list[FlatQuantMapping]:
    """The gate/up and down inputs of a shared expert ``mlp.<module>``. Its input is
    also the router's and the routed experts', so no smoothing folds into the norm."""
    prefix = f"re:.*mlp\\.{module}\\."
    return [
        FlatQuantMapping(name="shared_gate_up", optional=True,
                         targets=[f"{prefix}gate_proj$", f"{prefix}up_proj$"]),
        FlatQuantMapping(name="shared_down", optional=True, targets=[f"{prefix}down_proj$"],
                         smooth_layer=f"{prefix}up_proj$"),
    ]


# Qwen2-MoE: a shared expert (with a sigmoid gate) beside the routed ones
QWEN2_MOE_MAPPINGS = [*QWEN_MOE_MAPPINGS, *_shared_experts("shared_expert")]

# DeepSeek-V3 (MLA): q_a_proj and kv_a_proj_with_mqa read the normed hidden states
# (vllm-ascend fuses them as fused_qkv_a_proj); q_b_proj reads q_a_layernorm's output.
# kv_b_proj stays in full precision: vllm-ascend's MLA reads its weight unquantized.
DEEPSEEK_V3_MAPPINGS = [
    FlatQuantMapping(
        name="qkv_a",
        targets=["re:.*self_attn\\.q_a_proj$", "re:.*self_attn\\.kv_a_proj_with_mqa$"],
        smooth_layer="re:.*input_layernorm$",
    ),
    FlatQuantMapping(
        name="q_b",
        targets=["re:.*self_attn\\.q_b_proj$"],
        smooth_layer="re:.*self_attn\\.q_a_layernorm$",
    ),
    FlatQuantMapping(name="o", targets=["re:.*self_attn\\.o_proj$"]),
    *_DENSE_MLP,
    *_shared_experts("shared_experts"),
]

# keyed on the model's class name, as llm-compressor's AWQ/SpinQuant registries are
FLATQUANT_MAPPING_REGISTRY: dict[str, list[FlatQuantMapping]] = {
    **{
        name: LLAMA_MAPPINGS
        for name in (
            "LlamaForCausalLM",
            "MistralForCausalLM",
            "Qwen2ForCausalLM",
            "Qwen3ForCausalLM",
        )
    },
    **{name: GEMMA_MAPPINGS for name in ("Gemma2ForCausalLM", "Gemma3ForCausalLM")},
    **{name: QWEN_MOE_MAPPINGS for name in ("Qwen3MoeForCausalLM", "MixtralForCausalLM")},
    "Qwen2MoeForCausalLM": QWEN2_MOE_MAPPINGS,
    "DeepseekV3ForCausalLM": DEEPSEEK_V3_MAPPINGS,
}


def infer_mappings_from_model(model: Module) -> list[FlatQuantMapping]:
    """Default mappings for ``model``'s architecture, or a clear error."""
    arch = model.__class__.__name__
    if arch in FLATQUANT_MAPPING_REGISTRY:
        logger.info(f"FlatQuantModifier: using the default mappings for {arch}")
        return [m.model_copy(deep=True) for m in FLATQUANT_MAPPING_REGISTRY[arch]]
    supported = ", ".join(sorted(FLATQUANT_MAPPING_REGISTRY))
    raise ValueError(
        f"FlatQuantModifier has no default mappings for architecture {arch} "
        f"(supported: {supported}). Pass them explicitly, one entry per transformed "
        "input. The layout of Llama, NOT checked for this architecture: each "
        "smooth_layer must be the module whose output is exactly the targets' input "
        "(FlatQuant checks that numerically and turns smoothing off where it is not), "
        "e.g. in YAML:\n"
        "  mappings:\n"
        "    - {name: qkv, targets: ['re:.*q_proj$', 're:.*k_proj$', 're:.*v_proj$'], "
        "smooth_layer: 're:.*input_layernorm$'}\n"
        "    - {name: o, targets: ['re:.*o_proj$']}\n"
        "    - {name: gate_up, targets: ['re:.*gate_proj$', 're:.*up_proj$'], "
        "smooth_layer: 're:.*post_attention_layernorm$'}\n"
        "    - {name: down, targets: ['re:.*down_proj$'], smooth_layer: 're:.*up_proj$'}\n"
        "or in Python: FlatQuantModifier(mappings=[FlatQuantMapping(...), ...]) "
        "(see flatquant_modifier.mappings.LLAMA_MAPPINGS)."
    )


@dataclass
class ResolvedGroup:
    """
    One mapping resolved inside one decoder layer.

    :param name: ``"<layer name>.<mapping name>"``
    :param linears: ``(full name, module)`` of the linears sharing the transform
    :param smooth: ``(full name, module)`` the smoothing vector is folded into
    :param smooth_index: for a linear smooth layer with fewer output channels than the
        linears' inputs (grouped-query attention: v_proj -> o_proj), the smooth-layer
        channel feeding each input channel; ``None`` when they map one to one
    :param m: left Kronecker factor size
    :param n: right Kronecker factor size
    :param npu_problem: why vllm-ascend cannot run this group's transform
        (:func:`flatquant_modifier.formats.npu_kronecker_problem`, or
        :func:`~flatquant_modifier.formats.mxfp4_problem`), when resolved with
        ``npu_fallback``: the group is then not transformed
    :param left_blocks: the left factor is block-diagonal with this many blocks
        (W4A4_MXFP4_FLATQUANT's row-parallel linears: one block per tensor-parallel
        rank up to ``max_supported_tp``)
    """

    name: str
    linears: list[tuple[str, Module]]
    smooth: tuple[str, Module] | None
    smooth_index: torch.Tensor | None
    m: int
    n: int
    npu_problem: str | None = None
    left_blocks: int = 1

    @property
    def in_features(self) -> int:
        return self.m * self.n


def resolve_layer(
    layer_name: str,
    layer: Module,
    mappings: list[FlatQuantMapping],
    ignore: list[str] | None = None,
    npu_fallback: bool = False,
    max_supported_tp: int | None = None,
) -> list[ResolvedGroup]:
    """
    Resolve ``mappings`` inside one decoder layer. A mapping whose linears are all in
    ``ignore`` is skipped, and an ``optional`` one that matches nothing; a partial or
    missing match is an error naming the layer.

    :param npu_fallback: a group whose ``in_features`` vllm-ascend's
        ``npu_kronecker_quant`` cannot take is returned with ``npu_problem`` set
        (the caller serves it otherwise) instead of being refused or warned about
    :param max_supported_tp: resolve for vllm-ascend's ``W4A4_MXFP4_FLATQUANT`` (None:
        ``W4A4_FLATQUANT_DYNAMIC`` and the other formats): transform sizes as its
        ``get_decompose_dim``, row-parallel linears' left factor in this many blocks
    """
    groups = []
    for mapping in mappings:
        matched = list(match_named_modules(layer, mapping.targets))
        if not matched and mapping.optional:
            continue
        if not matched:
            raise ValueError(
                f"FlatQuant mapping {mapping.name!r} matched no module in layer "
                f"{layer_name} (targets {mapping.targets}). Pass `mappings=` that fit "
                "this architecture (see flatquant_modifier.mappings.LLAMA_MAPPINGS)."
            )
        named = [(_join(layer_name, n), m) for n, m in matched]
        kept = [(n, m) for n, m in named if not _is_ignored(n, m, ignore)]
        if not kept:
            continue
        if len(kept) != len(named):
            raise ValueError(
                f"FlatQuant mapping {mapping.name!r} in layer {layer_name}: `ignore` "
                f"(or `w8a8_dynamic`) removes only some of {[n for n, _ in named]}; they "
                "share one transform (and vLLM fuses them), so list all of them or none."
            )
        if max_supported_tp is None:
            group = _resolve_group(layer_name, layer, mapping, kept, npu_fallback)
        else:
            group = _resolve_mxfp4_group(layer_name, layer, mapping, kept, npu_fallback,
                                         max_supported_tp)
        groups.append(group)
    return groups


def _in_features(mapping: FlatQuantMapping, linears: list[tuple[str, Module]]) -> int:
    """The one input size of a group's linears."""
    names = [n for n, _ in linears]
    for name, module in linears:
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(
                f"FlatQuant target {name} is a {type(module).__name__}, not a Linear"
            )
    sizes = {m.in_features for _, m in linears}
    if len(sizes) != 1:
        raise ValueError(
            f"FlatQuant mapping {mapping.name!r}: {names} share one transform but have "
            f"different in_features {sorted(sizes)}"
        )
    return sizes.pop()


def _full_precision_fix(names: list[str]) -> str:
    """What works instead of a transform: the whole group (it shares one transform)
    left unquantized."""
    return (
        f"Add {names if len(names) > 1 else names[0]} to `ignore` of FlatQuantModifier "
        "and of the weight quantizer to keep "
        + ("them" if len(names) > 1 else "it") + " in full precision"
    )


def _resolve_mxfp4_group(layer_name, layer, mapping, linears, npu_fallback,
                         max_supported_tp) -> ResolvedGroup:
    """A group sized as vllm-ascend's W4A4_MXFP4_FLATQUANT sizes it."""
    names = [n for n, _ in linears]
    in_features = _in_features(mapping, linears)
    rows = {is_row_parallel(name) for name in names}
    if len(rows) != 1:
        raise ValueError(
            f"FlatQuant mapping {mapping.name!r}: {names} share one transform, but vLLM "
            "splits the inputs of only some of them across ranks (row-parallel); map "
            "them separately"
        )
    row = rows.pop()
    problem = mxfp4_problem(in_features, row, max_supported_tp)
    group_name = _join(layer_name, mapping.name)
    if problem is not None:
        if npu_fallback:
            return ResolvedGroup(group_name, linears, None, None, 1, in_features,
                                 npu_problem=problem)
        raise ValueError(f"FlatQuant: {names[0]}: {problem}, so vllm-ascend cannot run "
                         f"its W4A4_MXFP4_FLATQUANT transform. {_full_precision_fix(names)}.")
    m, n = mxfp4_trans_dims(in_features, row, max_supported_tp)
    smooth, smooth_index = _resolve_smooth(layer_name, layer, mapping, linears)
    return ResolvedGroup(group_name, linears, smooth, smooth_index, m, n,
                         left_blocks=max_supported_tp if row else 1)


def _resolve_group(
    layer_name: str,
    layer: Module,
    mapping: FlatQuantMapping,
    linears: list[tuple[str, Module]],
    npu_fallback: bool = False,
) -> ResolvedGroup:
    names = [n for n, _ in linears]
    in_features = _in_features(mapping, linears)
    # sizes that are 2 mod 4 are no difference of two squares (refused below)
    m, n = get_decompose_dim(in_features) if in_features % 4 != 2 else (1, in_features)
    if npu_fallback and (problem := npu_kronecker_problem(in_features)) is not None:
        return ResolvedGroup(_join(layer_name, mapping.name), linears, None, None, m, n,
                             npu_problem=problem)
    fix = _full_precision_fix(names)
    if m == 1:
        raise ValueError(
            f"FlatQuant: in_features={in_features} of {names[0]} only decomposes as "
            f"1 x {n} (a prime size, or 2 mod 4), so the Kronecker transform would be "
            f"one dense {n}x{n} matrix at best; refusing. {fix}."
        )
    if in_features % INT4_PER_INT32 != 0:
        raise ValueError(
            f"FlatQuant: {names[0]} has in_features={in_features}, not divisible by "
            f"{INT4_PER_INT32}; int4 activations are packed {INT4_PER_INT32} per int32 on "
            f"Ascend. {fix}."
        )
    problem = npu_kronecker_problem(in_features)
    if problem is not None:
        logger.warning(
            f"FlatQuant: {names[0]}: {problem}, so this layer cannot be exported to the "
            "Ascend W4A4_FLATQUANT_DYNAMIC format"
        )
    smooth, smooth_index = _resolve_smooth(layer_name, layer, mapping, linears)
    return ResolvedGroup(
        name=_join(layer_name, mapping.name),
        linears=linears,
        smooth=smooth,
        smooth_index=smooth_index,
        m=m,
        n=n,
    )


def _resolve_smooth(layer_name, layer, mapping, linears):
    if mapping.smooth_layer is None:
        return None, None
    matched = list(match_named_modules(layer, [mapping.smooth_layer]))
    if len(matched) != 1:
        logger.warning(
            f"FlatQuant mapping {mapping.name!r} in {layer_name}: smooth_layer "
            f"{mapping.smooth_layer!r} matched {len(matched)} modules; smoothing off"
        )
        return None, None
    rel_name, module = matched[0]
    name = _join(layer_name, rel_name)
    in_features = linears[0][1].in_features
    weight = getattr(module, "weight", None)
    if weight is None:
        return None, None
    if weight.ndim == 1 and weight.shape[0] == in_features:
        return (name, module), None
    if weight.ndim == 2 and weight.shape[0] == in_features:
        return (name, module), None
    index = _gqa_index(layer, rel_name, weight.shape[0], in_features)
    if weight.ndim == 2 and index is not None:
        return (name, module), index
    logger.debug(
        f"FlatQuant: cannot fold smoothing of {mapping.name!r} into {name} "
        f"({tuple(weight.shape)} vs {in_features} inputs); smoothing off"
    )
    return None, None


def _gqa_index(layer: Module, smooth_rel_name: str, produced: int, consumed: int):
    """Input channel -> v_proj channel map of grouped-query attention, if it is one."""
    parent_name = smooth_rel_name.rpartition(".")[0]
    parent = layer.get_submodule(parent_name) if parent_name else layer
    head_dim = getattr(parent, "head_dim", None)
    if not head_dim or consumed % produced or produced % head_dim:
        return None
    groups = consumed // produced
    channel = torch.arange(consumed)
    head, dim = channel // head_dim, channel % head_dim
    return (head // groups) * head_dim + dim


def _is_ignored(name: str, module: Module, ignore: list[str] | None) -> bool:
    return bool(ignore) and any(is_match(name, module, target) for target in ignore)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def relative_name(layer_name: str, name: str) -> str:
    """``name`` (a module of the model) relative to the decoder layer ``layer_name``."""
    return name[len(layer_name) + 1:] if layer_name else name
