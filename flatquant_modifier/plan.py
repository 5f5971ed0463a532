"""
What FlatQuant does to each decoder layer, decided at initialize: the groups that get
a learned transform, and the linears served as vllm-ascend's ``W8A8_DYNAMIC`` (listed
in ``w8a8_dynamic``, or whose size ``npu_kronecker_quant`` cannot take). At
calibration start the following weight quantizer's schemes are checked against it,
so that a recipe that could not be exported fails before hours of calibration.
"""

from dataclasses import dataclass, field
from typing import Literal

from compressed_tensors.utils import is_match
from loguru import logger
from torch.nn import Linear, Module

from flatquant_modifier.formats import (
    ASCEND_FLOAT_ONLY,
    NVFP4_GROUP_SIZE,
    W4A4_FLATQUANT_DYNAMIC,
    W4A4_MXFP4_FLATQUANT,
    W8A8_DYNAMIC,
    expert_of,
    is_int_channel_symmetric,
    is_mxfp4_weights,
    shared_experts_problem,
)
from flatquant_modifier.mappings import FlatQuantMapping, ResolvedGroup, relative_name, resolve_layer

__all__ = ["LayerPlan", "plan_layers", "check_weight_schemes", "check_shared_calibration"]

Undecomposable = Literal["w8a8_dynamic", "float", "error"]


@dataclass
class LayerPlan:
    """One decoder layer: its transformed groups and its W8A8_DYNAMIC linears."""

    name: str
    module: Module
    groups: list[ResolvedGroup]
    int8: list[tuple[str, Module]] = field(default_factory=list)
    # groups left in full precision (undecomposable="float")
    float: list[tuple[str, Module]] = field(default_factory=list)


def plan_layers(
    layers: list[tuple[str, Module]],
    mappings: list[FlatQuantMapping],
    ignore: list[str],
    w8a8_dynamic: list[str],
    undecomposable: Undecomposable,
    ascend: bool,
    nvfp4: bool,
    max_supported_tp: int | None = None,
) -> list[LayerPlan]:
    """
    Resolve ``mappings`` in every decoder layer (``layers``: name, module).

    :param ascend: the model targets vllm-ascend's W4A4 (int4 activations quantized by
        the transform): groups ``npu_kronecker_quant`` cannot take follow
        ``undecomposable``
    :param max_supported_tp: plan for vllm-ascend's W4A4_MXFP4_FLATQUANT (None: any
        other format), see :func:`~flatquant_modifier.mappings.resolve_layer`
    :raises ValueError: naming the layer, for sizes no format can take, a
        ``w8a8_dynamic`` pattern that matches no linear, or ``undecomposable="error"``
    """
    plans, matched_int8 = [], False
    for name, layer in layers:
        groups = resolve_layer(name, layer, mappings, [*ignore, *w8a8_dynamic],
                               npu_fallback=ascend, max_supported_tp=max_supported_tp)
        # the full names, as resolve_layer matches `ignore` and `w8a8_dynamic`: a linear
        # is either in a transformed group or in this list, never both
        int8 = [
            (full, module) for rel, module in layer.named_modules()
            if isinstance(module, Linear)
            and any(is_match(full := f"{name}.{rel}", module, t) for t in w8a8_dynamic)
        ]
        matched_int8 |= bool(int8)
        if both := [n for n, m in int8 if any(is_match(n, m, t) for t in ignore)]:
            raise ValueError(
                f"FlatQuant: {both[0]} is in both `ignore` (left untouched) and "
                "`w8a8_dynamic` (int8 activations); list it in one of them"
            )
        _share_no_smoothing_producer(name, groups)
        plan = LayerPlan(name, layer, [g for g in groups if g.npu_problem is None], int8)
        fallback = [g for g in groups if g.npu_problem is not None]
        if fallback:
            _fall_back(plan, fallback, undecomposable)
        if nvfp4:
            _check_nvfp4_sizes(plan.groups)
        if ascend:
            _check_ascend_kinds(plan, W4A4_FLATQUANT_DYNAMIC if max_supported_tp is None
                                else W4A4_MXFP4_FLATQUANT)
        plans.append(plan)
    if w8a8_dynamic and not matched_int8:
        raise ValueError(
            f"FlatQuant: w8a8_dynamic {w8a8_dynamic} matches no linear in the decoder "
            "layers; give full names (model.layers.0.self_attn.o_proj) or 're:' regexes "
            "of linears inside them"
        )
    return plans


def _share_no_smoothing_producer(layer_name: str, groups: list[ResolvedGroup]):
    """Two groups folding their smoothing into one module would divide it twice while
    each group's weights absorb only their own vector: the later ones lose smoothing."""
    producers = set()
    for group in groups:
        if group.smooth is None:
            continue
        if group.smooth[0] in producers:
            logger.warning(
                f"FlatQuant {group.name}: its smooth_layer {group.smooth[0]} already "
                "takes another group's smoothing in this layer; smoothing off for it"
            )
            group.smooth, group.smooth_index = None, None
        else:
            producers.add(group.smooth[0])


def _fall_back(plan: LayerPlan, groups: list[ResolvedGroup], undecomposable: Undecomposable):
    names = [relative_name(plan.name, n) for g in groups for n, _ in g.linears]
    problems = "; ".join(dict.fromkeys(g.npu_problem for g in groups))
    if undecomposable == "error":
        raise ValueError(
            f"FlatQuant: {names} in {plan.name}: {problems}, so vllm-ascend cannot run "
            "their W4A4 FlatQuant transform. Set undecomposable='w8a8_dynamic' (int8 "
            "weights and activations) or 'float', or add them to `ignore`."
        )
    linears = [linear for g in groups for linear in g.linears]
    if undecomposable == "w8a8_dynamic":
        plan.int8 += linears
        served = ("served as W8A8_DYNAMIC: int8 activations online, int8 per-channel "
                  "weights from the weight quantizer")
    else:
        plan.float += linears
        served = "kept in full precision (leave them out of the weight quantizer)"
    logger.info(f"FlatQuant {plan.name}: {names} not transformed ({problems}); {served}")


def _check_ascend_kinds(plan: LayerPlan, flatquant_type: str):
    """What vllm-ascend has no method for: FlatQuant on routed experts, anything but
    full precision on the linears of ``ASCEND_FLOAT_ONLY``."""
    for group in plan.groups:
        for name, _ in group.linears:
            if expert_of(name) is not None:
                raise ValueError(
                    f"FlatQuant mapping {group.name} transforms the routed expert {name}, "
                    "but vllm-ascend has no FlatQuant method for MoE experts (its MoE "
                    "methods are W8A8_DYNAMIC, W4A8_DYNAMIC, ...). Leave experts out of "
                    "`mappings` and list them in `w8a8_dynamic`, e.g. "
                    "'re:.*mlp\\.experts\\.\\d+\\.(gate|up|down)_proj$'."
                )
    quantized = [*(linear for group in plan.groups for linear in group.linears), *plan.int8]
    for name, _ in quantized:
        reason = ASCEND_FLOAT_ONLY.get(name.rpartition(".")[2])
        if reason:
            raise ValueError(
                f"FlatQuant: {name} must stay in full precision ({reason}); remove it "
                "from `mappings`/`w8a8_dynamic` and add it to the weight quantizer's "
                "`ignore`"
            )
    _check_shared_experts(plan, flatquant_type)


def _check_shared_experts(plan: LayerPlan, flatquant_type: str):
    """Shared experts beside int8 routed experts: W8A8_DYNAMIC or full precision, and
    full precision when gated (:func:`flatquant_modifier.formats.shared_experts_problem`)."""
    types = {name: flatquant_type for g in plan.groups for name, _ in g.linears}
    types.update({name: W8A8_DYNAMIC for name, _ in plan.int8})
    blocks = {expert_of(name)[0].rpartition(".")[0] for name, _ in plan.int8 if expert_of(name)}
    for block in sorted(blocks):
        module = plan.module.get_submodule(relative_name(plan.name, block))
        if problem := shared_experts_problem(module, block, types, W8A8_DYNAMIC):
            raise ValueError(
                f"FlatQuant: {problem}. List it in `w8a8_dynamic` with int8 weights "
                "(DeepSeek), or keep it in full precision: add it to FlatQuantModifier's "
                "and the weight quantizer's `ignore` (Qwen2-MoE; see "
                "recipes/flatquant_w4a4_moe.yaml)."
            )


def _check_nvfp4_sizes(groups: list[ResolvedGroup]):
    for group in groups:
        if group.in_features % NVFP4_GROUP_SIZE:
            raise ValueError(
                f"FlatQuant quant_format='nvfp4': {group.linears[0][0]} has "
                f"in_features={group.in_features}, not divisible by the NVFP4 "
                f"group size {NVFP4_GROUP_SIZE}; add it to `ignore`"
            )


def check_weight_schemes(plans: list[LayerPlan], quantizes_activations: bool,
                         mxfp4: bool = False):
    """
    The schemes the following weight quantizer attached must fit the plan:

    - transformed linears: no input-activation quantization when the transform
      quantizes them (it would quantize twice);
    - W8A8_DYNAMIC linears: int8 per-channel symmetric weights, no input-activation
      scheme (the int8 input quantizer is FlatQuant's, with the NPU formula); without
      any scheme (weights quantized by a later oneshot) a warning;
    - no output-activation quantization on either (no vllm-ascend method has it);
    - full-precision fallbacks: no scheme;
    - under vllm-ascend's W4A4 (``quantizes_activations``), no other linear of a
      decoder layer with quantized weights: no vllm-ascend method would compute what
      it computes (the export would refuse it after calibration);
    - under W4A4_MXFP4_FLATQUANT (``mxfp4``), transformed linears with weights get
      compressed-tensors' MXFP4 scheme (the E8M0 scales vllm-ascend loads).

    :raises ValueError: naming the linear and the fix
    """
    unquantized = []  # W8A8_DYNAMIC linears without a weight scheme (yet)
    for plan in plans:
        if quantizes_activations:
            _check_all_served(plan)
        online = [*(linear for group in plan.groups for linear in group.linears), *plan.int8]
        for name, linear in online:
            scheme = getattr(linear, "quantization_scheme", None)
            if getattr(scheme, "output_activations", None) is not None:
                raise ValueError(
                    f"{name}: its scheme quantizes output activations, which no "
                    "vllm-ascend linear method does; leave output_activations unset"
                )
        if quantizes_activations:
            for group in plan.groups:
                for name, linear in group.linears:
                    scheme = getattr(linear, "quantization_scheme", None)
                    weights = getattr(scheme, "weights", None)
                    if mxfp4 and weights is not None and not is_mxfp4_weights(weights):
                        raise ValueError(
                            f"{name} is served as W4A4_MXFP4_FLATQUANT, which stores "
                            "MXFP4 weights (FP4 E2M1, E8M0 scales per 32), but its weight "
                            f"scheme is {weights}. Give the weight quantizer "
                            "scheme: MXFP4A16 (see recipes/flatquant_mxfp4.yaml)."
                        )
                    if scheme is not None and scheme.input_activations is not None:
                        raise ValueError(
                            f"{name} has a quantization scheme that quantizes its input "
                            "activations, but FlatQuantModifier(a_bits=4) already "
                            "quantizes them in its online transform (Ascend formula, "
                            "learned clip ratio). Give the following QuantizationModifier"
                            "/GPTQModifier a weights-only scheme, or set a_bits=None to "
                            "leave activation quantization to that scheme."
                        )
        for name, linear in plan.int8:
            scheme = getattr(linear, "quantization_scheme", None)
            if scheme is None:
                unquantized.append(name)
                continue
            int8_channel = is_int_channel_symmetric(scheme.weights, 8)
            if not int8_channel or scheme.input_activations is not None:
                raise ValueError(
                    f"{name} is served as W8A8_DYNAMIC (int8 activations quantized "
                    "online by FlatQuantModifier), so the weight quantizer must give it "
                    "int8 per-channel symmetric weights and no input_activations; its "
                    f"scheme is {scheme}. Add a config group {{targets: [{name!r}], "
                    "weights: {num_bits: 8, type: int, symmetric: true, strategy: "
                    "channel}} (see recipes/flatquant_w4a4_mixed.yaml), or keep it in full "
                    "precision with undecomposable='float' (fallback layers only)."
                )
        for name, linear in plan.float:
            if getattr(linear, "quantization_scheme", None) is not None:
                raise ValueError(
                    f"{name} is kept in full precision (undecomposable='float') but the "
                    "weight quantizer gave it a scheme; add it to that modifier's "
                    "`ignore`, or use undecomposable='w8a8_dynamic'."
                )
    if unquantized:
        logger.warning(
            f"FlatQuant: {len(unquantized)} linears served as W8A8_DYNAMIC have no weight "
            f"scheme yet (e.g. {unquantized[0]}); give them int8 per-channel weights "
            "before exporting (or undecomposable='float' to keep fallbacks in full "
            "precision)"
        )


def _check_all_served(plan: LayerPlan):
    served = {name for group in plan.groups for name, _ in group.linears}
    served |= {name for name, _ in plan.int8}
    served |= {name for name, _ in plan.float}  # checked below, with their own message
    for rel, module in plan.module.named_modules():
        name = f"{plan.name}.{rel}"
        weights = getattr(getattr(module, "quantization_scheme", None), "weights", None)
        if weights is None or name in served or not isinstance(module, Linear):
            continue
        reason = ASCEND_FLOAT_ONLY.get(rel.rpartition(".")[2])
        if reason:
            fix = f"It must stay in full precision ({reason}): add it to that modifier's `ignore`."
        elif expert_of(name):
            fix = ("vllm-ascend serves routed experts as W8A8_DYNAMIC: list them in "
                   "FlatQuantModifier's `w8a8_dynamic` with int8 per-channel weights "
                   "(recipes/flatquant_w4a4_moe.yaml), or add them to the weight "
                   "quantizer's `ignore`.")
        else:
            fix = ("Map it to a FlatQuant transform (`mappings`), list it in "
                   "`w8a8_dynamic` with int8 weights, or add it to the weight "
                   "quantizer's `ignore`.")
        raise ValueError(
            f"{name} gets {weights.num_bits}-bit weights from the weight quantizer but "
            f"neither a FlatQuant transform nor an int8 input quantizer, so no "
            f"vllm-ascend method computes it. {fix}"
        )


# modifiers that learn from the inputs of the linears they quantize
DATA_DEPENDENT_MODIFIERS = ("GPTQModifier", "AWQModifier", "SmoothQuantModifier",
                            "SparseGPTModifier")


def check_shared_calibration(flatquant, modifiers: list, plans: list[LayerPlan]) -> list:
    """
    FlatQuant attaches a layer's transforms after the pipeline's calibration pass of
    that layer. A modifier that learns from the linears' inputs in the same pass would
    see the untransformed inputs and quantize the transformed weights against them.
    A ``GPTQModifier`` listed after FlatQuant may share the pass (``oneshot(...,
    pipeline="sequential")``): FlatQuant carries the Hessians it gathered there
    through the layer's transforms
    (:func:`flatquant_modifier.compat.transform_gptq_hessians`), and the next
    layer trains on the outputs of this layer's GPTQ weights. Any other such modifier
    (AWQ, SmoothQuant, SparseGPT, a GPTQ listed first, the input observers of a static
    or NVFP4 activation scheme) is refused: llm-compressor's default
    ``pipeline="independent"`` gives every modifier its own pass.

    :param modifiers: the modifiers of the current calibration pass
    :return: the GPTQ modifiers whose Hessians FlatQuant transforms
    """
    others = [m for m in modifiers if m is not flatquant]
    if not others:
        return []
    # by identity: pydantic modifiers with equal fields compare equal
    position = next(i for i, m in enumerate(modifiers) if m is flatquant)
    if any(_is_gptq(m) for m in modifiers[:position]):
        raise ValueError(
            "GPTQModifier comes before FlatQuantModifier in a calibration pass they "
            "share, so it would quantize the weights before FlatQuant transforms them. "
            "List FlatQuantModifier first in the recipe."
        )
    learning = [type(m).__name__ for m in others
                if type(m).__name__ in DATA_DEPENDENT_MODIFIERS and not _is_gptq(m)]
    observed = [
        name for plan in plans for group in plan.groups for name, linear in group.linears
        if getattr(getattr(linear, "quantization_scheme", None), "input_activations", None)
        is not None
    ]
    if learning or observed:
        what = learning or [f"the activation scheme of {observed[0]}"]
        raise ValueError(
            f"FlatQuantModifier shares its calibration pass with {', '.join(what)}, "
            "which would learn from inputs before FlatQuant transforms them. Use "
            "oneshot's default pipeline='independent' (each modifier its own pass, "
            "FlatQuant's first); only a GPTQModifier after FlatQuant may share it."
        )
    return [m for m in modifiers[position + 1:] if _is_gptq(m)]


def _is_gptq(modifier) -> bool:
    return type(modifier).__name__ == "GPTQModifier"
