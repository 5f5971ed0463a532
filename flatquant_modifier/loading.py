"""
Load a compressed-tensors checkpoint written after FlatQuantModifier back into
transformers, online transforms included.

transformers (5.x) restores the quantization config of a compressed-tensors checkpoint
but not its ``transform_config``: it neither re-attaches online transforms nor loads
their parameters (llm-compressor's own QuIP/SpinQuant checkpoints are meant for vLLM).
This re-applies the transform config with compressed-tensors' ``apply_transform_config``
and loads the transform parameters from the checkpoint's safetensors files.

MoE models: transformers 5 fuses each block's experts into 3D tensors; llm-compressor
unpacks them into one linear per expert for calibration and saves them so (each
expert has its own qparams and input quantizers). Such a checkpoint is loaded into the
same per-expert modules (llm-compressor's ``LinearExperts2D``), with transformers'
expert-fusing conversions left out of the load.
"""

import contextlib
import json
import re
import sys
from pathlib import Path

import torch
from compressed_tensors import TRANSFORM_CONFIG_NAME
from compressed_tensors.offload import remove_dispatch
from compressed_tensors.utils import patch_attr
from compressed_tensors.transform import (
    TransformConfig,
    TransformLocation,
    apply_transform_config,
)
from safetensors import safe_open

from flatquant_modifier.compat import fp4_weights_in_model_dtype
from flatquant_modifier.transform import TRANSFORM_NAME, KroneckerQuantTransform
from flatquant_modifier.verify import verify_model

__all__ = ["check_safetensors_files", "load_flatquant_model"]

# the parameters of the online transforms, loaded here rather than by transformers
_TRANSFORM_KEY = re.compile(rf"\.{TRANSFORM_NAME}(_block\d+)?_{TransformLocation.INPUT.value}\.")


def load_flatquant_model(path: str | Path, **from_pretrained_kwargs):
    """
    ``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` plus the FlatQuant online
    transforms recorded in ``config.json`` (``quantization_config.transform_config``).

    :raises FileNotFoundError: if ``path`` is not a saved checkpoint directory
    :raises ValueError: if a weight or a transform parameter is missing from the
        checkpoint, a tensor is unexpected or of another shape, or a file is corrupt
    :raises flatquant_modifier.verify.FlatQuantStateError: if the loaded model does not
        carry the recorded transforms or does not compute their function
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} has no config.json; pass the directory written by "
            "save_pretrained(..., save_compressed=True)"
        )
    files = check_safetensors_files(path)
    with contextlib.ExitStack() as stack:
        # its load report lists our transform keys as unexpected
        stack.enter_context(_quiet_transformers())
        stack.enter_context(_per_expert_layout(path, files))
        model, info = AutoModelForCausalLM.from_pretrained(
            path, output_loading_info=True, **from_pretrained_kwargs
        )
    _check_loading_info(path, info)
    fp4_weights_in_model_dtype(model)
    if "device_map" not in from_pretrained_kwargs:
        # compressed-tensors dispatches a model it decompresses (offloaded in CPU memory,
        # onloaded to the GPU where there is one); without a device_map the caller gets
        # a plain model, whose .to(device / dtype) moves its tensors
        remove_dispatch(model)
    config = json.loads((path / "config.json").read_text())
    transform_config = (config.get("quantization_config") or {}).get(TRANSFORM_CONFIG_NAME)
    if not transform_config:
        return model
    transform_config = TransformConfig.model_validate(transform_config)
    apply_transform_config(model, transform_config)
    wanted = {
        f"{name}.{param}": (module, param)
        for name, module in model.named_modules()
        if isinstance(module, KroneckerQuantTransform)
        for param, _ in module.named_parameters(recurse=False)
    }
    for file in files:
        with safe_open(file, "pt") as reader:
            for key in reader.keys():
                if key in wanted:
                    module, param = wanted.pop(key)
                    value = reader.get_tensor(key)
                    with torch.no_grad():
                        getattr(module, param).copy_(value)
    if wanted:
        raise ValueError(
            f"{path}: the checkpoint lacks FlatQuant transform parameters, e.g. "
            f"{sorted(wanted)[:3]}; was it saved after FlatQuantModifier?"
        )
    # apply_transform_config recorded the config on the model: verify against it
    verify_model(model, where=f"loading {path}")
    return model


def check_safetensors_files(path: Path) -> list[Path]:
    """
    The ``*.safetensors`` files of a checkpoint directory, each opened once (its
    header and size checked).

    :raises ValueError: naming a truncated or corrupt file
    """
    files = sorted(Path(path).glob("*.safetensors"))
    for file in files:
        try:
            with safe_open(file, "pt"):
                pass
        except Exception as error:  # SafetensorError, OSError
            raise ValueError(
                f"{file}: not a readable safetensors file ({error}); the checkpoint is "
                "truncated or corrupt, save or copy it again"
            ) from error
    return files


_PER_EXPERT_KEY = re.compile(r"\.experts\.\d+\.")


@contextlib.contextmanager
def _per_expert_layout(path: Path, files: list[Path]):
    """
    While loading a checkpoint that stores MoE experts one linear per expert into a
    model type whose transformers class fuses them: build the per-expert modules
    llm-compressor calibrated (``LinearExperts2D``) and load the keys as they are.
    Written here because llm-compressor's ``load_quantizable_moe`` covers only model
    types it has load mappings for (not Mixtral) and goes through transformers'
    ``apply_patches``, which imports every transformers module (torchvision too).
    """
    from llmcompressor.modeling.moe.conversion_mappings import ARCH_TO_IMPORT_PATHS
    from llmcompressor.modeling.moe.helpers import import_or_none
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
    from transformers import AutoConfig
    from transformers import conversion_mapping

    model_type = AutoConfig.from_pretrained(path).model_type
    experts_cls = (import_or_none(ARCH_TO_IMPORT_PATHS[model_type][1])
                   if model_type in ARCH_TO_IMPORT_PATHS else None)
    if experts_cls is None or not _has_per_expert_keys(files):
        yield
        return
    original = conversion_mapping.get_checkpoint_conversion_mapping(model_type)
    registered = model_type in conversion_mapping.USER_REGISTERED_MAPPINGS
    # transformers' renames stay (Mixtral's block_sparse_moe -> mlp); the conversions
    # that fuse per-expert tensors into 3D ones go
    kept = [
        conversion for conversion in original or []
        if not any("experts" in target for target in conversion.target_patterns)
    ]
    linear_cls = LinearExperts2D.get_linear_experts_cls(experts_cls)

    def init(self, config, *args, **kwargs):
        linear_cls.__init__(self, config, *args, **kwargs)
        # what llm-compressor's repack_moe needs to fuse them again
        self._source_experts_cls, self._source_config = experts_cls, config
        # loaded expert by expert: transformers' initialisation of the fused class
        # (which this one stands in for) would look for 3D tensors
        self._is_hf_initialized = True

    loaded_cls = type(linear_cls.__name__, (linear_cls,), {"__init__": init})
    module = sys.modules[experts_cls.__module__]
    register = conversion_mapping.register_checkpoint_conversion_mapping
    register(model_type, kept, overwrite=True)
    try:
        with patch_attr(module, experts_cls.__name__, loaded_cls):
            yield
    finally:
        if original is None:  # no entry before: remove ours (private cache, no API)
            conversion_mapping._checkpoint_conversion_mapping_cache.pop(model_type, None)
        else:
            register(model_type, original, overwrite=True)
        if not registered:
            conversion_mapping.USER_REGISTERED_MAPPINGS.discard(model_type)


def _has_per_expert_keys(files: list[Path]) -> bool:
    for file in files:
        with safe_open(file, "pt") as reader:
            if any(_PER_EXPERT_KEY.search(key) for key in reader.keys()):
                return True
    return False


def _check_loading_info(path: Path, info: dict):
    """:raises ValueError: if transformers left weights missing, unexpected or of
    another shape (re-initialised), the online transforms' parameters excepted"""
    problems = {
        "missing": list(info.get("missing_keys") or []),
        "unexpected": [k for k in info.get("unexpected_keys") or [] if not _TRANSFORM_KEY.search(k)],
        "of another shape": [str(k) for k in info.get("mismatched_keys") or []],
    }
    problems = {kind: sorted(keys) for kind, keys in problems.items() if keys}
    if not problems:
        return
    listed = "; ".join(
        f"{len(keys)} {kind}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
        for kind, keys in problems.items()
    )
    raise ValueError(
        f"{path}: transformers could not load every weight of the checkpoint into the "
        f"model ({listed}); those weights would be left re-initialised. The checkpoint "
        "does not match its config.json (a layout this transformers version renames, or "
        "a checkpoint from another model)."
    )


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
