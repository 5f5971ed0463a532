"""
W4A4_MXFP4_FLATQUANT end to end on a tiny Llama whose sizes vllm-ascend's method takes
at tensor-parallel sizes up to 4 (hidden 256, intermediate 512): FlatQuant trained for
MXFP4, compressed-tensors' MXFP4 weights, the export loaded back through the reference
of the method, per rank at TP 1, 2 and 4.
"""

import json

import pytest
import torch
from llmcompressor.modifiers.quantization import QuantizationModifier
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from flatquant_modifier import FlatQuantModifier, load_flatquant_model
from flatquant_modifier.ascend import save_ascend_checkpoint
from flatquant_modifier.ascend.export import AscendExportError
from flatquant_modifier.ascend.runtime import AscendW4A4MXFP4FlatQuantLinear
from flatquant_modifier.transform import get_flatquant_transform
from flatquant_modifier.mappings import LLAMA_MAPPINGS
from flatquant_modifier.plan import plan_layers
from tests.conftest import (
    TINY_MXFP4,
    build_tiny_llama,
    byte_tokenizer,
    load_tiny,
    save_tiny_llama,
)
from tests.helpers import WEIGHTS_W4, assert_same_function, exact_logits, logits, run

MXFP4_SIZES = TINY_MXFP4


def mxfp4_recipe(**kwargs):
    return [FlatQuantModifier(quant_format="mxfp4", epochs=2, **kwargs),
            QuantizationModifier(targets=["Linear"], ignore=["lm_head"], scheme="MXFP4A16")]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """The tiny Llama after FlatQuant MXFP4 (max_supported_tp=4) in float64."""
    path = save_tiny_llama(tmp_path_factory.mktemp("mxfp4") / "model", **MXFP4_SIZES)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    run(model, byte_tokenizer(), mxfp4_recipe())
    model.to(torch.float32)
    return model


def test_row_parallel_transforms_are_block_diagonal(calibrated):
    layer = calibrated.model.layers[0]
    q, o, down = (get_flatquant_transform(m) for m in
                  (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj))
    # vllm-ascend's sizes: column 256 -> 16 x 16; row 256 at max_supported_tp 4 -> 32 x 8
    # (64 = 8 x 8 per rank), row 512 -> 32 x 16
    assert (q.left_trans.shape[0], q.right_trans.shape[0], q.left_blocks) == (16, 16, 1)
    assert (o.left_trans.shape[0], o.right_trans.shape[0], o.left_blocks) == (32, 8, 4)
    assert (down.left_trans.shape[0], down.right_trans.shape[0], down.left_blocks) == (32, 16, 4)
    left = o.left_trans
    for i in range(4):
        for j in range(4):
            block = left[8 * i:8 * (i + 1), 8 * j:8 * (j + 1)]
            assert (block.abs().sum() > 0) == (i == j)
    assert torch.all(q.clip_ratio == 1.0)  # no activation clip in the FP4 kernels


def test_export_computes_the_fake_quantized_model(calibrated, tmp_path):
    save_ascend_checkpoint(calibrated, tmp_path / "ascend", byte_tokenizer())
    description = json.loads((tmp_path / "ascend" / "quant_model_description.json").read_text())
    assert description["model_quant_type"] == "W4A4_MXFP4_FLATQUANT"
    assert description["group_size"] == 32 and description["max_supported_tp"] == 4
    assert description["model.layers.0.self_attn.o_proj.weight"] == "W4A4_MXFP4_FLATQUANT"
    assert description["lm_head.weight"] == "FLOAT"
    config = json.loads((tmp_path / "ascend" / "config.json").read_text())
    assert config["quantize"] == "w4a4_mxfp4_flatquant"
    tensors = load_file(tmp_path / "ascend" / "model.safetensors")
    prefix = "model.layers.0.mlp.down_proj."
    assert tensors[prefix + "weight"].dtype == torch.uint8
    assert tensors[prefix + "weight"].shape == (256, 256)
    assert tensors[prefix + "weight_scale"].shape == (256, 16)
    assert tensors[prefix + "weight_scale"].dtype == torch.uint8
    assert tensors[prefix + "left_trans"].shape == (32, 32)
    assert tensors[prefix + "clip_ratio"].tolist() == [1.0]
    assert_same_function(tmp_path / "ascend", exact_logits(calibrated))


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("proj", ["self_attn.o_proj", "mlp.down_proj"])
def test_each_rank_keeps_its_diagonal_block(calibrated, tmp_path, tp, proj):
    """A row-parallel linear at TP 2 and 4, as vllm-ascend shards it: rank r gets its
    input columns (weight bytes and scales), the whole left_trans (it keeps its
    diagonal block) and right_trans; the partial outputs sum to the TP 1 output."""
    directory = tmp_path / "ascend"
    save_ascend_checkpoint(calibrated, directory, byte_tokenizer())
    tensors = load_file(directory / "model.safetensors")
    prefix = f"model.layers.1.{proj}."
    out, half = tensors[prefix + "weight"].shape
    in_features = 2 * half

    def rank_linear(rank, size):
        linear = AscendW4A4MXFP4FlatQuantLinear(
            in_features // size, out, params_dtype=torch.float64, row_parallel=True,
            tp_size=size, tp_rank=rank, max_supported_tp=4,
        )
        share = slice(rank * in_features // size, (rank + 1) * in_features // size)
        with torch.no_grad():
            linear.weight.copy_(tensors[prefix + "weight"][:, share.start // 2:share.stop // 2])
            linear.weight_scale.copy_(tensors[prefix + "weight_scale"][:, share.start // 32:share.stop // 32])
            for key in ("left_trans", "right_trans", "clip_ratio"):
                getattr(linear, key).copy_(tensors[prefix + key])
        linear.process_weights_after_loading()
        return linear, share

    x = torch.randn(5, in_features, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    whole, _ = rank_linear(0, 1)
    expected = whole(x)
    partial = sum(linear(x[:, share]) for linear, share in
                  (rank_linear(r, tp) for r in range(tp)))
    torch.testing.assert_close(partial, expected, atol=1e-9, rtol=0)
    # and TP 1 is the in-memory linear (transform, MX activations, MXFP4 weights)
    module = calibrated.model.layers[1].get_submodule(proj)
    with torch.no_grad():
        ours = module.to(torch.float64)(x)
    module.to(torch.float32)
    torch.testing.assert_close(expected, ours, atol=1e-9, rtol=0)


def test_compressed_tensors_round_trip(calibrated, tmp_path):
    calibrated.save_pretrained(tmp_path / "ct", save_compressed=True)
    byte_tokenizer().save_pretrained(tmp_path / "ct")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    groups = config["quantization_config"]["transform_config"]["config_groups"]
    assert sorted(groups) == ["flatquant", "flatquant_block128", "flatquant_block64"]
    assert {g["type"] for g in groups.values()} == {"flatquant-mxfp4"}
    reloaded = load_flatquant_model(tmp_path / "ct", dtype=torch.float32)
    torch.testing.assert_close(logits(reloaded), logits(calibrated), atol=1e-5, rtol=0)
    # the reloaded model exports the same checkpoint
    save_ascend_checkpoint(reloaded, tmp_path / "again", byte_tokenizer())
    save_ascend_checkpoint(calibrated, tmp_path / "first", byte_tokenizer())
    first, again = (load_file(tmp_path / d / "model.safetensors") for d in ("first", "again"))
    assert first.keys() == again.keys()
    for key in first:
        assert torch.equal(first[key], again[key]), key


def test_export_refuses_a_dense_row_transform(calibrated, tmp_path):
    transform = get_flatquant_transform(calibrated.model.layers[0].self_attn.o_proj)
    saved = transform.left_trans.detach().clone()
    with torch.no_grad():
        transform.left_trans[0, -1] = 0.5
    try:
        with pytest.raises(AscendExportError, match="not block diagonal"):
            save_ascend_checkpoint(calibrated, tmp_path / "ascend", byte_tokenizer())
    finally:
        with torch.no_grad():
            transform.left_trans.copy_(saved)
    assert not (tmp_path / "ascend").exists()


def test_int_weights_are_refused_at_calibration_start(tmp_path):
    model, tok = load_tiny(save_tiny_llama(tmp_path / "model", **MXFP4_SIZES))
    recipe = [FlatQuantModifier(quant_format="mxfp4", epochs=1),
              QuantizationModifier(ignore=["lm_head"], config_groups={
                  "g": {"targets": ["Linear"], "weights": WEIGHTS_W4}})]
    with pytest.raises(ValueError, match="MXFP4A16"):
        run(model, tok, recipe)


@pytest.mark.parametrize("tp, int8", [(4, ["o_proj", "down_proj"]), (1, [])])
def test_sizes_no_rank_split_can_serve_fall_back(tp, int8):
    """The default tiny Llama (hidden 64, intermediate 128): the inputs of o_proj and
    down_proj do not split into 4 rank shares of multiples of 64, so they fall back to
    W8A8_DYNAMIC; with max_supported_tp=1 every linear is MXFP4."""
    model = build_tiny_llama()
    layers = [(f"model.layers.{i}", layer) for i, layer in enumerate(model.model.layers)]
    [plan, _] = plan_layers(layers, LLAMA_MAPPINGS, ["lm_head"], [], "w8a8_dynamic",
                            ascend=True, nvfp4=False, max_supported_tp=tp)
    assert [name.rpartition(".")[2] for name, _ in plan.int8] == int8
    assert len(plan.groups) == 4 - len(int8)
