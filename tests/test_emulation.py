"""The training forward: a decoder layer with transformed, fake-quantized linears."""

import torch

from flatquant_modifier.emulation import FakeQuantizedLayer, layer_output
from flatquant_modifier.mappings import infer_mappings_from_model, resolve_layer
from flatquant_modifier.modules import build_group_params, identity_params
from flatquant_modifier.options import FlatQuantOptions, Precision
from flatquant_modifier.quantize import fake_quantize_activation, fake_quantize_weight
from tests.conftest import build_tiny_llama
from tests.helpers import layer_calls


def _layer():
    model = build_tiny_llama().double()
    layer = model.model.layers[0]
    name = "model.layers.0"
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    groups = resolve_layer(name, layer, infer_mappings_from_model(model), ["lm_head"])
    return layer, groups, layer_calls(model, layer, ids)


def test_unquantized_random_transforms_with_smoothing_are_the_layer():
    layer, groups, calls = _layer()
    options = FlatQuantOptions(w_bits=None, a_bits=None)
    act_max = [torch.rand(g.in_features, dtype=torch.float64) + 0.5 for g in groups]
    params = build_group_params(groups, act_max, options, torch.float64, torch.device("cpu"),
                                torch.Generator().manual_seed(0))
    emulated = FakeQuantizedLayer(groups, params, options, Precision(torch.float64, None),
                                  torch.device("cpu"))
    with torch.no_grad():
        for call in calls:
            reference = layer_output(layer(**call))
            with emulated.patched():
                emulated.new_step()
                torch.testing.assert_close(layer_output(layer(**call)), reference,
                                           atol=1e-10, rtol=1e-10)


def test_identity_transforms_quantize_like_the_fake_quantizers():
    layer, groups, calls = _layer()
    options = FlatQuantOptions()
    params = identity_params(groups, options, torch.float64, torch.device("cpu"))
    emulated = FakeQuantizedLayer(groups, params, options, Precision(torch.float64, None),
                                  torch.device("cpu"))
    q_proj = layer.self_attn.q_proj
    x = torch.randn(3, q_proj.in_features, dtype=torch.float64)
    expected = torch.nn.functional.linear(
        fake_quantize_activation(x, 1.0, 4), fake_quantize_weight(q_proj.weight, 1.0, 4)
    )
    with torch.no_grad(), emulated.patched():
        emulated.new_step()
        torch.testing.assert_close(q_proj(x), expected, atol=1e-12, rtol=0)
