"""
Workarounds for llm-compressor 0.14 and compressed-tensors 0.19, in one place; each
names the behaviour it works around. Remove one when the library it concerns fixes it.

* :func:`shard_dataset`: llm-compressor 0.14's distributed sampler selects a rank's
  partition, but its dataloader then indexes the whole dataset.
* :func:`mark_weight_qparams_unset` / :func:`sync_weight_qparams`: llm-compressor's
  modifiers broadcast the weight qparams a rank computed, except for modules on the CPU.
* :func:`update_fused_layer_weight_global_scales`: the helper llm-compressor removed in
  0.14 (``llmcompressor.modifiers.utils.helpers``), used when importable.
* :func:`hold_weights_during_forward`: compressed-tensors 0.19's quantized forward reads
  an offloaded weight twice and gets a fresh, unquantized copy the second time.
* :func:`routed_experts_only`: llm-compressor 0.14 keeps oneshot's
  ``moe_calibrate_all_experts`` in a module global, with no public way to clear it for
  a scope.
* :func:`transform_gptq_hessians`: llm-compressor 0.14's ``GPTQModifier`` keeps the
  Hessians of a pass in a private dict, with no public way to replace a module's.
"""

import contextlib

import torch
import torch.distributed as dist
from compressed_tensors.offload import OffloadCache, disable_offloading, unwrap_offload_forward
from compressed_tensors.utils import (
    align_modules,
    patch_attr,
    update_offload_parameter,
)
from loguru import logger
from torch import nn

from flatquant_modifier.distributed import all_reduce_, broadcast_, is_distributed
from flatquant_modifier.fusion import is_tensor_group
from flatquant_modifier.kronecker import transformed_second_moment
from flatquant_modifier.transform import get_flatquant_transform

__all__ = [
    "fp4_weights_in_model_dtype",
    "shard_dataset",
    "mark_weight_qparams_unset",
    "sync_weight_qparams",
    "update_fused_layer_weight_global_scales",
    "hold_weights_during_forward",
    "routed_experts_only",
    "has_linearized_experts",
    "transform_gptq_hessians",
]


def shard_dataset(dataset):
    """
    This rank's contiguous shard of a ``datasets.Dataset`` (the whole dataset when not
    distributed), split as llm-compressor's ``get_rank_partition`` splits a dataset
    split. Pass it to ``oneshot(dataset=..., num_calibration_samples=len(shard))`` on
    every rank: llm-compressor 0.14's sampler selects a rank's partition but its
    dataloader then indexes the whole dataset, so without sharding every rank
    calibrates on the same first ``1/world_size`` of the samples.
    """
    if not is_distributed():
        return dataset
    rank, world = dist.get_rank(), dist.get_world_size()
    start = len(dataset) * rank // world
    end = len(dataset) * (rank + 1) // world
    return dataset.select(range(start, end))


# weight quantization parameters llm-compressor's modifiers compute on one rank
WEIGHT_QPARAMS = ("weight", "weight_scale", "weight_zero_point", "weight_global_scale",
                  "weight_g_idx")


def _weight_quantized(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, module)
        for name, module in model.named_modules()
        if getattr(getattr(module, "quantization_scheme", None), "weights", None) is not None
        and isinstance(getattr(module, "weight_scale", None), torch.Tensor)
    ]


@torch.no_grad()
def mark_weight_qparams_unset(model: nn.Module):
    """
    Fill every ``weight_scale`` with NaN before any modifier computes it, so that
    :func:`sync_weight_qparams` can tell which rank computed which module.
    """
    if not is_distributed():
        return
    for _, module in _weight_quantized(model):
        update_offload_parameter(
            module, "weight_scale", torch.full_like(module.weight_scale, float("nan"))
        )


@torch.no_grad()
def sync_weight_qparams(model: nn.Module):
    """
    Give every rank the weight quantization parameters (and the weight, which GPTQ
    changes) of the rank that computed them.

    llm-compressor's modifiers split the weight quantization of a layer across ranks
    and broadcast the results, but skip modules that execute on the CPU
    (``broadcast_qparams_and_cleanup(skip_cpu=True)``): on a CPU-only run the other
    ranks keep uninitialised scales, and rank 0 would save garbage. A module's owner is
    the lowest rank whose ``weight_scale`` is no longer the NaN of
    :func:`mark_weight_qparams_unset`; modules every rank already holds are skipped.

    :raises RuntimeError: naming the module if no rank computed its scale
    """
    if not is_distributed():
        return
    modules = _weight_quantized(model)
    if not modules:
        return
    world = dist.get_world_size()
    rank = dist.get_rank()
    computed = torch.tensor(
        [bool(module.weight_scale.float().isfinite().all()) for _, module in modules],
        dtype=torch.int64,
    )
    flags = torch.zeros(world, len(modules), dtype=torch.int64)
    flags[rank] = computed
    all_reduce_(flags)
    synced = 0
    for index, (name, module) in enumerate(modules):
        column = flags[:, index]
        if bool(column.all()):
            continue
        if not bool(column.any()):
            raise RuntimeError(
                f"no rank computed the weight quantization parameters of {name}; "
                "its weight quantizer did not run on it (check the recipe's targets)"
            )
        owner = int(column.nonzero()[0])
        for key in WEIGHT_QPARAMS:
            value = getattr(module, key, None)
            if not isinstance(value, torch.Tensor):
                continue
            received = broadcast_(value.detach().clone(), src=owner)
            if rank != owner:
                update_offload_parameter(module, key, received)
        synced += 1
    if synced:
        logger.info(f"FlatQuant: synchronised the weight qparams of {synced} modules "
                    "across ranks")


def _own_update_fused_layer_weight_global_scales(submodule: nn.Module):
    """llm-compressor's pre-0.14 helper, on the offloading-aware compressed-tensors
    helpers."""
    name = submodule.__class__.__name__.lower()
    if "attention" in name and any(
        hasattr(submodule, attr) for attr in ("k_proj", "v_proj", "qkv_proj")
    ):
        if hasattr(submodule, "qkv_proj"):  # already fused: one tensor, one scale
            return
        siblings = [submodule.q_proj, submodule.v_proj, submodule.k_proj]
    elif "mlp" in name and hasattr(submodule, "gate_proj") and hasattr(submodule, "up_proj"):
        siblings = [submodule.gate_proj, submodule.up_proj]
    else:
        return
    if not all(is_tensor_group(layer) for layer in siblings):
        return
    with align_modules(siblings):
        shared = torch.min(
            torch.cat([layer.weight_global_scale.data for layer in siblings])
        ).reshape([1])
    for layer in siblings:
        update_offload_parameter(layer, "weight_global_scale", shared)


def _llmcompressor_helper():
    try:  # removed in llm-compressor 0.14 (observer fusion replaced it)
        from llmcompressor.modifiers.utils.helpers import (
            update_fused_layer_weight_global_scales as helper,
        )
    except ImportError:
        return None
    return helper


def update_fused_layer_weight_global_scales(submodule: nn.Module):
    """
    Give q/k/v of an attention submodule, and gate/up of an MLP submodule, one shared
    ``weight_global_scale`` (the minimum of theirs) when all are TENSOR_GROUP
    quantized; llm-compressor's implementation when it has one.
    """
    helper = _llmcompressor_helper() or _own_update_fused_layer_weight_global_scales
    helper(submodule)


def hold_weights_during_forward(model: nn.Module) -> int:
    """
    Make the quantized forward of every module with a compressed-tensors quantization
    scheme read one onloaded copy of its tensors per call.

    The model in memory after ``oneshot`` computes what is saved, wherever its weights
    live (compressed-tensors offloading: on the GPU, in CPU memory onloaded to the GPU
    layer by layer, on disk).

    compressed-tensors' quantized forward (``set_forward_quantized``, compressed-tensors
    0.19) fake-quantizes a weight by patching ``.data`` of the tensor it onloaded and then
    calls ``Linear.forward``, which reads ``self.weight`` a second time. A module whose
    weights stay where they are used (everything on the CPU, or everything on the GPU)
    returns the same tensor both times. A module offloaded to the CPU or to disk and run
    on a GPU, as llm-compressor's sequential pipeline leaves a model that was loaded on
    the CPU, onloads a fresh, unquantized copy at the second read: outside the pipeline's
    ``disable_offloading`` such a model runs its linears with full-precision weights while
    every checkpoint of it holds them quantized. :func:`hold_weights_during_forward` runs
    each quantized forward with its module's onloaded tensors held for the call.

    The wrapper sits under compressed-tensors' offload wrapper, so it survives
    re-dispatching (``remove_dispatch`` / ``dispatch_model``); for modules that are not
    offloaded it only checks a type. Idempotent.

    :return: number of modules wrapped by this call
    """
    wrapped = 0
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is None:
            continue
        with unwrap_offload_forward(module):
            forward = module.forward.__func__
            if getattr(forward, "holds_weights", False):
                continue

            def held(self, *args, _forward=forward, **kwargs):
                if isinstance(self._parameters, OffloadCache):
                    with disable_offloading():
                        return _forward(self, *args, **kwargs)
                return _forward(self, *args, **kwargs)

            # compressed-tensors' clear_quantization unwraps one level through
            # ``__wrapped__``: it must land on the plain forward, as before
            held.__wrapped__ = getattr(forward, "__wrapped__", forward)
            held.holds_weights = True
            module.forward = held.__get__(module)
        wrapped += 1
    return wrapped


def has_linearized_experts(layer: torch.nn.Module) -> bool:
    """Whether ``layer`` holds llm-compressor's linearized MoE experts, which its
    calibration pass (``moe_calibrate_all_experts``) runs on every token."""
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D

    return any(isinstance(module, LinearExperts2D) for module in layer.modules())


@contextlib.contextmanager
def routed_experts_only():
    """
    Run llm-compressor's linearized MoE experts on their routed tokens only.
    ``oneshot(moe_calibrate_all_experts=True)`` (the default) sends every token
    through every expert so that the experts' observers see data; FlatQuant's targets
    and training compute the model's own function, in which a token reaches its top-k
    experts: num_experts / top_k times less work, the same outputs.
    """
    from llmcompressor.modeling.moe import context

    with patch_attr(context, "_CALIBRATE_ALL_EXPERTS", False):
        yield


def fp4_weights_in_model_dtype(model: torch.nn.Module):
    """
    compressed-tensors decompresses FP4 weights (MXFP4, NVFP4) and their scales to
    bfloat16 whatever the model's dtype, at load (``dequantize=True``) or at the first
    forward after loading or ``save_pretrained(save_compressed=True)``; they are cast to
    the dtype of the embeddings then (FP4 values times powers of two are exact in any
    float format), so that a float32 model keeps running.
    """
    dtype = model.get_input_embeddings().weight.dtype
    fp4 = [
        module for module in model.modules()
        if isinstance(module, torch.nn.Linear)
        and getattr(getattr(module, "quantization_scheme", None), "weights", None) is not None
        and module.quantization_scheme.weights.type == "float"
        and module.quantization_scheme.weights.num_bits == 4
    ]
    if dtype == torch.bfloat16 or not fp4:
        return

    @torch.no_grad()
    def cast():
        for module in fp4:
            for name in ("weight", "weight_scale"):
                value = getattr(module, name, None)
                if isinstance(value, torch.nn.Parameter) and value.dtype == torch.bfloat16:
                    value.data = value.data.to(dtype)

    cast()
    if any(not hasattr(module, "weight") for module in fp4):
        # still compressed: after compressed-tensors' decompression hook (registered
        # before this one) at the first forward
        def after_decompression(*_):
            cast()
            handle.remove()

        handle = model.register_forward_pre_hook(after_decompression)


@torch.no_grad()
def transform_gptq_hessians(modifiers: list, model: nn.Module, linears: list[str],
                            input_smoothing: dict[str, torch.Tensor]) -> int:
    """
    GPTQ modifiers sharing FlatQuant's calibration pass gathered each linear's Hessian
    ``H = 2/n sum x^T x`` in the pass's forward, before FlatQuant transformed the layer.
    After training, a transformed linear sees ``x' = (x / s) @ kron(P1, P2)`` in place
    of ``x`` (its smoothing vector ``s`` folded into the producer, its online transform
    with quantization off, as llm-compressor runs a pipeline's forwards): its Hessian
    becomes ``T^T H T`` (:func:`~flatquant_modifier.kronecker.transformed_second_moment`),
    in place of a second forward of the layer to gather it again (in a profile of a
    SmolLM2-135M calibration on 2 CPU cores, that forward and its accumulation took 16 %
    of the calibration). These are the Hessians GPTQ's own pass gathers on the
    transformed layer before FlatQuant clips its weights; the weight clipping moves the
    inputs of the linears after the first group a little, as quantizing a layer's
    earlier linears does in GPTQ's own passes.

    :param linears: names of the linears given an online transform
    :param input_smoothing: per such linear, the vector its inputs are divided by
    :return: the number of Hessians carried through a transform
    """
    count = 0
    for name in linears:
        linear = model.get_submodule(name)
        transform = get_flatquant_transform(linear)
        if transform is None:
            continue
        for gptq in modifiers:
            hessian = gptq._hessians.get(linear)  # private: see the module docstring
            if hessian is None:
                continue
            gptq._hessians[linear] = transformed_second_moment(
                hessian, transform.left_trans, transform.right_trans,
                input_smoothing.get(name))
            count += 1
    return count
