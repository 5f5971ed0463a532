"""One decoder layer from cached calls to applied result (calibrate_layer)."""

import pytest
import torch
from compressed_tensors.quantization import disable_quantization

from flatquant_modifier.batching import TARGET, without_target
from flatquant_modifier.calibrate import calibrate_layer, channel_max, with_hidden_states
from flatquant_modifier.emulation import layer_output
from flatquant_modifier.mappings import infer_mappings_from_model, resolve_layer
from flatquant_modifier.options import FlatQuantOptions
from flatquant_modifier.smoothing import SmoothingCheck
from flatquant_modifier.transform import get_flatquant_transform
from tests.conftest import build_tiny_llama
from tests.helpers import layer_calls, log_messages


@pytest.mark.parametrize("smooth", [True, False])
def test_absorbed_transforms_leave_the_unquantized_layer_unchanged(smooth):
    """Trained for W4A4, then run with quantization off, the transformed layer is the
    original one (float64, no weight clipping): every group's weights absorb P^-T and the smoothing folds
    into its producer, o_proj's into the v_proj rows q/k/v's transform rewrote, all
    in one write."""
    model = build_tiny_llama().double()
    layer = model.model.layers[0]
    name = "model.layers.0"
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    calls = layer_calls(model, layer, ids)
    with torch.no_grad():
        reference = [layer(**call)[0] for call in calls]
    groups = resolve_layer(name, layer, infer_mappings_from_model(model), ["lm_head"])
    # (the learned weight clipping changes the weights on purpose)
    options = FlatQuantOptions(epochs=2, batch_size=2, smooth=smooth, learn_weight_clip=False)
    result = calibrate_layer(model, name, layer, groups, calls, options, seed=0,
                             smoothing=SmoothingCheck(forced=False) if smooth else None)
    assert result.report.loss_final < result.report.loss_rtn
    assert sorted(result.transformed) == sorted(
        f"{name}.{part}" for part in ("self_attn.q_proj", "self_attn.k_proj",
                                      "self_attn.v_proj", "self_attn.o_proj",
                                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    )
    num_steps = result.step_plan[1]
    assert num_steps == 2 and sorted(result.step_plan[0]) == [0, 0, 1, 1]
    for linear_name in result.transformed:
        transform = get_flatquant_transform(model.get_submodule(linear_name))
        assert transform.quantize
        assert not torch.equal(transform.left_trans, torch.eye(len(transform.left_trans),
                                                               dtype=torch.float64))
    model.apply(disable_quantization)
    with torch.no_grad():
        for call, expected in zip(calls, reference):
            torch.testing.assert_close(layer(**call)[0], expected, atol=1e-10, rtol=1e-10)



def test_with_hidden_states_replaces_the_layer_input_and_checks_shapes():
    position = torch.zeros(1, 3)
    steps = [[{"hidden_states": torch.zeros(2, 3, 4), "position": position}],
             [{"hidden_states": torch.zeros(1, 3, 4), "position": position}]]
    hidden = [[torch.ones(2, 3, 4)], [torch.full((1, 3, 4), 2.0)]]
    out = with_hidden_states("model.layers.3", steps, hidden)
    assert out[0][0]["hidden_states"] is hidden[0][0]
    assert out[1][0]["hidden_states"] is hidden[1][0]
    assert out[1][0]["position"] is position
    assert steps[0][0]["hidden_states"].sum() == 0  # the steps themselves unchanged
    with pytest.raises(ValueError, match="carried to layer model.layers.3 do not match"):
        with_hidden_states("model.layers.3", steps, [[torch.ones(2, 3, 4)], []])


def _recorded(model, layer, groups, ids):
    """The layer's calls with its outputs (TARGET), and its groups' input maxima, as
    the modifier records them in the pipeline's calibration pass."""
    maxima = [None] * len(groups)

    def record(index):
        def hook(_linear, args):
            amax = channel_max(args[0])
            maxima[index] = amax if maxima[index] is None else torch.maximum(maxima[index], amax)
        return hook

    handles = [group.linears[0][1].register_forward_pre_hook(record(i))
               for i, group in enumerate(groups)]
    calls = layer_calls(model, layer, ids)
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        for call in calls:
            call[TARGET] = layer_output(layer(**call))
    return calls, maxima


@pytest.mark.parametrize("recorded", ["exact", "changed", "no maxima"])
def test_outputs_recorded_in_the_calibration_pass_are_the_targets(monkeypatch, recorded):
    """The layer's outputs and input maxima recorded in the pipeline's calibration pass
    replace the targets pass, giving the same training; outputs the layer no longer
    gives (a modifier changed it in between) are noticed, and the targets computed again."""
    import flatquant_modifier.calibrate as calibrate

    passes = []
    full_pass = calibrate.full_precision_pass
    monkeypatch.setattr(calibrate, "full_precision_pass",
                        lambda *a, **k: passes.append(1) or full_pass(*a, **k))
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    name = "model.layers.0"
    options = FlatQuantOptions(epochs=2, batch_size=2)
    results = []
    for record in (False, True):
        model = build_tiny_llama().double()
        layer = model.model.layers[0]
        groups = resolve_layer(name, layer, infer_mappings_from_model(model), ["lm_head"])
        calls, maxima = _recorded(model, layer, groups, ids)
        if recorded == "changed":  # after the pass, as another modifier could
            with torch.no_grad():
                layer.mlp.down_proj.weight.mul_(1.5)
        if not record:
            calls = [without_target(call) for call in calls]
            maxima = None
        elif recorded == "no maxima":
            maxima[2] = None
        with log_messages() as messages:
            results.append(calibrate_layer(model, name, layer, groups, calls, options,
                                           seed=0, input_max=maxima))
        # taken out of the calls: the steps' merged copies are the only ones kept
        assert not any(TARGET in call for call in calls)
    assert len(passes) == (1 if recorded == "exact" else 2)
    assert any("model.layers.0 no longer gives the outputs it gave in the pipeline's "
               "calibration pass" in m for m in messages) == (recorded == "changed")
    plain, ours = results
    assert ours.step_plan == plain.step_plan
    assert ours.report.loss_final == pytest.approx(plain.report.loss_final, rel=1e-9)
    assert ours.report.loss_init == pytest.approx(plain.report.loss_init, rel=1e-9)
    assert ours.report.epoch_losses == pytest.approx(plain.report.epoch_losses, rel=1e-9)
