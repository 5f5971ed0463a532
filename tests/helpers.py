"""Helpers shared by the tests: a oneshot run on the tiny model, its W4 weight
quantizer, logits on fixed tokens, and the check that an Ascend checkpoint computes
the fake-quantized model's function, the log lines of a block."""

import contextlib
import json

import torch
from compressed_tensors.utils import get_execution_device
from loguru import logger
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier

from examples.common.evaluation import exact_fake_quant
from flatquant_modifier import load_flatquant_model
from flatquant_modifier.ascend import load_ascend_model, save_ascend_checkpoint
from tests.conftest import random_token_dataset

WEIGHTS_W4 = {
    "num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel", "observer": "minmax"
}


WEIGHTS_W8 = {**WEIGHTS_W4, "num_bits": 8}


@contextlib.contextmanager
def log_messages(level: str = "WARNING"):
    """The loguru messages of at least ``level`` logged within the block (a list,
    filled as they come)."""
    messages = []
    handle = logger.add(messages.append, level=level)
    try:
        yield messages
    finally:
        logger.remove(handle)


def mixed_weight_quantizer(int8: list[str], **kwargs):
    """int8 per-channel weights for the projections named in ``int8`` (e.g.
    ``["o_proj", "down_proj"]``), int4 per channel for the other projections of the
    decoder layers: the weights of a mixed W4A4 / W8A8_DYNAMIC model."""
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    int4 = [n for n in names if n not in int8]
    return QuantizationModifier(
        ignore=["lm_head"],
        config_groups={
            "w4": {"targets": [f"re:.*\\.{n}$" for n in int4], "weights": WEIGHTS_W4},
            "w8": {"targets": [f"re:.*\\.{n}$" for n in int8], "weights": WEIGHTS_W8},
        },
        **kwargs,
    )


def weight_quantizer(**kwargs):
    return QuantizationModifier(
        ignore=["lm_head"],
        config_groups={"group_0": {"targets": ["Linear"], "weights": WEIGHTS_W4}},
        **kwargs,
    )


def run(model, tok, recipe, num_samples=8, seq_len=32, **kwargs):
    torch.manual_seed(0)
    oneshot(
        model=model,
        processor=tok,
        dataset=random_token_dataset(num_samples, seq_len),
        recipe=recipe,
        num_calibration_samples=num_samples,
        max_seq_length=seq_len,
        **kwargs,
    )
    return model


def logits(model, seed=1):
    """Logits of fixed random tokens, on the CPU (from any placement of ``model``)."""
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(seed))
    device = get_execution_device(model.get_input_embeddings())
    with torch.no_grad():
        return model(ids.to(device)).logits.cpu()


def exact_logits(model):
    """Logits of the fake-quantized model in exact arithmetic (see exact_fake_quant)."""
    with exact_fake_quant(model) as exact:
        return logits(exact)


def assert_same_function(directory, reference):
    """
    The Ascend checkpoint, run in float64 through the reference of vllm-ascend's
    linear method, gives the logits of the fake-quantized model in float64: the same
    function up to float64 rounding. (In float32 the two differ by rounding flips of
    4-bit values, which depend on the CPU's kernels.)
    """
    ascend = load_ascend_model(directory, dtype=torch.float64)
    torch.testing.assert_close(logits(ascend), reference, atol=1e-9, rtol=0)


def layer_calls(model, layer, ids):
    """The call arguments of ``layer`` when ``model`` runs each row of ``ids`` (as
    FlatQuantModifier caches them: one dict per call, no KV cache)."""
    calls = []

    def capture(_module, args, kwargs):
        # hidden_states first, as the modifier binds a call to the forward's signature
        call = {"hidden_states": args[0] if args else kwargs["hidden_states"]}
        call.update((k, v) for k, v in kwargs.items() if k != "hidden_states")
        call.pop("past_key_values", None)
        calls.append({k: v.detach() if isinstance(v, torch.Tensor) else v
                      for k, v in call.items()})

    handle = layer.register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        for row in ids:
            model(row.unsqueeze(0))
    handle.remove()
    return calls


def description_of_layer0(directory):
    description = json.loads((directory / "quant_model_description.json").read_text())
    return {
        key.split(".")[-2]: kind for key, kind in description.items()
        if key.startswith("model.layers.0.") and key.endswith("_proj.weight")
    }


def assert_round_trips(model, tok, tmp_path):
    """in memory == compressed-tensors reload (float32) == Ascend export through the
    references of vllm-ascend's methods (float64)"""
    reference = exact_logits(model)
    model.save_pretrained(tmp_path / "ct", save_compressed=True)
    tok.save_pretrained(tmp_path / "ct")
    torch.testing.assert_close(logits(load_flatquant_model(tmp_path / "ct")), logits(model),
                               atol=1e-5, rtol=0)
    save_ascend_checkpoint(model, tmp_path / "ascend", tok)
    assert_same_function(tmp_path / "ascend", reference)
