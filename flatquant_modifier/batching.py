"""
Merge cached decoder-layer calls (one per calibration batch) into training batches.

llm-compressor calls a decoder layer once per calibration batch (usually one sample).
FlatQuant trains on mini-batches of several samples, so consecutive calls are merged:
``hidden_states`` (and any other per-sample tensor) are concatenated along the batch
dimension, while arguments identical across the calls (rotary embeddings, causal
mask, position ids of equal-length samples) are passed once and broadcast.
"""

from typing import Any

import torch

__all__ = ["merge_calls"]

_MISMATCH = object()


def merge_calls(calls: list[dict[str, Any]], batch_size: int) -> list[dict[str, Any]]:
    """
    :param calls: keyword arguments of each cached layer call, in order
    :param batch_size: number of calls to merge into one training batch
    :return: merged keyword arguments; calls whose tensors cannot be merged (e.g.
        different sequence lengths) start a new batch
    """
    batches: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    for call in calls:
        if pending and (
            len(pending) == batch_size or _merge(pending + [call]) is _MISMATCH
        ):
            batches.append(_merge(pending))
            pending = []
        pending.append(call)
    if pending:
        batches.append(_merge(pending))
    return batches


def _merge(calls: list[dict[str, Any]]) -> dict[str, Any] | object:
    keys = calls[0].keys()
    if any(call.keys() != keys for call in calls):
        return _MISMATCH
    merged = {}
    for key in keys:
        value = _merge_values([call[key] for call in calls])
        if value is _MISMATCH:
            return _MISMATCH
        merged[key] = value
    return merged


def _merge_values(values: list[Any]) -> Any:
    first = values[0]
    if len(values) == 1:
        return first
    if isinstance(first, torch.Tensor):
        if not all(
            isinstance(v, torch.Tensor) and v.shape == first.shape for v in values
        ):
            return _MISMATCH
        if all(v is first or torch.equal(v, first) for v in values[1:]):
            return first
        if first.ndim == 0:
            return _MISMATCH
        return torch.cat(values, dim=0)
    if isinstance(first, (tuple, list)):
        if not all(isinstance(v, type(first)) and len(v) == len(first) for v in values):
            return _MISMATCH
        parts = [_merge_values([v[i] for v in values]) for i in range(len(first))]
        if any(p is _MISMATCH for p in parts):
            return _MISMATCH
        return type(first)(parts)
    if all(v is first or v == first for v in values[1:]):
        return first
    return _MISMATCH
