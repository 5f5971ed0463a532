"""
Load a compressed-tensors checkpoint written after FlatQuantModifier back into
transformers, online transforms included.

transformers (5.x) restores the quantization config of a compressed-tensors checkpoint
but not its ``transform_config``: it neither re-attaches online transforms nor loads
their parameters (llm-compressor's own QuIP/SpinQuant checkpoints are meant for vLLM).
This re-applies the transform config with compressed-tensors' ``apply_transform_config``
and loads the transform parameters from the checkpoint's safetensors files.
"""

import json
from pathlib import Path

import torch
from compressed_tensors import TRANSFORM_CONFIG_NAME
from compressed_tensors.transform import TransformConfig, apply_transform_config
from safetensors import safe_open

from flatquant_modifier.transform import KroneckerQuantTransform

__all__ = ["load_flatquant_model"]


def load_flatquant_model(path: str | Path, **from_pretrained_kwargs):
    """
    ``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` plus the FlatQuant online
    transforms recorded in ``config.json`` (``quantization_config.transform_config``).

    :raises ValueError: if a transform parameter is missing from the checkpoint
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)
    config = json.loads((path / "config.json").read_text())
    transform_config = (config.get("quantization_config") or {}).get(TRANSFORM_CONFIG_NAME)
    if not transform_config:
        return model
    apply_transform_config(model, TransformConfig.model_validate(transform_config))
    wanted = {
        f"{name}.{param}": (module, param)
        for name, module in model.named_modules()
        if isinstance(module, KroneckerQuantTransform)
        for param, _ in module.named_parameters(recurse=False)
    }
    for file in sorted(path.glob("*.safetensors")):
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
    return model
