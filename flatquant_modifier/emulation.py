"""
A decoder layer run with its target linears replaced by transformed, fake-quantized
ones whose parameters are the learnable :class:`~flatquant_modifier.modules.GroupParams`:
the forward FlatQuant trains and evaluates (:mod:`flatquant_modifier.train`), compiled
as one graph (the layer, its quantizers and the loss) for large layers on a GPU.
"""

import contextlib
import functools
import importlib.util
from typing import Any, Callable

import torch
import torch.nn.functional as F
from compressed_tensors.offload import OffloadCache
from compressed_tensors.utils import patch_attr
from loguru import logger

from flatquant_modifier.kronecker import (
    kronecker_matmul,
    kronecker_matmul_factor_major,
    to_factor_major,
)
from flatquant_modifier.mappings import ResolvedGroup
from flatquant_modifier.modules import GroupParams, matrices_and_inverses
from flatquant_modifier.options import FlatQuantOptions, Precision
from flatquant_modifier.quantize import (
    fake_quantize_activation,
    fake_quantize_mxfp4,
    fake_quantize_mxfp4_weight,
    fake_quantize_nvfp4,
    fake_quantize_weight,
)

__all__ = [
    "FakeQuantizedLayer",
    "compile_step",
    "layer_output",
    "same_output",
    "plain_forwards",
    "quantized_weights",
    "quantized_input",
    "transformed_weights",
    "use_torch_compile",
]


def layer_output(out: Any) -> torch.Tensor:
    """The hidden states a decoder layer returns (alone or first of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def same_output(output: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether a layer's ``output`` is ``reference`` up to the rounding of other
    kernels (another attention implementation): 1e-3 relative in float32/float64,
    3e-2 in lower precision, the absolute bound scaled by the reference's maximum."""
    tol = 1e-3 if reference.dtype in (torch.float32, torch.float64) else 3e-2
    return output.shape == reference.shape and torch.allclose(
        output, reference, rtol=tol, atol=tol * float(reference.abs().max())
    )


class FakeQuantizedLayer:
    """
    Runs a decoder layer with its target linears replaced by transformed,
    fake-quantized ones whose parameters are the :class:`GroupParams`.
    Matrices are computed once per step; the transformed input of linears that
    share an input (q/k/v, gate/up) is computed once per forward.
    :meth:`loss_function` gives a sub-batch's loss, compiled when
    :func:`use_torch_compile` says so.
    """

    def __init__(
        self,
        groups: list[ResolvedGroup],
        params: list[GroupParams],
        options: FlatQuantOptions,
        precision: Precision,
        device: torch.device,
        training_tokens: int = 0,
    ):
        self.groups = groups
        self.params = params
        self.options = options
        self.dtype = precision.dtype
        self.device_type = torch.device(device).type
        num_weights = transformed_weights(groups)
        self.compiled = compiled = use_torch_compile(
            options, device, num_weights, training_tokens)
        self.levels_dtype = quantized_matmul_levels(options, device, groups, num_weights,
                                                    compiled)
        # the linears of a group stacked by rows, factor-major ([M, rows, N]: both
        # Kronecker factors are plain matrix products), transformed and quantized in one
        # go; compiled, kept in the model's dtype (bfloat16: half the memory) and cast
        # exactly inside the fused kernels (an eager cast would keep a copy for backward)
        self.weights = [
            to_factor_major(
                torch.cat([
                    linear.weight.detach().to(device=device, dtype=_storage_dtype(
                        linear.weight.dtype, self.dtype) if compiled else self.dtype)
                    for _, linear in group.linears
                ]),
                p.kron.left.size, p.kron.right.size,
            )
            for group, p in zip(groups, params)
        ]
        self.out_features = [[linear.out_features for _, linear in g.linears] for g in groups]
        self.biases = [
            [
                None
                if linear.bias is None
                else linear.bias.detach().to(device=device, dtype=self.dtype)
                for _, linear in group.linears
            ]
            for group in groups
        ]
        self._step: dict[int, tuple] = {}
        self._quantized: dict[int, tuple[torch.Tensor, ...]] = {}
        self._inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._fixed = False  # inside fixed_parameters(): keep _step and _quantized
        self.fixed_passes = 0  # fixed_parameters() contexts entered

    def new_step(self):
        if not self._fixed:
            self._step.clear()
            self._quantized.clear()
        self._inputs.clear()

    @contextlib.contextmanager
    def fixed_parameters(self, autocast: Callable[[], contextlib.AbstractContextManager]):
        """
        For evaluation passes (no gradients, parameters unchanged): the matrices and
        quantized weights are computed once on entry, under ``autocast()`` as a forward
        computes them (the same values), and every call inside reuses them instead of
        computing them per sub-batch; released on exit. A CUDA graph captured inside
        reads these tensors: replay it in this context only
        (:attr:`fixed_passes` tells the contexts apart).
        """
        self._fixed = False
        self.new_step()
        with torch.no_grad(), autocast():
            for gi in range(len(self.groups)):
                self._group_weights(gi)
        self._fixed = True
        self.fixed_passes += 1
        try:
            yield
        finally:
            self._fixed = False
            self.new_step()

    def loss_function(
        self,
        layer: torch.nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        autocast: Callable[[], contextlib.AbstractContextManager],
        name: str = "",
    ) -> Callable[[dict[str, Any], torch.Tensor], torch.Tensor]:
        """
        ``(kwargs, target) -> loss`` of one sub-batch: ``layer`` (inside
        :meth:`patched`) run on ``kwargs`` under ``autocast()``, its output and
        ``target`` compared by ``loss_fn`` in the training dtype; each call is a step
        of its own (matrices and quantized weights computed afresh), except inside
        :meth:`fixed_parameters` (computed once for all calls). Compiled
        (:attr:`compiled`), the calls with gradients run as one inductor graph, so
        that the layer's own operators (norms, rotary embedding, SiLU, residual adds)
        fuse with the quantizers, forward and backward; the few evaluation passes (no
        gradients) run eagerly, sparing their compilations. If compiling or running the
        compiled graph fails, a warning naming the layer ``name`` says so and the
        function runs eagerly from then on (the same values).
        """

        def forward_loss(kwargs: dict[str, Any], target: torch.Tensor) -> torch.Tensor:
            with autocast():
                out = layer_output(layer(**kwargs))
            loss = loss_fn(out.to(self.dtype), target.to(self.dtype))
            # emptied inside the traced function: tensors left in the step caches would
            # leave a compiled graph as extra outputs, each written to memory and given
            # a zero-filled gradient in the backward
            self.new_step()
            return loss

        compiled = compile_step(forward_loss) if self.compiled else None

        def step_loss(kwargs: dict[str, Any], target: torch.Tensor) -> torch.Tensor:
            nonlocal compiled
            self.new_step()
            try:
                if compiled is not None and torch.is_grad_enabled():
                    try:
                        return compiled(kwargs, target)
                    except Exception as error:  # compiling is an optimisation
                        compiled = None
                        self.new_step()
                        logger.warning(
                            f"FlatQuant: the compiled training forward of layer {name} "
                            f"failed ({type(error).__name__}: {error}); it trains eagerly "
                            "(torch_compile=False avoids the attempt)"
                        )
                return forward_loss(kwargs, target)
            finally:
                self.new_step()  # no step's tensors kept

        return step_loss

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
            cfg = self.options
            rows = self.out_features[gi]
            weight = quantized_weights(
                self.weights[gi], smooth, p1_inv_t, p2_inv_t,
                self.params[gi].weight_clip(), cfg.quant_format, cfg.w_bits, self.dtype,
                rows if cfg.quant_format == "nvfp4" else None,
                _autocast_dtype(self.device_type), self.levels_dtype,
            )
            if self.levels_dtype is not None:  # (weights, levels, scales), per linear
                self._quantized[gi] = tuple(zip(*(t.split(rows) for t in weight)))
            else:
                self._quantized[gi] = (
                    weight if isinstance(weight, tuple) else weight.split(rows))
        return self._quantized[gi]

    def _forward(self, gi: int, li: int, x: torch.Tensor) -> torch.Tensor:
        cached = self._inputs.get(gi)
        if cached is not None and cached[0] is x:
            h = cached[1]
        else:
            p1, _, p2, _, act_clip, smooth = self._matrices(gi)
            cfg = self.options
            # an input several linears share stays in ``self.dtype``: autocast casts
            # it per linear, so that their gradients add up in that precision
            shared = len(self.groups[gi].linears) > 1
            h = quantized_input(
                x, smooth, p1, p2, act_clip, cfg.quant_format, cfg.a_bits, self.dtype,
                None if shared else _autocast_dtype(self.device_type), self.levels_dtype,
            )
            self._inputs[gi] = (x, h)
        weight = self._group_weights(gi)[li]
        if self.levels_dtype is not None:
            out = _LevelsLinear.apply(h[0], weight[0], h[1], h[2], weight[1], weight[2])
            bias = self.biases[gi][li]
            return (out if bias is None else out + bias.to(out.dtype)).to(x.dtype)
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


# "auto" multiplies FP8 levels in layers whose GEMMs repay the levels' quantization.
# One H200, compiled: a Llama-3-8B layer (218 M transformed weights) steps in 25.1
# against 26.9 ms; SmolLM2-135M's layers (3.5 M) train 13 % slower (50.0 against 44.1 s
# of training epochs at 128 x 2048)
AUTO_QUANTIZED_MATMUL_MIN_WEIGHTS = 50_000_000


def quantized_matmul_levels(options: FlatQuantOptions, device: torch.device,
                            groups: list[ResolvedGroup], num_weights: int,
                            compiled: bool) -> torch.dtype | None:
    """The dtype of the levels a layer's training forward multiplies
    (:attr:`FlatQuantOptions.quantized_matmul`), None for the training dtype's GEMMs."""
    if options.quantized_matmul != "auto":
        return levels_dtype(options, device, groups) if options.quantized_matmul else None
    if not (compiled and _unaligned(groups) is None
            and num_weights >= AUTO_QUANTIZED_MATMUL_MIN_WEIGHTS
            and torch.device(device).type == "cuda"):
        return None
    if levels_dtype(options, device, groups) != torch.float8_e4m3fn:
        return None
    _announce_fp8_levels()
    return torch.float8_e4m3fn


@functools.cache  # once per process, not per layer
def _announce_fp8_levels():
    logger.info("FlatQuant: the training forward multiplies FP8 levels "
                "(quantized_matmul='auto': compiled layers of at least 50 M transformed "
                "weights on FP8 tensor cores)")


def _unaligned(groups: list[ResolvedGroup]) -> tuple[str, torch.nn.Linear] | None:
    """The first linear whose features are not multiples of 16 (the FP8 and int8
    GEMMs' alignment), None if there is none."""
    for group in groups:
        for name, linear in group.linears:
            if linear.in_features % 16 or linear.out_features % 16:
                return name, linear
    return None


def levels_dtype(options: FlatQuantOptions, device: torch.device,
                 groups: list[ResolvedGroup]) -> torch.dtype:
    """
    The dtype of the integer levels multiplied by ``quantized_matmul``: FP8 e4m3 on
    NVIDIA GPUs with FP8 tensor cores (compute capability 8.9 and up) for levels of up
    to 4 bits (e4m3 holds the integers up to 16; the products, at most 64, and their
    partial sums stay exact in the tensor cores' accumulators), else int8.

    :raises ValueError: a linear's features are not multiples of 16 (the FP8 and int8
        GEMMs' alignment), or the device is neither a CPU nor a CUDA GPU
    """
    unaligned = _unaligned(groups)
    if unaligned is not None:
        name, linear = unaligned
        raise ValueError(
            f"FlatQuant: quantized_matmul needs in and out features that are "
            f"multiples of 16; {name} is {linear.in_features} -> "
            f"{linear.out_features}. Set quantized_matmul=False."
        )
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"FlatQuant: quantized_matmul runs on CPUs and CUDA GPUs, not on "
            f"{device.type}. Set quantized_matmul=False."
        )
    fp8 = (device.type == "cuda" and torch.version.hip is None
           and max(options.w_bits, options.a_bits) <= 4
           and torch.cuda.get_device_capability(device) >= (8, 9))
    return torch.float8_e4m3fn if fp8 else torch.int8


def levels_matmul(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor,
                  b_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """
    ``(a @ b.T) * a_scale * b_scale.T`` of integer levels ``a [M, K]`` and ``b [N, K]``
    (int8 or float8_e4m3fn) with per-row scales ``[M, 1]`` and ``[N, 1]``: int8 GEMM
    with int32 sums (``torch._int_mm``, which needs more than 16 rows: fewer multiply
    in float32) or FP8 GEMM with float32 sums (``torch._scaled_mm``; its row-wise
    scales where the result is bfloat16 on a GPU, which every FP8 GPU supports; else
    unit scales and the scaling after). The sums are exact (float32 holds integers up to
    2^24); the result is rounded once, to ``out_dtype``.
    """
    a_scale, b_scale = a_scale.float(), b_scale.float().t()
    if a.dtype == torch.int8:
        if a.shape[0] > 16:
            acc = torch._int_mm(a, b.t()).float()
        else:
            acc = a.float() @ b.float().t()
        return (acc * a_scale * b_scale).to(out_dtype)
    if out_dtype == torch.bfloat16 and a.is_cuda:  # (the CPU's takes per-tensor scales)
        return torch._scaled_mm(a, b.t(), scale_a=a_scale, scale_b=b_scale,
                                out_dtype=out_dtype)
    one = torch.ones((), device=a.device)
    acc = torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    return (acc * a_scale * b_scale).to(out_dtype)


class _LevelsLinear(torch.autograd.Function):
    """
    ``F.linear(h, weight)`` of a fake-quantized input and weight, computed from their
    integer levels (:func:`levels_matmul`: exact sums, scaled per token and per output
    channel, as the NPU's W4A4 matmul). The backward is ``F.linear``'s, in the
    operands' dtype under autocast (its GEMMs take arbitrary gradients, which no
    integer format holds).
    """

    @staticmethod
    def forward(ctx, h, weight, h_levels, h_scale, w_levels, w_scale):
        dtype = _autocast_dtype(h.device.type) or h.dtype
        ctx.dtypes = (h.dtype, weight.dtype, dtype)
        ctx.save_for_backward(h, weight)
        k = h.shape[-1]
        out = levels_matmul(h_levels.reshape(-1, k).contiguous(), w_levels.contiguous(),
                            h_scale.reshape(-1, 1), w_scale.reshape(-1, 1), dtype)
        return out.reshape(*h.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        h_dtype, w_dtype, dtype = ctx.dtypes
        grad = grad.to(dtype)
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = (grad @ weight.to(dtype)).to(h_dtype)
        if ctx.needs_input_grad[1]:
            flat = grad.reshape(-1, grad.shape[-1])
            grad_w = (flat.t() @ h.reshape(-1, h.shape[-1]).to(dtype)).to(w_dtype)
        return grad_h, grad_w, None, None, None, None


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast gives a linear's operands on ``device_type`` (None: off).
    The weight and input functions return it themselves, so that compiled, the cast
    fuses into their last kernel (forward and backward) instead of being a copy of
    its own; autocast then leaves the operands as they are: the same values."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


@contextlib.contextmanager
def plain_forwards(layer: torch.nn.Module):
    """
    Within the context, the modules of ``layer`` run their own forwards: without
    compressed-tensors' offloading wrapper (it moves the inputs, already on the
    execution device while the layer trains) and without llm-compressor's hooks, which
    ``HooksMixin.disable_hooks`` has made no-ops. Dynamo cannot trace either (a data
    pointer comparison, a hook handle from another frame) and would break the compiled
    training forward into pieces at every module.

    The modules' offloaded parameters and buffers are read from plain dicts of their
    onloaded tensors: compressed-tensors' ``OffloadCache`` looks each one up in a
    class-wide dict keyed by tensors, on which Dynamo guards, so that every layer would
    compile its own graph (and past ``recompile_limit`` run eagerly). A tensor assigned
    or changed in place within the context goes back through the cache on exit.
    """
    from llmcompressor.modifiers.utils.hooks import HooksMixin

    drop = HooksMixin._HOOKS_DISABLED and not HooksMixin._HOOKS_KEEP_ENABLED
    with contextlib.ExitStack() as stack:
        for module in layer.modules():
            for attr in ("_parameters", "_buffers"):
                if isinstance(getattr(module, attr), OffloadCache):
                    stack.enter_context(_onloaded_dict(module, attr))
            # compressed-tensors' ``unwrap_offload_forward`` does the same, but does not
            # restore the wrapper when the block raises (a layer skipped for NaN/Inf)
            original = getattr(module, "_original_forward_func", None)
            if original is not None:
                stack.enter_context(patch_attr(module, "forward", original.__get__(module)))
            if not drop:
                continue
            for attr in ("_forward_pre_hooks", "_forward_hooks"):
                hooks = getattr(module, attr)
                kept = type(hooks)(
                    (key, hook) for key, hook in hooks.items()
                    if not _is_llmcompressor_hook(hook))
                if len(kept) < len(hooks):
                    stack.enter_context(patch_attr(module, attr, kept))
        yield


@contextlib.contextmanager
def _onloaded_dict(module: torch.nn.Module, attr: str):
    cache = getattr(module, attr)
    onloaded = dict(cache.items())
    # each tensor and its version counter, which in-place writes advance
    before = {key: (value, _version(value)) for key, value in onloaded.items()}
    setattr(module, attr, onloaded)
    try:
        yield
    finally:
        setattr(module, attr, cache)
        for key, value in onloaded.items():
            tensor, version = before.get(key, (None, None))
            if key not in before or tensor is not value or version != _version(value):
                cache[key] = value
        for key in before.keys() - onloaded.keys():
            del cache[key]


def _version(tensor: torch.Tensor | None) -> int | None:
    try:
        return tensor._version
    except (AttributeError, RuntimeError):  # None; inference tensors have no counter
        return None


def _is_llmcompressor_hook(hook: Callable) -> bool:
    # the wrapper HooksMixin.register_hook puts around every hook (``functools.wraps``
    # gives it the hook's names; its code keeps its own)
    code = getattr(hook, "__code__", None)
    return getattr(code, "co_qualname", "").startswith("HooksMixin.register_hook.")


COMPILE_BACKEND = "inductor"  # tests trace with "aot_eager" (no code generation)


def compile_step(fn: Callable) -> Callable:
    """``fn`` compiled by ``torch.compile`` (inductor). Dynamo specialises on the
    layer's shapes, not on the layer (its parameters are graph inputs): layers of one
    shape share one graph."""
    return torch.compile(fn, backend=COMPILE_BACKEND)


def _storage_dtype(weight_dtype: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    """A narrower floating dtype than the training one converts to it exactly."""
    narrower = weight_dtype.is_floating_point and weight_dtype.itemsize < dtype.itemsize
    return weight_dtype if narrower else dtype


# "auto" compiles a layer whose training repays a compilation (about 30 s, once per
# layer shape and rank): its transformed weights times the tokens a rank trains it on
# (all epochs) at least this. One H200: SmolLM2-135M at 128 x 2048 and 15 epochs (3.5 M
# x 3.9 M = 1.4e13) calibrates in 101.1 s compiled against 126.0 s eager, which puts
# the break-even of its 30 layers near 8 epochs; 1e13 is its 11 epochs, on the safe
# side. A Llama-3-8B layer (218 M weights) passes at one epoch of 128 x 2048, a step of
# it taking 27.4 against 72.6 ms
AUTO_COMPILE_MIN_WORK = 1e13


def transformed_weights(groups: list[ResolvedGroup]) -> int:
    """The number of weights a layer's transforms act on: all its groups' linears'."""
    return sum(linear.weight.numel() for g in groups for _, linear in g.linears)


def use_torch_compile(options: FlatQuantOptions, device: torch.device,
                      num_weights: int, training_tokens: int = 0) -> bool:
    """Whether the training forward of a layer with ``num_weights`` transformed
    weights, trained on ``training_tokens`` tokens by a rank over all epochs, runs
    compiled (:attr:`FlatQuantOptions.torch_compile`)."""
    if options.torch_compile != "auto":
        return options.torch_compile
    return (torch.device(device).type == "cuda" and options.quant_format == "int"
            and num_weights * training_tokens >= AUTO_COMPILE_MIN_WORK
            and importlib.util.find_spec("triton") is not None)


def quantized_weights(
    weight: torch.Tensor,
    smooth: torch.Tensor | None,
    p1_inv_t: torch.Tensor,
    p2_inv_t: torch.Tensor,
    clip: torch.Tensor | float,
    quant_format: str,
    w_bits: int | None,
    dtype: torch.dtype,
    nvfp4_rows: list[int] | None = None,
    out_dtype: torch.dtype | None = None,
    levels_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """
    A group's weights (its linears stacked by rows, stored factor-major: ``[M, rows, N]``,
    :func:`~flatquant_modifier.kronecker.to_factor_major`) scaled by the smoothing
    vector, transformed by ``kron(P1, P2)^-T`` and fake-quantized, computed in ``dtype``
    and returned as ``[rows, M * N]`` in ``out_dtype`` (None: ``dtype``); NVFP4: one
    tensor per linear (``nvfp4_rows`` rows each), each with its own global scale;
    ``levels_dtype`` (int weights): with their levels in it and per-row scales. A pure
    function of its arguments, so that ``torch.compile`` can fuse it.
    """
    m, _, n = weight.shape
    weight = weight.to(dtype)
    if smooth is not None:
        weight = weight * smooth.reshape(m, 1, n)
    weight = kronecker_matmul_factor_major(weight, p1_inv_t, p2_inv_t)
    if quant_format == "nvfp4":
        return tuple(_to(fake_quantize_nvfp4(w), out_dtype)
                     for w in weight.split(nvfp4_rows))
    if w_bits is not None:
        if quant_format == "mxfp4":
            weight = fake_quantize_mxfp4_weight(weight, clip)
        elif levels_dtype is not None:
            weight, levels, scale = fake_quantize_weight(weight, clip, w_bits, levels_dtype)
            return _to(weight, out_dtype), levels, scale
        else:
            weight = fake_quantize_weight(weight, clip, w_bits)
    return _to(weight, out_dtype)


def quantized_input(
    x: torch.Tensor,
    smooth: torch.Tensor | None,
    p1: torch.Tensor,
    p2: torch.Tensor,
    act_clip: torch.Tensor | float,
    quant_format: str,
    a_bits: int | None,
    dtype: torch.dtype,
    out_dtype: torch.dtype | None = None,
    levels_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    A linear's input divided by the smoothing vector, transformed by ``kron(P1, P2)``
    and fake-quantized as the online transform does (NVFP4: as the linear's scheme),
    computed in ``dtype`` and returned in ``out_dtype`` (None: as computed);
    ``levels_dtype`` (int activations): with their levels in it and per-token scales. A
    pure function of its arguments, so that ``torch.compile`` can fuse it.
    """
    h = x.to(dtype)
    if smooth is not None:
        h = h / smooth
    h = kronecker_matmul(h, p1, p2)
    if quant_format == "nvfp4":
        h = fake_quantize_nvfp4(h.to(dtype))
    elif quant_format == "mxfp4":
        h = fake_quantize_mxfp4(h.to(dtype))
    elif levels_dtype is not None:
        h, levels, scale = fake_quantize_activation(h.to(dtype), act_clip, a_bits,
                                                    levels_dtype)
        return _to(h, out_dtype), levels, scale
    elif a_bits is not None:
        h = fake_quantize_activation(h.to(dtype), act_clip, a_bits)
    return _to(h, out_dtype)


def _to(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor if dtype is None else tensor.to(dtype)
