"""Pending writes: a layer's groups absorbed in order, written once."""

import torch
from torch import nn

from flatquant_modifier.absorb import PendingWrites, fold_into_producer


def test_reads_see_earlier_pending_writes_and_nothing_is_written():
    v_proj = nn.Linear(4, 6, bias=True)
    original = v_proj.weight.detach().clone()
    writes = PendingWrites()
    assert writes.read(v_proj, "weight") is not None
    writes.write(v_proj, "weight", original * 2)
    # a later group (o_proj's smoothing) folds 1/s into the rows the first rewrote
    s = torch.arange(1.0, 7.0, dtype=torch.float64)
    fold_into_producer(v_proj, s, writes)
    assert torch.equal(v_proj.weight.detach(), original)  # not written yet
    [(_, _, first), (_, _, folded), (_, name, bias)] = writes.updates
    assert name == "bias"
    torch.testing.assert_close(folded, (original * 2) / s.float().unsqueeze(-1))
    assert torch.equal(writes.read(v_proj, "weight"), folded)


def test_norm_weights_fold_elementwise():
    norm = nn.LayerNorm(4, elementwise_affine=True, bias=False)
    writes = PendingWrites()
    s = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    fold_into_producer(norm, s, writes)
    [(_, name, value)] = writes.updates
    assert name == "weight" and torch.equal(value, 1 / s.float())
