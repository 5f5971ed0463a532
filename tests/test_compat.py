"""The llm-compressor 0.14 / compressed-tensors 0.19 workarounds on their own (their
effect in whole runs: tests/test_distributed.py, tests/test_verify.py)."""

import pytest
from compressed_tensors.quantization import (
    QuantizationConfig,
    apply_quantization_config,
    preset_name_to_scheme,
)
from datasets import Dataset
from torch import nn

from flatquant_modifier.compat import (
    _llmcompressor_helper,
    _own_update_fused_layer_weight_global_scales,
    hold_weights_during_forward,
    shard_dataset,
    update_fused_layer_weight_global_scales,
)
from tests.conftest import build_tiny_llama
from tests.test_fusion import _nvfp4, _scale, _set_global_scales

HELPERS = [pytest.param(_own_update_fused_layer_weight_global_scales, id="ours")]
if _llmcompressor_helper() is not None:
    HELPERS.append(pytest.param(_llmcompressor_helper(), id="llmcompressor"))


def test_shard_dataset_is_the_whole_dataset_without_torchrun():
    dataset = Dataset.from_dict({"input_ids": [[1], [2], [3]]})
    assert shard_dataset(dataset) is dataset


def test_holding_weights_wraps_quantized_modules_once():
    model = _nvfp4(build_tiny_llama())
    wrapped = hold_weights_during_forward(model)
    assert wrapped == sum(hasattr(m, "quantization_scheme") for m in model.modules())
    assert hold_weights_during_forward(model) == 0  # idempotent
    # (what it changes on offloaded modules: tests/test_verify.py, disk offload)


@pytest.mark.parametrize("helper", HELPERS)
def test_name_based_helper_shares_min_scale_of_qkv_and_gate_up(helper):
    model = _nvfp4(build_tiny_llama())
    _set_global_scales(model)
    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    before = {n: _scale(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    for submodule in model.modules():
        helper(submodule)
    shared = min(before[n] for n in ("q_proj", "k_proj", "v_proj"))
    assert [_scale(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj")] == [
        pytest.approx(shared)
    ] * 3
    assert _scale(attn.o_proj) == pytest.approx(before["o_proj"])  # not a sibling
    assert _scale(mlp.gate_proj) == _scale(mlp.up_proj)
    assert _scale(mlp.down_proj) != _scale(mlp.up_proj)


@pytest.mark.parametrize("helper", HELPERS)
def test_name_based_helper_skips_fused_qkv_and_mixed_schemes(helper):
    class FusedAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv_proj, self.o_proj = nn.Linear(64, 192), nn.Linear(64, 64)

    fused = _nvfp4(FusedAttention(), ignore=())
    _set_global_scales(fused)
    before = _scale(fused.qkv_proj)
    helper(fused)
    assert _scale(fused.qkv_proj) == before

    model = build_tiny_llama()
    # v_proj quantized per channel: the attention group is not all TENSOR_GROUP
    w4 = preset_name_to_scheme("W4A16", ["re:.*v_proj$"])
    nvfp4 = preset_name_to_scheme("NVFP4", ["re:.*(q|k)_proj$"])
    apply_quantization_config(model, QuantizationConfig(config_groups={"a": w4, "b": nvfp4}))
    _set_global_scales(model)
    attn = model.model.layers[0].self_attn
    before = (_scale(attn.q_proj), _scale(attn.k_proj))
    helper(attn)
    assert (_scale(attn.q_proj), _scale(attn.k_proj)) == before


def test_public_helper_dispatches():
    model = _nvfp4(build_tiny_llama())
    _set_global_scales(model)
    attn = model.model.layers[1].self_attn
    update_fused_layer_weight_global_scales(attn)
    assert _scale(attn.q_proj) == _scale(attn.k_proj) == _scale(attn.v_proj)
