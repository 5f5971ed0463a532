"""
FlatQuant's own forward passes of a decoder layer (targets, training, evaluation) run
with SDPA attention where the model uses it.

llm-compressor's calibration context forces eager attention on the whole model
(``use_eager_attention``: its traced pipeline bakes in the eager causal-mask add) and
hands every layer an explicit 4-D causal mask. Eager attention materialises the
``[batch, heads, seq, seq]`` scores and their gradients: at 4 x 2048 tokens that is
most of a training step. So while a layer trains, the model's own implementation
(SDPA) is restored and a mask that is exactly causal is replaced by None (SDPA then
runs its causal kernels, flash on CUDA), after checking on one sub-batch that the
layer's attention gives the same output both ways (its attention modules' outputs, not
the layer's: the rest of the layer does not depend on the choice, and a MoE router turns
the rounding differences of two attention kernels into other experts for some tokens).

The pipeline's own forwards of those layers (its calibration pass, which caches their
inputs, and its propagation pass, which computes the next layer's) run eagerly over
every sample, twice a layer. :class:`PipelineAttention` runs them with SDPA too, with
the pipeline's mask, for the layer classes whose training checked SDPA.
"""

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from compressed_tensors.utils import patch_attr
from loguru import logger
from torch import nn
from torch.utils.hooks import RemovableHandle

from flatquant_modifier.batching import first_sub_batch
from flatquant_modifier.distributed import all_reduce_
from flatquant_modifier.emulation import layer_output, same_output

__all__ = [
    "training_attention", "attention_outputs", "drop_causal_masks", "PipelineAttention",
    "EagerCausalMask",
]

SDPA = "sdpa"
EAGER = "eager"


@contextlib.contextmanager
def training_attention(
    model: nn.Module,
    layer: nn.Module,
    steps: list[list[dict[str, Any]]],
    implementation: str | None,
    name: str = "",
) -> Iterator[list[list[dict[str, Any]]]]:
    """
    Within the context, ``layer`` runs with ``implementation`` (the model's attention
    before llm-compressor forced eager) if that is SDPA and its attention modules give
    their eager outputs on the first sub-batch (:func:`attention_outputs`), with its
    causal mask dropped and with it kept; yields the steps to use (pure causal masks
    dropped when SDPA is on, the given steps otherwise).
    """
    config = getattr(model, "config", None)
    if (
        implementation != SDPA
        or config is None
        or getattr(config, "_attn_implementation", None) == SDPA
    ):
        yield steps
        return
    sdpa_steps = drop_causal_masks(steps)
    same = torch.ones(1)
    first = first_sub_batch(steps)
    if first is not None:
        i, j = first
        with torch.no_grad(), attention_outputs(layer) as compared:
            eager = compared(lambda: layer(**steps[i][j]))
            with patch_attr(config, "_attn_implementation", SDPA):
                sdpa = [compared(lambda: layer(**sdpa_steps[i][j]))]
                if sdpa_steps[i][j] is not steps[i][j]:
                    # and with the explicit mask, as PipelineAttention runs the pipeline's
                    # forwards on this verdict
                    sdpa.append(compared(lambda: layer(**steps[i][j])))
        # non-finite outputs are refused by the caller's full-precision pass
        same[0] = float(
            all(bool(torch.isfinite(e).all()) for e in eager)
            and all(len(outputs) == len(eager) and all(map(same_output, outputs, eager))
                    for outputs in sdpa)
        )
    # every rank must run the same function
    if not bool(all_reduce_(same, op=dist.ReduceOp.MIN)):
        logger.info(
            f"FlatQuant: SDPA does not reproduce the eager attention of layer {name}; "
            "it trains with eager attention"
        )
        yield steps
        return
    with patch_attr(config, "_attn_implementation", SDPA):
        yield sdpa_steps


def attention_modules(layer: nn.Module) -> list[nn.Module]:
    """The attention modules of a decoder layer (transformers names their classes
    ``...Attention``: Llama, Qwen2/3, Qwen3-MoE, DeepSeek-V2/V3, Mistral, Gemma)."""
    return [m for m in layer.modules() if type(m).__name__.endswith("Attention")]


@contextlib.contextmanager
def attention_outputs(layer: nn.Module) -> Iterator[Callable[[Callable], list]]:
    """Yields ``compared(run)``: runs ``run()`` (a forward of ``layer``) and returns the
    outputs of the layer's attention modules in call order, or the layer's output when
    it has none that transformers names so."""
    modules = attention_modules(layer)
    seen: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _a, out: seen.append(layer_output(out)))
               for m in modules]

    def compared(run: Callable) -> list[torch.Tensor]:
        seen.clear()
        out = layer_output(run())
        return list(seen) if modules else [out]

    try:
        yield compared
    finally:
        for handle in handles:
            handle.remove()


def drop_causal_masks(steps: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    """
    Replace an ``attention_mask`` that is exactly the causal mask (no padding) by None.

    With an explicit mask SDPA cannot take its flash kernel; with None, transformers'
    SDPA attention sets ``is_causal`` (the same function for a layer run with SDPA
    only: eager attention would then attend to every position). Masks with padding,
    windows or biases are kept.
    """
    verdicts: dict[int, bool] = {}
    out = []
    for batches in steps:
        new_batches = []
        for kwargs in batches:
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor):
                if id(mask) not in verdicts:
                    verdicts[id(mask)] = _is_causal_mask(mask)
                if verdicts[id(mask)]:
                    kwargs = {**kwargs, "attention_mask": None}
            new_batches.append(kwargs)
        out.append(new_batches)
    return out


def _is_causal_mask(mask: torch.Tensor) -> bool:
    if mask.ndim != 4 or mask.shape[-1] != mask.shape[-2]:
        return False
    size = mask.shape[-1]
    causal = torch.ones(size, size, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return bool((mask == causal).all())
    if not mask.is_floating_point():
        return False
    masked_out = mask <= torch.finfo(mask.dtype).min / 2
    return bool(((mask == 0) == causal).all() and (masked_out == ~causal).all())


class PipelineAttention:
    """
    SDPA attention for llm-compressor's own forwards of the decoder layers FlatQuant
    calibrates, which its calibration context runs eagerly: a layer runs its attention
    with SDPA (the model's own implementation) and the pipeline's explicit mask when the
    last layer of its class that trained checked that SDPA reproduces its eager attention
    (:func:`training_attention`, :meth:`record`); eagerly before that, and for classes
    where the check failed. Detach a layer while FlatQuant trains it: the check compares
    against its eager output.

    Plain torch hooks, not llm-compressor's: its propagation pass, the pass this is
    most for, disables modifier hooks. A layer's calibration pass runs on its class's
    last verdict, before its own check: what propagates by default is the propagation
    pass, after it (with llm-compressor's ``propagate_error=False`` the calibration
    pass's outputs propagate instead).
    """

    def __init__(self, model: nn.Module, implementation: str | None,
                 devices: tuple[str, ...] | None = None):
        """
        :param implementation: the model's attention implementation before
            llm-compressor's calibration forced eager: SDPA or nothing is switched
        :param devices: the device types (``"cuda"``) whose forwards switch; None: all
        """
        self.config = getattr(model, "config", None)
        # (the calibration context that forces eager is entered after this is made)
        self.enabled = implementation == SDPA and self.config is not None
        self.devices = devices
        self.checked: dict[type, bool] = {}  # layer class -> SDPA reproduced eager
        self._handles: dict[nn.Module, list[RemovableHandle]] = {}
        self._restore: list[Any] = []  # per running forward: the implementation to restore

    def attach(self, layer: nn.Module):
        if not self.enabled or layer in self._handles:
            return
        self._handles[layer] = [
            layer.register_forward_pre_hook(self._enter, with_kwargs=True),
            layer.register_forward_hook(self._exit, always_call=True),
        ]

    def detach(self, layer: nn.Module | None = None):
        """Remove the hooks of ``layer`` (None: of every layer)."""
        for module in [layer] if layer is not None else list(self._handles):
            for handle in self._handles.pop(module, []):
                handle.remove()

    def record(self, layer: nn.Module, sdpa: bool):
        """Whether ``layer`` trained with SDPA (its check passed)."""
        self.checked[type(layer)] = bool(sdpa)

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict):
        # only in place of the eager attention llm-compressor's calibration forces: an
        # implementation another modifier installed (compressed-tensors' hooked
        # attention for attention or KV cache quantization) stays
        if (self.checked.get(type(module), False)
                and self.config._attn_implementation == EAGER
                and self._on_chosen_device(args, kwargs)):
            self._restore.append(self.config._attn_implementation)
            self.config._attn_implementation = SDPA
        else:
            self._restore.append(None)

    def _on_chosen_device(self, args: tuple, kwargs: dict) -> bool:
        if self.devices is None:
            return True
        hidden_states = args[0] if args else kwargs.get("hidden_states")
        return (isinstance(hidden_states, torch.Tensor)
                and hidden_states.device.type in self.devices)

    def _exit(self, module: nn.Module, args: tuple, output: Any):
        previous = self._restore.pop() if self._restore else None
        if previous is not None:
            self.config._attn_implementation = previous


class EagerCausalMask:
    """
    The causal mask for the decoder layers' forwards that get eager attention and no
    mask: with those, eager attention attends to later tokens too.

    In llm-compressor 0.14's traced pipeline, models that pick their mask function at
    run time (Mistral, Mixtral, Qwen3-MoE, Phi-3: ``mask_function = create_causal_mask
    if ... else ...``) call it with a config rebuilt from ``to_dict()``, which has lost
    the eager attention llm-compressor's calibration forces: it returns ``None``, the
    mask SDPA reads as causal, and their layers' calibration and propagation forwards
    (every modifier's) attend in both directions. While attached, such a call gets the
    mask transformers builds for eager attention: causal, and within the sliding window
    where the layer's attention has one shorter than the sequence. Plain torch hooks,
    first of the layer's: llm-compressor's propagation pass disables modifier hooks,
    and FlatQuant's call cache must record the mask.
    """

    def __init__(self, model: nn.Module):
        self.config = getattr(model, "config", None)
        self.model_name = type(model).__name__
        self._handles: list[RemovableHandle] = []
        self._windows: dict[nn.Module, int | None] = {}  # layer -> sliding window
        self._masks: dict[tuple, torch.Tensor] = {}  # one tensor per shape, shared
        self._announced = False

    def attach(self, layer: nn.Module):
        modules = attention_modules(layer)
        if (self.config is None or layer in self._windows or not modules
                or not all(getattr(m, "is_causal", False) for m in modules)):
            return
        windows = {getattr(m, "sliding_window", None) for m in modules}
        self._windows[layer] = windows.pop() if len(windows) == 1 else None
        self._handles.append(layer.register_forward_pre_hook(
            self._add_mask, with_kwargs=True, prepend=True))

    def detach(self):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._windows.clear()
        self._masks.clear()

    def mask(self, length: int, dtype: torch.dtype, device: torch.device,
             window: int | None) -> torch.Tensor:
        """``[1, 1, length, length]``: 0 where token i sees token j (``j <= i``, and
        ``j > i - window`` with a window), the dtype's minimum elsewhere, as transformers'
        eager masks."""
        window = window if window is not None and window < length else None
        key = (length, dtype, str(device), window)
        if key not in self._masks:
            i = torch.arange(length, device=device)
            seen = i[None, :] <= i[:, None]
            if window is not None:
                seen &= i[None, :] > i[:, None] - window
            mask = torch.zeros(length, length, dtype=dtype, device=device)
            self._masks[key] = mask.masked_fill_(~seen, torch.finfo(dtype).min)[None, None]
        return self._masks[key]

    def _add_mask(self, module: nn.Module, args: tuple, kwargs: dict):
        if ("attention_mask" not in kwargs or kwargs["attention_mask"] is not None
                or self.config._attn_implementation != EAGER
                or kwargs.get("past_key_values") is not None):
            return None
        hidden_states = args[0] if args else kwargs.get("hidden_states")
        if not (isinstance(hidden_states, torch.Tensor) and hidden_states.ndim == 3
                and hidden_states.is_floating_point()):
            return None
        if not self._announced:
            self._announced = True
            logger.info(
                f"FlatQuant: llm-compressor's pipeline calls the decoder layers of "
                f"{self.model_name} with eager attention and no mask (which attends to "
                "later tokens); their calls get the causal mask"
            )
        mask = self.mask(hidden_states.shape[1], hidden_states.dtype,
                         hidden_states.device, self._windows.get(module))
        return args, {**kwargs, "attention_mask": mask}
