"""
The last decoder layer's loss measured where its output goes: the mean squared error
of the logits it gives through the model's final RMSNorm and ``lm_head``
(:attr:`FlatQuantOptions.last_layer_loss` ``="logits"``).

With ``n(h)`` the final norm (weight ``w``) and ``W`` the ``[vocab, hidden]`` head,

    mean_v (W n(h) - W n(t))_v^2 = mean_j ((n0(h) - n0(t)) diag(w) L)_j^2

where ``n0`` is the norm without its weight and ``L L^T = hidden W^T W / vocab``
(Cholesky). So the loss is an MSE after one ``hidden x hidden`` matrix, exact, without
computing a single vocabulary-size logit (128 k per token at Llama-3's vocabulary).
"""

import torch
from compressed_tensors.utils import align_module_device
from torch.nn import Module

__all__ = ["LogitsLoss", "logits_loss"]


class LogitsLoss:
    """
    MSE of the logits of two batches of final hidden states (see the module docstring):
    ``projection = diag(w) L`` and the final norm's ``eps``.
    """

    def __init__(self, projection: torch.Tensor, eps: float):
        self.projection = projection
        self.eps = eps

    def __call__(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # the projection's precision, not autocast's: the loss is a small difference
        with torch.autocast(out.device.type, enabled=False):
            dtype = self.projection.dtype
            difference = (_rms_normalised(out.to(dtype), self.eps)
                          - _rms_normalised(target.to(dtype), self.eps))
            return (difference @ self.projection).square().mean()


def _rms_normalised(hidden: torch.Tensor, eps: float) -> torch.Tensor:
    """The final RMSNorm without its weight."""
    return hidden * torch.rsqrt(hidden.square().mean(-1, keepdim=True) + eps)


def _final_norm(model: Module) -> tuple[Module, float]:
    """The model's final norm and its epsilon."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    norm = getattr(decoder, "norm", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if norm is None or getattr(norm, "weight", None) is None or eps is None:
        raise ValueError(
            f"last_layer_loss='logits' needs the final RMSNorm of {type(model).__name__} "
            "as the `norm` of model.get_decoder() (with a weight and an epsilon); none "
            "was found. Use last_layer_loss='layer' for this architecture."
        )
    return norm, float(eps)


@torch.no_grad()
def logits_loss(
    model: Module, device: torch.device, dtype: torch.dtype, chunk: int = 8192
) -> LogitsLoss:
    """
    The :class:`LogitsLoss` of ``model`` on ``device`` (its matrix in ``dtype``).
    ``W^T W`` is summed in float64 over ``chunk`` vocabulary rows at a time.

    :raises ValueError: the model has no final RMSNorm this loss can reproduce (checked
        against the norm module itself on a probe), or no output embedding
    """
    norm, eps = _final_norm(model)
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"last_layer_loss='logits': {type(model).__name__} has no "
                         "output embedding (lm_head); use last_layer_loss='layer'")
    with align_module_device(head, device):
        weight = head.weight.detach()
        gram = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float64,
                           device=device)
        for rows in weight.split(chunk):
            rows = rows.to(device=device, dtype=torch.float64)
            gram += rows.T @ rows
    gram *= weight.shape[1] / weight.shape[0]
    lower, info = torch.linalg.cholesky_ex(gram)
    if info:  # a rank-deficient head: a tiny ridge keeps the factorisation defined
        ridge = 1e-10 * gram.diagonal().mean().clamp_min(1e-30)
        lower = torch.linalg.cholesky(gram + ridge * torch.eye(len(gram), dtype=gram.dtype,
                                                               device=device))
    with align_module_device(norm, device):
        norm_weight = norm.weight.detach().to(device=device, dtype=torch.float64)
        probe = torch.randn(4, len(norm_weight), dtype=torch.float64, device=device,
                            generator=torch.Generator(device).manual_seed(0)) * 3.0
        expected = norm(probe.to(norm.weight.dtype)).double()
    reproduced = _rms_normalised(probe, eps) * norm_weight
    tolerance = 1e-2 if norm.weight.dtype in (torch.bfloat16, torch.float16) else 1e-4
    if not torch.allclose(reproduced, expected, rtol=tolerance, atol=tolerance):
        raise ValueError(
            f"last_layer_loss='logits': the final norm of {type(model).__name__} "
            f"({type(norm).__name__}) is not x * rsqrt(mean(x^2) + eps) * weight, which "
            "this loss computes; use last_layer_loss='layer' for this architecture"
        )
    return LogitsLoss((norm_weight[:, None] * lower).to(dtype), eps)
