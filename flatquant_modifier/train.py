"""
Stateless per-decoder-layer FlatQuant training: learn the Kronecker transforms, the
clip factors and the smoothing vectors of one layer by minimising the MSE between the
layer's full-precision output and its output with transformed, fake-quantized linears;
then write the result into the layer's weights (float64).

Nothing here knows about llm-compressor's lifecycle; :mod:`flatquant_modifier.modifier`
calls :func:`train_layer` and :func:`absorb_into_layer` once per decoder layer.
"""

import contextlib
import math
import os
import time
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from compressed_tensors.offload import OffloadCache
from compressed_tensors.utils import patch_attr
from loguru import logger
from torch import nn
from tqdm import tqdm

from flatquant_modifier.cuda_graphs import StepGraphs
from flatquant_modifier.distributed import all_reduce_, write_parameters
from flatquant_modifier.kronecker import kronecker_matmul
from flatquant_modifier.mappings import ResolvedGroup, relative_name
from flatquant_modifier.modules import (
    ClipFactor,
    LearnableKronecker,
    Parametrization,
    TransformInit,
    matrices_and_inverses,
)
from flatquant_modifier.quantize import (
    fake_quantize_activation,
    fake_quantize_nvfp4,
    fake_quantize_weight,
)

__all__ = [
    "TrainConfig",
    "LayerReport",
    "NonFiniteLossError",
    "GroupParams",
    "build_group_params",
    "train_layer",
    "absorb_into_layer",
    "check_finite_parameters",
    "check_finite_targets",
    "deterministic_algorithms",
    "layer_output",
    "unfoldable_smoothing",
]


class NonFiniteLossError(RuntimeError):
    """A layer's weights, full-precision outputs or training loss are NaN/Inf; the
    layer was left unchanged."""


def check_finite_parameters(name: str, layer: nn.Module):
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
    finite = all(bool(torch.isfinite(t).all()) for step in targets for t in step)
    if not bool(all_reduce_(torch.tensor([float(finite)]), op=torch.distributed.ReduceOp.MIN)):
        raise NonFiniteLossError(
            f"FlatQuant: the full-precision outputs of layer {name} on the calibration "
            "data contain NaN/Inf (its inputs are not finite, or the model's dtype "
            f"overflows); the layer {name} was left unchanged. Check the calibration "
            "data and the earlier layers, or pass on_nonfinite='skip'."
        )


@dataclass
class TrainConfig:
    epochs: int = 15
    lr: float = 5e-3
    clip_lr: float = 5e-2
    weight_decay: float = 0.0
    w_bits: int | None = 4
    a_bits: int | None = 4
    learn_weight_clip: bool = True
    learn_activation_clip: bool = True
    clip_init_logit: float = 4.0
    smooth: bool = True
    smooth_alpha: float = 0.3
    parametrization: Parametrization = "dense"
    transform_init: TransformInit = "random"
    autocast_dtype: torch.dtype | None = None
    seed: int = 0
    quant_format: str = "int"  # "int" (Ascend W4A4) or "nvfp4"
    cuda_graphs: bool = True  # replay each sub-batch's step as a CUDA graph on CUDA
    # dtype of the learnable parameters and of the quantized forward: float32, or
    # float64 for a float64 model (results reproducible across CPUs)
    dtype: torch.dtype = torch.float32


@dataclass
class LayerReport:
    """
    Mean per-step MSE (over all ranks) of the layer output against full precision:
    ``loss_rtn`` with
    identity transforms, no smoothing and no clipping (plain round-to-nearest),
    ``loss_init`` at the initial transforms, ``loss_final`` after training.
    """

    name: str
    loss_rtn: float
    loss_init: float
    loss_final: float
    epoch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cuda_graphs: int = 0  # CUDA graphs captured for the layer (0: eager steps)


class GroupParams(nn.Module):
    """Learnable state of one transformed input (one :class:`ResolvedGroup`)."""

    def __init__(
        self,
        group: ResolvedGroup,
        config: TrainConfig,
        smooth_init: torch.Tensor | None,
        generator: torch.Generator,
    ):
        super().__init__()
        self.kron = LearnableKronecker(
            group.m, group.n, config.parametrization, config.transform_init, generator
        )
        int_format = config.quant_format == "int"
        self.act_clip = (
            ClipFactor(1, config.clip_init_logit)
            if int_format and config.a_bits is not None and config.learn_activation_clip
            else None
        )
        self.weight_clips = (
            nn.ModuleList(
                ClipFactor(linear.out_features, config.clip_init_logit)
                for _, linear in group.linears
            )
            if int_format and config.w_bits is not None and config.learn_weight_clip
            else None
        )
        # smoothing vector at the granularity of the layer it is folded into
        self.smooth = (
            nn.Parameter(smooth_init.to(config.dtype).clone())
            if smooth_init is not None
            else None
        )
        if self.smooth is not None and group.smooth_index is not None:
            self.register_buffer("smooth_index", group.smooth_index.clone())
        else:
            self.smooth_index = None

    def smooth_vector(self) -> torch.Tensor | None:
        """Smoothing vector over the linears' input channels (expanded for GQA)."""
        if self.smooth is None:
            return None
        if self.smooth_index is None:
            return self.smooth
        return self.smooth[self.smooth_index]

    def activation_clip(self) -> torch.Tensor | float:
        return self.act_clip() if self.act_clip is not None else 1.0

    def param_groups(self, config: TrainConfig) -> list[dict]:
        transform = list(self.kron.parameters())
        if self.smooth is not None:
            transform.append(self.smooth)
        clips = []
        if self.act_clip is not None:
            clips += list(self.act_clip.parameters())
        if self.weight_clips is not None:
            clips += list(self.weight_clips.parameters())
        groups = [{"params": transform, "lr": config.lr}]
        if clips:
            groups.append({"params": clips, "lr": config.clip_lr})
        return groups


@torch.no_grad()
def smoothquant_init(
    act_max: torch.Tensor, group: ResolvedGroup, alpha: float
) -> torch.Tensor:
    """
    SmoothQuant scales ``s_j = max|X_j|^alpha / max|W_:j|^(1 - alpha)`` at the
    granularity of the smooth layer (channels tied by ``smooth_index`` share one).
    """
    # float64: pow is computed by CPU-specific kernels, and float32 results would differ
    # in the last bit between machines (the training then diverges at 4 bits)
    w_max = torch.stack(
        [linear.weight.detach().abs().amax(dim=0).double() for _, linear in group.linears]
    ).amax(dim=0)
    act_max = act_max.double().to(w_max.device)
    if group.smooth_index is not None:
        size = int(group.smooth_index.max()) + 1
        index = group.smooth_index.to(w_max.device)
        act_max = act_max.new_zeros(size).scatter_reduce(
            0, index, act_max, "amax"
        )
        w_max = w_max.new_zeros(size).scatter_reduce(
            0, index, w_max, "amax"
        )
    scale = act_max.clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return scale.clamp(min=1e-5)


class _PatchedLayer:
    """
    Runs a decoder layer with its target linears replaced by transformed,
    fake-quantized ones whose parameters are the :class:`GroupParams`.
    Matrices are computed once per step; the transformed input of linears that
    share an input (q/k/v, gate/up) is computed once per forward.
    """

    def __init__(
        self,
        groups: list[ResolvedGroup],
        params: list[GroupParams],
        config: TrainConfig,
        device: torch.device,
    ):
        self.groups = groups
        self.params = params
        self.config = config
        # the linears of a group stacked by rows: transformed and quantized in one go
        self.weights = [
            torch.cat(
                [linear.weight.detach().to(device=device, dtype=config.dtype)
                 for _, linear in group.linears]
            )
            for group in groups
        ]
        self.out_features = [[linear.out_features for _, linear in g.linears] for g in groups]
        self.biases = [
            [
                None
                if linear.bias is None
                else linear.bias.detach().to(device=device, dtype=config.dtype)
                for _, linear in group.linears
            ]
            for group in groups
        ]
        self._step: dict[int, tuple] = {}
        self._quantized: dict[int, tuple[torch.Tensor, ...]] = {}
        self._inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def new_step(self):
        self._step.clear()
        self._quantized.clear()
        self._inputs.clear()

    def _matrices(self, gi: int):
        """``(P1, P1^-T, P2, P2^-T, act_clip, smooth)`` of group ``gi``; all groups'
        matrices are computed together, once per step (batched inverses)."""
        if not self._step:
            factors = matrices_and_inverses(
                [m for p in self.params for m in (p.kron.left, p.kron.right)]
            )
            for index, p in enumerate(self.params):
                (p1, p1_inv_t), (p2, p2_inv_t) = factors[2 * index : 2 * index + 2]
                self._step[index] = (
                    p1, p1_inv_t, p2, p2_inv_t, p.activation_clip(), p.smooth_vector()
                )
        return self._step[gi]

    def _group_weights(self, gi: int) -> tuple[torch.Tensor, ...]:
        """The group's transformed, fake-quantized weights (once per step)."""
        if gi not in self._quantized:
            _, p1_inv_t, _, p2_inv_t, _, smooth = self._matrices(gi)
            weight = self.weights[gi]
            if smooth is not None:
                weight = weight * smooth
            weight = kronecker_matmul(weight, p1_inv_t, p2_inv_t)
            cfg = self.config
            if cfg.quant_format == "nvfp4":  # one global scale per linear
                parts = [fake_quantize_nvfp4(w) for w in weight.split(self.out_features[gi])]
            else:
                if cfg.w_bits is not None:
                    weight = fake_quantize_weight(weight, self._weight_clips(gi), cfg.w_bits)
                parts = weight.split(self.out_features[gi])
            self._quantized[gi] = tuple(parts)
        return self._quantized[gi]

    def _weight_clips(self, gi: int) -> torch.Tensor | float:
        clips = self.params[gi].weight_clips
        return 1.0 if clips is None else torch.cat([clip() for clip in clips])

    def _forward(self, gi: int, li: int, x: torch.Tensor) -> torch.Tensor:
        p1, _, p2, _, act_clip, smooth = self._matrices(gi)
        cfg = self.config
        cached = self._inputs.get(gi)
        if cached is not None and cached[0] is x:
            h = cached[1]
        else:
            h = x.to(cfg.dtype)
            if smooth is not None:
                h = h / smooth
            h = kronecker_matmul(h, p1, p2)
            if cfg.quant_format == "nvfp4":
                h = fake_quantize_nvfp4(h.to(cfg.dtype))
            elif cfg.a_bits is not None:
                h = fake_quantize_activation(h.to(cfg.dtype), act_clip, cfg.a_bits)
            self._inputs[gi] = (x, h)
        weight = self._group_weights(gi)[li]
        return F.linear(h, weight, self.biases[gi][li]).to(x.dtype)

    @contextlib.contextmanager
    def patched(self):
        with contextlib.ExitStack() as stack:
            for gi, group in enumerate(self.groups):
                for li, (_, linear) in enumerate(group.linears):
                    stack.enter_context(
                        patch_attr(linear, "forward", self._make_forward(gi, li))
                    )
            yield

    def _make_forward(self, gi: int, li: int) -> Callable:
        return lambda x: self._forward(gi, li, x)


def layer_output(out: Any) -> torch.Tensor:
    """The hidden states a decoder layer returns (alone or first of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def _frozen(module: nn.Module):
    """No gradients for the layer's own parameters while its transforms train."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def build_group_params(
    groups: list[ResolvedGroup],
    act_max: list[torch.Tensor | None],
    config: TrainConfig,
    device: torch.device,
    generator: torch.Generator,
) -> list[GroupParams]:
    params = []
    for group, amax in zip(groups, act_max):
        smooth_init = None
        if config.smooth and group.smooth is not None and amax is not None:
            smooth_init = smoothquant_init(amax, group, config.smooth_alpha)
        params.append(
            GroupParams(group, config, smooth_init, generator).to(device, config.dtype)
        )
    return params


def _step_weights(
    targets: list[list[torch.Tensor]], device: torch.device
) -> list[list[float]]:
    """
    Weight of each sub-batch in its step's loss: its share of the step's output
    elements over all ranks, so that summing the weighted losses (and their gradients)
    over sub-batches and ranks gives the step's mean squared error.
    """
    counts = torch.tensor(
        [sum(t.numel() for t in step) for step in targets],
        dtype=torch.float64,
        device=device,
    )
    all_reduce_(counts)
    return [
        [t.numel() / max(float(total), 1.0) for t in step]
        for step, total in zip(targets, counts.tolist())
    ]


def _mean_loss(layer, patched, steps, targets, weights, autocast, graphs) -> float:
    """Mean over steps of the step MSE (over all ranks)."""
    total = torch.zeros((), dtype=torch.float64, device=_device_of(targets))

    def evaluate(kwargs, target):
        with torch.no_grad():
            patched.new_step()
            with autocast():
                out = layer_output(layer(**kwargs))
            dtype = patched.config.dtype
            loss = F.mse_loss(out.to(dtype), target.to(dtype))
            patched.new_step()
        return loss

    with patched.patched():
        for batches, step_targets, step_weights in zip(steps, targets, weights):
            for kwargs, target, weight in zip(batches, step_targets, step_weights):
                loss = graphs(("eval", id(patched)), evaluate, kwargs, target)
                total += loss.double() * weight
    return float(all_reduce_(total)) / max(len(steps), 1)


def _device_of(targets: list[list[torch.Tensor]]) -> torch.device:
    return next((t.device for step in targets for t in step), torch.device("cpu"))


def _flat_gradients(params: list[nn.Parameter], device: torch.device):
    """
    One flat buffer (the parameters' dtype) holding every parameter's ``.grad`` (as
    views), so that the sum over ranks is one all-reduce and sub-batches accumulate
    with one ``_foreach_add_``.
    """
    dtype = params[0].dtype if params else torch.float32
    buffer = torch.zeros(sum(p.numel() for p in params), device=device, dtype=dtype)
    views, offset = [], 0
    for p in params:
        views.append(buffer[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    for p, view in zip(params, views):
        p.grad = view
    return buffer, views


def train_layer(
    name: str,
    layer: nn.Module,
    groups: list[ResolvedGroup],
    params: list[GroupParams],
    steps: list[list[dict[str, Any]]],
    targets: list[list[torch.Tensor]],
    config: TrainConfig,
    device: torch.device,
) -> LayerReport:
    """
    Train ``params`` so that ``layer`` with transformed, fake-quantized linears
    reproduces ``targets`` (its full-precision outputs for ``steps``).

    ``steps[k]`` holds the sub-batches of optimisation step ``k`` on this rank (see
    :func:`flatquant_modifier.batching.plan_steps`); under ``torch.distributed``
    every rank takes the same number of steps and the gradients are summed over ranks
    after each step, so all ranks hold identical parameters. On CUDA the loss and
    gradient computation of a sub-batch runs as a CUDA graph
    (:class:`flatquant_modifier.cuda_graphs.StepGraphs`, ``config.cuda_graphs``);
    the optimizer step stays eager.

    :raises NonFiniteLossError: if the loss becomes NaN/Inf (``params`` are then
        garbage and must not be applied; the layer itself is untouched)
    """
    start = time.perf_counter()
    patched = _PatchedLayer(groups, params, config, device)
    if config.autocast_dtype is not None:
        def autocast():
            # no cast cache: it would hold tensors across graph replays
            return torch.autocast(
                device.type, dtype=config.autocast_dtype, cache_enabled=False
            )
    else:
        autocast = contextlib.nullcontext

    trainable = [g for p in params for g in p.param_groups(config)]
    flat_params = [p for g in trainable for p in g["params"]]
    weights = _step_weights(targets, device)
    total_steps = config.epochs * len(steps)
    graphs = StepGraphs(device, enabled=config.cuda_graphs)

    def loss_and_grads(kwargs, target):
        patched.new_step()
        with autocast():
            out = layer_output(layer(**kwargs))
        loss = F.mse_loss(out.to(config.dtype), target.to(config.dtype))
        grads = torch.autograd.grad(loss, flat_params, allow_unused=True)
        patched.new_step()
        return loss.detach(), [
            torch.zeros_like(p) if g is None else g for p, g in zip(flat_params, grads)
        ]

    rtn = _PatchedLayer(groups, _identity_params(groups, config, device), config, device)
    with _frozen(layer), torch.enable_grad(), _cuda_linalg(device):
        loss_rtn = _mean_loss(layer, rtn, steps, targets, weights, autocast, graphs)
        del rtn
        loss_init = _mean_loss(layer, patched, steps, targets, weights, autocast, graphs)
        # one optimizer implementation for every launch mode (torchrun or not), so
        # that a 1-rank torchrun run is the plain run bit for bit
        optimizer = torch.optim.AdamW(
            trainable, weight_decay=config.weight_decay, foreach=True
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(total_steps, 1), eta_min=0.0
        )
        grad_buffer, grad_views = _flat_gradients(flat_params, device)
        epoch_losses = []
        bar = tqdm(range(config.epochs), desc=f"FlatQuant {name}", leave=False)
        for epoch in bar:
            total = torch.zeros((), dtype=torch.float64, device=device)
            with patched.patched():
                for batches, step_targets, step_weights in zip(steps, targets, weights):
                    grad_buffer.zero_()
                    for kwargs, target, weight in zip(batches, step_targets, step_weights):
                        # each sub-batch's loss weighted by its share of the step
                        loss, grads = graphs("train", loss_and_grads, kwargs, target)
                        torch._foreach_add_(grad_views, grads, alpha=weight)
                        total += loss.double() * weight
                    all_reduce_(grad_buffer)
                    optimizer.step()
                    scheduler.step()
            mean = float(all_reduce_(total)) / max(len(steps), 1)
            if not math.isfinite(mean):
                graphs.close()
                raise NonFiniteLossError(
                    f"FlatQuant: the training loss of layer {name} became {mean} in "
                    f"epoch {epoch + 1}/{config.epochs}; the layer was left unchanged. "
                    "Try a lower lr / clip_lr, autocast_dtype=None (fp32), or check the "
                    "calibration data for NaN/Inf activations."
                )
            epoch_losses.append(mean)
            bar.set_postfix(loss=f"{mean:.3g}")
        loss_final = _mean_loss(layer, patched, steps, targets, weights, autocast, graphs)
        num_graphs = graphs.num_graphs
        graphs.close()
        for p in flat_params:
            p.grad = None
    return LayerReport(
        name, loss_rtn, loss_init, loss_final, epoch_losses, time.perf_counter() - start,
        num_graphs,
    )


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True):
    """
    ``torch.use_deterministic_algorithms(True)`` within the context (the previous mode
    after): the flash-attention backward then runs its deterministic kernel, and an op
    without a deterministic implementation raises instead of varying between runs.
    cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` for that; it is set to ``:4096:8`` if
    unset (set it before the process starts for runs that are bitwise equal across
    processes).
    """
    if not enabled:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@contextlib.contextmanager
def _cuda_linalg(device: torch.device):
    """
    cuSOLVER/cuBLAS for the (batched) inverses on CUDA: MAGMA, which torch picks for
    some batched sizes, synchronises with the host and cannot be captured in a graph.
    """
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cuda.preferred_linalg_library()
    torch.backends.cuda.preferred_linalg_library("cusolver")
    try:
        yield
    finally:
        torch.backends.cuda.preferred_linalg_library(previous)


def _identity_params(
    groups: list[ResolvedGroup], config: TrainConfig, device: torch.device
) -> list[GroupParams]:
    """Identity transforms, no smoothing, no clipping: the round-to-nearest baseline."""
    plain = TrainConfig(
        w_bits=config.w_bits,
        a_bits=config.a_bits,
        quant_format=config.quant_format,
        learn_weight_clip=False,
        learn_activation_clip=False,
        smooth=False,
        parametrization="dense",
        transform_init="identity",
    )
    return [GroupParams(g, plain, None, None).to(device, config.dtype) for g in groups]


@torch.no_grad()
def absorb_into_layer(
    group: ResolvedGroup, params: GroupParams, config: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """
    Write one group's training result into the model, in float64:
    ``W <- clamp(W diag(s) P^-T, +-c_w * amax)`` for every linear, the smoothing
    vector divided out of the smooth layer, and return ``(P1, P2, act_clip)`` for the
    online transform. All new values are computed before any is written
    (:func:`flatquant_modifier.distributed.write_parameters`).
    """
    ((p1, p1_inv_t), (p2, p2_inv_t)) = params.kron.export()
    smooth = params.smooth_vector()
    updates = []
    for li, (_, linear) in enumerate(group.linears):
        weight = linear.weight.detach().double()
        if smooth is not None:
            weight = weight * smooth.double().to(weight.device)
        weight = kronecker_matmul(
            weight, p1_inv_t.to(weight.device), p2_inv_t.to(weight.device)
        )
        if params.weight_clips is not None:
            clip = params.weight_clips[li]().double().to(weight.device).unsqueeze(-1)
            bound = weight.abs().amax(dim=-1, keepdim=True) * clip
            weight = torch.maximum(torch.minimum(weight, bound), -bound)
        updates.append((linear, "weight", weight.to(linear.weight.dtype)))
    if smooth is not None:
        updates += _fold_into_producer(group.smooth[1], params.smooth.detach().double())
    write_parameters(updates)
    return p1.to(config.dtype), p2.to(config.dtype), float(params.activation_clip())


def _fold_into_producer(module: nn.Module, smooth: torch.Tensor) -> list[tuple]:
    """Fold ``1/s`` into the producer of the input: a norm's weight or a linear's rows."""
    weight = module.weight.detach()
    s = smooth.to(weight.device)
    if weight.ndim == 1:
        updates = [(module, "weight", (weight.double() / s).to(weight.dtype))]
    else:
        updates = [(module, "weight", (weight.double() / s.unsqueeze(-1)).to(weight.dtype))]
    bias = getattr(module, "bias", None)
    if bias is not None:
        updates.append((module, "bias", (bias.double() / s).to(bias.dtype)))
    return updates


@torch.no_grad()
def unfoldable_smoothing(
    layer_name: str,
    layer: nn.Module,
    groups: list[ResolvedGroup],
    kwargs: dict[str, Any],
    device: torch.device,
) -> list[str]:
    """
    Names of the groups whose smoothing cannot be folded exactly into their smooth
    layer (e.g. a norm that does not produce the group's input, as Gemma2's
    ``post_attention_layernorm`` for its MLP): on a float64 copy of ``layer``, run on
    one cached call, dividing the smooth layer by a random ``s`` and multiplying the
    group's weights by ``s`` must leave the layer's output unchanged (what training
    emulates by dividing the linears' input by ``s``).
    """
    candidates = [group for group in groups if group.smooth is not None]
    if not candidates:
        return []
    copy = _float64_copy(layer, device)
    probe = _to_float64(kwargs, device)
    reference = layer_output(copy(**probe))
    generator = torch.Generator().manual_seed(0)
    unfoldable = []
    for group in candidates:
        producer = copy.get_submodule(relative_name(layer_name, group.smooth[0]))
        linears = [copy.get_submodule(relative_name(layer_name, n)) for n, _ in group.linears]
        s = torch.empty(producer.weight.shape[0], dtype=torch.float64).uniform_(
            0.5, 2.0, generator=generator
        ).to(device)
        columns = s if group.smooth_index is None else s[group.smooth_index.to(device)]
        updates = _fold_into_producer(producer, s) + [
            (linear, "weight", linear.weight * columns) for linear in linears
        ]
        saved = [(module, name, getattr(module, name).clone()) for module, name, _ in updates]
        for module, name, value in updates:
            getattr(module, name).copy_(value)
        folded = layer_output(copy(**probe))
        for module, name, value in saved:
            getattr(module, name).copy_(value)
        error = (folded - reference).norm() / reference.norm().clamp_min(1e-300)
        # an exact fold moves the output by rounding only (1e-7 where a module computes
        # in float32 internally, as llm-compressor's offset-norm replacement does); a
        # fold into the wrong module moves it by about s - 1, i.e. O(1)
        if not float(error) <= 1e-3:
            unfoldable.append(group.name)
    return unfoldable


def _float64_copy(layer: nn.Module, device: torch.device) -> nn.Module:
    """
    A float64 copy of ``layer`` on ``device``: its onloaded tensors (not
    compressed-tensors' offload storage, which a copy cannot share, e.g. files on
    disk), without hooks (they reference the modifiers and their caches) and without
    the offload wrappers of ``forward``.
    """
    hook_dicts = ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks",
                  "_backward_pre_hooks")
    saved = []
    try:
        for module in layer.modules():
            state = {key: getattr(module, key)
                     for key in (*hook_dicts, "_parameters", "_buffers")}
            saved.append((module, state))
            for key in hook_dicts:
                setattr(module, key, type(state[key])())
            if isinstance(module._parameters, OffloadCache):
                module._parameters = dict(module._parameters.items())
                module._buffers = dict(module._buffers.items())
        copy = deepcopy(layer)
    finally:
        for module, state in saved:
            for key, value in state.items():
                setattr(module, key, value)
    for module in copy.modules():
        if hasattr(module, "_original_forward_func"):  # compressed-tensors' offload wrapper
            module.forward = module._original_forward_func.__get__(module)
            del module._original_forward_func
    return copy.to(device=device, dtype=torch.float64)


def _to_float64(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.to(device)
        return value.double() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_to_float64(v, device) for v in value)
    if isinstance(value, dict):
        return {key: _to_float64(v, device) for key, v in value.items()}
    return value


def log_report(report: LayerReport):
    logger.info(
        f"FlatQuant {report.name}: loss {report.loss_init:.4g} -> "
        f"{report.loss_final:.4g} (round-to-nearest {report.loss_rtn:.4g}, "
        f"{report.seconds:.1f}s)"
    )
