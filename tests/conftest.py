"""Shared fixtures: a tiny random Llama (saved with a byte-level tokenizer, as
llm-compressor's oneshot expects) and calibration data; nothing comes from a hub."""

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from examples.common.synthetic import byte_tokenizer, random_token_dataset  # noqa: F401


TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def build_tiny_llama(seed: int = 0, outliers: bool = True, **overrides) -> LlamaForCausalLM:
    """
    Random tiny Llama. With ``outliers``, a few input channels of every linear get
    large activations (norm weights scaled, as in real LLMs), so that quantization
    error is dominated by outliers and FlatQuant has something to fix.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY, **overrides})
    model = LlamaForCausalLM(config).eval()
    if outliers:
        with torch.no_grad():
            for layer in model.model.layers:
                for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                    norm.weight[torch.randperm(norm.weight.numel())[:3]] *= 20.0
                up = layer.mlp.up_proj.weight
                up[torch.randperm(up.shape[0])[:3]] *= 10.0
    return model


# Qwen3-MoE: layer 0 dense (mlp_only_layers), layer 1 with four routed experts
TINY_QWEN3_MOE = dict(TINY, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                      head_dim=16, mlp_only_layers=[0])


# sizes vllm-ascend's W4A4_MXFP4_FLATQUANT serves at tensor-parallel sizes up to 4
TINY_MXFP4 = dict(hidden_size=256, intermediate_size=512)


def save_tiny_model_for(recipe: Path, path: Path) -> Path:
    """The tiny model a recipe of recipes/ is made for, saved with the byte tokenizer:
    a Qwen3-MoE for the MoE recipes, a Llama whose o_proj and down_proj split into
    four tensor-parallel shares of multiples of 64 for MXFP4, else the tiny Llama."""
    if "mxfp4" in recipe.stem:
        return save_tiny_llama(path, **TINY_MXFP4)
    if "moe" not in recipe.stem:
        return save_tiny_llama(path)
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(Qwen3MoeConfig(**TINY_QWEN3_MOE)).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def save_tiny_llama(path: Path, **overrides) -> Path:
    """Save the tiny Llama (with outliers; ``overrides`` of its config) and the byte
    tokenizer to ``path``."""
    build_tiny_llama(**overrides).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture()
def tiny_llama_dir(tmp_path) -> Path:
    """A tiny Llama with outliers + tokenizer saved to disk (fresh per test)."""
    return save_tiny_llama(tmp_path / "tiny-llama")


def load_tiny(path: Path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, PreTrainedTokenizerFast.from_pretrained(path)


