"""
The FlatQuant training options: one pydantic model that ``FlatQuantModifier`` inherits
(so recipes set them as flat modifier fields) and that the training code reads
(:mod:`flatquant_modifier.calibrate`, :mod:`flatquant_modifier.train`), so that no
option exists twice. Options that contradict each other are refused here.
"""

from typing import Literal, NamedTuple

import torch
from compressed_tensors.utils import TorchDtype
from pydantic import BaseModel, Field, field_serializer, field_validator, model_validator

from flatquant_modifier.modules import Parametrization, TransformInit

__all__ = ["FlatQuantOptions", "Precision", "training_precision", "cpu_has_native_bfloat16"]


class FlatQuantOptions(BaseModel):
    """
    What FlatQuant learns and how.

    :param w_bits: weight bits used in training (per channel, symmetric); None for
        full-precision weights
    :param a_bits: activation bits (per token, symmetric, NPU formula). 4 makes the
        online transform quantize activations; None leaves activation quantization
        to the linears' own scheme
    :param learn_weight_clip: learn per-output-channel weight clip factors (needs
        ``w_bits``)
    :param learn_activation_clip: learn a per-tensor activation clip factor, stored as
        the Ascend ``clip_ratio`` (needs ``a_bits``)
    :param clip_init_logit: initial logit of all clip factors (sigmoid(4) = 0.982)
    :param smooth: learn a per-channel smoothing vector folded into the module that
        produces the input. ``"auto"``: where that fold is exact (checked per layer
        structure), off with one logged line elsewhere; True: everywhere, an error
        where the fold is not exact; False: nowhere
    :param smooth_alpha: SmoothQuant migration strength of the smoothing init
    :param parametrization: ``"dense"`` (free matrices, inverse by
        ``torch.linalg.inv``, float64 when absorbed) or ``"orthogonal"``
        (``U diag(s) V^T``, inverse without inversion). Dense reaches a lower layer loss
        and perplexity on SmolLM2-135M in half the time (docs/RESULTS.md)
    :param transform_init: ``"random"`` (Haar-random orthogonal factors),
        ``"hadamard"`` (random Hadamard factors, random orthogonal for sizes without a
        known Hadamard matrix) or ``"identity"``
    :param epochs: training epochs per layer
    :param batch_size: calibration samples per optimisation step, independent of
        ``oneshot``'s ``batch_size`` (FlatQuant splits the pipeline's calls into
        samples, so any oneshot batch size gives the same steps)
    :param lr: AdamW learning rate of the transforms and smoothing vectors
    :param clip_lr: AdamW learning rate of the clip factors
    :param weight_decay: AdamW weight decay
    :param lr_schedule: ``"cosine"`` (annealed to 0 over all steps of a layer, as the
        paper's code does) or ``"constant"``
    :param lr_warmup: the fraction of a layer's steps (rounded up, at most all but one)
        over which both learning rates rise linearly to their values before
        ``lr_schedule`` takes over (the cosine then anneals over the remaining steps);
        0 (the paper's code): no warmup
    :param loss: what a step minimises. ``"mse"``: the mean squared error of the
        layer output against full precision (the paper's loss). ``"relative"``: each
        token's squared error divided by the mean square of its full-precision output,
        averaged over tokens, so that tokens with large residual-stream norms (attention
        sinks) do not dominate, as they do not after the model's final norm
    :param last_layer_loss: what the model's last decoder layer minimises. ``"layer"``:
        ``loss`` of its output, as every layer. ``"logits"``: the mean squared error of
        the logits its output gives through the final RMSNorm and ``lm_head``
        (:mod:`flatquant_modifier.logits_loss`: exact, through one hidden x hidden
        matrix), so that its error counts as it reaches the predictions rather than
        by the residual stream's largest channels, which the final norm divides away
    :param autocast_dtype: autocast dtype of the training forward (``bfloat16`` /
        ``float16``), master weights staying float32; None trains in float32.
        ``"auto"``: ``bfloat16`` on CUDA, as the paper's code trains, float32
        elsewhere. A float64 model always trains in float64
    :param cuda_graphs: on CUDA, replay each training step as a CUDA graph captured
        once per input shape (eager with a warning if a capture fails)
    :param torch_compile: compile each training forward (the decoder layer with its
        transformed, fake-quantized linears, and the loss) with ``torch.compile`` as
        one graph, which fuses the quantizers' elementwise work, the layer's own (norms,
        rotary embedding, SiLU, residual adds) and the backward's into a few kernels
        (a Llama-3-8B layer on one H200: 27.4 against 72.6 ms per step, two thirds of
        the memory, after a one-time compilation of about 30 s that layers of one
        shape share; a compilation that fails warns and trains eagerly).
        ``"auto"``: for ``quant_format="int"`` on CUDA (with Triton) when a layer's
        transformed weights times the tokens a rank trains it on (all epochs) reach
        1e13, where the training repays the compilation (Llama-3-8B: from one epoch of
        128 x 2048; SmolLM2-135M: at 15 epochs of 128 x 2048, not at 2 of 32 x 512);
        eager elsewhere
    :param quantized_matmul: the training forward's linears multiply the integer
        levels of their quantized inputs and weights and scale the exact sums per token
        and per output channel, as the NPU's W4A4 matmul does: FP8 GEMMs on NVIDIA GPUs
        with FP8 tensor cores for 4-bit levels (exact in e4m3; about 1.6x the bfloat16
        GEMM rate on one H200), int8 GEMMs elsewhere; the backward stays in the
        training dtype. Needs ``quant_format="int"``, ``w_bits`` and ``a_bits``,
        features that are multiples of 16, and a CPU or CUDA device. ``"auto"``: FP8
        GEMMs for compiled layers of at least 50 M transformed weights on GPUs with FP8
        tensor cores (Llama-3-8B: 25.1 against 26.9 ms per step on one H200, the same
        perplexity on SmolLM2; smaller GEMMs do not repay the levels' quantization),
        the training dtype's GEMMs elsewhere
    :param pipeline_sdpa: run llm-compressor's calibration and propagation forwards of
        a decoder layer with SDPA and the pipeline's mask, in place of the eager
        attention its calibration forces, once a layer of that class trained with SDPA
        (its output checked against eager; the model loaded with SDPA). ``"auto"``: on
        CUDA (a float32 SmolLM2 calibration on one H200: 1.2 s less outside the
        training, 60.8 / 61.6 against 64.1 / 63.2 s; the bfloat16 model: 1.2 GiB less
        peak memory); not on CPUs, where it was slower (2 cores: 196 against 177 s
        outside the training)
    :param report_rtn_loss: also evaluate each layer at round-to-nearest (identity
        transforms, no smoothing, no clipping) for the log and the layer reports: one
        forward pass over the layer's ``evaluation_samples``, a report only (at 2 epochs
        of 32 samples about a sixth of a layer's FlatQuant time)
    :param evaluation_samples: the evaluation passes of a layer (its loss before and
        after training, which decides whether the trained state is kept, and the
        round-to-nearest report) run on this many calibration samples, rounded up to
        whole steps of ``batch_size`` samples spread evenly over the epoch (all steps
        when there are fewer), the same on every rank; None: all samples. Their losses
        are a report and a comparison, not training, which runs on all samples: at
        128 x 2048 a quarter of the samples (Llama-3-8B on one H200: a layer's three
        passes 0.42 s against 1.30 s on all, 8 against 32 steps and graph captures
        included)
    :param deterministic: train with ``torch.use_deterministic_algorithms(True)``, so
        that two runs on the same GPU give the same model
    :param seed: seed of the random initialisations
    :param quant_format: what the training quantizers emulate. ``"int"``: int
        ``w_bits`` per-channel weights and int4 per-token activations with the Ascend
        formula, quantized by the online transform. ``"nvfp4"``: compressed-tensors'
        NVFP4 for weights and activations, quantized by a following NVFP4
        ``QuantizationModifier``; ``w_bits``, ``a_bits`` and the clip factors do not
        apply. ``"mxfp4"``: vllm-ascend's ``W4A4_MXFP4_FLATQUANT`` (Ascend 950): the
        online transform quantizes activations to MXFP4 with the NPU's rule (E8M0
        ``floor(log2 amax) - 2`` per 32 values, E2M1 half to even), the weights are
        trained as compressed-tensors' MXFP4 scheme stores them; ``w_bits`` is 4 or
        None, ``a_bits`` 4, no activation clip (the FP4 kernels ignore ``clip_ratio``),
        no weight clip unless chosen (a power-of-two scale passes it no gradient)
    :param max_supported_tp: ``quant_format="mxfp4"`` only (default 4): the largest
        tensor-parallel size the checkpoint serves. The ``left_trans`` of row-parallel
        linears (o_proj, down_proj) is trained block-diagonal with this many blocks,
        the diagonal blocks each rank keeps, so every TP size dividing it serves the
        trained transform
    :param propagate_activation_quant: pass the next layer this layer's outputs with
        its activations quantized (its weights stay unquantized until the weight
        quantizer runs), in the spirit of llm-compressor's ``propagate_error``; False
        trains every layer on full-precision inputs, as the paper's code does
    :param target_outputs: what a layer's outputs are trained to reproduce. ``"layer"``: the
        full-precision layer's outputs on the inputs the calibrated layers before it
        pass on (each layer on its own error). ``"model"``: the full-precision model's
        outputs of that layer, carried in a full-precision stream of hidden states
        beside the calibrated one, so a layer also makes up for the error of the layers
        before it (GPTAQ's asymmetric calibration, Li et al., ICML 2025); one more
        forward per layer and one more copy of the calibration hidden states, kept on
        the layer's execution device
    """

    w_bits: int | None = Field(default=4, ge=2, le=8)
    a_bits: Literal[4] | None = 4
    learn_weight_clip: bool = True
    learn_activation_clip: bool = True
    clip_init_logit: float = 4.0
    smooth: bool | Literal["auto"] = "auto"
    smooth_alpha: float = Field(default=0.3, ge=0.0, le=1.0)
    parametrization: Parametrization = "dense"
    transform_init: TransformInit = "random"
    epochs: int = Field(default=15, ge=0)
    batch_size: int = Field(default=4, ge=1)
    lr: float = Field(default=5e-3, ge=0.0)
    clip_lr: float = Field(default=5e-2, ge=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    lr_warmup: float = Field(default=0.0, ge=0.0, lt=1.0)
    loss: Literal["mse", "relative"] = "mse"
    last_layer_loss: Literal["layer", "logits"] = "layer"
    autocast_dtype: Literal["auto"] | TorchDtype | None = "auto"
    cuda_graphs: bool = True
    torch_compile: bool | Literal["auto"] = "auto"
    quantized_matmul: bool | Literal["auto"] = "auto"
    pipeline_sdpa: bool | Literal["auto"] = "auto"
    report_rtn_loss: bool = True
    evaluation_samples: int | None = Field(default=32, ge=1)
    deterministic: bool = False
    seed: int = 0
    quant_format: Literal["int", "nvfp4", "mxfp4"] = "int"
    max_supported_tp: int | None = Field(default=None, ge=1)
    propagate_activation_quant: bool = True
    target_outputs: Literal["layer", "model"] = "layer"

    # llm-compressor writes a recipe without its None values (recipe.yaml of a saved
    # checkpoint), which would turn these back into their defaults: None is "none" there
    @field_serializer("w_bits", "a_bits", "autocast_dtype", "evaluation_samples", mode="wrap")
    def _none_as_word(self, value, handler):
        return "none" if value is None else handler(value)

    @field_validator("w_bits", "a_bits", "autocast_dtype", "evaluation_samples", mode="before")
    @classmethod
    def _word_as_none(cls, value):
        return None if isinstance(value, str) and value.lower() == "none" else value

    @property
    def quantizes_activations(self) -> bool:
        """Whether the online transform fake-quantizes the activations (int4 or MXFP4,
        the Ascend NPU's rules); otherwise the linears' own scheme quantizes them."""
        return self.a_bits is not None and self.quant_format in ("int", "mxfp4")

    @field_validator("max_supported_tp")
    @classmethod
    def _power_of_two(cls, value):
        if value is not None and value & (value - 1):
            raise ValueError(f"max_supported_tp={value}: use a power of two (1, 2, 4, 8)")
        return value

    @field_validator("autocast_dtype")
    @classmethod
    def _autocast_floating(cls, value):
        if isinstance(value, torch.dtype) and value not in (torch.bfloat16, torch.float16):
            raise ValueError(
                f"autocast_dtype={value}: use bfloat16, float16, None (train in the "
                "model's precision) or 'auto'"
            )
        return value

    @model_validator(mode="after")
    def _refuse_contradictions(self):
        """
        Options that do not apply under the others are switched off when left at
        their defaults, and refused when chosen: a chosen value would be ignored
        without a word. ``model_dump`` then holds the effective values, which validate
        again unchanged.
        """
        if self.quant_format == "nvfp4":
            for key, off in (("w_bits", None), ("a_bits", None),
                             ("learn_weight_clip", False), ("learn_activation_clip", False)):
                self._not_chosen(key, off, "quant_format='nvfp4' quantizes with "
                                 "compressed-tensors' NVFP4 scheme (FP4 values, FP8 "
                                 "group scales), which has no integer bits or clip factors")
        if self.quant_format == "mxfp4":
            if self.w_bits not in (4, None):
                raise ValueError(f"w_bits={self.w_bits} does not apply: quant_format="
                                 "'mxfp4' stores FP4 weights; use w_bits=4 or None")
            if self.a_bits is None:
                raise ValueError("a_bits=None does not apply: W4A4_MXFP4_FLATQUANT "
                                 "quantizes the activations in its transform; use a_bits=4")
            self._not_chosen("learn_activation_clip", False, "the NPU's FP4 "
                             "npu_kronecker_quant does not read clip_ratio (MXFP4 "
                             "scales are powers of two of the group maximum)")
            # a power-of-two scale gives the clip factor no gradient, only the clamp
            # does: off unless chosen
            if "learn_weight_clip" not in self.model_fields_set:
                object.__setattr__(self, "learn_weight_clip", False)
            if self.max_supported_tp is None:
                object.__setattr__(self, "max_supported_tp", 4)
        elif self.max_supported_tp is not None:
            raise ValueError(
                f"max_supported_tp={self.max_supported_tp} does not apply: only "
                "quant_format='mxfp4' (vllm-ascend's W4A4_MXFP4_FLATQUANT) splits "
                "row-parallel transforms by tensor-parallel rank. Remove it."
            )
        integer = self.quant_format == "int" and None not in (self.w_bits, self.a_bits)
        if self.quantized_matmul == "auto" and not integer:
            object.__setattr__(self, "quantized_matmul", False)
        self._not_chosen("quantized_matmul", False, "quantized matmuls need integer "
                         "weights and activations (quant_format='int', w_bits and a_bits)",
                         when=not integer)
        self._not_chosen("learn_weight_clip", False, "w_bits=None leaves the weights "
                         "unquantized in training", when=self.w_bits is None)
        self._not_chosen("learn_activation_clip", False, "a_bits=None leaves activation "
                         "quantization to the linears' scheme", when=self.a_bits is None)
        learns_clips = self.learn_weight_clip or self.learn_activation_clip
        for key in ("clip_lr", "clip_init_logit"):
            self._not_chosen(key, _KEEP, "no clip factor is learned "
                             "(learn_weight_clip and learn_activation_clip are off)",
                             when=not learns_clips)
        self._not_chosen("smooth_alpha", _KEEP, "smooth=False learns no smoothing",
                         when=not self.smooth)
        return self

    def _not_chosen(self, key: str, off, reason: str, when: bool = True):
        """
        Option ``key`` does not apply (``when``): refuse it when it was chosen, else
        give it ``off``. Chosen: set explicitly to a value other than ``off`` (or, for
        ``off=_KEEP``, other than its default: such options are simply unused).
        """
        if not when:
            return
        value = getattr(self, key)
        unused = type(self).model_fields[key].default if off is _KEEP else off
        if key in self.model_fields_set and value != unused:
            raise ValueError(
                f"{key}={value!r} does not apply: {reason}. Remove {key}, or change "
                "the option that switches it off."
            )
        if off is not _KEEP and value != off:
            object.__setattr__(self, key, off)


_KEEP = object()  # an option left as it is where it does not apply


class Precision(NamedTuple):
    """Arithmetic of one layer's training: ``dtype`` of the learnable parameters and
    of the fake-quantized forward, and the autocast dtype of the layer's own forward
    (None: no autocast)."""

    dtype: torch.dtype
    autocast: torch.dtype | None


def training_precision(
    options: FlatQuantOptions, layer: torch.nn.Module, device: torch.device
) -> Precision:
    """float64 models train in float64 (results reproducible across CPUs), others in
    float32 with ``options.autocast_dtype`` (``"auto"``: bfloat16 on CUDA)."""
    if any(p.dtype == torch.float64 for p in layer.parameters()):
        return Precision(torch.float64, None)
    autocast = options.autocast_dtype
    if autocast == "auto":
        cuda = device.type == "cuda" and torch.cuda.is_available()
        autocast = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None
    return Precision(torch.float32, autocast)


# x86 AVX512-BF16 / AMX-BF16, Arm's BF16 extension, as Linux names them in /proc/cpuinfo
_NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def cpu_has_native_bfloat16(cpuinfo: str | None = None) -> bool:
    """
    Whether this CPU computes bfloat16 matmuls natively, from the flags in
    ``/proc/cpuinfo`` (``cpuinfo``: its text, for tests); False where it cannot be
    read. Only then does bfloat16 autocast make CPU training faster (an AVX2 CPU
    emulates it); ``torch.backends.cpu.get_cpu_capability()`` does not tell, since it
    reports the vector ISA only.
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features") and _NATIVE_BF16_FLAGS & set(value.split()):
            return True
    return False
