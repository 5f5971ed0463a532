"""What FlatQuant does to each decoder layer: transformed groups, W8A8_DYNAMIC linears
(listed, or sizes vllm-ascend's npu_kronecker_quant cannot take), and the weight
schemes checked against that plan."""

import pytest
import torch
from compressed_tensors.quantization import (
    QuantizationConfig,
    apply_quantization_config,
    preset_name_to_scheme,
)

from flatquant_modifier.mappings import LLAMA_MAPPINGS
from flatquant_modifier.plan import check_weight_schemes, plan_layers
from tests.conftest import build_tiny_llama
from tests.helpers import log_messages

# intermediate 144 = 12 x 12 (get_decompose_dim): a second factor that is not a
# multiple of 8, as Qwen2.5-7B's down_proj (18944 = 128 x 148)
UNDECOMPOSABLE = dict(intermediate_size=144)


def _plan(model, *, w8a8=(), undecomposable="w8a8_dynamic", ascend=True):
    layers = [(f"model.layers.{i}", layer) for i, layer in enumerate(model.model.layers)]
    return plan_layers(layers, LLAMA_MAPPINGS, ["lm_head"], list(w8a8), undecomposable,
                       ascend=ascend, nvfp4=False)


def _short(plan):
    return (
        [g.name.rpartition(".")[2] for g in plan.groups],
        [n.rpartition(".")[2] for n, _ in plan.int8],
        [n.rpartition(".")[2] for n, _ in plan.float],
    )


def test_undecomposable_down_proj_falls_back_to_w8a8_dynamic_with_one_line_per_layer():
    model = build_tiny_llama(**UNDECOMPOSABLE)
    with log_messages("INFO") as messages:
        plans = _plan(model)
    assert [_short(p) for p in plans] == [(["qkv", "o", "gate_up"], ["down_proj"], [])] * 2
    lines = [m for m in messages if "not transformed" in m]
    assert len(lines) == 2 and "model.layers.1: ['mlp.down_proj'] not transformed " \
        "(in_features=144 decomposes as 12 x 12" in lines[1] and "W8A8_DYNAMIC" in lines[1]


def test_undecomposable_float_and_error():
    model = build_tiny_llama(**UNDECOMPOSABLE)
    assert _short(_plan(model, undecomposable="float")[0]) == (
        ["qkv", "o", "gate_up"], [], ["down_proj"]
    )
    with pytest.raises(ValueError, match=r"\['mlp.down_proj'\] in model.layers.0: "
                       r"in_features=144 decomposes as 12 x 12.*undecomposable="):
        _plan(model, undecomposable="error")
    # a target other than vllm-ascend's W4A4 keeps the transform (and a warning)
    assert _short(_plan(model, ascend=False)[0])[0] == ["qkv", "o", "gate_up", "down"]


def test_listed_w8a8_dynamic_linears_leave_their_groups():
    model = build_tiny_llama()
    plans = _plan(model, w8a8=["re:.*o_proj$", "re:.*down_proj$"])
    assert _short(plans[0]) == (["qkv", "gate_up"], ["o_proj", "down_proj"], [])
    with pytest.raises(ValueError, match=r"w8a8_dynamic \['re:.*nope\$'\] matches no linear"):
        _plan(model, w8a8=["re:.*nope$"])
    with pytest.raises(ValueError, match=r"`ignore` \(or `w8a8_dynamic`\) removes only some"):
        _plan(model, w8a8=["re:.*k_proj$"])


def _quantize(model, groups):
    config = QuantizationConfig(config_groups={
        key: preset_name_to_scheme(preset, targets) for key, (preset, targets) in groups.items()
    })
    apply_quantization_config(model, config)


def test_weight_schemes_must_fit_the_plan():
    model = build_tiny_llama(**UNDECOMPOSABLE)
    plans = _plan(model)
    # down_proj served as W8A8_DYNAMIC but given int4 weights
    _quantize(model, {"w4": ("W4A16", ["Linear"])})
    for linear in model.modules():  # W4A16 is grouped; make it per channel
        scheme = getattr(linear, "quantization_scheme", None)
        if scheme is not None:
            scheme.weights.strategy, scheme.weights.group_size = "channel", None
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj is served as "
                       r"W8A8_DYNAMIC.*int8 per-channel.*flatquant_w4a4_mixed.yaml"):
        check_weight_schemes(plans, quantizes_activations=True)

    model = build_tiny_llama(**UNDECOMPOSABLE)
    plans = _plan(model, undecomposable="float")
    _quantize(model, {"w8": ("W8A16", ["Linear"])})
    with pytest.raises(ValueError, match=r"down_proj is kept in full precision.*`ignore`"):
        check_weight_schemes(plans, quantizes_activations=True)


def test_w8a8_dynamic_matches_full_names_as_ignore_does():
    model = build_tiny_llama()
    plans = _plan(model, w8a8=["model.layers.1.self_attn.o_proj"])
    assert _short(plans[0]) == (["qkv", "o", "gate_up", "down"], [], [])
    assert _short(plans[1]) == (["qkv", "gate_up", "down"], ["o_proj"], [])
    with pytest.raises(ValueError, match="matches no linear.*full names"):
        _plan(model, w8a8=["self_attn.o_proj"])  # relative names match nothing
    layers = [("model.layers.0", model.model.layers[0])]
    with pytest.raises(ValueError, match=r"o_proj is in both `ignore`.*and `w8a8_dynamic`"):
        plan_layers(layers, LLAMA_MAPPINGS, ["re:.*o_proj$"], ["re:.*o_proj$"],
                    "w8a8_dynamic", ascend=True, nvfp4=False)


def test_two_groups_never_fold_smoothing_into_one_producer():
    from flatquant_modifier import FlatQuantMapping

    shared = [  # parallel attention/MLP blocks (e.g. GPT-J, Cohere) read one norm
        FlatQuantMapping(name="qkv", targets=["re:.*(q|k|v)_proj$"],
                         smooth_layer="re:.*input_layernorm$"),
        FlatQuantMapping(name="gate_up", targets=["re:.*(gate|up)_proj$"],
                         smooth_layer="re:.*input_layernorm$"),
    ]
    model = build_tiny_llama()
    layers = [("model.layers.0", model.model.layers[0])]
    with log_messages() as messages:
        [plan] = plan_layers(layers, shared, [], [], "w8a8_dynamic", ascend=True, nvfp4=False)
    assert plan.groups[0].smooth is not None and plan.groups[1].smooth is None
    assert any("already takes another group's smoothing" in m for m in messages)


def test_w8a8_linears_without_a_scheme_warn_and_output_quantization_is_refused():
    model = build_tiny_llama(**UNDECOMPOSABLE)
    plans = _plan(model)
    with log_messages() as messages:  # weights to be quantized by a later oneshot
        check_weight_schemes(plans, quantizes_activations=True)
    # one line for all of them (MoE models have thousands of expert linears)
    warned = [m for m in messages if "served as W8A8_DYNAMIC have no weight scheme" in m]
    assert len(warned) == 1 and "2 linears" in warned[0] and "down_proj" in warned[0]
    scheme = preset_name_to_scheme("W8A16", ["re:.*q_proj$"])
    scheme.output_activations = scheme.weights.model_copy()
    apply_quantization_config(model, QuantizationConfig(config_groups={"g": scheme}))
    with pytest.raises(ValueError, match=r"q_proj: its scheme quantizes output activations"):
        check_weight_schemes(plans, quantizes_activations=True)


def _flatquant_then_gptq(first="flatquant", **flatquant):
    from llmcompressor.modifiers.quantization import GPTQModifier

    from flatquant_modifier import FlatQuantModifier
    from tests.helpers import WEIGHTS_W4

    flatquant = FlatQuantModifier(**{"epochs": 1, **flatquant})
    gptq = GPTQModifier(ignore=["lm_head"],
                        config_groups={"g": {"targets": ["Linear"], "weights": WEIGHTS_W4}})
    return [flatquant, gptq] if first == "flatquant" else [gptq, flatquant]


def _gptq_hessians_at_compression(monkeypatch) -> tuple[dict, dict]:
    """``hessians``, ``{(run, linear name): (Hessian, samples)}`` as GPTQ compresses, of
    the run ``now["run"]`` names; returns ``(hessians, now)``."""
    from llmcompressor.modifiers.quantization import GPTQModifier

    hessians, now, compress = {}, {"run": None}, GPTQModifier.compress_module_list

    def recording(self, modules):
        for module in modules:
            hessians[(now["run"], self._module_names[module])] = (
                self._hessians[module].clone(), int(self._num_samples[module]))
        return compress(self, modules)

    monkeypatch.setattr(GPTQModifier, "compress_module_list", recording)
    return hessians, now


@pytest.mark.parametrize("smooth", [False, True])
def test_gptq_sharing_the_pass_quantizes_against_the_transformed_inputs(
        tiny_llama_dir, monkeypatch, smooth):
    """pipeline="sequential": GPTQ's Hessians of a layer, gathered in the shared pass,
    are carried through FlatQuant's transforms (and smoothing), so the first layer (the
    same inputs, the same training in both pipelines) gets the Hessians and weights of
    llm-compressor's default of one pass per modifier, whose GPTQ pass runs the
    transformed layer (without weight clipping, which moves the later linears' inputs);
    the second layer trains on the first's GPTQ outputs."""
    from tests.conftest import load_tiny
    from tests.helpers import run

    hessians, now = _gptq_hessians_at_compression(monkeypatch)
    states = {}
    for pipeline in ("independent", "sequential"):
        now["run"] = pipeline
        model, tok = load_tiny(tiny_llama_dir)
        with log_messages("INFO") as messages:
            run(model, tok, _flatquant_then_gptq(learn_weight_clip=False, smooth=smooth),
                pipeline=pipeline)
        shared = any("GPTQ shares the calibration pass" in m for m in messages)
        assert shared == (pipeline == "sequential")
        states[pipeline] = {k: v.clone() for k, v in model.state_dict().items()
                            if k.startswith("model.layers.")}
    layer0 = [name for p, name in hessians if p == "independent" and ".layers.0." in name]
    assert len(layer0) == 7
    for name in layer0:
        (expected, n_expected), (got, n_got) = (hessians["independent", name],
                                                hessians["sequential", name])
        assert n_got == n_expected == 8
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max(),
                                   msg=name)
    independent, sequential = states["independent"], states["sequential"]
    assert independent.keys() == sequential.keys()
    for key in independent:
        if key.startswith("model.layers.0.") and key.endswith("weight"):
            # the same weights, but for a rounding GPTQ may flip on a float32 difference
            assert (sequential[key] != independent[key]).float().mean() < 0.01, key
    assert not torch.equal(sequential["model.layers.1.mlp.down_proj.weight"],
                           independent["model.layers.1.mlp.down_proj.weight"])


def test_a_shared_pass_accumulates_each_gptq_hessian_once(tiny_llama_dir, monkeypatch):
    """pipeline="sequential": each linear's Hessian takes every sample once, in the
    shared pass (no second forward of the transformed layer)."""
    from llmcompressor.modifiers.quantization import GPTQModifier

    from tests.conftest import load_tiny
    from tests.helpers import run

    calls, calibrate = {}, GPTQModifier.calibrate_module

    def counting(self, module, args, output):
        name = self._module_names[module]
        calls[name] = calls.get(name, 0) + 1
        return calibrate(self, module, args, output)

    monkeypatch.setattr(GPTQModifier, "calibrate_module", counting)
    model, tok = load_tiny(tiny_llama_dir)
    run(model, tok, _flatquant_then_gptq(), pipeline="sequential")
    layers = {name.split(".")[2] for name in calls}
    assert len(calls) == 7 * len(layers) and len(layers) == len(model.model.layers)
    assert set(calls.values()) == {8}, calls


def test_a_shared_pass_gives_gptq_the_hessians_of_a_skipped_layer(tiny_llama_dir, monkeypatch):
    """A layer left unchanged after a non-finite loss (on_nonfinite="skip") keeps the
    Hessians GPTQ gathered in the pass, untransformed: every linear is quantized
    against its full-precision inputs, as in GPTQ's own pass."""
    import math

    from tests.conftest import load_tiny
    from tests.helpers import run

    hessians, now = _gptq_hessians_at_compression(monkeypatch)
    for pipeline, flatquant in (("independent", {"lr": math.inf}),
                                ("sequential", {"lr": math.inf, "on_nonfinite": "skip"})):
        now["run"] = pipeline
        model, tok = load_tiny(tiny_llama_dir)
        modifiers = _flatquant_then_gptq(**flatquant)
        if pipeline == "independent":  # GPTQ alone: the Hessians of the untouched model
            modifiers = modifiers[1:]
        with log_messages() as messages:
            run(model, tok, modifiers, pipeline=pipeline)
    assert sum("Skipping it" in m for m in messages) == len(model.model.layers)
    sequential = {name: h for (p, name), h in hessians.items() if p == "sequential"}
    assert len(sequential) == 7 * len(model.model.layers)
    assert {n for _, n in sequential.values()} == {8}
    for name in (n for n in sequential if ".layers.0." in n):  # the same inputs
        torch.testing.assert_close(sequential[name][0], hessians["independent", name][0],
                                   msg=name)


def test_a_shared_pass_with_gptq_first_is_refused(tiny_llama_dir):
    from tests.conftest import load_tiny
    from tests.helpers import run

    model, tok = load_tiny(tiny_llama_dir)
    with pytest.raises(ValueError, match="GPTQModifier comes before FlatQuantModifier.*"
                       "List FlatQuantModifier first"):
        run(model, tok, _flatquant_then_gptq(first="gptq"), pipeline="sequential")
