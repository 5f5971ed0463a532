"""A byte-level tokenizer and random-token calibration data, built locally: what
``oneshot`` needs to run on randomly initialised models (tests, benchmarks at the
shapes of real models), with nothing downloaded."""

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

__all__ = ["byte_tokenizer", "random_token_dataset"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 256-token byte-level tokenizer."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=alphabet[0], pad_token=alphabet[0]
    )


def random_token_dataset(
    num_samples: int = 8, seq_len: int = 32, seed: int = 0, vocab_size: int = 256
) -> Dataset:
    """``num_samples`` rows of ``seq_len`` uniformly random token ids (pre-tokenized:
    oneshot uses them as they are)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (num_samples, seq_len), generator=generator)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )
