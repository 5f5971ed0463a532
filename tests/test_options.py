"""FlatQuantOptions and the modifier's fields: contradictions refused with a message,
and a model_dump / model_validate round trip (as llm-compressor's modifiers are
serialized into the recipe saved with a checkpoint)."""

import pytest
import torch
import yaml
from pydantic import ValidationError

from flatquant_modifier import FlatQuantMapping, FlatQuantModifier
from flatquant_modifier.mappings import LLAMA_MAPPINGS
from flatquant_modifier.options import FlatQuantOptions, Precision, training_precision


def test_autocast_auto_is_bfloat16_on_cuda_only():
    layer = torch.nn.Linear(4, 4)
    options = FlatQuantOptions()
    assert options.autocast_dtype == "auto"
    assert training_precision(options, layer, torch.device("cpu")) == Precision(torch.float32, None)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert training_precision(options, layer, torch.device("cuda:0")).autocast == torch.bfloat16
    assert FlatQuantOptions(autocast_dtype="bfloat16").autocast_dtype == torch.bfloat16
    off = FlatQuantOptions(autocast_dtype=None)
    assert training_precision(off, layer, torch.device("cuda")).autocast is None
    # a float64 model trains in float64 whatever the autocast option
    assert training_precision(options, layer.double(), torch.device("cuda")) == Precision(
        torch.float64, None
    )


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(quant_format="nvfp4", w_bits=4), r"w_bits=4 does not apply: quant_format='nvfp4'"),
        (dict(quant_format="nvfp4", a_bits=4), r"a_bits=4 does not apply"),
        (dict(quant_format="nvfp4", learn_activation_clip=True), r"learn_activation_clip=True"),
        (dict(w_bits=None, learn_weight_clip=True), r"learn_weight_clip=True does not apply: w_bits=None"),
        (dict(a_bits=None, learn_activation_clip=True), r"learn_activation_clip=True does not apply: a_bits=None"),
        (dict(learn_weight_clip=False, learn_activation_clip=False, clip_lr=0.1), r"clip_lr=0.1 does not apply"),
        (dict(learn_weight_clip=False, learn_activation_clip=False, clip_init_logit=2.0), r"clip_init_logit=2.0"),
        (dict(smooth=False, smooth_alpha=0.5), r"smooth_alpha=0.5 does not apply: smooth=False"),
        (dict(sibling_patterns=[r"(.*)\.w2"], fuse_global_scales=False), r"sibling_patterns only apply"),
        (dict(autocast_dtype="float32"), r"use bfloat16, float16, None"),
        (dict(w_bits=9), r"less than or equal to 8"),
        (dict(quant_format="nvfp4", w8a8_dynamic=["re:.*o_proj$"]), r"w8a8_dynamic applies "
         r"to vllm-ascend's W4A4"),
        (dict(a_bits=None, undecomposable="float"), r"undecomposable applies to"),
        (dict(undecomposable="fp16"), r"'w8a8_dynamic', 'float' or 'error'"),
        (dict(quant_format="mxfp4", w_bits=8), r"w_bits=8 does not apply: quant_format='mxfp4'"),
        (dict(quant_format="mxfp4", a_bits=None), r"a_bits=None does not apply"),
        (dict(quant_format="mxfp4", learn_activation_clip=True), r"does not read clip_ratio"),
        (dict(quant_format="mxfp4", max_supported_tp=3), r"use a power of two"),
        (dict(max_supported_tp=4), r"only quant_format='mxfp4'"),
    ],
)
def test_contradictory_options_are_refused(options, message):
    with pytest.raises(ValidationError, match=message):
        FlatQuantModifier(**options)


def test_options_that_do_not_apply_are_switched_off_when_left_at_their_defaults():
    nvfp4 = FlatQuantModifier(quant_format="nvfp4")
    assert (nvfp4.w_bits, nvfp4.a_bits) == (None, None)
    assert not nvfp4.learn_weight_clip and not nvfp4.learn_activation_clip
    assert not nvfp4.quantizes_activations
    weights_only = FlatQuantModifier(a_bits=None)
    assert not weights_only.learn_activation_clip and weights_only.learn_weight_clip
    assert FlatQuantModifier().quantizes_activations
    mxfp4 = FlatQuantModifier(quant_format="mxfp4")
    assert mxfp4.max_supported_tp == 4 and mxfp4.quantizes_activations
    assert not mxfp4.learn_weight_clip and not mxfp4.learn_activation_clip
    assert FlatQuantModifier(quant_format="mxfp4", learn_weight_clip=True).learn_weight_clip


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(quant_format="nvfp4", epochs=3),
        dict(quant_format="mxfp4", max_supported_tp=2, w_bits=None),
        dict(a_bits=None, w_bits=8, smooth=False, parametrization="orthogonal"),
        dict(autocast_dtype="bfloat16", deterministic=True, offload_device="cpu",
             ignore="lm_head", sibling_patterns=[r"(.*)\.(?:w1|w3)"], on_nonfinite="skip"),
        dict(mappings=[FlatQuantMapping(name="qkv", targets=["re:.*q_proj$"],
                                        smooth_layer=None)]),
        dict(mappings=LLAMA_MAPPINGS, sequential_targets=["LlamaDecoderLayer"]),
        dict(w8a8_dynamic=["re:.*o_proj$", "re:.*down_proj$"], undecomposable="error"),
    ],
)
def test_model_dump_and_validate_round_trip(options):
    modifier = FlatQuantModifier(**options)
    dumped = modifier.model_dump()
    again = FlatQuantModifier.model_validate(dumped)
    assert again.model_dump() == dumped
    # through YAML, as a recipe file holds it
    assert FlatQuantModifier.model_validate(
        yaml.safe_load(yaml.safe_dump(modifier.model_dump(mode="json")))
    ).model_dump() == dumped


def test_the_recipe_llm_compressor_saves_rebuilds_the_same_modifier():
    # llm-compressor writes recipe.yaml without None values: those that differ from a
    # default are written "none"
    from llmcompressor.recipe import Recipe

    modifier = FlatQuantModifier(a_bits=None, w_bits=8, autocast_dtype=None, epochs=3,
                                 evaluation_samples=None, w8a8_dynamic=[],
                                 mappings=LLAMA_MAPPINGS)
    text = Recipe.from_modifiers([modifier]).yaml()
    assert "a_bits: none" in text and "autocast_dtype: none" in text
    assert "evaluation_samples: none" in text
    again = Recipe.create_instance(text).modifiers[0]

    def fields(m):
        return {k: v for k, v in m.model_dump().items() if not k.endswith("_")
                and k not in ("group", "index")}

    assert isinstance(again, FlatQuantModifier) and fields(again) == fields(modifier)
    assert again.a_bits is None and again.autocast_dtype is None
    assert again.evaluation_samples is None
    # smooth stays "auto" (a warning where a fold is not exact), not a forced True
    assert again.smooth == "auto"


def test_native_bfloat16_cpu_from_the_cpuinfo_flags():
    from flatquant_modifier.options import cpu_has_native_bfloat16

    zen4 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n"
    sapphire = "flags\t\t: avx2 avx512f amx_bf16 amx_tile amx_int8\n"
    avx2 = "flags\t\t: fpu sse avx avx2 fma\n"
    neoverse_v1 = "Features\t: fp asimd sve bf16 i8mm\n"
    assert cpu_has_native_bfloat16(zen4) and cpu_has_native_bfloat16(sapphire)
    assert cpu_has_native_bfloat16(neoverse_v1)
    assert not cpu_has_native_bfloat16(avx2) and not cpu_has_native_bfloat16("")
    # a flag named like one elsewhere on the line does not count
    assert not cpu_has_native_bfloat16("model name\t: bf16 edition\nflags\t\t: avx2\n")
