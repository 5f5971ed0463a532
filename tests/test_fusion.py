"""Shared weight global scales of fused siblings (NVFP4) after FlatQuant."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from compressed_tensors.quantization import (
    QuantizationConfig,
    fake_quantize,
    apply_quantization_config,
    preset_name_to_scheme,
)
from llmcompressor.modifiers.quantization import QuantizationModifier
from torch import nn
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from flatquant_modifier import FlatQuantModifier
from flatquant_modifier.fusion import find_sibling_groups, fuse_global_scales
from flatquant_modifier.mappings import LLAMA_MAPPINGS
from tests.conftest import build_tiny_llama, load_tiny
from tests.helpers import logits, run

def _nvfp4(model, ignore=("lm_head",)):
    scheme = preset_name_to_scheme("NVFP4", ["Linear"])
    config = QuantizationConfig(config_groups={"g": scheme}, ignore=list(ignore))
    apply_quantization_config(model, config)
    return model


def _set_global_scales(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if hasattr(module, "weight_global_scale"):
            module.weight_global_scale.data = torch.rand(1, generator=g) * 100 + 1


def _scale(module):
    return module.weight_global_scale.item()


def test_regex_groups_equal_name_based_groups_on_llama():
    model = build_tiny_llama()
    groups = {tuple(n for n, _ in members) for _, members in find_sibling_groups(model)}
    expected = set()
    for i in range(2):
        p = f"model.layers.{i}"
        expected.add(tuple(f"{p}.self_attn.{x}_proj" for x in "qkv"))
        expected.add((f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"))
    assert groups == expected


def test_regex_groups_on_moe_and_mla_trees():
    config = Qwen3MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, num_experts=3,
        num_experts_per_tok=2, head_dim=16,
    )
    from llmcompressor.modeling.moe.linearize import linearize_moe

    moe = Qwen3MoeForCausalLM(config)
    linearize_moe(moe)
    groups = {tuple(sorted(n for n, _ in m)) for _, m in find_sibling_groups(moe)}
    for e in range(3):
        p = f"model.layers.0.mlp.experts.{e}"
        assert (f"{p}.gate_proj", f"{p}.up_proj") in groups  # per expert
    assert len(groups) == 1 + 3

    class MLA(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_a_proj, self.kv_a_proj_with_mqa = nn.Linear(64, 32), nn.Linear(64, 48)
            self.q_b_proj, self.o_proj = nn.Linear(32, 64), nn.Linear(64, 64)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = MLA()
            self.experts = nn.ModuleList(nn.Module() for _ in range(2))
            for expert in self.experts:
                expert.w1, expert.w2, expert.w3 = (nn.Linear(64, 32), nn.Linear(32, 64),
                                                   nn.Linear(64, 32))

    groups = {tuple(n for n, _ in m) for _, m in find_sibling_groups(Block())}
    assert groups == {
        ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
        ("experts.0.w1", "experts.0.w3"),
        ("experts.1.w1", "experts.1.w3"),
    }
    # a user pattern capturing a level above the expert index: one cross-expert group
    wrapper = nn.Module()
    wrapper.block = Block()
    groups = find_sibling_groups(wrapper, [r"(.*)\.experts\.\d+\.(?:w1|w3)"])
    assert {tuple(n for n, _ in m) for _, m in groups} == {
        ("block.experts.0.w1", "block.experts.0.w3", "block.experts.1.w1", "block.experts.1.w3")
    }


def test_fuse_global_scales_recomputes_group_scales():
    model = _nvfp4(build_tiny_llama())
    with torch.no_grad():  # k_proj's amax 4x smaller: its global scale 4x larger
        model.model.layers[0].self_attn.k_proj.weight.mul_(0.25)
    # qparams as a min-max observer would compute them, then unfused global scales
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    for module in model.modules():
        if hasattr(module, "weight_global_scale"):
            w = module.weight.detach()
            g = generate_gparam(w.min(), w.max())
            grouped = w.unflatten(-1, (-1, 16))
            s, z = calculate_qparams(grouped.amin(-1), grouped.amax(-1),
                                     module.quantization_scheme.weights, global_scale=g)
            module.weight_global_scale.data = g.reshape(1)
            module.weight_scale.data, module.weight_zero_point.data = s, z
    attn = model.model.layers[0].self_attn
    k = attn.k_proj
    before, old_group_scales = _dequantized(k), k.weight_scale.clone()
    assert fuse_global_scales(model) == 4
    assert _scale(attn.q_proj) == _scale(k) == _scale(attn.v_proj)
    # the group scales follow the new global scale: the quantization error stays
    # what it was (the FP8 rounding of the group scales changes a little) ...
    w = k.weight.detach()
    error_before = (before - w).norm() / w.norm()
    error_after = (_dequantized(k) - w).norm() / w.norm()
    assert error_after < 1.5 * error_before, (error_before, error_after)
    # ... whereas the old group scales against the new global scale give a 4x finer
    # grid that saturates most of the weight
    stale = fake_quantize(k.weight, old_group_scales, k.weight_zero_point,
                          k.quantization_scheme.weights, global_scale=k.weight_global_scale)
    assert (stale - w).norm() / w.norm() > 2 * error_before


def _dequantized(module):
    return fake_quantize(
        module.weight, module.weight_scale, module.weight_zero_point,
        module.quantization_scheme.weights, global_scale=module.weight_global_scale,
    )


def test_flatquant_then_nvfp4_shares_scales(tiny_llama_dir):
    model, tok = load_tiny(tiny_llama_dir)
    recipe = [
        FlatQuantModifier(epochs=1, quant_format="nvfp4"),
        QuantizationModifier(targets=["Linear"], scheme="NVFP4", ignore=["lm_head"]),
    ]
    run(model, tok, recipe)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert _scale(attn.q_proj) == _scale(attn.k_proj) == _scale(attn.v_proj)
        assert _scale(mlp.gate_proj) == _scale(mlp.up_proj)
    assert torch.isfinite(logits(model)).all()


def test_flatquant_then_nvfp4_on_moe_shares_per_expert(tmp_path):
    from tests.conftest import byte_tokenizer

    config = Qwen3MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
        num_experts_per_tok=2, head_dim=16, max_position_embeddings=256,
    )
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(config).save_pretrained(tmp_path / "moe")
    byte_tokenizer().save_pretrained(tmp_path / "moe")
    model, tok = load_tiny(tmp_path / "moe")
    attention_only = [m for m in LLAMA_MAPPINGS if m.name in ("qkv", "o")]
    recipe = [
        FlatQuantModifier(epochs=1, quant_format="nvfp4", mappings=attention_only),
        QuantizationModifier(targets=["Linear"], scheme="NVFP4",
                             ignore=["lm_head", "re:.*mlp.gate$"]),
    ]
    run(model, tok, recipe)
    for layer in model.model.layers:
        attn = layer.self_attn
        assert _scale(attn.q_proj) == _scale(attn.k_proj) == _scale(attn.v_proj)
        experts = [m for m in layer.mlp.experts.modules() if hasattr(m, "gate_proj")]
        assert len(experts) == 4
        for expert in experts:
            assert _scale(expert.gate_proj) == _scale(expert.up_proj)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _nvfp4(build_tiny_llama(seed=0))
        _set_global_scales(model, seed=100 + rank)  # different weights per rank
        before = {n: m.weight_global_scale.clone() for n, m in model.named_modules()
                  if hasattr(m, "weight_global_scale")}
        fuse_global_scales(model)
        after = {n: m.weight_global_scale.clone() for n, m in model.named_modules()
                 if hasattr(m, "weight_global_scale")}
        torch.save({"before": before, "after": after}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_end_with_the_same_shared_scale(tmp_path):
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for i in range(2):
        for members in (
            [f"model.layers.{i}.self_attn.{x}_proj" for x in "qkv"],
            [f"model.layers.{i}.mlp.gate_proj", f"model.layers.{i}.mlp.up_proj"],
        ):
            # MAX rule on amax = MIN on global scales, over siblings and ranks
            expected = min(r[("before")][n].item() for r in (r0, r1) for n in members)
            for r in (r0, r1):
                assert [r["after"][n].item() for n in members] == [expected] * len(members)
        o = f"model.layers.{i}.self_attn.o_proj"
        assert r0["after"][o] == r0["before"][o]  # not a sibling: untouched
