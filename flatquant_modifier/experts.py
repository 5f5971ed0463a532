"""
The routed experts of an MoE decoder layer while FlatQuant computes its targets and
trains its transforms.

llm-compressor unpacks a block's fused experts into one linear per expert
(``LinearExperts2D``) and runs them in a Python loop over the experts: at Qwen3-30B-A3B's
128 experts the kernel launches of that loop dominate a training step, and its
data-dependent shapes keep the step from being captured as a CUDA graph. The experts
are not quantized during training (their int8 input quantizers come after), so
:func:`grouped_experts` runs each block as two grouped GEMMs
(``torch.nn.functional.grouped_mm``) on the experts' stacked weights: the same function,
without a host synchronisation. Written here because llm-compressor's own repacking
(``to_experts_module``) re-offloads the weights it stacks, which a training step would
then copy to the GPU at every forward.
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GroupedExperts", "grouped_experts", "supports_grouped_experts"]


class GroupedExperts(nn.Module):
    """
    A ``LinearExperts2D`` (gated, no biases) as two grouped GEMMs: ``gate_up`` [E, H, 2I]
    and ``down`` [E, I, H], stacked copies of its experts' weights; its own gate
    (``_apply_gate``: act(gate) * up). Called as the experts are:
    ``experts(hidden_states, top_k_index, top_k_weights)``.
    """

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.num_experts = experts.num_experts
        self.apply_gate = experts._apply_gate
        members = [experts[i] for i in range(self.num_experts)]
        with torch.no_grad():
            self.register_buffer("gate_up", torch.stack([
                torch.cat([m.gate_proj.weight, m.up_proj.weight]).t() for m in members
            ]).contiguous(), persistent=False)
            self.register_buffer("down", torch.stack(
                [m.down_proj.weight.t() for m in members]
            ).contiguous(), persistent=False)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        top_k = top_k_index.shape[-1]
        expert_ids = top_k_index.reshape(-1)
        order = torch.argsort(expert_ids, stable=True)
        tokens = order // top_k
        # histc, not bincount: no host synchronisation (bincount sizes its output)
        counts = torch.histc(
            expert_ids.int() if expert_ids.is_cuda else expert_ids.float(),
            bins=self.num_experts, min=0, max=self.num_experts - 1,
        )
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        x = hidden_states[tokens].to(self.gate_up.dtype)
        h = self.apply_gate(F.grouped_mm(x, self.gate_up, offs=offsets))
        y = F.grouped_mm(h.to(self.down.dtype), self.down, offs=offsets)
        y = y * top_k_weights.reshape(-1)[order, None].to(y.dtype)
        out = torch.zeros_like(hidden_states)
        return out.index_add_(0, tokens, y.to(out.dtype))


def supports_grouped_experts(experts: nn.Module) -> bool:
    """Whether ``experts`` is llm-compressor's ``LinearExperts2D`` of a gated block
    without biases, on CUDA in bfloat16 (the grouped GEMM's kernels)."""
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D

    if not isinstance(experts, LinearExperts2D) or not experts.has_gate or experts.has_bias:
        return False
    weight = experts[0].gate_proj.weight
    return weight.is_cuda and weight.dtype == torch.bfloat16


@contextlib.contextmanager
def grouped_experts(layer: nn.Module):
    """Within the context, the routed experts of ``layer`` (onloaded) run as
    :class:`GroupedExperts`; the original modules are restored after."""
    swapped = [(name, module) for name, module in layer.named_modules()
               if supports_grouped_experts(module)]
    try:
        for name, module in swapped:
            layer.set_submodule(name, GroupedExperts(module))
        yield
    finally:
        for name, module in swapped:
            layer.set_submodule(name, module)
