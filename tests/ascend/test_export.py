"""Export to the Ascend layout (W4A4_FLATQUANT_DYNAMIC, W8A8_DYNAMIC, FLOAT per
tensor) and load it back through the references of vllm-ascend's linear methods."""

import json

import pytest
import torch
from safetensors import safe_open

from flatquant_modifier import FlatQuantModifier
from flatquant_modifier.ascend import AscendExportError, save_ascend_checkpoint
from flatquant_modifier.transform import get_flatquant_transform
from flatquant_modifier.transform import get_dynamic_int8_quant
from tests.conftest import build_tiny_llama, byte_tokenizer, load_tiny
from tests.helpers import (
    assert_round_trips,
    assert_same_function,
    description_of_layer0,
    exact_logits,
    mixed_weight_quantizer,
    run,
    weight_quantizer,
)

LINEAR_TENSORS = {"weight", "weight_scale", "weight_offset", "left_trans", "right_trans",
                  "clip_ratio"}


@pytest.fixture()
def quantized(tiny_llama_dir):
    model, tok = load_tiny(tiny_llama_dir)
    run(model, tok, [FlatQuantModifier(epochs=2), weight_quantizer()])
    return model, tok


def _tensors(directory):
    out = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(file, "pt") as reader:
            out.update({k: reader.get_tensor(k) for k in reader.keys()})
    return out


def test_export_layout_and_reference_logits(quantized, tmp_path):
    model, tok = quantized
    reference = exact_logits(model)
    out = save_ascend_checkpoint(model, tmp_path / "ascend", tok)
    tensors = _tensors(out)
    description = json.loads((out / "quant_model_description.json").read_text())
    assert description.pop("model_quant_type") == "W4A4_FLATQUANT_DYNAMIC"
    assert description.pop("version")
    assert set(description) == set(tensors)  # every tensor, nothing else
    down = "model.layers.1.mlp.down_proj"
    assert {k for k in description if k.startswith(down + ".")} == {
        f"{down}.{t}" for t in LINEAR_TENSORS
    }
    assert all(description[f"{down}.{t}"] == "W4A4_FLATQUANT_DYNAMIC" for t in LINEAR_TENSORS)
    assert description["model.embed_tokens.weight"] == "FLOAT"
    assert description["lm_head.weight"] == "FLOAT"
    assert description["model.layers.0.input_layernorm.weight"] == "FLOAT"
    w = tensors[f"{down}.weight"]
    assert w.dtype == torch.int8 and w.shape == (64, 128)
    assert int(w.min()) >= -8 and int(w.max()) <= 7
    assert tensors[f"{down}.weight_scale"].shape == (64, 1)
    assert tensors[f"{down}.weight_scale"].dtype == torch.float32
    assert torch.equal(tensors[f"{down}.weight_offset"], torch.zeros(64, 1))
    assert tensors[f"{down}.left_trans"].shape == (8, 8)
    assert tensors[f"{down}.right_trans"].shape == (16, 16)
    clip = tensors[f"{down}.clip_ratio"]
    assert clip.shape == (1,) and clip.dtype == torch.float32 and 0 < clip.item() <= 1
    # weight * scale is exactly the fake-quantized weight llm-compressor evaluated
    module = model.get_submodule(down)
    torch.testing.assert_close(
        w.float() * tensors[f"{down}.weight_scale"],
        torch.clamp(torch.round(module.weight / module.weight_scale), -8, 7) * module.weight_scale,
    )
    config = json.loads((out / "config.json").read_text())
    assert config["quantize"] == "w4a4_flatquant_dynamic" and "quantization_config" not in config
    # fused siblings carry identical per-tensor parameters
    for t in ("left_trans", "right_trans", "clip_ratio"):
        q = tensors[f"model.layers.0.self_attn.q_proj.{t}"]
        assert torch.equal(q, tensors[f"model.layers.0.self_attn.k_proj.{t}"])
        assert torch.equal(q, tensors[f"model.layers.0.self_attn.v_proj.{t}"])
    # evaluated through the reference of vllm-ascend's linear method
    assert_same_function(out, reference)
    assert not list(tmp_path.glob(".ascend.tmp-*"))


def test_sharded_export_has_an_index(quantized, tmp_path):
    model, tok = quantized
    out = save_ascend_checkpoint(model, tmp_path / "sharded", max_shard_size=200_000)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    description = json.loads((out / "quant_model_description.json").read_text())
    assert set(index["weight_map"]) == set(description) - {"model_quant_type", "version"}
    assert_same_function(out, exact_logits(model))


def _assert_refused(model, path, match):
    with pytest.raises(AscendExportError, match=match):
        save_ascend_checkpoint(model, path)
    assert not path.exists()
    assert not list(path.parent.glob(f".{path.name}.tmp-*"))


def test_bad_models_are_refused_and_nothing_is_written(quantized, tmp_path):
    model, _ = quantized
    attn = model.model.layers[0].self_attn
    k_left = get_flatquant_transform(attn.k_proj).left_trans
    saved = k_left.detach().clone()
    with torch.no_grad():
        k_left.add_(1e-3)
    _assert_refused(model, tmp_path / "a", r"q_proj and .*k_proj are fused into .*qkv_proj")
    with torch.no_grad():
        k_left.copy_(saved)
    clip = get_flatquant_transform(model.model.layers[1].mlp.down_proj).clip_ratio
    with torch.no_grad():
        clip.fill_(1.5)
    _assert_refused(model, tmp_path / "b", r"down_proj: clip_ratio 1.5 is outside \(0, 1\]")
    with torch.no_grad():
        clip.fill_(0.9)
        model.model.norm.weight[0] = float("nan")
    _assert_refused(model, tmp_path / "c", r"model.norm.weight contains NaN")


def test_in_features_not_divisible_by_8_and_unquantized_models_are_refused(quantized, tmp_path, tiny_llama_dir):
    model, _ = quantized
    down = model.model.layers[1].mlp.down_proj
    down.in_features = 124  # what a non-multiple-of-8 linear would report
    _assert_refused(model, tmp_path / "d", r"down_proj: in_features=124 is not divisible by 8")
    down.in_features = 128
    plain, _ = load_tiny(tiny_llama_dir)
    _assert_refused(plain, tmp_path / "e", "no FlatQuant transforms found")


def test_overwrite_needs_consent(quantized, tmp_path):
    model, _ = quantized
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_ascend_checkpoint(model, target)
    assert (target / "keep.txt").exists()
    save_ascend_checkpoint(model, target, overwrite=True)
    assert not (target / "keep.txt").exists()
    assert (target / "quant_model_description.json").exists()


def test_export_after_save_compressed_packed_the_model(quantized, tmp_path):
    # save_pretrained(save_compressed=True) packs the weights in place; the export
    # then reads the packed integers
    model, tok = quantized
    reference = exact_logits(model)
    model.save_pretrained(tmp_path / "ct", save_compressed=True)
    assert not hasattr(model.model.layers[0].self_attn.q_proj, "weight")
    out = save_ascend_checkpoint(model, tmp_path / "ascend", tok)
    assert_same_function(out, reference)


def test_tied_lm_head_is_described_and_saved(tmp_path):
    """vllm-ascend looks up lm_head.weight in the description even when it is tied."""
    from tests.conftest import build_tiny_llama, byte_tokenizer

    path = tmp_path / "tied"
    build_tiny_llama(tie_word_embeddings=True).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    model, tok = load_tiny(path)
    run(model, tok, [FlatQuantModifier(epochs=1), weight_quantizer()])
    reference = exact_logits(model)
    out = save_ascend_checkpoint(model, tmp_path / "ascend", tok)
    tensors = _tensors(out)
    description = json.loads((out / "quant_model_description.json").read_text())
    assert description["lm_head.weight"] == "FLOAT"
    assert set(description) - {"model_quant_type", "version"} == set(tensors)
    torch.testing.assert_close(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    assert_same_function(out, reference)


def test_mixed_precision_exports_w8a8_dynamic_for_o_and_down_proj(tiny_llama_dir, tmp_path):
    model, tok = load_tiny(tiny_llama_dir)
    int8 = ["re:.*self_attn\\.o_proj$", "re:.*mlp\\.down_proj$"]
    run(model, tok, [FlatQuantModifier(epochs=1, w8a8_dynamic=int8),
                     mixed_weight_quantizer(["o_proj", "down_proj"])])
    assert get_dynamic_int8_quant(model.model.layers[1].mlp.down_proj) is not None
    assert_round_trips(model, tok, tmp_path)
    w4a4, w8a8 = "W4A4_FLATQUANT_DYNAMIC", "W8A8_DYNAMIC"
    assert description_of_layer0(tmp_path / "ascend") == {
        "q_proj": w4a4, "k_proj": w4a4, "v_proj": w4a4, "o_proj": w8a8,
        "gate_proj": w4a4, "up_proj": w4a4, "down_proj": w8a8,
    }
    tensors = _tensors(tmp_path / "ascend")
    prefix = "model.layers.0.mlp.down_proj."
    assert {k[len(prefix):] for k in tensors if k.startswith(prefix)} == {
        "weight", "weight_scale", "weight_offset"
    }
    weight, scale = tensors[prefix + "weight"], tensors[prefix + "weight_scale"]
    assert weight.dtype == torch.int8 and weight.shape == (64, 128)
    assert weight.abs().max() > 100  # int8, not int4
    assert scale.dtype == torch.float32 and scale.shape == (64, 1)  # the model dtype


def test_undecomposable_sizes_fall_back_to_w8a8_dynamic(tmp_path):
    """intermediate 144 = 12 x 12: npu_kronecker_quant cannot take down_proj (as
    Qwen2.5-7B's 18944 = 128 x 148); it is served as W8A8_DYNAMIC, the rest exports."""
    build_tiny_llama(intermediate_size=144).save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    model, tok = load_tiny(tmp_path / "m")
    run(model, tok, [FlatQuantModifier(epochs=1), mixed_weight_quantizer(["down_proj"])])
    assert_round_trips(model, tok, tmp_path)
    kinds = description_of_layer0(tmp_path / "ascend")
    assert kinds.pop("down_proj") == "W8A8_DYNAMIC"
    assert set(kinds.values()) == {"W4A4_FLATQUANT_DYNAMIC"}


def test_quantized_linears_without_an_ascend_method_are_refused(tiny_llama_dir, tmp_path):
    # o_proj left out of FlatQuant but given int4 weights: W4A16, which vllm-ascend
    # has no linear method for; exported as FLOAT it would silently lose its quantization
    model, tok = load_tiny(tiny_llama_dir)
    def flatquant():
        return FlatQuantModifier(epochs=1, ignore=["lm_head", "re:.*o_proj$"])

    # in one recipe: refused at calibration start, before any training
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.o_proj gets 4-bit "
                       r"weights.*neither a FlatQuant transform nor an int8 input quantizer"):
        run(model, tok, [flatquant(), weight_quantizer()])
    # weights quantized by a later oneshot: refused by the export
    model, tok = load_tiny(tiny_llama_dir)
    run(model, tok, [flatquant()])
    run(model, tok, [weight_quantizer()])
    _assert_refused(model, tmp_path / "x", r"model.layers.0.self_attn.o_proj is quantized "
                    r".*neither a FlatQuant transform nor an int8 input quantizer")


def test_export_after_saving_in_an_unpacked_integer_format(tiny_llama_dir, tmp_path):
    # naive-quantized keeps int8 integers in `weight`: they are exported as they are
    model, tok = load_tiny(tiny_llama_dir)
    run(model, tok, [FlatQuantModifier(epochs=1, w8a8_dynamic=["re:.*o_proj$"]),
                     mixed_weight_quantizer(["o_proj"])])
    reference = exact_logits(model)
    model.save_pretrained(tmp_path / "ct", save_compressed=True,
                          quantization_format="naive-quantized")
    assert model.model.layers[0].self_attn.o_proj.weight.dtype == torch.int8
    save_ascend_checkpoint(model, tmp_path / "ascend", tok)
    assert_same_function(tmp_path / "ascend", reference)


def test_moe_blocks_vllm_ascend_cannot_serve_are_refused():
    """Routed experts of one block with different types, or a type vllm-ascend has no
    MoE method for; shared experts its int8 shared-expert path cannot run."""
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    from flatquant_modifier.ascend.export import _moe_block_types
    from tests.conftest import TINY

    config = Qwen2MoeConfig(**TINY, moe_intermediate_size=32, num_experts=2,
                            num_experts_per_tok=1, shared_expert_intermediate_size=64)
    model = linearize_moe(Qwen2MoeForCausalLM(config))
    block = "model.layers.1.mlp"
    routed = [f"{block}.experts.{e}.{p}_proj" for e in range(2) for p in ("gate", "up", "down")]
    shared = [f"{block}.shared_expert.{p}_proj" for p in ("gate", "up", "down")]
    int8 = dict.fromkeys(routed, "W8A8_DYNAMIC")
    assert _moe_block_types(model, int8) == {f"{block}.experts": "W8A8_DYNAMIC"}
    with pytest.raises(AscendExportError, match=r"mlp\.experts: .*one quant type, but "
                       r"they are \['FLOAT', 'W8A8_DYNAMIC'\]"):
        _moe_block_types(model, dict.fromkeys(routed[:3], "W8A8_DYNAMIC"))
    with pytest.raises(AscendExportError, match="no MoE method for"):
        _moe_block_types(model, dict.fromkeys(routed, "W4A4_FLATQUANT_DYNAMIC"))
    with pytest.raises(AscendExportError, match=r"shared_expert is W4A4_FLATQUANT_DYNAMIC"):
        _moe_block_types(model, {**int8, **dict.fromkeys(shared, "W4A4_FLATQUANT_DYNAMIC")})
    with pytest.raises(AscendExportError, match="does not apply the shared expert's sigmoid"):
        _moe_block_types(model, {**int8, **dict.fromkeys(shared, "W8A8_DYNAMIC")})
