"""The optimisation loop of one layer, on its own (through oneshot: tests/test_modifier.py)."""

import torch

from flatquant_modifier import FlatQuantModifier
from flatquant_modifier.batching import assign_steps, call_keys, plan_steps
from flatquant_modifier.calibrate import full_precision_pass
from flatquant_modifier.mappings import infer_mappings_from_model, resolve_layer
from flatquant_modifier.modules import build_group_params
from flatquant_modifier.options import FlatQuantOptions, Precision
from flatquant_modifier.train import deterministic_algorithms, train_layer
from tests.conftest import build_tiny_llama, load_tiny
from tests.helpers import layer_calls, run


def test_training_lowers_the_loss_and_leaves_the_layer_untouched():
    model = build_tiny_llama()
    layer = model.model.layers[0]
    name = "model.layers.0"
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    calls = layer_calls(model, layer, ids)
    groups = resolve_layer(name, layer, infer_mappings_from_model(model), ["lm_head"])
    steps = plan_steps(calls, *assign_steps(call_keys(calls), 2))
    device = torch.device("cpu")
    targets, act_max = full_precision_pass(layer, steps, groups, device)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    options = FlatQuantOptions(epochs=4)
    precision = Precision(torch.float32, None)
    params = build_group_params(groups, act_max, options, precision.dtype, device,
                                torch.Generator().manual_seed(0))
    report = train_layer(name, layer, groups, params, steps, targets, options, precision,
                         device)
    assert len(report.epoch_losses) == 4
    assert report.loss_final < report.loss_init and report.loss_final < report.loss_rtn
    for key, value in layer.state_dict().items():  # absorbing is calibrate's job
        assert torch.equal(value, before[key]), key


def test_deterministic_algorithms_is_scoped():
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_algorithms():
        assert torch.are_deterministic_algorithms_enabled()
    with deterministic_algorithms(False):
        assert not torch.are_deterministic_algorithms_enabled()
    assert not torch.are_deterministic_algorithms_enabled()


def test_deterministic_option_restores_the_global_mode(tiny_llama_dir):
    model, tok = load_tiny(tiny_llama_dir)
    modifier = FlatQuantModifier(epochs=1, deterministic=True)
    run(model, tok, [modifier])
    assert len(modifier.reports) == 2
    assert not torch.are_deterministic_algorithms_enabled()


