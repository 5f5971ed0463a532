"""The routed experts as grouped GEMMs while FlatQuant trains an MoE layer."""

import pytest
import torch
from llmcompressor.modeling.moe.linearize import linearize_moe
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from flatquant_modifier.experts import GroupedExperts, grouped_experts
from tests.conftest import TINY_QWEN3_MOE


def _experts(dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    config = Qwen3MoeConfig(**{**TINY_QWEN3_MOE, "num_experts": 8, "mlp_only_layers": []})
    model = Qwen3MoeForCausalLM(config).to(device=device, dtype=dtype)
    model.config.dtype = dtype  # llm-compressor builds the per-expert linears in it
    return linearize_moe(model).model.layers[0].mlp.experts


def test_grouped_experts_compute_the_linearized_experts():
    """The routed experts as two grouped GEMMs (FlatQuant's targets and training on
    CUDA) give llm-compressor's per-expert loop's outputs and input gradients."""
    experts = _experts()
    x = torch.randn(40, 64, requires_grad=True)
    index = torch.stack([torch.randperm(8)[:2] for _ in range(40)])
    index[:, 0] = index[:, 0].clamp(max=5)  # experts 6 and 7 get fewer tokens
    weights = torch.rand(40, 2)
    reference = experts(x, index, weights)
    (grad_ref,) = torch.autograd.grad(reference.square().sum(), x)
    out = GroupedExperts(experts)(x, index, weights)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, grad_ref, atol=1e-6, rtol=1e-5)



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_in_bfloat16_the_layer_runs_grouped_experts_and_gets_its_own_back():
    experts = _experts(torch.bfloat16, "cuda")
    layer = torch.nn.Module()
    layer.experts = experts
    x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    index = torch.randint(0, 8, (64, 2), device="cuda")
    weights = torch.rand(64, 2, device="cuda", dtype=torch.bfloat16)
    reference = experts(x, index, weights).float()
    with grouped_experts(layer):
        assert isinstance(layer.experts, GroupedExperts)
        out = layer.experts(x, index, weights).float()
    assert layer.experts is experts
    assert ((out - reference).norm() / reference.norm()).item() < 1e-2
