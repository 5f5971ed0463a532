"""
One decoder layer's FlatQuant calibration, from the calls the sequential pipeline
cached to the applied result:

1. the cached calls split into samples, the samples into optimisation steps
   (:mod:`flatquant_modifier.batching`; the same steps for any oneshot batch size);
2. the layer's full-precision outputs (the targets: on its cached inputs, or with
   ``target_outputs="model"`` on the full-precision model's hidden states, which the
   caller carries from layer to layer) and per-channel input maxima: those the
   pipeline's calibration pass recorded where the layer still gives them
   (:func:`recorded_targets`), else from one more pass (routed MoE experts, unquantized
   until after training, as grouped GEMMs on CUDA: :mod:`flatquant_modifier.experts`);
3. the initial learnable state (:func:`flatquant_modifier.modules.build_group_params`);
4. training (:func:`flatquant_modifier.train.train_layer`; the last decoder layer
   optionally on the logits' error, :mod:`flatquant_modifier.logits_loss`);
5. the weights absorb the result and the online transforms are attached
   (:func:`flatquant_modifier.absorb.absorb_group`), written in one barrier
   (:func:`flatquant_modifier.distributed.write_parameters`), and the layer's
   ``W8A8_DYNAMIC`` linears get their int8 input quantizers.

Stateless: :class:`~flatquant_modifier.modifier.FlatQuantModifier` calls
:func:`calibrate_layer` once per decoder layer and keeps what spans layers.
"""

import contextlib
from dataclasses import dataclass, field

import torch
from compressed_tensors.utils import align_module_device, get_execution_device
from llmcompressor.modifiers.utils.hooks import HooksMixin
from loguru import logger
from torch.nn import Module
from tqdm import tqdm

from flatquant_modifier.absorb import PendingWrites, absorb_group
from flatquant_modifier.attention import training_attention
from flatquant_modifier.batching import (
    TARGET,
    assign_steps,
    call_keys,
    first_sub_batch,
    layer_input,
    plan_steps,
    pop_targets,
    split_calls,
    without_target,
)
from flatquant_modifier.compat import routed_experts_only
from flatquant_modifier.distributed import all_reduce_, write_parameters
from flatquant_modifier.emulation import layer_output, same_output
from flatquant_modifier.experts import grouped_experts
from flatquant_modifier.logits_loss import logits_loss
from flatquant_modifier.mappings import ResolvedGroup
from flatquant_modifier.modules import GroupParams, build_group_params
from flatquant_modifier.options import FlatQuantOptions, training_precision
from flatquant_modifier.smoothing import SmoothingCheck
from flatquant_modifier.train import (
    LayerReport,
    NonFiniteLossError,
    deterministic_algorithms,
    log_report,
    train_layer,
)
from flatquant_modifier.transform import (
    attach_dynamic_int8,
    attach_transforms,
    get_flatquant_transform,
)

__all__ = [
    "StepPlan",
    "LayerResult",
    "calibrate_layer",
    "full_precision_pass",
    "recorded_targets",
    "channel_max",
    "with_hidden_states",
    "apply_layer",
    "attach_int8_quantizers",
    "check_finite_parameters",
    "check_finite_targets",
]

# the optimisation step of each sample and the number of steps (same on all ranks)
StepPlan = tuple[list[int], int]


@dataclass
class LayerResult:
    report: LayerReport
    transformed: list[str]  # names of the linears given an online transform
    step_plan: StepPlan
    int8: list[str]  # names of the linears given an int8 input quantizer
    # the full-precision outputs per step and sub-batch (target_outputs="model": the
    # next layer's full-precision hidden states), else None
    outputs: list[list[torch.Tensor]] | None = None
    # the attention implementation the layer trained with (training_attention)
    attention: str | None = None
    # per linear in ``transformed`` whose inputs a smoothing vector divides (folded into
    # their producer), that vector; its online transform then acts on the quotient
    input_smoothing: dict[str, torch.Tensor] = field(default_factory=dict)


def calibrate_layer(
    model: Module,
    name: str,
    layer: Module,
    groups: list[ResolvedGroup],
    calls: list[dict],
    options: FlatQuantOptions,
    *,
    seed: int,
    step_plan: StepPlan | None = None,
    attn_implementation: str | None = None,
    smoothing: SmoothingCheck | None = None,
    int8_linears: list[str] = (),
    logits: bool = False,
    hidden_states: list[list[torch.Tensor]] | None = None,
    input_max: list[torch.Tensor | None] | None = None,
) -> LayerResult:
    """
    Train and apply FlatQuant on one decoder layer (see the module docstring).

    :param calls: the layer's cached call arguments, one dict per pipeline call; each
        may carry the layer's output in the pipeline's calibration pass
        (:data:`~flatquant_modifier.batching.TARGET`), which is taken out of it
    :param seed: seed of this layer's random initialisation
    :param step_plan: the plan made at the first layer (its inputs, the embeddings,
        are equal for equal samples in any process); None makes it from ``calls``
    :param attn_implementation: the model's attention implementation before
        calibration (:func:`flatquant_modifier.attention.training_attention`)
    :param smoothing: turns off smoothing that cannot be folded exactly
    :param int8_linears: the layer's linears served as ``W8A8_DYNAMIC``: after
        training they get per-token int8 input quantizers (NPU formula)
    :param logits: train on the MSE of the logits the layer's outputs give
        (:mod:`flatquant_modifier.logits_loss`; the model's last decoder layer)
    :param hidden_states: ``target_outputs="model"``: the full-precision model's inputs
        of this layer per step and sub-batch (the previous layer's ``outputs``); the
        targets are the layer's outputs on them. None: on the cached inputs (the first
        layer, whose inputs are the embeddings)
    :param input_max: per group, the per-channel max|input| of its linears in the
        pipeline's calibration pass (:func:`channel_max`), None where not recorded
    :raises NonFiniteLossError: weights, targets or loss are NaN/Inf; the layer is
        left unchanged
    """
    device = get_execution_device(layer)
    if device == "disk" or not isinstance(device, torch.device):
        device = torch.device("cpu")
    samples = split_calls(calls)
    if not all(TARGET in call for call in samples):  # outputs used only if all recorded
        samples = [without_target(call) for call in samples]
    probe = without_target(samples[0])  # one sample, for the smoothing check
    if step_plan is None or len(step_plan[0]) != len(samples):
        step_plan = assign_steps(call_keys(samples), options.batch_size)
    steps, recorded = pop_targets(plan_steps(samples, *step_plan))
    del samples
    for call in calls:  # the steps hold them now (merged): no second copy in memory
        call.pop(TARGET, None)
    precision = training_precision(options, layer, device)
    with contextlib.ExitStack() as stack:
        stack.enter_context(align_module_device(layer))
        stack.enter_context(HooksMixin.disable_hooks())
        stack.enter_context(deterministic_algorithms(options.deterministic))
        stack.enter_context(routed_experts_only())
        check_finite_parameters(name, layer)
        if smoothing is not None:
            smoothing.apply(name, layer, groups, probe, device)
        steps = stack.enter_context(
            training_attention(model, layer, steps, attn_implementation, name)
        )
        attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
        with grouped_experts(layer):  # unquantized routed experts, fast
            # the input maxima are those of the inputs the transforms will see
            reused = recorded_targets(name, layer, steps, groups, device, recorded,
                                      input_max, outputs=hidden_states is None)
            del recorded
            targets, act_max = reused or full_precision_pass(
                layer, steps, groups, device, outputs=hidden_states is None
            )
            if hidden_states is not None:  # no groups: the maxima are taken above
                fp_steps = with_hidden_states(name, steps, hidden_states)
                targets, _ = full_precision_pass(layer, fp_steps, [], device)
                del fp_steps
            check_finite_targets(name, targets)
            generator = torch.Generator().manual_seed(seed)
            params = build_group_params(
                groups, act_max, options, precision.dtype, device, generator
            )
            loss_fn = logits_loss(model, device, precision.dtype) if logits else None
            report = train_layer(
                name, layer, groups, params, steps, targets, options, precision, device,
                loss_fn,
            )
        transformed = apply_layer(model, groups, params, options, precision.dtype)
        int8 = attach_int8_quantizers(model, list(int8_linears), options)
        input_smoothing = {
            linear_name: p.smooth_vector().detach()
            for group, p in zip(groups, params) if p.smooth is not None
            for linear_name, _ in group.linears
        }
    log_report(report)
    outputs = targets if options.target_outputs == "model" else None
    return LayerResult(report, transformed, step_plan, int8, outputs, attention,
                       input_smoothing)


def with_hidden_states(
    name: str, steps: list[list[dict]], hidden_states: list[list[torch.Tensor]]
) -> list[list[dict]]:
    """
    ``steps`` with each sub-batch's layer input
    (:func:`~flatquant_modifier.batching.layer_input`) replaced by ``hidden_states``,
    the full-precision model's, of the same step plan.

    :raises ValueError: if they do not have the sub-batches' shapes
    """
    shapes = [[tuple(h.shape) for h in step] for step in hidden_states]
    if shapes != [[tuple(layer_input(kwargs)[1].shape) for kwargs in step] for step in steps]:
        raise ValueError(
            f"FlatQuant: the full-precision hidden states carried to layer {name} do "
            "not match its cached inputs (another step plan or sample set); "
            "target_outputs='model' needs every decoder layer calibrated in order on "
            "the same samples"
        )
    out = []
    for step, step_hidden in zip(steps, hidden_states):
        out.append([{**kwargs, layer_input(kwargs)[0]: hidden}
                    for kwargs, hidden in zip(step, step_hidden)])
    return out


@torch.no_grad()
def apply_layer(
    model: Module,
    groups: list[ResolvedGroup],
    params: list[GroupParams],
    options: FlatQuantOptions,
    dtype: torch.dtype,
) -> list[str]:
    """
    Absorb every group's trained state into the weights (float64) and attach its
    online transform (matrices in ``dtype``), all values computed before one write.

    :return: the names of the linears given an online transform
    """
    writes = PendingWrites()
    transformed = []
    for group, group_params in zip(groups, params):
        p1, p2, clip_ratio = absorb_group(group, group_params, dtype, writes)
        names = [linear_name for linear_name, _ in group.linears]
        clip = torch.tensor([clip_ratio], dtype=torch.float32, device=p1.device)
        for transform in attach_transforms(model, names, p1.dtype, _activations(options),
                                           _block_size(group)):
            writes.write(transform, "left_trans", p1)
            writes.write(transform, "right_trans", p2)
            writes.write(transform, "clip_ratio", clip)
        transformed += names
    write_parameters(writes.updates)
    for group in groups:
        for _, linear in group.linears:
            _follow_propagation(get_flatquant_transform(linear), linear, options)
    return transformed


def _activations(options: FlatQuantOptions) -> str | None:
    """What the online transforms quantize the activations to (None: nothing, the
    linears' own scheme does)."""
    if not options.quantizes_activations:
        return None
    return "mxfp4" if options.quant_format == "mxfp4" else "int4"


def _block_size(group: ResolvedGroup) -> int | None:
    """The transform's diagonal block size (``head_dim``), None if dense."""
    return group.in_features // group.left_blocks if group.left_blocks > 1 else None


def attach_int8_quantizers(model: Module, names: list[str], options: FlatQuantOptions) -> list[str]:
    """Attach per-token int8 input quantizers (``W8A8_DYNAMIC``) to the linears
    ``names``; returns them."""
    if not names:
        return []
    for name, quant in zip(names, attach_dynamic_int8(model, names)):
        _follow_propagation(quant, model.get_submodule(name), options)
    return list(names)


def _follow_propagation(online: Module, linear: Module, options: FlatQuantOptions):
    # the pipeline disabled quantization on the modules that existed when it started;
    # an online quantizer attached now follows its linear's state, unless the outputs
    # passed on to the next layer should carry activation quantization
    if not options.propagate_activation_quant:
        online.quantization_enabled = getattr(linear, "quantization_enabled", True)


def check_finite_parameters(name: str, layer: Module):
    """:raises NonFiniteLossError: naming the weights and biases of ``layer`` holding
    NaN/Inf (quantization parameters are not set yet and are not looked at)"""
    bad = [
        f"{name}.{key}" for key, value in layer.named_parameters()
        if key.rpartition(".")[2] in ("weight", "bias")
        and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]
    if bad:
        raise NonFiniteLossError(
            f"FlatQuant: {', '.join(bad)} contain NaN/Inf before calibration; the "
            f"layer {name} was left unchanged. Repair the checkpoint, or pass "
            "on_nonfinite='skip' to leave such layers untransformed."
        )


def check_finite_targets(name: str, targets: list[list[torch.Tensor]]):
    """:raises NonFiniteLossError: if the full-precision outputs of layer ``name`` on
    the calibration data are NaN/Inf (non-finite inputs from an earlier layer, or an
    overflow in the model's dtype)"""
    checks = [torch.isfinite(t).all() for step in targets for t in step]
    # one host sync for all of them
    finite = bool(torch.stack(checks).all()) if checks else True
    if not bool(all_reduce_(torch.tensor([float(finite)]), op=torch.distributed.ReduceOp.MIN)):
        raise NonFiniteLossError(
            f"FlatQuant: the full-precision outputs of layer {name} on the calibration "
            "data contain NaN/Inf (its inputs are not finite, or the model's dtype "
            f"overflows); the layer {name} was left unchanged. Check the calibration "
            "data and the earlier layers, or pass on_nonfinite='skip'."
        )


@torch.no_grad()
def recorded_targets(
    name: str,
    layer: Module,
    steps: list[list[dict]],
    groups: list[ResolvedGroup],
    device: torch.device,
    recorded: list[list[torch.Tensor]] | None,
    input_max: list[torch.Tensor | None] | None,
    outputs: bool = True,
) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]] | None:
    """
    What :func:`full_precision_pass` would compute, from the pipeline's calibration
    pass of ``layer`` (which ran the same full-precision layer on the same inputs): its
    outputs per step and sub-batch (``recorded``; empty lists unless ``outputs``) and
    its groups' input maxima (``input_max``, MAX-reduced over ranks). Used only when
    every rank has them and the layer, run now on the first sub-batch, gives the
    recorded output (to the tolerance of another attention kernel), so a modifier
    that changed the layer in between is noticed; else None.
    """
    usable = (input_max is not None and len(input_max) == len(groups)
              and all(m is not None for m in input_max)
              and (recorded is not None or not outputs))
    checked = False
    if usable and outputs:
        first = first_sub_batch(steps)
        if first is not None:
            i, j = first
            output = layer_output(layer(**steps[i][j]))
            reference = recorded[i][j].to(output.device)
            checked = True
            usable = (bool(torch.isfinite(reference).all())
                      and same_output(output, reference))
    # every rank computes the targets the same way (the passes' collectives match)
    if not bool(all_reduce_(torch.tensor([float(usable)]),
                            op=torch.distributed.ReduceOp.MIN)):
        if checked and not usable:
            logger.warning(
                f"FlatQuant: layer {name} no longer gives the outputs it gave in the "
                "pipeline's calibration pass (another modifier changed it in between, "
                "or they are not finite); its targets are computed again"
            )
        return None
    act_max = [amax.to(device) for amax in input_max]
    for amax in act_max:
        all_reduce_(amax, op=torch.distributed.ReduceOp.MAX)
    targets = ([[t.to(device) for t in step] for step in recorded] if outputs
               else [[] for _ in steps])
    return targets, act_max


def channel_max(inputs: torch.Tensor) -> torch.Tensor:
    """Per-channel max|x| (float32) of a linear's input, over all its tokens."""
    return inputs.detach().abs().reshape(-1, inputs.shape[-1]).amax(dim=0).float()


@torch.no_grad()
def full_precision_pass(
    layer: Module,
    steps: list[list[dict]],
    groups: list[ResolvedGroup],
    device: torch.device,
    outputs: bool = True,
) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """
    Full-precision outputs of ``layer`` for every sub-batch of every step (empty
    lists unless ``outputs``), and the per-channel max|input| of each group
    (MAX-reduced over ranks).
    """
    act_max = [torch.zeros(group.in_features, device=device) for group in groups]

    def record(gi):
        def hook(_module, args):
            act_max[gi] = torch.maximum(act_max[gi], channel_max(args[0]).to(device))

        return hook

    handles = [
        group.linears[0][1].register_forward_pre_hook(record(gi))
        for gi, group in enumerate(groups)
    ]
    try:
        targets = []
        for batches in tqdm(steps, desc="FlatQuant targets", leave=False):
            step_targets = []
            for kwargs in batches:
                output = layer_output(layer(**kwargs)).detach()
                if outputs:
                    step_targets.append(output)
            targets.append(step_targets)
    finally:
        for handle in handles:
            handle.remove()
    for amax in act_max:
        all_reduce_(amax, op=torch.distributed.ReduceOp.MAX)
    return targets, act_max
