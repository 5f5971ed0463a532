"""
The online FlatQuant transform as a compressed-tensors transform type, so that it is
saved in ``config.json`` (``transform_config``) and re-attached when the checkpoint is
loaded (after ``import flatquant_modifier``), like llm-compressor's own
QuIP/SpinQuant transforms.

Two registered types:

* ``"flatquant"``: ``x -> fake_quant_int4(x @ kron(left_trans, right_trans),
  clip_ratio)`` with the Ascend NPU formula (``npu_kronecker_quant``). The linear's
  own quantization scheme then quantizes only its weights.
* ``"flatquant-kronecker"``: the transform only; activation quantization is left to
  the linear's quantization scheme (e.g. NVFP4).
* ``"flatquant-mxfp4"``: ``x -> fake_quant_mxfp4(x @ kron(left_trans, right_trans))``
  with the NPU's MX rule (vllm-ascend's ``W4A4_MXFP4_FLATQUANT``, Ascend 950), matrices
  sized as that method allocates them. A scheme with ``head_dim`` holds row-parallel
  linears (o_proj, down_proj): their transform is block diagonal with blocks of
  ``head_dim`` (compressed-tensors' meaning), ``in_features / head_dim`` =
  ``max_supported_tp`` diagonal blocks of ``left_trans``, one per tensor-parallel
  rank. One config group per block size: ``"flatquant_block<head_dim>"``.
* ``"npu-dynamic-int8"`` (config group ``"flatquant_int8"``): no transform, per-token
  int8 fake quantization with the NPU's ``npu_dynamic_quant`` formula
  (``scale = max|x| / 127``), for the linears served as vllm-ascend's
  ``W8A8_DYNAMIC`` (compressed-tensors' own dynamic quantization divides by 127.5).

Unlike the built-in factories, every module gets its own matrices (FlatQuant learns
one transform per layer and input); the modifier writes the learned values into the
modules it creates here.
"""

import re

import torch
from compressed_tensors.transform import TransformArgs, TransformLocation, TransformScheme
from compressed_tensors.transform.factory.base import TransformBase, TransformFactory
from compressed_tensors.utils import get_offloaded_device
from torch import Tensor
from torch.nn import Module, Parameter

from flatquant_modifier.kronecker import get_decompose_dim, kronecker_matmul, mxfp4_trans_dims
from flatquant_modifier.quantize import fake_quantize_activation, fake_quantize_mxfp4

__all__ = [
    "FLATQUANT_TRANSFORM_TYPE",
    "KRONECKER_TRANSFORM_TYPE",
    "MXFP4_TRANSFORM_TYPE",
    "TRANSFORM_NAME",
    "transform_group_name",
    "is_transform_group",
    "FlatQuantTransformFactory",
    "KroneckerQuantTransform",
    "get_flatquant_transform",
    "flatquant_scheme",
    "flatquant_schemes",
    "attach_transforms",
    "DYNAMIC_INT8_TRANSFORM_TYPE",
    "INT8_TRANSFORM_NAME",
    "DynamicInt8Quant",
    "get_dynamic_int8_quant",
    "dynamic_int8_scheme",
    "attach_dynamic_int8",
]

FLATQUANT_TRANSFORM_TYPE = "flatquant"
KRONECKER_TRANSFORM_TYPE = "flatquant-kronecker"
MXFP4_TRANSFORM_TYPE = "flatquant-mxfp4"
# what each transform type quantizes its output to (None: nothing)
ACTIVATIONS = {FLATQUANT_TRANSFORM_TYPE: "int4", KRONECKER_TRANSFORM_TYPE: None,
               MXFP4_TRANSFORM_TYPE: "mxfp4"}
# name of the config group; the submodule on each linear is f"{TRANSFORM_NAME}_input"
# (f"{TRANSFORM_NAME}_block<head_dim>_input" for block-diagonal MXFP4 transforms)
TRANSFORM_NAME = "flatquant"
_GROUP = re.compile(rf"^{TRANSFORM_NAME}(_block\d+)?$")
ACTIVATION_BITS = 4  # npu_kronecker_quant produces int4


def transform_group_name(head_dim: int | None) -> str:
    """The config group (and module attribute prefix) of transforms with block size
    ``head_dim`` (None: not block diagonal)."""
    return TRANSFORM_NAME if head_dim is None else f"{TRANSFORM_NAME}_block{head_dim}"


def is_transform_group(name: str) -> bool:
    """Whether ``name`` is the config group of FlatQuant transforms."""
    return bool(_GROUP.match(name))


DYNAMIC_INT8_TRANSFORM_TYPE = "npu-dynamic-int8"
INT8_TRANSFORM_NAME = "flatquant_int8"


@TransformFactory.register(
    FLATQUANT_TRANSFORM_TYPE, alias=[KRONECKER_TRANSFORM_TYPE, MXFP4_TRANSFORM_TYPE]
)
class FlatQuantTransformFactory(TransformFactory):
    """Creates one :class:`KroneckerQuantTransform` per targeted linear (identity)."""

    def create_transform(self, module: Module, args: TransformArgs) -> TransformBase:
        _require_input_location(args, "FlatQuant transforms apply to linear inputs only "
                                "(the inverse is absorbed into the weights)")
        if not hasattr(module, "in_features"):
            raise ValueError(
                f"FlatQuant transforms target linear layers, got {type(module).__name__}"
            )
        return KroneckerQuantTransform(
            module.in_features, self.scheme, args, device=_creation_device(module)
        )


def _require_input_location(args: TransformArgs, what: str):
    if TransformLocation(args.location) != TransformLocation.INPUT:
        raise ValueError(f"{what}; got location {args.location!r}")


def _creation_device(module: Module) -> torch.device:
    """Where a new transform's tensors are made: the linear's offload device, or the
    CPU for disk offload (``register_offload_module`` then offloads them like the
    linear's own)."""
    device = get_offloaded_device(module)
    return torch.device("cpu") if device == "disk" else device


def transform_dims(in_features: int, scheme: TransformScheme) -> tuple[int, int]:
    """``(M, N)``: the sizes of ``left_trans`` and ``right_trans`` of a linear with
    ``in_features`` inputs under ``scheme``, as vllm-ascend allocates them."""
    if scheme.type != MXFP4_TRANSFORM_TYPE:
        if scheme.head_dim is not None:
            raise ValueError(f"{scheme.type} transforms are not block diagonal; "
                             "head_dim must be unset")
        return get_decompose_dim(in_features)
    if scheme.head_dim is None:
        return mxfp4_trans_dims(in_features, row_parallel=False)
    if in_features % scheme.head_dim:
        raise ValueError(f"in_features={in_features} is not a multiple of the block "
                         f"size head_dim={scheme.head_dim}")
    return mxfp4_trans_dims(in_features, True, in_features // scheme.head_dim)


class KroneckerQuantTransform(TransformBase):
    """
    ``x -> x @ kron(left_trans, right_trans)``, then fake quantization of the result
    as the scheme's type says (``activations``): ``"int4"``, per token with ``scale =
    max|y| * clip_ratio / 7``; ``"mxfp4"``, the NPU's MX rule per 32 values
    (``clip_ratio`` unused, as in the FP4 kernels); None, none. Quantization is
    skipped while ``quantization_enabled`` is False, the flag compressed-tensors'
    ``disable_quantization`` sets (llm-compressor's calibration pipelines use it).
    """

    def __init__(
        self,
        in_features: int,
        scheme: TransformScheme,
        args: TransformArgs,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.scheme = scheme
        self.args = args
        self.activations = ACTIVATIONS[scheme.type]
        m, n = transform_dims(in_features, scheme)
        precision = scheme.precision
        self.left_trans = Parameter(
            torch.eye(m, dtype=precision, device=device), requires_grad=False
        )
        self.right_trans = Parameter(
            torch.eye(n, dtype=precision, device=device), requires_grad=False
        )
        self.clip_ratio = Parameter(
            torch.ones(1, dtype=torch.float32, device=device), requires_grad=False
        )

    # parameters are per module, never shared: nothing for save_pretrained to tie
    _dynamic_tied_weights_keys: list[str] = []

    @property
    def quantize(self) -> bool:
        """Whether the transform quantizes the activations (int4 or MXFP4)."""
        return self.activations is not None

    @property
    def left_blocks(self) -> int:
        """Diagonal blocks of ``left_trans`` (1: dense)."""
        if self.scheme.head_dim is None:
            return 1
        return self.left_trans.shape[0] * self.right_trans.shape[0] // self.scheme.head_dim

    def forward(self, value: Tensor) -> Tensor:
        return self.apply_to(
            value, self.quantize and getattr(self, "quantization_enabled", True)
        )

    def apply_to(self, value: Tensor, quantize: bool) -> Tensor:
        """``value @ kron(left_trans, right_trans)``, fake-quantized if ``quantize``,
        in ``value``'s dtype."""
        left = self.left_trans.to(value.device)
        right = self.right_trans.to(value.device)
        y = kronecker_matmul(value.to(left.dtype), left, right)
        if quantize and self.activations == "mxfp4":
            y = fake_quantize_mxfp4(y)
        elif quantize:
            clip = self.clip_ratio.to(device=value.device, dtype=y.dtype)
            y = fake_quantize_activation(y, clip, ACTIVATION_BITS)
        return y.to(value.dtype)

    def __repr__(self):
        return (
            f"{self.__class__.__name__}(left={tuple(self.left_trans.shape)}, "
            f"right={tuple(self.right_trans.shape)}, activations={self.activations})"
        )


def get_flatquant_transform(module: Module) -> KroneckerQuantTransform | None:
    """The FlatQuant input transform attached to a linear, if any."""
    transform = getattr(module, f"{TRANSFORM_NAME}_{TransformLocation.INPUT.value}", None)
    if isinstance(transform, KroneckerQuantTransform):
        return transform
    # block-diagonal transforms live in their own config groups
    return next((child for child in module.children()
                 if isinstance(child, KroneckerQuantTransform)), None)


def flatquant_scheme(names: list[str], dtype: torch.dtype, activations: str | None,
                     head_dim: int | None = None) -> TransformScheme:
    """The transform scheme of the linears ``names``: the type that quantizes its
    output to ``activations`` (``"int4"``, ``"mxfp4"``, None), matrices in ``dtype``,
    block diagonal with blocks of ``head_dim`` (MXFP4 row-parallel linears)."""
    types = {value: key for key, value in ACTIVATIONS.items()}
    return TransformScheme(
        type=types[activations],
        apply=[TransformArgs(targets=names, location="input")],
        precision=dtype,
        head_dim=head_dim,
    )


def flatquant_schemes(model: Module, names: list[str]) -> dict[str, TransformScheme]:
    """The config groups recording the transforms attached to the linears ``names``,
    one per block size, as :func:`attach_transforms` made them."""
    grouped: dict[tuple, list[str]] = {}
    for name in names:
        scheme = get_flatquant_transform(model.get_submodule(name)).scheme
        grouped.setdefault((scheme.type, scheme.precision, scheme.head_dim), []).append(name)
    schemes = {}
    for (kind, precision, head_dim), targets in grouped.items():
        group = transform_group_name(head_dim)
        if group in schemes:
            raise ValueError(
                f"FlatQuant: transforms of {schemes[group].type} ({schemes[group].precision}) "
                f"and {kind} ({precision}) in one model; calibrate it in one run, with one "
                "quant_format"
            )
        schemes[group] = flatquant_scheme(targets, precision, ACTIVATIONS[kind], head_dim)
    return schemes


def attach_transforms(
    model: Module, names: list[str], dtype: torch.dtype, activations: str | None,
    head_dim: int | None = None,
) -> list[KroneckerQuantTransform]:
    """Attach identity transforms to the linears ``names`` of ``model`` through
    compressed-tensors (hooks, offloading); the caller writes their values."""
    scheme = flatquant_scheme(names, dtype, activations, head_dim)
    TransformFactory.from_scheme(scheme, name=transform_group_name(head_dim)).apply_to_model(
        model, use_tqdm=False
    )
    return [get_flatquant_transform(model.get_submodule(name)) for name in names]


@TransformFactory.register(DYNAMIC_INT8_TRANSFORM_TYPE)
class DynamicInt8Factory(TransformFactory):
    """Creates one :class:`DynamicInt8Quant` per targeted linear."""

    def create_transform(self, module: Module, args: TransformArgs) -> TransformBase:
        _require_input_location(args, f"{DYNAMIC_INT8_TRANSFORM_TYPE} quantizes linear "
                                "inputs only")
        return DynamicInt8Quant(self.scheme, args)


class DynamicInt8Quant(TransformBase):
    """
    ``x -> fake_quant_int8(x)`` per token with ``scale = max|x| / 127`` (round half to
    even, no clipping), what vllm-ascend's ``W8A8_DYNAMIC`` linear computes with
    ``npu_dynamic_quant``; skipped while ``quantization_enabled`` is False. No
    parameters.
    """

    def __init__(self, scheme: TransformScheme, args: TransformArgs):
        super().__init__()
        self.scheme = scheme
        self.args = args

    _dynamic_tied_weights_keys: list[str] = []

    def forward(self, value: Tensor) -> Tensor:
        return self.apply_to(value, getattr(self, "quantization_enabled", True))

    def apply_to(self, value: Tensor, quantize: bool = True) -> Tensor:
        if not quantize:
            return value
        y = value.to(torch.promote_types(value.dtype, torch.float32))
        return fake_quantize_activation(y, 1.0, 8).to(value.dtype)

    def __repr__(self):
        return f"{self.__class__.__name__}(int8 per token, max|x| / 127)"


def get_dynamic_int8_quant(module: Module) -> DynamicInt8Quant | None:
    """The int8 input quantizer attached to a linear, if any."""
    quant = getattr(module, f"{INT8_TRANSFORM_NAME}_{TransformLocation.INPUT.value}", None)
    return quant if isinstance(quant, DynamicInt8Quant) else None


def dynamic_int8_scheme(names: list[str]) -> TransformScheme:
    return TransformScheme(
        type=DYNAMIC_INT8_TRANSFORM_TYPE,
        apply=[TransformArgs(targets=names, location="input")],
    )


def attach_dynamic_int8(model: Module, names: list[str]) -> list[DynamicInt8Quant]:
    """Attach int8 input quantizers to the linears ``names`` of ``model``."""
    TransformFactory.from_scheme(
        dynamic_int8_scheme(names), name=INT8_TRANSFORM_NAME
    ).apply_to_model(model, use_tqdm=False)
    return [get_dynamic_int8_quant(model.get_submodule(name)) for name in names]
