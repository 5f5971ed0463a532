"""Shared fixtures: a tiny random Llama (saved with a byte-level tokenizer, as
llm-compressor's oneshot expects) and calibration data; nothing comes from a hub."""

from pathlib import Path

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)


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


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 256-token byte-level tokenizer built locally."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=alphabet[0], pad_token=alphabet[0]
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


def save_tiny_llama(path: Path) -> Path:
    """Save the default tiny Llama (with outliers) and the byte tokenizer to ``path``."""
    build_tiny_llama().save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture()
def tiny_llama_dir(tmp_path) -> Path:
    """A tiny Llama with outliers + tokenizer saved to disk (fresh per test)."""
    return save_tiny_llama(tmp_path / "tiny-llama")


def load_tiny(path: Path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, PreTrainedTokenizerFast.from_pretrained(path)


def random_token_dataset(num_samples: int = 8, seq_len: int = 32, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY["vocab_size"], (num_samples, seq_len), generator=generator)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )
