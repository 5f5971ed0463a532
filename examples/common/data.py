"""
The WikiText-2 raw files of the examples, benchmarks and tests, and calibration
samples drawn from a plain-text corpus as the FlatQuant paper draws them: random
fixed-length windows of the tokenized text (seeded).

One setting: the folder ``$FLATQUANT_DATA`` (default ``../shared/data`` next to the
repository) holding ``wikitext2-valid.txt`` (calibration) and
``wikitext2-raw-test.txt`` (perplexity only).
"""

import os
from pathlib import Path

import torch
from datasets import Dataset

__all__ = ["DATA_DIR", "CALIBRATION_TEXT", "TEST_TEXT", "text_windows_dataset"]

DATA_DIR = Path(
    os.environ.get("FLATQUANT_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data")
)
CALIBRATION_TEXT = DATA_DIR / "wikitext2-valid.txt"
TEST_TEXT = DATA_DIR / "wikitext2-raw-test.txt"


def text_windows_dataset(
    tokenizer,
    path: str | Path,
    num_samples: int,
    seq_len: int,
    seed: int = 0,
) -> Dataset:
    """
    ``num_samples`` random windows of ``seq_len`` tokens from the tokenized text of
    ``path`` (the whole file, tokenizer defaults), as a tokenized ``datasets.Dataset``
    with ``input_ids`` and ``attention_mask`` that ``oneshot(dataset=...)`` takes as is.
    """
    text = Path(path).read_text(encoding="utf-8")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() <= seq_len:
        raise ValueError(
            f"{path} has {ids.numel()} tokens, too few for windows of {seq_len}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (num_samples,), generator=generator)
    windows = [ids[s : s + seq_len].tolist() for s in starts.tolist()]
    return Dataset.from_dict(
        {"input_ids": windows, "attention_mask": [[1] * seq_len for _ in windows]}
    )
