"""
The FlatQuant optimisation loop of one decoder layer: AdamW with a cosine schedule on
the layer's :class:`~flatquant_modifier.modules.GroupParams`, minimising the MSE (or
the per-token relative error) between the layer's full-precision outputs and its
outputs with transformed, fake-quantized linears
(:class:`~flatquant_modifier.emulation.FakeQuantizedLayer`).
Gradients are summed over ranks under ``torchrun``; on CUDA each step replays as a
CUDA graph. What comes before (targets, initial parameters) and after (absorption)
is :mod:`flatquant_modifier.calibrate`.
"""

import contextlib
import functools
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from loguru import logger
from torch import nn
from tqdm import tqdm

from flatquant_modifier.batching import layer_input
from flatquant_modifier.cuda_graphs import StepGraphs
from flatquant_modifier.distributed import all_reduce_
from flatquant_modifier.emulation import FakeQuantizedLayer, plain_forwards
from flatquant_modifier.mappings import ResolvedGroup
from flatquant_modifier.modules import GroupParams, identity_params
from flatquant_modifier.options import FlatQuantOptions, Precision

__all__ = [
    "LayerReport",
    "NonFiniteLossError",
    "train_layer",
    "deterministic_algorithms",
    "log_report",
    "layer_loss",
    "lr_scheduler",
    "evaluation_steps",
]


class NonFiniteLossError(RuntimeError):
    """A layer's weights, full-precision outputs or training loss are NaN/Inf; the
    layer was left unchanged."""


@dataclass
class LayerReport:
    """
    Mean per-step training loss (``options.loss``, or the logits' MSE at the last
    layer: ``options.last_layer_loss``; over all ranks) of the layer output
    against full precision: ``loss_rtn`` with identity transforms, no smoothing and no
    clipping (plain round-to-nearest; None unless ``options.report_rtn_loss``),
    ``loss_init`` at the initial transforms,
    ``loss_final`` of the state applied: the trained one, or the initial one
    (``kept_initial``) when training ended above ``loss_init``. These three are
    measured on the evaluation steps (:func:`evaluation_steps`), ``epoch_losses`` on
    all steps while training.
    """

    name: str
    loss_rtn: float | None
    loss_init: float
    loss_final: float
    epoch_losses: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)  # each epoch's steps
    seconds: float = 0.0
    # of ``seconds``: the evaluation passes (round-to-nearest, before and after
    # training), their graph captures included
    evaluation_seconds: float = 0.0
    cuda_graphs: int = 0  # CUDA graphs captured for the layer (0: eager steps)
    kept_initial: bool = False  # training raised the loss: the initial state was kept


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


def layer_loss(out: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """
    The training loss of one sub-batch (:attr:`FlatQuantOptions.loss`): the MSE of the
    layer output, or (``"relative"``) each token's squared error over the mean square
    of its target, averaged over tokens.
    """
    if kind == "mse":
        return F.mse_loss(out, target)
    error = (out - target).square().mean(dim=-1)
    scale = target.square().mean(dim=-1).clamp_min(torch.finfo(target.dtype).tiny)
    return (error / scale).mean()


def evaluation_steps(num_steps: int, options: FlatQuantOptions) -> list[int]:
    """
    The steps an evaluation pass runs (:attr:`FlatQuantOptions.evaluation_samples`):
    all ``num_steps``, or ``ceil(evaluation_samples / batch_size)`` of them spread
    evenly over the epoch. Steps are numbered alike on every rank
    (:func:`flatquant_modifier.batching.assign_steps`), so every rank evaluates the
    same samples a single process does.
    """
    if options.evaluation_samples is None:
        return list(range(num_steps))
    count = min(math.ceil(options.evaluation_samples / options.batch_size), num_steps)
    return [index * num_steps // count for index in range(count)]


def _mean_loss(layer, patched, steps, targets, weights, selected, autocast, graphs,
               loss_fn) -> float:
    """Mean over the ``selected`` steps of the step loss (over all ranks); the matrices
    and quantized weights computed once for the whole pass, read by a CUDA graph of
    this pass."""
    total = torch.zeros((), dtype=torch.float64, device=_device_of(targets))
    step_loss = patched.loss_function(layer, loss_fn, autocast)

    def evaluate(kwargs, target):
        with torch.no_grad():
            return step_loss(kwargs, target)

    with patched.patched(), patched.fixed_parameters(autocast):
        tag = ("eval", id(patched), patched.fixed_passes)
        for index in selected:
            for kwargs, target, weight in zip(steps[index], targets[index], weights[index]):
                loss = graphs(tag, evaluate, kwargs, target)
                total += loss.double() * weight
    return float(all_reduce_(total)) / max(len(selected), 1)


def _merged_param_groups(groups: list[dict]) -> list[dict]:
    """
    One optimizer parameter group per distinct set of hyperparameters (the transforms'
    ``lr``, the clip factors' ``clip_lr``), in order of appearance: AdamW updates every
    element alike whichever group holds it, and each group costs a fused launch and its
    host work per step (eight groups for a Llama layer, two after merging).
    """
    merged: dict[tuple, dict] = {}
    for group in groups:
        settings = tuple(sorted((k, v) for k, v in group.items() if k != "params"))
        target = merged.setdefault(settings, {**group, "params": []})
        target["params"] += list(group["params"])
    return list(merged.values())


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
        # a contiguous view is each parameter's own layout (fused AdamW requires it)
        if not p.is_contiguous():
            raise ValueError(f"FlatQuant: a trainable parameter of shape {tuple(p.shape)} "
                             "is not contiguous; its gradient view would not match it")
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
    options: FlatQuantOptions,
    precision: Precision,
    device: torch.device,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> LayerReport:
    """
    Train ``params`` so that ``layer`` with transformed, fake-quantized linears
    reproduces ``targets`` (its full-precision outputs for ``steps``): minimising
    ``loss_fn(output, target)`` (default: :func:`layer_loss` of ``options.loss``).

    ``steps[k]`` holds the sub-batches of optimisation step ``k`` on this rank (see
    :func:`flatquant_modifier.batching.plan_steps`); under ``torch.distributed``
    every rank takes the same number of steps and the gradients are summed over ranks
    after each step, so all ranks hold identical parameters. On CUDA the loss and
    gradient computation of a sub-batch runs as a CUDA graph
    (:class:`flatquant_modifier.cuda_graphs.StepGraphs`, ``options.cuda_graphs``);
    the optimizer step stays eager.

    :raises NonFiniteLossError: if the loss becomes NaN/Inf (``params`` are then
        garbage and must not be applied; the layer itself is untouched)
    """
    start = time.perf_counter()
    if loss_fn is None:
        loss_fn = functools.partial(layer_loss, kind=options.loss)
    # the tokens a rank trains on (all epochs; the largest share of any rank, so that
    # all ranks decide alike): "auto" compiles long trainings, each rank its own graph
    tokens = torch.tensor(
        [sum(layer_input(kwargs)[1].shape[:-1].numel()
             for batches in steps for kwargs in batches)], dtype=torch.float64)
    tokens = all_reduce_(tokens, op=torch.distributed.ReduceOp.MAX)
    training_tokens = options.epochs * int(tokens.item())
    patched = FakeQuantizedLayer(groups, params, options, precision, device,
                                 training_tokens)
    if precision.autocast is not None:
        def autocast():
            # no cast cache: it would hold tensors across graph replays
            return torch.autocast(
                device.type, dtype=precision.autocast, cache_enabled=False
            )
    else:
        autocast = contextlib.nullcontext

    trainable = _merged_param_groups([g for p in params for g in p.param_groups(options)])
    flat_params = [p for g in trainable for p in g["params"]]
    weights = _step_weights(targets, device)
    total_steps = options.epochs * len(steps)
    graphs = StepGraphs(device, enabled=options.cuda_graphs)

    step_loss = patched.loss_function(layer, loss_fn, autocast, name)

    def loss_and_grads(kwargs, target):
        loss = step_loss(kwargs, target)
        grads = torch.autograd.grad(loss, flat_params, allow_unused=True)
        return loss.detach(), [
            torch.zeros_like(p) if g is None else g for p, g in zip(flat_params, grads)
        ]

    traceable = plain_forwards(layer) if patched.compiled else contextlib.nullcontext()
    evaluation_seconds = 0.0
    selected = evaluation_steps(len(steps), options)

    def evaluate(fake_quantized: FakeQuantizedLayer) -> float:
        nonlocal evaluation_seconds
        started = time.perf_counter()
        loss = _mean_loss(layer, fake_quantized, steps, targets, weights, selected,
                          autocast, graphs, loss_fn)  # (its value waits for the device)
        evaluation_seconds += time.perf_counter() - started
        return loss

    with _frozen(layer), torch.enable_grad(), _cuda_linalg(device), traceable:
        loss_rtn = None
        if options.report_rtn_loss:
            rtn = FakeQuantizedLayer(
                groups, identity_params(groups, options, precision.dtype, device),
                options, precision, device, training_tokens,
            )
            loss_rtn = evaluate(rtn)
            del rtn
        loss_init = evaluate(patched)
        # one optimizer implementation per device for every launch mode (torchrun or
        # not), so that a 1-rank torchrun run is the plain run bit for bit; on CUDA
        # the fused kernels (a couple of launches per parameter group, not a dozen)
        cuda = device.type == "cuda"
        optimizer = torch.optim.AdamW(
            trainable, weight_decay=options.weight_decay,
            **({"fused": True} if cuda else {"foreach": True}),
        )
        scheduler = lr_scheduler(optimizer, options, total_steps)
        grad_buffer, grad_views = _flat_gradients(flat_params, device)
        initial = [p.detach().clone() for p in flat_params]
        epoch_losses, epoch_seconds = [], []
        bar = tqdm(range(options.epochs), desc=f"FlatQuant {name}", leave=False)
        for epoch in bar:
            epoch_start = time.perf_counter()
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
            mean = float(all_reduce_(total)) / max(len(steps), 1)  # waits for the GPU
            epoch_seconds.append(time.perf_counter() - epoch_start)
            if not math.isfinite(mean):
                graphs.close()
                raise NonFiniteLossError(
                    f"FlatQuant: the training loss of layer {name} became {mean} in "
                    f"epoch {epoch + 1}/{options.epochs}; the layer was left unchanged. "
                    "Try a lower lr / clip_lr, autocast_dtype=None (fp32), or check the "
                    "calibration data for NaN/Inf activations."
                )
            epoch_losses.append(mean)
            bar.set_postfix(loss=f"{mean:.3g}")
        loss_final = evaluate(patched)
        # (the same decision on every rank: the losses are reduced over ranks)
        kept_initial = loss_final > loss_init
        if kept_initial:
            logger.warning(
                f"FlatQuant: training raised the loss of layer {name} from {loss_init:.4g} "
                f"to {loss_final:.4g}; its initial transforms and clip factors are kept. "
                "A lower lr / clip_lr trains it."
            )
            with torch.no_grad():
                torch._foreach_copy_(flat_params, initial)
            loss_final = loss_init
        del initial
        num_graphs = graphs.num_graphs
        graphs.close()
        for p in flat_params:
            p.grad = None
    return LayerReport(
        name, loss_rtn, loss_init, loss_final, epoch_losses, epoch_seconds,
        time.perf_counter() - start, evaluation_seconds, num_graphs, kept_initial,
    )


def lr_scheduler(optimizer: torch.optim.Optimizer, options: FlatQuantOptions,
                 total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """
    The learning-rate schedule of a layer's ``total_steps`` steps: ``options.lr_schedule``
    (cosine annealing to 0, or constant), after a linear warmup over the first
    ``W = ceil(options.lr_warmup * total_steps)`` steps (at most all but one; step
    ``k < W`` at ``(k + 1) / (W + 1)`` of the rates). Without warmup, torch's own
    schedulers (the paper code's cosine exactly).
    """
    # rounded up; at least one step after it at the full rates
    warmup = max(min(math.ceil(round(options.lr_warmup * total_steps, 9)), total_steps - 1), 0)
    if warmup == 0:
        if options.lr_schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=max(total_steps, 1), eta_min=0.0)
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    rest = max(total_steps - warmup, 1)
    cosine = options.lr_schedule == "cosine"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / rest)) if cosine else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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


def log_report(report: LayerReport):
    rtn = "" if report.loss_rtn is None else f"round-to-nearest {report.loss_rtn:.4g}, "
    logger.info(
        f"FlatQuant {report.name}: loss {report.loss_init:.4g} -> "
        f"{report.loss_final:.4g} ({rtn}{report.seconds:.1f}s)"
    )
