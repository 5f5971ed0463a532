"""Smoothing that cannot be folded exactly is turned off, or refused when forced."""

import pytest
import torch
from compressed_tensors.quantization import disable_quantization

from flatquant_modifier import FlatQuantModifier
from flatquant_modifier.mappings import LLAMA_MAPPINGS, resolve_layer
from flatquant_modifier.smoothing import SmoothingCheck, unfoldable_smoothing
from tests.conftest import build_tiny_llama, load_tiny
from tests.helpers import layer_calls, log_messages, logits, run


def test_llama_smoothing_folds_exactly_and_a_wrong_producer_does_not():
    model = build_tiny_llama()
    layer = model.model.layers[0]
    name = "model.layers.0"
    groups = resolve_layer(name, layer, LLAMA_MAPPINGS, ["lm_head"])
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    probe = layer_calls(model, layer, ids)[0]
    assert unfoldable_smoothing(name, layer, groups, probe, torch.device("cpu")) == []
    # o_proj's input is not produced by the input layernorm
    o_proj = next(g for g in groups if g.name.endswith(".o"))
    qkv = next(g for g in groups if g.name.endswith(".qkv"))
    o_proj.smooth, o_proj.smooth_index = qkv.smooth, None
    assert unfoldable_smoothing(name, layer, groups, probe, torch.device("cpu")) == [o_proj.name]
    check = SmoothingCheck(forced=False)
    check.apply(name, layer, groups, probe, torch.device("cpu"))
    assert o_proj.smooth is None and qkv.smooth is not None
    with pytest.raises(ValueError, match=r"\['o'\] cannot be folded exactly into \['input_layernorm'\].*smooth_layer"):
        groups = resolve_layer(name, layer, LLAMA_MAPPINGS, ["lm_head"])
        o_proj = next(g for g in groups if g.name.endswith(".o"))
        o_proj.smooth, o_proj.smooth_index = qkv.smooth, None
        SmoothingCheck(forced=True).apply(name, layer, groups, probe, torch.device("cpu"))


def _tiny_gemma2(path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from tests.conftest import byte_tokenizer

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16, max_position_embeddings=256)
    Gemma2ForCausalLM(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return load_tiny(path)


def test_smoothing_that_does_not_fold_exactly_is_turned_off_or_refused(tmp_path):
    """Gemma2 normalises the attention output before the residual add
    (post_attention_layernorm): Llama's mappings fold the MLP's smoothing there, which
    changes the layer (logit error 1.16 with quantization off, measured). FlatQuant
    finds it on the first layer and turns that smoothing off; its own Gemma mappings
    fold into pre_feedforward_layernorm, exactly."""
    from flatquant_modifier.mappings import LLAMA_MAPPINGS

    def transforms_only_error(**options):
        model, tok = _tiny_gemma2(tmp_path / "gemma2")
        reference = logits(model)
        with log_messages() as messages:
            run(model, tok, [FlatQuantModifier(epochs=1, learn_weight_clip=False, **options)])
        model.apply(disable_quantization)
        out = logits(model)
        return ((out - reference).norm() / reference.norm()).item(), messages

    error, messages = transforms_only_error()  # the registered Gemma mappings
    assert error < 1e-4 and not any("cannot be folded" in m for m in messages)
    error, messages = transforms_only_error(mappings=LLAMA_MAPPINGS)
    assert error < 1e-4
    assert any("smoothing of ['gate_up'] cannot be folded exactly into "
               "['post_attention_layernorm']" in m for m in messages)
    model, tok = _tiny_gemma2(tmp_path / "gemma2")
    with pytest.raises(ValueError, match=r"gate_up.*post_attention_layernorm.*smooth_layer"):
        run(model, tok, [FlatQuantModifier(epochs=1, mappings=LLAMA_MAPPINGS, smooth=True)])
