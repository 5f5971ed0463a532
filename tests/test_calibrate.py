"""One decoder layer from cached calls to applied result (calibrate_layer)."""

import pytest
import torch
from compressed_tensors.quantization import disable_quantization

from flatquant_modifier.calibrate import calibrate_layer, with_hidden_states
from flatquant_modifier.mappings import infer_mappings_from_model, resolve_layer
from flatquant_modifier.options import FlatQuantOptions
from flatquant_modifier.smoothing import SmoothingCheck
from flatquant_modifier.transform import get_flatquant_transform
from tests.conftest import build_tiny_llama
from tests.helpers import layer_calls


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
