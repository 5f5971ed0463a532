"""
FlatQuant (learned Kronecker transforms + learnable clipping) as an llm-compressor
Modifier, producing W4A4 checkpoints for compressed-tensors and vllm-ascend.

Importing this package registers ``FlatQuantModifier`` with llm-compressor's
``ModifierFactory`` (so YAML recipes find it) and the ``"flatquant"`` transform types
with compressed-tensors (so saved checkpoints load back).
"""

from llmcompressor.modifiers.factory import ModifierFactory

from flatquant_modifier.kronecker import get_decompose_dim, kronecker_matmul
from flatquant_modifier.loading import load_flatquant_model
from flatquant_modifier.mappings import LLAMA_MAPPINGS, FlatQuantMapping
from flatquant_modifier.modifier import FlatQuantModifier
from flatquant_modifier.options import FlatQuantOptions
from flatquant_modifier.transform import FlatQuantTransformFactory, KroneckerQuantTransform

ModifierFactory.register("FlatQuantModifier", FlatQuantModifier)

__all__ = [
    "FlatQuantModifier",
    "FlatQuantOptions",
    "FlatQuantMapping",
    "LLAMA_MAPPINGS",
    "FlatQuantTransformFactory",
    "KroneckerQuantTransform",
    "get_decompose_dim",
    "kronecker_matmul",
    "load_flatquant_model",
]
