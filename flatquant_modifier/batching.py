"""
Merge cached decoder-layer calls (one per calibration batch) into training batches.

llm-compressor calls a decoder layer once per calibration batch (``oneshot``'s
``batch_size`` samples). FlatQuant splits the calls into samples and trains on
mini-batches of several samples, so calls are merged:
``hidden_states`` (and any other per-sample tensor) are concatenated along the batch
dimension, while arguments identical across the calls (rotary embeddings, causal
mask, position ids of equal-length samples) are passed once and broadcast.

A cached call may also carry the layer's output in the pipeline's calibration pass
(:data:`TARGET`): it is split and merged with the layer input, sample for sample, and
:func:`pop_targets` takes it out of the steps.

Optimisation steps are formed in a canonical order of the samples (by a key computed
from their content), so they do not depend on the order in which the dataloader
delivered the samples nor on how they were split across ranks: a data-parallel run
sums, in every step, the losses of exactly the samples the single-process run has in
that step (:func:`assign_steps`).
"""

import math
from typing import Any

import torch
from loguru import logger

from flatquant_modifier.distributed import all_gather_varlen, get_rank

__all__ = [
    "TARGET",
    "merge_calls",
    "split_calls",
    "call_keys",
    "assign_steps",
    "plan_steps",
    "layer_input",
    "first_sub_batch",
    "pop_targets",
    "without_target",
    "share_equal_arguments",
    "equal_pairs",
]

# the key under which a cached call carries the layer's output (not a layer argument)
TARGET = "_flatquant_target"

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


def split_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    One call per sample: a call of ``b`` samples (``oneshot(batch_size=b)``) becomes
    ``b`` calls holding views of its per-sample tensors (batch dimension ``b``, at
    least 2-D) and the same shared arguments. Steps are then formed from samples, so
    that oneshot's batch size (and where a batch landed) does not change them.
    """
    out = []
    for call in calls:
        batch = _samples(call)
        if batch == 1:
            out.append(call)
            continue
        out.extend(
            {key: _sample_of(value, batch, i) for key, value in call.items()}
            for i in range(batch)
        )
    return out


def _sample_of(value: Any, batch: int, index: int) -> Any:
    if isinstance(value, torch.Tensor):
        if value.ndim >= 2 and value.shape[0] == batch:
            return value[index : index + 1]
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_sample_of(v, batch, index) for v in value)
    return value


def call_keys(calls: list[dict[str, Any]]) -> torch.Tensor:
    """
    A float64 key per call from its layer input (:func:`layer_input`): equal
    for equal samples, in any process.
    """
    keys = []
    for call in calls:
        _, hidden = layer_input(call)
        flat = hidden.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
        keys.append(float(flat @ torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64)))
    return torch.tensor(keys, dtype=torch.float64)


def assign_steps(keys: torch.Tensor, batch_size: int) -> tuple[list[int], int]:
    """
    Sort the calls of all ranks by key (ties by rank, then position) and cut the
    sorted list into steps of ``batch_size`` calls.

    :param keys: :func:`call_keys` of this rank's calls
    :return: the step of each of this rank's calls, and the number of steps (the same
        on every rank)
    """
    per_rank = all_gather_varlen(keys)
    order = sorted(
        (float(key), rank, index)
        for rank, rank_keys in enumerate(per_rank)
        for index, key in enumerate(rank_keys.tolist())
    )
    if len(per_rank) > 1:
        _warn_on_shared_samples(per_rank)
    rank = get_rank()
    steps = [0] * keys.numel()
    for position, (_, owner, index) in enumerate(order):
        if owner == rank:
            steps[index] = position // batch_size
    return steps, math.ceil(len(order) / batch_size)


def _warn_on_shared_samples(per_rank: list[torch.Tensor]):
    seen: dict[float, int] = {}
    shared = 0
    for rank, rank_keys in enumerate(per_rank):
        for key in set(rank_keys.tolist()):
            if seen.setdefault(key, rank) != rank:
                shared += 1
    if shared:
        logger.warning(
            f"FlatQuant: {shared} calibration samples are on more than one rank, so "
            "the ranks calibrate on overlapping data. llm-compressor's sampler does "
            "not split a dataset across ranks by itself: pass every rank its own shard "
            "(flatquant_modifier.compat.shard_dataset)."
        )


def plan_steps(
    calls: list[dict[str, Any]], step_of_call: list[int], num_steps: int
) -> list[list[dict[str, Any]]]:
    """
    :param calls: keyword arguments of each cached layer call, in order
    :param step_of_call: the step of each call (:func:`assign_steps`)
    :param num_steps: optimisation steps per epoch (the same on every rank)
    :return: per step, this rank's calls of that step merged into as few sub-batches
        as their shapes allow (empty when it has none)
    """
    members: list[list[dict[str, Any]]] = [[] for _ in range(num_steps)]
    for call, step in zip(share_equal_arguments(calls), step_of_call):
        members[step].append(call)
    return [merge_calls(step, max(len(step), 1)) for step in members]


def share_equal_arguments(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    The calls with every tensor argument but the layer input that equals the same
    argument of an earlier call (same shape and values) replaced by that earlier
    tensor, so that merging finds shared arguments by identity. Each distinct tensor is
    compared with the first of its argument and shape, all of them at once
    (:func:`equal_pairs`: one host sync on a GPU, however many samples and arguments),
    instead of one comparison per pair of samples merged and probe.
    """
    if not calls:
        return calls
    first_seen: dict[tuple, torch.Tensor] = {}  # (argument, shape, dtype, device)
    pending: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (argument, id)

    def collect(path: tuple, value: Any):
        if isinstance(value, torch.Tensor):
            earlier = first_seen.setdefault((path, value.shape, value.dtype, value.device),
                                            value)
            if earlier is not value:
                pending.setdefault((path, id(value)), (value, earlier))
        elif isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                collect((*path, i), item)

    for call in calls:
        input_key = layer_input(call)[0]
        for key, value in call.items():
            if key not in (input_key, TARGET):
                collect((key,), value)
    verdicts = equal_pairs(list(pending.values()))
    replaced = {key: earlier for (key, (_, earlier)), same
                in zip(pending.items(), verdicts) if same}

    def shared(path: tuple, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return replaced.get((path, id(value)), value)
        if isinstance(value, (tuple, list)):
            items = [shared((*path, i), v) for i, v in enumerate(value)]
            if all(new is old for new, old in zip(items, value)):
                return value  # unchanged (a namedtuple, say, kept as it is)
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        return value

    return [
        {key: value if key in (layer_input(call)[0], TARGET) else shared((key,), value)
         for key, value in call.items()}
        for call in calls
    ]


def equal_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[bool]:
    """
    ``torch.equal(a, b)`` for each pair of tensors of one shape, dtype and device,
    with one host sync per device in all: the comparisons are reduced on their device
    and read back together (``torch.equal`` syncs once per pair, e.g. for each
    per-sample view of a causal mask). Two views of the same memory are equal without
    a comparison.
    """
    verdicts: list[bool | None] = []
    on_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for a, b in pairs:
        if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
            verdicts.append(True)  # the same elements: sharing them changes nothing
        else:
            on_device.setdefault(a.device, []).append((len(verdicts), (a == b).all()))
            verdicts.append(None)
    for flags in on_device.values():
        for (index, _), same in zip(flags, torch.stack([f for _, f in flags]).tolist()):
            verdicts[index] = bool(same)
    return verdicts


def _merge(calls: list[dict[str, Any]]) -> dict[str, Any] | object:
    keys = calls[0].keys()
    if any(call.keys() != keys for call in calls):
        return _MISMATCH
    batch = _samples(calls[0])
    input_key = layer_input(calls[0])[0]
    merged = {}
    for key in keys:
        # the layer input (and output) is each sample's own, even where two samples
        # are equal
        value = _merge_values([call[key] for call in calls], batch,
                              per_sample=key in (input_key, TARGET))
        if value is _MISMATCH:
            return _MISMATCH
        merged[key] = value
    return merged


def first_sub_batch(steps: list[list[Any]]) -> tuple[int, int] | None:
    """(step, sub-batch) of the first sub-batch in ``steps``; None if all are empty."""
    return next(((i, j) for i, batch in enumerate(steps) for j in range(len(batch))), None)


def pop_targets(
    steps: list[list[dict[str, Any]]],
) -> tuple[list[list[dict[str, Any]]], list[list[torch.Tensor]] | None]:
    """
    The steps without the layer outputs their calls carried (:data:`TARGET`), and
    those outputs per step and sub-batch; None unless every sub-batch carried one.
    """
    stripped = [[without_target(kwargs) for kwargs in batches] for batches in steps]
    if not all(TARGET in kwargs for batches in steps for kwargs in batches):
        return stripped, None
    return stripped, [[kwargs[TARGET] for kwargs in batches] for batches in steps]


def without_target(call: dict[str, Any]) -> dict[str, Any]:
    """``call`` without the layer output it carried (:data:`TARGET`), if any."""
    return {key: value for key, value in call.items() if key != TARGET}


def layer_input(call: dict[str, Any]) -> tuple[str, torch.Tensor]:
    """The layer input of a cached call and its argument name: ``hidden_states`` (a
    decoder layer's) wherever the call holds it, else its first tensor argument."""
    hidden = call.get("hidden_states")
    if isinstance(hidden, torch.Tensor):
        return "hidden_states", hidden
    return next((k, v) for k, v in call.items() if isinstance(v, torch.Tensor))


def _samples(call: dict[str, Any]) -> int:
    """Samples in a cached call: the batch size of its layer input."""
    return layer_input(call)[1].shape[0]


def _merge_values(values: list[Any], batch: int, per_sample: bool = False) -> Any:
    """
    Merge one argument of calls of ``batch`` samples each: per-sample tensors (and
    the layer input, ``per_sample``) are concatenated; tensors identical across calls
    are passed once when they broadcast over the merged batch (a batch dimension of 1,
    or none).
    """
    first = values[0]
    if len(values) == 1:
        return first
    if isinstance(first, torch.Tensor):
        if not all(
            isinstance(v, torch.Tensor) and v.shape == first.shape for v in values
        ):
            return _MISMATCH
        per_sample = per_sample or (batch > 1 and first.ndim >= 2 and first.shape[0] == batch)
        if not per_sample and all(v is first or torch.equal(v, first) for v in values[1:]):
            return first
        if first.ndim == 0:
            return _MISMATCH
        return torch.cat(values, dim=0)
    if isinstance(first, (tuple, list)):
        if not all(isinstance(v, type(first)) and len(v) == len(first) for v in values):
            return _MISMATCH
        parts = [_merge_values([v[i] for v in values], batch) for i in range(len(first))]
        if any(p is _MISMATCH for p in parts):
            return _MISMATCH
        return type(first)(parts)
    if all(v is first or v == first for v in values[1:]):
        return first
    return _MISMATCH
