"""The optimisation loop of one layer, on its own (through oneshot: tests/test_modifier.py)."""

import pytest
import torch

from flatquant_modifier import FlatQuantModifier
from flatquant_modifier.batching import assign_steps, call_keys, plan_steps
from flatquant_modifier.calibrate import full_precision_pass
from flatquant_modifier.mappings import infer_mappings_from_model, resolve_layer
from flatquant_modifier.modules import build_group_params
from flatquant_modifier.options import FlatQuantOptions, Precision
from flatquant_modifier.train import deterministic_algorithms, layer_loss, train_layer
from tests.conftest import build_tiny_llama, load_tiny
from tests.helpers import layer_calls, run


def _train_first_layer(**options):
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
    options = FlatQuantOptions(epochs=4, **options)
    precision = Precision(torch.float32, None)
    params = build_group_params(groups, act_max, options, precision.dtype, device,
                                torch.Generator().manual_seed(0))
    report = train_layer(name, layer, groups, params, steps, targets, options, precision,
                         device)
    return report, layer, before


@pytest.mark.parametrize("options", [{}, {"loss": "relative"}, {"lr_schedule": "constant"}])
def test_training_lowers_the_loss_and_leaves_the_layer_untouched(options):
    report, layer, before = _train_first_layer(**options)
    assert len(report.epoch_losses) == 4
    assert report.loss_final < report.loss_init and report.loss_final < report.loss_rtn
    for key, value in layer.state_dict().items():  # absorbing is calibrate's job
        assert torch.equal(value, before[key]), key


def test_constant_schedule_differs_from_cosine():
    cosine, _, _ = _train_first_layer()
    constant, _, _ = _train_first_layer(lr_schedule="constant")
    # one step per epoch here: the first one at the same lr
    assert cosine.epoch_losses[0] == constant.epoch_losses[0]
    assert cosine.loss_final != constant.loss_final


def test_relative_loss_is_the_mean_relative_error_per_token():
    target = torch.tensor([[[3.0, 4.0], [30.0, 40.0]]], dtype=torch.float64)
    out = target + torch.tensor([[[1.0, 1.0], [1.0, 1.0]]], dtype=torch.float64)
    # per token: error 1.0 over mean squares 12.5 and 1250
    assert layer_loss(out, target, "relative").item() == pytest.approx(
        (1 / 12.5 + 1 / 1250) / 2, rel=1e-15)
    assert layer_loss(out, target, "mse").item() == 1.0
    zero = torch.zeros(1, 1, 2, dtype=torch.float64)
    assert torch.isfinite(layer_loss(zero, zero, "relative"))


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


