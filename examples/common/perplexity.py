"""WikiText-2 style perplexity: non-overlapping windows over the whole tokenized file."""

import math
from pathlib import Path

import torch
from tqdm import tqdm

__all__ = ["perplexity"]


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    path: str | Path,
    seq_len: int = 2048,
    max_windows: int | None = None,
    device: torch.device | str | None = None,
) -> float:
    """
    Perplexity of ``model`` on the text of ``path``: the whole file tokenized with the
    tokenizer's defaults (no BOS for SmolLM2), cut into consecutive windows of
    ``seq_len`` tokens (the remainder dropped), the mean token NLL of the first
    ``max_windows`` windows (all when None), exponentiated.
    """
    text = Path(path).read_text(encoding="utf-8")
    ids = tokenizer(text, return_tensors="pt").input_ids
    windows = ids.shape[1] // seq_len
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise ValueError(f"{path} has fewer than {seq_len} tokens")
    device = device or next(model.parameters()).device
    total = 0.0
    for i in tqdm(range(windows), desc="perplexity", leave=False):
        window = ids[:, i * seq_len : (i + 1) * seq_len].to(device)
        logits = model(window).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[0, :-1], window[0, 1:], reduction="mean"
        )
        total += loss.item()
    return math.exp(total / windows)
