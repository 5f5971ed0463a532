"""The last decoder layer's loss on the logits (final RMSNorm and lm_head)."""

import pytest
import torch
import torch.nn.functional as F

from flatquant_modifier import FlatQuantModifier
from flatquant_modifier.logits_loss import logits_loss
from tests.conftest import build_tiny_llama, load_tiny
from tests.helpers import run


@pytest.mark.parametrize("tied", [False, True])
def test_logits_loss_is_the_mse_of_the_logits(tied):
    model = build_tiny_llama(tie_word_embeddings=tied).double()
    with torch.no_grad():  # a norm weight far from one, as trained models have
        model.model.norm.weight.uniform_(0.2, 3.0)
    hidden = model.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    out = torch.randn(2, 7, hidden, dtype=torch.float64, generator=generator) * 4
    target = out + 0.1 * torch.randn(2, 7, hidden, dtype=torch.float64, generator=generator)
    head, norm = model.get_output_embeddings(), model.model.norm
    expected = F.mse_loss(head(norm(out)), head(norm(target)))
    loss = logits_loss(model, torch.device("cpu"), torch.float64, chunk=100)
    # transformers' RMSNorm normalises in float32 even in a float64 model
    torch.testing.assert_close(loss(out, target), expected, rtol=1e-6, atol=0)
    # training runs it under autocast: it keeps its own precision there
    single = logits_loss(model.float(), torch.device("cpu"), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = single(out.float(), target.float())
    assert torch.equal(autocast, single(out.float(), target.float()))


def test_a_norm_it_cannot_reproduce_is_refused():
    model = build_tiny_llama()
    hidden = model.config.hidden_size
    model.model.norm = torch.nn.LayerNorm(hidden)  # centres: not an RMSNorm
    model.model.norm.eps = 1e-6
    with pytest.raises(ValueError, match="LayerNorm.*last_layer_loss='layer'"):
        logits_loss(model, torch.device("cpu"), torch.float32)
    del model.model.norm
    with pytest.raises(ValueError, match="final RMSNorm of LlamaForCausalLM"):
        logits_loss(model, torch.device("cpu"), torch.float32)


def test_only_the_last_layer_trains_on_the_logits(tiny_llama_dir):
    reports = {}
    for kind in ("layer", "logits"):
        model, tok = load_tiny(tiny_llama_dir)
        modifier = FlatQuantModifier(epochs=2, last_layer_loss=kind)
        run(model, tok, [modifier])
        reports[kind] = modifier.reports
    first, last = zip(*(reports[k] for k in ("layer", "logits")))
    losses = [(r.loss_rtn, r.loss_init, r.loss_final, r.epoch_losses) for r in first]
    assert losses[0] == losses[1]  # the first layer as before, bit for bit
    assert last[0].loss_final != last[1].loss_final  # another loss on the last
    assert last[1].loss_final < last[1].loss_rtn
