import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from flatquant_modifier.mappings import (
    FlatQuantMapping,
    infer_mappings_from_model,
    resolve_layer,
)
from tests.conftest import build_tiny_llama


def test_llama_layer_resolves_four_groups():
    model = build_tiny_llama()
    mappings = infer_mappings_from_model(model)
    groups = resolve_layer("model.layers.0", model.model.layers[0], mappings, ["lm_head"])
    assert [g.name for g in groups] == [
        "model.layers.0.qkv", "model.layers.0.o", "model.layers.0.gate_up", "model.layers.0.down"
    ]
    assert [n for n, _ in groups[0].linears] == [
        f"model.layers.0.self_attn.{p}_proj" for p in "qkv"
    ]
    assert (groups[0].m, groups[0].n) == (8, 8) and (groups[3].m, groups[3].n) == (8, 16)
    assert groups[0].smooth[0] == "model.layers.0.input_layernorm"
    assert groups[3].smooth[0] == "model.layers.0.mlp.up_proj"
    assert groups[0].smooth_index is None


def test_gqa_smoothing_index_ties_repeated_kv_heads():
    # 4 heads of 16, 2 kv heads: o_proj input channel c reads v_proj channel
    # (head // 2) * 16 + c % 16
    model = build_tiny_llama()
    o = resolve_layer("l", model.model.layers[0], infer_mappings_from_model(model))[1]
    index = o.smooth_index
    assert index.shape == (64,) and int(index.max()) == 31
    assert index[:16].tolist() == list(range(16)) and index[16:32].tolist() == list(range(16))
    assert index[32:48].tolist() == list(range(16, 32))


def test_mistral_and_qwen_share_llama_mappings():
    config = MistralConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    assert len(infer_mappings_from_model(MistralForCausalLM(config))) == 4


def test_unknown_architecture_error_says_how_to_pass_mappings():
    class FancyForCausalLM(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="(?s)FancyForCausalLM.*NOT checked.*mappings"):
        infer_mappings_from_model(FancyForCausalLM())


def test_in_features_not_divisible_by_8_is_refused_naming_the_layer():
    model = build_tiny_llama(hidden_size=60, num_attention_heads=4, num_key_value_heads=2)
    layer, mappings = model.model.layers[0], infer_mappings_from_model(model)
    # the message names the whole group sharing the transform, and what works
    with pytest.raises(ValueError, match=r"q_proj has in_features=60.*Add \[.*q_proj', "
                       r"'.*k_proj', '.*v_proj'\] to `ignore` of FlatQuantModifier and of "
                       r"the weight quantizer"):
        resolve_layer("model.layers.0", layer, mappings)
    # following the advice for every group of size 60 leaves the one that fits
    ignore = ["re:.*self_attn.*", "re:.*gate_proj$", "re:.*up_proj$"]
    groups = resolve_layer("model.layers.0", layer, mappings, ignore)
    assert [g.name.split(".")[-1] for g in groups] == ["down"]


def test_prime_sizes_that_degenerate_are_refused():
    mapping = [FlatQuantMapping(name="p", targets=["re:.*proj$"])]
    layer = torch.nn.Module()
    layer.proj = torch.nn.Linear(127, 4)
    with pytest.raises(ValueError, match=r"127 of x.proj.*1 x 127.*ignore"):
        resolve_layer("x", layer, mapping)
    layer.proj = torch.nn.Linear(1016, 4)  # 8 * 127: unbalanced but fine
    assert (resolve_layer("x", layer, mapping)[0].m, resolve_layer("x", layer, mapping)[0].n) == (4, 254)


def test_unmatched_mapping_and_partial_ignore_are_errors():
    model = build_tiny_llama()
    layer = model.model.layers[0]
    with pytest.raises(ValueError, match="matched no module in layer L"):
        resolve_layer("L", layer, [FlatQuantMapping(name="x", targets=["re:.*nope$"])])
    mappings = infer_mappings_from_model(model)
    with pytest.raises(ValueError, match="list all of them or none"):
        resolve_layer("model.layers.0", layer, mappings, ["re:.*k_proj$"])
    groups = resolve_layer("model.layers.0", layer, mappings, ["re:.*mlp.*"])
    assert [g.name.split(".")[-1] for g in groups] == ["qkv", "o"]


def test_optional_mappings_skip_the_layers_without_their_modules():
    """DeepSeek-V3: a dense first layer (MLP mapped), then MoE layers (shared experts
    mapped, routed experts and kv_b_proj not)."""
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from tests.conftest import TINY

    config = DeepseekV3Config(**{**TINY, "num_key_value_heads": 4}, moe_intermediate_size=32,
                              n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                              first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32,
                              qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                              n_group=2, topk_group=1)
    model = linearize_moe(DeepseekV3ForCausalLM(config))
    mappings = infer_mappings_from_model(model)
    names = [[g.name.split(".")[-1] for g in resolve_layer(f"model.layers.{i}", layer, mappings)]
             for i, layer in enumerate(model.model.layers)]
    assert names == [["qkv_a", "q_b", "o", "gate_up", "down"],
                     ["qkv_a", "q_b", "o", "shared_gate_up", "shared_down"]]
    linears = {n for g in resolve_layer("model.layers.1", model.model.layers[1], mappings)
               for n, _ in g.linears}
    assert not any(".experts." in n or "kv_b_proj" in n for n in linears)
