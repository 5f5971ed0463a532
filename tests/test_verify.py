"""
One model wherever it was calibrated: after ``oneshot`` the model in memory, its
compressed-tensors checkpoint reloaded with ``load_flatquant_model`` and its Ascend
export run through the NPU-op reference compute one function, in every placement a
CPU can run (the GPU placements: tests/test_verify_gpu.py; torchrun:
tests/test_distributed.py). And the guard that refuses a model in memory that is not
its checkpoints.
"""

from pathlib import Path

import pytest
import torch
from compressed_tensors.offload import get_offloaded_device, load_offloaded_model
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

import flatquant_modifier.modifier as modifier_module
from flatquant_modifier import FlatQuantModifier, load_flatquant_model
from flatquant_modifier.ascend import save_ascend_checkpoint
from flatquant_modifier.transform import get_dynamic_int8_quant, get_flatquant_transform
from flatquant_modifier.verify import FlatQuantStateError, verify_model
from tests.conftest import load_tiny, save_tiny_model_for
from tests.helpers import assert_same_function, exact_logits
from tests.helpers import logits, run, weight_quantizer


def load_on_disk(model_dir, offload_dir):
    """The tiny model offloaded to disk by compressed-tensors (``auto_offload`` with no
    CPU memory to spare): every access onloads a fresh copy of a weight, as a model
    kept in CPU memory and run on a GPU does."""
    with load_offloaded_model():
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, device_map="auto_offload",
            max_memory={"cpu": 200_000}, offload_folder=str(offload_dir),
        )
    assert get_offloaded_device(model.model.layers[1].mlp.down_proj) == "disk"
    return model


def calibrate(placement, model_dir, tmp_path):
    model, tok = load_tiny(model_dir)
    kwargs = {}
    if placement == "disk offload":
        model = load_on_disk(model_dir, tmp_path / "offload")
    elif placement == "oneshot batch_size 2":
        kwargs["batch_size"] = 2
    run(model, tok, [FlatQuantModifier(epochs=2), weight_quantizer()], **kwargs)
    return model, tok


def assert_one_function(model, tok, tmp_path, device="cpu"):
    """In memory == compressed-tensors reload on ``device`` (float32, same kernels), and
    the reload == the Ascend export (float64 on the CPU: at 4 bits float32 rounding
    flips differ)."""
    in_memory = logits(model)
    ascend = save_ascend_checkpoint(model, tmp_path / "ascend", tok)
    model.save_pretrained(tmp_path / "ct", save_compressed=True)
    reloaded = load_flatquant_model(
        tmp_path / "ct", quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    torch.testing.assert_close(logits(reloaded.to(device)), in_memory, atol=1e-5, rtol=0)
    assert_same_function(ascend, exact_logits(reloaded.cpu()))
    return in_memory


@pytest.mark.parametrize("placement", ["cpu", "oneshot batch_size 2", "disk offload"])
def test_in_memory_reloaded_and_exported_models_are_one_function(
    placement, tiny_llama_dir, tmp_path
):
    model, tok = calibrate(placement, tiny_llama_dir, tmp_path)
    in_memory = assert_one_function(model, tok, tmp_path)
    if placement != "cpu":  # the same calibration, so the same model as on the CPU
        reference, _ = calibrate("cpu", tiny_llama_dir, tmp_path / "cpu")
        torch.testing.assert_close(in_memory, logits(reference), atol=1e-5, rtol=0)


MOE_RECIPE = Path(__file__).parents[1] / "recipes" / "flatquant_w4a4_moe.yaml"


def test_an_moe_model_is_one_function_in_memory_reloaded_and_exported(tmp_path):
    model, tok = load_tiny(save_tiny_model_for(MOE_RECIPE, tmp_path / "moe"))
    run(model, tok, str(MOE_RECIPE))
    assert_one_function(model, tok, tmp_path)


def test_the_guard_refuses_an_offloaded_model_whose_weights_run_unquantized(
    tiny_llama_dir, tmp_path, monkeypatch
):
    # without holding the onloaded weight, compressed-tensors' quantized forward runs
    # an offloaded linear with a fresh full-precision copy of its weight
    monkeypatch.setattr(modifier_module, "hold_weights_during_forward", lambda model: 0)
    with pytest.raises(FlatQuantStateError, match=r"after oneshot.*14 of 14 linears do "
                       r"not compute their stored function.*layers\.0\.self_attn\.q_proj"):
        calibrate("disk offload", tiny_llama_dir, tmp_path)


@pytest.fixture()
def calibrated(tiny_llama_dir):
    model, tok = load_tiny(tiny_llama_dir)
    run(model, tok, [FlatQuantModifier(epochs=1), weight_quantizer()])
    return model, tok


def test_the_guard_names_detached_disabled_and_missing_transforms(calibrated, tmp_path):
    model, tok = calibrated
    assert verify_model(model) == 14
    layer = model.model.layers[1]
    hooks = dict(layer.self_attn.o_proj._forward_pre_hooks)
    layer.self_attn.o_proj._forward_pre_hooks.clear()  # transform detached
    get_flatquant_transform(layer.mlp.up_proj).quantization_enabled = False
    layer.mlp.down_proj.quantization_enabled = False  # weights unquantized
    with pytest.raises(FlatQuantStateError, match=r"3 of 14 linears.*layers\.1\.self_attn"
                       r"\.o_proj.*layers\.1\.mlp\.up_proj.*layers\.1\.mlp\.down_proj"):
        verify_model(model)
    # nothing is saved from such a model
    with pytest.raises(FlatQuantStateError, match="before save_pretrained"):
        model.save_pretrained(tmp_path / "ct", save_compressed=True)
    with pytest.raises(FlatQuantStateError, match="before the Ascend export"):
        save_ascend_checkpoint(model, tmp_path / "ascend", tok)
    assert not (tmp_path / "ct").exists() and not (tmp_path / "ascend").exists()
    layer.self_attn.o_proj._forward_pre_hooks.update(hooks)
    get_flatquant_transform(layer.mlp.up_proj).quantization_enabled = True
    layer.mlp.down_proj.quantization_enabled = True
    assert verify_model(model) == 14
    delattr(layer.mlp.gate_proj, "flatquant_input")
    with pytest.raises(FlatQuantStateError, match=r"1 trained transforms are not attached: "
                       r"model\.layers\.1\.mlp\.gate_proj"):
        verify_model(model)


def test_nan_weight_names_the_parameter_or_skips_the_layer(tiny_llama_dir):
    model, tok = load_tiny(tiny_llama_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"model\.layers\.1\.mlp\.down_proj\.weight "
                       r"contain NaN/Inf before calibration"):
        run(model, tok, [FlatQuantModifier(epochs=1)])
    model, tok = load_tiny(tiny_llama_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    modifier = FlatQuantModifier(epochs=1, on_nonfinite="skip")
    run(model, tok, [modifier])
    assert [r.name for r in modifier.reports] == ["model.layers.0"]
    assert get_flatquant_transform(model.model.layers[1].mlp.down_proj) is None
    # a skipped layer's W8A8_DYNAMIC linears still get their int8 input quantizers
    model, tok = load_tiny(tiny_llama_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    run(model, tok, [FlatQuantModifier(epochs=1, on_nonfinite="skip",
                                       w8a8_dynamic=["re:.*o_proj$"])])
    assert get_flatquant_transform(model.model.layers[1].mlp.up_proj) is None
    assert get_dynamic_int8_quant(model.model.layers[1].self_attn.o_proj) is not None
    # with a weight quantizer the NaN reaches the checkpoint: the guard names it
    model, tok = load_tiny(tiny_llama_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(FlatQuantStateError, match=r"down_proj \(nan\).*not finite"):
        run(model, tok, [FlatQuantModifier(epochs=1, on_nonfinite="skip"),
                         weight_quantizer()])
