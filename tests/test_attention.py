"""SDPA attention while FlatQuant trains a layer (llm-compressor forces eager)."""

import torch

from flatquant_modifier.attention import drop_causal_masks, training_attention
from tests.conftest import build_tiny_llama


def test_pure_causal_masks_become_none_and_others_stay():
    causal = torch.full((5, 5), torch.finfo(torch.float32).min).triu(1)[None, None]
    padded = causal.clone()
    padded[..., 0] = torch.finfo(torch.float32).min  # first token is padding
    biased = causal + torch.tril(torch.ones(5, 5))  # ALiBi-like bias on allowed pairs
    boolean = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    steps = [[{"hidden_states": torch.zeros(1, 5, 4), "attention_mask": m}]
             for m in (causal, padded, biased, boolean, None)]
    masks = [batches[0]["attention_mask"] for batches in drop_causal_masks(steps)]
    assert masks[0] is None and masks[3] is None and masks[4] is None
    assert masks[1] is padded and masks[2] is biased


def _causal_steps(seq=16, batches=2):
    mask = torch.full((seq, seq), torch.finfo(torch.float32).min).triu(1)[None, None]
    model = build_tiny_llama()
    model.config._attn_implementation = "eager"  # as llm-compressor's calibration sets it
    rotary = model.model.rotary_emb
    steps = []
    for k in range(batches):
        hidden = torch.randn(2, seq, 64, generator=torch.Generator().manual_seed(k))
        position_ids = torch.arange(seq)[None]
        steps.append([{"hidden_states": hidden, "attention_mask": mask,
                       "position_ids": position_ids,
                       "position_embeddings": rotary(hidden, position_ids)}])
    return model, steps


def test_layers_train_with_sdpa_and_no_mask_when_that_is_the_same_function():
    model, steps = _causal_steps()
    layer = model.model.layers[0]
    with torch.no_grad():
        eager = layer(**steps[1][0])
    with training_attention(model, layer, steps, "sdpa") as used:
        assert model.config._attn_implementation == "sdpa"
        assert all(b["attention_mask"] is None for batches in used for b in batches)
        with torch.no_grad():
            torch.testing.assert_close(layer(**used[1][0]), eager, rtol=1e-4, atol=1e-5)
    assert model.config._attn_implementation == "eager"
    # a model loaded with eager attention keeps it
    with training_attention(model, layer, steps, "eager") as used:
        assert used is steps and model.config._attn_implementation == "eager"


def test_sdpa_is_refused_when_it_changes_the_layer_output():
    model, steps = _causal_steps()
    layer = model.model.layers[0]
    layer.self_attn.is_causal = False  # SDPA without a mask would attend everywhere
    with training_attention(model, layer, steps, "sdpa") as used:
        assert used is steps and model.config._attn_implementation == "eager"
