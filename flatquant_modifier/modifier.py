"""``FlatQuantModifier``: the llm-compressor lifecycle of FlatQuant. One decoder
layer's calibration is :func:`flatquant_modifier.calibrate.calibrate_layer`; the
training options are :class:`flatquant_modifier.options.FlatQuantOptions`."""

import functools
import inspect
from typing import Literal

import torch
from compressed_tensors import TRANSFORM_CONFIG_NAME
from compressed_tensors.modeling.kvcache import QuantizedKVCache
from compressed_tensors.transform import TransformConfig
from compressed_tensors.utils import match_named_modules
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator, model_validator
from torch.nn import Module

from llmcompressor.core import Event, State, active_session
from llmcompressor.modifiers import Modifier
from llmcompressor.pipelines.cache import IntermediatesCache
from llmcompressor.utils.pytorch.module import infer_sequential_targets

from flatquant_modifier import fusion
from flatquant_modifier.attention import SDPA, EagerCausalMask, PipelineAttention
from flatquant_modifier.batching import TARGET
from flatquant_modifier.calibrate import (
    StepPlan,
    attach_int8_quantizers,
    calibrate_layer,
    channel_max,
)
from flatquant_modifier.compat import (
    fp4_weights_in_model_dtype,
    has_linearized_experts,
    hold_weights_during_forward,
    mark_weight_qparams_unset,
    sync_weight_qparams,
    transform_gptq_hessians,
)
from flatquant_modifier.emulation import layer_output
from flatquant_modifier.mappings import FlatQuantMapping, infer_mappings_from_model
from flatquant_modifier.options import FlatQuantOptions
from flatquant_modifier.plan import (
    LayerPlan,
    Undecomposable,
    check_shared_calibration,
    check_weight_schemes,
    plan_layers,
)
from flatquant_modifier.smoothing import SmoothingCheck
from flatquant_modifier.train import LayerReport, NonFiniteLossError
from flatquant_modifier.transform import (
    INT8_TRANSFORM_NAME,
    dynamic_int8_scheme,
    flatquant_schemes,
    is_transform_group,
)
from flatquant_modifier.verify import verify_model

__all__ = ["FlatQuantModifier"]


class FlatQuantModifier(Modifier, FlatQuantOptions):
    """
    Implements FlatQuant, "FlatQuant: Flatness Matters for LLM Quantization"
    (Sun et al., ICML 2025, https://arxiv.org/abs/2410.09426).

    For every decoder layer, FlatQuant learns an invertible Kronecker transform
    ``P = P1 (x) P2`` per quantized input (q/k/v share one, gate/up share one, plus
    o_proj and down_proj), an optional per-channel smoothing vector, per-channel
    weight clip factors and a per-tensor activation clip factor, by minimising the
    MSE between the layer's full-precision output and its output with transformed,
    fake-quantized weights (W4 per channel) and activations (A4 per token). The
    weights absorb ``diag(s) P^-T`` (float64) and the learned weight clipping; the
    activation transform runs online as a compressed-tensors transform that also
    fake-quantizes the activations with the Ascend NPU formula
    (``scale = max|y| * clip_ratio / 7``), exactly what vllm-ascend's
    ``W4A4_FLATQUANT_DYNAMIC`` method computes. ``quant_format="mxfp4"`` does the same
    for its ``W4A4_MXFP4_FLATQUANT`` method (Ascend 950: MXFP4 activations with the
    NPU's rule, compressed-tensors' MXFP4 weights, row-parallel transforms block
    diagonal per tensor-parallel rank); ``"nvfp4"`` trains for NVFP4.

    FlatQuant only transforms; the weights are quantized by a following
    ``QuantizationModifier`` or ``GPTQModifier`` with a weights-only scheme (the
    activations are already quantized by the transform).

    example recipe:
    ```yaml
    quant_stage:
      quant_modifiers:
        FlatQuantModifier:
          epochs: 15
          ignore: ["lm_head"]
        QuantizationModifier:
          ignore: ["lm_head"]
          config_groups:
            group_0:
              targets: ["Linear"]
              weights: {num_bits: 4, type: int, symmetric: true, strategy: channel,
                        observer: minmax}
    ```

    Lifecycle:

    - on_initialize
        - infer mappings for the architecture (or take ``mappings``)
        - resolve them in every decoder layer; refuse bad sizes early
    - on_calibration_start
        - refuse schemes that would quantize the activations a second time
        - register hooks caching each decoder layer's call arguments, and recording its
          outputs and its groups' input maxima (FlatQuant's targets, unless the
          layer has routed MoE experts, which llm-compressor's calibration sends
          every token through)
    - on_sequential_epoch_end (once per decoder layer in the sequential pipeline)
        - :func:`~flatquant_modifier.calibrate.calibrate_layer`: train the layer's
          transforms, smoothing and clip factors, absorb them into the weights and
          attach the online transforms; free the layer's cache
    - on_calibration_end
        - calibrate any layer not yet calibrated (basic pipeline), remove hooks
        - record the ``transform_config`` used by ``save_pretrained``
    - on_finalize
        - give fused siblings of tensor-group schemes (NVFP4) one shared weight
          global scale (:func:`flatquant_modifier.fusion.fuse_global_scales`)
        - check that every transformed or quantized linear computes the function
          its checkpoint will hold (:func:`flatquant_modifier.verify.verify_model`),
          here and before every ``save_pretrained``

    The training options (bits, clipping, smoothing, parametrization, epochs,
    batch_size, learning rates, autocast, CUDA graphs, determinism, seed,
    quant_format, propagate_activation_quant, target_outputs) are documented in
    :class:`~flatquant_modifier.options.FlatQuantOptions`. The modifier adds:

    :param mappings: which linears share a transform and where smoothing folds, see
        :class:`FlatQuantMapping`; inferred from the architecture when None
    :param ignore: linears (names or ``re:`` regexes) to leave untouched; a transform
        group is skipped only when all its linears are ignored
    :param sequential_targets: decoder layer class names or regexes; defaults to the
        pipeline's sequential targets (the model's no-split modules)
    :param offload_device: device on which cached layer inputs are kept (None: the
        layer's execution device)
    :param on_nonfinite: ``"raise"`` stops the run when a layer's weights, outputs or
        loss are NaN/Inf; ``"skip"`` leaves that layer untransformed and goes on
    :param fuse_global_scales: at finalize, give fused siblings (q/k/v, gate/up, MoE
        experts' w1/w3, MLA q_a/kv_a) of tensor-group schemes one shared
        ``weight_global_scale`` (MAX of their amax, reduced across ranks)
    :param sibling_patterns: extra sibling regexes for that fusion (capture groups
        form the group key), tried before
        :data:`flatquant_modifier.fusion.DEFAULT_SIBLING_PATTERNS`
    :param w8a8_dynamic: linears (names or ``re:`` regexes inside the decoder layers)
        served as vllm-ascend's ``W8A8_DYNAMIC`` instead of W4A4 FlatQuant: no
        transform, their inputs quantized per token to int8 online with the NPU's
        formula (``max|x| / 127``); the weight quantizer must give them int8
        per-channel weights (msModelSlim's practice for o_proj/down_proj:
        ``recipes/flatquant_w4a4_mixed.yaml``)
    :param undecomposable: what becomes of a group whose ``in_features``
        vllm-ascend's ``npu_kronecker_quant`` cannot take (factors of
        ``get_decompose_dim`` above 256, or the second not a multiple of 8: Qwen2.5-7B's
        down_proj, 18944 = 128 x 148): ``"w8a8_dynamic"`` (as above), ``"float"``
        (full precision; leave it out of the weight quantizer) or ``"error"``. One
        line per layer says which
    """

    requires_calibration_data: bool = True

    mappings: list[FlatQuantMapping] | None = None
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    sequential_targets: list[str] | None = None
    offload_device: str | None = None
    on_nonfinite: Literal["raise", "skip"] = "raise"
    fuse_global_scales: bool = True
    sibling_patterns: list[str] | None = None
    w8a8_dynamic: list[str] = Field(default_factory=list)
    undecomposable: Undecomposable = "w8a8_dynamic"

    # decoder layers in model order
    _layers: list[LayerPlan] = PrivateAttr(default_factory=list)
    # cached call arguments of each decoder layer, one entry per calibration batch
    # (with the layer's output in the calibration pass)
    _calls: dict[Module, IntermediatesCache] = PrivateAttr(default_factory=dict)
    # per decoder layer and group: the max|input| per channel in the calibration pass
    _input_max: dict[Module, list] = PrivateAttr(default_factory=dict)
    # names of the linears given an online transform (an int8 input quantizer) so far
    _transformed: list[str] = PrivateAttr(default_factory=list)
    _int8: list[str] = PrivateAttr(default_factory=list)
    # layers with W8A8_DYNAMIC linears but no transformed group, seen by the pipeline
    _seen: set[Module] = PrivateAttr(default_factory=set)
    # optimisation step of each sample, fixed at the first layer
    _step_plan: StepPlan | None = PrivateAttr(default=None)
    # per-layer training reports, in order
    _reports: list[LayerReport] = PrivateAttr(default_factory=list)
    _smoothing: SmoothingCheck | None = PrivateAttr(default=None)
    # the model's attention implementation before calibration forced eager
    _attn_implementation: str | None = PrivateAttr(default=None)
    _pipeline_attention: PipelineAttention | None = PrivateAttr(default=None)
    # the causal mask for layer calls llm-compressor's pipeline makes without one
    _causal_mask: EagerCausalMask | None = PrivateAttr(default=None)
    # target_outputs="model": the index of the next decoder layer and its inputs in
    # the full-precision model (per step and sub-batch)
    _hidden_states: tuple[int, list] | None = PrivateAttr(default=None)
    # GPTQ modifiers sharing the calibration pass (pipeline="sequential")
    _shared_gptq: list = PrivateAttr(default_factory=list)

    @field_validator("ignore", "sequential_targets", "sibling_patterns", "w8a8_dynamic",
                     mode="before")
    @classmethod
    def _wrap_str(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("offload_device", mode="before")
    @classmethod
    def _device_str(cls, value):
        return str(value) if isinstance(value, torch.device) else value

    @model_validator(mode="after")
    def _refuse_modifier_contradictions(self):
        if self.sibling_patterns and not self.fuse_global_scales:
            raise ValueError(
                "sibling_patterns only apply to fuse_global_scales=True; remove them or "
                "set fuse_global_scales=True"
            )
        if not self.quantizes_activations:
            ascend_only = {"w8a8_dynamic": [], "undecomposable": "w8a8_dynamic"}
            for key, unused in ascend_only.items():
                if key in self.model_fields_set and getattr(self, key) != unused:
                    raise ValueError(
                        f"{key} applies to vllm-ascend's W4A4 (a_bits=4, "
                        "quant_format='int'), whose transforms quantize the activations; "
                        f"remove {key} or use that format"
                    )
        return self

    @property
    def reports(self) -> list[LayerReport]:
        """Per-layer loss before/after training, in model order."""
        return list(self._reports)

    # ------------------------------------------------------------------ lifecycle

    def on_initialize(self, state: State, **kwargs) -> bool:
        if state.data.calib is None and kwargs.get("calib_data") is None:
            raise ValueError(
                "FlatQuantModifier learns its transforms from calibration data, but "
                "no dataset was passed: call oneshot(..., dataset=..., "
                "num_calibration_samples=...)"
            )
        model = state.model
        self._attn_implementation = getattr(
            getattr(model, "config", None), "_attn_implementation", None
        )
        if self.mappings is None:
            self.mappings = infer_mappings_from_model(model)
        targets = self.sequential_targets or infer_sequential_targets(
            model, kwargs.get("sequential_targets")
        )
        layers = list(match_named_modules(model, targets))
        if not layers:
            raise ValueError(
                f"FlatQuantModifier found no decoder layers matching {targets} in "
                f"{type(model).__name__}; pass sequential_targets=[<layer class>]"
            )
        self._layers = plan_layers(
            layers, self.mappings, self.ignore, self.w8a8_dynamic, self.undecomposable,
            ascend=self.quantizes_activations, nvfp4=self.quant_format == "nvfp4",
            max_supported_tp=self.max_supported_tp,
        )
        if any(map(is_transform_group, getattr(
            getattr(model, TRANSFORM_CONFIG_NAME, None), "config_groups", {}
        ))):
            raise ValueError(
                "this model already carries FlatQuant transforms; apply "
                "FlatQuantModifier to the full-precision model"
            )
        self._smoothing = SmoothingCheck(forced=self.smooth is True)
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        check_weight_schemes(self._layers, self.quantizes_activations,
                             mxfp4=self.quant_format == "mxfp4")
        modifiers = getattr(active_session().lifecycle.recipe, "modifiers", None) or []
        self._shared_gptq = check_shared_calibration(self, modifiers, self._layers)
        if self._shared_gptq:
            logger.info("FlatQuant: GPTQ shares the calibration pass; its Hessians "
                        "gathered there are carried through each layer's transforms")
        # under torchrun: lets on_finalize find the rank that computed each weight qparam
        mark_weight_qparams_unset(state.model)
        offload = torch.device(self.offload_device) if self.offload_device else None
        # until finalize: a later modifier's own pass (GPTQ's) needs the mask too
        self._causal_mask = EagerCausalMask(state.model)
        self._pipeline_attention = PipelineAttention(
            state.model,
            self._attn_implementation if self.pipeline_sdpa is not False else None,
            devices=("cuda",) if self.pipeline_sdpa == "auto" else None,
        )
        for plan in self._layers:
            self._causal_mask.attach(plan.module)
            if plan.groups:
                self._pipeline_attention.attach(plan.module)
                self._calls[plan.module] = IntermediatesCache(None, offload)
                self.register_hook(plan.module, self._cache_call, "forward_pre",
                                   with_kwargs=True)
                self._record_targets(plan)
            elif plan.int8:
                self.register_hook(plan.module, lambda module, *_: self._seen.add(module),
                                   "forward_pre")

    def on_sequential_epoch_end(self, state: State, event: Event, **kwargs):
        try:
            self._calibrate_cached_layers(state)
        except BaseException:
            self._detach_pipeline_attention()  # no hook of a failed run stays on the model
            self._detach_causal_mask()
            raise

    def _calibrate_cached_layers(self, state: State):
        for index, plan in enumerate(self._layers):
            int8 = [name for name, _ in plan.int8]
            if plan.module in self._seen:  # no transformed group: only int8 quantizers
                self._seen.discard(plan.module)
                self._int8 += attach_int8_quantizers(state.model, int8, self)
                continue
            cache = self._calls.get(plan.module)
            if cache is None or len(cache) == 0:
                continue
            calls = [cache.fetch(i) for i in range(len(cache))]
            del self._calls[plan.module], cache
            hidden_states = self._take_hidden_states(index)
            input_max = self._input_max.pop(plan.module, None)
            # its training compares SDPA with its eager attention: no SDPA hook meanwhile
            attention = self._pipeline_attention
            if attention is not None:
                attention.detach(plan.module)
            try:
                result = calibrate_layer(
                    state.model, plan.name, plan.module, plan.groups, calls, self,
                    seed=self.seed + index,
                    step_plan=self._step_plan,
                    attn_implementation=self._attn_implementation,
                    smoothing=self._smoothing if self.smooth else None,
                    int8_linears=int8,
                    logits=(self.last_layer_loss == "logits"
                            and index == len(self._layers) - 1),
                    hidden_states=hidden_states,
                    input_max=input_max,
                )
            except NonFiniteLossError as error:
                if self.on_nonfinite == "raise":
                    raise
                logger.error(f"{error} Skipping it (on_nonfinite='skip').")
                # its W8A8_DYNAMIC linears do not depend on training; its propagation
                # pass stays eager (its SDPA check may not have run)
                self._int8 += attach_int8_quantizers(state.model, int8, self)
                continue
            if attention is not None:  # its propagation pass, and the next layers'
                attention.record(plan.module, result.attention == SDPA)
                attention.attach(plan.module)
            self._step_plan = result.step_plan
            if self._shared_gptq:  # the pass's Hessians, through the transforms
                transform_gptq_hessians(self._shared_gptq, state.model, result.transformed,
                                        result.input_smoothing)
            if result.outputs is not None:
                self._hidden_states = (index + 1, result.outputs)
            self._transformed += result.transformed
            self._int8 += result.int8
            self._reports.append(result.report)

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        try:
            self.on_sequential_epoch_end(state, event, **kwargs)
        finally:
            self.remove_hooks()
            self._detach_pipeline_attention()
        self._calls.clear()
        self._input_max.clear()
        self._hidden_states = None
        self._record_transform_config(state.model)

    def _detach_causal_mask(self):
        if self._causal_mask is not None:
            self._causal_mask.detach()
            self._causal_mask = None

    def _detach_pipeline_attention(self):
        if self._pipeline_attention is not None:
            self._pipeline_attention.detach()
            self._pipeline_attention = None

    def on_finalize(self, state: State, **kwargs) -> bool:
        if not self.ended_:
            self.on_calibration_end(state, None)
        self._detach_causal_mask()
        self._calls.clear()
        sync_weight_qparams(state.model)
        if self.fuse_global_scales:
            groups = fusion.fuse_global_scales(state.model, self.sibling_patterns)
            if groups:
                logger.info(f"FlatQuant: shared weight global scales in {groups} groups")
        hold_weights_during_forward(state.model)
        online = self._transformed + self._int8
        checked = verify_model(state.model, online, where="after oneshot")
        logger.info(f"FlatQuant: {len(self._transformed)} online transforms and "
                    f"{len(self._int8)} int8 input quantizers attached; {checked} linears "
                    "compute their saved function")
        _verify_before_saving(state.model, online)
        return True

    # ------------------------------------------------------------------ helpers

    def _take_hidden_states(self, index: int) -> list | None:
        """target_outputs="model": layer ``index``'s inputs in the full-precision
        model, if the layer before it was trained here (else its targets are taken on
        its own inputs, with a warning); None for the first layer."""
        carried, self._hidden_states = self._hidden_states, None
        if self.target_outputs != "model" or index == 0:
            return None
        if carried is not None and carried[0] == index:
            return carried[1]
        logger.warning(
            f"FlatQuant: target_outputs='model', but {self._layers[index - 1].name} was "
            f"not trained by FlatQuant (no transform group, or skipped), so the "
            f"full-precision hidden states stop there: {self._layers[index].name} "
            "reproduces the full-precision layer on its own inputs"
        )
        return None

    def _record_targets(self, plan: LayerPlan):
        """Record, in the pipeline's calibration pass of ``plan``'s layer, what
        FlatQuant's targets pass would compute again: the layer's outputs and its
        groups' input maxima (not where llm-compressor sends every token through every
        routed expert: the experts' inputs then differ)."""
        if has_linearized_experts(plan.module):
            return
        if self.target_outputs == "layer":  # else the targets come from other inputs
            self.register_hook(plan.module, self._cache_output, "forward")
        maxima = self._input_max[plan.module] = [None] * len(plan.groups)
        for index, group in enumerate(plan.groups):
            self.register_hook(group.linears[0][1],
                               functools.partial(_record_max, maxima, index),
                               "forward_pre")

    def _cache_output(self, module: Module, args: tuple, output):
        cache = self._calls[module]
        cache.update(len(cache) - 1, {TARGET: layer_output(output).detach()})

    def _cache_call(self, module: Module, args: tuple, kwargs: dict):
        arguments = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        arguments |= arguments.pop("kwargs", {})
        for key, value in arguments.items():
            if isinstance(value, QuantizedKVCache):
                arguments[key] = None
        self._calls[module].append(arguments)

    def _record_transform_config(self, model: Module):
        groups = flatquant_schemes(model, self._transformed)
        if self._int8:
            groups[INT8_TRANSFORM_NAME] = dynamic_int8_scheme(list(self._int8))
        if not groups:
            return
        ours = TransformConfig(config_groups=groups)
        existing = getattr(model, TRANSFORM_CONFIG_NAME, None)
        if existing is not None:
            existing.config_groups.update(ours.config_groups)
            ours = existing
        setattr(model, TRANSFORM_CONFIG_NAME, ours)


def _record_max(maxima: list, index: int, _linear: Module, args: tuple):
    amax = channel_max(args[0])
    maxima[index] = amax if maxima[index] is None else torch.maximum(maxima[index], amax)


def _verify_before_saving(model: Module, transformed: list[str]):
    """Run :func:`verify_model` before every ``model.save_pretrained`` (llm-compressor
    wraps that method on the instance too; its markers are kept)."""
    save_pretrained = model.save_pretrained
    if getattr(save_pretrained, "flatquant_verifies", False):
        return

    @functools.wraps(save_pretrained)
    def verified_save_pretrained(*args, **kwargs):
        verify_model(model, transformed, where="before save_pretrained")
        result = save_pretrained(*args, **kwargs)
        fp4_weights_in_model_dtype(model)  # compressed in place: decompressed in bf16
        return result

    verified_save_pretrained.flatquant_verifies = True
    model.save_pretrained = verified_save_pretrained
