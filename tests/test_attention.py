"""SDPA attention while FlatQuant trains a layer and in the pipeline's forwards of it
(llm-compressor forces eager)."""

import pytest
import torch
from compressed_tensors.utils import patch_attr

from flatquant_modifier import FlatQuantModifier
from flatquant_modifier.attention import (
    EagerCausalMask,
    PipelineAttention,
    attention_outputs,
    drop_causal_masks,
    training_attention,
)
from flatquant_modifier.emulation import same_output
from tests.conftest import build_tiny_llama, load_tiny
from tests.helpers import run


def test_pure_causal_masks_become_none_and_others_stay():
    causal = torch.full((5, 5), torch.finfo(torch.float32).min).triu(1)[None, None]
    padded = causal.clone()
    padded[..., 0] = torch.finfo(torch.float32).min  # first token is padding
    biased = causal + torch.tril(torch.ones(5, 5))  # ALiBi-like bias on allowed pairs
    boolean = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    steps = [[{"hidden_states": torch.zeros(1, 5, 4), "attention_mask": m}]
             for m in (causal, padded, biased, boolean, None)]
    masks = [batches[0]["attention_mask"] for batches in drop_causal_masks(steps)]
    assert masks[0] is None and masks[3] is None and masks[4] is None
    assert masks[1] is padded and masks[2] is biased


def _causal_steps(seq=16, batches=2):
    mask = torch.full((seq, seq), torch.finfo(torch.float32).min).triu(1)[None, None]
    model = build_tiny_llama()
    model.config._attn_implementation = "eager"  # as llm-compressor's calibration sets it
    rotary = model.model.rotary_emb
    steps = []
    for k in range(batches):
        hidden = torch.randn(2, seq, 64, generator=torch.Generator().manual_seed(k))
        position_ids = torch.arange(seq)[None]
        steps.append([{"hidden_states": hidden, "attention_mask": mask,
                       "position_ids": position_ids,
                       "position_embeddings": rotary(hidden, position_ids)}])
    return model, steps


def test_layers_train_with_sdpa_and_no_mask_when_that_is_the_same_function():
    model, steps = _causal_steps()
    layer = model.model.layers[0]
    with torch.no_grad():
        eager = layer(**steps[1][0])
    with training_attention(model, layer, steps, "sdpa") as used:
        assert model.config._attn_implementation == "sdpa"
        assert all(b["attention_mask"] is None for batches in used for b in batches)
        with torch.no_grad():
            torch.testing.assert_close(layer(**used[1][0]), eager, rtol=1e-4, atol=1e-5)
    assert model.config._attn_implementation == "eager"
    # a model loaded with eager attention keeps it
    with training_attention(model, layer, steps, "eager") as used:
        assert used is steps and model.config._attn_implementation == "eager"


def test_sdpa_is_refused_when_it_changes_the_layer_output():
    model, steps = _causal_steps()
    layer = model.model.layers[0]
    layer.self_attn.is_causal = False  # SDPA without a mask would attend everywhere
    with training_attention(model, layer, steps, "sdpa") as used:
        assert used is steps and model.config._attn_implementation == "eager"


def test_sdpa_is_refused_when_it_changes_the_output_with_the_explicit_mask(monkeypatch):
    # the pipeline's forwards (PipelineAttention) keep the explicit mask: the check
    # covers that form too
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def off_with_a_mask(module, query, key, value, attention_mask, **kwargs):
        output, weights = sdpa_attention_forward(module, query, key, value, attention_mask,
                                                 **kwargs)
        return (output if attention_mask is None else output * 1.1), weights

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._local_mapping, "sdpa", off_with_a_mask)
    model, steps = _causal_steps()
    layer = model.model.layers[0]
    with training_attention(model, layer, steps, "sdpa") as used:
        assert used is steps and model.config._attn_implementation == "eager"


def test_sdpa_is_kept_when_a_router_after_the_attention_changes_the_layer_output():
    # a MoE router sends some tokens to other experts on the rounding differences of two
    # attention kernels: the layer's output differs, its attention's does not
    model, steps = _causal_steps()
    layer = model.model.layers[0]

    class Router(torch.nn.Module):  # a step function of its input, as top-k routing
        def forward(self, hidden_states):
            return 10.0 * torch.remainder(torch.floor(hidden_states * 1e7), 2)

    layer.mlp = Router()
    with torch.no_grad():
        eager = layer(**steps[0][0])
        with patch_attr(model.config, "_attn_implementation", "sdpa"):
            sdpa = layer(**drop_causal_masks(steps)[0][0])
    assert not same_output(sdpa, eager)
    with training_attention(model, layer, steps, "sdpa") as used:
        assert model.config._attn_implementation == "sdpa"
        assert all(b["attention_mask"] is None for batches in used for b in batches)


def test_attention_outputs_are_the_attention_modules_or_else_the_layer():
    model, steps = _causal_steps()
    layer = model.model.layers[0]
    with torch.no_grad(), attention_outputs(layer) as compared:
        (attention,) = compared(lambda: layer(**steps[0][0]))
        kwargs = steps[0][0]
        expected = layer.self_attn(
            hidden_states=layer.input_layernorm(kwargs["hidden_states"]),
            attention_mask=kwargs["attention_mask"],
            position_embeddings=kwargs["position_embeddings"],
        )[0]
    torch.testing.assert_close(attention, expected)
    mlp = layer.mlp  # no attention module: the layer's own output
    hidden = torch.randn(2, 4, 64)
    with torch.no_grad(), attention_outputs(mlp) as compared:
        (out,) = compared(lambda: mlp(hidden))
        torch.testing.assert_close(out, mlp(hidden))
    assert not layer.self_attn._forward_hooks


def _attention_spy(model):
    """(layer index, attention implementation, batch) of every attention forward."""
    seen = []
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_pre_hook(
            lambda module, args, kwargs, index=index: seen.append(
                (index, model.config._attn_implementation, kwargs["hidden_states"].shape[0])),
            with_kwargs=True)
    return seen


def test_pipeline_forwards_use_sdpa_for_checked_layer_classes_and_restore_eager():
    model, steps = _causal_steps()
    layer = model.model.layers[0]
    seen = _attention_spy(model)
    attention = PipelineAttention(model, "sdpa")
    attention.attach(layer)
    kwargs = {**steps[0][0], "attention_mask": steps[0][0]["attention_mask"]}
    with torch.no_grad():
        eager = layer(**kwargs)  # no layer of its class checked yet
        attention.record(layer, True)
        sdpa = layer(**kwargs)  # the pipeline's mask, SDPA
        attention.record(layer, False)
        layer(**kwargs)
    assert [s[1] for s in seen] == ["eager", "sdpa", "eager"]
    assert model.config._attn_implementation == "eager"
    torch.testing.assert_close(sdpa, eager, rtol=1e-4, atol=1e-5)
    # a forward that raises still restores the implementation
    attention.record(layer, True)
    with pytest.raises(TypeError), torch.no_grad():
        layer(**{**kwargs, "position_embeddings": None})
    assert model.config._attn_implementation == "eager"
    # an implementation another modifier installed in place of eager (as
    # compressed-tensors does for attention quantization) is left alone
    from transformers import AttentionInterface
    from transformers.models.llama.modeling_llama import eager_attention_forward

    AttentionInterface.register("flatquant_test_hooked", eager_attention_forward)
    model.config._attn_implementation = "flatquant_test_hooked"
    with torch.no_grad():
        layer(**kwargs)
    assert seen[-1][1] == "flatquant_test_hooked"
    assert model.config._attn_implementation == "flatquant_test_hooked"
    model.config._attn_implementation = "eager"
    attention.detach()
    assert not layer._forward_pre_hooks and not layer._forward_hooks
    # a model loaded with eager attention is left to it
    eager_model = PipelineAttention(model, "eager")
    eager_model.attach(layer)
    assert not eager_model.enabled and not layer._forward_pre_hooks


def test_oneshot_runs_the_pipeline_passes_with_sdpa_once_a_layer_checked_it(tiny_llama_dir):
    model, tok = load_tiny(tiny_llama_dir)
    seen = _attention_spy(model)
    run(model, tok, [FlatQuantModifier(epochs=1, pipeline_sdpa=True)], num_samples=8,
        batch_size=8)
    # the pipeline's forwards take the whole batch of 8 (FlatQuant's steps take 4):
    # layer 0's calibration pass precedes any check, its propagation pass follows its
    # own; layer 1 follows layer 0's
    pipeline = [(index, implementation) for index, implementation, batch in seen
                if batch == 8]
    assert pipeline == [(0, "eager"), (0, "sdpa"), (1, "sdpa"), (1, "sdpa")]
    assert model.config._attn_implementation == "sdpa"
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks
               for layer in model.model.layers)


def _pipeline_hooks(layer) -> list:
    hooks = [*layer._forward_pre_hooks.values(), *layer._forward_hooks.values()]
    return [hook for hook in hooks if isinstance(getattr(hook, "__self__", None),
                                                 PipelineAttention)]


def _failing_layer(monkeypatch, index: int, error: Exception):
    import flatquant_modifier.modifier as modifier_module

    calibrate_layer = modifier_module.calibrate_layer

    def calibrate(model, name, *args, **kwargs):
        if name.endswith(f"layers.{index}"):
            raise error
        return calibrate_layer(model, name, *args, **kwargs)

    monkeypatch.setattr(modifier_module, "calibrate_layer", calibrate)


def test_a_skipped_layer_propagates_with_eager_attention(tiny_llama_dir, monkeypatch):
    from flatquant_modifier.train import NonFiniteLossError

    model, tok = load_tiny(tiny_llama_dir)
    seen = _attention_spy(model)
    _failing_layer(monkeypatch, 1, NonFiniteLossError("layer model.layers.1 became nan"))
    run(model, tok, [FlatQuantModifier(epochs=1, on_nonfinite="skip", pipeline_sdpa=True)],
        num_samples=8, batch_size=8)
    pipeline = [(index, implementation) for index, implementation, batch in seen
                if batch == 8]
    # layer 1's calibration pass follows layer 0's check; its own never ran
    assert pipeline == [(0, "eager"), (0, "sdpa"), (1, "sdpa"), (1, "eager")]
    assert not any(_pipeline_hooks(layer) for layer in model.model.layers)


def test_a_failed_calibration_leaves_no_sdpa_hook_on_the_model(tiny_llama_dir, monkeypatch):
    model, tok = load_tiny(tiny_llama_dir)
    _failing_layer(monkeypatch, 1, RuntimeError("CUDA out of memory"))
    with pytest.raises(RuntimeError, match="out of memory"):
        run(model, tok, [FlatQuantModifier(epochs=1, pipeline_sdpa=True)], num_samples=8,
            batch_size=8)
    assert not any(_pipeline_hooks(layer) for layer in model.model.layers)


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="llm-compressor calibrates on the GPU where there is one "
                    "(tests/test_modifier_gpu.py covers it there)")
def test_pipeline_sdpa_auto_keeps_eager_on_the_cpu(tiny_llama_dir):
    # "auto" switches CUDA forwards only (SDPA was slower in a CPU calibration)
    model, tok = load_tiny(tiny_llama_dir)
    seen = _attention_spy(model)
    run(model, tok, [FlatQuantModifier(epochs=1)], num_samples=8, batch_size=8)
    assert {implementation for _, implementation, batch in seen if batch == 8} == {"eager"}


def test_pipeline_attention_switches_only_the_chosen_device_types():
    model, steps = _causal_steps()
    layer = model.model.layers[0]
    seen = _attention_spy(model)
    kwargs = steps[0][0]
    for devices, expected in [(("cuda",), "eager"), (("cpu", "cuda"), "sdpa"), (None, "sdpa")]:
        attention = PipelineAttention(model, "sdpa", devices=devices)
        attention.attach(layer)
        attention.record(layer, True)
        with torch.no_grad():
            layer(**kwargs)  # hidden_states by keyword
            layer(kwargs["hidden_states"], **{k: v for k, v in kwargs.items()
                                              if k != "hidden_states"})
        attention.detach()
        assert [s[1] for s in seen[-2:]] == [expected, expected], devices
    assert model.config._attn_implementation == "eager"


def test_eager_causal_mask_is_transformers_eager_mask_shared_and_only_where_missing():
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    model, steps = _causal_steps()
    layer = model.model.layers[0]
    repair = EagerCausalMask(model)
    mask = repair.mask(16, torch.float32, torch.device("cpu"), None)
    torch.testing.assert_close(mask, steps[0][0]["attention_mask"], rtol=0, atol=0)
    assert repair.mask(16, torch.float32, torch.device("cpu"), 32) is mask  # window >= length
    window = repair.mask(16, torch.float32, torch.device("cpu"), 4)
    seen = sdpa_mask(batch_size=1, q_length=16, kv_length=16,
                     mask_function=sliding_window_causal_mask_function(4),
                     allow_is_causal_skip=False)
    assert torch.equal(window == 0, seen)

    calls = []
    layer.self_attn.register_forward_pre_hook(
        lambda m, a, k: calls.append(k["attention_mask"]), with_kwargs=True)
    repair.attach(layer)
    kwargs = {**steps[0][0], "attention_mask": None}
    with torch.no_grad():
        layer(**kwargs)  # eager, no mask: the causal one
        layer(**steps[0][0])  # its own mask stays
        with patch_attr(model.config, "_attn_implementation", "sdpa"):
            layer(**kwargs)  # SDPA reads None as causal
        layer(**kwargs)
    assert calls[0] is calls[3] and torch.equal(calls[0], mask)
    assert calls[1] is steps[0][0]["attention_mask"] and calls[2] is None
    repair.detach()
    with torch.no_grad():
        layer(**kwargs)
    assert calls[4] is None
