"""``FlatQuantModifier``: the llm-compressor lifecycle of FlatQuant; the math lives in
:mod:`flatquant_modifier.train` and :mod:`flatquant_modifier.kronecker`."""

import contextlib
import functools
import inspect
from typing import Literal

import torch
from compressed_tensors import TRANSFORM_CONFIG_NAME
from compressed_tensors.modeling.kvcache import QuantizedKVCache
from compressed_tensors.transform import (
    TransformArgs,
    TransformConfig,
    TransformFactory,
    TransformScheme,
)
from compressed_tensors.utils import (
    TorchDtype,
    align_module_device,
    get_execution_device,
    match_named_modules,
)
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator
from torch.nn import Module
from tqdm import tqdm

from llmcompressor.core import Event, State
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.utils.hooks import HooksMixin
from llmcompressor.pipelines.cache import IntermediatesCache
from llmcompressor.utils.pytorch.module import infer_sequential_targets

from flatquant_modifier import fusion
from flatquant_modifier.attention import training_attention
from flatquant_modifier.batching import (
    assign_steps,
    call_keys,
    plan_steps,
    split_calls,
)
from flatquant_modifier.distributed import (
    all_reduce_,
    mark_weight_qparams_unset,
    sync_weight_qparams,
    write_parameters,
)
from flatquant_modifier.mappings import (
    FlatQuantMapping,
    ResolvedGroup,
    infer_mappings_from_model,
    relative_name,
    resolve_layer,
)
from flatquant_modifier.modules import Parametrization, TransformInit
from flatquant_modifier.offload import hold_weights_during_forward
from flatquant_modifier.train import (
    LayerReport,
    NonFiniteLossError,
    TrainConfig,
    absorb_into_layer,
    build_group_params,
    check_finite_parameters,
    check_finite_targets,
    deterministic_algorithms,
    layer_output,
    log_report,
    train_layer,
    unfoldable_smoothing,
)
from flatquant_modifier.transform import (
    FLATQUANT_TRANSFORM_TYPE,
    KRONECKER_TRANSFORM_TYPE,
    TRANSFORM_NAME,
    get_flatquant_transform,
)
from flatquant_modifier.verify import verify_model

__all__ = ["FlatQuantModifier"]


class FlatQuantModifier(Modifier):
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
    ``W4A4_FLATQUANT_DYNAMIC`` method computes.

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
        - register forward-pre hooks caching each decoder layer's call arguments
    - on_sequential_epoch_end (once per decoder layer in the sequential pipeline)
        - replay the cached calls for full-precision targets and input statistics
        - train transforms, smoothing and clip factors (fp32 master weights)
        - absorb them into the weights, fold the smoothing, attach the online
          transforms; free the layer's cache
    - on_calibration_end
        - train any layer not yet trained (basic pipeline), remove hooks
        - record the ``transform_config`` used by ``save_pretrained``
    - on_finalize
        - clear caches
        - give fused siblings of tensor-group schemes (NVFP4) one shared weight
          global scale (:func:`flatquant_modifier.fusion.fuse_global_scales`)

    :param mappings: which linears share a transform and where smoothing folds, see
        :class:`FlatQuantMapping`; inferred from the architecture when None
    :param ignore: linears (names or ``re:`` regexes) to leave untouched; a transform
        group is skipped only when all its linears are ignored
    :param sequential_targets: decoder layer class names or regexes; defaults to the
        pipeline's sequential targets (the model's no-split modules)
    :param w_bits: weight bits used in training (per channel, symmetric); None for
        full-precision weights
    :param a_bits: activation bits (per token, symmetric, NPU formula). 4 makes the
        online transform quantize activations; None leaves activation quantization
        to the linears' own scheme (e.g. NVFP4)
    :param learn_weight_clip: learn per-output-channel weight clip factors
    :param learn_activation_clip: learn a per-tensor activation clip factor (stored as
        the Ascend ``clip_ratio``)
    :param clip_init_logit: initial logit of all clip factors (sigmoid(4) = 0.982)
    :param smooth: learn a per-channel smoothing vector where it can be folded
    :param smooth_alpha: SmoothQuant migration strength of the smoothing init
    :param parametrization: ``"dense"`` (free matrices, inverse by
        ``torch.linalg.inv``, float64 when absorbed) or ``"orthogonal"``
        (``U diag(s) V^T``, inverse without inversion). Dense is the default: on
        SmolLM2-135M it reaches a lower layer loss and perplexity in half the time
        (README, "Choosing the defaults")
    :param transform_init: ``"random"`` (random orthogonal factors) or ``"identity"``
    :param epochs: training epochs per layer
    :param batch_size: calibration samples per optimisation step. Independent of
        ``oneshot``'s ``batch_size`` (samples per layer call in llm-compressor's
        calibration and propagation passes): FlatQuant splits those calls into
        samples, so any oneshot batch size gives the same steps
    :param lr: AdamW learning rate of the transforms and smoothing vectors
    :param clip_lr: AdamW learning rate of the clip factors
    :param weight_decay: AdamW weight decay
    :param autocast_dtype: autocast dtype of the training forward (``bfloat16``/
        ``float16``), master weights staying float32; None trains in float32.
        ``"auto"`` (default): ``bfloat16`` on CUDA, as the paper's code trains (its
        attention then runs in flash kernels; in float32 with grouped KV heads torch
        falls back to the math kernel), float32 elsewhere
    :param cuda_graphs: on CUDA, capture each training step (forward, loss,
        gradients) once per input shape as a CUDA graph and replay it: the same
        kernels without the host's launch cost. Falls back to eager execution, with a
        warning, if a capture fails
    :param deterministic: train with ``torch.use_deterministic_algorithms(True)``
        (the attention backward included), so that two runs on the same GPU give the
        same model; without it, GPU runs differ slightly (README, "Reproducibility")
    :param offload_device: device on which cached layer inputs and targets are kept
        (None: the layer's execution device)
    :param seed: seed of the random initialisations
    :param on_nonfinite: ``"raise"`` stops the run when a layer's loss becomes
        NaN/Inf; ``"skip"`` leaves that layer untransformed and goes on
    :param quant_format: what the training quantizers emulate. ``"int"``: int
        ``w_bits`` per-channel weights and int4 per-token activations with the Ascend
        formula (the online transform quantizes the activations). ``"nvfp4"``:
        compressed-tensors' NVFP4 for weights and activations (FP4 values, FP8 group
        scales of 16, a global scale); the online transform only transforms and a
        following NVFP4 QuantizationModifier quantizes; no clip factors are learned
    :param fuse_global_scales: at finalize, give fused siblings (q/k/v, gate/up, MoE
        experts' w1/w3, MLA q_a/kv_a) of tensor-group schemes one shared
        ``weight_global_scale`` (MAX of their amax, reduced across ranks)
    :param sibling_patterns: extra sibling regexes for that fusion (capture groups
        form the group key), tried before
        :data:`flatquant_modifier.fusion.DEFAULT_SIBLING_PATTERNS`
    :param propagate_activation_quant: during calibration, pass the next layer the
        outputs of this layer with its activations quantized (its weights stay
        unquantized until the weight quantizer runs), in the spirit of
        llm-compressor's ``propagate_error``. False trains every layer on
        full-precision inputs, as the paper's code does; True measured 28.41 against
        29.65 on SmolLM2-135M (README, "Choosing the defaults")
    """

    requires_calibration_data: bool = True

    mappings: list[FlatQuantMapping] | None = None
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    sequential_targets: list[str] | None = None
    w_bits: int | None = 4
    a_bits: Literal[4] | None = 4
    learn_weight_clip: bool = True
    learn_activation_clip: bool = True
    clip_init_logit: float = 4.0
    smooth: bool = True
    smooth_alpha: float = Field(default=0.3, ge=0.0, le=1.0)
    parametrization: Parametrization = "dense"
    transform_init: TransformInit = "random"
    epochs: int = Field(default=15, ge=0)
    batch_size: int = Field(default=4, ge=1)
    lr: float = Field(default=5e-3, ge=0.0)
    clip_lr: float = Field(default=5e-2, ge=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    autocast_dtype: Literal["auto"] | TorchDtype | None = "auto"
    cuda_graphs: bool = True
    deterministic: bool = False
    offload_device: str | None = None
    seed: int = 0
    on_nonfinite: Literal["raise", "skip"] = "raise"
    propagate_activation_quant: bool = True
    quant_format: Literal["int", "nvfp4"] = "int"
    fuse_global_scales: bool = True
    sibling_patterns: list[str] | None = None

    # decoder layers in model order: (name, module, resolved groups)
    _layers: list[tuple[str, Module, list[ResolvedGroup]]] = PrivateAttr(
        default_factory=list
    )
    # cached call arguments of each decoder layer, one entry per calibration batch
    _calls: dict[Module, IntermediatesCache] = PrivateAttr(default_factory=dict)
    # names of the linears given an online transform so far
    _transformed: list[str] = PrivateAttr(default_factory=list)
    # optimisation step of each cached call, and the number of steps (same on all ranks)
    _step_of_call: tuple[list[int], int] | None = PrivateAttr(default=None)
    # per-layer training reports, in order
    _reports: list[LayerReport] = PrivateAttr(default_factory=list)
    # per decoder-layer structure, the mappings whose smoothing cannot be folded exactly
    _unfoldable: dict[tuple, list[str]] = PrivateAttr(default_factory=dict)
    # the model's attention implementation before calibration forced eager
    _attn_implementation: str | None = PrivateAttr(default=None)

    @field_validator("ignore", "sequential_targets", "sibling_patterns", mode="before")
    @classmethod
    def _wrap_str(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("offload_device", mode="before")
    @classmethod
    def _device_str(cls, value):
        return str(value) if isinstance(value, torch.device) else value

    @field_validator("w_bits")
    @classmethod
    def _check_bits(cls, value):
        if value is not None and not 2 <= value <= 8:
            raise ValueError(f"w_bits must be in [2, 8] or None, got {value}")
        return value

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
        self._layers = [
            (name, layer, resolve_layer(name, layer, self.mappings, self.ignore))
            for name, layer in match_named_modules(model, targets)
        ]
        self._check_nvfp4_sizes()
        if not self._layers:
            raise ValueError(
                f"FlatQuantModifier found no decoder layers matching {targets} in "
                f"{type(model).__name__}; pass sequential_targets=[<layer class>]"
            )
        if TRANSFORM_NAME in getattr(
            getattr(model, TRANSFORM_CONFIG_NAME, None), "config_groups", {}
        ):
            raise ValueError(
                "this model already carries FlatQuant transforms; apply "
                "FlatQuantModifier to the full-precision model"
            )
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        self._check_schemes()
        # under torchrun: lets on_finalize find the rank that computed each weight qparam
        mark_weight_qparams_unset(state.model)
        for _, layer, groups in self._layers:
            if groups:
                self._calls[layer] = IntermediatesCache(
                    None, torch.device(self.offload_device) if self.offload_device else None
                )
                self.register_hook(layer, self._cache_call, "forward_pre", with_kwargs=True)

    def on_sequential_epoch_end(self, state: State, event: Event, **kwargs):
        for index, (name, layer, groups) in enumerate(self._layers):
            cache = self._calls.get(layer)
            if cache is not None and len(cache) > 0:
                self._calibrate_layer(state.model, index, name, layer, groups)

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self.on_sequential_epoch_end(state, event, **kwargs)
        self.remove_hooks()
        self._calls.clear()
        self._record_transform_config(state.model)

    def on_finalize(self, state: State, **kwargs) -> bool:
        if not self.ended_:
            self.on_calibration_end(state, None)
        self._calls.clear()
        sync_weight_qparams(state.model)
        if self.fuse_global_scales:
            groups = fusion.fuse_global_scales(state.model, self.sibling_patterns)
            if groups:
                logger.info(f"FlatQuant: shared weight global scales in {groups} groups")
        hold_weights_during_forward(state.model)
        checked = verify_model(state.model, self._transformed, where="after oneshot")
        logger.info(f"FlatQuant: {len(self._transformed)} online transforms attached; "
                    f"{checked} linears compute their saved function")
        _verify_before_saving(state.model, list(self._transformed))
        return True

    # ------------------------------------------------------------------ helpers

    def _autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        if self.autocast_dtype != "auto":
            return self.autocast_dtype
        cuda = device.type == "cuda" and torch.cuda.is_available()
        if cuda and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None

    def _train_config(self, device: torch.device, layer: Module) -> TrainConfig:
        # float64 models train in float64 (reproducible across CPUs), others in float32
        float64 = any(p.dtype == torch.float64 for p in layer.parameters())
        return TrainConfig(
            dtype=torch.float64 if float64 else torch.float32,
            epochs=self.epochs,
            lr=self.lr,
            clip_lr=self.clip_lr,
            weight_decay=self.weight_decay,
            w_bits=self.w_bits,
            a_bits=self.a_bits,
            learn_weight_clip=self.learn_weight_clip,
            learn_activation_clip=self.learn_activation_clip,
            clip_init_logit=self.clip_init_logit,
            smooth=self.smooth,
            smooth_alpha=self.smooth_alpha,
            parametrization=self.parametrization,
            transform_init=self.transform_init,
            autocast_dtype=None if float64 else self._autocast_dtype(device),
            cuda_graphs=self.cuda_graphs,
            seed=self.seed,
            quant_format=self.quant_format,
        )

    def _check_nvfp4_sizes(self):
        if self.quant_format != "nvfp4":
            return
        for _, _, groups in self._layers:
            for group in groups:
                if group.in_features % 16:
                    raise ValueError(
                        f"FlatQuant quant_format='nvfp4': {group.linears[0][0]} has "
                        f"in_features={group.in_features}, not divisible by the NVFP4 "
                        "group size 16; add it to `ignore`"
                    )

    def _check_schemes(self):
        """The online transform quantizes activations; a scheme must not do it again."""
        if self._transform_type() == KRONECKER_TRANSFORM_TYPE:
            return
        for _, _, groups in self._layers:
            for group in groups:
                for name, linear in group.linears:
                    scheme = getattr(linear, "quantization_scheme", None)
                    if scheme is not None and scheme.input_activations is not None:
                        raise ValueError(
                            f"{name} has a quantization scheme that quantizes its input "
                            "activations, but FlatQuantModifier(a_bits=4) already "
                            "quantizes them in its online transform (Ascend formula, "
                            "learned clip ratio). Give the following QuantizationModifier"
                            "/GPTQModifier a weights-only scheme, or set a_bits=None to "
                            "leave activation quantization to that scheme."
                        )

    def _cache_call(self, module: Module, args: tuple, kwargs: dict):
        arguments = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        arguments |= arguments.pop("kwargs", {})
        for key, value in arguments.items():
            if isinstance(value, QuantizedKVCache):
                arguments[key] = None
        self._calls[module].append(arguments)

    def _calibrate_layer(
        self,
        model: Module,
        index: int,
        name: str,
        layer: Module,
        groups: list[ResolvedGroup],
    ):
        cache = self._calls.pop(layer)
        device = get_execution_device(layer)
        if device == "disk" or not isinstance(device, torch.device):
            device = torch.device("cpu")
        calls = split_calls([cache.fetch(i) for i in range(len(cache))])
        probe = calls[0]  # one sample, for the smoothing check
        del cache
        if self._step_of_call is None or len(self._step_of_call[0]) != len(calls):
            # once, at the first layer: the layer inputs are then the embeddings, equal
            # for equal samples in any process
            self._step_of_call = assign_steps(call_keys(calls), self.batch_size)
        steps = plan_steps(calls, *self._step_of_call)
        del calls
        config = self._train_config(device, layer)
        with contextlib.ExitStack() as stack:
            stack.enter_context(align_module_device(layer))
            stack.enter_context(HooksMixin.disable_hooks())
            stack.enter_context(deterministic_algorithms(self.deterministic))
            try:
                check_finite_parameters(name, layer)
                self._check_smoothing(name, layer, groups, probe, device)
                steps = stack.enter_context(
                    training_attention(model, layer, steps, self._attn_implementation)
                )
                targets, act_max = _full_precision_pass(layer, steps, groups, device)
                check_finite_targets(name, targets)
                generator = torch.Generator().manual_seed(self.seed + index)
                params = build_group_params(groups, act_max, config, device, generator)
                report = train_layer(
                    name, layer, groups, params, steps, targets, config, device
                )
            except NonFiniteLossError as error:
                if self.on_nonfinite == "raise":
                    raise
                logger.error(f"{error} Skipping it (on_nonfinite='skip').")
                return
            for group, group_params in zip(groups, params):
                p1, p2, clip = absorb_into_layer(group, group_params, config)
                self._attach_transforms(model, group, p1, p2, clip)
        log_report(report)
        self._reports.append(report)

    def _check_smoothing(self, name, layer, groups, probe, device):
        """
        Once per layer structure: smoothing that cannot be folded exactly into its
        smooth layer (:func:`flatquant_modifier.train.unfoldable_smoothing`) is turned
        off for that mapping, with one logged line, or refused when ``smooth=True``
        was asked for explicitly.
        """
        if not self.smooth:
            return
        structure = (type(layer).__name__, tuple(
            (relative_name(name, g.name), g.smooth and relative_name(name, g.smooth[0]))
            for g in groups
        ))
        if structure not in self._unfoldable:
            found = unfoldable_smoothing(name, layer, groups, probe, device)
            flags = torch.tensor([float(g.name in found) for g in groups])
            all_reduce_(flags, op=torch.distributed.ReduceOp.MAX)  # one verdict
            unfoldable = [relative_name(name, g.name) for g, f in zip(groups, flags) if f]
            self._unfoldable[structure] = unfoldable
            if unfoldable:
                smooth_layers = [relative_name(name, g.smooth[0]) for g, f in zip(groups, flags)
                                 if f]
                message = (
                    f"FlatQuant: the smoothing of {unfoldable} cannot be folded exactly "
                    f"into {smooth_layers} in {name} (the layer's output changes), so "
                    "the model would not be the one trained"
                )
                if "smooth" in self.model_fields_set:
                    raise ValueError(
                        f"{message}. Point the mapping's smooth_layer at the module that "
                        "produces exactly these linears' input, or set it to None."
                    )
                logger.warning(f"{message}; smoothing off for these inputs.")
        for group in groups:
            if relative_name(name, group.name) in self._unfoldable[structure]:
                group.smooth, group.smooth_index = None, None

    def _transform_type(self) -> str:
        if self.a_bits is None or self.quant_format == "nvfp4":
            return KRONECKER_TRANSFORM_TYPE
        return FLATQUANT_TRANSFORM_TYPE

    def _transform_scheme(self, names: list[str], precision: torch.dtype) -> TransformScheme:
        return TransformScheme(
            type=self._transform_type(),
            apply=[TransformArgs(targets=names, location="input")],
            precision=precision,
        )

    def _attach_transforms(
        self, model: Module, group: ResolvedGroup, p1, p2, clip_ratio: float
    ):
        names = [name for name, _ in group.linears]
        # the transforms keep the training precision (float32; float64 models: float64)
        scheme = self._transform_scheme(names, p1.dtype)
        TransformFactory.from_scheme(scheme, name=TRANSFORM_NAME).apply_to_model(
            model, use_tqdm=False
        )
        clip = torch.tensor([clip_ratio], dtype=torch.float32, device=p1.device)
        updates = []
        for _, linear in group.linears:
            transform = get_flatquant_transform(linear)
            updates += [(transform, "left_trans", p1), (transform, "right_trans", p2),
                        (transform, "clip_ratio", clip)]
        write_parameters(updates)
        for _, linear in group.linears:
            transform = get_flatquant_transform(linear)
            # the pipeline disabled quantization on the modules that existed when it
            # started; a transform attached now follows its linear's state, unless the
            # outputs passed on to the next layer should carry activation quantization
            if not self.propagate_activation_quant:
                transform.quantization_enabled = getattr(
                    linear, "quantization_enabled", True
                )
        self._transformed.extend(names)

    def _record_transform_config(self, model: Module):
        if not self._transformed:
            return
        first = get_flatquant_transform(model.get_submodule(self._transformed[0]))
        ours = TransformConfig(
            config_groups={
                TRANSFORM_NAME: self._transform_scheme(
                    list(self._transformed), first.left_trans.dtype
                )
            }
        )
        existing = getattr(model, TRANSFORM_CONFIG_NAME, None)
        if existing is not None:
            existing.config_groups.update(ours.config_groups)
            ours = existing
        setattr(model, TRANSFORM_CONFIG_NAME, ours)


def _verify_before_saving(model: Module, transformed: list[str]):
    """Run :func:`verify_model` before every ``model.save_pretrained`` (llm-compressor
    wraps that method on the instance too; its markers are kept)."""
    save_pretrained = model.save_pretrained
    if getattr(save_pretrained, "flatquant_verifies", False):
        return

    @functools.wraps(save_pretrained)
    def verified_save_pretrained(*args, **kwargs):
        verify_model(model, transformed, where="before save_pretrained")
        return save_pretrained(*args, **kwargs)

    verified_save_pretrained.flatquant_verifies = True
    model.save_pretrained = verified_save_pretrained


@torch.no_grad()
def _full_precision_pass(
    layer: Module,
    steps: list[list[dict]],
    groups: list[ResolvedGroup],
    device: torch.device,
) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """
    Full-precision outputs of ``layer`` for every sub-batch of every step, and the
    per-channel max|input| of each group (MAX-reduced over ranks).
    """
    act_max = [torch.zeros(group.in_features, device=device) for group in groups]

    def record(gi):
        def hook(_module, args):
            amax = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0)
            act_max[gi] = torch.maximum(act_max[gi], amax.float().to(device))

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
                step_targets.append(layer_output(layer(**kwargs)).detach())
            targets.append(step_targets)
    finally:
        for handle in handles:
            handle.remove()
    for amax in act_max:
        all_reduce_(amax, op=torch.distributed.ReduceOp.MAX)
    return targets, act_max
